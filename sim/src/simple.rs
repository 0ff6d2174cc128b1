//! A small built-in sync protocol, to exercise the simulator until the real one plugs in.
//!
//! Rows are per-column last-writer-wins registers ordered by (Lamport clock, origin) plus a
//! delete tombstone, so replicas converge once they have the same ops. A device pushes its
//! pending ops in batches (the hub acknowledges each op after it is durable), then pulls: it
//! sends its cursor in the hub's log and the rows it holds; the hub answers with evictions (rows
//! that left the device's set), whole rows that entered it, and the ops after the cursor on rows
//! it keeps. Requests are resent after a timeout and are idempotent; a live hub pokes connected
//! devices when something for them changes.
//!
//! [`PlantedBug`] plants a real bug (a test switch) so that tests can show the invariant
//! checker finds it and the shrinker reduces it.

use crate::digest::Fnv64;
use crate::node::{
    AdminEvent, EditKind, EditResult, FieldNode, NodeContext, NodeEvent, NodeFactory, NodeId,
    Observe, OpId, RowKey, SimMessage, SimNode, Transmit, HUB,
};
use crate::world::{Owner, World};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A bug planted on purpose (test switch) to show that the invariant checker finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PlantedBug {
    /// The hub never tells a device to evict a row that left its set (a leak).
    HubForgetsEviction,
    /// The hub acknowledges ops before they are durable (a hub crash loses acknowledged ops).
    AckBeforePersist,
    /// On every reconnect the device starts its session from scratch: cursor back to 0 and
    /// its record of received ops forgotten, so it re-applies what the hub sends again.
    DeviceRewindsCursor,
}

impl std::fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlantedBug::HubForgetsEviction => "hub-forgets-eviction",
            PlantedBug::AckBeforePersist => "ack-before-persist",
            PlantedBug::DeviceRewindsCursor => "device-rewinds-cursor",
        })
    }
}

impl std::str::FromStr for PlantedBug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hub-forgets-eviction" => Ok(PlantedBug::HubForgetsEviction),
            "ack-before-persist" => Ok(PlantedBug::AckBeforePersist),
            "device-rewinds-cursor" => Ok(PlantedBug::DeviceRewindsCursor),
            _ => Err(format!(
                "unknown bug `{s}` (hub-forgets-eviction, ack-before-persist, device-rewinds-cursor)"
            )),
        }
    }
}

/// Settings of the built-in nodes.
#[derive(Clone, Debug)]
struct Config {
    batch: usize,
    interval_ms: u64,
    timeout_ms: u64,
    live: bool,
    bug: Option<PlantedBug>,
}

/// Builds [`SimpleNode`]s.
#[derive(Clone, Debug, Default)]
pub struct SimpleFactory {
    /// The planted bug, if any (tests only).
    pub bug: Option<PlantedBug>,
}

impl SimpleFactory {
    fn config(&self, ctx: &NodeContext<'_>) -> Config {
        Config {
            batch: ctx.sync.batch.max(1) as usize,
            interval_ms: ctx.sync.interval.0.max(1),
            timeout_ms: ctx.sync.request_timeout.0.max(1),
            live: ctx.sync.live,
            bug: self.bug,
        }
    }
}

impl NodeFactory for SimpleFactory {
    type Node = SimpleNode;

    fn hub(&mut self, ctx: &NodeContext<'_>) -> Result<SimpleNode, crate::ScenarioError> {
        let rows: BTreeMap<RowKey, RowState> = ctx
            .world
            .all_rows()
            .map(|(r, _)| (r, RowState::default()))
            .collect();
        Ok(SimpleNode::Hub(Box::new(Hub {
            cfg: self.config(ctx),
            world: ctx.world.clone(),
            initial: rows.clone(),
            rows,
            log: Vec::new(),
            row_log: BTreeMap::new(),
            known: BTreeSet::new(),
            durable_len: 0,
            lamport: 0,
            connected: BTreeSet::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            flush_at: None,
        })))
    }

    fn device(
        &mut self,
        id: NodeId,
        ctx: &NodeContext<'_>,
    ) -> Result<SimpleNode, crate::ScenarioError> {
        let rows = ctx
            .world
            .entitled_rows(id)
            .into_iter()
            .map(|r| (r, RowState::default()))
            .collect();
        Ok(SimpleNode::Device(Box::new(Device {
            id,
            cfg: self.config(ctx),
            rows,
            known: BTreeSet::new(),
            pending: VecDeque::new(),
            cursor: 0,
            lamport: 0,
            connected: false,
            phase: Phase::Idle,
            sync_started: None,
            next_sync: 0,
            dirty: false,
            want: false,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        })))
    }
}

