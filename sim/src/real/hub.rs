//! The hub's storage: the real [`Store`] behind the protocol's [`HubStorage`] trait, with a
//! per-device change feed.
//!
//! The simulator's minimal adapter, used until `replication::replica::HubReplica` lands (the
//! hub driver in [`super`] is generic over [`SimHubStorage`]). Row content lives in the hub's
//! store: every accepted push is `apply_remote`d durably, office edits and owner changes are
//! real transactions (`ownerid` is written). The feed that `pull` reads is an index kept next
//! to it: one entry per change (and per access change of a row), positions are cursors, and
//! who may see a row at a position is answered from the owner, profile and role history.
//! That index and the environment (owners, profiles, roles: Dataverse's state) are kept in
//! memory and survive a hub crash — the store is reopened from its directory, the index is
//! what a real hub keeps in the same durable commit as the row.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use fieldsync_replication::proto::{
    BatchLimits, BlobSlice, ConflictPolicy, Cursor, DeviceId, HubStorage, Millis, Principal,
    PullChunk, PushOp, PushOutcome, Refusal, RowChange, RowDoc, StorageError,
};
use fieldsync_store::{ActorId, Durability, RemoteOp, Store, StoreOptions, Value};

use super::device::{open_store, store_options};
use super::{
    commit_edit, device_id, digest_row, row_id, row_key, user_id, RealError, SharedRegistry,
};
use crate::node::{AdminEvent, EditKind, NodeEvent, NodeId, OpId, RowKey};
use crate::simple::PlantedBug;
use crate::world::{Owner, World};

/// What a simulated hub's storage offers beyond [`HubStorage`].
pub trait SimHubStorage: HubStorage {
    /// Commit an office user's edit; the tables that changed (for `handle_changes`).
    fn edit(
        &mut self,
        now: u64,
        op: OpId,
        row: RowKey,
        kind: EditKind,
    ) -> Result<Option<String>, RealError>;
    /// Apply an administrative change; the tables whose feeds changed.
    fn admin(&mut self, now: u64, event: &AdminEvent) -> Result<Vec<String>, RealError>;
    /// Visit every live row with its digest.
    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64));
    /// The digest of one row.
    fn row_digest(&self, row: RowKey) -> Option<u64>;
    /// Whether the hub holds the op.
    fn has_op(&self, op: OpId) -> bool;
    /// Take the events the storage produced.
    fn drain_events(&mut self, out: &mut Vec<NodeEvent>);
    /// Set the clock.
    fn set_now(&mut self, now: u64);
    /// The process dies.
    fn crash(&mut self);
    /// Reopen from what was durable.
    fn restart(&mut self) -> Result<(), RealError>;
}

#[derive(Debug, Clone)]
enum Entry {
    /// A change to a row (author: the device that pushed it; `None`: the hub).
    Change {
        row: RowKey,
        change: Vec<u8>,
        author: Option<NodeId>,
    },
    /// Who may see the row changed for this device (profile or role change).
    Access { row: RowKey },
}

impl Entry {
    fn row(&self) -> RowKey {
        match self {
            Entry::Change { row, .. } | Entry::Access { row } => *row,
        }
    }
}

/// The feed index and the environment's history.
#[derive(Debug, Default)]
struct Feed {
    /// Position p is `entries[p - 1]`.
    entries: Vec<Entry>,
    /// Each row's owner from a position on.
    owner: BTreeMap<RowKey, Vec<(u64, Owner)>>,
    /// Each device's selected tables from a position on.
    profile: BTreeMap<NodeId, Vec<(u64, u64)>>,
    /// Each device's denied tables from a position on.
    denied: BTreeMap<NodeId, Vec<(u64, u64)>>,
    /// Positions of the entries that concern a device, per (device, table).
    index: BTreeMap<(NodeId, u32), Vec<u64>>,
    /// Positions of the changes to shared rows, per table.
    shared: BTreeMap<u32, Vec<u64>>,
    /// Every row, per table.
    rows: BTreeMap<u32, BTreeSet<RowKey>>,
}

fn at<T: Copy>(hist: Option<&Vec<(u64, T)>>, pos: u64) -> Option<T> {
    let h = hist?;
    let i = h.partition_point(|(p, _)| *p <= pos);
    if i == 0 {
        None
    } else {
        h.get(i - 1).map(|(_, v)| *v)
    }
}

impl Feed {
    fn pos(&self) -> u64 {
        self.entries.len() as u64
    }

