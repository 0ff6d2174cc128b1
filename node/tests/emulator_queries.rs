//! The emulator's read side against the shapes in Microsoft's Web API documentation
//! (MicrosoftDocs/powerapps-docs, `powerapps-docs/developer/data-platform/...`; each test names
//! its file). Real HTTP on 127.0.0.1, the emulator running as a child process.

// Test helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod emulator_support;

use std::collections::BTreeSet;

use emulator_support::*;
use reqwest::Method;
use serde_json::{json, Value};

fn names(page: &Value) -> BTreeSet<String> {
    page["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect()
}

// webapi/query-data-web-api.md ("Page results"): `Prefer: odata.maxpagesize=N`, pages linked by
// `@odata.nextLink` with an opaque `$skiptoken`, `Preference-Applied` echoed; every entity has
// `@odata.etag` (`W/"<n>"`, perform-conditional-operations-using-web-api.md) and its id.
#[tokio::test]
async fn pages_follow_next_links_with_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    for i in 0..8 {
        emu.create("accounts", ADMIN, json!({"name": format!("Paged {i}")}))
            .await;
    }
    let first = emu
        .get(
            "accounts?$select=name,accountnumber",
            ADMIN,
            &[("Prefer", "odata.maxpagesize=4")],
        )
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("OData-Version").as_deref(), Some("4.0"));
    assert_eq!(
        first.header("Preference-Applied").as_deref(),
        Some("odata.maxpagesize=4")
    );
    let page = first.json();
    assert_eq!(
        page["@odata.context"],
        format!("{}$metadata#accounts(name,accountnumber)", emu.base)
    );
    assert_eq!(page["value"].as_array().unwrap().len(), 4);
    let next = page["@odata.nextLink"].as_str().unwrap();
    assert!(
        next.starts_with(&format!("{}accounts?", emu.base)),
        "{next}"
    );
    assert!(next.contains("$skiptoken="), "{next}");
    let row = &page["value"][0];
    let etag = row["@odata.etag"].as_str().unwrap();
    assert!(etag.starts_with("W/\"") && etag.ends_with('"'), "{etag}");
    assert!(row["accountid"].as_str().unwrap().len() == 36);
    assert!(row.get("revenue").is_none(), "$select limits the columns");

    let pages = all_pages(&emu, "accounts?$select=name", ADMIN, "odata.maxpagesize=4").await;
    assert_eq!(pages.len(), 3, "11 rows (3 seeded + 8) in pages of 4");
    let mut ids = BTreeSet::new();
    for p in &pages {
        for r in p["value"].as_array().unwrap() {
            assert!(
                ids.insert(r["accountid"].as_str().unwrap().to_string()),
                "a row twice"
            );
        }
    }
    assert_eq!(ids.len(), 11);
    assert!(pages[2].get("@odata.nextLink").is_none());

    // GET by id: `$metadata#accounts(name)/$entity` (retrieve-entity-using-web-api.md).
    let id = ids.iter().next().unwrap();
    let one = emu
        .get(&format!("accounts({id})?$select=name"), ADMIN, &[])
        .await;
    assert_eq!(one.status, 200);
    assert_eq!(
        one.json()["@odata.context"],
        format!("{}$metadata#accounts(name)/$entity", emu.base)
    );
}

