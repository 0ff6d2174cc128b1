//! The real engine: nodes that run fieldsync's own store and protocol state machines.
//!
//! Each device is a [`DeviceSession`] over a real [`fieldsync_store::Store`] (a temporary
//! store: the store's code over an in-memory map), the hub is one [`HubSession`] per connected device over the replication
//! crate's `HubReplica` on the hub's store ([`ReplicaHub`]), with an environment, apps and
//! profiles derived from the scenario ([`SimEnvironment`]). Messages between them are the real
//! wire frames ([`wire::encode`] / [`wire::decode`]), so the byte counters measure what the
//! protocol would send. Everything is deterministic: every store has a fixed [`ActorId`]
//! derived from the run's seed and a manual clock set from virtual time before each call, the
//! hub's signing key and token ids come from the seed, row ids are derived from the
//! simulator's [`RowKey`]s, and nothing here iterates a `HashMap` or reads a clock.
//!
//! The node drivers ([`RealNode`]) are generic over the storage: [`SimDeviceStorage`] and
//! [`SimHubStorage`] extend the protocol's `DeviceStorage` / `HubStorage` with what the
//! simulator needs (edits, admin changes, observation, crash). [`RealFactory`] builds them:
//! [`ReplicaHub`] and [`StoreDevice`].
//!
//! # Crashes
//!
//! A crash is a process crash, not a power loss: it drops the store handle and the sessions,
//! and a restart reopens the same data (`Store::reopen_temporary`). So a crash loses
//! connections, messages in flight and session state, never a commit that returned, group
//! commits included — what a real store's write-ahead file guarantees after a process crash.
//! Losing unsynced group commits to a power loss is not modelled (the store's own crash test
//! covers the write-ahead file).

mod device;
mod environment;
mod hub;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use fieldsync_replication::proto::messages::PUSH_BATCH_OPS_MAX;
use fieldsync_replication::proto::{
    DeviceConfig, DeviceEvent, DeviceId, DeviceSession, DeviceState, HubConfig, HubEvent,
    HubSession, Message, Millis, Pull, Subscribe, SyncSchedule,
};
use fieldsync_replication::wire;
use fieldsync_store::{ActorId, CommitInfo, Row, RowId, Schema, Store, Value, WriteError};

pub use device::{SimDeviceStorage, StoreDevice};
pub use environment::{device_user, SimEnvironment};
pub use hub::{ReplicaHub, SimHubStorage};

use crate::digest::Fnv64;
use crate::node::{
    AdminEvent, Edit, EditKind, EditResult, FieldNode, NodeContext, NodeEvent, NodeFactory, NodeId,
    Observe, OpId, RowKey, SimMessage, SimNode, Transmit, HUB,
};
use crate::scenario::{Scenario, ScenarioError, SyncConfig};
use crate::simple::PlantedBug;

/// Why the real engine could not set up or drive a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RealError {
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
    /// A file or directory could not be made.
    #[error("i/o: {0}")]
    Io(String),
    /// The scenario's tables do not make a schema.
    #[error("schema: {0}")]
    Schema(String),
}

/// Which workload op each automerge change is (shared by every node of a run: the simulator's
/// knowledge, never a node's).
#[derive(Debug, Default)]
pub struct Registry {
    by_hash: BTreeMap<[u8; 32], (OpId, RowKey)>,
}

impl Registry {
    fn insert(&mut self, hash: [u8; 32], op: OpId, row: RowKey) {
        self.by_hash.insert(hash, (op, row));
    }
}

/// The registry, shared by the nodes of one run.
pub type SharedRegistry = Rc<RefCell<Registry>>;

const ROW_TAG: u64 = 0x5157_0000_0000_0000;

/// The store's row id of a simulator row.
pub fn row_id(row: RowKey) -> RowId {
    uuid::Uuid::from_u64_pair(ROW_TAG | u64::from(row.table), row.id)
}

/// The simulator row of a store row id (`None` for ids the simulator did not make).
pub fn row_key(id: RowId) -> Option<RowKey> {
    let (hi, lo) = id.as_u64_pair();
    if hi & 0xffff_ffff_0000_0000 != ROW_TAG {
        return None;
    }
    Some(RowKey {
        table: (hi & 0xffff_ffff) as u32,
        id: lo,
    })
}

