//! The hub's upstream bridge against the Dataverse emulator over real HTTP on loopback:
//! paging, delta with deletes, expired tokens, 412, 429, a failing change set, and an outage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod upstream_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fieldsync_node::upstream::DATAVERSE_ACTOR;
use fieldsync_store::Value;
use reqwest::Method;
use serde_json::{json, Value as J};
use upstream_support::{bridge, config, example, Emulator, EmulatorAndHub, ADMIN_TOKEN};
use uuid::Uuid;

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn hub_write(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    table: &str,
    id: Uuid,
    values: &[(&str, Value)],
) {
    replica
        .lock()
        .unwrap()
        .local_write(table, id, values)
        .unwrap();
}

fn hub_get(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    table: &str,
    id: Uuid,
) -> Option<fieldsync_store::Row> {
    replica.lock().unwrap().store().get(table, id).unwrap()
}

fn blob_ref_of(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    id: Uuid,
) -> fieldsync_store::BlobRef {
    match hub_get(replica, "account", id).unwrap().get("contract") {
        Value::File(b) => b.clone(),
        other => panic!("not a file: {other:?}"),
    }
}

/// A GET to the emulator as its administrator.
async fn admin_get(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url)
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap()
}

/// The HTTP requests the bridge has made so far.
fn requests(b: &fieldsync_node::upstream::Bridge) -> u64 {
    b.client().stats.requests.load(Ordering::Relaxed)
}

fn id_of(row: &serde_json::Value, key: &str) -> Uuid {
    Uuid::parse_str(row[key].as_str().unwrap()).unwrap()
}

/// Log entries of the Dataverse actor in the hub store.
fn dataverse_entries(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
) -> usize {
    let r = replica.lock().unwrap();
    r.store()
        .ops_since(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.actor == DATAVERSE_ACTOR)
        .count()
}

#[tokio::test]
async fn pull_follows_pages_then_deltas_with_deletes() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    for i in 0..7 {
        let (s, _) = emu
            .call(
                Method::POST,
                "accounts",
                Some(json!({"name": format!("Paged {i}")})),
            )
            .await;
        assert_eq!(s, 204);
    }
    let upstream = emu.rows("accounts").await;
    assert!(upstream.len() >= 10);
    let mut cfg = config(&emu, dir.path());
    cfg.page_size = 3;
    let b = bridge(cfg, &replica);

    let before = requests(&b);
    b.pull_table("account").await.unwrap();
    let gets = requests(&b) - before;
    assert_eq!(
        gets as usize,
        upstream.len().div_ceil(3),
        "one GET per page of 3"
    );
    for row in &upstream {
        let id = id_of(row, "accountid");
        let here = hub_get(&replica, "account", id).expect("every upstream row pulled");
        assert_eq!(here.get("name").to_string(), row["name"].as_str().unwrap());
    }
    let entries = dataverse_entries(&replica);
    assert_eq!(entries, upstream.len(), "one Dataverse op per row");

    // Office edits: one update, one delete, one create.
    let changed = id_of(&upstream[0], "accountid");
    let gone = id_of(&upstream[1], "accountid");
    let (s, _) = emu
        .call(
            Method::PATCH,
            &format!("accounts({changed})"),
            Some(json!({"telephone1": "555-0100"})),
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = emu
        .call(Method::DELETE, &format!("accounts({gone})"), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = emu
        .call(Method::POST, "accounts", Some(json!({"name": "Late"})))
        .await;
    assert_eq!(s, 204);

    b.pull_table("account").await.unwrap();
    assert_eq!(
        hub_get(&replica, "account", changed)
            .unwrap()
            .get("telephone1"),
        &text("555-0100")
    );
    assert!(hub_get(&replica, "account", gone).is_none());
    assert!(replica
        .lock()
        .unwrap()
        .store()
        .is_deleted("account", gone)
        .unwrap());
    assert_eq!(b.stats.rows_deleted.load(Ordering::Relaxed), 1);
    // Update + delete + create: three new ops, nothing re-applied.
    assert_eq!(dataverse_entries(&replica), entries + 3);

    // Nothing changed: an empty delta, no ops.
    b.pull_table("account").await.unwrap();
    assert_eq!(dataverse_entries(&replica), entries + 3);
}

#[tokio::test]
async fn expired_token_full_reread_reconciles_without_duplicates_or_resurrection() {
    let EmulatorAndHub { dir, emu, replica } =
        EmulatorAndHub::start(&["--change-tracking-retention-secs", "1"]);
    for i in 0..3 {
        emu.call(
            Method::POST,
            "contacts",
            Some(json!({"lastname": format!("Aging {i}")})),
        )
        .await;
    }
    let b = bridge(config(&emu, dir.path()), &replica);
    b.pull_table("contact").await.unwrap();
    let rows = emu.rows("contacts").await;
    assert!(rows.len() >= 3);
    let edited = id_of(&rows[0], "contactid");
    let removed = id_of(&rows[1], "contactid");
    let removed_here = id_of(&rows[2], "contactid");
    let entries = dataverse_entries(&replica);

    // While the token ages: the office edits one row and deletes another; the hub deletes a
    // third (not yet pushed).
    emu.call(
        Method::PATCH,
        &format!("contacts({edited})"),
        Some(json!({"jobtitle": "Supervisor"})),
    )
    .await;
    emu.call(Method::DELETE, &format!("contacts({removed})"), None)
        .await;
    {
        let r = replica.lock().unwrap();
        let mut tx = r.store().begin();
        tx.delete("contact", removed_here).unwrap();
        tx.commit().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;

    b.pull_table("contact").await.unwrap();
    assert_eq!(b.stats.full_reads.load(Ordering::Relaxed), 1);
    assert_eq!(
        hub_get(&replica, "contact", edited)
            .unwrap()
            .get("jobtitle"),
        &text("Supervisor")
    );
    assert!(
        hub_get(&replica, "contact", removed).is_none(),
        "deleted upstream"
    );
    assert!(
        hub_get(&replica, "contact", removed_here).is_none(),
        "a row the hub deleted is not resurrected by the full read"
    );
    // Exactly the edit and the delete became ops: unchanged rows added nothing.
    assert_eq!(dataverse_entries(&replica), entries + 2);
    let live = replica
        .lock()
        .unwrap()
        .store()
        .scan("contact")
        .unwrap()
        .count();
    assert_eq!(live, rows.len() - 2);
}

#[tokio::test]
async fn push_creates_updates_deletes_and_merges_on_412() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let b = bridge(config(&emu, dir.path()), &replica);
    b.pull().await.unwrap();

    let account = Uuid::new_v4();
    hub_write(&replica, "account", account, &[("name", text("Hub Made"))]);
    let contact = Uuid::new_v4();
    hub_write(
        &replica,
        "contact",
        contact,
        &[
            ("lastname", text("Field")),
            ("parentcustomerid", Value::Lookup(account)),
        ],
    );
    b.sync_once().await.unwrap();
    let up = emu
        .row("accounts", account)
        .await
        .expect("created upstream");
    assert_eq!(up["name"], "Hub Made");
    let c = emu
        .row("contacts", contact)
        .await
        .expect("created upstream");
    assert_eq!(c["_parentcustomerid_value"], account.to_string());
    // Dataverse made itself the owner: that came back to the hub.
    assert!(matches!(
        hub_get(&replica, "account", account)
            .unwrap()
            .get("ownerid"),
        Value::Owner(_)
    ));

    // The office changes the phone; the hub (a device) changes the name: 412, merge, retry.
    emu.call(
        Method::PATCH,
        &format!("accounts({account})"),
        Some(json!({"telephone1": "555-0199"})),
    )
    .await;
    hub_write(&replica, "account", account, &[("name", text("Renamed"))]);
    b.push().await.unwrap();
    assert!(b.stats.conflicts.load(Ordering::Relaxed) >= 1);
    let up = emu.row("accounts", account).await.unwrap();
    assert_eq!(up["name"], "Renamed");
    assert_eq!(up["telephone1"], "555-0199");
    let here = hub_get(&replica, "account", account).unwrap();
    assert_eq!(here.get("telephone1"), &text("555-0199"));

    // Both sides write the same column: Dataverse (the system of record, changed after the
    // hub last saw it) wins, and both sides end with the same value.
    emu.call(
        Method::PATCH,
        &format!("accounts({account})"),
        Some(json!({"name": "Office Name"})),
    )
    .await;
    hub_write(&replica, "account", account, &[("name", text("Hub Name"))]);
    b.sync_once().await.unwrap();
    let up = emu.row("accounts", account).await.unwrap();
    let here = hub_get(&replica, "account", account).unwrap();
    assert_eq!(up["name"], "Office Name");
    assert_eq!(here.get("name"), &text("Office Name"));

    // A delete on the hub reaches Dataverse; the next pull does not echo anything back.
    {
        let r = replica.lock().unwrap();
        let mut tx = r.store().begin();
        tx.delete("contact", contact).unwrap();
        tx.commit().unwrap();
    }
    let pushed = b.stats.rows_pushed.load(Ordering::Relaxed);
    b.sync_once().await.unwrap();
    assert!(emu.row("contacts", contact).await.is_none());
    assert_eq!(b.stats.rows_pushed.load(Ordering::Relaxed), pushed + 1);
    b.sync_once().await.unwrap();
    assert_eq!(
        b.stats.rows_pushed.load(Ordering::Relaxed),
        pushed + 1,
        "no echo"
    );
}

#[tokio::test]
async fn throttled_requests_wait_for_retry_after() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[
        "--rate-limit-requests",
        "3",
        "--rate-limit-window-secs",
        "1",
    ]);
    let mut cfg = config(&emu, dir.path());
    cfg.batch_size = 1; // one request per row, to run into the limit
    let b = bridge(cfg, &replica);
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        hub_write(
            &replica,
            "product",
            *id,
            &[("name", text(&format!("Part {i}")))],
        );
    }
    let start = std::time::Instant::now();
    b.push().await.unwrap();
    assert!(b.client().stats.throttled.load(Ordering::Relaxed) >= 1);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "waited Retry-After"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // One request: the check itself is subject to the limit.
    let upstream: Vec<Uuid> = emu
        .rows("products")
        .await
        .iter()
        .map(|r| id_of(r, "productid"))
        .collect();
    for id in &ids {
        assert!(upstream.contains(id));
    }
    assert_eq!(b.stats.rows_pushed.load(Ordering::Relaxed), 6);
}