// webapi/query-data-web-api.md: filter operators, functions, `$orderby`, `$top`; query
// functions `Microsoft.Dynamics.CRM.EqualUserId(PropertyName='ownerid')` etc.
#[tokio::test]
async fn filters_order_top_and_query_functions() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let q = |f: &str| format!("accounts?$select=name&$filter={}", f.replace(' ', "%20"));
    let r = emu
        .get(
            &q("contains(name,'COFFEE') or startswith(name,'north')"),
            ADMIN,
            &[],
        )
        .await;
    assert_eq!(
        names(&r.json()),
        BTreeSet::from(["Acme Coffee".into(), "Northwind Traders".into()])
    );
    let r = emu
        .get(
            &q("not (industrycode eq 1) and (address1_city ne 'Oslo' and endswith(name,'ery'))"),
            ADMIN,
            &[],
        )
        .await;
    assert_eq!(names(&r.json()), BTreeSet::from(["Fabrikam Bakery".into()]));
    let r = emu
        .get(&q("industrycode ge 2 and industrycode lt 3"), ADMIN, &[])
        .await;
    assert_eq!(names(&r.json()), BTreeSet::from(["Fabrikam Bakery".into()]));
    let r = emu
        .get(
            "accounts?$select=name&$orderby=name%20desc&$top=2",
            ADMIN,
            &[],
        )
        .await;
    let got: Vec<String> = r.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(r.json()["value"].as_array().unwrap().len(), 2);
    assert_eq!(got, vec!["Northwind Traders", "Fabrikam Bakery"]);
    // EqualUserId: rows owned by the caller; EqualUserTeams: by the caller's teams;
    // EqualBusinessId on owningbusinessunit: the caller's unit.
    let r = emu
        .get(
            &q("Microsoft.Dynamics.CRM.EqualUserId(PropertyName='ownerid')"),
            MARIA,
            &[],
        )
        .await;
    assert_eq!(
        names(&r.json()),
        BTreeSet::from(["Northwind Traders".into()])
    );
    let r = emu
        .get(
            &q("Microsoft.Dynamics.CRM.EqualUserTeams(PropertyName='ownerid')"),
            ANA,
            &[],
        )
        .await;
    assert_eq!(names(&r.json()), BTreeSet::from(["Acme Coffee".into()]));
    let r = emu
        .get(
            &q("Microsoft.Dynamics.CRM.EqualBusinessId(PropertyName='owningbusinessunit')"),
            MARIA,
            &[],
        )
        .await;
    assert_eq!(
        names(&r.json()),
        BTreeSet::from(["Acme Coffee".into(), "Northwind Traders".into()])
    );
    // Lookups read as `_<col>_value` and filter by GUID.
    let acme = r.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "Acme Coffee")
        .unwrap()["accountid"]
        .as_str()
        .unwrap()
        .to_string();
    let r = emu
        .get(
            &format!("contacts?$select=firstname,_parentcustomerid_value&$filter=_parentcustomerid_value%20eq%20{acme}"),
            ADMIN,
            &[],
        )
        .await;
    let v = r.json();
    assert_eq!(v["value"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["value"][0]["_parentcustomerid_value"], acme);
    // An unknown property and a syntax error are 400s with an error body.
    let r = emu.get(&q("nosuch eq 1"), ADMIN, &[]).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nosuch"));
    let r = emu.get(&q("name eq"), ADMIN, &[]).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["code"]
        .as_str()
        .unwrap()
        .starts_with("0x"));
}

// security-concepts.md: rows the caller may not read are omitted from results.
#[tokio::test]
async fn callers_see_only_rows_their_roles_reach() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let see = |token: &'static str| {
        let emu = &emu;
        async move { names(&emu.get("accounts?$select=name", token, &[]).await.json()) }
    };
    // ana: Field Technician (user depth), member of "North technicians" (owns Acme).
    assert_eq!(see(ANA).await, BTreeSet::from(["Acme Coffee".into()]));
    // ben: his own row only.
    assert_eq!(see(BEN).await, BTreeSet::from(["Fabrikam Bakery".into()]));
    // maria: Field Manager (business-unit depth) in Contoso North.
    assert_eq!(
        see(MARIA).await,
        BTreeSet::from(["Acme Coffee".into(), "Northwind Traders".into()])
    );
    assert_eq!(see(ADMIN).await.len(), 3);
    // Organization-owned tables are readable by everyone with a role.
    let p = emu.get("products?$select=name", BEN, &[]).await;
    assert_eq!(names(&p.json()), BTreeSet::from(["Grinder G2".into()]));
    // A row the caller cannot read: 403 with an error body, not the row.
    let fabrikam = emu
        .get(
            "accounts?$select=name&$filter=name%20eq%20'Fabrikam%20Bakery'",
            ADMIN,
            &[],
        )
        .await
        .json()["value"][0]["accountid"]
        .as_str()
        .unwrap()
        .to_string();
    let r = emu.get(&format!("accounts({fabrikam})"), ANA, &[]).await;
    assert_eq!(r.status, 403);
    assert!(r.json()["error"]["code"].is_string());
    // No token: 401.
    let r = emu.get("accounts", "wrong-token", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]["message"].is_string());
}