fn device_id(d: NodeId) -> DeviceId {
    DeviceId(uuid::Uuid::from_u64_pair(
        0xDE71_CE00_0000_0000,
        u64::from(d.0),
    ))
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The compaction backlog of the devices that compact often (see `RealFactory::device`).
const COMPACTING_DEVICE_BACKLOG: u64 = 8;

/// The fixed actor of a node in a run of `seed`.
pub fn actor_of(seed: u64, node: NodeId) -> ActorId {
    let mut x = seed ^ (u64::from(node.0) << 32) ^ 0xA5A5_5A5A;
    let a = splitmix(&mut x);
    let b = splitmix(&mut x);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    ActorId(bytes)
}

/// The digest of a row's materialized values (every column, system columns included).
fn digest_row(row: &Row) -> u64 {
    let mut h = Fnv64::new();
    for (k, v) in &row.values {
        h.write_bytes(k.as_bytes());
        h.write_u8(0);
        match serde_json::to_vec(v) {
            Ok(b) => h.write_bytes(&b),
            Err(_) => h.write_u8(0xff),
        }
    }
    h.finish()
}

/// The column and value a workload update writes.
fn edit_column(column: u32, value: u64) -> (String, Value) {
    let v = Value::Integer(i64::try_from(value & 0x7fff_ffff_ffff_ffff).unwrap_or(0));
    (format!("c{column}"), v)
}

/// Commit one workload edit as a real transaction; `None` when the store refuses it. A
/// create sets `ownerid` to `owner` (the device's user: the creator owns the row).
fn commit_edit(
    store: &Store,
    table: &str,
    row: RowKey,
    kind: EditKind,
    owner: &Value,
) -> Result<Option<CommitInfo>, RealError> {
    let mut tx = store.begin();
    let id = row_id(row);
    let r = match kind {
        EditKind::Create => tx.insert_with_id(
            table,
            id,
            &[("c0", Value::Integer(0)), ("ownerid", owner.clone())],
        ),
        EditKind::Update { column, value } => {
            let (col, v) = edit_column(column, value);
            tx.update(table, id, &[(col.as_str(), v)])
        }
        EditKind::Delete => tx.delete(table, id),
    };
    match r {
        Ok(()) => {}
        Err(
            WriteError::RowNotFound { .. }
            | WriteError::RowDeleted { .. }
            | WriteError::RowExists { .. }
            | WriteError::Schema(_),
        ) => return Ok(None),
        Err(e) => return Err(RealError::Store(e.to_string())),
    }
    tx.commit()
        .map(Some)
        .map_err(|e| RealError::Store(e.to_string()))
}

/// What the real engine can run beyond what [`Scenario::validate`] checks: a sync interval a
/// profile can hold (whole minutes, 5 to 1440) and a batch the protocol carries (at most
/// [`PUSH_BATCH_OPS_MAX`] ops in a push).
pub fn check_scenario(scenario: &Scenario) -> Result<(), ScenarioError> {
    interval_minutes(&scenario.sync).map_err(|reason| ScenarioError::Invalid {
        field: "sync.interval".into(),
        reason: reason.to_string(),
    })?;
    let max = PUSH_BATCH_OPS_MAX;
    if scenario.sync.batch as usize > max {
        return Err(ScenarioError::Invalid {
            field: "sync.batch".into(),
            reason: format!("the real engine's protocol carries at most {max} ops in a push"),
        });
    }
    Ok(())
}

/// The pull interval in a profile's whole minutes (5..=1440).
fn interval_minutes(sync: &SyncConfig) -> Result<u32, RealError> {
    let ms = sync.interval.0;
    let minutes = ms / 60_000;
    if !ms.is_multiple_of(60_000) || !(5..=1440).contains(&minutes) {
        return Err(RealError::Schema(format!(
            "a sync interval of {ms} ms: the real engine runs whole minutes from 5m to 24h \
             (a profile's sync_interval_minutes)"
        )));
    }
    Ok(minutes as u32)
}

/// Ops or rows per message: the scenario's `sync.batch`.
fn batch_items(sync: &SyncConfig) -> usize {
    (sync.batch as usize).clamp(1, PUSH_BATCH_OPS_MAX)
}

/// The schema of a scenario: each table has integer columns `c0..cN`.
pub fn scenario_schema(tables: &[(String, u32)]) -> Result<Schema, RealError> {
    let mut toml = String::new();
    for (name, columns) in tables {
        toml.push_str(&format!("[tables.\"{name}\"]\noffline = true\n"));
        toml.push_str(&format!("[tables.\"{name}\".columns]\n"));
        for c in 0..(*columns).max(1) {
            toml.push_str(&format!("c{c} = \"integer\"\n"));
        }
    }
    Schema::from_toml(&toml).map_err(|e| RealError::Schema(e.to_string()))
}

/// A real wire frame: the bytes `wire::encode` produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    bytes: Vec<u8>,
    kind: &'static str,
}

