//! The hub's storage: the replication crate's [`HubReplica`] over a real [`Store`], with the
//! run's environment, apps and profiles ([`SimEnvironment`]).
//!
//! Every push goes through the replica's token check, privilege checks and conflict policy;
//! every pull is the replica's feed. This adapter adds only what the simulator needs: office
//! edits and admin changes (owner writes, profile and role changes), observation (rows, which
//! workload ops the hub holds), and crash and restart. Dataverse's state (the environment and
//! the profiles) lives outside the hub's process and survives a hub crash; the replica is
//! reopened over the store's data (`Store::reopen_temporary`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use fieldsync_replication::credential::{HubSigningKey, TokenVerifier};
use fieldsync_replication::proto::{
    BatchLimits, BlobSlice, ConflictPolicy, Cursor, DeviceId, HubStorage, Millis, Principal,
    PullChunk, PushOp, PushOutcome, Refusal, StorageError, UploadOutcome,
};
use fieldsync_replication::replica::{FeedChanges, HubReplica};
use fieldsync_store::{ActorId, RemoteOp, Store, Value};

use super::device::store_options;
use super::environment::{owner_value, SimEnvironment};
use super::{device_id, digest_row, edit_column, row_id, row_key, RealError, SharedRegistry};
use crate::node::{AdminEvent, EditKind, NodeContext, NodeEvent, NodeId, OpId, RowKey};
use crate::simple::PlantedBug;
use crate::world::Owner;

