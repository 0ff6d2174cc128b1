//! Invariant checker state, fed by node events and [`Observe`](crate::node::Observe) hooks.
//!
//! The checks are generic: they only use what any node implementation reports. See
//! [`Invariant`](crate::metrics::Invariant) for what each one means.

use crate::metrics::{Invariant, Violation};
use crate::node::{NodeId, Observe, OpId, RowKey};
use std::collections::{BTreeMap, BTreeSet};

/// A violation before the engine attaches the steps that led to it.
#[derive(Clone, Debug)]
pub(crate) struct Finding {
    pub invariant: Invariant,
    pub node: Option<NodeId>,
    pub row: Option<RowKey>,
    pub op: Option<OpId>,
    pub detail: String,
}

/// What the checker remembers during a run.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    /// Per node, the ops it reported applied, by row.
    applied: Vec<BTreeMap<RowKey, BTreeSet<OpId>>>,
    cursors: Vec<BTreeMap<u32, u64>>,
    /// Device ops the hub acknowledged.
    pub acked: BTreeSet<OpId>,
    /// Device ops the hub rejected.
    pub rejected: BTreeSet<OpId>,
    /// Device ops committed durably, with their origin.
    pub committed: BTreeMap<OpId, NodeId>,
    row_revoked: BTreeMap<(NodeId, RowKey), u64>,
    table_revoked: BTreeMap<(NodeId, u32), u64>,
    row_granted: BTreeMap<(NodeId, RowKey), u64>,
    table_granted: BTreeMap<(NodeId, u32), u64>,
    leaks: BTreeSet<(NodeId, RowKey)>,
    pub violations: Vec<Violation>,
    pub count: u64,
}

impl Checker {
    pub fn new(nodes: usize) -> Checker {
        Checker {
            applied: vec![BTreeMap::new(); nodes],
            cursors: vec![BTreeMap::new(); nodes],
            ..Checker::default()
        }
    }

    /// A node reports an op applied: it must be the first time.
    pub fn on_applied(&mut self, node: NodeId, op: OpId, row: RowKey) -> Option<Finding> {
        let rows = self.applied.get_mut(node.index())?;
        if rows.entry(row).or_default().insert(op) {
            return None;
        }
        Some(Finding {
            invariant: Invariant::NoOpAppliedTwice,
            node: Some(node),
            row: Some(row),
            op: Some(op),
            detail: format!("{node} reported {op} on {row} applied a second time"),
        })
    }

    /// The row left the node (evicted, or rolled back to the hub's copy): its ops may be
    /// applied there again.
    pub fn on_row_gone(&mut self, node: NodeId, row: RowKey) {
        if let Some(rows) = self.applied.get_mut(node.index()) {
            rows.remove(&row);
        }
    }

    /// Forget the ops a node no longer holds (after a crash, and again after its restart).
    fn retain_held(&mut self, node: NodeId, obs: &dyn Observe) {
        if let Some(rows) = self.applied.get_mut(node.index()) {
            for ops in rows.values_mut() {
                ops.retain(|op| obs.has_op(*op));
            }
            rows.retain(|_, ops| !ops.is_empty());
        }
    }

    /// After every step of a node: its cursors must not move back.
    pub fn check_cursor(&mut self, node: NodeId, obs: &dyn Observe) -> Option<Finding> {
        let slot = self.cursors.get_mut(node.index())?;
        let mut back = None;
        obs.for_each_cursor(&mut |key, now| {
            if let Some(before) = slot.insert(key, now) {
                if now < before && back.is_none() {
                    back = Some((key, before, now));
                }
            }
        });
        let (key, b, n) = back?;
        Some(Finding {
            invariant: Invariant::CursorsForward,
            node: Some(node),
            row: None,
            op: None,
            detail: format!("{node}'s cursor {key} moved back from {b} to {n}"),
        })
    }

    /// A node crashed: forget what it lost (its durable state is the new baseline).
    pub fn on_crash(&mut self, node: NodeId, obs: &dyn Observe) {
        self.retain_held(node, obs);
        if let Some(c) = self.cursors.get_mut(node.index()) {
            c.clear();
            obs.for_each_cursor(&mut |key, pos| {
                c.insert(key, pos);
            });
        }
    }

    /// A node restarted: ops it reported applied and no longer holds are forgotten (a
    /// re-delivery applies them again).
    pub fn on_restart(&mut self, node: NodeId, obs: &dyn Observe) {
        self.retain_held(node, obs);
    }

    /// Every acknowledged op must be on the hub.
    pub fn check_acked_on_hub(&self, hub: &dyn Observe, limit: usize) -> Vec<Finding> {
        self.acked
            .iter()
            .filter(|op| !hub.has_op(**op))
            .take(limit)
            .map(|op| Finding {
                invariant: Invariant::NoAckedOpLost,
                node: Some(crate::node::HUB),
                row: None,
                op: Some(*op),
                detail: format!("the hub acknowledged {op} but no longer has it"),
            })
            .collect()
    }

    /// Whether this leak is new (each one is reported once).
    pub fn first_leak(&mut self, d: NodeId, row: RowKey) -> bool {
        self.leaks.insert((d, row))
    }

    pub fn revoke_row(&mut self, d: NodeId, row: RowKey, now: u64) {
        self.row_revoked.insert((d, row), now);
    }
    pub fn grant_row(&mut self, d: NodeId, row: RowKey, now: u64) {
        self.row_granted.insert((d, row), now);
    }
    pub fn revoke_table(&mut self, d: NodeId, table: u32, now: u64) {
        self.table_revoked.insert((d, table), now);
    }
    pub fn grant_table(&mut self, d: NodeId, table: u32, now: u64) {
        self.table_granted.insert((d, table), now);
    }

    /// When the device last lost the right to see the row (0 if never explicitly).
    pub fn revoked_at(&self, d: NodeId, row: RowKey) -> Option<u64> {
        let a = self.row_revoked.get(&(d, row)).copied();
        let b = self.table_revoked.get(&(d, row.table)).copied();
        a.max(b)
    }

    /// When the device last gained the right to see the row (0: from the start).
    pub fn granted_at(&self, d: NodeId, row: RowKey) -> u64 {
        let a = self.row_granted.get(&(d, row)).copied().unwrap_or(0);
        let b = self
            .table_granted
            .get(&(d, row.table))
            .copied()
            .unwrap_or(0);
        a.max(b)
    }
}
