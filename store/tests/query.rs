//! The query planner: which index a query uses, and that every plan returns what a scan of
//! the whole table filtered by hand returns.

// Helpers below are test code: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ops::Bound;

use common::*;
use fieldsync_store::{Order, Query, QueryPlan, RowId, Store, Value};
use proptest::prelude::*;

const TABLE: &str = "msdyn_workorder";

/// A work order as the test writes it (`None`: the column is empty).
#[derive(Debug, Clone)]
struct Model {
    owner: Option<u8>,
    state: Option<i32>,
    priority: Option<i32>,
    deleted: bool,
}

fn choice(c: Option<i32>) -> Value {
    c.map_or(Value::Null, Value::Choice)
}

fn owner(o: Option<u8>) -> Value {
    o.map_or(Value::Null, user)
}

/// Insert every model row (some written in a second transaction, so their index entries
/// move), returning the rows' ids in model order.
fn fill(s: &Store, rows: &[Model]) -> Vec<RowId> {
    let mut tx = s.begin();
    let mut ids = Vec::new();
    for (i, m) in rows.iter().enumerate() {
        // Odd rows start with other values and are updated to the model's below.
        let (o, st) = if i % 2 == 1 {
            (Some(9), Some(1))
        } else {
            (m.owner, m.state)
        };
        let id = tx
            .insert(
                TABLE,
                &[
                    ("msdyn_name", text(&format!("wo {i}"))),
                    ("ownerid", owner(o)),
                    ("statecode", choice(st)),
                    ("msdyn_priority", choice(m.priority)),
                ],
            )
            .unwrap();
        ids.push(id);
    }
    tx.commit().unwrap();
    let mut tx = s.begin();
    for (i, m) in rows.iter().enumerate() {
        if i % 2 == 1 {
            tx.update(
                TABLE,
                ids[i],
                &[("ownerid", owner(m.owner)), ("statecode", choice(m.state))],
            )
            .unwrap();
        }
        if m.deleted {
            tx.delete(TABLE, ids[i]).unwrap();
        }
    }
    tx.commit().unwrap();
    ids
}

/// A filter the test can evaluate on its model.
#[derive(Debug, Clone)]
enum Cond {
    Owner(Option<u8>),
    State(Option<i32>),
    Priority(Option<i32>),
    OwnerRange(Bound<u8>, Bound<u8>),
    PriorityRange(Bound<i32>, Bound<i32>),
}

fn within<T: Ord>(v: Option<T>, lo: &Bound<T>, hi: &Bound<T>) -> bool {
    let Some(v) = v else { return false };
    let above = match lo {
        Bound::Included(b) => v >= *b,
        Bound::Excluded(b) => v > *b,
        Bound::Unbounded => true,
    };
    let below = match hi {
        Bound::Included(b) => v <= *b,
        Bound::Excluded(b) => v < *b,
        Bound::Unbounded => true,
    };
    above && below
}

impl Cond {
    fn holds(&self, m: &Model) -> bool {
        match self {
            Cond::Owner(o) => m.owner == *o,
            Cond::State(s) => m.state == *s,
            Cond::Priority(p) => m.priority == *p,
            Cond::OwnerRange(lo, hi) => within(m.owner, lo, hi),
            Cond::PriorityRange(lo, hi) => within(m.priority, lo, hi),
        }
    }

    fn add_to(&self, q: Query) -> Query {
        match self {
            Cond::Owner(o) => q.eq("ownerid", owner(*o)),
            Cond::State(s) => q.eq("statecode", choice(*s)),
            Cond::Priority(p) => q.eq("msdyn_priority", choice(*p)),
            Cond::OwnerRange(lo, hi) => q.range("ownerid", lo.map(user), hi.map(user)),
            Cond::PriorityRange(lo, hi) => q.range(
                "msdyn_priority",
                lo.map(Value::Choice),
                hi.map(Value::Choice),
            ),
        }
    }
}

/// What the query must return, from the model: matching live rows by id (or by priority,
/// nulls first, then id), cut to the limit.
fn expected(
    rows: &[Model],
    ids: &[RowId],
    conds: &[Cond],
    order: Option<Order>,
    limit: Option<usize>,
) -> Vec<RowId> {
    let mut hits: Vec<(Option<i32>, RowId)> = rows
        .iter()
        .zip(ids)
        .filter(|(m, _)| !m.deleted && conds.iter().all(|c| c.holds(m)))
        .map(|(m, id)| (m.priority, *id))
        .collect();
    hits.sort_by(|a, b| match order {
        None => a.1.cmp(&b.1),
        Some(Order::Asc) => a.0.cmp(&b.0).then(a.1.cmp(&b.1)),
        Some(Order::Desc) => b.0.cmp(&a.0).then(a.1.cmp(&b.1)),
    });
    hits.truncate(limit.unwrap_or(usize::MAX));
    hits.into_iter().map(|(_, id)| id).collect()
}

fn query(conds: &[Cond], order: Option<Order>, limit: Option<usize>) -> Query {
    let mut q = Query::table(TABLE);
    for c in conds {
        q = c.add_to(q);
    }
    if let Some(o) = order {
        q = q.order_by("msdyn_priority", o);
    }
    if let Some(n) = limit {
        q = q.limit(n);
    }
    q
}

fn run(s: &Store, q: &Query) -> Vec<RowId> {
    s.query(q).unwrap().into_iter().map(|r| r.id).collect()
}

fn models() -> Vec<Model> {
    (0..60)
        .map(|i| Model {
            owner: match i % 5 {
                4 => None,
                n => Some((n % 3) as u8),
            },
            state: match i % 7 {
                6 => None,
                n => Some(n % 2),
            },
            priority: Some(i % 3 + 1),
            deleted: i % 11 == 10,
        })
        .collect()
}