/// What a simulated hub's storage offers beyond [`HubStorage`].
pub trait SimHubStorage: HubStorage {
    /// Commit an office user's edit; the tables that changed (for `handle_changes`), `None`
    /// when the edit is refused.
    fn edit(
        &mut self,
        now: u64,
        op: OpId,
        row: RowKey,
        kind: EditKind,
    ) -> Result<Option<Vec<String>>, RealError>;
    /// Apply an administrative change; the tables whose feeds changed.
    fn admin(&mut self, now: u64, event: &AdminEvent) -> Result<Vec<String>, RealError>;
    /// Which users' feeds moved since the last call: only their sessions need to pull.
    fn take_feed_changes(&mut self) -> FeedChanges;
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

/// The hub: `HubReplica` over its store, and what the simulator observes of it.
#[derive(Debug)]
pub struct ReplicaHub {
    clock: Arc<AtomicI64>,
    replica: Option<HubReplica>,
    /// The store's handle while the hub is down: a restart reopens its data.
    crashed: Option<Store>,
    world: SimEnvironment,
    verifier: TokenVerifier,
    tables: Vec<String>,
    tokens: BTreeMap<NodeId, Vec<u8>>,
    /// The hub's log is scanned up to here for workload ops it now holds.
    seen: u64,
    known: BTreeSet<OpId>,
    registry: SharedRegistry,
    events: Vec<NodeEvent>,
    bug: Option<PlantedBug>,
    setup_rows: u64,
    /// Every device's initial cursor: the feed after setup.
    start: Cursor,
    /// Feeds moved since the sessions were last told.
    feed_changes: FeedChanges,
}

fn store_err(e: impl std::fmt::Display) -> RealError {
    RealError::Store(e.to_string())
}

/// The hub's token-signing key in a run of `seed` (reproducible: tokens are in the frames).
fn signing_key(seed: u64) -> Result<HubSigningKey, RealError> {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let word = seed.rotate_left(i as u32 * 16) ^ 0x5349_4D48_5542_0000 ^ i as u64;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    HubSigningKey::from_seed(&bytes).map_err(|e| RealError::Store(e.to_string()))
}

impl ReplicaHub {
    /// Create the hub's store (in memory) with every initial row of the world (one
    /// transaction), open the replica, enroll every device and record that each holds its
    /// initial set (the devices are provisioned from this snapshot).
    pub fn create(
        schema: fieldsync_store::Schema,
        seed: u64,
        actor: ActorId,
        ctx: &NodeContext<'_>,
        registry: SharedRegistry,
        bug: Option<PlantedBug>,
    ) -> Result<ReplicaHub, RealError> {
        let clock = Arc::new(AtomicI64::new(crate::node::SIM_EPOCH_MS as i64));
        let options = store_options(actor, &clock);
        // In memory, like the devices' stores (see `StoreDevice::create`).
        let store = Store::temporary(schema.clone(), options).map_err(store_err)?;
        let tables = ctx.tables.to_vec();
        let interval = super::interval_minutes(ctx.sync)?;
        let world = SimEnvironment::new(
            &schema,
            ctx.tables,
            ctx.groups,
            ctx.device_groups,
            ctx.world,
            interval,
        )?;
        {
            let mut tx = store.begin();
            let mut count = 0usize;
            for (row, owner) in ctx.world.all_rows() {
                let Some(table) = tables.get(row.table as usize) else {
                    continue;
                };
                let values = [("c0", Value::Integer(0)), ("ownerid", owner_value(owner))];
                tx.insert_with_id(table, row_id(row), &values)
                    .map_err(store_err)?;
                count += 1;
            }
            if count > 0 {
                tx.commit().map_err(store_err)?;
            }
        }
        let setup_rows = store.last_seq();
        let key = signing_key(seed)?;
        let verifier = key.verifier();
        let mut replica = HubReplica::open(
            store,
            world.environment().clone(),
            world.apps(),
            world.profiles(),
            verifier.clone(),
            crate::node::SIM_EPOCH_MS as i64,
        )
        .map_err(store_err)?
        .with_signing_key(key);
        let position = replica.store().last_seq();
        let start = replica.cursor_at(position).map_err(store_err)?;
        let mut tokens = BTreeMap::new();
        for i in 1..=ctx.world.devices() {
            let d = NodeId(i);
            let Some(app) = world.app_of(d) else { continue };
            let token = replica
                .enroll_with_token_id(
                    &SimEnvironment::user_of(d),
                    &app,
                    device_id(d).0,
                    uuid::Uuid::from_u64_pair(0x70CE_0000_0000_0000, u64::from(i)),
                    crate::node::SIM_EPOCH_MS,
                )
                .map_err(store_err)?;
            tokens.insert(d, token.as_bytes().to_vec());
            let rows: Vec<(String, uuid::Uuid)> = ctx
                .world
                .entitled_rows(d)
                .into_iter()
                .filter_map(|r| Some((tables.get(r.table as usize)?.clone(), row_id(r))))
                .collect();
            replica
                .provision(device_id(d), &rows, start)
                .map_err(store_err)?;
        }
        let mut hub = ReplicaHub {
            clock,
            replica: Some(replica),
            crashed: None,
            world,
            verifier,
            tables,
            tokens,
            seen: position,
            known: BTreeSet::new(),
            registry,
            events: Vec::new(),
            bug,
            setup_rows,
            start,
            feed_changes: FeedChanges::default(),
        };
        hub.plant();
        Ok(hub)
    }

    /// Switch the planted bug on in the replica (feature `planted-bugs`; tests only).
    #[cfg(feature = "planted-bugs")]
    fn plant(&mut self) {
        use fieldsync_replication::replica::PlantedHubBug;
        let bug = match self.bug {
            Some(PlantedBug::HubForgetsEviction) => Some(PlantedHubBug::ForgetsEviction),
            _ => None,
        };
        if let Some(r) = &mut self.replica {
            r.plant_bug(bug);
        }
    }

    #[cfg(not(feature = "planted-bugs"))]
    fn plant(&mut self) {
        if self.bug.is_some() {
            tracing::warn!(
                bug = ?self.bug,
                "built without the `planted-bugs` feature: the hub runs without the planted bug"
            );
        }
    }

    /// The hub's store (`None` while the hub is down).
    pub fn store(&self) -> Option<&Store> {
        self.replica.as_ref().map(HubReplica::store)
    }

    /// How many log entries the setup wrote (the first entries of the hub's store).
    pub fn setup_rows(&self) -> u64 {
        self.setup_rows
    }