#[tokio::test]
async fn failing_change_set_is_retried_row_by_row() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let b = bridge(config(&emu, dir.path()), &replica);
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        hub_write(&replica, "account", *id, &[("name", text("Batch"))]);
    }
    let before = requests(&b);
    b.push().await.unwrap();
    assert_eq!(requests(&b) - before, 1, "three creates in one $batch");
    // The office edits the middle row: the hub's next change set fails on it as a whole.
    emu.call(
        Method::PATCH,
        &format!("accounts({})", ids[1]),
        Some(json!({"accountnumber": "OFFICE-1"})),
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        hub_write(
            &replica,
            "account",
            *id,
            &[("name", text(&format!("Batch {i}")))],
        );
    }
    b.push().await.unwrap();
    assert_eq!(b.stats.failed_change_sets.load(Ordering::Relaxed), 1);
    for (i, id) in ids.iter().enumerate() {
        let up = emu.row("accounts", *id).await.unwrap();
        assert_eq!(up["name"], format!("Batch {i}"));
    }
    assert_eq!(
        emu.row("accounts", ids[1]).await.unwrap()["accountnumber"],
        "OFFICE-1"
    );
    assert_eq!(
        hub_get(&replica, "account", ids[1])
            .unwrap()
            .get("accountnumber"),
        &text("OFFICE-1")
    );
}

