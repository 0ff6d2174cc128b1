//! A device's storage: the real [`Store`] behind the protocol's [`DeviceStorage`] trait.
//!
//! This is the simulator's minimal adapter, used until `replication::replica::DeviceReplica`
//! lands (the node driver in [`super`] is generic over [`SimDeviceStorage`], so the replica
//! drops in). Rows, the op log, remote apply, import, eviction and acknowledgement are the
//! store's own; the cursors and the evictions waiting for an acknowledgement are kept beside
//! the store (a copy taken when each call returns is what survives a crash), where the replica
//! keeps them in the store's aux space.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use fieldsync_replication::proto::{
    BatchLimits, BlobSlice, Cursor, DeviceStorage, Millis, PushOp, Rejection, RowChange, RowDoc,
    StorageError,
};
use fieldsync_store::{
    ActorId, Clock, Durability, RemoteOp, RowExport, Store, StoreError, StoreOptions,
};

use super::{digest_row, row_id, row_key, RealError, Registry, SharedRegistry};
use crate::node::{EditKind, NodeEvent, OpId, RowKey};
use fieldsync_replication::replica::DeviceReplica;

/// The adapter's own state: per-table cursors and last syncs, and evictions that wait for
/// the hub's acknowledgement of local ops on the row.
#[derive(Debug, Default, Clone)]
struct SideState {
    cursors: BTreeMap<String, u64>,
    synced_at: BTreeMap<String, u64>,
    evict_waiting: BTreeSet<(String, uuid::Uuid)>,
}

/// What a simulated device's storage offers beyond [`DeviceStorage`]: edits, observation,
/// crash and restart.
pub trait SimDeviceStorage: DeviceStorage {
    /// Commit a user's edit; `Ok(None)` when the store refuses it (unknown or deleted row).
    fn edit(&mut self, now: u64, op: OpId, row: RowKey, kind: EditKind) -> Result<bool, RealError>;
    /// Visit every live row with the digest of its materialized values.
    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64));
    /// Visit every live row.
    fn for_each_row_key(&self, f: &mut dyn FnMut(RowKey));
    /// Visit every live row of table `table`.
    fn for_each_row_key_of(&self, table: u32, f: &mut dyn FnMut(RowKey));
    /// The digest of one row.
    fn row_digest(&self, row: RowKey) -> Option<u64>;
    /// Whether this device's state includes the op (its own, or applied here).
    fn has_op(&self, op: OpId) -> bool;
    /// Local ops not yet acknowledged.
    fn pending_count(&self) -> usize;
    /// Whether a local unacknowledged op touches the row.
    fn has_pending_on(&self, row: RowKey) -> bool;
    /// The pull cursor of each table, by table index.
    fn for_each_cursor(&self, f: &mut dyn FnMut(u32, u64));
    /// Take the events the storage produced (ops applied, acknowledged, rejected; evictions).
    fn drain_events(&mut self, out: &mut Vec<NodeEvent>);
    /// Set the clock the store stamps changes with (local ms since the epoch).
    fn set_now(&mut self, now: u64);
    /// The process dies: drop every handle without flushing.
    fn crash(&mut self);
    /// Reopen from what was durable.
    fn restart(&mut self) -> Result<(), RealError>;
}

/// The real store of one device (a temporary store, in memory).
#[derive(Debug)]
pub struct StoreDevice {
    clock: Arc<AtomicI64>,
    store: Option<Store>,
    /// The store's handle while the device is down: a restart reopens its data.
    crashed: Option<Store>,
    tables: Vec<String>,
    /// The `ownerid` of rows this device's user creates.
    owner: fieldsync_store::Value,
    side: SideState,
    /// `side` as of the last storage call that returned: what a crash leaves.
    durable_side: SideState,
    /// Unacknowledged local log entries: seq → (row, change hash).
    pending: BTreeMap<u64, (RowKey, [u8; 32])>,
    pending_rows: BTreeMap<RowKey, usize>,
    last_local: u64,
    known: BTreeSet<OpId>,
    registry: SharedRegistry,
    events: Vec<NodeEvent>,
    /// Delegate the protocol's storage calls to the replication crate's `DeviceReplica`
    /// (`false`: this module's minimal adapter).
    replica: bool,
    /// The replica compacts the log once this many acknowledged entries pile up.
    compact_backlog: u64,
    /// The `DeviceReplica` over `store`, one per store opening as a device process keeps
    /// one (it remembers which spans of the log hold no own entry): `None` while down.
    device_replica: Option<DeviceReplica>,
}

