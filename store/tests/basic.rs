//! Writes, reads, conflicts, replication support, queries and blobs.

mod common;

use std::ops::Bound;

use common::*;
use fieldsync_store::{
    Durability, Order, Query, QueryPlan, RemoteOp, Schema, SchemaError, Store, StoreError, Value,
    WriteError,
};

#[test]
fn insert_update_delete_and_read_back() {
    let s = temp_store(1);
    let mut tx = s.begin();
    let id = tx
        .insert(
            "account",
            &[
                ("name", text("Contoso")),
                ("revenue", Value::Decimal("1250.50".parse().unwrap())),
                ("ownerid", user(7)),
            ],
        )
        .unwrap();
    let info = tx.commit().unwrap();
    assert_eq!((info.first_seq, info.last_seq), (1, 1));
    let row = s.get("account", id).unwrap().unwrap();
    assert_eq!(row.get("name"), &text("Contoso"));
    assert_eq!(row.get("statecode"), &Value::Choice(0));
    assert!(matches!(row.get("createdon"), Value::DateTime(_)));
    assert!(!row.has_conflicts);

    let mut tx = s.begin();
    tx.update("account", id, &[("name", text("Fabrikam"))])
        .unwrap();
    tx.update("account", id, &[("numberofemployees", Value::Integer(12))])
        .unwrap();
    let info = tx.commit().unwrap();
    assert_eq!((info.first_seq, info.last_seq), (2, 2), "one entry per row");
    let row = s.get("account", id).unwrap().unwrap();
    assert_eq!(row.get("name"), &text("Fabrikam"));
    assert_eq!(row.get("numberofemployees"), &Value::Integer(12));

    let mut tx = s.begin();
    tx.update("account", id, &[("name", Value::Null)]).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        s.get("account", id).unwrap().unwrap().get("name"),
        &Value::Null
    );

    let mut tx = s.begin();
    tx.delete("account", id).unwrap();
    tx.commit().unwrap();
    assert!(s.get("account", id).unwrap().is_none());
    assert!(s.is_deleted("account", id).unwrap());
    let mut tx = s.begin();
    assert!(matches!(
        tx.update("account", id, &[("name", text("x"))]),
        Err(WriteError::RowDeleted { .. })
    ));
    assert_eq!(s.scan("account").unwrap().count(), 0);
    assert!(s.check().unwrap().is_ok());
    assert_eq!(s.last_seq(), 4);
}

#[test]
fn concurrent_edits_merge_and_conflicts_are_exposed() {
    let a = temp_store(1);
    let b = temp_store(2);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("Contoso"))]).unwrap();
    tx.commit().unwrap();
    sync_all(&a, &b);
    assert_eq!(
        b.get("account", id).unwrap().unwrap().get("name"),
        &text("Contoso")
    );

    // Different columns merge; the same column conflicts.
    let mut tx = a.begin();
    tx.update(
        "account",
        id,
        &[
            ("name", text("A name")),
            ("numberofemployees", Value::Integer(5)),
        ],
    )
    .unwrap();
    tx.commit().unwrap();
    let mut tx = b.begin();
    tx.update(
        "account",
        id,
        &[("name", text("B name")), ("industrycode", Value::Choice(2))],
    )
    .unwrap();
    tx.commit().unwrap();
    sync_all(&a, &b);
    sync_all(&b, &a);
    let ra = a.get("account", id).unwrap().unwrap();
    let rb = b.get("account", id).unwrap().unwrap();
    assert_eq!(ra, rb);
    assert_eq!(ra.get("numberofemployees"), &Value::Integer(5));
    assert_eq!(ra.get("industrycode"), &Value::Choice(2));
    assert!(ra.has_conflicts);
    let ca = a.conflicts("account", id).unwrap();
    assert_eq!(ca, b.conflicts("account", id).unwrap());
    assert_eq!(ca.len(), 1);
    assert_eq!(ca[0].column, "name");
    assert_eq!(ca[0].values.len(), 2);
    assert_eq!(&ca[0].winner, ra.get("name"));
    let actors: Vec<_> = ca[0].values.iter().map(|(_, a)| *a).collect();
    assert!(actors.contains(&actor(1)) && actors.contains(&actor(2)));
    // Both stores agree with real automerge documents.
    assert!(a.check().unwrap().is_ok(), "{:?}", a.check().unwrap());
    assert!(b.check().unwrap().is_ok());

    // Writing the column resolves the conflict.
    let mut tx = a.begin();
    tx.update("account", id, &[("name", text("Resolved"))])
        .unwrap();
    tx.commit().unwrap();
    sync_all(&a, &b);
    assert!(b.conflicts("account", id).unwrap().is_empty());
    assert!(!b.get("account", id).unwrap().unwrap().has_conflicts);
    assert_eq!(
        b.get("account", id).unwrap().unwrap().get("name"),
        &text("Resolved")
    );
}