impl Frame {
    fn encode(msg: &Message) -> Option<Frame> {
        match wire::encode(msg) {
            Ok(bytes) => Some(Frame {
                bytes,
                kind: msg.name(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, msg = msg.name(), "a message does not encode");
                None
            }
        }
    }
}

impl SimMessage for Frame {
    fn wire_len(&self) -> usize {
        self.bytes.len()
    }
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn digest(&self, hasher: &mut Fnv64) {
        hasher.write_bytes(&self.bytes);
    }
}

/// A device: its session and its storage.
#[derive(Debug)]
pub struct RealDevice<S> {
    config: DeviceConfig,
    session: DeviceSession,
    storage: S,
    tables: Vec<String>,
    now: u64,
    alive: bool,
    outbox: VecDeque<Frame>,
    events: VecDeque<NodeEvent>,
    /// Per table, when the pull (or subscription) now waiting for the end of its feed was
    /// sent.
    pull_started: BTreeMap<String, u64>,
}

/// The hub: one session per connected device, and its storage.
#[derive(Debug)]
pub struct RealHub<H> {
    config: HubConfig,
    sessions: BTreeMap<NodeId, HubSession>,
    storage: H,
    now: u64,
    alive: bool,
    outbox: VecDeque<Transmit<Frame>>,
    events: VecDeque<NodeEvent>,
}

/// A node of the real engine.
#[derive(Debug)]
pub enum RealNode<S, H> {
    /// The hub.
    Hub(Box<RealHub<H>>),
    /// A device.
    Device(Box<RealDevice<S>>),
}

impl<S: SimDeviceStorage> RealDevice<S> {
    fn drain(&mut self) {
        let now = Millis(self.now);
        while let Some(msg) = self.session.poll_transmit(now) {
            if let Message::Pull(Pull { tables }) | Message::Subscribe(Subscribe { tables }) = &msg
            {
                for t in tables {
                    self.pull_started.entry(t.table.clone()).or_insert(self.now);
                }
            }
            if let Some(f) = Frame::encode(&msg) {
                self.outbox.push_back(f);
            }
        }
        let mut evs = Vec::new();
        while let Some(ev) = self.session.poll_event() {
            match ev {
                DeviceEvent::TableSynced { table } => {
                    let index = self.tables.iter().position(|t| *t == table);
                    evs.push(NodeEvent::SyncCompleted {
                        table: index.and_then(|i| u32::try_from(i).ok()),
                        started_local_ms: self.pull_started.remove(&table),
                    });
                }
                DeviceEvent::StorageFailed { error } => {
                    tracing::warn!(%error, "device storage failed");
                }
                _ => {}
            }
        }
        let mut stored = Vec::new();
        self.storage.drain_events(&mut stored);
        self.events.extend(stored);
        self.events.extend(evs);
    }