/// The replica the protocol's storage calls go through (see [`StoreDevice::replica`]).
fn replica_over(store: &Store) -> DeviceReplica {
    DeviceReplica::new(store.clone()).with_compact_backlog(u64::MAX)
}

fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

impl StoreDevice {
    /// Create the device's store.
    pub fn create(
        schema: fieldsync_store::Schema,
        actor: ActorId,
        tables: Vec<String>,
        owner: fieldsync_store::Value,
        registry: SharedRegistry,
    ) -> Result<StoreDevice, RealError> {
        let clock = Arc::new(AtomicI64::new(0));
        let options = store_options(actor, &clock);
        // In memory: a simulated crash loses the session, not what `commit` returned (as the
        // store's write-ahead file promises for a process crash); thousands fit in memory.
        let store =
            Store::temporary(schema, options).map_err(|e| RealError::Store(e.to_string()))?;
        Ok(StoreDevice {
            clock,
            device_replica: Some(replica_over(&store)),
            store: Some(store),
            crashed: None,
            tables,
            owner,
            side: SideState::default(),
            durable_side: SideState::default(),
            pending: BTreeMap::new(),
            pending_rows: BTreeMap::new(),
            last_local: 0,
            known: BTreeSet::new(),
            registry,
            events: Vec::new(),
            replica: false,
            compact_backlog: fieldsync_replication::replica::DEFAULT_COMPACT_BACKLOG,
        })
    }

    /// Run the protocol's storage calls through `replication::replica::DeviceReplica` over
    /// the same store (this adapter then only observes: events, pending ops, rows).
    pub fn use_replica(&mut self, on: bool) {
        self.replica = on;
    }

    /// Compact the store's log once `entries` acknowledged entries pile up (replica mode).
    pub fn set_compact_backlog(&mut self, entries: u64) {
        self.compact_backlog = entries;
    }

    /// The replica never compacts inside a call: the simulator does it right after
    /// ([`Self::compact_if_due`]), once it has read the log entries the call wrote. A
    /// compaction inside the call would fold them away unseen, and a change the store took
    /// twice would then go unreported.
    fn replica(&self) -> Result<DeviceReplica, StorageError> {
        self.store_ref()?;
        self.device_replica
            .clone()
            .ok_or_else(|| StorageError::Unavailable("the device is down".into()))
    }

    /// Compacts the log, as the replica does, once `compact_backlog` acknowledged entries
    /// pile up (replica mode). A failure is only logged, as the replica's is.
    fn compact_if_due(&self) {
        let Some(store) = self.store.as_ref().filter(|_| self.replica) else {
            return;
        };
        if store
            .compaction_backlog()
            .is_ok_and(|n| n >= self.compact_backlog)
        {
            if let Err(e) = store.compact() {
                tracing::warn!(error = %e, "compacting the device's log failed");
            }
        }
    }

    /// Whether the store holds the row (deleted or not).
    fn holds(&self, table: &str, id: uuid::Uuid) -> bool {
        self.store.as_ref().is_some_and(|s| {
            s.get(table, id).ok().flatten().is_some() || s.is_deleted(table, id).unwrap_or(false)
        })
    }

    /// After the replica evicted: report the rows of `before` that are gone.
    fn note_evicted(&mut self, before: Vec<(String, uuid::Uuid)>) {
        for (table, id) in before {
            if !self.holds(&table, id) {
                if let Some(row) = row_key(id) {
                    self.events.push(NodeEvent::Evicted { row });
                }
            }
        }
    }

    /// Drop acknowledged ops from the pending view and report them acked or rejected.
    fn take_acked(&mut self, up_to: u64, rejected: &BTreeSet<u64>) {
        let acked: Vec<u64> = self.pending.range(..=up_to).map(|(s, _)| *s).collect();
        for seq in acked {
            let Some((row, hash)) = self.pending.remove(&seq) else {
                continue;
            };
            if let Some(n) = self.pending_rows.get_mut(&row) {
                *n -= 1;
                if *n == 0 {
                    self.pending_rows.remove(&row);
                }
            }
            let op = self.registry.borrow().op_of(&hash).map(|(op, _)| op);
            if let Some(op) = op {
                if rejected.contains(&seq) {
                    self.events.push(NodeEvent::Rejected { op, row });
                } else {
                    self.events.push(NodeEvent::Acked { op });
                }
            }
        }
    }