#[test]
fn delete_wins_over_a_concurrent_edit() {
    let a = temp_store(1);
    let b = temp_store(2);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("Contoso"))]).unwrap();
    tx.commit().unwrap();
    sync_all(&a, &b);
    let mut tx = a.begin();
    tx.delete("account", id).unwrap();
    tx.commit().unwrap();
    let mut tx = b.begin();
    tx.update("account", id, &[("name", text("edited"))])
        .unwrap();
    tx.commit().unwrap();
    sync_all(&a, &b);
    sync_all(&b, &a);
    assert!(a.get("account", id).unwrap().is_none());
    assert!(b.get("account", id).unwrap().is_none());
    assert!(a.check().unwrap().is_ok());
}

#[test]
fn apply_remote_is_idempotent_and_holds_early_changes() {
    let a = temp_store(1);
    let b = temp_store(2);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("v1"))]).unwrap();
    tx.commit().unwrap();
    for i in 2..=4 {
        let mut tx = a.begin();
        tx.update("account", id, &[("name", text(&format!("v{i}")))])
            .unwrap();
        tx.commit().unwrap();
    }
    let ops: Vec<RemoteOp> = a
        .ops_since(0, 100)
        .unwrap()
        .iter()
        .map(|e| e.to_remote())
        .collect();
    assert_eq!(ops.len(), 4);
    // A point read of the log gives the same entries.
    for e in a.ops_since(0, 100).unwrap() {
        let at = a.log_entry(e.seq).unwrap().unwrap();
        assert_eq!(
            (at.seq, at.row, at.hash, at.change),
            (e.seq, e.row, e.hash, e.change)
        );
    }
    assert!(a.log_entry(0).unwrap().is_none());
    assert!(a.log_entry(a.last_seq() + 1).unwrap().is_none());
    // Newest first: all but the insert are held.
    let out = b
        .apply_remote(&[ops[3].clone(), ops[2].clone()], Durability::Group)
        .unwrap();
    assert_eq!((out.applied, out.held, out.duplicates), (0, 2, 0));
    assert!(b.get("account", id).unwrap().is_none());
    let out = b
        .apply_remote(&[ops[2].clone()], Durability::Group)
        .unwrap();
    assert_eq!((out.applied, out.held, out.duplicates), (0, 0, 1));
    let out = b
        .apply_remote(&[ops[0].clone(), ops[1].clone()], Durability::Group)
        .unwrap();
    assert_eq!((out.applied, out.held, out.duplicates), (4, 0, 0));
    assert_eq!(
        b.get("account", id).unwrap().unwrap().get("name"),
        &text("v4")
    );
    let before = b.last_seq();
    let out = b.apply_remote(&ops, Durability::Group).unwrap();
    assert_eq!((out.applied, out.duplicates), (0, 4));
    assert_eq!(b.last_seq(), before, "duplicates add no log entry");
    assert!(b.check().unwrap().is_ok());
}

