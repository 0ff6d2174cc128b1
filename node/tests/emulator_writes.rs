//! The emulator's write side against the shapes in Microsoft's Web API documentation
//! (MicrosoftDocs/powerapps-docs, `powerapps-docs/developer/data-platform/...`; each test names
//! its file). Real HTTP on 127.0.0.1, the emulator running as a child process.

// Test helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod emulator_support;

use emulator_support::*;
use reqwest::Method;
use serde_json::json;

// webapi/create-entity-web-api.md: `POST` → `204 No Content` + `OData-EntityId`;
// with `Prefer: return=representation` → `201 Created` and the row.
#[tokio::test]
async fn create_answers_204_or_201_with_representation() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let r = emu
        .json(
            Method::POST,
            "accounts",
            ADMIN,
            &[],
            json!({"name": "Sample Account", "revenue": 5000000, "numberofemployees": 12}),
        )
        .await;
    assert_eq!(r.status, 204);
    let url = r.header("OData-EntityId").unwrap();
    assert!(url.starts_with(&format!("{}accounts(", emu.base)), "{url}");
    assert!(r.body.is_empty());

    let r = emu
        .json(
            Method::POST,
            "accounts?$select=name,revenue,createdon",
            ADMIN,
            &[("Prefer", "return=representation")],
            json!({"name": "Sample Account", "revenue": 5000000, "creditonhold": null}),
        )
        .await;
    // `creditonhold` is not a column of the example schema: refused with an error body.
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("creditonhold"));

    let r = emu
        .json(
            Method::POST,
            "accounts?$select=name,revenue,createdon",
            ADMIN,
            &[("Prefer", "return=representation")],
            json!({"name": "Sample Account", "revenue": 5000000}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("Preference-Applied").as_deref(),
        Some("return=representation")
    );
    let body = r.json();
    assert_eq!(
        body["@odata.context"],
        format!(
            "{}$metadata#accounts(name,revenue,createdon)/$entity",
            emu.base
        )
    );
    assert_eq!(body["name"], "Sample Account");
    assert_eq!(body["revenue"], 5000000);
    assert!(body["@odata.etag"].as_str().unwrap().starts_with("W/\""));
    assert!(body["createdon"].as_str().unwrap().ends_with('Z'));

    // Lookups: `<navprop>@odata.bind`; owners: `ownerid@odata.bind: "/teams(<id>)"`;
    // read back as `_<navprop>_value`.
    let account = body["accountid"].as_str().unwrap().to_string();
    let teams = emu.get("teams?$select=name", ADMIN, &[]).await.json();
    let team = teams["value"][0]["teamid"].as_str().unwrap().to_string();
    let contact = emu
        .create(
            "contacts",
            ADMIN,
            json!({
                "firstname": "Ida",
                "parentcustomerid_account@odata.bind": format!("/accounts({account})"),
                "ownerid@odata.bind": format!("/teams({team})")
            }),
        )
        .await;
    let c = emu
        .get(&format!("contacts({contact})"), ADMIN, &[])
        .await
        .json();
    assert_eq!(c["_parentcustomerid_value"], account);
    assert_eq!(c["_ownerid_value"], team);
    assert_eq!(c["_owningteam_value"], team);
    assert!(c["_owninguser_value"].is_null());
    assert!(c["_owningbusinessunit_value"].is_string());
    // Binding to a missing row is refused.
    let r = emu
        .json(
            Method::POST,
            "contacts",
            ADMIN,
            &[],
            json!({"parentcustomerid_account@odata.bind": format!("/accounts({})", uuid_nil())}),
        )
        .await;
    assert_eq!(r.status, 404);
    // Only declared navigation properties bind, by their exact (case-sensitive) name: a
    // Customer lookup's column name is none, nor is a typed name on a plain lookup.
    for nav in [
        "parentcustomerid",
        "ParentCustomerId_Account",
        "parentcustomerid_contact",
        "nosuchlookup",
    ] {
        let r = emu
            .json(
                Method::PATCH,
                &format!("contacts({contact})"),
                ADMIN,
                &[],
                json!({format!("{nav}@odata.bind"): format!("/accounts({account})")}),
            )
            .await;
        assert_eq!(r.status, 400, "{nav}");
        assert!(
            r.text().contains("undeclared property"),
            "{nav}: {}",
            r.text()
        );
    }
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({account})"),
            ADMIN,
            &[],
            json!({"primarycontactid_contact@odata.bind": format!("/contacts({contact})")}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Cleared through the navigation property too (associate-disassociate-entities-using-web-api.md).
    let r = emu
        .json(
            Method::PATCH,
            &format!("contacts({contact})"),
            ADMIN,
            &[],
            json!({"parentcustomerid_account@odata.bind": null}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let c = emu
        .get(&format!("contacts({contact})"), ADMIN, &[])
        .await
        .json();
    assert!(c["_parentcustomerid_value"].is_null(), "{c}");
}

fn uuid_nil() -> &'static str {
    "00000000-0000-0000-0000-000000000001"
}

// perform-conditional-operations-using-web-api.md, "Apply optimistic concurrency":
// `If-Match: W/"470867"` that is not current → `412` with
// "The version of the existing record doesn't match the RowVersion property provided."
#[tokio::test]
async fn stale_etags_get_412_on_update_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let id = emu
        .create("accounts", ADMIN, json!({"name": "Sample"}))
        .await;
    let row = emu
        .get(&format!("accounts({id})?$select=name"), ADMIN, &[])
        .await
        .json();
    let etag = row["@odata.etag"].as_str().unwrap().to_string();
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})"),
            ADMIN,
            &[("If-Match", &etag)],
            json!({"name": "Updated Account Name"}),
        )
        .await;
    assert_eq!(r.status, 204);
    // The old etag is stale now.
    for (method, body) in [
        (Method::PATCH, Some(json!({"name": "Lost"}))),
        (Method::DELETE, None),
    ] {
        let r = match body {
            Some(b) => {
                emu.json(
                    method,
                    &format!("accounts({id})"),
                    ADMIN,
                    &[("If-Match", &etag)],
                    b,
                )
                .await
            }
            None => {
                emu.send(
                    method,
                    &format!("accounts({id})"),
                    ADMIN,
                    &[("If-Match", &etag)],
                    None,
                )
                .await
            }
        };
        assert_eq!(r.status, 412);
        assert_eq!(
            r.json(),
            json!({"error": {"code": "0x80060882", "message": "The version of the existing record doesn't match the RowVersion property provided."}})
        );
    }
    let now = emu.get(&format!("accounts({id})"), ADMIN, &[]).await.json();
    assert_eq!(now["name"], "Updated Account Name");
    let fresh = now["@odata.etag"].as_str().unwrap().to_string();
    assert_ne!(fresh, etag);
    // Conditional retrieval: `If-None-Match` with the current etag → 304.
    let r = emu
        .get(
            &format!("accounts({id})"),
            ADMIN,
            &[("If-None-Match", &fresh)],
        )
        .await;
    assert_eq!(r.status, 304);
    let r = emu
        .send(
            Method::DELETE,
            &format!("accounts({id})"),
            ADMIN,
            &[("If-Match", &fresh)],
            None,
        )
        .await;
    assert_eq!(r.status, 204);
}

