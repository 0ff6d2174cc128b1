//! Who may see which row: owners, hot rows, profiles and roles.
//!
//! The simulator keeps one [`World`] as the oracle (the truth the scenario defines), and hands a
//! copy to the node factory so that a hub implementation can start from the same state. A device
//! is *entitled* to a row when its profile selects the row's table, its role does not deny it,
//! and the row is either owned by the device or a hot (shared) row.

use crate::node::{AdminEvent, NodeId, RowKey};
use std::collections::{BTreeMap, BTreeSet};

/// Who owns a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// One device's user.
    Device(NodeId),
    /// Shared: every device may see it (a hot row).
    Shared,
}

/// Owners, hot rows, profiles and roles.
#[derive(Clone, Debug, Default)]
pub struct World {
    owners: BTreeMap<RowKey, Owner>,
    owned: BTreeMap<NodeId, BTreeSet<RowKey>>,
    shared: BTreeSet<RowKey>,
    profile: BTreeMap<NodeId, u64>,
    denied: BTreeMap<NodeId, u64>,
    devices: u32,
}

impl World {
    /// A world with devices 1..=devices, each selecting every table, no rows yet.
    pub fn new(devices: u32) -> World {
        World {
            devices,
            ..World::default()
        }
    }
    /// Number of devices.
    pub fn devices(&self) -> u32 {
        self.devices
    }
    /// Add (or move) a row.
    pub fn set_owner(&mut self, row: RowKey, owner: Owner) {
        match self.owners.insert(row, owner) {
            Some(Owner::Device(d)) => {
                if let Some(set) = self.owned.get_mut(&d) {
                    set.remove(&row);
                }
            }
            Some(Owner::Shared) => {
                self.shared.remove(&row);
            }
            None => {}
        }
        match owner {
            Owner::Device(d) => {
                self.owned.entry(d).or_default().insert(row);
            }
            Owner::Shared => {
                self.shared.insert(row);
            }
        }
    }
    /// The row's owner, if the row exists.
    pub fn owner(&self, row: RowKey) -> Option<Owner> {
        self.owners.get(&row).copied()
    }
    /// Tables the device's profile selects (bit mask; default all).
    pub fn profile(&self, d: NodeId) -> u64 {
        self.profile.get(&d).copied().unwrap_or(u64::MAX)
    }
    /// Tables the device's role denies (bit mask; default none).
    pub fn denied(&self, d: NodeId) -> u64 {
        self.denied.get(&d).copied().unwrap_or(0)
    }
    /// Whether the device may read rows of the table at all.
    pub fn table_visible(&self, d: NodeId, table: u32) -> bool {
        let bit = 1u64 << (table % 64);
        self.profile(d) & bit != 0 && self.denied(d) & bit == 0
    }
    /// Whether the device is entitled to the row (the hub never counts as a device).
    pub fn entitled(&self, d: NodeId, row: RowKey) -> bool {
        if d.is_hub() || !self.table_visible(d, row.table) {
            return false;
        }
        match self.owners.get(&row) {
            Some(Owner::Device(o)) => *o == d,
            Some(Owner::Shared) => true,
            None => false,
        }
    }
    /// Every row the device is entitled to, in order.
    pub fn entitled_rows(&self, d: NodeId) -> Vec<RowKey> {
        let mut v: Vec<RowKey> = self
            .owned
            .get(&d)
            .into_iter()
            .flatten()
            .chain(self.shared.iter())
            .copied()
            .filter(|r| self.table_visible(d, r.table))
            .collect();
        v.sort_unstable();
        v
    }
    /// Rows the device owns (whatever its profile).
    pub fn owned_rows(&self, d: NodeId) -> impl Iterator<Item = RowKey> + '_ {
        self.owned.get(&d).into_iter().flatten().copied()
    }
    /// Shared (hot) rows.
    pub fn shared_rows(&self) -> impl Iterator<Item = RowKey> + '_ {
        self.shared.iter().copied()
    }
    /// Every row, in order.
    pub fn all_rows(&self) -> impl Iterator<Item = (RowKey, Owner)> + '_ {
        self.owners.iter().map(|(r, o)| (*r, *o))
    }
    /// Apply an admin event.
    pub fn apply(&mut self, ev: &AdminEvent) {
        match ev {
            AdminEvent::Reassign { row, to } => self.set_owner(*row, Owner::Device(*to)),
            AdminEvent::SetProfile { device, tables } => {
                self.profile.insert(*device, *tables);
            }
            AdminEvent::SetRole { device, denied } => {
                self.denied.insert(*device, *denied);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entitlement_follows_owner_profile_and_role() {
        let mut w = World::new(2);
        let r = RowKey { table: 1, id: 7 };
        let h = RowKey { table: 0, id: 8 };
        w.set_owner(r, Owner::Device(NodeId(1)));
        w.set_owner(h, Owner::Shared);
        assert!(w.entitled(NodeId(1), r));
        assert!(!w.entitled(NodeId(2), r));
        assert!(w.entitled(NodeId(2), h));
        assert!(!w.entitled(NodeId(0), h));
        w.apply(&AdminEvent::Reassign {
            row: r,
            to: NodeId(2),
        });
        assert!(w.entitled(NodeId(2), r) && !w.entitled(NodeId(1), r));
        w.apply(&AdminEvent::SetRole {
            device: NodeId(2),
            denied: 0b10,
        });
        assert!(!w.entitled(NodeId(2), r) && w.entitled(NodeId(2), h));
        w.apply(&AdminEvent::SetProfile {
            device: NodeId(2),
            tables: 0b10,
        });
        assert!(!w.entitled(NodeId(2), h));
        assert_eq!(w.entitled_rows(NodeId(1)), vec![h]);
    }
}