#[test]
fn export_import_evict_ack_and_compact() {
    let a = temp_store(1);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("v1"))]).unwrap();
    tx.commit().unwrap();
    let mut tx = a.begin();
    tx.update("account", id, &[("name", text("v2"))]).unwrap();
    tx.commit().unwrap();

    assert!(matches!(
        a.evict_row("account", id),
        Err(StoreError::UnacknowledgedChanges { .. })
    ));
    assert_eq!(a.compaction_backlog().unwrap(), 0);
    a.acknowledge(1).unwrap();
    assert!(matches!(
        a.acknowledge(99),
        Err(StoreError::AckBeyondLog { .. })
    ));
    assert_eq!(a.compaction_backlog().unwrap(), 1);
    let report = a.compact().unwrap();
    assert_eq!(report.entries_removed, 1);
    assert_eq!(
        a.compaction_backlog().unwrap(),
        0,
        "nothing acknowledged is left"
    );
    let left = a.ops_since(0, 100).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, 2);
    assert!(a.check().unwrap().is_ok(), "{:?}", a.check().unwrap());
    a.rebuild().unwrap();
    assert_eq!(
        a.get("account", id).unwrap().unwrap().get("name"),
        &text("v2")
    );

    // A fresh replica from the compacted export plus the unacknowledged op.
    let export = a.export_row("account", id).unwrap().unwrap();
    let b = temp_store(2);
    b.import_row(&export, Durability::Group).unwrap();
    b.import_row(&export, Durability::Group).unwrap();
    assert_eq!(b.get("account", id).unwrap(), a.get("account", id).unwrap());
    assert!(b.check().unwrap().is_ok());

    a.acknowledge(2).unwrap();
    assert!(a.evict_row("account", id).unwrap());
    assert!(a.get("account", id).unwrap().is_none());
    assert!(!a.evict_row("account", id).unwrap());
    assert!(a.check().unwrap().is_ok());
    a.compact().unwrap();
    assert_eq!(a.last_seq(), 2);
}

#[test]
fn my_active_work_orders_use_the_index() {
    let s = temp_store(1);
    let mut tx = s.begin();
    let mut mine = Vec::new();
    for i in 0..40 {
        let owner = if i % 2 == 0 { user(1) } else { user(2) };
        let id = tx
            .insert(
                "msdyn_workorder",
                &[
                    ("msdyn_name", text(&format!("wo {i}"))),
                    ("ownerid", owner),
                    ("statecode", Value::Choice(if i % 4 == 0 { 1 } else { 0 })),
                    ("modifiedon", Value::DateTime(1000 + i)),
                    ("msdyn_priority", Value::Choice((i % 3 + 1) as i32)),
                ],
            )
            .unwrap();
        if i % 2 == 0 && i % 4 != 0 {
            mine.push(id);
        }
    }
    tx.commit().unwrap();
    let q = Query::table("msdyn_workorder")
        .eq("ownerid", user(1))
        .eq("statecode", Value::Choice(0))
        .order_by("modifiedon", Order::Desc)
        .limit(5);
    assert_eq!(s.plan(&q).unwrap(), QueryPlan::OwnerStateIndex);
    let rows = s.query(&q).unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| mine.contains(&r.id)));
    let times: Vec<_> = rows.iter().map(|r| r.get("modifiedon").clone()).collect();
    assert_eq!(times[0], Value::DateTime(1038));
    assert!(times
        .windows(2)
        .all(|w| matches!((&w[0], &w[1]), (Value::DateTime(a), Value::DateTime(b)) if a > b)));
    let all = s
        .query(
            &Query::table("msdyn_workorder")
                .eq("ownerid", user(1))
                .eq("statecode", Value::Choice(0)),
        )
        .unwrap();
    assert_eq!(all.len(), mine.len());

    let q = Query::table("msdyn_workorder").range(
        "msdyn_priority",
        Bound::Included(Value::Choice(2)),
        Bound::Unbounded,
    );
    assert_eq!(
        s.plan(&q).unwrap(),
        QueryPlan::IndexRange {
            column: "msdyn_priority".into()
        }
    );
    let rows = s.query(&q).unwrap();
    assert!(rows
        .iter()
        .all(|r| matches!(r.get("msdyn_priority"), Value::Choice(p) if *p >= 2)));
    assert_eq!(rows.len(), 26);
    let q = Query::table("msdyn_workorder").eq("msdyn_name", text("wo 3"));
    assert_eq!(s.plan(&q).unwrap(), QueryPlan::TableScan);
    assert_eq!(s.query(&q).unwrap().len(), 1);
    // An update moves the row between index entries.
    let mut tx = s.begin();
    tx.update(
        "msdyn_workorder",
        mine[0],
        &[("statecode", Value::Choice(1))],
    )
    .unwrap();
    tx.commit().unwrap();
    let all = s
        .query(
            &Query::table("msdyn_workorder")
                .eq("ownerid", user(1))
                .eq("statecode", Value::Choice(0)),
        )
        .unwrap();
    assert_eq!(all.len(), mine.len() - 1);
    assert!(s.check().unwrap().is_ok());
}