// perform-conditional-operations-using-web-api.md, "Limit upsert operations":
// `If-Match: *` on a missing row → 404 "account With Id = ... Does Not Exist";
// `If-None-Match: *` on an existing row → 412 "A record with matching key values already exists."
#[tokio::test]
async fn upsert_limits_and_not_found_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let id = "00000000-0000-0000-0000-000000000001";
    let body = json!({"name": "Updated Sample Account ", "address1_latitude": 47.639583, "revenue": 6000000});
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})"),
            ADMIN,
            &[("If-Match", "*")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 404);
    let e = r.json();
    assert_eq!(
        e["error"]["message"],
        format!("account With Id = {id} Does Not Exist")
    );
    assert!(e["error"]["code"].is_string());
    let r = emu.get(&format!("accounts({id})"), ADMIN, &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json()["error"]["message"],
        format!("account With Id = {id} Does Not Exist")
    );
    let r = emu
        .send(Method::DELETE, &format!("accounts({id})"), ADMIN, &[], None)
        .await;
    assert_eq!(r.status, 404);

    // If-None-Match: * on a missing row creates it (204).
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})"),
            ADMIN,
            &[("If-None-Match", "*")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("OData-EntityId").unwrap(),
        format!("{}accounts({id})", emu.base)
    );
    // ... and refuses to update it.
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})"),
            ADMIN,
            &[("If-None-Match", "*")],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 412);
    assert_eq!(
        r.json()["error"]["message"],
        "A record with matching key values already exists."
    );
    // Plain PATCH upserts; `Prefer: return=representation` → 200 with the row.
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})?$select=name"),
            ADMIN,
            &[("Prefer", "return=representation")],
            json!({"name": "Third"}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "Third");
    // Direct writes of `_x_value` are refused, as Dataverse does.
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({id})"),
            ADMIN,
            &[],
            json!({"_primarycontactid_value": id}),
        )
        .await;
    assert_eq!(r.status, 400);
}

