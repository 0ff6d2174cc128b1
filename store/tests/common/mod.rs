//! Helpers shared by the store's integration tests.
// Test helpers: a panic here is a failed test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use fieldsync_store::{ActorId, Clock, OwnerKind, OwnerRef, Schema, Store, StoreOptions, Value};
use uuid::Uuid;

pub const SCHEMA: &str = r#"
[tables.account]
offline = true
[tables.account.columns]
name = "text"
revenue = "decimal"
numberofemployees = "integer"
industrycode = { choice = [1, 2, 3] }
primarycontactid = { lookup = "contact", relationship = "account_primary_contact" }
logo = "image"
contract = { type = "file", max_size_kb = 16384 }

[tables.contact]
offline = true
[tables.contact.columns]
fullname = "text"
parentcustomerid = { lookup = "account", relationship = "contact_customer_accounts" }

[tables.msdyn_workorder]
offline = true
[tables.msdyn_workorder.columns]
msdyn_name = "text"
msdyn_priority = { choice = [1, 2, 3] }
msdyn_latitude = "float"
"#;

pub fn schema() -> Schema {
    Schema::from_toml(SCHEMA).unwrap()
}

pub fn actor(n: u8) -> ActorId {
    ActorId([n; 16])
}

pub fn options(n: u8) -> StoreOptions {
    StoreOptions::default()
        .with_actor(actor(n))
        .with_clock(Clock::manual(Arc::new(AtomicI64::new(1_790_000_000_000))))
}

pub fn temp_store(n: u8) -> Store {
    Store::temporary(schema(), options(n)).unwrap()
}

pub fn user(n: u8) -> Value {
    Value::Owner(OwnerRef {
        kind: OwnerKind::User,
        id: Uuid::from_bytes([n; 16]),
    })
}

pub fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

/// Every log entry of `store`, as ops for another store.
pub fn all_ops(store: &Store) -> Vec<fieldsync_store::RemoteOp> {
    store
        .ops_since(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.to_remote())
        .collect()
}

/// Send every log entry of `from` to `to`.
pub fn sync_all(from: &Store, to: &Store) {
    to.apply_remote(&all_ops(from), fieldsync_store::Durability::Group)
        .unwrap();
}

/// Create a store in `dir` with one committed row, and close it.
pub fn make_store(dir: &std::path::Path) {
    let s = Store::create(dir, schema(), options(1)).unwrap();
    let mut tx = s.begin();
    tx.insert("account", &[("name", text("a"))]).unwrap();
    tx.commit().unwrap();
}

/// Open the sled database of a closed store directly (to damage it), waiting for the lock of
/// the store handle that was just dropped.
pub fn raw_sled(dir: &std::path::Path) -> sled::Db {
    for _ in 0..200 {
        if let Ok(db) = sled::open(dir.join("db")) {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    sled::open(dir.join("db")).unwrap()
}