/// A file reference is held to its column's maximum and, for content the store holds, to that
/// content's size, when a write sets it; a row that already holds a larger one (written where
/// the maximum was higher, and merged here: merges do not check) saves as before.
#[test]
fn file_references_are_checked_when_a_write_sets_them() {
    let s = temp_store(1);
    let held = s.put_blob("c.pdf", &mut [1u8; 3000].as_slice()).unwrap();
    let mut short = held.clone();
    short.size = 5;
    let mut tx = s.begin();
    let err = tx
        .insert("account", &[("contract", Value::File(short))])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the reference gives 5 bytes for content held at 3000"),
        "{err}"
    );
    drop(tx);
    let loose = Schema::from_toml(&SCHEMA.replace(
        "contract = { type = \"file\", max_size_kb = 16384 }",
        "contract = { type = \"file\", max_size_kb = 65536 }",
    ))
    .unwrap();
    let wide = Store::temporary(loose, options(2)).unwrap();
    let big = fieldsync_store::BlobRef {
        sha256: [9; 32],
        size: 20 << 20,
        name: "big.pdf".into(),
    };
    let mut tx = wide.begin();
    let id = tx
        .insert("account", &[("contract", Value::File(big.clone()))])
        .unwrap();
    tx.commit().unwrap();
    sync_all(&wide, &s);
    assert_eq!(
        s.get("account", id).unwrap().unwrap().get("contract"),
        &Value::File(big.clone())
    );
    let mut tx = s.begin();
    tx.update(
        "account",
        id,
        &[
            ("name", text("saved whole")),
            ("contract", Value::File(big.clone())),
        ],
    )
    .unwrap();
    let mut other = big;
    other.sha256 = [10; 32];
    let err = tx
        .update("account", id, &[("contract", Value::File(other))])
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::Schema(SchemaError::FileTooLarge { .. })),
        "{err}"
    );
    tx.commit().unwrap();
    assert_eq!(
        s.get("account", id).unwrap().unwrap().get("name"),
        &text("saved whole")
    );
}

/// An image column takes GIF, JPEG, TIFF, BMP or PNG content of at most 30 MB: checked on
/// every local write whose content the store holds, and on the size of any.
#[test]
fn image_columns_take_only_images() {
    let s = temp_store(1);
    let text = s
        .put_blob("notes.png", &mut &b"plain text, named like an image"[..])
        .unwrap();
    let png = s
        .put_blob("logo.png", &mut &b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"[..])
        .unwrap();
    let before = s.last_seq();
    let mut tx = s.begin();
    let err = tx
        .insert("account", &[("logo", Value::Image(text.clone()))])
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::InvalidValue { column, reason, .. }
            if column == "logo" && reason.contains("not a GIF, JPEG, TIFF, BMP or PNG")),
        "{err}"
    );
    let id = tx
        .insert("account", &[("logo", Value::Image(png.clone()))])
        .unwrap();
    // An update and a bulk insert are checked too.
    assert!(tx
        .update("account", id, &[("logo", Value::Image(text.clone()))])
        .is_err());
    tx.commit().unwrap();
    assert!(s
        .bulk_insert(
            "account",
            vec![vec![("logo".to_string(), Value::Image(text.clone()))]],
            &mut |_| {}
        )
        .is_err());
    assert_eq!(s.last_seq(), before + 1, "only the PNG row was written");
    // Content not here yet (the hub checks it when it arrives): only its size.
    let mut absent = png.clone();
    absent.sha256 = [7; 32];
    let mut tx = s.begin();
    tx.insert("account", &[("logo", Value::Image(absent.clone()))])
        .unwrap();
    // Over the column's maximum (none given: Dataverse's limit for an image column, 30 MiB).
    absent.size = fieldsync_store::LIMIT_IMAGE_MAX_KB * 1024 + 1;
    let err = tx
        .insert("account", &[("logo", Value::Image(absent))])
        .unwrap_err();
    assert!(
        matches!(&err, WriteError::Schema(SchemaError::FileTooLarge { column, .. }) if column == "logo"),
        "{err}"
    );
    // A file column's own maximum (`contract`: 16 MiB in this schema).
    let mut big = png.clone();
    big.sha256 = [8; 32];
    big.size = 16 * 1024 * 1024 + 1;
    let err = tx
        .insert("account", &[("contract", Value::File(big))])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("takes files of at most 16777216 bytes"),
        "{err}"
    );
    tx.commit().unwrap();

    // A reference written before its content arrived (or before this check existed) is not
    // checked again when the row is saved with it unchanged; a new reference to it is.
    let other = temp_store(2);
    let mut tx = other.begin();
    let row = tx
        .insert("account", &[("logo", Value::Image(text.clone()))])
        .unwrap();
    tx.commit().unwrap();
    other
        .put_blob("notes.png", &mut &b"plain text, named like an image"[..])
        .unwrap();
    let mut tx = other.begin();
    tx.update(
        "account",
        row,
        &[
            ("logo", Value::Image(text.clone())),
            ("name", Value::Text("re-saved".into())),
        ],
    )
    .unwrap();
    assert!(tx
        .insert("account", &[("logo", Value::Image(text))])
        .is_err());
    tx.commit().unwrap();
}

