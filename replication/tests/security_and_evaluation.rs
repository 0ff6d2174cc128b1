//! Privilege depths, every filter kind and operator, relationship cycles and self references,
//! evaluated from scratch.
// Test helpers may unwrap: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fieldsync_replication::profile::expr::{like, DAY_MS};
use fieldsync_replication::security::derived_id;
use fieldsync_replication::{
    evaluate, Depth, Environment, Privilege, Profile, ProfileError, ProfileItem, Role, RowFilter,
};
use fieldsync_store::{Schema, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

const NOW: i64 = 1_790_000_000_000;

struct World {
    schema: Schema,
    env: Environment,
    root: Uuid,
    north: Uuid,
    north_east: Uuid,
    south: Uuid,
    role: Uuid,
    me: Uuid,
    peer: Uuid,
    boss: Uuid,
    stranger: Uuid,
    team: Uuid,
}

/// root → north → north_east, root → south; `me` and `peer` in north, `boss` in root,
/// `stranger` in south; `team` (north) has `me`. One role for everyone, set per test.
fn world(depth: Depth) -> World {
    let schema = Schema::from_toml(CYCLE_SCHEMA).unwrap();
    let mut env = Environment::new("root");
    let root = env.business_unit_by_name("root").unwrap().id;
    let north = env.add_business_unit("north", root).unwrap();
    let north_east = env.add_business_unit("north_east", north).unwrap();
    let south = env.add_business_unit("south", root).unwrap();
    let mut role = Role {
        id: derived_id("role", "reader"),
        name: "reader".into(),
        privileges: BTreeMap::new(),
    };
    role.grant("*", Privilege::Read, depth);
    let role_id = role.id;
    env.put_role(role);
    let me = env.add_user("me", north, &[role_id]).unwrap();
    let peer = env.add_user("peer", north, &[role_id]).unwrap();
    let boss = env.add_user("boss", root, &[role_id]).unwrap();
    let stranger = env.add_user("stranger", south, &[role_id]).unwrap();
    let team = env.add_team("team", north, &[me], &[]).unwrap();
    World {
        schema,
        env,
        root,
        north,
        north_east,
        south,
        role: role_id,
        me,
        peer,
        boss,
        stranger,
        team,
    }
}

fn all_profile(schema: &Schema, tables: &[&str]) -> Profile {
    let mut p = Profile::new("p");
    for t in tables {
        p.put_item(schema, ProfileItem::new(t, RowFilter::All))
            .unwrap();
    }
    p
}

fn ids(set: &fieldsync_replication::DeviceSet) -> Vec<Uuid> {
    let mut v: Vec<Uuid> = set.iter().map(|(_, id)| *id).collect();
    v.sort();
    v
}

#[test]
fn example_environment_loads() {
    let env = Environment::from_toml(&example("environment.toml")).unwrap();
    assert_eq!(env.business_units().count(), 3);
    assert_eq!(env.users().count(), 20);
    assert_eq!(env.teams().count(), 4);
    for r in [
        "System Administrator",
        "System Customizer",
        "Environment Maker",
        "Basic User",
        "Field Technician",
    ] {
        assert!(env.role_by_name(r).is_some(), "{r}");
    }
    let ana = env.user_by_name("ana@contoso.com").unwrap();
    assert_eq!(
        env.max_depth(ana.id, "msdyn_workorder", Privilege::Read),
        Depth::User
    );
    // Carla's team role reads every account.
    let carla = env.user_by_name("carla@contoso.com").unwrap();
    let schema = example_schema();
    assert!(
        env.read_scope(carla.id, schema.table("account").unwrap())
            .all
    );
}

#[test]
fn environment_files_are_checked() {
    let bad = [
        ("[[business_units]]\nname = \"a\"\n[[business_units]]\nname = \"b\"\n", "tree"),
        ("[[business_units]]\nname = \"a\"\nparent = \"zz\"\n", "unknown business unit"),
        (
            "[[business_units]]\nname = \"a\"\n[[users]]\nname = \"u\"\nbusiness_unit = \"a\"\nroles = [\"nope\"]\n",
            "unknown security role",
        ),
        ("[[roles]]\nname = \"Basic User\"\n", "built-in"),
        (
            "[[business_units]]\nname = \"a\"\n[[roles]]\nname = \"r\"\n[roles.privileges.account]\nread = \"deepest\"\n",
            "depth",
        ),
        (
            "[[business_units]]\nname = \"a\"\n[[roles]]\nname = \"r\"\n[roles.privileges.account]\nfly = \"user\"\n",
            "privilege",
        ),
        ("[[business_units]]\nname = \"a\"\nparent = \"a\"\n", "tree"),
    ];
    for (text, needle) in bad {
        let e = Environment::from_toml(text).unwrap_err().to_string();
        assert!(e.contains(needle), "{e} lacks {needle}");
    }
}

#[test]
fn each_privilege_depth_reads_what_dataverse_says() {
    // Rows owned by: me, peer (same BU), the team, a user of north_east, boss (root), stranger.
    for depth in Depth::ALL {
        let w = world(depth);
        let ne_user = {
            let mut env = w.env.clone();
            env.add_user("ne", w.north_east, &[w.role]).unwrap()
        };
        let mut env = w.env.clone();
        let ne = env.add_user("ne", w.north_east, &[w.role]).unwrap();
        assert_eq!(ne, ne_user);
        let rows = vec![
            TestRow::new("a").owner_user(w.me),
            TestRow::new("a").owner_user(w.peer),
            TestRow::new("a").owner_team(w.team),
            TestRow::new("a").owner_user(ne),
            TestRow::new("a").owner_user(w.boss),
            TestRow::new("a").owner_user(w.stranger),
            // Owning business unit given explicitly wins over the owner's.
            TestRow::new("a")
                .owner_user(w.stranger)
                .set("owningbusinessunit", Value::Lookup(w.north)),
        ];
        let p = all_profile(&w.schema, &["a"]);
        let got = evaluate(&w.schema, &env, &p, w.me, NOW, views(&rows));
        let expect: Vec<usize> = match depth {
            Depth::None => vec![],
            Depth::User => vec![0, 2],
            Depth::BusinessUnit => vec![0, 1, 2, 6],
            Depth::ParentChild => vec![0, 1, 2, 3, 6],
            Depth::Organization => vec![0, 1, 2, 3, 4, 5, 6],
        };
        let mut want: Vec<Uuid> = expect.iter().map(|i| rows[*i].id).collect();
        want.sort();
        assert_eq!(ids(&got), want, "depth {depth}");
        // Organization-owned tables: any depth reads all.
        let org = vec![TestRow::new("org"), TestRow::new("org")];
        let p = all_profile(&w.schema, &["org"]);
        let got = evaluate(&w.schema, &env, &p, w.me, NOW, views(&org));
        assert_eq!(got.len(), if depth == Depth::None { 0 } else { 2 });
        let _ = (w.root, w.south);
    }
}

#[test]
fn team_roles_apply_relative_to_the_team() {
    let w = world(Depth::None);
    let mut env = w.env.clone();
    let mut role = Role {
        id: derived_id("role", "team-bu"),
        name: "team-bu".into(),
        privileges: BTreeMap::new(),
    };
    role.grant("a", Privilege::Read, Depth::BusinessUnit);
    let rid = role.id;
    env.put_role(role);
    // A south team with me in it, holding a BU-depth role: I read south's rows, not north's.
    let st = env
        .add_team("south team", w.south, &[w.me], &[rid])
        .unwrap();
    let rows = vec![
        TestRow::new("a").owner_user(w.stranger),
        TestRow::new("a").owner_user(w.peer),
        TestRow::new("a").owner_team(st),
    ];
    let p = all_profile(&w.schema, &["a"]);
    let got = evaluate(&w.schema, &env, &p, w.me, NOW, views(&rows));
    let mut want = vec![rows[0].id, rows[2].id];
    want.sort();
    assert_eq!(ids(&got), want);
    // The peer, not in the team, reads nothing.
    assert!(evaluate(&w.schema, &env, &p, w.peer, NOW, views(&rows)).is_empty());
    // Leaving the team loses it.
    env.remove_team_member(st, w.me).unwrap();
    assert!(evaluate(&w.schema, &env, &p, w.me, NOW, views(&rows)).is_empty());
}

#[test]
fn organization_filter_combinations() {
    let w = world(Depth::Organization);
    let rows = vec![
        TestRow::new("a").owner_user(w.me),
        TestRow::new("a").owner_team(w.team),
        TestRow::new("a").owner_user(w.peer),
        TestRow::new("a").owner_user(w.stranger),
    ];
    for bits in 0..8u8 {
        let mut p = Profile::new("p");
        p.put_item(
            &w.schema,
            ProfileItem::new(
                "a",
                RowFilter::Organization {
                    owned_by_me: bits & 1 != 0,
                    owned_by_my_teams: bits & 2 != 0,
                    owned_by_my_business_unit: bits & 4 != 0,
                },
            ),
        )
        .unwrap();
        let got = evaluate(&w.schema, &w.env, &p, w.me, NOW, views(&rows));
        let mut want = Vec::new();
        if bits & 1 != 0 {
            want.push(rows[0].id);
        }
        if bits & 2 != 0 {
            want.push(rows[1].id);
        }
        if bits & 4 != 0 {
            // The team and peer are in north too.
            want.extend([rows[0].id, rows[1].id, rows[2].id]);
        }
        want.sort();
        want.dedup();
        assert_eq!(ids(&got), want, "bits {bits}");
    }
}

#[test]
fn all_and_related_only_filters() {
    let w = world(Depth::User);
    let rows = vec![
        TestRow::new("a").owner_user(w.me),
        TestRow::new("a").owner_user(w.peer),
    ];
    let p = all_profile(&w.schema, &["a"]);
    // All rows, still only readable ones.
    assert_eq!(
        ids(&evaluate(&w.schema, &w.env, &p, w.me, NOW, views(&rows))),
        vec![rows[0].id]
    );
    let mut p = Profile::new("p");
    p.put_item(&w.schema, ProfileItem::new("a", RowFilter::RelatedOnly))
        .unwrap();
    assert!(evaluate(&w.schema, &w.env, &p, w.me, NOW, views(&rows)).is_empty());
}

/// Check one custom filter against rows with `n` = 0..10 and other columns.
fn custom(w: &World, filter: &str, rows: &[TestRow]) -> Vec<Uuid> {
    let mut p = Profile::new("p");
    let table = w.schema.table("a").unwrap();
    let e = fieldsync_replication::profile::Expr::parse(filter, table).unwrap();
    // Display round-trips.
    assert_eq!(
        fieldsync_replication::profile::Expr::parse(&e.to_string(), table).unwrap(),
        e,
        "{filter}"
    );
    p.put_item(&w.schema, ProfileItem::new("a", RowFilter::Custom(e)))
        .unwrap();
    let got = evaluate(&w.schema, &w.env, &p, w.me, NOW, views(rows));
    rows.iter()
        .filter(|r| got.contains(&(r.table.clone(), r.id)))
        .map(|r| r.id)
        .collect()
}

#[test]
fn each_custom_operator() {
    let w = world(Depth::Organization);
    let rows: Vec<TestRow> = (0..6)
        .map(|i| {
            let r = TestRow::new("a")
                .owner_user(if i % 2 == 0 { w.me } else { w.peer })
                .set("n", Value::Integer(i))
                .set("createdon", Value::DateTime(NOW + (i - 3) * 2 * DAY_MS));
            if i == 5 {
                r.owner_team(w.team)
            } else if i == 4 {
                r.set("name", Value::Text("Contoso Ltd".into()))
                    .set("owningbusinessunit", Value::Lookup(w.south))
            } else {
                r.set("name", Value::Text(format!("row {i}")))
            }
        })
        .collect();
    let pick = |idx: &[usize]| -> Vec<Uuid> { idx.iter().map(|i| rows[*i].id).collect() };
    assert_eq!(custom(&w, "n eq 2", &rows), pick(&[2]));
    assert_eq!(custom(&w, "n ne 2", &rows), pick(&[0, 1, 3, 4, 5]));
    assert_eq!(custom(&w, "n lt 2", &rows), pick(&[0, 1]));
    assert_eq!(custom(&w, "n le 2", &rows), pick(&[0, 1, 2]));
    assert_eq!(custom(&w, "n gt 3", &rows), pick(&[4, 5]));
    assert_eq!(custom(&w, "n ge 3", &rows), pick(&[3, 4, 5]));
    assert_eq!(custom(&w, "n in (1, 3, 9)", &rows), pick(&[1, 3]));
    assert_eq!(custom(&w, "name like '%contoso%'", &rows), pick(&[4]));
    assert_eq!(custom(&w, "name like 'row _'", &rows), pick(&[0, 1, 2, 3]));
    assert_eq!(custom(&w, "name null", &rows), pick(&[5]));
    assert_eq!(custom(&w, "name not-null", &rows), pick(&[0, 1, 2, 3, 4]));
    // Nulls never compare: `ne` does not select the row without a name.
    assert_eq!(custom(&w, "name ne 'row 1'", &rows), pick(&[0, 2, 3, 4]));
    assert_eq!(custom(&w, "ownerid eq-userid", &rows), pick(&[0, 2, 4]));
    assert_eq!(custom(&w, "ownerid eq-userteams", &rows), pick(&[5]));
    assert_eq!(
        custom(&w, "ownerid eq-useroruserteams", &rows),
        pick(&[0, 2, 4, 5])
    );
    // Row 4 names south as its owning business unit; the rest derive north from the owner.
    assert_eq!(
        custom(&w, "owningbusinessunit eq-businessid", &rows),
        Vec::<Uuid>::new()
    );
    let with_bu: Vec<TestRow> = rows
        .iter()
        .cloned()
        .map(|r| {
            if r.values.contains_key("owningbusinessunit") {
                r
            } else {
                r.set("owningbusinessunit", Value::Lookup(w.north))
            }
        })
        .collect();
    assert_eq!(
        custom(&w, "owningbusinessunit eq-businessid", &with_bu),
        [0, 1, 2, 3, 5]
            .iter()
            .map(|i| with_bu[*i].id)
            .collect::<Vec<_>>()
    );
    // createdon = now - 6d, -4d, -2d, 0, +2d, +4d.
    assert_eq!(custom(&w, "createdon last-x-days 3", &rows), pick(&[2, 3]));
    assert_eq!(custom(&w, "createdon next-x-days 3", &rows), pick(&[3, 4]));
    // And/or nesting.
    assert_eq!(
        custom(
            &w,
            "n ge 1 and (n eq 1 or name like '%ltd') and ownerid eq-userid",
            &rows
        ),
        pick(&[4])
    );
    assert_eq!(
        custom(&w, "n eq 0 or n eq 5 and ownerid eq-userteams", &rows),
        pick(&[0, 5])
    );
    assert_eq!(
        custom(&w, "(n eq 0 or n eq 5) and ownerid eq-userid", &rows),
        pick(&[0])
    );
    assert_eq!(
        custom(
            &w,
            "createdon ge '2026-01-01' and createdon lt '2100-01-01T00:00:00Z'",
            &rows
        ),
        pick(&[0, 1, 2, 3, 4, 5])
    );
}

#[test]
fn filter_errors_name_the_problem() {
    let schema = Schema::from_toml(CYCLE_SCHEMA).unwrap();
    let t = schema.table("a").unwrap();
    use fieldsync_replication::profile::Expr;
    assert!(matches!(
        Expr::parse("n between 1", t),
        Err(ProfileError::UnsupportedOperator { operator }) if operator == "between"
    ));
    assert!(matches!(
        Expr::parse("zz eq 1", t),
        Err(ProfileError::UnknownColumn { .. })
    ));
    assert!(Expr::parse("n eq 'x'", t).is_err());
    assert!(Expr::parse("name like", t).is_err());
    assert!(Expr::parse("n eq 1 and", t).is_err());
    assert!(Expr::parse("(n eq 1", t).is_err());
    assert!(Expr::parse("name eq-userid", t).is_err());
    assert!(Expr::parse("n last-x-days 3", t).is_err());
    assert!(Expr::parse("b lt '00000000-0000-0000-0000-000000000000'", t).is_err());
    assert!(like("Contoso", "c%O"));
    assert!(!like("Contoso", "c%x"));
    assert!(like("", "%"));
}

#[test]
fn profile_items_are_checked() {
    let schema = Schema::from_toml(CYCLE_SCHEMA).unwrap();
    let mut p = Profile::new("p");
    assert!(matches!(
        p.put_item(&schema, ProfileItem::new("hidden", RowFilter::All)),
        Err(ProfileError::NotOfflineEnabled(t)) if t == "hidden"
    ));
    let mut item = ProfileItem::new("a", RowFilter::All);
    item.sync_interval_minutes = 4;
    assert!(matches!(
        p.put_item(&schema, item.clone()),
        Err(ProfileError::SyncInterval { minutes: 4, .. })
    ));
    item.sync_interval_minutes = 1441;
    assert!(p.put_item(&schema, item.clone()).is_err());
    item.sync_interval_minutes = 1440;
    item.relationships = vec!["b_a".into()];
    // `b` is not in the profile yet.
    assert!(matches!(
        p.put_item(&schema, item.clone()),
        Err(ProfileError::UnrelatedRelationship { .. })
    ));
    p.put_item(&schema, ProfileItem::new("b", RowFilter::All))
        .unwrap();
    p.put_item(&schema, item.clone()).unwrap();
    item.relationships = vec!["node_parent".into()];
    assert!(p.put_item(&schema, item.clone()).is_err());
    item.relationships = vec![];
    item.images = vec!["name".into()];
    assert!(matches!(
        p.put_item(&schema, item),
        Err(ProfileError::NotAnImage { .. })
    ));
    // The example profile loads, and its TOML form round-trips.
    let schema = example_schema();
    let p = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    assert_eq!(Profile::from_toml(&p.to_toml(), &schema).unwrap(), p);
    assert_eq!(p.items["product"].sync_interval_minutes, 1440);
    assert_eq!(p.items["incident"].sync_interval_minutes, 30);
    let bad = "name = \"x\"\n[tables.systemaudit]\nrows = \"all\"\n";
    assert!(matches!(
        Profile::from_toml(bad, &schema),
        Err(ProfileError::NotOfflineEnabled(_))
    ));
}

#[test]
fn relationship_cycles_and_self_references() {
    let w = world(Depth::Organization);
    let schema = &w.schema;
    // a1 (mine) → b1 → a2 → b2 → a1: a cycle across two tables.
    let mut a1 = TestRow::new("a").owner_user(w.me);
    let mut a2 = TestRow::new("a").owner_user(w.peer);
    let b1 = TestRow::new("b").owner_user(w.peer);
    let b2 = TestRow::new("b").owner_user(w.peer);
    a1 = a1.set("b", Value::Lookup(b1.id));
    let b1 = b1.set("a", Value::Lookup(a2.id));
    a2 = a2.set("b", Value::Lookup(b2.id));
    let b2 = b2.set("a", Value::Lookup(a1.id));
    let unrelated_b = TestRow::new("b").owner_user(w.peer);
    let rows = vec![a1.clone(), a2.clone(), b1.clone(), b2.clone(), unrelated_b];
    let mut p = Profile::new("p");
    p.put_item(
        schema,
        ProfileItem::new(
            "a",
            RowFilter::Organization {
                owned_by_me: true,
                owned_by_my_teams: false,
                owned_by_my_business_unit: false,
            },
        ),
    )
    .unwrap();
    let mut bi = ProfileItem::new("b", RowFilter::RelatedOnly);
    bi.relationships = vec!["a_b".into()];
    p.put_item(schema, bi).unwrap();
    let mut ai = p.items["a"].clone();
    ai.relationships = vec!["b_a".into()];
    p.put_item(schema, ai).unwrap();
    let got = evaluate(schema, &w.env, &p, w.me, NOW, views(&rows));
    assert_eq!(got.len(), 4, "the whole cycle, once: {got:?}");
    assert!(!got.contains(&("b".to_string(), rows[4].id)));

    // Back-references: `b` rows whose lookup points at a set `a` row (one-to-many).
    let mut p2 = Profile::new("p2");
    let mut ai = p.items["a"].clone();
    ai.relationships = vec![];
    p2.put_item(schema, ai).unwrap();
    let mut bi = ProfileItem::new("b", RowFilter::RelatedOnly);
    bi.relationships = vec!["b_a".into()];
    p2.put_item(schema, bi).unwrap();
    let got = evaluate(schema, &w.env, &p2, w.me, NOW, views(&rows));
    // a1 is mine; b2 points at a1.
    let mut want = vec![a1.id, b2.id];
    want.sort();
    assert_eq!(ids(&got), want);

    // Self reference: the whole parent chain, with a loop at the top, each once.
    let mut chain: Vec<TestRow> = (0..5).map(|_| TestRow::new("node")).collect();
    for i in 0..4 {
        let parent = chain[i + 1].id;
        chain[i] = chain[i].clone().set("parent", Value::Lookup(parent));
    }
    let top_loop = chain[2].id;
    chain[4] = chain[4].clone().set("parent", Value::Lookup(top_loop));
    chain[1] = chain[1].clone().owner_user(w.me);
    for (i, r) in chain.iter_mut().enumerate() {
        if i != 1 {
            *r = r.clone().owner_user(w.peer);
        }
    }
    let mut p3 = Profile::new("p3");
    let mut ni = ProfileItem::new(
        "node",
        RowFilter::Organization {
            owned_by_me: true,
            owned_by_my_teams: false,
            owned_by_my_business_unit: false,
        },
    );
    ni.relationships = vec!["node_parent".into()];
    p3.put_item(schema, ni).unwrap();
    let got = evaluate(schema, &w.env, &p3, w.me, NOW, views(&chain));
    let mut want: Vec<Uuid> = chain[1..].iter().map(|r| r.id).collect();
    want.sort();
    assert_eq!(ids(&got), want, "parents of node 1, not its child");

    // A related row the user cannot read is left out, and pulls nothing further.
    let w = world(Depth::User);
    let mut chain: Vec<TestRow> = (0..3).map(|_| TestRow::new("node")).collect();
    chain[0] = chain[0]
        .clone()
        .owner_user(w.me)
        .set("parent", Value::Lookup(chain[1].id));
    chain[1] = chain[1]
        .clone()
        .owner_user(w.peer)
        .set("parent", Value::Lookup(chain[2].id));
    chain[2] = chain[2].clone().owner_user(w.me);
    // chain[2] is mine but only reachable through chain[1]: select by name, not owner.
    chain[0] = chain[0].clone().set("name", Value::Text("start".into()));
    let mut p4 = p3.clone();
    let mut ni = p4.items["node"].clone();
    ni.filter = RowFilter::Custom(
        fieldsync_replication::profile::Expr::parse(
            "name eq 'start'",
            schema.table("node").unwrap(),
        )
        .unwrap(),
    );
    p4.put_item(schema, ni).unwrap();
    let got = evaluate(schema, &w.env, &p4, w.me, NOW, views(&chain));
    assert_eq!(
        ids(&got),
        vec![chain[0].id],
        "the unreadable parent blocks the chain"
    );
}