    fn edit(&mut self, now: u64, edit: &Edit) -> EditResult {
        self.now = now;
        self.storage.set_now(now);
        match self.storage.edit(now, edit.op, edit.row, edit.kind) {
            Ok(true) => {
                self.session
                    .handle_local_ops(Millis(now), &mut self.storage);
                self.drain();
                EditResult::Committed
            }
            Ok(false) => EditResult::Refused,
            Err(e) => {
                tracing::warn!(error = %e, "device edit failed");
                EditResult::Refused
            }
        }
    }
}

impl<H> RealHub<H> {
    /// The hub's storage.
    pub fn storage(&self) -> &H {
        &self.storage
    }
}

impl<S> RealDevice<S> {
    /// The device's storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}

impl<H: SimHubStorage> RealHub<H> {
    fn drain(&mut self) {
        let now = Millis(self.now);
        let mut changed: Vec<NodeId> = Vec::new();
        for (d, s) in self.sessions.iter_mut() {
            while let Some(msg) = s.poll_transmit(now) {
                if let Some(f) = Frame::encode(&msg) {
                    self.outbox.push_back(Transmit { to: *d, msg: f });
                }
            }
            while let Some(ev) = s.poll_event() {
                match ev {
                    HubEvent::OpsApplied { accepted, .. } if accepted > 0 => changed.push(*d),
                    HubEvent::StorageFailed { error } => {
                        tracing::warn!(%error, "hub storage failed");
                    }
                    _ => {}
                }
            }
        }
        let mut stored = Vec::new();
        self.storage.drain_events(&mut stored);
        self.events.extend(stored);
        for from in changed {
            self.changes(Some(from));
        }
    }

    /// Tell every session (but `except`) whose user's feeds moved which of its tables did,
    /// as the product's change bus does, then drain again.
    fn changes(&mut self, except: Option<NodeId>) {
        let now = Millis(self.now);
        let feeds = self.storage.take_feed_changes();
        for (d, s) in self.sessions.iter_mut() {
            if Some(*d) == except {
                continue;
            }
            let Some(user) = s.principal().map(|p| p.user) else {
                continue;
            };
            let tables = feeds.tables_for(user);
            if !tables.is_empty() {
                s.handle_changes(now, &tables, &mut self.storage);
            }
        }
        self.drain();
    }
}

impl<S: SimDeviceStorage, H: SimHubStorage> SimNode for RealNode<S, H> {
    type Msg = Frame;

    fn handle_connected(&mut self, now: u64, peer: NodeId) {
        match self {
            RealNode::Hub(h) => {
                h.now = now;
                h.sessions
                    .insert(peer, HubSession::new(h.config.clone(), Millis(now)));
                h.drain();
            }
            RealNode::Device(d) => {
                d.now = now;
                d.session.handle_connected(Millis(now));
                d.drain();
            }
        }
    }

    fn handle_disconnected(&mut self, now: u64, peer: NodeId) {
        match self {
            RealNode::Hub(h) => {
                h.now = now;
                h.sessions.remove(&peer);
                h.outbox.retain(|t| t.to != peer);
            }
            RealNode::Device(d) => {
                d.now = now;
                d.outbox.clear();
                d.pull_started.clear();
                d.session.handle_disconnected(Millis(now));
                d.drain();
            }
        }
    }

    fn handle_message(&mut self, now: u64, from: NodeId, msg: Frame) {
        let _span = tracing::trace_span!("real_message", kind = msg.kind).entered();
        match self {
            RealNode::Hub(h) => {
                h.now = now;
                h.storage.set_now(now);
                let Some(s) = h.sessions.get_mut(&from) else {
                    return;
                };
                match wire::decode(&msg.bytes) {
                    Ok((m, _)) => s.handle_message(Millis(now), m, &mut h.storage),
                    Err(e) => s.handle_wire_error(Millis(now), &e),
                }
                h.drain();
            }
            RealNode::Device(d) => {
                d.now = now;
                d.storage.set_now(now);
                match wire::decode(&msg.bytes) {
                    Ok((m, _)) => d.session.handle_message(Millis(now), m, &mut d.storage),
                    Err(e) => d.session.handle_wire_error(Millis(now), &e),
                }
                d.drain();
            }
        }
    }