#[test]
fn blobs_round_trip_in_chunks() {
    let s = temp_store(1);
    let mut content: Vec<u8> = (0..(fieldsync_store::BLOB_CHUNK_BYTES * 2 + 1000))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    content[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]); // a JPEG, for the image column

    let r = s.put_blob("photo.jpg", &mut content.as_slice()).unwrap();
    assert_eq!(r.size, content.len() as u64);
    assert_eq!(s.read_blob(&r).unwrap(), content);
    assert_eq!(s.read_blob_chunk(&r, 2).unwrap().unwrap().len(), 1000);
    assert_eq!(s.read_blob_chunk(&r, 3).unwrap(), None);
    let again = s.put_blob("copy.jpg", &mut content.as_slice()).unwrap();
    assert_eq!(again.sha256, r.sha256);
    let mut tx = s.begin();
    let id = tx
        .insert("account", &[("logo", Value::Image(r.clone()))])
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(
        s.get("account", id).unwrap().unwrap().get("logo"),
        &Value::Image(r.clone())
    );
    // A row's references alone, as `get` gives them; none once it is deleted.
    assert_eq!(
        s.blob_refs("account", id).unwrap(),
        vec![("logo".to_string(), r.clone())]
    );
    let mut tx = s.begin();
    tx.delete("account", id).unwrap();
    tx.commit().unwrap();
    assert!(s.blob_refs("account", id).unwrap().is_empty());
    assert!(s
        .blob_refs("account", fieldsync_store::RowId::from_u128(7))
        .unwrap()
        .is_empty());
    assert!(s.blob_refs("nosuchtable", id).is_err());
    let empty = s.put_blob("empty", &mut &b""[..]).unwrap();
    assert_eq!(s.read_blob(&empty).unwrap(), Vec::<u8>::new());
    let mut missing = empty.clone();
    missing.sha256 = [9; 32];
    assert!(matches!(
        s.read_blob(&missing),
        Err(StoreError::BlobNotFound(_))
    ));
}