    /// The feed cursor after setup (every device's initial cursor).
    pub fn start_cursor(&self) -> Cursor {
        self.start
    }

    /// The token the hub issued to a device.
    pub fn token(&self, d: NodeId) -> Option<&[u8]> {
        self.tokens.get(&d).map(Vec::as_slice)
    }

    /// The app a device is enrolled for.
    pub fn app_of(&self, d: NodeId) -> Option<String> {
        self.world.app_of(d)
    }

    /// The initial changes of the rows a device starts with (its provisioned snapshot).
    pub fn initial_ops(&self, rows: &[RowKey]) -> Result<Vec<RemoteOp>, RealError> {
        let wanted: BTreeSet<RowKey> = rows.iter().copied().collect();
        let store = self.live().map_err(store_err)?.store();
        Ok(store
            .ops_since(0, usize::try_from(self.setup_rows).unwrap_or(usize::MAX))
            .map_err(store_err)?
            .into_iter()
            .filter(|e| row_key(e.row).is_some_and(|r| wanted.contains(&r)))
            .map(|e| RemoteOp {
                table: e.table,
                row: e.row,
                change: e.change,
            })
            .collect())
    }

    fn live(&self) -> Result<&HubReplica, StorageError> {
        self.replica
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("the hub is down".into()))
    }

    fn live_mut(&mut self) -> Result<&mut HubReplica, StorageError> {
        self.replica
            .as_mut()
            .ok_or_else(|| StorageError::Unavailable("the hub is down".into()))
    }

    /// Report every log entry since the last look that is a device's workload op: one
    /// `Applied` per entry, so a change the store took twice is reported twice.
    fn note_log(&mut self) {
        let Some(r) = &self.replica else { return };
        let store = r.store();
        let last = store.last_seq();
        if last <= self.seen {
            return;
        }
        let own = store.actor();
        match store.ops_since(self.seen, usize::MAX) {
            Ok(entries) => {
                let reg = self.registry.borrow();
                for e in entries {
                    if let Some((op, row)) = reg.op_of(&e.hash) {
                        self.known.insert(op);
                        // Office edits are the hub's own, not applied from another node.
                        if e.actor != own {
                            self.events.push(NodeEvent::Applied { op, row });
                        }
                    }
                }
                self.seen = last;
            }
            Err(e) => tracing::warn!(error = %e, "the hub's log does not read"),
        }
    }

    /// After a reopen: the workload ops the hub holds are those in the reopened store's log
    /// (the hub's log is never compacted), whatever the process knew before the crash.
    fn rebuild_known(&mut self) -> Result<(), RealError> {
        let store = self.live().map_err(store_err)?.store();
        let entries = store.ops_since(0, usize::MAX).map_err(store_err)?;
        let last = store.last_seq();
        let reg = self.registry.borrow();
        let known = entries
            .iter()
            .filter_map(|e| reg.op_of(&e.hash).map(|(op, _)| op))
            .collect();
        drop(reg);
        self.known = known;
        self.seen = last;
        Ok(())
    }

    /// A change written on the hub itself: the replica routes it; returns the log entries it
    /// wrote.
    fn write(
        &mut self,
        table: &str,
        row: RowKey,
        values: &[(&str, Value)],
    ) -> Result<Option<Vec<fieldsync_store::LogEntry>>, RealError> {
        let r = self.live_mut().map_err(store_err)?;
        let id = row_id(row);
        if r.store().get(table, id).map_err(store_err)?.is_none() {
            return Ok(None);
        }
        let before = r.store().last_seq();
        r.local_write(table, id, values).map_err(store_err)?;
        let entries = r.store().ops_since(before, usize::MAX).map_err(store_err)?;
        Ok(Some(entries))
    }

    /// How many columns of the row hold concurrent values (0 for a row the hub lacks).
    fn conflicted_columns(&self, table: &str, id: uuid::Uuid) -> usize {
        self.store()
            .and_then(|s| s.conflicts(table, id).ok())
            .map_or(0, |c| c.len())
    }