    fn owner_at(&self, row: RowKey, pos: u64) -> Option<Owner> {
        at(self.owner.get(&row), pos)
    }

    fn member(&self, d: NodeId, row: RowKey, pos: u64) -> bool {
        let bit = 1u64 << (row.table % 64);
        let profile = at(self.profile.get(&d), pos).unwrap_or(u64::MAX);
        let denied = at(self.denied.get(&d), pos).unwrap_or(0);
        if profile & bit == 0 || denied & bit != 0 {
            return false;
        }
        match self.owner_at(row, pos) {
            Some(Owner::Device(o)) => o == d,
            Some(Owner::Shared) => true,
            None => false,
        }
    }

    fn push_index(&mut self, d: NodeId, table: u32, pos: u64) {
        let v = self.index.entry((d, table)).or_default();
        if v.last() != Some(&pos) {
            v.push(pos);
        }
    }

    /// Append a change: indexed for the row's owner (or every device if shared) and author.
    fn append_change(&mut self, row: RowKey, change: Vec<u8>, author: Option<NodeId>) -> u64 {
        self.entries.push(Entry::Change {
            row,
            change,
            author,
        });
        let pos = self.pos();
        match self.owner_at(row, pos) {
            Some(Owner::Device(o)) => self.push_index(o, row.table, pos),
            Some(Owner::Shared) => self.shared.entry(row.table).or_default().push(pos),
            None => {}
        }
        if let Some(a) = author {
            self.push_index(a, row.table, pos);
        }
        pos
    }

    fn set_owner(&mut self, row: RowKey, pos: u64, owner: Owner) {
        self.owner.entry(row).or_default().push((pos, owner));
        self.rows.entry(row.table).or_default().insert(row);
    }
}

/// The hub's real store and its feed.
#[derive(Debug)]
pub struct StoreHub {
    dir: tempfile::TempDir,
    options: StoreOptions,
    clock: Arc<AtomicI64>,
    store: Option<Store>,
    tables: Vec<String>,
    devices: BTreeMap<DeviceId, NodeId>,
    feed: Feed,
    known: BTreeSet<OpId>,
    registry: SharedRegistry,
    events: Vec<NodeEvent>,
    bug: Option<PlantedBug>,
    setup_rows: u64,
}

fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

fn owner_value(d: NodeId) -> Value {
    Value::Owner(fieldsync_store::OwnerRef {
        kind: fieldsync_store::OwnerKind::User,
        id: user_id(d),
    })
}

impl StoreHub {
    /// Create the hub's store under `base` and every initial row of `world` (one transaction).
    pub fn create(
        base: &std::path::Path,
        schema: fieldsync_store::Schema,
        actor: ActorId,
        tables: Vec<String>,
        world: &World,
        registry: SharedRegistry,
        bug: Option<PlantedBug>,
    ) -> Result<StoreHub, RealError> {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-sim-hub")
            .tempdir_in(base)
            .map_err(|e| RealError::Io(e.to_string()))?;
        let clock = Arc::new(AtomicI64::new(crate::node::SIM_EPOCH_MS as i64));
        let options = store_options(actor, &clock);
        let store = open_store(dir.path(), Some(schema), &options)?;
        let mut feed = Feed::default();
        let devices = (1..=world.devices())
            .map(|i| (device_id(NodeId(i)), NodeId(i)))
            .collect();
        for i in 1..=world.devices() {
            let d = NodeId(i);
            feed.profile.insert(d, vec![(0, world.profile(d))]);
            feed.denied.insert(d, vec![(0, world.denied(d))]);
        }
        {
            let mut tx = store.begin();
            let mut count = 0usize;
            for (row, owner) in world.all_rows() {
                let Some(table) = tables.get(row.table as usize) else {
                    continue;
                };
                let mut values = vec![("c0", Value::Integer(0))];
                if let Owner::Device(d) = owner {
                    values.push(("ownerid", owner_value(d)));
                }
                tx.insert_with_id(table, row_id(row), &values)
                    .map_err(|e| RealError::Store(e.to_string()))?;
                count += 1;
            }
            if count > 0 {
                tx.commit().map_err(|e| RealError::Store(e.to_string()))?;
            }
        }
        for e in store
            .ops_since(0, usize::MAX)
            .map_err(|e| RealError::Store(e.to_string()))?
        {
            let Some(row) = row_key(e.row) else { continue };
            let owner = world.owner(row).unwrap_or(Owner::Shared);
            feed.set_owner(row, feed.pos() + 1, owner);
            feed.append_change(row, e.change, None);
        }
        Ok(StoreHub {
            dir,
            options,
            clock,
            store: Some(store),
            tables,
            devices,
            known: BTreeSet::new(),
            registry,
            events: Vec::new(),
            setup_rows: feed.pos(),
            feed,
            bug,
        })
    }

