//! proptest: concurrent edits on 2–4 replicas, exchanged in any order with duplicates,
//! converge; state rebuilt from the log equals the materialized state; compaction never
//! loses an unacknowledged op.

// Helpers below are test code: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use fieldsync_store::{ColumnConflict, Durability, RemoteOp, Row, RowId, Store, Value, WriteError};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const ROWS: u8 = 3;

#[derive(Debug, Clone)]
enum Edit {
    Insert,
    Set(&'static str, Value),
    Delete,
}

#[derive(Debug, Clone)]
enum Action {
    /// Replica `r` edits row `row` in its own transaction.
    Edit { r: usize, row: u8, edit: Edit },
    /// Two edits in one transaction.
    Pair {
        r: usize,
        a: (u8, Edit),
        b: (u8, Edit),
    },
    /// Replica `from` sends a random subset of its log to `to`, shuffled, with duplicates.
    Sync { from: usize, to: usize, seed: u64 },
}

fn row_id(n: u8) -> RowId {
    Uuid::from_u128(0xA000 + u128::from(n))
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => Just(Edit::Insert),
        2 => "[a-c]{1,2}".prop_map(|s| Edit::Set("name", Value::Text(s))),
        2 => (0i64..3).prop_map(|i| Edit::Set("numberofemployees", Value::Integer(i))),
        1 => (1i32..=3).prop_map(|c| Edit::Set("industrycode", Value::Choice(c))),
        1 => (0u8..2).prop_map(|u| Edit::Set("ownerid", user(u))),
        1 => Just(Edit::Set("name", Value::Null)),
        1 => Just(Edit::Delete),
    ]
}

fn action(replicas: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..replicas, 0..ROWS, edit()).prop_map(|(r, row, edit)| Action::Edit { r, row, edit }),
        1 => (0..replicas, (0..ROWS, edit()), (0..ROWS, edit()))
            .prop_map(|(r, a, b)| Action::Pair { r, a, b }),
        2 => (0..replicas, 0..replicas, any::<u64>())
            .prop_map(|(from, to, seed)| Action::Sync { from, to, seed }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Action>, u64)> {
    (2usize..=4).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(action(n), 1..28),
            any::<u64>(),
        )
    })
}

fn do_edit(
    tx: &mut fieldsync_store::Transaction<'_>,
    row: u8,
    edit: &Edit,
) -> Result<(), WriteError> {
    match edit {
        Edit::Insert => tx.insert_with_id("account", row_id(row), &[("name", text("new"))]),
        Edit::Set(col, v) => tx.update("account", row_id(row), &[(col, v.clone())]),
        Edit::Delete => tx.delete("account", row_id(row)),
    }
}

/// Apply a shuffled, duplicated subset (or all) of `from`'s log to `to`.
fn send(from: &Store, to: &Store, rng: &mut rand::rngs::StdRng, all: bool) {
    let mut ops: Vec<RemoteOp> = from
        .ops_since(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.to_remote())
        .collect();
    if !all {
        ops.retain(|_| rng.gen_bool(0.6));
    }
    let dups: Vec<RemoteOp> = ops.iter().filter(|_| rng.gen_bool(0.3)).cloned().collect();
    ops.extend(dups);
    ops.shuffle(rng);
    // In a few batches, as a transport would deliver them.
    let mut rest = ops.as_slice();
    while !rest.is_empty() {
        let n = rng.gen_range(1..=rest.len());
        to.apply_remote(&rest[..n], Durability::Group).unwrap();
        rest = &rest[n..];
    }
}

type Snapshot = BTreeMap<RowId, (Option<Row>, bool, Vec<ColumnConflict>)>;

fn snapshot(s: &Store) -> Snapshot {
    (0..ROWS)
        .map(|n| {
            let id = row_id(n);
            (
                id,
                (
                    s.get("account", id).unwrap(),
                    s.is_deleted("account", id).unwrap(),
                    s.conflicts("account", id).unwrap(),
                ),
            )
        })
        .collect()
}