    fn handle_timeout(&mut self, now: u64) {
        match self {
            RealNode::Hub(h) => {
                h.now = now;
                for s in h.sessions.values_mut() {
                    if s.poll_timeout().is_some_and(|t| t.0 <= now) {
                        s.handle_timeout(Millis(now));
                    }
                }
                h.drain();
            }
            RealNode::Device(d) => {
                d.now = now;
                d.storage.set_now(now);
                if d.session.state() != DeviceState::Idle {
                    d.session.handle_timeout(Millis(now), &mut d.storage);
                }
                d.drain();
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<Transmit<Frame>> {
        match self {
            RealNode::Hub(h) => h.outbox.pop_front(),
            RealNode::Device(d) => d.outbox.pop_front().map(|msg| Transmit { to: HUB, msg }),
        }
    }

    fn poll_event(&mut self) -> Option<NodeEvent> {
        match self {
            RealNode::Hub(h) => h.events.pop_front(),
            RealNode::Device(d) => d.events.pop_front(),
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        match self {
            RealNode::Hub(h) => h
                .sessions
                .values()
                .filter_map(|s| s.poll_timeout())
                .map(|t| t.0)
                .min(),
            RealNode::Device(d) => {
                if !d.alive {
                    return None;
                }
                if d.session.state() == DeviceState::Idle {
                    // Wake when the device wants to connect, so the simulator asks again.
                    d.session
                        .wants_connection_at(&d.storage)
                        .map(|t| t.0)
                        .filter(|t| *t > d.now)
                } else {
                    d.session.poll_timeout().map(|t| t.0)
                }
            }
        }
    }

    fn wants_connection(&self) -> bool {
        match self {
            RealNode::Hub(_) => true,
            RealNode::Device(d) => match d.session.state() {
                DeviceState::Idle => d
                    .session
                    .wants_connection_at(&d.storage)
                    .is_some_and(|t| t.0 <= d.now),
                DeviceState::Handshaking | DeviceState::Ready => true,
                DeviceState::Closed | DeviceState::Halted => false,
            },
        }
    }

    fn crash(&mut self) {
        match self {
            RealNode::Hub(h) => {
                h.alive = false;
                h.sessions.clear();
                h.outbox.clear();
                h.events.clear();
                h.storage.crash();
            }
            RealNode::Device(d) => {
                d.alive = false;
                d.outbox.clear();
                d.events.clear();
                d.pull_started.clear();
                d.storage.crash();
                d.session = DeviceSession::new(d.config.clone());
            }
        }
    }

    fn restart(&mut self, now: u64) {
        match self {
            RealNode::Hub(h) => {
                h.now = now;
                if let Err(e) = h.storage.restart() {
                    tracing::error!(error = %e, "the hub's store does not reopen");
                }
                h.alive = true;
            }
            RealNode::Device(d) => {
                d.now = now;
                if let Err(e) = d.storage.restart() {
                    tracing::error!(error = %e, "a device's store does not reopen");
                }
                d.session = DeviceSession::new(d.config.clone());
                d.alive = true;
            }
        }
    }
}

impl<S: SimDeviceStorage, H: SimHubStorage> Observe for RealNode<S, H> {
    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64)) {
        match self {
            RealNode::Hub(h) => h.storage.for_each_row(f),
            RealNode::Device(d) => d.storage.for_each_row(f),
        }
    }

    fn for_each_row_key(&self, f: &mut dyn FnMut(RowKey)) {
        match self {
            RealNode::Hub(h) => h.storage.for_each_row(&mut |r, _| f(r)),
            RealNode::Device(d) => d.storage.for_each_row_key(f),
        }
    }

    fn for_each_row_key_of(&self, table: u32, f: &mut dyn FnMut(RowKey)) {
        match self {
            RealNode::Hub(h) => h.storage.for_each_row(&mut |r, _| {
                if r.table == table {
                    f(r);
                }
            }),
            RealNode::Device(d) => d.storage.for_each_row_key_of(table, f),
        }
    }

    fn row_digest(&self, row: RowKey) -> Option<u64> {
        match self {
            RealNode::Hub(h) => h.storage.row_digest(row),
            RealNode::Device(d) => d.storage.row_digest(row),
        }
    }

    fn has_op(&self, op: OpId) -> bool {
        match self {
            RealNode::Hub(h) => h.storage.has_op(op),
            RealNode::Device(d) => d.storage.has_op(op),
        }
    }

    fn pending_ops(&self) -> usize {
        match self {
            RealNode::Hub(_) => 0,
            RealNode::Device(d) => d.storage.pending_count(),
        }
    }

    fn has_pending_on(&self, row: RowKey) -> bool {
        match self {
            RealNode::Hub(_) => false,
            RealNode::Device(d) => d.storage.has_pending_on(row),
        }
    }

    fn for_each_cursor(&self, f: &mut dyn FnMut(u32, u64)) {
        if let RealNode::Device(d) = self {
            d.storage.for_each_cursor(f);
        }
    }
}

impl<S: SimDeviceStorage, H: SimHubStorage> FieldNode for RealNode<S, H> {
    fn local_edit(&mut self, now: u64, edit: &Edit) -> EditResult {
        let _span = tracing::trace_span!("real_edit", op = edit.op.0).entered();
        match self {
            RealNode::Hub(h) => {
                h.now = now;
                match h.storage.edit(now, edit.op, edit.row, edit.kind) {
                    Ok(Some(_)) => {
                        h.changes(None);
                        EditResult::Committed
                    }
                    Ok(None) => EditResult::Refused,
                    Err(e) => {
                        tracing::warn!(error = %e, "office edit failed");
                        EditResult::Refused
                    }
                }
            }
            RealNode::Device(d) => d.edit(now, edit),
        }
    }

    fn handle_admin(&mut self, now: u64, event: &AdminEvent) {
        let _span = tracing::debug_span!("real_admin").entered();
        if let RealNode::Hub(h) = self {
            h.now = now;
            match h.storage.admin(now, event) {
                Ok(tables) if !tables.is_empty() => h.changes(None),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "admin change failed"),
            }
        }
    }
}

/// Builds real nodes: a [`ReplicaHub`] and [`StoreDevice`]s, on in-memory stores.
#[derive(Debug)]
pub struct RealFactory {
    seed: u64,
    bug: Option<PlantedBug>,
    registry: SharedRegistry,
    schema: Option<Schema>,
    /// What the hub's setup hands each device: the initial changes per row, the feed
    /// cursor after setup, and per device its token and app.
    initial: Option<Provisioning>,
    device_replica: bool,
}

/// The snapshot devices are provisioned from.
#[derive(Debug)]
struct Provisioning {
    per_row: BTreeMap<RowKey, Vec<fieldsync_store::RemoteOp>>,
    /// The hub's cursor after setup, as the devices store it.
    cursor: u64,
    enrolled: BTreeMap<NodeId, (Vec<u8>, String)>,
}

impl RealFactory {
    /// A factory for a run of `seed`. `bug` plants a bug in the hub's replica (tests
    /// only: it needs the `planted-bugs` feature; `hub-forgets-eviction` is the one the real
    /// engine supports).
    pub fn new(seed: u64, bug: Option<PlantedBug>) -> RealFactory {
        if bug.is_some_and(|b| b != PlantedBug::HubForgetsEviction) {
            tracing::warn!(
                ?bug,
                "the real engine plants only hub-forgets-eviction; this switch does nothing here"
            );
        }
        RealFactory {
            seed,
            bug,
            registry: Rc::new(RefCell::new(Registry::default())),
            schema: None,
            initial: None,
            device_replica: false,
        }
    }

