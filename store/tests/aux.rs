//! The auxiliary key space and `inspect_change`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{options, schema, temp_store, text, user};
use fieldsync_store::{AuxWrite, Durability, Store, Value, DELETED_KEY};

#[test]
fn aux_put_get_remove_scan_and_spaces_stay_apart() {
    let s = temp_store(1);
    s.aux_put("a", b"k1", b"v1", Durability::Immediate).unwrap();
    s.aux_put("a", b"k2", b"v2", Durability::Group).unwrap();
    s.aux_put("a", b"x", b"v3", Durability::Group).unwrap();
    s.aux_put("ab", b"k1", b"other", Durability::Group).unwrap();
    assert_eq!(s.aux_get("a", b"k1").unwrap(), Some(b"v1".to_vec()));
    assert_eq!(s.aux_get("ab", b"k1").unwrap(), Some(b"other".to_vec()));
    assert_eq!(s.aux_get("b", b"k1").unwrap(), None);
    let scan = s.aux_scan("a", b"k").unwrap();
    assert_eq!(
        scan,
        vec![
            (b"k1".to_vec(), b"v1".to_vec()),
            (b"k2".to_vec(), b"v2".to_vec())
        ]
    );
    assert_eq!(s.aux_scan("a", b"").unwrap().len(), 3);
    assert_eq!(s.aux_range("a", b"k2", b"y", 10).unwrap().len(), 2);
    assert_eq!(s.aux_range("a", b"k2", b"y", 1).unwrap().len(), 1);
    assert!(s.aux_remove("a", b"k1", Durability::Immediate).unwrap());
    assert!(!s.aux_remove("a", b"k1", Durability::Immediate).unwrap());
    s.aux_apply(
        "a",
        &[
            AuxWrite::Put(b"k3".to_vec(), b"v".to_vec()),
            AuxWrite::Remove(b"k2".to_vec()),
        ],
        Durability::Immediate,
    )
    .unwrap();
    assert_eq!(s.aux_scan("a", b"k").unwrap().len(), 1);
    assert!(s
        .aux_put(&"s".repeat(65), b"k", b"v", Durability::Group)
        .is_err());
    // Aux data is not rows: the store's check still passes.
    assert!(s.check().unwrap().is_ok());
}

#[test]
fn aux_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::create(dir.path(), schema(), options(1)).unwrap();
        s.aux_put(
            "dev",
            b"cursor/task",
            &7u64.to_be_bytes(),
            Durability::Immediate,
        )
        .unwrap();
    }
    let s = Store::open(dir.path(), options(1)).unwrap();
    assert_eq!(
        s.aux_get("dev", b"cursor/task").unwrap(),
        Some(7u64.to_be_bytes().to_vec())
    );
}

#[test]
fn inspect_change_tells_what_a_remote_change_does() {
    let a = temp_store(1);
    let b = temp_store(2);
    let mut tx = a.begin();
    let id = tx
        .insert(
            "account",
            &[("name", text("Contoso")), ("ownerid", user(1))],
        )
        .unwrap();
    tx.commit().unwrap();
    let create = a.ops_since(0, 1).unwrap().remove(0);
    let i = b.inspect_change("account", id, &create.change).unwrap();
    assert!(!i.row_exists && !i.applied && i.ready);
    assert_eq!(i.columns.get("name"), Some(&text("Contoso")));
    assert_eq!(i.actor, a.actor());
    b.apply_remote(&[create.to_remote()], Durability::Immediate)
        .unwrap();
    assert!(
        b.inspect_change("account", id, &create.change)
            .unwrap()
            .applied
    );

    // Concurrent writes to one column: each side sees the other's as concurrent.
    let mut tx = a.begin();
    tx.update("account", id, &[("name", text("A"))]).unwrap();
    tx.commit().unwrap();
    let mut tx = b.begin();
    tx.update("account", id, &[("name", text("B"))]).unwrap();
    tx.commit().unwrap();
    let from_a = a.ops_since(1, 1).unwrap().remove(0);
    let i = b.inspect_change("account", id, &from_a.change).unwrap();
    assert!(i.ready && !i.applied);
    assert_eq!(i.concurrent, vec!["name".to_string()]);

    // A change whose dependency is missing is not ready; a delete sets the tombstone.
    let mut tx = a.begin();
    tx.delete("account", id).unwrap();
    tx.commit().unwrap();
    let del = a.ops_since(2, 1).unwrap().remove(0);
    let c = temp_store(3);
    c.apply_remote(&[create.to_remote()], Durability::Immediate)
        .unwrap();
    let i = c.inspect_change("account", id, &del.change).unwrap();
    assert!(!i.ready);
    assert_eq!(i.columns.get(DELETED_KEY), Some(&Value::Boolean(true)));

    // Garbage is an error, not a panic.
    assert!(c.inspect_change("account", id, b"garbage").is_err());
    assert!(c.inspect_change("nope", id, &del.change).is_err());
}