#[test]
fn bulk_insert_writes_every_row() {
    let s = temp_store(1);
    let rows: Vec<Vec<(String, Value)>> = (0..5000)
        .map(|i| {
            vec![
                ("name".to_string(), text(&format!("acc {i}"))),
                ("ownerid".to_string(), user((i % 3) as u8)),
                ("numberofemployees".to_string(), Value::Integer(i)),
            ]
        })
        .collect();
    let mut calls = Vec::new();
    let ids = s
        .bulk_insert("account", rows, &mut |n| calls.push(n))
        .unwrap();
    assert_eq!(ids.len(), 5000);
    assert_eq!(calls.last(), Some(&5000));
    assert_eq!(s.last_seq(), 5000);
    let r = s.get("account", ids[4321]).unwrap().unwrap();
    assert_eq!(r.get("numberofemployees"), &Value::Integer(4321));
    let q = Query::table("account")
        .eq("ownerid", user(1))
        .eq("statecode", Value::Choice(0));
    assert_eq!(s.query(&q).unwrap().len(), 1667);
    assert!(s.check().unwrap().is_ok());
    let dir = tempfile::tempdir().unwrap();
    let p = Store::create(dir.path(), schema(), options(3)).unwrap();
    let bad = vec![vec![("nope".to_string(), Value::Integer(1))]];
    assert!(matches!(
        p.bulk_insert("account", bad, &mut |_| {}),
        Err(WriteError::Schema(_))
    ));
    assert_eq!(p.last_seq(), 0);
    // Rows with given ids; a taken or repeated id refuses the whole import.
    let given = uuid::Uuid::new_v4();
    let ids = p
        .bulk_insert(
            "account",
            vec![
                (Some(given), vec![("name".to_string(), text("g"))]),
                (None, vec![]),
            ],
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(ids[0], given);
    let r = p.bulk_insert("account", vec![(given, vec![])], &mut |_| {});
    assert!(matches!(r, Err(WriteError::RowExists { .. })));
    let other = uuid::Uuid::new_v4();
    let r = p.bulk_insert(
        "account",
        vec![(other, vec![]), (other, vec![])],
        &mut |_| {},
    );
    assert!(matches!(r, Err(WriteError::RowExists { .. })));
    assert_eq!(p.last_seq(), 2);
}

#[test]
fn reopen_keeps_actor_rows_and_seq_and_ids_stay_unique() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    let opts = || fieldsync_store::StoreOptions::default().with_durability(Durability::Group);
    let (actor, first) = {
        let s = Store::create(&p, schema(), opts()).unwrap();
        let mut tx = s.begin();
        let id = tx.insert("account", &[("name", text("a"))]).unwrap();
        tx.commit().unwrap();
        s.sync().unwrap();
        (s.actor(), id)
    };
    let s = Store::open(&p, opts()).unwrap();
    assert_eq!(s.actor(), actor, "the random actor is persisted");
    assert_eq!(s.last_seq(), 1);
    assert!(s.get("account", first).unwrap().is_some());
    let mut tx = s.begin();
    let second = tx.insert("account", &[]).unwrap();
    tx.commit().unwrap();
    assert_ne!(first, second, "a reopened store does not reuse row ids");
    assert_eq!(s.last_seq(), 2);
    let status = s.status().unwrap();
    assert_eq!(status.rows_per_table["account"], 2);
    assert_eq!(status.log_entries, 2);
    assert!(status.disk_bytes > 0);
    assert!(s.check().unwrap().is_ok());
}

#[test]
fn rows_travel_as_change_chunks_without_documents() {
    // Two replicas edit one row; the export of a row with no compacted base is its change
    // chunks, which automerge itself loads, and `import_rows` applies in one write.
    let a = temp_store(1);
    let b = temp_store(2);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("v1"))]).unwrap();
    let other = tx.insert("account", &[("name", text("other"))]).unwrap();
    tx.commit().unwrap();
    b.import_row(
        &a.export_row("account", id).unwrap().unwrap(),
        Durability::Group,
    )
    .unwrap();
    let mut tx = b.begin();
    tx.update("account", id, &[("revenue", Value::Decimal(12.into()))])
        .unwrap();
    tx.commit().unwrap();
    let from_b = b.export_row("account", id).unwrap().unwrap();
    let doc = automerge::Automerge::load(&from_b.doc).unwrap();
    assert_eq!(doc.get_changes(&[]).len(), 2, "both changes travel");

    let c = temp_store(3);
    let rows = [
        from_b.clone(),
        a.export_row("account", other).unwrap().unwrap(),
    ];
    c.import_rows(&rows, Durability::Group).unwrap();
    c.import_rows(&rows, Durability::Group).unwrap();
    assert_eq!(c.get("account", id).unwrap(), b.get("account", id).unwrap());
    assert_eq!(
        c.get("account", other).unwrap(),
        a.get("account", other).unwrap()
    );
    assert!(c.check().unwrap().is_ok());

    // A chunk with a bad checksum, or one cut short, refuses the whole call.
    let mut bad = from_b.clone();
    bad.doc[5] ^= 0xff;
    let d = temp_store(4);
    let r = d.import_rows(&[rows[1].clone(), bad], Durability::Group);
    assert!(matches!(r, Err(StoreError::InvalidExport { .. })), "{r:?}");
    assert!(
        d.get("account", other).unwrap().is_none(),
        "nothing written"
    );
    let mut cut = from_b;
    cut.doc.truncate(cut.doc.len() - 3);
    let r = d.import_row(&cut, Durability::Group);
    assert!(matches!(r, Err(StoreError::InvalidExport { .. })), "{r:?}");
}