    /// Tables whose feeds changed, and the workload ops now in the log; the feeds that moved
    /// are kept for [`SimHubStorage::take_feed_changes`].
    fn changed(&mut self) -> Vec<String> {
        self.note_log();
        let changes = self
            .replica
            .as_mut()
            .map(HubReplica::take_changes)
            .unwrap_or_default();
        let tables = changes.tables();
        self.feed_changes.merge(changes);
        tables
    }
}

impl HubStorage for ReplicaHub {
    fn authenticate(
        &mut self,
        device: DeviceId,
        token: &[u8],
        app: &str,
    ) -> Result<Result<Principal, Refusal>, StorageError> {
        self.live_mut()?.authenticate(device, token, app)
    }

    fn row_copy_withheld(
        &mut self,
        who: &Principal,
        table: &str,
        row: uuid::Uuid,
    ) -> Result<(), StorageError> {
        self.live_mut()?.row_copy_withheld(who, table, row)
    }

    fn apply_push(
        &mut self,
        now: Millis,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
    ) -> Result<PushOutcome, StorageError> {
        let conflicts_before = self.conflicted_columns(&op.table, op.row);
        let out = self.live_mut()?.apply_push(now, who, policy, op);
        // A concurrent write: the row now holds more columns with concurrent values.
        if self.conflicted_columns(&op.table, op.row) > conflicts_before {
            if let Some(row) = row_key(op.row) {
                self.events.push(NodeEvent::Conflict { row });
            }
        }
        // The session's `OpsApplied` tells the other sessions which tables changed.
        self.changed();
        out
    }

    fn pull(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError> {
        self.live_mut()?.pull(who, table, after, limits)
    }

    fn blob_chunk(
        &mut self,
        who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        self.live_mut()?.blob_chunk(who, sha256, offset, max_len)
    }

    fn put_blob_chunk(
        &mut self,
        now: Millis,
        who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<UploadOutcome, StorageError> {
        self.live_mut()?
            .put_blob_chunk(now, who, sha256, offset, total, data)
    }
}

impl SimHubStorage for ReplicaHub {
    fn edit(
        &mut self,
        now: u64,
        op: OpId,
        row: RowKey,
        kind: EditKind,
    ) -> Result<Option<Vec<String>>, RealError> {
        self.set_now(now);
        let Some(table) = self.tables.get(row.table as usize).cloned() else {
            return Ok(None);
        };
        // Office users only update (the workload gives them no creates or deletes).
        let EditKind::Update { column, value } = kind else {
            return Ok(None);
        };
        let (col, v) = edit_column(column, value);
        let Some(entries) = self.write(&table, row, &[(col.as_str(), v)])? else {
            return Ok(None);
        };
        let id = row_id(row);
        if let Some(e) = entries.iter().find(|e| e.row == id) {
            self.registry.borrow_mut().insert(e.hash, op, row);
            self.known.insert(op);
        }
        let mut tables = self.changed();
        if !tables.contains(&table) {
            tables.push(table);
        }
        Ok(Some(tables))
    }

    fn take_feed_changes(&mut self) -> FeedChanges {
        self.changed();
        std::mem::take(&mut self.feed_changes)
    }

    fn admin(&mut self, now: u64, event: &AdminEvent) -> Result<Vec<String>, RealError> {
        self.set_now(now);
        match event {
            AdminEvent::Reassign { row, to } => {
                let Some(table) = self.tables.get(row.table as usize).cloned() else {
                    return Ok(Vec::new());
                };
                let owner = owner_value(Owner::Device(*to));
                self.write(&table, *row, &[("ownerid", owner)])?;
            }
            AdminEvent::SetProfile { device, tables } => {
                if let Some(profile) = self.world.set_profile(*device, *tables)? {
                    self.live_mut()
                        .map_err(store_err)?
                        .handle_profile(profile)
                        .map_err(store_err)?;
                }
            }
            AdminEvent::SetRole { device, denied } => {
                if self.world.set_denied(*device, *denied)? {
                    let env = self.world.environment().clone();
                    self.live_mut()
                        .map_err(store_err)?
                        .handle_environment(env)
                        .map_err(store_err)?;
                }
            }
        }
        Ok(self.changed())
    }

    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64)) {
        let Some(store) = self.store() else { return };
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
        let store = self.store()?;
        let table = self.tables.get(row.table as usize)?;
        store
            .get(table, row_id(row))
            .ok()
            .flatten()
            .map(|r| digest_row(&r))
    }