// use-change-tracking-synchronize-data-external-systems.md: first read with
// `Prefer: odata.track-changes` ends with `@odata.deltaLink` (`$deltatoken`); the delta read has
// a `/$delta` context, changed rows as entities and deleted ones as
// `{"@odata.context": ".../$metadata#accounts/$deletedEntity", "id": ..., "reason": "deleted"}`.
#[tokio::test]
async fn delta_reads_report_changes_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let doomed = emu
        .create("accounts", ADMIN, json!({"name": "Doomed"}))
        .await;
    let changed = emu
        .create("accounts", ADMIN, json!({"name": "Before"}))
        .await;
    let first = emu
        .get(
            "accounts?$select=name,accountnumber,telephone1",
            ADMIN,
            &[("Prefer", "odata.track-changes, odata.maxpagesize=2")],
        )
        .await;
    assert_eq!(first.status, 200);
    let applied = first.header("Preference-Applied").unwrap();
    assert!(applied.contains("odata.track-changes"), "{applied}");
    // Follow pages to the delta link.
    let mut page = first.json();
    let mut seen = page["value"].as_array().unwrap().len();
    while let Some(next) = page["@odata.nextLink"].as_str().map(str::to_string) {
        assert!(page.get("@odata.deltaLink").is_none());
        page = emu
            .get(
                &next,
                ADMIN,
                &[("Prefer", "odata.track-changes, odata.maxpagesize=2")],
            )
            .await
            .json();
        seen += page["value"].as_array().unwrap().len();
    }
    assert_eq!(seen, 5);
    let delta_link = page["@odata.deltaLink"].as_str().unwrap().to_string();
    assert!(
        delta_link.starts_with(&format!(
            "{}accounts?$select=name,accountnumber,telephone1&$deltatoken=",
            emu.base
        )),
        "{delta_link}"
    );

    // Nothing changed yet: an empty value and a new delta link.
    let quiet = emu.get(&delta_link, ADMIN, &[]).await.json();
    assert_eq!(quiet["value"].as_array().unwrap().len(), 0, "{quiet}");

    let created = emu
        .create("accounts", ADMIN, json!({"name": "New one"}))
        .await;
    let r = emu
        .json(
            Method::PATCH,
            &format!("accounts({changed})"),
            ADMIN,
            &[("If-Match", "*")],
            json!({"name": "After"}),
        )
        .await;
    assert_eq!(r.status, 204);
    let r = emu
        .send(
            Method::DELETE,
            &format!("accounts({doomed})"),
            ADMIN,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 204);

    let d = emu.get(&delta_link, ADMIN, &[]).await;
    assert_eq!(d.status, 200);
    let d = d.json();
    assert_eq!(
        d["@odata.context"],
        format!(
            "{}$metadata#accounts(name,accountnumber,telephone1)/$delta",
            emu.base
        )
    );
    let value = d["value"].as_array().unwrap();
    assert_eq!(value.len(), 3, "{d}");
    let by_id = |id: &str| {
        value
            .iter()
            .find(|v| v["accountid"] == id || v["id"] == id)
            .cloned()
    };
    assert_eq!(by_id(&created).unwrap()["name"], "New one");
    let after = by_id(&changed).unwrap();
    assert_eq!(after["name"], "After");
    assert!(after["@odata.etag"].as_str().unwrap().starts_with("W/\""));
    assert_eq!(
        by_id(&doomed).unwrap(),
        json!({
            "@odata.context": format!("{}$metadata#accounts/$deletedEntity", emu.base),
            "id": doomed,
            "reason": "deleted"
        })
    );
    let next_delta = d["@odata.deltaLink"].as_str().unwrap();
    assert_ne!(next_delta, delta_link);
    let again = emu.get(next_delta, ADMIN, &[]).await.json();
    assert_eq!(again["value"].as_array().unwrap().len(), 0);

    // Callers only see the changes to rows they may read.
    let ana_first = emu
        .get(
            "accounts?$select=name",
            ANA,
            &[("Prefer", "odata.track-changes")],
        )
        .await
        .json();
    let ana_delta = ana_first["@odata.deltaLink"].as_str().unwrap().to_string();
    emu.create("accounts", ADMIN, json!({"name": "Admin only"}))
        .await;
    let ana_changes = emu.get(&ana_delta, ANA, &[]).await.json();
    assert_eq!(
        ana_changes["value"].as_array().unwrap().len(),
        0,
        "{ana_changes}"
    );
}