/// One op of the built-in protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Run-unique id.
    pub id: OpId,
    /// Node that made it.
    pub origin: NodeId,
    /// Row.
    pub row: RowKey,
    /// Lamport clock of the origin when made.
    pub lamport: u64,
    /// What it does.
    pub kind: EditKind,
}

impl Op {
    fn digest(&self, h: &mut Fnv64) {
        h.write_u64(self.id.0);
        h.write_u32(self.origin.0);
        digest_row_key(h, self.row);
        h.write_u64(self.lamport);
        match self.kind {
            EditKind::Create => h.write_u8(0),
            EditKind::Update { column, value } => {
                h.write_u8(1);
                h.write_u32(column);
                h.write_u64(value);
            }
            EditKind::Delete => h.write_u8(2),
        }
    }
}

fn digest_row_key(h: &mut Fnv64, r: RowKey) {
    h.write_u32(r.table);
    h.write_u64(r.id);
}

/// A row: per-column last-writer-wins registers, a tombstone, and the ops folded in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowState {
    cols: BTreeMap<u32, (u64, u32, u64)>,
    deleted: bool,
    ops: BTreeSet<OpId>,
}

impl RowState {
    /// Apply one op; returns true when it lost to a concurrent write (a conflict).
    fn apply(&mut self, op: &Op) -> bool {
        self.ops.insert(op.id);
        match op.kind {
            EditKind::Create => false,
            EditKind::Delete => {
                self.deleted = true;
                false
            }
            EditKind::Update { column, value } => {
                let key = (op.lamport, op.origin.0, value);
                match self.cols.get(&column) {
                    Some(cur) if *cur > key => true,
                    _ => {
                        self.cols.insert(column, key);
                        false
                    }
                }
            }
        }
    }
    /// Join another state of the same row into this one.
    fn merge(&mut self, other: &RowState) {
        for (c, v) in &other.cols {
            let e = self.cols.entry(*c).or_insert(*v);
            if *v > *e {
                *e = *v;
            }
        }
        self.deleted |= other.deleted;
        self.ops.extend(other.ops.iter().copied());
    }
    /// Digest of the visible content (values and tombstone).
    fn content_digest(&self) -> u64 {
        let mut h = Fnv64::new();
        h.write_u8(u8::from(self.deleted));
        for (c, (_, _, v)) in &self.cols {
            h.write_u32(*c);
            h.write_u64(*v);
        }
        h.finish()
    }
    fn wire_len(&self) -> usize {
        16 + 20 * self.cols.len() + 8 * self.ops.len()
    }
    fn digest(&self, h: &mut Fnv64) {
        h.write_u8(u8::from(self.deleted));
        for (c, (l, o, v)) in &self.cols {
            h.write_u32(*c);
            h.write_u64(*l);
            h.write_u32(*o);
            h.write_u64(*v);
        }
        for op in &self.ops {
            h.write_u64(op.0);
        }
    }
}

/// Messages of the built-in protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimpleMsg {
    /// Device → hub: a batch of pending ops.
    Push {
        /// The ops, oldest first.
        ops: Vec<Op>,
    },
    /// Hub → device: which pushed ops are durable on the hub, which were refused.
    Ack {
        /// Accepted (or already known) ops.
        acked: Vec<OpId>,
        /// Refused ops and their rows.
        rejected: Vec<(OpId, RowKey)>,
    },
    /// Device → hub: send me what I miss.
    Pull {
        /// Position in the hub's log up to which the device has everything.
        cursor: u64,
        /// Rows the device holds.
        held: Vec<RowKey>,
    },
    /// Hub → device: what the device misses.
    PullReply {
        /// New cursor.
        cursor: u64,
        /// Ops on rows the device holds.
        ops: Vec<Op>,
        /// Whole rows that entered the device's set.
        rows: Vec<(RowKey, RowState)>,
        /// Rows that left the device's set.
        evict: Vec<RowKey>,
        /// Whether more is waiting (pull again).
        more: bool,
    },
    /// Hub → device: something changed for you, sync.
    Poke,
}