#[tokio::test]
async fn upstream_outage_keeps_the_queue_and_catches_up_once() {
    let EmulatorAndHub {
        dir,
        mut emu,
        replica,
    } = EmulatorAndHub::start(&[]);
    let b = std::sync::Arc::new(bridge(config(&emu, dir.path()), &replica));
    b.sync_once().await.unwrap();
    let baseline = emu.rows("accounts").await.len();

    emu.stop();
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn(b.clone().run(wake.clone()));
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        hub_write(
            &replica,
            "account",
            *id,
            &[("name", text(&format!("Offline {i}")))],
        );
        wake.notify_one();
    }
    // The hub keeps taking writes while Dataverse is down.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(b.stats.failed_rounds.load(Ordering::Relaxed) >= 1);
    assert_eq!(b.stats.rows_pushed.load(Ordering::Relaxed), 0);

    emu.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.stats.rows_pushed.load(Ordering::Relaxed) < 5 {
        assert!(std::time::Instant::now() < deadline, "caught up in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wake.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let rows = emu.rows("accounts").await;
    assert_eq!(rows.len(), baseline + 5, "each row created exactly once");
    for id in &ids {
        assert!(emu.row("accounts", *id).await.is_some());
    }
    assert_eq!(b.stats.rows_pushed.load(Ordering::Relaxed), 5);
}

/// A device's attachment reaches the hub's row before its bytes (the upload follows the op):
/// the row goes up without it, and the file follows once the upload completes.
#[tokio::test]
async fn a_file_still_uploading_from_a_device_follows_its_row() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let b = bridge(config(&emu, dir.path()), &replica);
    let data: Vec<u8> = (0..90_000u32).map(|i| (i % 241) as u8).collect();
    // The device's store made the reference; the hub has no bytes yet.
    let schema = replica.lock().unwrap().store().schema().clone();
    let device = fieldsync_store::Store::temporary(schema, Default::default()).unwrap();
    let blob = device.put_blob("site.pdf", &mut data.as_slice()).unwrap();
    let id = Uuid::new_v4();
    hub_write(
        &replica,
        "account",
        id,
        &[
            ("name", text("Site survey")),
            ("contract", Value::File(blob.clone())),
        ],
    );
    b.push().await.unwrap();
    let http = reqwest::Client::new();
    let api = format!("{}/api/data/v9.2/accounts({id})", emu.url());
    let row = emu.row("accounts", id).await.unwrap();
    assert_eq!(row["name"], "Site survey");
    let value = format!("{api}/contract/$value");
    let none = admin_get(&http, &value).await;
    assert_eq!(none.status(), 404, "no file before the upload completes");

    // A round with the upload still under way sends nothing more.
    let before = requests(&b);
    b.push().await.unwrap();
    assert_eq!(requests(&b), before);

    // The upload completes on the hub: the next round sends the file.
    let stored = replica
        .lock()
        .unwrap()
        .store()
        .put_blob("site.pdf", &mut data.as_slice())
        .unwrap();
    assert_eq!(stored, blob);
    b.push().await.unwrap();
    let got = admin_get(&http, &value).await;
    assert_eq!(got.headers()["x-ms-file-name"], "site.pdf");
    assert_eq!(got.bytes().await.unwrap().to_vec(), data);
    // Sent once.
    let before = requests(&b);
    b.push().await.unwrap();
    assert_eq!(requests(&b), before);
}

#[tokio::test]
async fn files_go_up_and_come_down_in_chunks() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let mut cfg = config(&emu, dir.path());
    cfg.file_chunk_bytes = 64 * 1024;
    let b = bridge(cfg, &replica);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let blob = replica
        .lock()
        .unwrap()
        .store()
        .put_blob("contract.pdf", &mut data.as_slice())
        .unwrap();
    let id = Uuid::new_v4();
    hub_write(
        &replica,
        "account",
        id,
        &[
            ("name", text("With a file")),
            ("contract", Value::File(blob)),
        ],
    );
    let before = requests(&b);
    b.push().await.unwrap();
    // The row, the chunked upload's start and its 4 chunks, then a read of the new file id.
    assert_eq!(requests(&b) - before, 7);
    let http = reqwest::Client::new();
    let value = format!("{}/api/data/v9.2/accounts({id})/contract/$value", emu.url());
    let got = admin_get(&http, &value).await;
    assert_eq!(got.headers()["x-ms-file-name"], "contract.pdf");
    assert_eq!(got.bytes().await.unwrap().to_vec(), data);

    // Pulling right after: the file is known, nothing is downloaded or written.
    let before = requests(&b);
    b.pull_table("account").await.unwrap();
    assert_eq!(requests(&b) - before, 1);
    assert_eq!(
        hub_get(&replica, "account", id).unwrap().get("contract"),
        &Value::File(blob_ref_of(&replica, id))
    );
    let entries = dataverse_entries(&replica);

    // The office replaces the file: the hub downloads it in ranges and writes it.
    let office: Vec<u8> = (0..150_000u32).map(|i| (i % 13) as u8).collect();
    emu.office_puts_file(id, "v2.pdf", &office).await;
    b.pull_table("account").await.unwrap();
    let row = hub_get(&replica, "account", id).unwrap();
    let Value::File(here) = row.get("contract").clone() else {
        panic!("no file on the hub: {row:?}")
    };
    assert_eq!(here.name, "v2.pdf");
    assert_eq!(
        replica.lock().unwrap().store().read_blob(&here).unwrap(),
        office
    );
    assert_eq!(dataverse_entries(&replica), entries + 1);
    // And it is not sent back.
    let pushed = b.stats.rows_pushed.load(Ordering::Relaxed);
    b.push().await.unwrap();
    assert_eq!(b.stats.rows_pushed.load(Ordering::Relaxed), pushed);

    // The office replaces the file again while the hub renames the row: the 412 re-read brings
    // the new file to the hub, and the hub's write does not put the old file back.
    let third: Vec<u8> = vec![7u8; 1000];
    emu.office_puts_file(id, "v3.pdf", &third).await;
    hub_write(
        &replica,
        "account",
        id,
        &[("name", text("Renamed with file"))],
    );
    b.push().await.unwrap();
    let here = blob_ref_of(&replica, id);
    assert_eq!(here.name, "v3.pdf");
    let got = admin_get(&http, &value).await;
    assert_eq!(got.bytes().await.unwrap().to_vec(), third);
    assert_eq!(
        emu.row("accounts", id).await.unwrap()["name"],
        "Renamed with file"
    );
}

