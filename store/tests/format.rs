//! Opening a store written in an older on-disk format upgrades it in place.

// Helpers below are test code: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fieldsync_store::{Query, QueryPlan, Store, Value, FORMAT_VERSION};
use uuid::Uuid;

const TABLE: &str = "msdyn_workorder";
/// `msdyn_workorder`'s number: its place in the sorted table list.
const TABLE_NUMBER: u16 = 2;
const COMPOSITE: u16 = u16::MAX - 1;

fn column(name: &str) -> u16 {
    let schema = schema();
    let table = schema.table(TABLE).unwrap();
    u16::try_from(table.column_index(name).unwrap()).unwrap()
}

/// An index key of format 1: `I` table column value row-id.
fn index_key(col: u16, value: &[u8], id: Uuid) -> Vec<u8> {
    let mut k = vec![b'I'];
    k.extend_from_slice(&TABLE_NUMBER.to_be_bytes());
    k.extend_from_slice(&col.to_be_bytes());
    k.extend_from_slice(value);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Index value encodings (unchanged between formats): owner = kind byte + UUID, choice =
/// sign-flipped big-endian.
fn owner_bytes(n: u8) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&[n; 16]);
    v
}

fn choice_bytes(c: i32) -> [u8; 4] {
    ((c as u32) ^ 0x8000_0000).to_be_bytes()
}

#[test]
fn a_format_1_store_is_upgraded_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    // (owner, statecode) of each row; some rows have no statecode.
    let rows: Vec<(u8, Option<i32>)> = (0..30)
        .map(|i| ((i % 3) as u8, if i % 5 == 4 { None } else { Some(i % 2) }))
        .collect();
    let mut ids = Vec::new();
    {
        let s = Store::create(&p, schema(), options(1)).unwrap();
        let mut tx = s.begin();
        for (o, st) in &rows {
            let state = st.map_or(Value::Null, Value::Choice);
            ids.push(
                tx.insert(TABLE, &[("ownerid", user(*o)), ("statecode", state)])
                    .unwrap(),
            );
        }
        tx.commit().unwrap();
    }
    // Rewrite the indexes as format 1 kept them: a separate index on ownerid and on
    // statecode, the composite only for rows with both, as owner + statecode.
    {
        let db = raw_sled(&p);
        let current: Vec<_> = db.scan_prefix(b"I").keys().map(|k| k.unwrap()).collect();
        assert!(!current.is_empty());
        for k in current {
            db.remove(k).unwrap();
        }
        for ((o, st), id) in rows.iter().zip(&ids) {
            db.insert(index_key(column("ownerid"), &owner_bytes(*o), *id), &[][..])
                .unwrap();
            if let Some(st) = st {
                db.insert(
                    index_key(column("statecode"), &choice_bytes(*st), *id),
                    &[][..],
                )
                .unwrap();
                let mut both = owner_bytes(*o);
                both.extend_from_slice(&choice_bytes(*st));
                db.insert(index_key(COMPOSITE, &both, *id), &[][..])
                    .unwrap();
            }
        }
        db.insert(b"0format", &1u32.to_be_bytes()[..]).unwrap();
        db.flush().unwrap();
    }
    // Empty the write-ahead file (all zeros: no records), as a checkpoint leaves it, so the
    // open replays nothing of the new layout.
    let wal = p.join("wal");
    let len = std::fs::metadata(&wal).unwrap().len();
    std::fs::write(&wal, vec![0u8; usize::try_from(len).unwrap()]).unwrap();

    let s = Store::open(&p, options(1)).unwrap();
    let mine = |o: u8, st: Option<i32>| -> Vec<Uuid> {
        let mut v: Vec<Uuid> = rows
            .iter()
            .zip(&ids)
            .filter(|((ro, rs), _)| *ro == o && st.is_none_or(|st| *rs == Some(st)))
            .map(|(_, id)| *id)
            .collect();
        v.sort();
        v
    };
    let found = |q: &Query| -> Vec<Uuid> { s.query(q).unwrap().iter().map(|r| r.id).collect() };
    let owner_only = Query::table(TABLE).eq("ownerid", user(1));
    assert_eq!(
        s.plan(&owner_only).unwrap(),
        QueryPlan::OwnerStateIndexOwnerOnly
    );
    assert_eq!(found(&owner_only), mine(1, None));
    let active = Query::table(TABLE)
        .eq("ownerid", user(2))
        .eq("statecode", Value::Choice(0));
    assert_eq!(s.plan(&active).unwrap(), QueryPlan::OwnerStateIndex);
    assert_eq!(found(&active), mine(2, Some(0)));
    assert!(s.check().unwrap().is_ok());
    drop(s);
    // Upgraded: the new format is recorded and the old separate indexes are gone.
    let db = raw_sled(&p);
    assert_eq!(
        db.get(b"0format").unwrap().unwrap().as_ref(),
        FORMAT_VERSION.to_be_bytes()
    );
    for name in ["ownerid", "statecode"] {
        let mut prefix = vec![b'I'];
        prefix.extend_from_slice(&TABLE_NUMBER.to_be_bytes());
        prefix.extend_from_slice(&column(name).to_be_bytes());
        assert_eq!(db.scan_prefix(&prefix).count(), 0, "{name} index left over");
    }
    // Every row has its composite entry, those without a statecode too.
    let mut prefix = vec![b'I'];
    prefix.extend_from_slice(&TABLE_NUMBER.to_be_bytes());
    prefix.extend_from_slice(&COMPOSITE.to_be_bytes());
    assert_eq!(db.scan_prefix(&prefix).count(), rows.len());
}