#[test]
fn owner_queries_use_the_composite_index() {
    let s = temp_store(1);
    let rows = models();
    let ids = fill(&s, &rows);
    let cases: Vec<(Vec<Cond>, QueryPlan)> = vec![
        (
            vec![Cond::Owner(Some(1))],
            QueryPlan::OwnerStateIndexOwnerOnly,
        ),
        (
            vec![Cond::Owner(Some(1)), Cond::State(Some(0))],
            QueryPlan::OwnerStateIndex,
        ),
        // The statecode filter may come first.
        (
            vec![Cond::State(Some(1)), Cond::Owner(Some(2))],
            QueryPlan::OwnerStateIndex,
        ),
        // A row without a statecode is in the composite index under its owner.
        (
            vec![Cond::Owner(Some(0)), Cond::State(None)],
            QueryPlan::OwnerStateIndexOwnerOnly,
        ),
        // statecode alone: two values, a scan serves it.
        (vec![Cond::State(Some(0))], QueryPlan::TableScan),
        (vec![Cond::Owner(None)], QueryPlan::TableScan),
        (
            vec![Cond::State(Some(0)), Cond::Priority(Some(2))],
            QueryPlan::IndexEq {
                column: "msdyn_priority".into(),
            },
        ),
        (
            vec![Cond::OwnerRange(Bound::Excluded(0), Bound::Included(1))],
            QueryPlan::IndexRange {
                column: "ownerid".into(),
            },
        ),
    ];
    for (conds, plan) in cases {
        let q = query(&conds, None, None);
        assert_eq!(s.plan(&q).unwrap(), plan, "{conds:?}");
        let want = expected(&rows, &ids, &conds, None, None);
        assert!(!want.is_empty(), "{conds:?} finds something");
        let mut got = run(&s, &q);
        if matches!(plan, QueryPlan::IndexRange { .. }) {
            // A range scan without a sort returns rows by value.
            got.sort();
            assert_eq!(got, want, "{conds:?}");
            continue;
        }
        assert_eq!(got, want, "{conds:?}");
        // A limit stops early and still returns rows in id order.
        let q = query(&conds, None, Some(3));
        assert_eq!(
            run(&s, &q),
            expected(&rows, &ids, &conds, None, Some(3)),
            "{conds:?} limit 3"
        );
    }
    // A change of owner or statecode moves the row's composite entry.
    let mut tx = s.begin();
    tx.update(TABLE, ids[0], &[("ownerid", user(2))]).unwrap();
    tx.update(TABLE, ids[2], &[("statecode", Value::Null)])
        .unwrap();
    tx.commit().unwrap();
    let mut rows = rows;
    rows[0].owner = Some(2);
    rows[2].state = None;
    for conds in [
        vec![Cond::Owner(Some(2))],
        vec![Cond::Owner(rows[2].owner), Cond::State(None)],
        vec![Cond::Owner(rows[2].owner), Cond::State(Some(0))],
    ] {
        let q = query(&conds, None, None);
        assert_eq!(run(&s, &q), expected(&rows, &ids, &conds, None, None));
    }
    assert!(s.check().unwrap().is_ok());
}

fn bound<T: std::fmt::Debug + Clone + 'static>(
    values: impl Strategy<Value = T> + Clone + 'static,
) -> impl Strategy<Value = Bound<T>> {
    prop_oneof![
        values.clone().prop_map(Bound::Included),
        values.prop_map(Bound::Excluded),
        Just(Bound::Unbounded),
    ]
}

fn model() -> impl Strategy<Value = Model> {
    (
        prop::option::weighted(0.8, 0u8..3),
        prop::option::weighted(0.8, 0i32..2),
        prop::option::weighted(0.8, 1i32..=3),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(owner, state, priority, deleted)| Model {
            owner,
            state,
            priority,
            deleted,
        })
}

fn cond() -> impl Strategy<Value = Cond> {
    prop_oneof![
        3 => prop::option::weighted(0.9, 0u8..3).prop_map(Cond::Owner),
        3 => prop::option::weighted(0.9, 0i32..2).prop_map(Cond::State),
        1 => prop::option::weighted(0.9, 1i32..=3).prop_map(Cond::Priority),
        1 => (bound(0u8..3), bound(0u8..3)).prop_map(|(l, h)| Cond::OwnerRange(l, h)),
        1 => (bound(1i32..=3), bound(1i32..=3)).prop_map(|(l, h)| Cond::PriorityRange(l, h)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the plan, a query returns what filtering every row by hand returns, in the
    /// same order (by id, or by the sort column then id).
    #[test]
    fn every_plan_returns_what_a_scan_returns(
        rows in prop::collection::vec(model(), 0..40),
        conds in prop::collection::vec(cond(), 0..3),
        order in prop::option::of(prop_oneof![Just(Order::Asc), Just(Order::Desc)]),
        limit in prop::option::weighted(0.3, 0usize..8),
    ) {
        let s = temp_store(1);
        let ids = fill(&s, &rows);
        let q = query(&conds, order, limit);
        let plan = s.plan(&q).unwrap();
        let got = run(&s, &q);
        if order.is_none() && matches!(plan, QueryPlan::IndexRange { .. }) {
            // A range scan without a sort returns rows by value: compare as sets.
            let all = expected(&rows, &ids, &conds, None, None);
            prop_assert_eq!(got.len(), all.len().min(limit.unwrap_or(usize::MAX)));
            prop_assert!(got.iter().all(|id| all.contains(id)), "{:?}", plan);
        } else {
            prop_assert_eq!(got, expected(&rows, &ids, &conds, order, limit), "{:?}", plan);
        }
    }
}