    /// Devices run the replication crate's `DeviceReplica` for the protocol's storage calls
    /// (instead of this module's minimal adapter).
    pub fn with_device_replica(mut self, on: bool) -> RealFactory {
        self.device_replica = on;
        self
    }

    fn schema(&mut self, ctx: &NodeContext<'_>) -> Result<Schema, RealError> {
        if let Some(s) = &self.schema {
            return Ok(s.clone());
        }
        let tables: Vec<(String, u32)> = ctx
            .tables
            .iter()
            .zip(ctx.columns.iter().copied().chain(std::iter::repeat(1)))
            .map(|(t, c)| (t.clone(), c))
            .collect();
        let s = scenario_schema(&tables)?;
        self.schema = Some(s.clone());
        Ok(s)
    }

    fn hub_config(sync: &SyncConfig) -> HubConfig {
        let mut config = HubConfig::new(uuid::Uuid::from_u64_pair(0x4855_4200_0000_0000, 0));
        config.pull_limits.max_items = batch_items(sync).min(config.pull_limits.max_items);
        config
    }

    fn build_hub(&mut self, ctx: &NodeContext<'_>) -> Result<ReplicaHub, RealError> {
        let schema = self.schema(ctx)?;
        let hub = ReplicaHub::create(
            schema,
            self.seed,
            actor_of(self.seed, HUB),
            ctx,
            self.registry.clone(),
            self.bug,
        )?;
        let mut per_row: BTreeMap<RowKey, Vec<fieldsync_store::RemoteOp>> = BTreeMap::new();
        let all: Vec<RowKey> = ctx.world.all_rows().map(|(r, _)| r).collect();
        for op in hub.initial_ops(&all)? {
            if let Some(k) = row_key(op.row) {
                per_row.entry(k).or_default().push(op);
            }
        }
        let enrolled = (1..=ctx.world.devices())
            .filter_map(|i| {
                let d = NodeId(i);
                Some((d, (hub.token(d)?.to_vec(), hub.app_of(d)?)))
            })
            .collect();
        self.initial = Some(Provisioning {
            per_row,
            cursor: hub.start_cursor().0,
            enrolled,
        });
        Ok(hub)
    }
}

/// The node type of the real engine.
pub type RealStoreNode = RealNode<StoreDevice, ReplicaHub>;

impl NodeFactory for RealFactory {
    type Node = RealStoreNode;