/// A lookup to a row Dataverse does not have gets 404: never taken for a delete. A new row goes
/// up without such lookups and gets them once their rows exist (rows a lookup names go first,
/// cycles are linked after); an update that still points nowhere is refused (logged,
/// counted), and the bridge goes on with later rows in both directions.
#[tokio::test]
async fn a_lookup_dataverse_refuses_skips_the_write_and_never_deletes_the_row() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let b = bridge(config(&emu, dir.path()), &replica);
    b.pull().await.unwrap();

    // A contact first, then the account it comes to point at, in one round.
    let contact = Uuid::new_v4();
    hub_write(&replica, "contact", contact, &[("lastname", text("Early"))]);
    let account = Uuid::new_v4();
    hub_write(&replica, "account", account, &[("name", text("Late"))]);
    hub_write(
        &replica,
        "contact",
        contact,
        &[("parentcustomerid", Value::Lookup(account))],
    );
    b.sync_once().await.unwrap();
    let c = emu
        .row("contacts", contact)
        .await
        .expect("created upstream");
    assert_eq!(c["_parentcustomerid_value"], account.to_string());

    // A create pointing at a row nobody has: refused, kept on the hub.
    let orphan = Uuid::new_v4();
    hub_write(
        &replica,
        "contact",
        orphan,
        &[
            ("lastname", text("Orphan")),
            ("parentcustomerid", Value::Lookup(Uuid::new_v4())),
        ],
    );
    // An update pointing at a row nobody has: refused too, the row stays on both sides.
    hub_write(
        &replica,
        "contact",
        contact,
        &[("parentcustomerid", Value::Lookup(Uuid::new_v4()))],
    );
    let refused = b.stats.refused.load(Ordering::Relaxed);
    b.sync_once().await.unwrap();
    assert_eq!(b.stats.refused.load(Ordering::Relaxed), refused + 2);
    assert!(
        hub_get(&replica, "contact", orphan).is_some(),
        "deleted on the hub"
    );
    assert!(
        hub_get(&replica, "contact", contact).is_some(),
        "deleted on the hub"
    );
    assert!(emu.row("contacts", contact).await.is_some());
    // The orphan went up without its dangling lookup.
    let up = emu.row("contacts", orphan).await.expect("created upstream");
    assert!(up["_parentcustomerid_value"].is_null(), "{up}");

    // An account and its primary contact created together point at each other: created
    // first without those lookups, then linked.
    let (acct, prim) = (Uuid::new_v4(), Uuid::new_v4());
    hub_write(&replica, "account", acct, &[("name", text("Cycle"))]);
    hub_write(
        &replica,
        "contact",
        prim,
        &[
            ("lastname", text("Primary")),
            ("parentcustomerid", Value::Lookup(acct)),
        ],
    );
    hub_write(
        &replica,
        "account",
        acct,
        &[("primarycontactid", Value::Lookup(prim))],
    );
    b.sync_once().await.unwrap();
    let a = emu.row("accounts", acct).await.expect("created upstream");
    assert_eq!(a["_primarycontactid_value"], prim.to_string());
    let c = emu.row("contacts", prim).await.expect("created upstream");
    assert_eq!(c["_parentcustomerid_value"], acct.to_string());

    // Later writes still go up, and office changes still come down.
    hub_write(&replica, "account", account, &[("name", text("Renamed"))]);
    emu.call(
        Method::PATCH,
        &format!("contacts({contact})"),
        Some(json!({"firstname": "Office"})),
    )
    .await;
    b.sync_once().await.unwrap();
    assert_eq!(
        emu.row("accounts", account).await.unwrap()["name"],
        "Renamed"
    );
    assert_eq!(
        hub_get(&replica, "contact", contact)
            .unwrap()
            .get("firstname"),
        &text("Office")
    );
}

/// A value the hub's schema refuses (an option added in Dataverse since) is left as it was;
/// the row's other columns come in and the table's pull goes on.
#[tokio::test]
async fn a_value_the_hub_refuses_does_not_stop_its_rows_or_its_tables_pull() {
    let drifted = example("schema.toml").replace(
        "industrycode = { choice = [1, 2, 3, 4, 5, 6] }",
        "industrycode = { choice = [1, 2, 3] }",
    );
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::with_schema(&[], &drifted);
    let b = bridge(config(&emu, dir.path()), &replica);
    for (name, code) in [("Odd", 6), ("Fine", 2)] {
        let (s, _) = emu
            .call(
                Method::POST,
                "accounts",
                Some(json!({"name": name, "industrycode": code})),
            )
            .await;
        assert_eq!(s, 204);
    }
    b.pull().await.unwrap();
    assert_eq!(b.stats.rows_skipped.load(Ordering::Relaxed), 1);
    let by_name = |name: &str| {
        let r = replica.lock().unwrap();
        let found = r
            .store()
            .scan("account")
            .unwrap()
            .map(|row| row.unwrap())
            .find(|row| row.get("name") == &text(name));
        found
    };
    let odd = by_name("Odd").expect("the row came in");
    assert_eq!(odd.get("industrycode"), &Value::Null);
    assert_eq!(
        by_name("Fine").unwrap().get("industrycode"),
        &Value::Choice(2)
    );
    // One version changes a refused value and another column: the other column comes in.
    emu.call(
        Method::PATCH,
        &format!("accounts({})", odd.id),
        Some(json!({"industrycode": 5, "telephone1": "555-0142"})),
    )
    .await;
    b.pull().await.unwrap();
    let odd = by_name("Odd").unwrap();
    assert_eq!(odd.get("telephone1"), &text("555-0142"));
    assert_eq!(odd.get("industrycode"), &Value::Null);
    // A device edits the row: only what the hub changed goes up, so Dataverse keeps the value
    // the hub could not take.
    hub_write(
        &replica,
        "account",
        odd.id,
        &[("name", text("Odd Renamed"))],
    );
    b.sync_once().await.unwrap();
    let up = emu.row("accounts", odd.id).await.unwrap();
    assert_eq!(up["name"], "Odd Renamed");
    assert_eq!(up["industrycode"], 5, "{up}");
    assert_eq!(up["telephone1"], "555-0142");
}