    /// The hub's store (`None` while the hub is down).
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// How many rows the setup created (the first log entries of the hub's store).
    pub fn setup_rows(&self) -> u64 {
        self.setup_rows
    }

    /// The feed position after setup (every device's initial cursor).
    pub fn position(&self) -> u64 {
        self.feed.pos()
    }

    /// The initial changes of the rows a device starts with (its initial sync).
    pub fn initial_ops(&self, rows: &[RowKey]) -> Vec<RemoteOp> {
        let wanted: BTreeSet<RowKey> = rows.iter().copied().collect();
        self.feed
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Change { row, change, .. } if wanted.contains(row) => {
                    let table = self.tables.get(row.table as usize)?;
                    Some(RemoteOp {
                        table: table.clone(),
                        row: row_id(*row),
                        change: change.clone(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    fn store_ref(&self) -> Result<&Store, StorageError> {
        self.store
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("the hub is down".into()))
    }

    fn table_index(&self, table: &str) -> Option<u32> {
        self.tables
            .iter()
            .position(|t| t == table)
            .and_then(|i| u32::try_from(i).ok())
    }

    fn last_change(&self) -> Result<(u64, [u8; 32], Vec<u8>), RealError> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| RealError::Store("the hub is down".into()))?;
        let seq = store.last_seq();
        let e = store
            .ops_since(seq.saturating_sub(1), 1)
            .map_err(|e| RealError::Store(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| RealError::Store("the commit wrote no log entry".into()))?;
        Ok((e.seq, e.hash, e.change))
    }
}

impl HubStorage for StoreHub {
    fn authenticate(
        &mut self,
        device: DeviceId,
        token: &[u8],
        app: &str,
    ) -> Result<Result<Principal, Refusal>, StorageError> {
        match self.devices.get(&device) {
            Some(d) if token == device.0.as_bytes() => Ok(Ok(Principal {
                device,
                user: user_id(*d),
                app: app.to_string(),
            })),
            _ => Ok(Err(Refusal {
                code: fieldsync_replication::proto::CloseCode::UNAUTHORIZED,
                message: "unknown device".into(),
            })),
        }
    }

    fn apply_push(
        &mut self,
        _now: Millis,
        who: &Principal,
        _policy: ConflictPolicy,
        op: &PushOp,
    ) -> Result<PushOutcome, StorageError> {
        let Some(&d) = self.devices.get(&who.device) else {
            return Ok(PushOutcome::Rejected {
                operation: fieldsync_replication::proto::Operation::Write,
                kind: fieldsync_replication::proto::RejectionKind::Permission,
                message: "unknown device".into(),
                authoritative: None,
            });
        };
        let remote = RemoteOp {
            table: op.table.clone(),
            row: op.row,
            change: op.change.clone(),
        };
        let outcome = self
            .store_ref()?
            .apply_remote(&[remote], Durability::Immediate)
            .map_err(unavailable)?;
        if outcome.applied + outcome.held == 0 {
            return Ok(PushOutcome::Accepted);
        }
        let Some(row) = row_key(op.row) else {
            return Ok(PushOutcome::Accepted);
        };
        if self.feed.owner_at(row, self.feed.pos()).is_none() {
            // A row the device created: it owns it.
            let pos = self.feed.pos() + 1;
            self.feed.set_owner(row, pos, Owner::Device(d));
        }
        self.feed.append_change(row, op.change.clone(), Some(d));
        if let Ok(c) = automerge::Change::try_from(op.change.as_slice()) {
            if let Some((id, r)) = self.registry.borrow().op_of(&c.hash().0) {
                if self.known.insert(id) {
                    self.events.push(NodeEvent::Applied { op: id, row: r });
                }
            }
        }
        Ok(PushOutcome::Accepted)
    }

    fn pull(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError> {
        let end = self.feed.pos();
        let (Some(&d), Some(t)) = (self.devices.get(&who.device), self.table_index(table)) else {
            return Ok(PullChunk {
                cursor: Cursor(after.0.max(end)),
                ..PullChunk::default()
            });
        };
        let start = after.0.min(end);
        let empty = Vec::new();
        let mine = self.feed.index.get(&(d, t)).unwrap_or(&empty);
        let shared = self.feed.shared.get(&t).unwrap_or(&empty);
        let mut a = mine.partition_point(|p| *p <= start);
        let mut b = shared.partition_point(|p| *p <= start);
        let mut positions: Vec<u64> = Vec::new();
        let mut bytes = 0usize;
        let max_items = limits.max_items.max(1);
        let mut more = false;
        loop {
            let next = match (mine.get(a), shared.get(b)) {
                (Some(x), Some(y)) if x == y => {
                    b += 1;
                    a += 1;
                    *x
                }
                (Some(x), Some(y)) if x < y => {
                    a += 1;
                    *x
                }
                (_, Some(y)) => {
                    b += 1;
                    *y
                }
                (Some(x), None) => {
                    a += 1;
                    *x
                }
                (None, None) => break,
            };
            if positions.len() >= max_items || (!positions.is_empty() && bytes >= limits.max_bytes)
            {
                more = true;
                break;
            }
            if let Some(Entry::Change { change, .. }) = self.feed.entries.get(next as usize - 1) {
                bytes += change.len();
            }
            positions.push(next);
        }
        let cut = if more {
            positions.last().copied().unwrap_or(end)
        } else {
            end
        };
        // The rows touched, in order of first touch.
        let mut order: Vec<RowKey> = Vec::new();
        let mut by_row: BTreeMap<RowKey, Vec<u64>> = BTreeMap::new();
        for p in &positions {
            let Some(e) = self.feed.entries.get(*p as usize - 1) else {
                continue;
            };
            let row = e.row();
            by_row
                .entry(row)
                .or_insert_with(|| {
                    order.push(row);
                    Vec::new()
                })
                .push(*p);
        }
        let mut chunk = PullChunk {
            cursor: Cursor(cut),
            more,
            ..PullChunk::default()
        };
        let store = self.store_ref()?;
        for row in order {
            let s = self.feed.member(d, row, start);
            let e = self.feed.member(d, row, cut);
            let ps = by_row.get(&row).map(Vec::as_slice).unwrap_or(&[]);
            match (s, e) {
                (true, true) => {
                    for p in ps {
                        if let Some(Entry::Change { change, .. }) =
                            self.feed.entries.get(*p as usize - 1)
                        {
                            chunk.ops.push(RowChange {
                                row: row_id(row),
                                change: change.clone(),
                            });
                        }
                    }
                }
                (false, true) => {
                    if let Some(x) = store.export_row(table, row_id(row)).map_err(unavailable)? {
                        chunk.entering.push(RowDoc {
                            row: row_id(row),
                            doc: x.doc,
                        });
                    }
                }
                (true, false) => {
                    let reassigned = self.feed.owner_at(row, start) != self.feed.owner_at(row, cut);
                    if !(reassigned && self.bug == Some(PlantedBug::HubForgetsEviction)) {
                        chunk.leaving.push(row_id(row));
                    }
                }
                (false, false) => {
                    let wrote = ps.iter().any(|p| {
                        matches!(
                            self.feed.entries.get(*p as usize - 1),
                            Some(Entry::Change { author: Some(a), .. }) if *a == d
                        )
                    });
                    if wrote {
                        chunk.leaving.push(row_id(row));
                    }
                }
            }
        }
        Ok(chunk)
    }

    fn blob_chunk(
        &mut self,
        _who: &Principal,
        _sha256: &[u8; 32],
        _offset: u64,
        _max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        Ok(None)
    }
}

impl SimHubStorage for StoreHub {
    fn edit(
        &mut self,
        now: u64,
        op: OpId,
        row: RowKey,
        kind: EditKind,
    ) -> Result<Option<String>, RealError> {
        self.set_now(now);
        let Some(table) = self.tables.get(row.table as usize).cloned() else {
            return Ok(None);
        };
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| RealError::Store("the hub is down".into()))?;
        if commit_edit(store, &table, row, kind)?.is_none() {
            return Ok(None);
        }
        let (_, hash, change) = self.last_change()?;
        self.registry.borrow_mut().insert(hash, op, row);
        self.known.insert(op);
        if self.feed.owner_at(row, self.feed.pos()).is_none() {
            let pos = self.feed.pos() + 1;
            self.feed.set_owner(row, pos, Owner::Shared);
        }
        self.feed.append_change(row, change, None);
        Ok(Some(table))
    }

    fn admin(&mut self, now: u64, event: &AdminEvent) -> Result<Vec<String>, RealError> {
        self.set_now(now);
        match event {
            AdminEvent::Reassign { row, to } => {
                let Some(table) = self.tables.get(row.table as usize).cloned() else {
                    return Ok(Vec::new());
                };
                let store = self
                    .store
                    .as_ref()
                    .ok_or_else(|| RealError::Store("the hub is down".into()))?;
                let mut tx = store.begin();
                match tx.update(&table, row_id(*row), &[("ownerid", owner_value(*to))]) {
                    Ok(()) => {}
                    Err(_) => return Ok(Vec::new()),
                }
                tx.commit().map_err(|e| RealError::Store(e.to_string()))?;
                let (_, _, change) = self.last_change()?;
                let before = self.feed.owner_at(*row, self.feed.pos());
                let pos = self.feed.pos() + 1;
                self.feed.set_owner(*row, pos, Owner::Device(*to));
                self.feed.append_change(*row, change, None);
                if let Some(Owner::Device(o)) = before {
                    self.feed.push_index(o, row.table, pos);
                }
                Ok(vec![table])
            }
            AdminEvent::SetProfile { device, tables } => {
                let before = at(self.feed.profile.get(device), self.feed.pos()).unwrap_or(u64::MAX);
                let pos = self.feed.pos() + 1;
                self.feed
                    .profile
                    .entry(*device)
                    .or_default()
                    .push((pos, *tables));
                Ok(self.access_changed(*device, before ^ *tables, pos))
            }
            AdminEvent::SetRole { device, denied } => {
                let before = at(self.feed.denied.get(device), self.feed.pos()).unwrap_or(0);
                let pos = self.feed.pos() + 1;
                self.feed
                    .denied
                    .entry(*device)
                    .or_default()
                    .push((pos, *denied));
                Ok(self.access_changed(*device, before ^ *denied, pos))
            }
        }
    }

    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64)) {
        let Some(store) = &self.store else { return };
        for t in &self.tables {
            let Ok(rows) = store.scan(t) else { continue };
            for r in rows.flatten() {
                if let Some(k) = row_key(r.id) {
                    f(k, digest_row(&r));
                }
            }
        }
    }

    fn row_digest(&self, row: RowKey) -> Option<u64> {
        let store = self.store.as_ref()?;
        let table = self.tables.get(row.table as usize)?;
        store
            .get(table, row_id(row))
            .ok()
            .flatten()
            .map(|r| digest_row(&r))
    }

    fn has_op(&self, op: OpId) -> bool {
        self.known.contains(&op)
    }

    fn drain_events(&mut self, out: &mut Vec<NodeEvent>) {
        out.append(&mut self.events);
    }

    fn set_now(&mut self, now: u64) {
        self.clock
            .store(i64::try_from(now).unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    fn crash(&mut self) {
        self.store = None;
        self.events.clear();
    }

    fn restart(&mut self) -> Result<(), RealError> {
        let store = open_store(self.dir.path(), None, &self.options)?;
        self.store = Some(store);
        Ok(())
    }
}

impl StoreHub {
    /// A device's access to the tables in `mask` changed at `pos`: one access entry per row
    /// it may hold there (so its next pull sends rows entering and leaving).
    fn access_changed(&mut self, d: NodeId, mask: u64, pos: u64) -> Vec<String> {
        let mut changed = Vec::new();
        let tables: Vec<u32> = self.feed.rows.keys().copied().collect();
        let mut first = true;
        for t in tables {
            if mask & (1u64 << (t % 64)) == 0 {
                continue;
            }
            let rows: Vec<RowKey> = self
                .feed
                .rows
                .get(&t)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for row in rows {
                let concerned = match self.feed.owner_at(row, pos) {
                    Some(Owner::Device(o)) => o == d,
                    Some(Owner::Shared) => true,
                    None => false,
                };
                if !concerned {
                    continue;
                }
                first = false;
                self.feed.entries.push(Entry::Access { row });
                let p = self.feed.pos();
                self.feed.push_index(d, t, p);
            }
            if let Some(name) = self.tables.get(t as usize) {
                changed.push(name.clone());
            }
        }
        if first {
            // Nothing to index: still take the position so the history entry is not shared
            // with a later change.
            self.feed.entries.push(Entry::Access {
                row: RowKey {
                    table: u32::MAX,
                    id: 0,
                },
            });
        }
        changed
    }
}