// use-change-tracking-synchronize-data-external-systems.md, "Query options not supported":
// `The "$filter" query parameter isn't supported when Change Tracking is enabled.`
#[tokio::test]
async fn tracking_rejects_filter_orderby_top() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    for (opt, query) in [
        ("filter", "$filter=name%20eq%20'x'"),
        ("orderby", "$orderby=name"),
        ("top", "$top=1"),
    ] {
        let r = emu
            .get(
                &format!("accounts?$select=name&{query}"),
                ADMIN,
                &[("Prefer", "odata.track-changes")],
            )
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(
            r.json()["error"]["message"],
            format!(
                "The \"${opt}\" query parameter isn't supported when Change Tracking is enabled."
            )
        );
    }
}

// use-change-tracking-synchronize-data-external-systems.md: tokens older than
// ExpireChangeTrackingInDays fail; 0x80044352 "Version stamp associated with the client has
// expired. Please perform a full sync." (the HTTP status is not documented; key on the code).
#[tokio::test]
async fn expired_delta_tokens_ask_for_a_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &["--change-tracking-retention-secs", "2"]);
    let first = emu
        .get(
            "accounts?$select=name",
            ADMIN,
            &[("Prefer", "odata.track-changes")],
        )
        .await
        .json();
    let delta_link = first["@odata.deltaLink"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(4000)).await;
    let r = emu.get(&delta_link, ADMIN, &[]).await;
    assert!(r.status.is_client_error(), "{}", r.status);
    let e = r.json();
    assert_eq!(e["error"]["code"], "0x80044352");
    assert_eq!(
        e["error"]["message"],
        "Version stamp associated with the client has expired. Please perform a full sync."
    );
    // A full re-read works and hands out a fresh token.
    let again = emu
        .get(
            "accounts?$select=name",
            ADMIN,
            &[("Prefer", "odata.track-changes")],
        )
        .await;
    assert_eq!(again.status, 200);
    let fresh = again.json()["@odata.deltaLink"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(emu.get(&fresh, ADMIN, &[]).await.status, 200);
}