fn batch_body(boundary: &str, parts: &[String]) -> String {
    let mut s = String::new();
    for p in parts {
        s.push_str(&format!("--{boundary}\r\n{p}"));
    }
    s.push_str(&format!("--{boundary}--\r\n"));
    s
}

fn http_part(content_id: Option<u32>, request_line: &str, body: &str) -> String {
    let cid = content_id
        .map(|n| format!("Content-ID: {n}\r\n"))
        .unwrap_or_default();
    format!(
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n{cid}\r\n{request_line} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n{body}\r\n"
    )
}

fn change_set(boundary: &str, parts: &[String]) -> String {
    format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n{}\r\n",
        batch_body(boundary, parts)
    )
}

async fn count(emu: &Emulator, set: &str, filter: &str) -> usize {
    let r = emu
        .get(
            &format!("{set}?$filter={}", filter.replace(' ', "%20")),
            ADMIN,
            &[],
        )
        .await;
    r.json()["value"].as_array().unwrap().len()
}

// webapi/execute-batch-operations-using-web-api.md: change sets are atomic ("if any one of the
// operations fails, any completed operations will be rolled back"); `Content-ID` and `$1`;
// responses separated by `--batchresponse_<guid>` / `changesetresponse_<guid>` parts with
// `HTTP/1.1 204 No Content`; without `odata.continue-on-error` the batch stops at the first
// error and answers `400`; with it, `200` and every part's own status.
#[tokio::test]
async fn batches_with_change_sets_roll_back_and_continue_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let send = |body: String, prefer: Option<&'static str>| {
        let emu = &emu;
        async move {
            let mut h = vec![("Content-Type", "multipart/mixed; boundary=\"batch_AAA123\"")];
            if let Some(p) = prefer {
                h.push(("Prefer", p));
            }
            emu.send(Method::POST, "$batch", ADMIN, &h, Some(body.into_bytes()))
                .await
        }
    };
    // A good change set: account, then a contact bound to it with `$1` and `PATCH $1`.
    let good = batch_body(
        "batch_AAA123",
        &[change_set(
            "changeset_dd81ccab",
            &[
                http_part(
                    Some(1),
                    "POST [Organization URI]/api/data/v9.2/accounts",
                    "{\"name\":\"IcM Account\"}",
                ),
                http_part(
                    Some(2),
                    "POST /api/data/v9.2/contacts",
                    "{\"firstname\":\"first name\",\"parentcustomerid_account@odata.bind\":\"$1\"}",
                ),
                http_part(
                    Some(3),
                    "PATCH $1",
                    "{\"primarycontactid@odata.bind\":\"$2\"}",
                ),
            ],
        )],
    );
    let r = send(good, None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.header("Content-Type").unwrap();
    assert!(
        ct.starts_with("multipart/mixed; boundary=batchresponse_"),
        "{ct}"
    );
    let text = r.text();
    assert!(text.starts_with("--batchresponse_"), "{text}");
    assert!(
        text.contains("Content-Type: multipart/mixed; boundary=changesetresponse_"),
        "{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 204 No Content").count(), 3, "{text}");
    assert!(text.contains("Content-ID: 1\r\n"));
    assert!(text.contains(&format!("OData-EntityId: {}accounts(", emu.base)));
    assert!(text.trim_end().ends_with("--"));
    assert_eq!(count(&emu, "accounts", "name eq 'IcM Account'").await, 1);
    let acc = emu
        .get("accounts?$filter=name%20eq%20'IcM%20Account'", ADMIN, &[])
        .await
        .json();
    let contact = emu
        .get(
            "contacts?$filter=firstname%20eq%20'first%20name'",
            ADMIN,
            &[],
        )
        .await
        .json();
    assert_eq!(
        contact["value"][0]["_parentcustomerid_value"],
        acc["value"][0]["accountid"]
    );
    assert_eq!(
        acc["value"][0]["_primarycontactid_value"],
        contact["value"][0]["contactid"]
    );

    // A failing change set: the account it created is rolled back; processing stops there.
    let failing = || {
        batch_body(
            "batch_AAA123",
            &[
                change_set(
                    "changeset_BBB456",
                    &[
                        http_part(
                            Some(1),
                            "POST /api/data/v9.2/accounts",
                            "{\"name\":\"Rolled back\"}",
                        ),
                        http_part(
                            Some(2),
                            "POST /api/data/v9.2/accounts",
                            "{\"name\":\"Bad\",\"numberofemployees\":\"many\"}",
                        ),
                    ],
                ),
                http_part(
                    None,
                    "POST /api/data/v9.2/accounts",
                    "{\"name\":\"After the change set\"}",
                ),
            ],
        )
    };
    let r = send(failing(), None).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let text = r.text();
    assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
    assert!(text.contains("{\"error\":{\"code\":\"0x"), "{text}");
    assert!(
        !text.contains("HTTP/1.1 204"),
        "nothing after the failure runs: {text}"
    );
    assert_eq!(count(&emu, "accounts", "name eq 'Rolled back'").await, 0);
    assert_eq!(
        count(&emu, "accounts", "name eq 'After the change set'").await,
        0
    );

    // With `Prefer: odata.continue-on-error`: 200, the failure as a part, the rest runs.
    let r = send(failing(), Some("odata.continue-on-error")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 204 No Content").count(), 1, "{text}");
    assert_eq!(count(&emu, "accounts", "name eq 'Rolled back'").await, 0);
    assert_eq!(
        count(&emu, "accounts", "name eq 'After the change set'").await,
        1
    );

    // A `$n` that was never declared: 400 (documented note in the same file).
    let r = send(
        batch_body(
            "batch_AAA123",
            &[change_set(
                "changeset_C",
                &[http_part(
                    Some(2),
                    "POST /api/data/v9.2/contacts",
                    "{\"parentcustomerid_account@odata.bind\":\"$1\"}",
                )],
            )],
        ),
        None,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r
        .text()
        .contains("Content-ID Reference: '$1' does not exist in the batch context."));

    // More than 1000 requests: refused as a whole.
    let many: Vec<String> = (0..1001)
        .map(|i| {
            http_part(
                None,
                "POST /api/data/v9.2/accounts",
                &format!("{{\"name\":\"n{i}\"}}"),
            )
        })
        .collect();
    let r = send(batch_body("batch_AAA123", &many), None).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1000"));
}