/// A change that leaves the row's body as Dataverse has it (a value written again) sends no
/// request: no empty `PATCH` to fire plugins and audit for nothing.
#[tokio::test]
async fn an_update_that_changes_nothing_sends_nothing() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let b = bridge(config(&emu, dir.path()), &replica);
    b.pull().await.unwrap();
    let account = Uuid::new_v4();
    hub_write(&replica, "account", account, &[("name", text("Same"))]);
    b.push().await.unwrap();
    let pushed = b.stats.rows_pushed.load(Ordering::Relaxed);
    hub_write(&replica, "account", account, &[("name", text("Same"))]);
    let before = requests(&b);
    b.push().await.unwrap();
    assert_eq!(requests(&b), before, "a request for nothing");
    assert_eq!(b.stats.rows_pushed.load(Ordering::Relaxed), pushed);
    // A real change still goes.
    hub_write(&replica, "account", account, &[("name", text("Changed"))]);
    b.push().await.unwrap();
    assert_eq!(
        emu.row("accounts", account).await.unwrap()["name"],
        "Changed"
    );
}

/// A full re-read that cannot read one entry (a value of another type than the hub's schema
/// says) cannot tell which rows Dataverse deleted: it deletes none.
#[tokio::test]
async fn a_full_reread_with_an_unreadable_entry_deletes_nothing() {
    let drifted =
        example("schema.toml").replacen("telephone1 = \"text\"", "telephone1 = \"integer\"", 1);
    let EmulatorAndHub { dir, emu, replica } =
        EmulatorAndHub::with_schema(&["--change-tracking-retention-secs", "1"], &drifted);
    let b = bridge(config(&emu, dir.path()), &replica);
    let (s, _) = emu
        .call(Method::POST, "accounts", Some(json!({"name": "Keep"})))
        .await;
    assert_eq!(s, 204);
    b.pull_table("account").await.unwrap();
    let keep = emu
        .rows("accounts")
        .await
        .into_iter()
        .find(|r| r["name"] == "Keep")
        .unwrap();
    let keep = id_of(&keep, "accountid");
    assert!(hub_get(&replica, "account", keep).is_some());
    // Dataverse's value no longer reads as the hub's type; the change token expires.
    emu.call(
        Method::PATCH,
        &format!("accounts({keep})"),
        Some(json!({"telephone1": "555-0100"})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    b.pull_table("account").await.unwrap();
    assert!(b.stats.full_reads.load(Ordering::Relaxed) >= 1);
    assert!(b.stats.rows_skipped.load(Ordering::Relaxed) >= 1);
    assert!(
        hub_get(&replica, "account", keep).is_some(),
        "a row Dataverse still has was deleted on the hub"
    );
}

/// Customer lookups are written through their typed navigation property
/// (`parentcustomerid_account@odata.bind`, `customerid_account@odata.bind`), set and cleared,
/// and read back as `_<column>_value`.
#[tokio::test]
async fn customer_lookups_are_written_through_their_navigation_property() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let b = bridge(config(&emu, dir.path()), &replica);
    let (account, other, contact, case) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    hub_write(&replica, "account", account, &[("name", text("Customer"))]);
    hub_write(&replica, "account", other, &[("name", text("Other"))]);
    b.sync_once().await.unwrap();
    // A create and an update, each with a customer lookup.
    hub_write(
        &replica,
        "contact",
        contact,
        &[
            ("lastname", text("Buyer")),
            ("parentcustomerid", Value::Lookup(account)),
        ],
    );
    hub_write(&replica, "incident", case, &[("title", text("Broken"))]);
    b.sync_once().await.unwrap();
    hub_write(
        &replica,
        "incident",
        case,
        &[("customerid", Value::Lookup(account))],
    );
    hub_write(
        &replica,
        "contact",
        contact,
        &[("parentcustomerid", Value::Lookup(other))],
    );
    let refused = b.stats.refused.load(Ordering::Relaxed);
    b.sync_once().await.unwrap();
    assert_eq!(b.stats.refused.load(Ordering::Relaxed), refused);
    let c = emu
        .row("contacts", contact)
        .await
        .expect("created upstream");
    assert_eq!(c["_parentcustomerid_value"], other.to_string(), "{c}");
    let i = emu.row("incidents", case).await.expect("created upstream");
    assert_eq!(i["_customerid_value"], account.to_string(), "{i}");

    // Cleared through the same property.
    hub_write(
        &replica,
        "contact",
        contact,
        &[("parentcustomerid", Value::Null)],
    );
    b.sync_once().await.unwrap();
    assert_eq!(b.stats.refused.load(Ordering::Relaxed), refused);
    let c = emu.row("contacts", contact).await.unwrap();
    assert!(c["_parentcustomerid_value"].is_null(), "{c}");
    // And the round trip leaves the hub as it was: nothing pulled back over it.
    assert_eq!(
        hub_get(&replica, "contact", contact)
            .unwrap()
            .get("parentcustomerid"),
        &Value::Null
    );
    assert_eq!(
        hub_get(&replica, "incident", case)
            .unwrap()
            .get("customerid"),
        &Value::Lookup(account)
    );
}

/// A hub and an emulator that can lose replies, and a bridge between them.
async fn lost_reply_setup() -> (EmulatorAndHub, fieldsync_node::upstream::Bridge) {
    let setup = EmulatorAndHub::start(&["--test-faults"]);
    let mut c = config(&setup.emu, setup.dir.path());
    // A held row's reads back off on this schedule once they failed round after round.
    c.file_retry_ms = 100;
    c.file_retry_max_ms = 100;
    let b = bridge(c, &setup.replica);
    b.pull().await.unwrap();
    (setup, b)
}

fn hub_name(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    id: Uuid,
) -> Value {
    hub_get(replica, "account", id)
        .map(|r| r.get("name").clone())
        .unwrap_or(Value::Null)
}

async fn upstream_name(emu: &Emulator, id: Uuid) -> J {
    emu.row("accounts", id).await.expect("upstream")["name"].clone()
}

// A write Dataverse applied whose reply was lost must not make the hub's own write look like
// a change made in Dataverse: the hub's later edit of the same column stands, whichever comes
// first afterwards — the push (a `412` and a re-read) or the pull (the row in the changes).

#[tokio::test]
async fn a_lost_reply_to_a_create_does_not_undo_the_hubs_later_edit() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("Created"))]);
    emu.drop_write_replies(1).await;
    let lost = b.push().await.unwrap_err();
    assert!(
        matches!(
            lost,
            fieldsync_node::upstream::UpstreamError::Unreachable(_)
        ),
        "{lost:?}"
    );
    assert_eq!(b.stats.replies_lost.load(Ordering::Relaxed), 1);
    assert_eq!(upstream_name(&emu, id).await, "Created");
    // A device renames the row before the next round, which pushes first: the create again
    // finds the row (412), reads it, and writes the rename.
    hub_write(&replica, "account", id, &[("name", text("Renamed Later"))]);
    b.push().await.unwrap();
    b.pull().await.unwrap();
    assert_eq!(hub_name(&replica, id), text("Renamed Later"));
    assert_eq!(upstream_name(&emu, id).await, "Renamed Later");
}