    /// From the store's log as last read (rebuilt from the reopened store on restart); while
    /// the hub is down, what its store held when it crashed.
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
        if let Some(replica) = self.replica.take() {
            self.crashed = Some(replica.store().clone());
        }
        self.events.clear();
    }

    fn restart(&mut self) -> Result<(), RealError> {
        let old = self
            .crashed
            .take()
            .or_else(|| self.replica.take().map(|r| r.store().clone()))
            .ok_or_else(|| RealError::Store("the hub has no store to restart".into()))?;
        let store = old.reopen_temporary().map_err(store_err)?;
        drop(old);
        let now = self.clock.load(Ordering::SeqCst);
        let replica = HubReplica::open(
            store,
            self.world.environment().clone(),
            self.world.apps(),
            self.world.profiles(),
            self.verifier.clone(),
            now,
        )
        .map_err(store_err)?;
        self.replica = Some(replica);
        self.plant();
        // What the hub holds now is what the reopened store holds: ops the replica applied
        // before the crash (acknowledged or not) are there, lost ones are not.
        self.rebuild_known()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::real::Registry;
    use crate::scenario::SyncConfig;
    use crate::world::World;
    use std::cell::RefCell;
    use std::rc::Rc;

    fn hub(world: &World, sync: &SyncConfig, registry: &SharedRegistry) -> ReplicaHub {
        let tables = vec!["wo".to_string()];
        let groups = vec!["a".to_string()];
        let ctx = NodeContext {
            world,
            sync,
            tables: &tables,
            columns: &[8],
            groups: &groups,
            device_groups: &[0],
        };
        let schema = super::super::scenario_schema(&[("wo".into(), 8)]).unwrap();
        ReplicaHub::create(
            schema,
            1,
            super::super::actor_of(1, crate::node::HUB),
            &ctx,
            registry.clone(),
            None,
        )
        .unwrap()
    }

    /// A store that comes back without a committed op must make `has_op` say so: the
    /// `no-acked-op-lost` check after a hub restart relies on it.
    #[test]
    fn has_op_follows_the_reopened_store_not_what_the_process_knew() {
        let mut world = World::new(1);
        let row = RowKey { table: 0, id: 0 };
        world.set_owner(row, Owner::Device(NodeId(1)));
        let sync = SyncConfig::default();
        let registry: SharedRegistry = Rc::new(RefCell::new(Registry::default()));
        let mut a = hub(&world, &sync, &registry);
        // The same setup, without the edit below: what a store that lost it would reopen.
        let mut lost = hub(&world, &sync, &registry);
        let now = crate::node::SIM_EPOCH_MS + 1_000;
        let kind = EditKind::Update {
            column: 1,
            value: 5,
        };
        assert!(a.edit(now, OpId(0), row, kind).unwrap().is_some());
        assert!(a.has_op(OpId(0)));
        a.crash();
        assert!(
            a.has_op(OpId(0)),
            "while down, the hub still holds what its store held"
        );
        a.crashed = lost.replica.take().map(|r| r.store().clone());
        a.restart().unwrap();
        assert!(!a.has_op(OpId(0)), "the reopened store does not hold op0");
        // And an op that is in the reopened store is found again.
        a.crash();
        let mut b = hub(&world, &sync, &registry);
        let other = EditKind::Update {
            column: 2,
            value: 6,
        };
        assert!(b.edit(now, OpId(1), row, other).unwrap().is_some());
        a.crashed = b.replica.take().map(|r| r.store().clone());
        a.restart().unwrap();
        assert!(a.has_op(OpId(1)));
    }
}