impl SimMessage for SimpleMsg {
    fn wire_len(&self) -> usize {
        match self {
            SimpleMsg::Push { ops } => 8 + 48 * ops.len(),
            SimpleMsg::Ack { acked, rejected } => 8 + 8 * acked.len() + 20 * rejected.len(),
            SimpleMsg::Pull { held, .. } => 16 + 12 * held.len(),
            SimpleMsg::PullReply {
                ops, rows, evict, ..
            } => {
                24 + 48 * ops.len()
                    + rows.iter().map(|(_, s)| 12 + s.wire_len()).sum::<usize>()
                    + 12 * evict.len()
            }
            SimpleMsg::Poke => 4,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            SimpleMsg::Push { .. } => "push",
            SimpleMsg::Ack { .. } => "ack",
            SimpleMsg::Pull { .. } => "pull",
            SimpleMsg::PullReply { .. } => "pull-reply",
            SimpleMsg::Poke => "poke",
        }
    }
    fn digest(&self, h: &mut Fnv64) {
        match self {
            SimpleMsg::Push { ops } => {
                h.write_u8(1);
                h.write_u64(ops.len() as u64);
                ops.iter().for_each(|o| o.digest(h));
            }
            SimpleMsg::Ack { acked, rejected } => {
                h.write_u8(2);
                h.write_u64(acked.len() as u64);
                acked.iter().for_each(|o| h.write_u64(o.0));
                h.write_u64(rejected.len() as u64);
                for (o, r) in rejected {
                    h.write_u64(o.0);
                    digest_row_key(h, *r);
                }
            }
            SimpleMsg::Pull { cursor, held } => {
                h.write_u8(3);
                h.write_u64(*cursor);
                h.write_u64(held.len() as u64);
                held.iter().for_each(|r| digest_row_key(h, *r));
            }
            SimpleMsg::PullReply {
                cursor,
                ops,
                rows,
                evict,
                more,
            } => {
                h.write_u8(4);
                h.write_u64(*cursor);
                h.write_u64(ops.len() as u64);
                ops.iter().for_each(|o| o.digest(h));
                h.write_u64(rows.len() as u64);
                for (r, s) in rows {
                    digest_row_key(h, *r);
                    s.digest(h);
                }
                h.write_u64(evict.len() as u64);
                evict.iter().for_each(|r| digest_row_key(h, *r));
                h.write_u8(u8::from(*more));
            }
            SimpleMsg::Poke => h.write_u8(5),
        }
    }
}

/// A built-in node: the hub or a device.
#[derive(Debug)]
pub enum SimpleNode {
    /// The hub.
    Hub(Box<Hub>),
    /// A device.
    Device(Box<Device>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Pushing { ops: Vec<Op>, deadline: u64 },
    Pulling { deadline: u64 },
}

/// The built-in device.
#[derive(Debug)]
pub struct Device {
    id: NodeId,
    cfg: Config,
    // durable
    rows: BTreeMap<RowKey, RowState>,
    known: BTreeSet<OpId>,
    pending: VecDeque<Op>,
    cursor: u64,
    lamport: u64,
    // volatile
    connected: bool,
    phase: Phase,
    sync_started: Option<u64>,
    next_sync: u64,
    dirty: bool,
    want: bool,
    outbox: VecDeque<Transmit<SimpleMsg>>,
    events: VecDeque<NodeEvent>,
}

impl Device {
    fn send(&mut self, msg: SimpleMsg) {
        self.outbox.push_back(Transmit { to: HUB, msg });
    }

    fn start_sync(&mut self, now: u64) {
        if !self.connected || self.phase != Phase::Idle {
            return;
        }
        self.sync_started.get_or_insert(now);
        self.dirty = false;
        if self.pending.is_empty() {
            self.send_pull(now);
        } else {
            self.send_push(now);
        }
    }

    fn send_push(&mut self, now: u64) {
        let ops: Vec<Op> = self.pending.iter().take(self.cfg.batch).cloned().collect();
        self.send(SimpleMsg::Push { ops: ops.clone() });
        self.phase = Phase::Pushing {
            ops,
            deadline: now + self.cfg.timeout_ms,
        };
    }

    fn send_pull(&mut self, now: u64) {
        let held = self.rows.keys().copied().collect();
        self.send(SimpleMsg::Pull {
            cursor: self.cursor,
            held,
        });
        self.phase = Phase::Pulling {
            deadline: now + self.cfg.timeout_ms,
        };
    }

