//! The field-service data set the replication benches share: the example schema, profile and
//! app (`examples/field-service/`), an environment of N field technicians in two business
//! units (teams of 10 share work orders), and deterministic realistic rows for every table.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use fieldsync_replication::security::BASIC_USER;
use fieldsync_replication::Environment;
use fieldsync_store::{OwnerKind, OwnerRef, Value};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

pub const NOW: i64 = 1_790_000_000_000;
pub const DAY: i64 = 86_400_000;

pub fn example(file: &str) -> String {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/field-service")
        .join(file);
    std::fs::read_to_string(p).unwrap()
}

/// Row counts per table, scaled to `total` (1,000,000 by default).
pub fn counts(total: usize) -> [(&'static str, usize); 6] {
    let f = |x: usize| (x * total / 1_000_000).max(1);
    [
        ("product", f(2_000)),
        ("account", f(100_000)),
        ("contact", f(150_000)),
        ("incident", f(50_000)),
        ("msdyn_workorder", f(408_000)),
        ("bookableresourcebooking", f(290_000)),
    ]
}

pub fn id_of(table: &str, i: usize) -> Uuid {
    // Deterministic ids: table tag in the high bits, index in the low bits.
    let tag: u128 = match table {
        "product" => 1,
        "account" => 2,
        "contact" => 3,
        "incident" => 4,
        "msdyn_workorder" => 5,
        _ => 6,
    };
    Uuid::from_u128((tag << 64) | i as u128)
}

pub struct Data {
    pub users: Vec<Uuid>,
    pub teams: Vec<Uuid>,
    pub counts: HashMap<&'static str, usize>,
}

pub fn environment(n_users: usize) -> (Environment, Data) {
    let text = example("environment.toml");
    let base = Environment::from_toml(&text).unwrap();
    let mut env = Environment::new("Contoso");
    let root = env.business_unit_by_name("Contoso").unwrap().id;
    let north = env.add_business_unit("Contoso North", root).unwrap();
    let south = env.add_business_unit("Contoso South", root).unwrap();
    let tech = base.role_by_name("Field Technician").unwrap().clone();
    let tech_id = tech.id;
    env.put_role(tech);
    let basic = env.role_by_name(BASIC_USER).unwrap().id;
    let mut users = Vec::with_capacity(n_users);
    for i in 0..n_users {
        let bu = if i % 2 == 0 { north } else { south };
        users.push(
            env.add_user(&format!("tech{i}@contoso.com"), bu, &[basic, tech_id])
                .unwrap(),
        );
    }
    let mut teams = Vec::new();
    for (k, chunk) in users.chunks(10).enumerate() {
        let bu = if k % 2 == 0 { north } else { south };
        teams.push(env.add_team(&format!("crew{k}"), bu, chunk, &[]).unwrap());
    }
    (
        env,
        Data {
            users,
            teams,
            counts: HashMap::new(),
        },
    )
}

pub fn owner_user(id: Uuid) -> Value {
    Value::Owner(OwnerRef {
        kind: OwnerKind::User,
        id,
    })
}

pub fn owner_team(id: Uuid) -> Value {
    Value::Owner(OwnerRef {
        kind: OwnerKind::Team,
        id,
    })
}

/// The values of row `i` of `table`, generated from a per-row seed.
pub fn row_values(d: &Data, table: &str, i: usize, version: u64) -> BTreeMap<String, Value> {
    let mut rng = ChaCha8Rng::seed_from_u64((i as u64) << 8 ^ version << 40 ^ table.len() as u64);
    let mut v = BTreeMap::new();
    let pick = |rng: &mut ChaCha8Rng, t: &str| id_of(t, rng.gen_range(0..d.counts[t]));
    let user = |rng: &mut ChaCha8Rng| *d.users.choose(rng).unwrap();
    v.insert("statecode".into(), Value::Choice(0));
    v.insert("createdon".into(), Value::DateTime(NOW - 30 * DAY));
    v.insert("modifiedon".into(), Value::DateTime(NOW));
    match table {
        "product" => {
            v.insert("name".into(), Value::Text(format!("Product {i}")));
            v.insert(
                "quantityonhand".into(),
                Value::Integer(rng.gen_range(0..100)),
            );
        }
        "account" => {
            v.insert("ownerid".into(), owner_user(user(&mut rng)));
            v.insert("name".into(), Value::Text(format!("Account {i}")));
            v.insert("telephone1".into(), Value::Text(format!("+1 555 {i:07}")));
            v.insert(
                "primarycontactid".into(),
                Value::Lookup(pick(&mut rng, "contact")),
            );
            if rng.gen_bool(0.3) {
                v.insert(
                    "parentaccountid".into(),
                    Value::Lookup(pick(&mut rng, "account")),
                );
            }
        }
        "contact" => {
            v.insert("ownerid".into(), owner_user(user(&mut rng)));
            v.insert("lastname".into(), Value::Text(format!("Contact {i}")));
            v.insert(
                "parentcustomerid".into(),
                Value::Lookup(pick(&mut rng, "account")),
            );
        }
        "incident" => {
            v.insert("ownerid".into(), owner_user(user(&mut rng)));
            v.insert("title".into(), Value::Text(format!("Case {i}")));
            v.insert(
                "customerid".into(),
                Value::Lookup(pick(&mut rng, "account")),
            );
            v.insert(
                "primarycontactid".into(),
                Value::Lookup(pick(&mut rng, "contact")),
            );
        }
        "msdyn_workorder" => {
            let owner = if rng.gen_bool(0.85) {
                owner_user(user(&mut rng))
            } else {
                owner_team(*d.teams.choose(&mut rng).unwrap())
            };
            v.insert("ownerid".into(), owner);
            v.insert("msdyn_name".into(), Value::Text(format!("WO-{i:07}")));
            v.insert(
                "statecode".into(),
                Value::Choice(if rng.gen_bool(0.8) { 0 } else { 1 }),
            );
            v.insert(
                "msdyn_systemstatus".into(),
                Value::Choice(690_970_000 + rng.gen_range(0..6)),
            );
            v.insert(
                "msdyn_serviceaccount".into(),
                Value::Lookup(pick(&mut rng, "account")),
            );
            v.insert(
                "msdyn_reportedbycontact".into(),
                Value::Lookup(pick(&mut rng, "contact")),
            );
            if rng.gen_bool(0.5) {
                v.insert(
                    "msdyn_servicerequest".into(),
                    Value::Lookup(pick(&mut rng, "incident")),
                );
            }
            v.insert(
                "msdyn_datewindowstart".into(),
                Value::DateTime(NOW + rng.gen_range(-5..10) * DAY),
            );
        }
        _ => {
            v.insert("ownerid".into(), owner_user(user(&mut rng)));
            v.insert("name".into(), Value::Text(format!("Booking {i}")));
            v.insert("bookingstatus".into(), Value::Choice(rng.gen_range(1..=5)));
            v.insert(
                "msdyn_workorder".into(),
                Value::Lookup(pick(&mut rng, "msdyn_workorder")),
            );
            v.insert(
                "starttime".into(),
                Value::DateTime(NOW + rng.gen_range(-5..10) * DAY),
            );
        }
    }
    v
}