// api-limits.md: past the limit, `429 Too Many Requests` with `Retry-After` and code
// 0x80072322 "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
// (here configured to 5 per 3 seconds); the limit is per user.
#[tokio::test]
async fn too_many_requests_get_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(
        dir.path(),
        &[
            "--rate-limit-requests",
            "5",
            "--rate-limit-window-secs",
            "3",
        ],
    );
    for _ in 0..5 {
        assert_eq!(emu.get("accounts?$top=1", BEN, &[]).await.status, 200);
    }
    let r = emu.get("accounts?$top=1", BEN, &[]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "{retry}");
    assert_eq!(
        r.json(),
        json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 5 over time window of 3 seconds."}})
    );
    // Another user is not throttled.
    assert_eq!(emu.get("accounts?$top=1", ANA, &[]).await.status, 200);
    // After Retry-After the user may call again.
    tokio::time::sleep(
        std::time::Duration::from_secs(retry) + std::time::Duration::from_millis(200),
    )
    .await;
    assert_eq!(emu.get("accounts?$top=1", BEN, &[]).await.status, 200);
}

/// `--test-faults`: the switch answers only `POST`; a lost reply is spent only on a request that
/// applied a write (a `$batch` that read, or whose change set rolled back, answers whole); a
/// failed download answers `503` once, then the file is served as usual.
#[tokio::test]
async fn test_faults_lose_only_replies_of_applied_writes() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &["--test-faults"]);
    let root = emu.base.trim_end_matches("api/data/v9.2/").to_string();
    let switch = format!("{root}_test/faults?drop_write_replies=1&fail_file_downloads=1");
    let got = emu.client.get(&switch).send().await.unwrap();
    assert_eq!(got.status(), 405);
    let set = emu.client.post(&switch).send().await.unwrap();
    assert_eq!(set.status(), 204);

    let batch = |body: String| {
        let emu = &emu;
        async move {
            let h = [
                ("Content-Type", "multipart/mixed; boundary=\"batch_F\""),
                ("Prefer", "odata.continue-on-error"),
            ];
            emu.send(Method::POST, "$batch", ADMIN, &h, Some(body.into_bytes()))
                .await
        }
    };
    let reads = batch_body(
        "batch_F",
        &[http_part(None, "GET /api/data/v9.2/accounts?$top=1", "")],
    );
    let r = batch(reads).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("HTTP/1.1 200"), "{}", r.text());
    let rolled_back = batch_body(
        "batch_F",
        &[change_set(
            "changeset_F",
            &[
                http_part(
                    Some(1),
                    "POST /api/data/v9.2/accounts",
                    "{\"name\":\"Kept\"}",
                ),
                http_part(Some(2), "POST /api/data/v9.2/accounts", "{\"nosuch\":1}"),
            ],
        )],
    );
    let r = batch(rolled_back).await;
    assert_eq!(r.status, 200, "continue-on-error answers 200");
    assert!(r.text().contains("HTTP/1.1 400"), "{}", r.text());
    assert_eq!(count(&emu, "accounts", "name eq 'Kept'").await, 0);

    // The first write that applies something loses its reply (and is applied).
    let lost = emu
        .client
        .post(emu.url("accounts"))
        .header("Authorization", format!("Bearer {ADMIN}"))
        .header("Content-Type", "application/json")
        .body("{\"name\":\"Applied\"}")
        .send()
        .await;
    let whole = match lost {
        Ok(resp) => resp.bytes().await.is_ok(),
        Err(_) => false,
    };
    assert!(!whole, "the write's reply came whole");
    assert_eq!(count(&emu, "accounts", "name eq 'Applied'").await, 1);

    let id = uuid::Uuid::new_v4();
    let file = format!("accounts({id})/contract/$value");
    assert_eq!(emu.get(&file, ADMIN, &[]).await.status, 503);
    assert_eq!(emu.get(&file, ADMIN, &[]).await.status, 404, "once only");
}