    fn on_ack(&mut self, now: u64, acked: Vec<OpId>, rejected: Vec<(OpId, RowKey)>) {
        let acked: BTreeSet<OpId> = acked.into_iter().collect();
        let rejected_ids: BTreeMap<OpId, RowKey> = rejected.into_iter().collect();
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for op in self.pending.drain(..) {
            if acked.contains(&op.id) {
                self.events.push_back(NodeEvent::Acked { op: op.id });
            } else if let Some(row) = rejected_ids.get(&op.id) {
                self.events.push_back(NodeEvent::Rejected {
                    op: op.id,
                    row: *row,
                });
                // Roll back: drop our copy; if the row is ours, the next pull brings the hub's.
                self.rows.remove(row);
            } else {
                kept.push_back(op);
            }
        }
        self.pending = kept;
        if let Phase::Pushing { ops, .. } = &self.phase {
            let done = ops
                .iter()
                .all(|o| acked.contains(&o.id) || rejected_ids.contains_key(&o.id));
            if done {
                self.phase = Phase::Idle;
                if self.pending.is_empty() {
                    self.send_pull(now);
                } else {
                    self.send_push(now);
                }
            }
        }
    }

    fn on_pull_reply(
        &mut self,
        now: u64,
        cursor: u64,
        ops: Vec<Op>,
        rows: Vec<(RowKey, RowState)>,
        evict: Vec<RowKey>,
        more: bool,
    ) {
        if !matches!(self.phase, Phase::Pulling { .. }) {
            return; // a stale (resent) reply; the current request will be answered
        }
        for (row, state) in rows {
            for op in &state.ops {
                if self.known.insert(*op) {
                    self.events.push_back(NodeEvent::Applied { op: *op, row });
                }
            }
            self.rows.entry(row).or_default().merge(&state);
        }
        for row in evict {
            if !self.pending.iter().any(|o| o.row == row) && self.rows.remove(&row).is_some() {
                self.events.push_back(NodeEvent::Evicted { row });
            }
        }
        for op in ops {
            self.lamport = self.lamport.max(op.lamport);
            if self.known.insert(op.id) {
                self.rows.entry(op.row).or_default().apply(&op);
                self.events.push_back(NodeEvent::Applied {
                    op: op.id,
                    row: op.row,
                });
            }
        }
        self.cursor = self.cursor.max(cursor);
        if more {
            self.send_pull(now);
            return;
        }
        self.phase = Phase::Idle;
        if let Some(started) = self.sync_started.take() {
            self.events.push_back(NodeEvent::SyncCompleted {
                table: None,
                started_local_ms: Some(started),
            });
        }
        self.next_sync = now + self.cfg.interval_ms;
        self.want = false;
        if self.dirty || !self.pending.is_empty() {
            self.start_sync(now);
        }
    }

    fn local_edit(&mut self, now: u64, edit: &crate::node::Edit) -> EditResult {
        match edit.kind {
            EditKind::Create => {
                if self.rows.contains_key(&edit.row) {
                    return EditResult::Refused;
                }
            }
            _ => match self.rows.get(&edit.row) {
                Some(r) if !r.deleted => {}
                _ => return EditResult::Refused,
            },
        }
        self.lamport += 1;
        let op = Op {
            id: edit.op,
            origin: self.id,
            row: edit.row,
            lamport: self.lamport,
            kind: edit.kind,
        };
        self.rows.entry(edit.row).or_default().apply(&op);
        self.known.insert(op.id);
        self.pending.push_back(op);
        self.dirty = true;
        self.want = true;
        self.start_sync(now);
        EditResult::Committed
    }
}

/// The built-in hub.
#[derive(Debug)]
pub struct Hub {
    cfg: Config,
    world: World,
    initial: BTreeMap<RowKey, RowState>,
    rows: BTreeMap<RowKey, RowState>,
    log: Vec<Op>,
    row_log: BTreeMap<RowKey, Vec<usize>>,
    known: BTreeSet<OpId>,
    durable_len: usize,
    lamport: u64,
    connected: BTreeSet<NodeId>,
    outbox: VecDeque<Transmit<SimpleMsg>>,
    events: VecDeque<NodeEvent>,
    flush_at: Option<u64>,
}

impl Hub {
    fn apply(&mut self, op: Op) {
        self.lamport = self.lamport.max(op.lamport);
        let conflict = self.rows.entry(op.row).or_default().apply(&op);
        if conflict {
            self.events.push_back(NodeEvent::Conflict { row: op.row });
        }
        self.known.insert(op.id);
        if !op.origin.is_hub() {
            self.events.push_back(NodeEvent::Applied {
                op: op.id,
                row: op.row,
            });
        }
        self.row_log.entry(op.row).or_default().push(self.log.len());
        self.log.push(op);
    }