#[tokio::test]
async fn a_lost_reply_to_an_update_does_not_undo_the_hubs_later_edit() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("First"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", id, &[("name", text("Sent"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    assert_eq!(upstream_name(&emu, id).await, "Sent");
    // A device edits the column again, and this time the pull comes first (a round pulls even
    // when its push failed).
    hub_write(&replica, "account", id, &[("name", text("Edited After"))]);
    b.pull().await.unwrap();
    assert_eq!(hub_name(&replica, id), text("Edited After"));
    b.sync_once().await.unwrap();
    assert_eq!(hub_name(&replica, id), text("Edited After"));
    assert_eq!(upstream_name(&emu, id).await, "Edited After");
}

#[tokio::test]
async fn a_lost_reply_to_a_change_set_does_not_undo_the_hubs_later_edit() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
    hub_write(&replica, "account", one, &[("name", text("One"))]);
    hub_write(&replica, "account", two, &[("name", text("Two"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", one, &[("name", text("Batch A"))]);
    hub_write(&replica, "account", two, &[("name", text("Batch B"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    assert_eq!(upstream_name(&emu, two).await, "Batch B");
    hub_write(&replica, "account", two, &[("name", text("B Again"))]);
    b.sync_once().await.unwrap();
    assert_eq!(hub_name(&replica, one), text("Batch A"));
    assert_eq!(hub_name(&replica, two), text("B Again"));
    assert_eq!(upstream_name(&emu, one).await, "Batch A");
    assert_eq!(upstream_name(&emu, two).await, "B Again");
}

#[tokio::test]
async fn after_a_lost_reply_a_change_made_in_dataverse_still_wins() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("First"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", id, &[("name", text("Lost"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    emu.call(
        Method::PATCH,
        &format!("accounts({id})"),
        Some(json!({"name": "Office Wins"})),
    )
    .await;
    b.sync_once().await.unwrap();
    assert_eq!(hub_name(&replica, id), text("Office Wins"));
    assert_eq!(upstream_name(&emu, id).await, "Office Wins");
}

// A write intent must not outlive the round after its write: while it lives, a change made in
// Dataverse that happens to hold a value the hub once sent is taken for the hub's own write and
// overwritten. Each case leaves an intent the old code kept: a write Dataverse refused, a write
// that never arrived with nothing left to send, and a create whose row the hub then deleted.

fn write_intent(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    id: Uuid,
) -> Option<fieldsync_node::upstream::state::WriteIntent> {
    let r = replica.lock().unwrap();
    fieldsync_node::upstream::state::write_intent(r.store(), "account", id).unwrap()
}

/// An account's "held back, still to be written" mark, if any.
fn resend_mark(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    id: Uuid,
) -> Option<fieldsync_node::upstream::state::Resend> {
    resend_mark_of(replica, "account", id)
}

/// A row's "held back, still to be written" mark, if any.
fn resend_mark_of(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    table: &str,
    id: Uuid,
) -> Option<fieldsync_node::upstream::state::Resend> {
    let r = replica.lock().unwrap();
    fieldsync_node::upstream::state::resend(r.store(), table, id).unwrap()
}

/// The office renames the row in Dataverse; a round later both sides hold the office's name.
async fn office_rename_wins(
    emu: &Emulator,
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    b: &fieldsync_node::upstream::Bridge,
    id: Uuid,
    name: &str,
) {
    let (status, _) = emu
        .call(
            Method::PATCH,
            &format!("accounts({id})"),
            Some(json!({ "name": name })),
        )
        .await;
    assert_eq!(status, 204);
    b.sync_once().await.unwrap();
    assert_eq!(hub_name(replica, id), text(name));
    assert_eq!(upstream_name(emu, id).await, name);
}

#[tokio::test]
async fn a_refused_write_leaves_no_intent_behind() {
    // The hub knows an option Dataverse does not: a write holding it is refused (400).
    let drifted = example("schema.toml").replace(
        "industrycode = { choice = [1, 2, 3, 4, 5, 6] }",
        "industrycode = { choice = [1, 2, 3, 4, 5, 6, 7] }",
    );
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::with_schema(&[], &drifted);
    let b = bridge(config(&emu, dir.path()), &replica);
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("Original"))]);
    b.push().await.unwrap();
    let refused = b.stats.refused.load(Ordering::Relaxed);
    hub_write(
        &replica,
        "account",
        id,
        &[
            ("name", text("Office Name")),
            ("industrycode", Value::Choice(7)),
        ],
    );
    b.push().await.unwrap();
    assert_eq!(b.stats.refused.load(Ordering::Relaxed), refused + 1);
    assert_eq!(
        write_intent(&replica, id),
        None,
        "a refusal applies nothing"
    );
    // The device undoes its edit: nothing to send, and the office later picks that name.
    hub_write(
        &replica,
        "account",
        id,
        &[("name", text("Original")), ("industrycode", Value::Null)],
    );
    b.push().await.unwrap();
    office_rename_wins(&emu, &replica, &b, id, "Office Name").await;
}

#[tokio::test]
async fn a_write_that_never_arrived_is_settled_by_the_next_round() {
    let (
        EmulatorAndHub {
            mut emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("Original"))]);
    b.push().await.unwrap();
    // Dataverse is away when the rename is sent: its outcome is unknown.
    emu.stop();
    hub_write(&replica, "account", id, &[("name", text("Office Name"))]);
    b.push().await.unwrap_err();
    assert!(write_intent(&replica, id).is_some());
    emu.restart();
    // The device undoes the rename before the next round: nothing is left to send, but the
    // round still reads the row, which says the rename was never applied.
    hub_write(&replica, "account", id, &[("name", text("Original"))]);
    b.push().await.unwrap();
    assert_eq!(write_intent(&replica, id), None);
    assert_eq!(upstream_name(&emu, id).await, "Original");
    office_rename_wins(&emu, &replica, &b, id, "Office Name").await;
}

#[tokio::test]
async fn a_lost_create_of_a_row_the_hub_then_deleted_is_settled_and_deleted() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("Short Lived"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    assert_eq!(upstream_name(&emu, id).await, "Short Lived");
    {
        let r = replica.lock().unwrap();
        let mut tx = r.store().begin();
        tx.delete("account", id).unwrap();
        tx.commit().unwrap();
    }
    b.push().await.unwrap();
    assert_eq!(write_intent(&replica, id), None);
    assert!(
        emu.row("accounts", id).await.is_none(),
        "the row the lost create made is deleted like the hub's"
    );
    b.sync_once().await.unwrap();
    assert!(hub_get(&replica, "account", id).is_none());
}

/// One row whose write intent cannot be settled (its read fails with a `5xx`, a plugin failing
/// on read) must not stop the push: the row is held back with its intent, the others go to
/// Dataverse, and once the row can be read it is settled and what the hub holds is written.
/// A row that stays unreadable is given up after `INTENT_READ_ATTEMPTS_MAX` rounds.
#[tokio::test]
async fn a_row_whose_lost_reply_cannot_be_read_does_not_stop_the_push() {
    use fieldsync_node::upstream::state::INTENT_READ_ATTEMPTS_MAX;
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let (held, other, stuck) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    hub_write(&replica, "account", held, &[("name", text("First"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", held, &[("name", text("Lost"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    assert!(write_intent(&replica, held).is_some());
    emu.fail_reads_of(Some(held)).await;
    // A device edits the row again, and another row is created: the round goes on without
    // the row it cannot read.
    hub_write(&replica, "account", held, &[("name", text("Later"))]);
    hub_write(&replica, "account", other, &[("name", text("Other"))]);
    b.push().await.unwrap();
    assert_eq!(upstream_name(&emu, other).await, "Other");
    assert!(write_intent(&replica, held).is_some(), "the intent is kept");
    assert_eq!(resend_mark(&replica, held).expect("held").read_failures, 1);
    assert_eq!(b.stats.intents_unsettled.load(Ordering::Relaxed), 1);
    // Readable again: settled (what Dataverse holds is the hub's own write) and the hub's
    // later edit, whose log entry the cursor passed, is written.
    emu.fail_reads_of(None).await;
    b.push().await.unwrap();
    assert_eq!(write_intent(&replica, held), None);
    assert_eq!(resend_mark(&replica, held), None, "written: no longer held");
    assert_eq!(upstream_name(&emu, held).await, "Later");
    b.pull().await.unwrap();
    assert_eq!(hub_name(&replica, held), text("Later"));

    // A row that stays unreadable is never given up: past its rounds its reads back off, the
    // others still go, and once readable it is written.
    hub_write(&replica, "account", stuck, &[("name", text("Stuck"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", stuck, &[("name", text("Stuck Lost"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    emu.fail_reads_of(Some(stuck)).await;
    hub_write(&replica, "account", stuck, &[("name", text("Stuck Later"))]);
    for round in 1..INTENT_READ_ATTEMPTS_MAX {
        b.push().await.unwrap();
        let mark = resend_mark(&replica, stuck).expect("held");
        assert_eq!((mark.read_failures, mark.retry_at_ms), (round, 0));
    }
    b.push().await.unwrap();
    let mark = resend_mark(&replica, stuck).expect("never given up");
    assert_eq!(mark.read_failures, INTENT_READ_ATTEMPTS_MAX);
    assert!(mark.retry_at_ms > 0, "its reads back off");
    assert!(write_intent(&replica, stuck).is_some());
    // Backing off: the next round does not read it (nor count a failure).
    let before = requests(&b);
    hub_write(&replica, "account", other, &[("name", text("Other Again"))]);
    b.push().await.unwrap();
    assert_eq!(upstream_name(&emu, other).await, "Other Again");
    assert_eq!(requests(&b), before + 1, "only the other row's write");
    assert_eq!(
        resend_mark(&replica, stuck).unwrap().read_failures,
        INTENT_READ_ATTEMPTS_MAX
    );
    emu.fail_reads_of(None).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    b.push().await.unwrap();
    assert_eq!(resend_mark(&replica, stuck), None);
    assert_eq!(upstream_name(&emu, stuck).await, "Stuck Later");
}

/// A create whose reply was lost, then deleted in Dataverse by an office user before the hub
/// learnt of it: the `404` of its re-read does not mean "never created" — the table's changes
/// (pulled first) say it was deleted, so the hub deletes its row rather than creating it again
/// (which left an orphan in Dataverse once the next pull deleted the hub's row).
#[tokio::test]
async fn a_lost_create_deleted_in_dataverse_is_not_created_again() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("Made Twice"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    assert_eq!(upstream_name(&emu, id).await, "Made Twice");
    let (status, _) = emu
        .call(Method::DELETE, &format!("accounts({id})"), None)
        .await;
    assert_eq!(status, 204);
    b.push().await.unwrap();
    assert!(
        emu.row("accounts", id).await.is_none(),
        "the office's delete was undone"
    );
    b.sync_once().await.unwrap();
    b.sync_once().await.unwrap();
    assert!(
        emu.row("accounts", id).await.is_none(),
        "an orphan upstream"
    );
    assert!(hub_get(&replica, "account", id).is_none());
    assert_eq!(write_intent(&replica, id), None);
}

/// A `412` whose re-read fails with a `5xx` holds that row back rather than ending the push:
/// the other rows go, and once the row can be read it is merged and the hub's edit written.
#[tokio::test]
async fn a_conflict_whose_row_cannot_be_read_holds_only_that_row_back() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let (held, other) = (Uuid::new_v4(), Uuid::new_v4());
    hub_write(&replica, "account", held, &[("name", text("Before"))]);
    b.push().await.unwrap();
    let (status, _) = emu
        .call(
            Method::PATCH,
            &format!("accounts({held})"),
            Some(json!({"telephone1": "555-0100"})),
        )
        .await;
    assert_eq!(status, 204);
    hub_write(&replica, "account", held, &[("name", text("Hub Name"))]);
    hub_write(&replica, "account", other, &[("name", text("Other"))]);
    emu.fail_reads_of(Some(held)).await;
    b.push().await.unwrap();
    assert_eq!(upstream_name(&emu, other).await, "Other");
    assert!(resend_mark(&replica, held).is_some(), "held back");
    emu.fail_reads_of(None).await;
    b.push().await.unwrap();
    assert_eq!(write_intent(&replica, held), None);
    assert_eq!(resend_mark(&replica, held), None);
    let row = emu.row("accounts", held).await.unwrap();
    assert_eq!(row["name"], "Hub Name");
    assert_eq!(row["telephone1"], "555-0100");
    assert_eq!(
        hub_get(&replica, "account", held)
            .unwrap()
            .get("telephone1"),
        &text("555-0100")
    );
}

/// H1: a held row's "still to be written" survives a pull that reads it. The device's edit of
/// a row whose lost reply cannot be read (held back, the cursor moved past it) reaches
/// Dataverse after an office edit of another column of the row is pulled in the same round
/// (which settles the write intent): the pull must not forget that the row is still owed.
#[tokio::test]
async fn a_held_row_pulled_before_it_is_read_is_still_written() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let held = Uuid::new_v4();
    hub_write(&replica, "account", held, &[("name", text("First"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", held, &[("name", text("Lost"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    emu.fail_reads_of(Some(held)).await;
    hub_write(&replica, "account", held, &[("name", text("Device Later"))]);
    // The push holds the row back; an office user edits another column; the round's pull
    // (reading the table's changes, not the row by id) brings that in.
    b.push().await.unwrap();
    let (status, _) = emu
        .call(
            Method::PATCH,
            &format!("accounts({held})"),
            Some(json!({"telephone1": "555-0101"})),
        )
        .await;
    assert_eq!(status, 204);
    b.pull().await.unwrap();
    emu.fail_reads_of(None).await;
    b.sync_once().await.unwrap();
    let row = emu.row("accounts", held).await.unwrap();
    assert_eq!(row["name"], "Device Later", "the device's edit was lost");
    assert_eq!(row["telephone1"], "555-0101");
    assert_eq!(hub_name(&replica, held), text("Device Later"));
    assert_eq!(
        hub_get(&replica, "account", held)
            .unwrap()
            .get("telephone1"),
        &text("555-0101")
    );
}

/// H2: a held row whose catch-up write fails (a `5xx`, nothing applied) is written by a later
/// round: the catch-up's own write intent, settled by the next read, must not stand for the
/// row's "still to be written".
#[tokio::test]
async fn a_held_row_whose_catch_up_write_fails_is_written_later() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let held = Uuid::new_v4();
    hub_write(&replica, "account", held, &[("name", text("First"))]);
    b.push().await.unwrap();
    hub_write(&replica, "account", held, &[("name", text("Lost"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    emu.fail_reads_of(Some(held)).await;
    hub_write(&replica, "account", held, &[("name", text("Device Later"))]);
    b.push().await.unwrap();
    // Readable again, but the catch-up write fails once, unapplied.
    emu.fail_reads_of(None).await;
    emu.fail_writes(1).await;
    b.push().await.unwrap_err();
    assert_eq!(upstream_name(&emu, held).await, "Lost");
    b.sync_once().await.unwrap();
    assert_eq!(upstream_name(&emu, held).await, "Device Later");
    assert_eq!(hub_name(&replica, held), text("Device Later"));
}

/// M4: a lost create in a table whose pull keeps failing (not the whole round's failure) is
/// held, not counted as the row's read failure and never dropped: once the table can be pulled
/// the row (with the device's later edit) is written.
#[tokio::test]
async fn a_lost_create_in_a_table_that_cannot_be_pulled_is_never_dropped() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let id = Uuid::new_v4();
    hub_write(&replica, "account", id, &[("name", text("Created"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    emu.fail_queries_of(Some("accounts")).await;
    hub_write(
        &replica,
        "account",
        id,
        &[("name", text("Edited Meanwhile"))],
    );
    for _ in 0..12 {
        b.push().await.unwrap();
        let mark = resend_mark(&replica, id).expect("held");
        assert_eq!(
            mark.read_failures, 0,
            "a table's failed pull is not the row's read"
        );
    }
    assert_eq!(upstream_name(&emu, id).await, "Created");
    emu.fail_queries_of(None).await;
    b.sync_once().await.unwrap();
    assert_eq!(upstream_name(&emu, id).await, "Edited Meanwhile");
    assert_eq!(hub_name(&replica, id), text("Edited Meanwhile"));
}

/// M3: a held row goes with the round's other rows, so its lookup to a row created in the same
/// round is written after that row exists (not refused as a lookup to a row Dataverse lacks).
#[tokio::test]
async fn a_held_rows_lookup_to_a_row_created_in_the_same_round_is_written() {
    let (
        EmulatorAndHub {
            emu,
            replica,
            dir: _dir,
        },
        b,
    ) = lost_reply_setup().await;
    let (contact, account) = (Uuid::new_v4(), Uuid::new_v4());
    hub_write(&replica, "contact", contact, &[("lastname", text("First"))]);
    b.push().await.unwrap();
    hub_write(&replica, "contact", contact, &[("lastname", text("Lost"))]);
    emu.drop_write_replies(1).await;
    b.push().await.unwrap_err();
    emu.fail_reads_of(Some(contact)).await;
    hub_write(
        &replica,
        "contact",
        contact,
        &[("parentcustomerid", Value::Lookup(account))],
    );
    b.push().await.unwrap();
    assert!(resend_mark_of(&replica, "contact", contact).is_some());
    // The lookup's target is made in the round that writes the held row.
    hub_write(&replica, "account", account, &[("name", text("Parent"))]);
    emu.fail_reads_of(None).await;
    b.push().await.unwrap();
    let c = emu.row("contacts", contact).await.unwrap();
    assert_eq!(c["_parentcustomerid_value"], account.to_string(), "{c}");
    assert_eq!(c["lastname"], "Lost");
    assert_eq!(resend_mark_of(&replica, "contact", contact), None);
}