#[test]
fn an_imported_row_is_stored_as_its_compacted_document() {
    // A row the store does not hold arrives whole: it becomes the row's compacted document,
    // with no log entry to compact later; what is built from it equals what applying its
    // changes builds, it merges later changes and survives a rebuild and a compaction.
    let a = temp_store(1);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("v1"))]).unwrap();
    tx.commit().unwrap();
    let mut tx = a.begin();
    tx.update("account", id, &[("revenue", Value::Decimal(5.into()))])
        .unwrap();
    tx.commit().unwrap();
    let export = a.export_row("account", id).unwrap().unwrap();

    let fresh = temp_store(2);
    fresh.import_row(&export, Durability::Group).unwrap();
    assert_eq!(fresh.last_seq(), 0, "no log entry for a row imported whole");
    assert_eq!(fresh.status().unwrap().log_entries, 0);
    let applied = temp_store(3);
    applied
        .apply_remote(
            &a.ops_since(0, 100)
                .unwrap()
                .into_iter()
                .map(|e| RemoteOp {
                    table: e.table,
                    row: e.row,
                    change: e.change,
                })
                .collect::<Vec<_>>(),
            Durability::Group,
        )
        .unwrap();
    assert_eq!(
        fresh.get("account", id).unwrap(),
        applied.get("account", id).unwrap()
    );
    assert!(fresh.check().unwrap().is_ok());
    fresh.import_row(&export, Durability::Group).unwrap();
    assert_eq!(fresh.last_seq(), 0, "importing it again changes nothing");

    // A later change from elsewhere merges into it through the log.
    let mut tx = a.begin();
    tx.update("account", id, &[("name", text("v2"))]).unwrap();
    tx.commit().unwrap();
    let later = a.export_row("account", id).unwrap().unwrap();
    fresh.import_row(&later, Durability::Group).unwrap();
    assert_eq!(fresh.last_seq(), 1, "only the new change is logged");
    assert_eq!(
        fresh.get("account", id).unwrap(),
        a.get("account", id).unwrap()
    );
    // Its export carries every change, and another store takes it.
    let again = temp_store(4);
    again
        .import_row(
            &fresh.export_row("account", id).unwrap().unwrap(),
            Durability::Group,
        )
        .unwrap();
    assert_eq!(
        again.get("account", id).unwrap(),
        a.get("account", id).unwrap()
    );

    fresh.rebuild().unwrap();
    assert_eq!(
        fresh.get("account", id).unwrap(),
        a.get("account", id).unwrap()
    );
    fresh.acknowledge(fresh.last_seq()).unwrap();
    let report = fresh.compact().unwrap();
    assert_eq!(report.entries_removed, 1);
    assert_eq!(
        fresh.get("account", id).unwrap(),
        a.get("account", id).unwrap()
    );
    assert!(fresh.check().unwrap().is_ok());
}

#[test]
fn a_temporary_store_reopens_with_every_commit() {
    let s = temp_store(1);
    let mut tx = s.begin();
    let id = tx.insert("account", &[("name", text("kept"))]).unwrap();
    tx.commit_with(Durability::Group).unwrap();
    let again = s.reopen_temporary().unwrap();
    drop(s);
    assert_eq!(
        again.get("account", id).unwrap().unwrap().get("name"),
        &text("kept")
    );
    assert_eq!(again.last_seq(), 1);
    // New ids after the restart never repeat the old ones (a new id epoch).
    let mut tx = again.begin();
    let other = tx.insert("account", &[("name", text("new"))]).unwrap();
    tx.commit().unwrap();
    assert_ne!(id, other);
    assert_eq!(again.last_seq(), 2);
    assert!(again.check().unwrap().is_ok());
}

#[test]
fn row_ids_lists_live_rows_without_reading_them() {
    let s = temp_store(1);
    let mut tx = s.begin();
    let a = tx.insert("account", &[("name", text("A"))]).unwrap();
    let b = tx.insert("account", &[("name", text("B"))]).unwrap();
    tx.commit().unwrap();
    let ids = |s: &Store| -> Vec<fieldsync_store::RowId> {
        s.row_ids("account").unwrap().map(|r| r.unwrap()).collect()
    };
    let mut both = vec![a, b];
    both.sort();
    assert_eq!(ids(&s), both);
    let mut tx = s.begin();
    tx.delete("account", a).unwrap();
    tx.commit().unwrap();
    assert_eq!(ids(&s), vec![b], "a deleted row is not listed");
    assert!(s.row_ids("nosuchtable").is_err());
}