// use-change-tracking-synchronize-data-external-systems.md:
// `GET EntityDefinitions?$select=SchemaName&$filter=ChangeTrackingEnabled eq true`;
// webapi/query-metadata-web-api.md: `EntityDefinitions(LogicalName='account')`, `Attributes`,
// `ManyToOneRelationships` (SchemaName, ReferencingAttribute, ReferencedEntity).
#[tokio::test]
async fn entity_definitions_have_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let r = emu
        .get("EntityDefinitions?$select=LogicalName,EntitySetName,IsAvailableOffline&$filter=ChangeTrackingEnabled%20eq%20true", ADMIN, &[])
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(
        v["@odata.context"],
        format!(
            "{}$metadata#EntityDefinitions(LogicalName,EntitySetName,IsAvailableOffline)",
            emu.base
        )
    );
    let tables = v["value"].as_array().unwrap();
    let account = tables
        .iter()
        .find(|t| t["LogicalName"] == "account")
        .unwrap();
    assert_eq!(account["EntitySetName"], "accounts");
    assert_eq!(account["IsAvailableOffline"], true);
    assert!(
        account["MetadataId"].as_str().unwrap().len() == 36,
        "MetadataId is always returned"
    );
    let audit = tables
        .iter()
        .find(|t| t["LogicalName"] == "systemaudit")
        .unwrap();
    assert_eq!(audit["IsAvailableOffline"], false);

    let r = emu
        .get("EntityDefinitions(LogicalName='account')?$select=LogicalName,PrimaryIdAttribute,OwnershipType,ChangeTrackingEnabled&$expand=Attributes,ManyToOneRelationships", ADMIN, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    assert!(a["@odata.context"].as_str().unwrap().ends_with("/$entity"));
    assert_eq!(a["PrimaryIdAttribute"], "accountid");
    assert_eq!(a["OwnershipType"], "UserOwned");
    assert_eq!(a["ChangeTrackingEnabled"], true);
    let attrs = a["Attributes"].as_array().unwrap();
    let lookup = attrs
        .iter()
        .find(|x| x["LogicalName"] == "primarycontactid")
        .unwrap();
    assert_eq!(lookup["AttributeType"], "Lookup");
    assert_eq!(lookup["Targets"], json!(["contact"]));
    let rels = a["ManyToOneRelationships"].as_array().unwrap();
    let rel = rels
        .iter()
        .find(|x| x["SchemaName"] == "account_primary_contact")
        .unwrap();
    assert_eq!(rel["ReferencingAttribute"], "primarycontactid");
    assert_eq!(rel["ReferencedEntity"], "contact");
    assert_eq!(rel["ReferencingEntity"], "account");
    assert_eq!(
        rel["ReferencingEntityNavigationPropertyName"],
        "primarycontactid"
    );
    // A Customer lookup's navigation property is typed by its target.
    let c = emu
        .get(
            "EntityDefinitions(LogicalName='contact')?$expand=ManyToOneRelationships",
            ADMIN,
            &[],
        )
        .await
        .json();
    let rel = c["ManyToOneRelationships"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["SchemaName"] == "contact_customer_accounts")
        .unwrap()
        .clone();
    assert_eq!(rel["ReferencingAttribute"], "parentcustomerid");
    assert_eq!(
        rel["ReferencingEntityNavigationPropertyName"],
        "parentcustomerid_account"
    );

    let r = emu
        .get("EntityDefinitions(LogicalName='product')/Attributes?$select=LogicalName,AttributeType&$filter=AttributeType%20eq%20'Virtual'", ADMIN, &[])
        .await;
    let v = r.json();
    assert_eq!(v["value"][0]["LogicalName"], "productimage", "{v}");
    let r = emu
        .get("EntityDefinitions(LogicalName='product')", ADMIN, &[])
        .await;
    assert_eq!(r.json()["OwnershipType"], "OrganizationOwned");

    // The environment's security: business units, users, teams, roles.
    let users = emu
        .get(
            "systemusers?$select=domainname,_businessunitid_value",
            ADMIN,
            &[],
        )
        .await
        .json();
    let ana = users["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["domainname"] == "ana@contoso.com")
        .unwrap()
        .clone();
    let bus = emu
        .get(
            "businessunits?$select=name,_parentbusinessunitid_value",
            ADMIN,
            &[],
        )
        .await
        .json();
    let north = bus["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "Contoso North")
        .unwrap()
        .clone();
    assert_eq!(ana["_businessunitid_value"], north["businessunitid"]);
    let teams = emu
        .get(
            "teams?$filter=name%20eq%20'North%20technicians'",
            ADMIN,
            &[],
        )
        .await
        .json();
    let team_id = teams["value"][0]["teamid"].as_str().unwrap().to_string();
    let members = emu
        .get(
            &format!("teammemberships?$filter=teamid%20eq%20{team_id}"),
            ADMIN,
            &[],
        )
        .await
        .json();
    assert_eq!(members["value"].as_array().unwrap().len(), 2);
    let roles = emu.get("roles?$select=name", ADMIN, &[]).await.json();
    assert!(roles["value"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "System Administrator"));
    let who = emu.get("WhoAmI", ANA, &[]).await.json();
    assert_eq!(who["UserId"], ana["systemuserid"]);
}

// Tokens map to users through a configurable directory (`--directory FILE`): the caller of
// `WhoAmI` (webapi/compose-http-requests-handle-errors.md uses it as the first request) is the
// user the token names; unknown tokens get 401.
#[tokio::test]
async fn a_directory_file_configures_users_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let bu = "11111111-1111-4111-8111-111111111111";
    let role = "22222222-2222-4222-8222-222222222222";
    let user = "33333333-3333-4333-8333-333333333333";
    let file = dir.path().join("directory.json");
    std::fs::write(
        &file,
        json!({
            "business_units": [{"id": bu, "name": "Solo", "parent": null}],
            "users": [{"id": user, "domain_name": "sam@solo.example", "full_name": "Sam",
                       "business_unit": bu, "roles": [role], "token": "sam-token"}],
            "teams": [],
            "roles": [{"id": role, "name": "Everything", "business_unit": bu, "read": "organization"}]
        })
        .to_string(),
    )
    .unwrap();
    let emu = Emulator::start(
        &dir.path().join("data"),
        &["--directory", file.to_str().unwrap()],
    );
    let who = emu.get("WhoAmI", "sam-token", &[]).await;
    assert_eq!(who.status, 200);
    assert_eq!(who.json()["UserId"], user);
    assert_eq!(who.json()["BusinessUnitId"], bu);
    assert_eq!(emu.get("WhoAmI", ANA, &[]).await.status, 401);
    // Organization depth: every seeded account is visible.
    let all = emu
        .get("accounts?$select=name", "sam-token", &[])
        .await
        .json();
    assert_eq!(all["value"].as_array().unwrap().len(), 3);
}

// The hub's contract (issue 5): a tracked full read, paged, plus the following delta, gives
// exactly the table, even when rows are created, changed and deleted between pages; delta reads
// page too (`Prefer: odata.maxpagesize`).
#[tokio::test]
async fn tracked_paging_plus_delta_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(dir.path(), &[]);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            emu.create("accounts", ADMIN, json!({"name": format!("R{i}")}))
                .await,
        );
    }
    let prefer = "odata.track-changes, odata.maxpagesize=2";
    let mut replica: std::collections::BTreeMap<String, String> = Default::default();
    let mut page = emu
        .get("accounts?$select=name", ADMIN, &[("Prefer", prefer)])
        .await
        .json();
    let mut n = 0;
    loop {
        for r in page["value"].as_array().unwrap() {
            replica.insert(
                r["accountid"].as_str().unwrap().into(),
                r["name"].as_str().unwrap().into(),
            );
        }
        if n == 0 {
            // Between pages: delete every row, create some, rename one.
            for id in &ids[..3] {
                emu.send(Method::DELETE, &format!("accounts({id})"), ADMIN, &[], None)
                    .await;
            }
            for i in 0..3 {
                emu.create("accounts", ADMIN, json!({"name": format!("Late {i}")}))
                    .await;
            }
            emu.json(
                Method::PATCH,
                &format!("accounts({})", ids[5]),
                ADMIN,
                &[],
                json!({"name": "Renamed"}),
            )
            .await;
        }
        n += 1;
        match page["@odata.nextLink"].as_str() {
            Some(next) => page = emu.get(next, ADMIN, &[("Prefer", prefer)]).await.json(),
            None => break,
        }
    }
    let mut link = page["@odata.deltaLink"].as_str().unwrap().to_string();
    // Delta, paged by 2.
    let mut pages = 0;
    loop {
        let d = emu
            .get(&link, ADMIN, &[("Prefer", "odata.maxpagesize=2")])
            .await
            .json();
        pages += 1;
        for r in d["value"].as_array().unwrap() {
            if r["reason"] == "deleted" {
                replica.remove(r["id"].as_str().unwrap());
            } else {
                replica.insert(
                    r["accountid"].as_str().unwrap().into(),
                    r["name"].as_str().unwrap().into(),
                );
            }
        }
        match d["@odata.nextLink"].as_str() {
            Some(next) => link = next.to_string(),
            None => break,
        }
    }
    assert!(pages > 1, "the delta was paged");
    let truth: std::collections::BTreeMap<String, String> =
        emu.get("accounts?$select=name", ADMIN, &[]).await.json()["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["accountid"].as_str().unwrap().to_string(),
                    r["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
    assert_eq!(replica, truth);
}