    /// Load the initial row set (the initial sync) and set every cursor to `cursor`.
    pub fn seed(&mut self, ops: &[RemoteOp], cursor: u64) -> Result<(), RealError> {
        let store = self
            .store_ref()
            .map_err(|e| RealError::Store(e.to_string()))?;
        store
            .apply_remote(ops, Durability::Immediate)
            .map_err(|e| RealError::Store(e.to_string()))?;
        for t in &self.tables {
            self.side.cursors.insert(t.clone(), cursor);
        }
        if self.replica {
            let mut rep = self
                .replica()
                .map_err(|e| RealError::Store(e.to_string()))?;
            for t in self.tables.clone() {
                rep.set_cursor(&t, Cursor(cursor), None)
                    .map_err(|e| RealError::Store(e.to_string()))?;
            }
        }
        self.save_side();
        Ok(())
    }

    fn store_ref(&self) -> Result<&Store, StorageError> {
        self.store
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("the device is down".into()))
    }

    fn save_side(&mut self) {
        self.durable_side = self.side.clone();
    }

    fn table_index(&self, table: &str) -> Option<u32> {
        self.tables
            .iter()
            .position(|t| t == table)
            .and_then(|i| u32::try_from(i).ok())
    }

    fn add_pending(&mut self, seq: u64, row: RowKey, hash: [u8; 32]) {
        self.pending.insert(seq, (row, hash));
        *self.pending_rows.entry(row).or_insert(0) += 1;
        self.last_local = self.last_local.max(seq);
    }

    /// Rebuild the in-memory view (pending ops, known ops) from the store after an open.
    fn rebuild(&mut self) -> Result<(), StorageError> {
        self.pending.clear();
        self.pending_rows.clear();
        let store = self.store_ref()?;
        let actor = store.actor();
        let acked = store.acked_seq().map_err(unavailable)?;
        // The replica keeps the protocol's acknowledged seq itself (the store's prefix may lag).
        let own_acked = if self.replica {
            self.replica()?.acked_seq()?.max(acked)
        } else {
            acked
        };
        let mut last_local = own_acked;
        let entries = store.ops_since(acked, usize::MAX).map_err(unavailable)?;
        let mut mine = Vec::new();
        for e in entries {
            if e.actor == actor && e.seq > own_acked {
                if let Some(row) = row_key(e.row) {
                    mine.push((e.seq, row, e.hash));
                }
                last_local = last_local.max(e.seq);
            }
        }
        self.last_local = last_local;
        for (seq, row, hash) in mine {
            self.add_pending(seq, row, hash);
        }
        Ok(())
    }

    /// The store's last seq (0 while the device is down): taken before a storage call that
    /// may apply remote changes, for [`Self::report_applied`].
    fn log_end(&self) -> u64 {
        self.store.as_ref().map_or(0, Store::last_seq)
    }

    /// Report one `Applied` per log entry written since `before` that is another node's
    /// workload op — so a change the store took twice is reported twice — then compact if
    /// due (nothing compacts between `before` and this read: see [`Self::replica`]).
    fn report_applied(&mut self, before: u64) {
        self.report_new_entries(before);
        self.compact_if_due();
    }

    fn report_new_entries(&mut self, before: u64) {
        let Some(store) = &self.store else { return };
        let own = store.actor();
        let last = store.last_seq();
        if last <= before {
            return;
        }
        let entries = match store.ops_since(before, usize::MAX) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "the device's log does not read");
                return;
            }
        };
        let reg = self.registry.borrow();
        for e in &entries {
            if e.actor == own {
                continue;
            }
            if let Some((op, row)) = reg.op_of(&e.hash) {
                self.known.insert(op);
                self.events.push(NodeEvent::Applied { op, row });
            }
        }
    }

    /// The workload ops of a row document that arrived whole (a row this device did not
    /// hold): each is applied here, except this device's own.
    fn report_imported(&mut self, doc: &[u8]) {
        self.report_ops_of_doc(doc, false);
    }

    /// The workload ops of a row document (other than this device's own), each reported
    /// applied — or, with `only_new`, only those this device did not hold yet (a row rolled
    /// back to the hub's copy keeps every other node's op it had, and gains the hub's newer).
    fn report_ops_of_doc(&mut self, doc: &[u8], only_new: bool) {
        let Ok(doc) = automerge::Automerge::load(doc) else {
            return;
        };
        let own = self.store.as_ref().map(|s| s.actor().0);
        let reg = self.registry.borrow();
        for c in doc.get_changes(&[]) {
            if own.is_some_and(|a| c.actor_id().to_bytes() == a.as_slice()) {
                continue;
            }
            if let Some((op, row)) = reg.op_of(&c.hash().0) {
                if self.known.insert(op) || !only_new {
                    self.events.push(NodeEvent::Applied { op, row });
                }
            }
        }
    }

    /// Report the ops a rolled-back row's copy from the hub brought: rows the device holds
    /// after `record_ack` with that copy in them. The replica defers a rollback until the row
    /// can be evicted (`waiting`): that row keeps its own copy, and the hub's ops arrive, and
    /// are reported, with a later pull.
    fn report_rolled_back(
        &mut self,
        rejected: &[Rejection],
        waiting: &BTreeSet<(String, uuid::Uuid)>,
    ) {
        for r in rejected {
            let Some(doc) = &r.authoritative else {
                continue;
            };
            if self.holds(&r.table, r.row) && !waiting.contains(&(r.table.clone(), r.row)) {
                self.report_ops_of_doc(&doc.doc, true);
            }
        }
    }

    /// Move the store's acknowledged prefix up to just below the first unacknowledged local
    /// op: entries pulled from the hub interleave with local ones in the store's log, and a
    /// row whose last entry is a pulled change could not be evicted otherwise.
    fn settle_ack(&self) -> Result<(), StorageError> {
        let store = self.store_ref()?;
        let floor = match self.pending.keys().next() {
            Some(first) => first - 1,
            None => store.last_seq(),
        };
        if floor > store.acked_seq().map_err(unavailable)? {
            store.acknowledge(floor).map_err(unavailable)?;
        }
        Ok(())
    }

    fn try_evict(&mut self, table: &str, id: uuid::Uuid) -> Result<bool, StorageError> {
        self.settle_ack()?;
        let store = self.store_ref()?;
        match store.evict_row(table, id) {
            Ok(found) => {
                if found {
                    if let Some(row) = row_key(id) {
                        self.events.push(NodeEvent::Evicted { row });
                    }
                }
                Ok(true)
            }
            Err(StoreError::UnacknowledgedChanges { .. }) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// Store options of every simulated store (temporary, in memory): a fixed actor, the manual
/// clock, immediate durability.
pub(super) fn store_options(actor: ActorId, clock: &Arc<AtomicI64>) -> StoreOptions {
    StoreOptions::default()
        .with_actor(actor)
        .with_clock(Clock::manual(clock.clone()))
        .with_durability(Durability::Immediate)
}

impl DeviceStorage for StoreDevice {
    fn acked_seq(&self) -> Result<u64, StorageError> {
        if self.replica {
            return self.replica()?.acked_seq();
        }
        self.store_ref()?.acked_seq().map_err(unavailable)
    }

    fn last_local_seq(&self) -> Result<u64, StorageError> {
        if self.replica {
            return self.replica()?.last_local_seq();
        }
        self.store_ref()?;
        Ok(self.last_local)
    }

    fn pending_ops(
        &self,
        after_seq: u64,
        limits: BatchLimits,
    ) -> Result<Vec<PushOp>, StorageError> {
        if self.replica {
            return self.replica()?.pending_ops(after_seq, limits);
        }
        let store = self.store_ref()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (&seq, _) in self.pending.range(after_seq.saturating_add(1)..) {
            if out.len() >= limits.max_items.max(1)
                || (!out.is_empty() && bytes >= limits.max_bytes)
            {
                break;
            }
            let Some(e) = store
                .ops_since(seq - 1, 1)
                .map_err(unavailable)?
                .into_iter()
                .next()
            else {
                return Err(StorageError::Corrupt(format!("log entry {seq} is missing")));
            };
            bytes += e.change.len();
            out.push(PushOp {
                seq,
                table: e.table,
                row: e.row,
                change: e.change,
            });
        }
        Ok(out)
    }

    fn record_ack(
        &mut self,
        now: Millis,
        up_to_seq: u64,
        rejected: &[Rejection],
    ) -> Result<(), StorageError> {
        if self.replica {
            let mut rep = self.replica()?;
            let mut before: Vec<(String, uuid::Uuid)> =
                rep.deferred_evictions().map_err(unavailable)?;
            before.extend(rejected.iter().map(|r| (r.table.clone(), r.row)));
            rep.record_ack(now, up_to_seq, rejected)?;
            let waiting: BTreeSet<(String, uuid::Uuid)> = rep
                .deferred_rollbacks()
                .map_err(unavailable)?
                .into_iter()
                .collect();
            let rejected_seqs: BTreeSet<u64> = rejected.iter().map(|r| r.seq).collect();
            self.take_acked(up_to_seq, &rejected_seqs);
            // Rows rolled back are re-imported when the hub sent them: report the gone, and
            // what the hub's copies brought.
            self.note_evicted(before);
            self.report_rolled_back(rejected, &waiting);
            self.compact_if_due();
            return Ok(());
        }
        let store = self.store_ref()?;
        let up_to = up_to_seq.min(store.last_seq());
        store.acknowledge(up_to).map_err(unavailable)?;
        store.sync().map_err(unavailable)?;
        let rejected_seqs: BTreeSet<u64> = rejected.iter().map(|r| r.seq).collect();
        self.take_acked(up_to, &rejected_seqs);
        // Roll rejected ops back: drop the row, take the hub's copy if it sent one.
        for r in rejected {
            self.try_evict(&r.table, r.row)?;
            if let Some(doc) = &r.authoritative {
                let export = RowExport {
                    table: r.table.clone(),
                    id: doc.row,
                    doc: doc.doc.clone(),
                };
                self.store_ref()?
                    .import_row(&export, Durability::Immediate)
                    .map_err(unavailable)?;
            }
        }
        // Evictions that waited for these acknowledgements.
        let waiting: Vec<(String, uuid::Uuid)> = self.side.evict_waiting.iter().cloned().collect();
        let mut changed = false;
        for (table, id) in waiting {
            if self.try_evict(&table, id)? {
                self.side.evict_waiting.remove(&(table, id));
                changed = true;
            }
        }
        if changed {
            self.save_side();
        }
        // Here a rollback that waits merges the hub's copy into the device's: reported now.
        self.report_rolled_back(rejected, &BTreeSet::new());
        Ok(())
    }

    fn apply_ops(&mut self, table: &str, ops: &[RowChange]) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let remote: Vec<RemoteOp> = ops
            .iter()
            .map(|o| RemoteOp {
                table: table.to_string(),
                row: o.row,
                change: o.change.clone(),
            })
            .collect();
        let before = self.log_end();
        if self.replica {
            self.replica()?.apply_ops(table, ops)?;
        } else {
            self.store_ref()?
                .apply_remote(&remote, Durability::Immediate)
                .map_err(unavailable)?;
        }
        self.report_applied(before);
        Ok(())
    }

    fn import_rows(&mut self, table: &str, rows: &[RowDoc]) -> Result<(), StorageError> {
        // A row held already merges (its new changes enter the log); one not held arrives
        // whole, as a base with no log entry.
        let held: Vec<bool> = rows.iter().map(|r| self.holds(table, r.row)).collect();
        let before = self.log_end();
        if self.replica {
            self.replica()?.import_rows(table, rows)?;
        } else {
            let mut changed = false;
            for r in rows {
                let export = RowExport {
                    table: table.to_string(),
                    id: r.row,
                    doc: r.doc.clone(),
                };
                self.store_ref()?
                    .import_row(&export, Durability::Immediate)
                    .map_err(unavailable)?;
                changed |= self.side.evict_waiting.remove(&(table.to_string(), r.row));
            }
            if changed {
                self.save_side();
            }
        }
        // A held row's new changes are log entries, which `report_applied` reads.
        for (r, held) in rows.iter().zip(held) {
            if !held {
                self.report_imported(&r.doc);
            }
        }
        self.report_applied(before);
        Ok(())
    }

    fn evict_rows(&mut self, table: &str, rows: &[uuid::Uuid]) -> Result<(), StorageError> {
        if self.replica {
            let before: Vec<(String, uuid::Uuid)> = rows
                .iter()
                .filter(|id| self.holds(table, **id))
                .map(|id| (table.to_string(), *id))
                .collect();
            self.replica()?.evict_rows(table, rows)?;
            self.note_evicted(before);
            self.compact_if_due();
            return Ok(());
        }
        let mut changed = false;
        for id in rows {
            if !self.try_evict(table, *id)? {
                changed |= self.side.evict_waiting.insert((table.to_string(), *id));
            }
        }
        if changed {
            self.save_side();
        }
        Ok(())
    }

    fn cursor(&self, table: &str) -> Result<Cursor, StorageError> {
        if self.replica {
            return self.replica()?.cursor(table);
        }
        self.store_ref()?;
        Ok(Cursor(self.side.cursors.get(table).copied().unwrap_or(0)))
    }

    fn set_cursor(
        &mut self,
        table: &str,
        cursor: Cursor,
        synced_at: Option<Millis>,
    ) -> Result<(), StorageError> {
        if self.replica {
            return self.replica()?.set_cursor(table, cursor, synced_at);
        }
        self.store_ref()?;
        self.side.cursors.insert(table.to_string(), cursor.0);
        if let Some(at) = synced_at {
            self.side.synced_at.insert(table.to_string(), at.0);
        }
        self.save_side();
        Ok(())
    }

    fn restart_cursor(&mut self, table: &str, cursor: Cursor) -> Result<(), StorageError> {
        if self.replica {
            return self.replica()?.restart_cursor(table, cursor);
        }
        self.store_ref()?;
        self.side.cursors.insert(table.to_string(), cursor.0);
        self.save_side();
        Ok(())
    }

    fn last_sync(&self, table: &str) -> Result<Option<Millis>, StorageError> {
        if self.replica {
            return self.replica()?.last_sync(table);
        }
        self.store_ref()?;
        Ok(self.side.synced_at.get(table).map(|t| Millis(*t)))
    }

    fn blob_progress(&self, _sha256: &[u8; 32]) -> Result<u64, StorageError> {
        Ok(0)
    }

    fn write_blob_chunk(
        &mut self,
        _sha256: &[u8; 32],
        _offset: u64,
        _data: &[u8],
        _total: u64,
    ) -> Result<(), StorageError> {
        Err(StorageError::Unavailable(
            "the simulator's workload has no blobs".into(),
        ))
    }

    // The simulator's workload attaches no files; a replica device still answers as one.
    fn blobs_to_fetch(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        if self.replica {
            return self.replica()?.blobs_to_fetch();
        }
        Ok(Vec::new())
    }

    fn blobs_to_upload(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        if self.replica {
            return self.replica()?.blobs_to_upload();
        }
        Ok(Vec::new())
    }

    fn read_blob_range(
        &self,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        if self.replica {
            return self.replica()?.read_blob_range(sha256, offset, max_len);
        }
        Ok(None)
    }

    fn record_upload(&mut self, sha256: &[u8; 32], stored: bool) -> Result<(), StorageError> {
        if self.replica {
            return self.replica()?.record_upload(sha256, stored);
        }
        Ok(())
    }
}

impl SimDeviceStorage for StoreDevice {
    fn edit(&mut self, now: u64, op: OpId, row: RowKey, kind: EditKind) -> Result<bool, RealError> {
        self.set_now(now);
        let Some(table) = self.tables.get(row.table as usize).cloned() else {
            return Ok(false);
        };
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| RealError::Store("the device is down".into()))?;
        let Some(info) = super::commit_edit(store, &table, row, kind, &self.owner)? else {
            return Ok(false);
        };
        let e = store
            .ops_since(info.first_seq - 1, 1)
            .map_err(|e| RealError::Store(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| RealError::Store("the commit wrote no log entry".into()))?;
        self.registry.borrow_mut().insert(e.hash, op, row);
        self.known.insert(op);
        self.add_pending(e.seq, row, e.hash);
        Ok(true)
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

    fn for_each_row_key(&self, f: &mut dyn FnMut(RowKey)) {
        for t in 0..self.tables.len() {
            self.for_each_row_key_of(t as u32, f);
        }
    }

    fn for_each_row_key_of(&self, table: u32, f: &mut dyn FnMut(RowKey)) {
        let Some(store) = &self.store else { return };
        let Some(name) = self.tables.get(table as usize) else {
            return;
        };
        let Ok(ids) = store.row_ids(name) else { return };
        for id in ids.flatten() {
            if let Some(k) = row_key(id) {
                f(k);
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

    fn pending_count(&self) -> usize {
        self.pending.len()
    }

    fn has_pending_on(&self, row: RowKey) -> bool {
        self.pending_rows.contains_key(&row)
    }

    /// While the device is down, its durable cursors (what a restart reopens): the
    /// `cursors-forward` baseline across a crash.
    fn for_each_cursor(&self, f: &mut dyn FnMut(u32, u64)) {
        if self.replica {
            let Some(store) = self.store.as_ref().or(self.crashed.as_ref()) else {
                return;
            };
            let rep = DeviceReplica::new(store.clone());
            for (i, t) in self.tables.iter().enumerate() {
                if let (Ok(c), Ok(i)) = (rep.cursor(t), u32::try_from(i)) {
                    f(i, c.0);
                }
            }
            return;
        }
        let side = if self.store.is_some() {
            &self.side
        } else {
            &self.durable_side
        };
        for (t, c) in &side.cursors {
            if let Some(i) = self.table_index(t) {
                f(i, *c);
            }
        }
    }

    fn drain_events(&mut self, out: &mut Vec<NodeEvent>) {
        out.append(&mut self.events);
    }

    fn set_now(&mut self, now: u64) {
        self.clock
            .store(i64::try_from(now).unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    fn crash(&mut self) {
        if let Some(store) = self.store.take() {
            self.crashed = Some(store);
        }
        self.device_replica = None;
        self.events.clear();
    }

    fn restart(&mut self) -> Result<(), RealError> {
        let old = self
            .crashed
            .take()
            .or_else(|| self.store.take())
            .ok_or_else(|| RealError::Store("the device has no store to restart".into()))?;
        let store = old
            .reopen_temporary()
            .map_err(|e| RealError::Store(e.to_string()))?;
        drop(old);
        self.device_replica = Some(replica_over(&store));
        self.store = Some(store);
        self.side = self.durable_side.clone();
        self.rebuild().map_err(|e| RealError::Store(e.to_string()))
    }
}

impl Registry {
    /// The op and row of a change hash, if the workload made it.
    pub fn op_of(&self, hash: &[u8; 32]) -> Option<(OpId, RowKey)> {
        self.by_hash.get(hash).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeId;
    use crate::real::{actor_of, commit_edit, scenario_schema};
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Another node's store that created row 7 of table `wo` (its change registered as op 3),
    /// and a device storage over the same schema that does not hold it yet.
    struct Fixture {
        registry: SharedRegistry,
        other: Store,
        row: RowKey,
        owner: fieldsync_store::Value,
        first: fieldsync_store::LogEntry,
        d: StoreDevice,
    }

    impl Fixture {
        fn new(replica: bool) -> Fixture {
            let schema = scenario_schema(&[("wo".into(), 8)]).unwrap();
            let registry: SharedRegistry = Rc::new(RefCell::new(Registry::default()));
            let clock = Arc::new(AtomicI64::new(1));
            let other = Store::temporary(
                schema.clone(),
                store_options(actor_of(1, NodeId(2)), &clock),
            )
            .unwrap();
            let row = RowKey { table: 0, id: 7 };
            let owner = fieldsync_store::Value::Null;
            commit_edit(&other, "wo", row, EditKind::Create, &owner).unwrap();
            let first = other.ops_since(0, 1).unwrap().remove(0);
            registry.borrow_mut().insert(first.hash, OpId(3), row);
            let mut d = StoreDevice::create(
                schema,
                actor_of(1, NodeId(1)),
                vec!["wo".into()],
                owner.clone(),
                registry.clone(),
            )
            .unwrap();
            d.use_replica(replica);
            Fixture {
                registry,
                other,
                row,
                owner,
                first,
                d,
            }
        }
    }

    /// A change from another node is reported applied each time it enters the device's state:
    /// once per log entry, and again when its row comes back whole after an eviction.
    #[test]
    fn a_change_is_reported_each_time_it_enters_the_device() {
        for replica in [true, false] {
            let Fixture {
                other,
                row,
                first: entry,
                mut d,
                ..
            } = Fixture::new(replica);
            let change = RowChange {
                row: row_id(row),
                change: entry.change.clone(),
            };
            let mut events = Vec::new();
            d.apply_ops("wo", std::slice::from_ref(&change)).unwrap();
            // The store takes a change it holds only once.
            d.apply_ops("wo", &[change]).unwrap();
            d.drain_events(&mut events);
            let applied = NodeEvent::Applied { op: OpId(3), row };
            assert_eq!(events, vec![applied], "replica {replica}");
            d.evict_rows("wo", &[row_id(row)]).unwrap();
            let doc = other.export_row("wo", row_id(row)).unwrap().unwrap().doc;
            d.import_rows(
                "wo",
                &[RowDoc {
                    row: row_id(row),
                    doc,
                }],
            )
            .unwrap();
            events.clear();
            d.drain_events(&mut events);
            assert_eq!(
                events,
                vec![NodeEvent::Evicted { row }, applied],
                "replica {replica}"
            );
        }
    }

    /// A row rolled back to the hub's copy reports what that copy brought (another node's
    /// newer op), and not again what the device already held; a rollback the replica defers
    /// reports nothing yet: the device has a later op of its own on the row
    /// (`Deferred::SameRow`), or one on another row with a pulled change after it, which
    /// keeps the row's log entries unacknowledged (`Deferred::OtherRow`).
    #[test]
    fn a_rolled_back_row_reports_the_ops_the_hubs_copy_brought() {
        #[derive(PartialEq)]
        enum Deferred {
            No,
            SameRow,
            OtherRow,
        }
        for (replica, deferred) in [
            (true, Deferred::No),
            (false, Deferred::No),
            (true, Deferred::SameRow),
            (true, Deferred::OtherRow),
        ] {
            let Fixture {
                registry,
                other,
                row,
                owner,
                first,
                mut d,
            } = Fixture::new(replica);
            let change = RowChange {
                row: row_id(row),
                change: first.change.clone(),
            };
            d.apply_ops("wo", &[change]).unwrap();
            // The device edits the row; meanwhile the other node edits it too.
            let update = |value| EditKind::Update { column: 0, value };
            assert!(d.edit(2, OpId(10), row, update(5)).unwrap());
            let limits = BatchLimits {
                max_items: 10,
                max_bytes: 1 << 20,
            };
            let mine = d.pending_ops(0, limits).unwrap().remove(0);
            if deferred == Deferred::SameRow {
                assert!(d.edit(3, OpId(11), row, update(7)).unwrap());
            }
            if deferred == Deferred::OtherRow {
                let b = RowKey { table: 0, id: 8 };
                assert!(d.edit(3, OpId(12), b, EditKind::Create).unwrap());
                commit_edit(&other, "wo", row, update(9), &owner).unwrap();
                let pulled = other.ops_since(1, 1).unwrap().remove(0);
                registry.borrow_mut().insert(pulled.hash, OpId(5), row);
                let change = RowChange {
                    row: row_id(row),
                    change: pulled.change,
                };
                d.apply_ops("wo", &[change]).unwrap();
            }
            commit_edit(&other, "wo", row, update(6), &owner).unwrap();
            let second = other.ops_since(other.last_seq() - 1, 1).unwrap().remove(0);
            registry.borrow_mut().insert(second.hash, OpId(4), row);
            let mut events = Vec::new();
            d.drain_events(&mut events);
            // The hub refuses the device's edit and sends its copy, with the other node's.
            let doc = other.export_row("wo", row_id(row)).unwrap().unwrap().doc;
            let rejection = Rejection {
                seq: mine.seq,
                table: "wo".into(),
                row: row_id(row),
                operation: fieldsync_replication::proto::Operation::Write,
                kind: fieldsync_replication::proto::RejectionKind::Permission,
                message: "no".into(),
                authoritative: Some(RowDoc {
                    row: row_id(row),
                    doc,
                }),
            };
            d.record_ack(Millis(0), mine.seq, &[rejection]).unwrap();
            events.clear();
            d.drain_events(&mut events);
            let applied: Vec<&NodeEvent> = events
                .iter()
                .filter(|e| matches!(e, NodeEvent::Applied { .. }))
                .collect();
            if deferred != Deferred::No {
                assert!(applied.is_empty(), "{events:?}");
                assert!(!d.has_op(OpId(4)));
                continue;
            }
            assert_eq!(
                applied,
                vec![&NodeEvent::Applied { op: OpId(4), row }],
                "replica {replica}: {events:?}"
            );
            assert!(d.has_op(OpId(4)));
        }
    }

    fn cursors(d: &StoreDevice) -> Vec<(u32, u64)> {
        let mut v = Vec::new();
        d.for_each_cursor(&mut |t, c| v.push((t, c)));
        v.sort_unstable();
        v
    }

    /// The checker takes a crashed device's cursors as the baseline its restart must not go
    /// below: while down, the device shows its durable cursors.
    #[test]
    fn a_crashed_device_shows_its_durable_cursors() {
        for replica in [true, false] {
            let schema = scenario_schema(&[("wo".into(), 8), ("b".into(), 8)]).unwrap();
            let registry: SharedRegistry = Rc::new(RefCell::new(Registry::default()));
            let mut d = StoreDevice::create(
                schema,
                actor_of(1, NodeId(1)),
                vec!["wo".into(), "b".into()],
                fieldsync_store::Value::Null,
                registry,
            )
            .unwrap();
            d.use_replica(replica);
            d.seed(&[], 5).unwrap();
            d.set_cursor("b", Cursor(9), None).unwrap();
            let up = cursors(&d);
            assert_eq!(up, vec![(0, 5), (1, 9)], "replica {replica}");
            d.crash();
            assert_eq!(cursors(&d), up, "replica {replica}");
            d.restart().unwrap();
            assert_eq!(cursors(&d), up, "replica {replica}");
        }
    }
}
