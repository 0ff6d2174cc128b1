//! The field-service example end to end: sets, routing of realistic writes, role and team
//! changes, and the size estimate.
// Test helpers may unwrap: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use fieldsync_replication::security::row_owner;
use fieldsync_replication::{
    estimate, evaluate_all, Depth, Environment, Privilege, Profile, Router, RowView,
};
use fieldsync_store::{OwnerKind, OwnerRef, Schema, Value};
use uuid::Uuid;

const NOW: i64 = 1_795_680_000_000; // 2026-11-26T08:00:00Z

struct Example {
    schema: Schema,
    env: Environment,
    profile: Profile,
    rows: Vec<TestRow>,
}

fn load() -> Example {
    let schema = example_schema();
    let env = Environment::from_toml(&example("environment.toml")).unwrap();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let rows = example("rows.jsonl")
        .lines()
        .map(|line| {
            let obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).unwrap();
            let table = obj["table"].as_str().unwrap();
            let t = schema.table(table).unwrap();
            let mut r = TestRow::new(table);
            r.id = Uuid::parse_str(obj["id"].as_str().unwrap()).unwrap();
            for (k, v) in &obj {
                if k != "table" && k != "id" {
                    let ty = t.column(k).unwrap().ty;
                    r.values.insert(k.clone(), Value::from_json(ty, v).unwrap());
                }
            }
            r
        })
        .collect();
    Example {
        schema,
        env,
        profile,
        rows,
    }
}

fn router(x: &Example) -> Router {
    Router::with_rows(
        &x.schema,
        &x.env,
        &x.profile,
        NOW,
        x.rows.iter().map(TestRow::view),
    )
    .unwrap()
}

fn user(x: &Example, name: &str) -> Uuid {
    x.env.user_by_name(name).unwrap().id
}

#[test]
fn sets_match_full_evaluation() {
    let x = load();
    let r = router(&x);
    let full = evaluate_all(
        &x.schema,
        &x.env,
        &x.profile,
        NOW,
        x.rows.iter().map(TestRow::view),
    );
    assert_eq!(r.memberships(), full);
    let ana = &full[&user(&x, "ana@contoso.com")];
    // Ana gets her active work orders, the accounts they serve and those accounts' parents.
    assert!(ana.iter().any(|(t, _)| t == "msdyn_workorder"));
    assert!(ana.iter().any(|(t, _)| t == "account"));
    assert_eq!(ana.iter().filter(|(t, _)| t == "product").count(), 8);
    // The maker has no data role: nothing.
    assert!(full[&user(&x, "maker@contoso.com")].is_empty());
}

#[test]
fn reassigning_a_work_order_moves_it_and_its_related_rows() {
    let x = load();
    let mut r = router(&x);
    let ana = user(&x, "ana@contoso.com");
    let ines = user(&x, "ines@contoso.com");
    // An active, matching work order of Ana's.
    let wo = x
        .rows
        .iter()
        .find(|w| {
            w.table == "msdyn_workorder"
                && row_owner(&w.values)
                    == Some(OwnerRef {
                        kind: OwnerKind::User,
                        id: ana,
                    })
                && w.values.get("statecode") == Some(&Value::Choice(0))
                && matches!(
                    w.values.get("msdyn_systemstatus"),
                    Some(Value::Choice(690_970_000..=690_970_003))
                )
                && r.holders("msdyn_workorder", w.id).contains(&ana)
        })
        .unwrap()
        .clone();
    let mut values: BTreeMap<String, Value> = wo.values.clone();
    values.insert(
        "ownerid".into(),
        Value::Owner(OwnerRef {
            kind: OwnerKind::User,
            id: ines,
        }),
    );
    let route = r.handle_write("msdyn_workorder", wo.id, Some(&values));
    let to_ines = route
        .deltas
        .iter()
        .find(|d| d.user == ines)
        .unwrap_or_else(|| panic!("{route:?}"));
    assert!(to_ines.enter.iter().any(|e| e.id == wo.id));
    // Its service account comes along only if Ines may read it (business-unit depth for
    // technicians); either way the result equals a full re-evaluation.
    let mut rows = x.rows.clone();
    for row in &mut rows {
        if row.id == wo.id {
            row.values = values.clone();
        }
    }
    let full = evaluate_all(
        &x.schema,
        &x.env,
        &x.profile,
        NOW,
        rows.iter().map(TestRow::view),
    );
    assert_eq!(r.memberships(), full);
    // Ana loses it, unless a booking of hers still pulls it in.
    let ana_has = full[&ana].contains(&("msdyn_workorder".to_string(), wo.id));
    let ana_delta = route.deltas.iter().find(|d| d.user == ana);
    assert_eq!(
        ana_delta.is_some_and(|d| d.leave.iter().any(|l| l.id == wo.id)),
        !ana_has
    );
}

#[test]
fn role_and_team_changes_give_per_user_add_and_evict() {
    let x = load();
    let mut r = router(&x);
    let mut env = x.env.clone();
    // Technicians lose product read: every technician evicts the catalog, nothing else.
    let mut role = env.role_by_name("Field Technician").unwrap().clone();
    role.grant("product", Privilege::Read, Depth::None);
    env.put_role(role);
    let deltas = r.handle_environment(&env);
    assert!(!deltas.is_empty());
    for d in &deltas {
        assert!(d.enter.is_empty());
        assert!(d.leave.iter().all(|l| &*l.table == "product"), "{d:?}");
    }
    let full = evaluate_all(
        &x.schema,
        &env,
        &x.profile,
        NOW,
        x.rows.iter().map(TestRow::view),
    );
    assert_eq!(r.memberships(), full);
    // Ana leaves the Emergency Crew: only she is affected.
    let crew = env.team_by_name("Emergency Crew").unwrap().id;
    let ana = user(&x, "ana@contoso.com");
    env.remove_team_member(crew, ana).unwrap();
    let deltas = r.handle_environment(&env);
    assert!(deltas.iter().all(|d| d.user == ana), "{deltas:?}");
    let full = evaluate_all(
        &x.schema,
        &env,
        &x.profile,
        NOW,
        x.rows.iter().map(TestRow::view),
    );
    assert_eq!(r.memberships(), full);
}

#[test]
fn estimate_counts_rows_bytes_and_blobs() {
    let x = load();
    let views: Vec<RowView<'_>> = x.rows.iter().map(TestRow::view).collect();
    let ana = user(&x, "ana@contoso.com");
    let e = estimate(&x.schema, &x.env, &x.profile, &[ana], NOW, &views).unwrap();
    assert_eq!(e.users.len(), 1);
    let full = evaluate_all(&x.schema, &x.env, &x.profile, NOW, views.iter().copied());
    assert_eq!(e.users[0].total.rows as usize, full[&ana].len());
    // Five product images of 120,000 bytes each.
    assert_eq!(e.tables["product"].blob_bytes, 600_000);
    assert_eq!(e.largest_tables[0].0, "product");
    // Unselected columns do not count: accounts download 8 columns plus system ones.
    let all = estimate(&x.schema, &x.env, &x.profile, &[], NOW, &views).unwrap();
    assert_eq!(all.users.len(), 20);
    assert!(all
        .users
        .windows(2)
        .all(|w| w[0].total.total_bytes() >= w[1].total.total_bytes()));
}