fn run(n: usize, actions: &[Action], seed: u64) {
    let stores: Vec<Store> = (0..n).map(|i| temp_store(i as u8 + 1)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for a in actions {
        match a {
            Action::Edit { r, row, edit } => {
                let mut tx = stores[*r].begin();
                if do_edit(&mut tx, *row, edit).is_ok() {
                    tx.commit().unwrap();
                }
            }
            Action::Pair { r, a, b } => {
                let mut tx = stores[*r].begin();
                if do_edit(&mut tx, a.0, &a.1).is_ok() && do_edit(&mut tx, b.0, &b.1).is_ok() {
                    // May still be refused if the second edit hit a row the first deleted.
                    let _ = tx.commit();
                }
            }
            Action::Sync { from, to, seed } => {
                if from != to {
                    let mut r = rand::rngs::StdRng::seed_from_u64(*seed);
                    send(&stores[*from], &stores[*to], &mut r, false);
                }
            }
        }
    }
    // Full exchange, every pair, shuffled with duplicates.
    let mut pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    pairs.shuffle(&mut rng);
    for (a, b) in &pairs {
        send(&stores[*a], &stores[*b], &mut rng, true);
    }
    // Nothing is held once everything has arrived, and every replica agrees.
    let first = snapshot(&stores[0]);
    for (i, s) in stores.iter().enumerate() {
        let status = s.status().unwrap();
        assert_eq!(status.held_changes, 0, "replica {i} still holds changes");
        assert_eq!(snapshot(s), first, "replica {i} differs from replica 0");
        // The materialized state equals the state rebuilt from the log, and real automerge
        // documents agree with it.
        let report = s.check().unwrap();
        assert!(report.is_ok(), "replica {i}: {report}");
        s.rebuild().unwrap();
        assert_eq!(snapshot(s), first, "replica {i} after rebuild");
    }

    // Compaction never loses an unacknowledged op.
    let s = &stores[0];
    let before = s.ops_since(0, usize::MAX).unwrap();
    let last = s.last_seq();
    let acked = rng.gen_range(0..=last);
    s.acknowledge(acked).unwrap();
    s.compact().unwrap();
    let after = s.ops_since(0, usize::MAX).unwrap();
    let unacked: Vec<_> = before.iter().filter(|e| e.seq > acked).cloned().collect();
    assert_eq!(after, unacked, "compaction changed the unacknowledged log");
    assert_eq!(s.last_seq(), last);
    let report = s.check().unwrap();
    assert!(report.is_ok(), "after compaction: {report}");
    assert_eq!(snapshot(s), first, "compaction changed the rows");
    // A fresh replica: the unacknowledged ops first (held if their deps were compacted),
    // then the compacted exports.
    let fresh = temp_store(9);
    let ops: Vec<RemoteOp> = after.iter().map(|e| e.to_remote()).collect();
    fresh.apply_remote(&ops, Durability::Group).unwrap();
    for n in 0..ROWS {
        if let Some(export) = s.export_row("account", row_id(n)).unwrap() {
            fresh.import_row(&export, Durability::Group).unwrap();
        }
    }
    assert_eq!(
        snapshot(&fresh),
        first,
        "fresh replica from compacted exports"
    );
    assert_eq!(fresh.status().unwrap().held_changes, 0);
    assert!(fresh.check().unwrap().is_ok());
}

proptest! {
    // 64 cases keep the suite fast; PROPTEST_CASES=2000 for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        max_shrink_iters: 500,
        ..ProptestConfig::default()
    })]

    #[test]
    fn replicas_converge((n, actions, seed) in scenario()) {
        run(n, &actions, seed);
    }
}

/// A hand-written case: three replicas write the same column concurrently, one deletes.
#[test]
fn three_way_conflict_then_delete() {
    let actions = vec![
        Action::Edit {
            r: 0,
            row: 0,
            edit: Edit::Insert,
        },
        Action::Sync {
            from: 0,
            to: 1,
            seed: 1,
        },
        Action::Sync {
            from: 0,
            to: 2,
            seed: 2,
        },
        Action::Edit {
            r: 0,
            row: 0,
            edit: Edit::Set("name", text("a")),
        },
        Action::Edit {
            r: 1,
            row: 0,
            edit: Edit::Set("name", text("b")),
        },
        Action::Edit {
            r: 2,
            row: 0,
            edit: Edit::Set("name", text("c")),
        },
        Action::Edit {
            r: 2,
            row: 1,
            edit: Edit::Insert,
        },
        Action::Edit {
            r: 1,
            row: 1,
            edit: Edit::Insert,
        },
        Action::Edit {
            r: 0,
            row: 2,
            edit: Edit::Insert,
        },
        Action::Edit {
            r: 0,
            row: 2,
            edit: Edit::Delete,
        },
    ];
    run(3, &actions, 7);
}