    fn hub(&mut self, ctx: &NodeContext<'_>) -> Result<RealStoreNode, ScenarioError> {
        let storage = self
            .build_hub(ctx)
            .map_err(|e| ScenarioError::Engine(format!("the hub: {e}")))?;
        Ok(RealNode::Hub(Box::new(RealHub {
            config: Self::hub_config(ctx.sync),
            sessions: BTreeMap::new(),
            storage,
            now: crate::node::SIM_EPOCH_MS,
            alive: true,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        })))
    }

    fn device(
        &mut self,
        id: NodeId,
        ctx: &NodeContext<'_>,
    ) -> Result<RealStoreNode, ScenarioError> {
        let built = self.schema(ctx).and_then(|schema| {
            let mut s = StoreDevice::create(
                schema,
                actor_of(self.seed, id),
                ctx.tables.to_vec(),
                environment::owner_value(crate::world::Owner::Device(id)),
                self.registry.clone(),
            )?;
            s.use_replica(self.device_replica);
            // In a quarter of the seeds, odd devices compact their log every few acknowledged
            // entries, so runs exercise compaction (the default waits for thousands); the
            // others, the benchmark's seed 1 among them, run the product's default.
            if self.seed % 4 == 3 && id.0 % 2 == 1 {
                s.set_compact_backlog(COMPACTING_DEVICE_BACKLOG);
            }
            if let Some(p) = &self.initial {
                let ops: Vec<fieldsync_store::RemoteOp> = ctx
                    .world
                    .entitled_rows(id)
                    .into_iter()
                    .filter_map(|r| p.per_row.get(&r))
                    .flatten()
                    .cloned()
                    .collect();
                s.seed(&ops, p.cursor)?;
            }
            Ok(s)
        });
        let storage = built.map_err(|e| ScenarioError::Engine(format!("{id}: {e}")))?;
        let did = device_id(id);
        let (token, app) = self
            .initial
            .as_ref()
            .and_then(|p| p.enrolled.get(&id).cloned())
            .unwrap_or_else(|| (Vec::new(), String::new()));
        let minutes =
            interval_minutes(ctx.sync).map_err(|e| ScenarioError::Engine(e.to_string()))?;
        let schedule =
            SyncSchedule::new(ctx.tables.iter().map(|t| (t.clone(), Some(minutes))), &[]);
        let mut config = DeviceConfig::new(did, token, &app, schedule);
        config.live = ctx.sync.live;
        config.push_limits.max_items = batch_items(ctx.sync);
        config.request_timeout = Millis(ctx.sync.request_timeout.0.max(1_000));
        config.rng_seed = self.seed ^ u64::from(id.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Ok(RealNode::Device(Box::new(RealDevice {
            session: DeviceSession::new(config.clone()),
            config,
            storage,
            tables: ctx.tables.to_vec(),
            now: 0,
            alive: true,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            pull_started: BTreeMap::new(),
        })))
    }
}