    fn persist(&mut self, now: u64) {
        if self.cfg.bug == Some(PlantedBug::AckBeforePersist) {
            if self.flush_at.is_none() && self.durable_len < self.log.len() {
                self.flush_at = Some(now + 2_000);
            }
        } else {
            self.durable_len = self.log.len();
        }
    }

    fn poke(&mut self, except: Option<NodeId>, rows: &BTreeSet<RowKey>) {
        if !self.cfg.live || rows.is_empty() {
            return;
        }
        // Owned rows concern their owner only; shared rows every connected device.
        let mut targets: BTreeSet<NodeId> = BTreeSet::new();
        for r in rows {
            match self.world.owner(*r) {
                Some(Owner::Device(d))
                    if self.connected.contains(&d) && self.world.entitled(d, *r) =>
                {
                    targets.insert(d);
                }
                Some(Owner::Shared) => {
                    for d in &self.connected {
                        if self.world.entitled(*d, *r) {
                            targets.insert(*d);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(e) = except {
            targets.remove(&e);
        }
        for d in targets {
            self.outbox.push_back(Transmit {
                to: d,
                msg: SimpleMsg::Poke,
            });
        }
    }

    fn on_push(&mut self, now: u64, from: NodeId, ops: Vec<Op>) {
        let mut acked = Vec::new();
        let mut rejected = Vec::new();
        let mut touched = BTreeSet::new();
        for op in ops {
            if self.known.contains(&op.id) {
                acked.push(op.id);
                continue;
            }
            let allowed = match op.kind {
                EditKind::Create => match self.world.owner(op.row) {
                    None => {
                        self.world.set_owner(op.row, Owner::Device(from));
                        true
                    }
                    Some(Owner::Device(d)) => d == from,
                    Some(Owner::Shared) => false,
                },
                _ => self.world.entitled(from, op.row),
            };
            if allowed {
                acked.push(op.id);
                touched.insert(op.row);
                self.apply(op);
            } else {
                rejected.push((op.id, op.row));
            }
        }
        self.persist(now);
        self.outbox.push_back(Transmit {
            to: from,
            msg: SimpleMsg::Ack { acked, rejected },
        });
        self.poke(Some(from), &touched);
    }

    fn on_pull(&mut self, from: NodeId, cursor: u64, held: Vec<RowKey>) {
        let held: BTreeSet<RowKey> = held.into_iter().collect();
        let forget = self.cfg.bug == Some(PlantedBug::HubForgetsEviction);
        let evict: Vec<RowKey> = if forget {
            Vec::new()
        } else {
            held.iter()
                .copied()
                .filter(|r| !self.world.entitled(from, *r))
                .collect()
        };
        let batch = self.cfg.batch;
        let mut more = false;
        let mut rows = Vec::new();
        for r in self.world.entitled_rows(from) {
            if held.contains(&r) {
                continue;
            }
            if let Some(state) = self.rows.get(&r) {
                if rows.len() >= batch {
                    more = true;
                    break;
                }
                rows.push((r, state.clone()));
            }
        }
        let start = (cursor as usize).min(self.log.len());
        // Log positions after the cursor of ops on rows the device holds (and may see).
        let mut positions: Vec<usize> = Vec::new();
        for r in &held {
            if !forget && !self.world.entitled(from, *r) {
                continue;
            }
            if let Some(v) = self.row_log.get(r) {
                let k = v.partition_point(|p| *p < start);
                positions.extend_from_slice(&v[k..]);
            }
        }
        positions.sort_unstable();
        let mut ops = Vec::new();
        let mut new_cursor = self.log.len() as u64;
        for p in positions {
            let op = &self.log[p];
            if op.origin == from {
                continue;
            }
            if ops.len() >= batch {
                new_cursor = p as u64;
                more = true;
                break;
            }
            ops.push(op.clone());
        }
        self.outbox.push_back(Transmit {
            to: from,
            msg: SimpleMsg::PullReply {
                cursor: new_cursor,
                ops,
                rows,
                evict,
                more,
            },
        });
    }

    fn crash(&mut self) {
        self.connected.clear();
        self.outbox.clear();
        self.events.clear();
        self.flush_at = None;
        if self.durable_len < self.log.len() {
            // What was not durable is gone: rebuild from the durable prefix of the log.
            self.log.truncate(self.durable_len);
            self.rows = self.initial.clone();
            self.known.clear();
            self.row_log.clear();
            let log = std::mem::take(&mut self.log);
            for (i, op) in log.iter().enumerate() {
                self.known.insert(op.id);
                self.rows.entry(op.row).or_default().apply(op);
                self.row_log.entry(op.row).or_default().push(i);
            }
            self.log = log;
        }
    }
}

impl SimNode for SimpleNode {
    type Msg = SimpleMsg;

    fn handle_connected(&mut self, now: u64, peer: NodeId) {
        match self {
            SimpleNode::Hub(h) => {
                h.connected.insert(peer);
            }
            SimpleNode::Device(d) => {
                d.connected = true;
                d.phase = Phase::Idle;
                if d.cfg.bug == Some(PlantedBug::DeviceRewindsCursor) {
                    d.cursor = 0;
                    let own: BTreeSet<OpId> = d.pending.iter().map(|o| o.id).collect();
                    d.known = own;
                }
                d.start_sync(now);
            }
        }
    }

    fn handle_disconnected(&mut self, _now: u64, peer: NodeId) {
        match self {
            SimpleNode::Hub(h) => {
                h.connected.remove(&peer);
            }
            SimpleNode::Device(d) => {
                d.connected = false;
                d.phase = Phase::Idle;
                d.sync_started = None;
            }
        }
    }

    fn handle_message(&mut self, now: u64, from: NodeId, msg: SimpleMsg) {
        match self {
            SimpleNode::Hub(h) => match msg {
                SimpleMsg::Push { ops } => h.on_push(now, from, ops),
                SimpleMsg::Pull { cursor, held } => h.on_pull(from, cursor, held),
                _ => tracing::debug!(from = %from, "hub ignores an unexpected message"),
            },
            SimpleNode::Device(d) => match msg {
                SimpleMsg::Ack { acked, rejected } => d.on_ack(now, acked, rejected),
                SimpleMsg::PullReply {
                    cursor,
                    ops,
                    rows,
                    evict,
                    more,
                } => d.on_pull_reply(now, cursor, ops, rows, evict, more),
                SimpleMsg::Poke => {
                    d.dirty = true;
                    d.start_sync(now);
                }
                _ => tracing::debug!("device ignores an unexpected message"),
            },
        }
    }

    fn handle_timeout(&mut self, now: u64) {
        match self {
            SimpleNode::Hub(h) => {
                if h.flush_at.is_some_and(|t| t <= now) {
                    h.flush_at = None;
                    h.durable_len = h.log.len();
                }
            }
            SimpleNode::Device(d) => match d.phase.clone() {
                Phase::Pushing { ops, deadline } if deadline <= now => {
                    d.send(SimpleMsg::Push { ops: ops.clone() });
                    d.phase = Phase::Pushing {
                        ops,
                        deadline: now + d.cfg.timeout_ms,
                    };
                }
                Phase::Pulling { deadline } if deadline <= now => d.send_pull(now),
                Phase::Idle if d.next_sync <= now => {
                    d.next_sync = now + d.cfg.interval_ms;
                    if d.connected {
                        d.start_sync(now);
                    } else {
                        d.want = true;
                    }
                }
                _ => {}
            },
        }
    }

    fn poll_transmit(&mut self) -> Option<Transmit<SimpleMsg>> {
        match self {
            SimpleNode::Hub(h) => h.outbox.pop_front(),
            SimpleNode::Device(d) => d.outbox.pop_front(),
        }
    }

    fn poll_event(&mut self) -> Option<NodeEvent> {
        match self {
            SimpleNode::Hub(h) => h.events.pop_front(),
            SimpleNode::Device(d) => d.events.pop_front(),
        }
    }

    fn poll_timeout(&self) -> Option<u64> {
        match self {
            SimpleNode::Hub(h) => h.flush_at,
            SimpleNode::Device(d) => match d.phase {
                Phase::Pushing { deadline, .. } | Phase::Pulling { deadline } => Some(deadline),
                Phase::Idle => {
                    if d.connected || !d.cfg.live {
                        Some(d.next_sync)
                    } else {
                        None
                    }
                }
            },
        }
    }

    fn wants_connection(&self) -> bool {
        match self {
            SimpleNode::Hub(_) => true,
            SimpleNode::Device(d) => {
                d.cfg.live || d.want || !d.pending.is_empty() || d.phase != Phase::Idle
            }
        }
    }

    fn crash(&mut self) {
        match self {
            SimpleNode::Hub(h) => h.crash(),
            SimpleNode::Device(d) => {
                d.connected = false;
                d.phase = Phase::Idle;
                d.sync_started = None;
                d.outbox.clear();
                d.events.clear();
            }
        }
    }

    fn restart(&mut self, now: u64) {
        if let SimpleNode::Device(d) = self {
            d.next_sync = now;
            d.want = true;
        }
    }
}

impl Observe for SimpleNode {
    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64)) {
        let rows = match self {
            SimpleNode::Hub(h) => &h.rows,
            SimpleNode::Device(d) => &d.rows,
        };
        for (k, v) in rows {
            f(*k, v.content_digest());
        }
    }
    fn for_each_row_key(&self, f: &mut dyn FnMut(RowKey)) {
        let rows = match self {
            SimpleNode::Hub(h) => &h.rows,
            SimpleNode::Device(d) => &d.rows,
        };
        rows.keys().for_each(|k| f(*k));
    }
    fn row_digest(&self, row: RowKey) -> Option<u64> {
        let rows = match self {
            SimpleNode::Hub(h) => &h.rows,
            SimpleNode::Device(d) => &d.rows,
        };
        rows.get(&row).map(RowState::content_digest)
    }
    fn has_op(&self, op: OpId) -> bool {
        match self {
            SimpleNode::Hub(h) => h.known.contains(&op),
            SimpleNode::Device(d) => d.known.contains(&op),
        }
    }
    fn pending_ops(&self) -> usize {
        match self {
            SimpleNode::Hub(_) => 0,
            SimpleNode::Device(d) => d.pending.len(),
        }
    }
    fn has_pending_on(&self, row: RowKey) -> bool {
        match self {
            SimpleNode::Hub(_) => false,
            SimpleNode::Device(d) => d.pending.iter().any(|o| o.row == row),
        }
    }
    fn for_each_cursor(&self, f: &mut dyn FnMut(u32, u64)) {
        if let SimpleNode::Device(d) = self {
            f(0, d.cursor);
        }
    }
}

impl FieldNode for SimpleNode {
    fn local_edit(&mut self, now: u64, edit: &crate::node::Edit) -> EditResult {
        match self {
            SimpleNode::Device(d) => d.local_edit(now, edit),
            SimpleNode::Hub(h) => {
                match h.rows.get(&edit.row) {
                    Some(r) if !r.deleted && edit.kind != EditKind::Create => {}
                    _ => return EditResult::Refused,
                }
                h.lamport += 1;
                let op = Op {
                    id: edit.op,
                    origin: HUB,
                    row: edit.row,
                    lamport: h.lamport,
                    kind: edit.kind,
                };
                h.apply(op);
                h.persist(now);
                let touched = BTreeSet::from([edit.row]);
                h.poke(None, &touched);
                if h.durable_len == h.log.len() {
                    EditResult::Committed
                } else {
                    EditResult::Volatile
                }
            }
        }
    }

    fn handle_admin(&mut self, _now: u64, event: &AdminEvent) {
        if let SimpleNode::Hub(h) = self {
            let mut affected: Vec<NodeId> = Vec::new();
            match event {
                AdminEvent::Reassign { row, to } => {
                    if let Some(Owner::Device(old)) = h.world.owner(*row) {
                        affected.push(old);
                    }
                    affected.push(*to);
                }
                AdminEvent::SetProfile { device, .. } | AdminEvent::SetRole { device, .. } => {
                    affected.push(*device)
                }
            }
            h.world.apply(event);
            if h.cfg.live {
                for d in affected {
                    if h.connected.contains(&d) {
                        h.outbox.push_back(Transmit {
                            to: d,
                            msg: SimpleMsg::Poke,
                        });
                    }
                }
            }
        }
    }
}
