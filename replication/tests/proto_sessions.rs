//! The sans-IO sessions driven end to end: an in-memory reference implementation of both
//! storage traits (`BTreeMap`s with op ids, no automerge), a driver that shuttles frames between
//! one hub and N devices with a fake clock (like quinn-proto's `Pair`), unit tests of each
//! behaviour, and a proptest with message loss, duplication, reordering, corruption,
//! disconnects and restarts.

// Test helpers outside #[test] fns too: a panic here is a failed test, not a crash in the field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fieldsync_replication::proto::messages::{
    CloseCode, Cursor, DeviceId, Message, Operation, Ping, PushOp, Rejection, RejectionKind,
    RowChange, RowDoc,
};
use fieldsync_replication::proto::{
    BatchLimits, BlobSlice, ConflictPolicies, ConflictPolicy, DeviceConfig, DeviceEvent,
    DeviceSession, DeviceState, DeviceStorage, HubConfig, HubEvent, HubSession, HubState,
    HubStorage, Millis, Principal, PullChunk, PushOutcome, Refusal, StorageError, SyncErrorRecord,
    SyncSchedule, UploadOutcome,
};
use fieldsync_replication::wire::{self, FrameDecoder};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The reference model: rows are sets of last-writer-wins column ops.
// ---------------------------------------------------------------------------------------------

/// Tables every device's profile holds; `secret` exists on the hub but is in no profile.
const PROFILE: [&str; 3] = ["task", "note", "job"];
const HUB_ACTOR: u64 = 0;

type OpId = (u64, u64);
type Key = (String, Uuid);

/// One column write: the change bytes of the reference model (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RefOp {
    actor: u64,
    counter: u64,
    lamport: u64,
    column: String,
    value: i64,
    /// The hub feed position the writer had seen for the table (concurrency detection).
    base: u64,
}

impl RefOp {
    fn id(&self) -> OpId {
        (self.actor, self.counter)
    }
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap()
    }
    fn decode(bytes: &[u8]) -> Option<RefOp> {
        serde_json::from_slice(bytes).ok()
    }
}

fn winner<'a>(ops: impl Iterator<Item = &'a RefOp>, column: &str) -> Option<&'a RefOp> {
    ops.filter(|o| o.column == column)
        .max_by_key(|o| (o.lamport, o.actor))
}

fn materialize<'a>(ops: impl Iterator<Item = &'a RefOp>) -> BTreeMap<String, i64> {
    let mut best: BTreeMap<String, &RefOp> = BTreeMap::new();
    for o in ops {
        let e = best.entry(o.column.clone()).or_insert(o);
        if (o.lamport, o.actor) > (e.lamport, e.actor) {
            *e = o;
        }
    }
    best.into_iter().map(|(c, o)| (c, o.value)).collect()
}

fn export(ops: &[RefOp]) -> Vec<u8> {
    serde_json::to_vec(ops).unwrap()
}

fn user_id(n: i64) -> Uuid {
    Uuid::from_u128(0x1000 + n as u128)
}

// ----- hub -----

#[derive(Debug, Default, Clone)]
struct RefHub {
    /// device → (token, user number)
    devices: BTreeMap<DeviceId, (Vec<u8>, i64)>,
    /// The feed: entry i (1-based) is `log[i - 1]`.
    log: Vec<(String, Uuid, RefOp)>,
    /// Row → op id → (log index, op).
    rows: BTreeMap<Key, BTreeMap<OpId, (u64, RefOp)>>,
    held: BTreeSet<OpId>,
    counter: u64,
    blobs: BTreeMap<[u8; 32], Vec<u8>>,
    fail: bool,
    resolutions: u64,
    /// Ops refused once, with the answer given.
    refused: BTreeMap<OpId, PushOutcome>,
    /// Where each pull started: (table, after).
    reads: Vec<(String, Cursor)>,
}

impl RefHub {
    fn user_of(&self, who: &Principal) -> i64 {
        self.devices.get(&who.device).map_or(-1, |d| d.1)
    }

    fn append(&mut self, table: &str, row: Uuid, op: RefOp) {
        self.log.push((table.to_string(), row, op.clone()));
        let index = self.log.len() as u64;
        self.held.insert(op.id());
        self.rows
            .entry((table.to_string(), row))
            .or_default()
            .insert(op.id(), (index, op));
    }

    fn ops_at(&self, key: &Key, at: u64) -> Vec<RefOp> {
        self.rows
            .get(key)
            .map(|m| {
                m.values()
                    .filter(|(i, _)| *i <= at)
                    .map(|(_, o)| o.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn member_at(&self, key: &Key, user: i64, at: u64) -> bool {
        let ops = self.ops_at(key, at);
        winner(ops.iter(), "owner").is_some_and(|o| o.value == user)
    }

    fn current(&self, key: &Key) -> Vec<RefOp> {
        self.ops_at(key, u64::MAX)
    }

    /// The hub's Lamport clock: past every op it holds.
    fn max_lamport(&self) -> u64 {
        self.log
            .iter()
            .map(|(_, _, o)| o.lamport)
            .max()
            .unwrap_or(0)
    }

    /// A server-side edit (an admin, a flow): the hub's own op.
    fn server_edit(&mut self, table: &str, row: Uuid, column: &str, value: i64) {
        self.counter += 1;
        let op = RefOp {
            actor: HUB_ACTOR,
            counter: self.counter,
            lamport: self.max_lamport() + 1,
            column: column.into(),
            value,
            base: self.log.len() as u64,
        };
        self.append(table, row, op);
    }

    /// Rows in the device's set now, materialized.
    fn set_of(&self, user: i64) -> BTreeMap<Key, BTreeSet<OpId>> {
        self.rows
            .keys()
            .filter(|k| PROFILE.contains(&k.0.as_str()) && self.member_at(k, user, u64::MAX))
            .map(|k| (k.clone(), self.rows[k].keys().copied().collect()))
            .collect()
    }
}

impl HubStorage for RefHub {
    fn authenticate(
        &mut self,
        device: DeviceId,
        token: &[u8],
        _app: &str,
    ) -> Result<Result<Principal, Refusal>, StorageError> {
        match self.devices.get(&device) {
            Some((t, user)) if t == token => Ok(Ok(Principal {
                device,
                user: user_id(*user),
                app: "field-service".into(),
            })),
            _ => Ok(Err(Refusal {
                code: CloseCode::UNAUTHORIZED,
                message: "unknown device or bad token".into(),
            })),
        }
    }

    fn row_copy_withheld(&mut self, _: &Principal, _: &str, _: Uuid) -> Result<(), StorageError> {
        // The reference hub keeps no record of the copies it sent (its rows are small enough
        // never to be withheld here): nothing to forget.
        Ok(())
    }

    fn apply_push(
        &mut self,
        _now: Millis,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
    ) -> Result<PushOutcome, StorageError> {
        if self.fail {
            return Err(StorageError::Unavailable("disk full".into()));
        }
        let Some(rop) = RefOp::decode(&op.change) else {
            return Ok(reject(
                Operation::Write,
                RejectionKind::Validation,
                "undecodable",
                None,
            ));
        };
        if self.held.contains(&rop.id()) {
            return Ok(PushOutcome::Accepted);
        }
        if let Some(outcome) = self.refused.get(&rop.id()) {
            return Ok(outcome.clone());
        }
        let id = rop.id();
        let outcome = self.judge(who, policy, op, rop)?;
        if let PushOutcome::Rejected { .. } = &outcome {
            // Decided once: a re-sent push gets the same answer.
            self.refused.insert(id, outcome.clone());
        }
        Ok(outcome)
    }

    fn pull(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError> {
        self.reads.push((table.to_string(), after));
        self.pull_chunk(who, table, after, limits)
    }

    fn blob_chunk(
        &mut self,
        _who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        Ok(self.blobs.get(sha256).map(|b| {
            let start = (offset as usize).min(b.len());
            let end = (start + max_len).min(b.len());
            BlobSlice {
                total: b.len() as u64,
                data: b[start..end].to_vec(),
            }
        }))
    }
    // Uploads are the real replica's (tests/replica_sync.rs); the reference hub takes none.
    fn put_blob_chunk(
        &mut self,
        _: Millis,
        _: &Principal,
        _: &[u8; 32],
        _: u64,
        _: u64,
        _: &[u8],
    ) -> Result<UploadOutcome, StorageError> {
        Ok(UploadOutcome::Refused(
            "the reference hub takes no uploads".into(),
        ))
    }
}

impl RefHub {
    /// The authority: privilege and row-set checks, conflict policies, then apply.
    fn judge(
        &mut self,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
        rop: RefOp,
    ) -> Result<PushOutcome, StorageError> {
        let user = self.user_of(who);
        let key = (op.table.clone(), op.row);
        let exists = self.rows.contains_key(&key);
        let operation = if !exists {
            Operation::Create
        } else if rop.column == "owner" {
            Operation::Assign
        } else {
            Operation::Write
        };
        if !PROFILE.contains(&op.table.as_str()) {
            return Ok(reject(
                operation,
                RejectionKind::Permission,
                "no create privilege",
                None,
            ));
        }
        let readable = exists && self.member_at(&key, user, u64::MAX);
        let auth = |hub: &RefHub| readable.then(|| export(&hub.current(&key)));
        if !exists {
            if rop.column != "owner" {
                return Ok(reject(
                    operation,
                    RejectionKind::RowNotFound,
                    "no such row",
                    None,
                ));
            }
            if rop.value != user {
                return Ok(reject(
                    operation,
                    RejectionKind::Permission,
                    "create for another owner",
                    None,
                ));
            }
        } else if !readable {
            return Ok(reject(
                operation,
                RejectionKind::Permission,
                "not your row",
                None,
            ));
        }
        if rop.value == 13 && rop.column != "owner" {
            return Ok(reject(
                operation,
                RejectionKind::Validation,
                "13 is not allowed",
                auth(self),
            ));
        }
        let current = self.current(&key);
        let win = winner(current.iter(), &rop.column).cloned();
        match policy {
            ConflictPolicy::ServerWins => {
                let seen = |w: &RefOp| {
                    self.rows[&key]
                        .get(&w.id())
                        .is_some_and(|(i, _)| *i <= rop.base)
                };
                if let Some(w) = &win {
                    if w.actor != rop.actor && !seen(w) {
                        return Ok(reject(
                            operation,
                            RejectionKind::Conflict,
                            "server wins",
                            auth(self),
                        ));
                    }
                }
                self.append(&op.table, op.row, rop);
            }
            ConflictPolicy::ClientWins => {
                let value = rop.value;
                let column = rop.column.clone();
                let loses = win.is_some_and(|w| (w.lamport, w.actor) > (rop.lamport, rop.actor));
                self.append(&op.table, op.row, rop);
                if loses {
                    // The resolution is itself an op, so every replica converges to it.
                    self.resolutions += 1;
                    self.server_edit(&op.table, op.row, &column, value);
                }
            }
            ConflictPolicy::MergePerColumn => self.append(&op.table, op.row, rop),
        }
        Ok(PushOutcome::Accepted)
    }

    fn pull_chunk(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError> {
        if self.fail {
            return Err(StorageError::Unavailable("disk full".into()));
        }
        let mut chunk = PullChunk {
            cursor: after,
            ..PullChunk::default()
        };
        if !PROFILE.contains(&table) {
            return Ok(chunk);
        }
        if after.0 > self.log.len() as u64 {
            chunk.restart = true;
            return Ok(chunk);
        }
        let user = self.user_of(who);
        // Devices are numbered like their users in these tests.
        let actor = user as u64;
        let start = after.0 as usize;
        let mut end = start;
        let mut items = 0usize;
        let mut touched: BTreeMap<Uuid, Vec<usize>> = BTreeMap::new();
        while end < self.log.len() && end - start < 4 * limits.max_items {
            let (t, row, _) = &self.log[end];
            if t == table {
                if items + 1 > limits.max_items {
                    break;
                }
                items += 1;
                touched.entry(*row).or_default().push(end);
            }
            end += 1;
        }
        for (row, entries) in touched {
            let key = (table.to_string(), row);
            let before = self.member_at(&key, user, start as u64);
            let after_m = self.member_at(&key, user, end as u64);
            // The device may hold a row it wrote itself without the feed having told it.
            let wrote = entries.iter().any(|&i| self.log[i].2.actor == actor);
            match (before, after_m) {
                (false, true) => chunk.entering.push(RowDoc {
                    row,
                    doc: export(&self.ops_at(&key, end as u64)),
                }),
                (true, true) => chunk.ops.extend(entries.iter().map(|&i| RowChange {
                    row,
                    change: self.log[i].2.encode(),
                })),
                (true, false) => chunk.leaving.push(row),
                (false, false) if wrote => chunk.leaving.push(row),
                (false, false) => {}
            }
        }
        chunk.cursor = Cursor(end.max(start) as u64);
        chunk.more = end < self.log.len();
        Ok(chunk)
    }
}

fn reject(
    operation: Operation,
    kind: RejectionKind,
    message: &str,
    authoritative: Option<Vec<u8>>,
) -> PushOutcome {
    PushOutcome::Rejected {
        operation,
        kind,
        message: message.into(),
        authoritative,
    }
}

// ----- device -----

#[derive(Debug, Default)]
struct RefDevice {
    actor: u64,
    lamport: u64,
    /// Every op made here, by sequence number (never dropped: the test checks it).
    local: BTreeMap<u64, (String, Uuid, RefOp)>,
    acked: u64,
    rows: BTreeMap<Key, BTreeMap<OpId, RefOp>>,
    cursors: BTreeMap<String, Cursor>,
    last_sync: BTreeMap<String, Millis>,
    deferred: BTreeSet<Key>,
    errors: Vec<SyncErrorRecord>,
    blobs: BTreeMap<[u8; 32], Vec<u8>>,
    next_row: u128,
    /// Counts calls that changed state, to check idempotence.
    changes: u64,
    deferred_evictions: u64,
    fail: bool,
    /// Blobs whose next completed download does not match its hash (as a damaged copy would).
    mismatch_downloads: BTreeSet<[u8; 32]>,
}

impl RefDevice {
    fn new(actor: u64) -> RefDevice {
        RefDevice {
            actor,
            ..RefDevice::default()
        }
    }

    fn write(&mut self, table: &str, row: Uuid, column: &str, value: i64) -> u64 {
        let seq = self.local.keys().next_back().copied().unwrap_or(0) + 1;
        self.lamport += 1;
        let op = RefOp {
            actor: self.actor,
            counter: seq,
            lamport: self.lamport,
            column: column.into(),
            value,
            base: self.cursors.get(table).map_or(0, |c| c.0),
        };
        self.rows
            .entry((table.to_string(), row))
            .or_default()
            .insert(op.id(), op.clone());
        self.local.insert(seq, (table.to_string(), row, op));
        seq
    }

    fn create(&mut self, table: &str, owner: i64, column: &str, value: i64) -> Uuid {
        self.next_row += 1;
        let row = Uuid::from_u128((u128::from(self.actor) << 64) | self.next_row);
        self.write(table, row, "owner", owner);
        self.write(table, row, column, value);
        row
    }

    fn see(&mut self, op: &RefOp) {
        self.lamport = self.lamport.max(op.lamport);
    }

    fn merge(&mut self, key: Key, ops: Vec<RefOp>) {
        for op in ops {
            self.see(&op);
            let row = self.rows.entry(key.clone()).or_default();
            if row.insert(op.id(), op).is_none() {
                self.changes += 1;
            }
        }
    }

    fn has_pending_on(&self, key: &Key) -> bool {
        self.local
            .range(self.acked + 1..)
            .any(|(_, (t, r, _))| t == &key.0 && r == &key.1)
    }

    fn held(&self, table: &str) -> BTreeMap<Key, BTreeSet<OpId>> {
        self.rows
            .iter()
            .filter(|(k, _)| k.0 == table)
            .map(|(k, v)| (k.clone(), v.keys().copied().collect()))
            .collect()
    }

    fn check(&self) -> Result<(), String> {
        // A pending op is never dropped until acknowledged.
        for (seq, (t, r, op)) in self.local.range(self.acked + 1..) {
            let present = self
                .rows
                .get(&(t.clone(), *r))
                .is_some_and(|row| row.contains_key(&op.id()));
            if !present {
                return Err(format!("device {}: pending op {seq} dropped", self.actor));
            }
        }
        Ok(())
    }
}

impl DeviceStorage for RefDevice {
    fn acked_seq(&self) -> Result<u64, StorageError> {
        Ok(self.acked)
    }
    fn last_local_seq(&self) -> Result<u64, StorageError> {
        Ok(self.local.keys().next_back().copied().unwrap_or(0))
    }
    fn pending_ops(&self, after: u64, limits: BatchLimits) -> Result<Vec<PushOp>, StorageError> {
        if self.fail {
            return Err(StorageError::Unavailable("flash busy".into()));
        }
        Ok(self
            .local
            .range(after + 1..)
            .take(limits.max_items)
            .map(|(seq, (t, r, op))| PushOp {
                seq: *seq,
                table: t.clone(),
                row: *r,
                change: op.encode(),
            })
            .collect())
    }
    fn record_ack(
        &mut self,
        now: Millis,
        up_to: u64,
        rejected: &[Rejection],
    ) -> Result<(), StorageError> {
        assert!(
            up_to > self.acked,
            "acks move forward: {} then {up_to}",
            self.acked
        );
        for rej in rejected {
            let (t, r, op) = self.local[&rej.seq].clone();
            let push_op = PushOp {
                seq: rej.seq,
                table: t.clone(),
                row: r,
                change: op.encode(),
            };
            self.errors.push(SyncErrorRecord::new(now, rej, &push_op));
            let key = (t, r);
            if let Some(row) = self.rows.get_mut(&key) {
                row.remove(&op.id());
                if row.is_empty() {
                    self.rows.remove(&key);
                }
            }
            if let Some(doc) = &rej.authoritative {
                let ops: Vec<RefOp> = serde_json::from_slice(&doc.doc).unwrap();
                self.merge(key, ops);
            }
        }
        self.acked = up_to;
        let ready: Vec<Key> = self
            .deferred
            .iter()
            .filter(|k| !self.has_pending_on(k))
            .cloned()
            .collect();
        for k in ready {
            self.deferred.remove(&k);
            self.rows.remove(&k);
        }
        self.changes += 1;
        Ok(())
    }
    fn apply_ops(&mut self, table: &str, ops: &[RowChange]) -> Result<(), StorageError> {
        for c in ops {
            let op = RefOp::decode(&c.change).unwrap();
            self.merge((table.to_string(), c.row), vec![op]);
        }
        Ok(())
    }
    fn import_rows(&mut self, table: &str, rows: &[RowDoc]) -> Result<(), StorageError> {
        for d in rows {
            let key = (table.to_string(), d.row);
            self.deferred.remove(&key);
            let ops: Vec<RefOp> = serde_json::from_slice(&d.doc).unwrap();
            self.merge(key, ops);
        }
        Ok(())
    }
    fn evict_rows(&mut self, table: &str, rows: &[Uuid]) -> Result<(), StorageError> {
        for r in rows {
            let key = (table.to_string(), *r);
            if self.has_pending_on(&key) {
                self.deferred_evictions += 1;
                self.deferred.insert(key);
            } else if self.rows.remove(&key).is_some() {
                self.changes += 1;
            }
        }
        Ok(())
    }
    fn cursor(&self, table: &str) -> Result<Cursor, StorageError> {
        Ok(self.cursors.get(table).copied().unwrap_or_default())
    }
    fn set_cursor(
        &mut self,
        table: &str,
        cursor: Cursor,
        synced_at: Option<Millis>,
    ) -> Result<(), StorageError> {
        let old = self.cursor(table)?;
        assert!(
            cursor >= old,
            "cursor of {table} moved back: {old:?} -> {cursor:?}"
        );
        if cursor > old {
            self.changes += 1;
        }
        self.cursors.insert(table.to_string(), cursor);
        if let Some(at) = synced_at {
            self.last_sync.insert(table.to_string(), at);
        }
        Ok(())
    }
    fn restart_cursor(&mut self, table: &str, cursor: Cursor) -> Result<(), StorageError> {
        self.cursors.insert(table.to_string(), cursor);
        self.changes += 1;
        Ok(())
    }
    fn last_sync(&self, table: &str) -> Result<Option<Millis>, StorageError> {
        Ok(self.last_sync.get(table).copied())
    }
    fn blob_progress(&self, sha: &[u8; 32]) -> Result<u64, StorageError> {
        Ok(self.blobs.get(sha).map_or(0, |b| b.len() as u64))
    }
    fn write_blob_chunk(
        &mut self,
        sha: &[u8; 32],
        offset: u64,
        data: &[u8],
        total: u64,
    ) -> Result<(), StorageError> {
        let b = self.blobs.entry(*sha).or_default();
        assert_eq!(b.len() as u64, offset);
        b.extend_from_slice(data);
        if b.len() as u64 == total && self.mismatch_downloads.remove(sha) {
            self.blobs.remove(sha);
            return Err(StorageError::BlobMismatch);
        }
        Ok(())
    }
    // The reference device attaches no files and fetches only what the test asks for.
    fn blobs_to_fetch(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        Ok(Vec::new())
    }
    fn blobs_to_upload(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        Ok(Vec::new())
    }
    fn read_blob_range(
        &self,
        _: &[u8; 32],
        _: u64,
        _: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        Ok(None)
    }
    fn record_upload(&mut self, _: &[u8; 32], _: bool) -> Result<(), StorageError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: one hub, N devices, frames on queues, a fake clock, faults.
// ---------------------------------------------------------------------------------------------

/// What a scenario went through, to check that the chaos reaches every path.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    lost: u64,
    duplicated: u64,
    reordered: u64,
    wire_closes: u64,
    resolutions: u64,
    deferred_evictions: u64,
    entering: u64,
    leaving: u64,
    rejected: [u64; 4],
    reconnects: u64,
    /// Frames on the wire when a disconnect or restart cut the link.
    cut_in_flight: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    loss_pct: u32,
    dup_pct: u32,
    reorder_pct: u32,
}

struct Link {
    hub: HubSession,
    to_hub: VecDeque<(Vec<u8>, bool)>,
    to_dev: VecDeque<(Vec<u8>, bool)>,
    hub_dec: FrameDecoder,
    dev_dec: FrameDecoder,
}

struct Dev {
    session: DeviceSession,
    storage: RefDevice,
    link: Option<Link>,
    events: Vec<DeviceEvent>,
    restarts: u64,
}

struct Net {
    now: Millis,
    hub: RefHub,
    hub_config: HubConfig,
    devs: Vec<Dev>,
    faults: Faults,
    rng: ChaCha8Rng,
    hub_events: Vec<(usize, HubEvent)>,
    frames: u64,
    stats: Stats,
    /// Frames `pump` may still deliver (`None`: no limit), to leave some in flight.
    budget: Option<u64>,
}

fn device_id(i: usize) -> DeviceId {
    DeviceId(Uuid::from_u128(0xd000 + i as u128))
}

fn schedule() -> SyncSchedule {
    SyncSchedule::new(
        PROFILE.iter().map(|t| (*t, Some(5))),
        &[("task".to_string(), "note".to_string())],
    )
}

fn device_config(i: usize, live: bool, seed: u64) -> DeviceConfig {
    let mut c = DeviceConfig::new(device_id(i), vec![i as u8; 8], "field-service", schedule());
    c.live = live;
    c.rng_seed = seed;
    c.push_limits.max_items = 3;
    c
}

impl Net {
    fn new(n: usize, seed: u64) -> Net {
        let mut hub = RefHub::default();
        for i in 0..n {
            hub.devices
                .insert(device_id(i), (vec![i as u8; 8], i as i64 + 1));
        }
        let mut hub_config = HubConfig::new(Uuid::from_u128(0xabc));
        hub_config.pull_limits.max_items = 4;
        hub_config.conflicts = ConflictPolicies {
            default: ConflictPolicy::MergePerColumn,
            tables: [
                ("note".to_string(), ConflictPolicy::ServerWins),
                ("job".to_string(), ConflictPolicy::ClientWins),
            ]
            .into_iter()
            .collect(),
        };
        let devs = (0..n)
            .map(|i| Dev {
                session: DeviceSession::new(device_config(i, i == 0, seed ^ i as u64)),
                storage: RefDevice::new(i as u64 + 1),
                link: None,
                events: Vec::new(),
                restarts: 0,
            })
            .collect();
        Net {
            now: Millis(1_000),
            hub,
            hub_config,
            devs,
            faults: Faults::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            hub_events: Vec::new(),
            frames: 0,
            stats: Stats::default(),
            budget: None,
        }
    }

    fn connect(&mut self, i: usize) {
        let now = self.now;
        let d = &mut self.devs[i];
        d.link = Some(Link {
            hub: HubSession::new(self.hub_config.clone(), now),
            to_hub: VecDeque::new(),
            to_dev: VecDeque::new(),
            hub_dec: FrameDecoder::new(),
            dev_dec: FrameDecoder::new(),
        });
        d.session.handle_connected(now);
    }

    /// The transport drops (both sides lose what was in flight).
    fn disconnect(&mut self, i: usize) {
        let now = self.now;
        let d = &mut self.devs[i];
        if let Some(link) = d.link.take() {
            self.stats.cut_in_flight += (link.to_hub.len() + link.to_dev.len()) as u64;
            d.session.handle_disconnected(now);
        }
    }

    /// The app restarts: a fresh session over the same (durable) storage.
    fn restart(&mut self, i: usize) {
        if let Some(link) = self.devs[i].link.take() {
            self.stats.cut_in_flight += (link.to_hub.len() + link.to_dev.len()) as u64;
        }
        self.devs[i].restarts += 1;
        let seed = self.rng.gen();
        let live = self.devs[i].session.config().live;
        self.devs[i].session = DeviceSession::new(device_config(i, live, seed));
    }

    /// Moves frames and timers until nothing is left to do at `now`; returns whether anything
    /// happened.
    fn pump(&mut self) -> bool {
        let now = self.now;
        let mut busy = false;
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for i in 0..self.devs.len() {
            let faults = self.faults;
            let d = &mut self.devs[i];
            if d.link.is_none() {
                match d.session.wants_connection_at(&d.storage) {
                    Some(at) if at <= now => {}
                    _ => continue,
                }
                self.connect(i);
                busy = true;
            }
            let d = &mut self.devs[i];
            let Some(link) = d.link.as_mut() else {
                continue;
            };
            if d.session.poll_timeout().is_some_and(|t| t <= now) {
                d.session.handle_timeout(now, &mut d.storage);
            }
            if link.hub.poll_timeout().is_some_and(|t| t <= now) {
                link.hub.handle_timeout(now);
            }
            while let Some(m) = d.session.poll_transmit(now) {
                link.to_hub.push_back((wire::encode(&m).unwrap(), false));
            }
            while let Some(m) = link.hub.poll_transmit(now) {
                link.to_dev.push_back((wire::encode(&m).unwrap(), false));
            }
            // Deliver, with faults.
            while let Some(frame) = take(
                &mut link.to_hub,
                faults,
                &mut self.rng,
                &mut self.stats,
                &mut self.budget,
            ) {
                busy = true;
                self.frames += 1;
                link.hub_dec.feed(&frame);
                loop {
                    match link.hub_dec.next_message() {
                        Ok(Some(m)) => link.hub.handle_message(now, m, &mut self.hub),
                        Ok(None) => break,
                        Err(e) => {
                            link.hub.handle_wire_error(now, &e);
                            break;
                        }
                    }
                }
                while let Some(m) = link.hub.poll_transmit(now) {
                    link.to_dev.push_back((wire::encode(&m).unwrap(), false));
                }
            }
            while let Some(frame) = take(
                &mut link.to_dev,
                faults,
                &mut self.rng,
                &mut self.stats,
                &mut self.budget,
            ) {
                busy = true;
                self.frames += 1;
                link.dev_dec.feed(&frame);
                loop {
                    match link.dev_dec.next_message() {
                        Ok(Some(m)) => d.session.handle_message(now, m, &mut d.storage),
                        Ok(None) => break,
                        Err(e) => {
                            d.session.handle_wire_error(now, &e);
                            break;
                        }
                    }
                }
                while let Some(m) = d.session.poll_transmit(now) {
                    link.to_hub.push_back((wire::encode(&m).unwrap(), false));
                }
            }
            while let Some(e) = link.hub.poll_event() {
                match &e {
                    HubEvent::OpsApplied {
                        accepted, tables, ..
                    } if *accepted > 0 => changed.extend(tables.iter().cloned()),
                    HubEvent::Closed { code, .. } if code.0 >= CloseCode::WIRE_BASE => {
                        self.stats.wire_closes += 1
                    }
                    _ => {}
                }
                self.hub_events.push((i, e));
            }
            while let Some(e) = d.session.poll_event() {
                match &e {
                    DeviceEvent::BatchApplied {
                        entering, leaving, ..
                    } => {
                        self.stats.entering += *entering as u64;
                        self.stats.leaving += *leaving as u64;
                    }
                    DeviceEvent::PushAcked { rejected, .. } => {
                        for r in rejected {
                            self.stats.rejected[r.kind as usize] += 1;
                        }
                    }
                    DeviceEvent::Connected { .. } => self.stats.reconnects += 1,
                    _ => {}
                }
                d.events.push(e);
            }
            d.storage.check().unwrap();
            // Every op the hub acknowledged (and did not reject) is in the hub's storage.
            let rejected: BTreeSet<u64> = d.storage.errors.iter().map(|e| e.seq).collect();
            for (seq, (_, _, op)) in d.storage.local.range(..=d.storage.acked) {
                assert!(
                    rejected.contains(seq) || self.hub.held.contains(&op.id()),
                    "device {i}: op {seq} acknowledged but not on the hub"
                );
            }
            let over = link.hub.is_closed()
                || matches!(d.session.state(), DeviceState::Closed | DeviceState::Halted);
            if over && link.to_hub.is_empty() && link.to_dev.is_empty() {
                // Let the closing side's last frames out first.
                let pending_dev = d.session.poll_transmit(now);
                let pending_hub = link.hub.poll_transmit(now);
                if pending_dev.is_none() && pending_hub.is_none() {
                    d.link = None;
                    d.session.handle_disconnected(now);
                    busy = true;
                } else {
                    if let Some(m) = pending_dev {
                        link.to_hub.push_back((wire::encode(&m).unwrap(), false));
                    }
                    if let Some(m) = pending_hub {
                        link.to_dev.push_back((wire::encode(&m).unwrap(), false));
                    }
                    busy = true;
                }
            }
        }
        if !changed.is_empty() {
            let tables: Vec<String> = changed.into_iter().collect();
            self.notify(&tables);
        }
        busy
    }

    /// Tells every hub session that these tables changed (the hub shell's fan-out).
    fn notify(&mut self, tables: &[String]) {
        let now = self.now;
        for d in &mut self.devs {
            if let Some(link) = d.link.as_mut() {
                link.hub.handle_changes(now, tables, &mut self.hub);
            }
        }
    }

    fn notify_all(&mut self) {
        self.notify(&[]);
    }

    fn next_time(&self) -> Millis {
        let mut t: Option<Millis> = None;
        let mut consider = |x: Option<Millis>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for d in &self.devs {
            match &d.link {
                Some(l) => {
                    consider(d.session.poll_timeout());
                    consider(l.hub.poll_timeout());
                }
                None => consider(d.session.wants_connection_at(&d.storage)),
            }
        }
        t.unwrap_or(self.now + Millis::from_secs(60))
            .max(self.now + Millis(1))
    }

    /// Runs for `span` of fake time.
    fn run_for(&mut self, span: Millis) {
        let end = self.now + span;
        let mut guard = 0;
        while self.now < end {
            guard += 1;
            assert!(guard < 200_000, "livelock");
            if !self.pump() {
                self.now = self.next_time().min(end);
            }
        }
        while self.pump() {
            guard += 1;
            assert!(guard < 200_000, "livelock");
        }
    }

    fn local_ops(&mut self, i: usize) {
        let d = &mut self.devs[i];
        d.session.handle_local_ops(self.now, &mut d.storage);
    }

    fn fetch_blob(&mut self, i: usize, sha: [u8; 32]) {
        let d = &mut self.devs[i];
        d.session.fetch_blob(self.now, &mut d.storage, sha);
    }

    fn sync_now(&mut self, i: usize, tables: &[&str]) {
        let d = &mut self.devs[i];
        d.session.sync_now(self.now, &mut d.storage, tables);
    }

    fn user(&self, i: usize) -> i64 {
        i as i64 + 1
    }

    /// Faults off, everyone reconnects and pulls everything; then every replica must agree.
    fn heal_and_check(&mut self) {
        self.faults = Faults::default();
        for _ in 0..6 {
            for i in 0..self.devs.len() {
                let d = &mut self.devs[i];
                d.session.sync_now(self.now, &mut d.storage, &[]);
            }
            self.run_for(Millis::from_minutes(2));
        }
        self.check_converged();
    }

    fn check_converged(&self) {
        for (i, d) in self.devs.iter().enumerate() {
            let s = &d.storage;
            // Every local op was processed; every accepted one is on the hub.
            let last = s.last_local_seq().unwrap();
            assert_eq!(s.acked, last, "device {i}: ops left unacknowledged");
            let rejected: BTreeSet<u64> = s.errors.iter().map(|e| e.seq).collect();
            for (seq, (_, _, op)) in &s.local {
                if !rejected.contains(seq) {
                    assert!(
                        self.hub.held.contains(&op.id()),
                        "device {i}: acked op {seq} not on hub"
                    );
                } else {
                    assert!(
                        !self.hub.held.contains(&op.id()),
                        "device {i}: rejected op {seq} on hub"
                    );
                }
            }
            assert!(s.deferred.is_empty(), "device {i}: evictions still waiting");
            let expected = self.hub.set_of(self.user(i));
            let mut held = BTreeMap::new();
            for t in PROFILE.iter().chain(["secret"].iter()) {
                held.extend(s.held(t));
            }
            assert_eq!(
                held, expected,
                "device {i} diverged from its set on the hub"
            );
            for (k, ops) in &s.rows {
                let hub_view = materialize(self.hub.current(k).iter());
                assert_eq!(materialize(ops.values()), hub_view, "device {i} row {k:?}");
            }
        }
    }
}

/// Takes the next frame off a queue, applying loss, duplication and reordering.
fn take(
    q: &mut VecDeque<(Vec<u8>, bool)>,
    f: Faults,
    rng: &mut ChaCha8Rng,
    stats: &mut Stats,
    budget: &mut Option<u64>,
) -> Option<Vec<u8>> {
    if let Some(b) = budget {
        if *b == 0 {
            return None;
        }
        *b -= 1;
    }
    loop {
        let (frame, copy) = q.pop_front()?;
        if f.loss_pct > 0 && rng.gen_range(0..100) < f.loss_pct {
            stats.lost += 1;
            continue;
        }
        if f.reorder_pct > 0 && !q.is_empty() && rng.gen_range(0..100) < f.reorder_pct {
            let (other, _) = q.pop_front()?;
            q.push_front((frame, copy));
            stats.reordered += 1;
            return Some(other);
        }
        if !copy && f.dup_pct > 0 && rng.gen_range(0..100) < f.dup_pct {
            q.push_front((frame.clone(), true));
            stats.duplicated += 1;
        }
        return Some(frame);
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn edits_travel_between_devices_and_hub() {
    let mut net = Net::new(2, 1);
    let row = net.devs[1].storage.create("task", 2, "a", 5);
    net.run_for(Millis::from_secs(5));
    assert!(net.hub.rows.contains_key(&("task".to_string(), row)));
    // Device 0 (user 1) may not see user 2's row; give it to user 1 on the hub.
    net.hub.server_edit("task", row, "owner", 1);
    net.notify_all();
    net.run_for(Millis::from_secs(5));
    // Device 0 is live: it has the row without waiting for its interval.
    assert!(net.devs[0]
        .storage
        .rows
        .contains_key(&("task".to_string(), row)));
    net.heal_and_check();
    assert!(
        !net.devs[1]
            .storage
            .rows
            .contains_key(&("task".to_string(), row)),
        "evicted"
    );
}

#[test]
fn rejected_ops_become_sync_errors_and_roll_back() {
    let mut net = Net::new(1, 2);
    let row = net.devs[0].storage.create("task", 1, "a", 1);
    net.run_for(Millis::from_secs(5));
    let bad = net.devs[0].storage.write("task", row, "a", 13);
    let secret = net.devs[0].storage.create("secret", 1, "a", 1);
    net.local_ops(0);
    net.run_for(Millis::from_secs(5));
    let s = &net.devs[0].storage;
    let kinds: Vec<(u64, RejectionKind, Operation)> = s
        .errors
        .iter()
        .map(|e| (e.seq, e.kind, e.operation))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (bad, RejectionKind::Validation, Operation::Write),
            (bad + 1, RejectionKind::Permission, Operation::Create),
            (bad + 2, RejectionKind::Permission, Operation::Create),
        ]
    );
    let e = &s.errors[0];
    assert_eq!((e.table.as_str(), e.row), ("task", row));
    assert_eq!(e.message, "13 is not allowed");
    assert_eq!(RefOp::decode(&e.op_data).unwrap().value, 13);
    assert_eq!(
        materialize(s.rows[&("task".to_string(), row)].values())["a"],
        1,
        "rolled back"
    );
    assert!(!s.rows.contains_key(&("secret".to_string(), secret)));
    assert!(net.devs[0]
        .events
        .iter()
        .any(|e| matches!(e, DeviceEvent::PushAcked { rejected, .. } if !rejected.is_empty())));
    net.heal_and_check();
}

#[test]
fn conflict_policies_server_wins_and_client_wins() {
    let mut net = Net::new(1, 3);
    let note = net.devs[0].storage.create("note", 1, "a", 1);
    let job = net.devs[0].storage.create("job", 1, "a", 1);
    net.run_for(Millis::from_secs(5));
    // Concurrent edits: the hub edits twice (higher lamport), the device once, offline.
    net.disconnect(0);
    for (t, r) in [("note", note), ("job", job)] {
        for v in 90..=101 {
            net.hub.server_edit(t, r, "a", v);
        }
        net.devs[0].storage.write(t, r, "a", 7);
    }
    net.heal_and_check();
    let s = &net.devs[0].storage;
    let value = |t: &str, r| materialize(s.rows[&(t.to_string(), r)].values())["a"];
    assert_eq!(value("note", note), 101, "server wins");
    assert_eq!(value("job", job), 7, "client wins, through a resolution op");
    assert_eq!(s.errors.len(), 1);
    assert_eq!(s.errors[0].kind, RejectionKind::Conflict);
}

#[test]
fn a_bad_frame_closes_only_that_session() {
    let mut net = Net::new(2, 4);
    net.run_for(Millis::from_secs(2));
    assert!(net.devs.iter().all(|d| d.link.is_some()));
    // Garbage on device 0's stream.
    net.devs[0]
        .link
        .as_mut()
        .unwrap()
        .to_hub
        .push_back((b"GET / HTTP/1.1\r\n\r\n".to_vec(), false));
    let row = net.devs[1].storage.create("task", 2, "a", 1);
    net.local_ops(1);
    net.pump();
    let closed: Vec<&HubEvent> = net
        .hub_events
        .iter()
        .filter(|(i, e)| *i == 0 && matches!(e, HubEvent::Closed { .. }))
        .map(|(_, e)| e)
        .collect();
    assert_eq!(
        closed,
        vec![&HubEvent::Closed {
            code: CloseCode(CloseCode::WIRE_BASE + 1),
            reason: "bad magic [47, 45, 54, 20]: not a fieldsync frame".into(),
            by_peer: false
        }]
    );
    assert!(net.devs[0]
        .events
        .iter()
        .any(|e| matches!(e, DeviceEvent::Closed { by_peer: true, code, .. } if code.0 == 101)));
    assert!(!net
        .hub_events
        .iter()
        .any(|(i, e)| *i == 1 && matches!(e, HubEvent::Closed { .. })));
    assert!(
        net.hub.rows.contains_key(&("task".to_string(), row)),
        "device 1 kept syncing"
    );
    // Device 0 reconnects after its backoff and carries on.
    net.heal_and_check();
}

#[test]
fn each_wire_error_closes_with_its_code() {
    let bad: Vec<(Vec<u8>, u16)> = vec![
        (b"NOPE00000000".to_vec(), 1),
        (
            [b"FSYN".as_slice(), &[0, 7, 12, 0, 0, 0, 0, 1, 0]].concat(),
            2,
        ),
        (
            [b"FSYN".as_slice(), &[0, 1, 99, 0, 0, 0, 0, 1, 0]].concat(),
            3,
        ),
        (
            [b"FSYN".as_slice(), &[0, 1, 12, 4, 0, 0, 0, 1, 0]].concat(),
            4,
        ),
        (
            [b"FSYN".as_slice(), &[0, 1, 4, 0, 0x10, 0, 0, 0]].concat(),
            5,
        ),
        (
            [b"FSYN".as_slice(), &[0, 1, 1, 0, 0, 0, 0, 1, 9]].concat(),
            7,
        ),
        (
            [b"FSYN".as_slice(), &[0, 1, 12, 0, 0, 0, 0, 2, 1, 1]].concat(),
            8,
        ),
    ];
    for (frame, code) in bad {
        let mut hub = RefHub::default();
        let mut s = HubSession::new(HubConfig::new(Uuid::nil()), Millis(0));
        let mut dec = FrameDecoder::new();
        dec.feed(&frame);
        let err = dec.next_message().unwrap_err();
        s.handle_wire_error(Millis(1), &err);
        assert_eq!(s.state(), HubState::Closed);
        match s.poll_transmit(Millis(1)) {
            Some(Message::Close(c)) => assert_eq!(c.code.0, 100 + code, "{err}"),
            other => panic!("{other:?}"),
        }
        // A closed session ignores whatever follows.
        s.handle_message(Millis(2), Message::Ping(Ping { nonce: 1 }), &mut hub);
        assert_eq!(s.poll_transmit(Millis(2)), None);
    }
}

#[test]
fn bad_token_and_bad_version_are_refused() {
    let mut net = Net::new(1, 5);
    net.hub.devices.insert(device_id(0), (b"other".to_vec(), 1));
    net.run_for(Millis::from_secs(5));
    let d = &net.devs[0];
    assert_eq!(d.session.state(), DeviceState::Halted);
    assert!(d.events.iter().any(
        |e| matches!(e, DeviceEvent::Refused { code, .. } if *code == CloseCode::UNAUTHORIZED)
    ));
    assert_eq!(
        d.session.wants_connection_at(&d.storage),
        None,
        "halted: no reconnect"
    );

    let mut hub = RefHub::default();
    let mut s = HubSession::new(HubConfig::new(Uuid::nil()), Millis(0));
    let mut cfg = device_config(0, false, 0);
    cfg.protocol_versions = vec![7, 8];
    let mut dev = DeviceSession::new(cfg);
    let mut store = RefDevice::new(1);
    dev.handle_connected(Millis(0));
    let hello = dev.poll_transmit(Millis(0)).unwrap();
    s.handle_message(Millis(0), hello, &mut hub);
    let reply = s.poll_transmit(Millis(0)).unwrap();
    assert!(matches!(&reply, Message::Refused(r) if r.code == CloseCode::UNSUPPORTED_VERSION));
    dev.handle_message(Millis(0), reply, &mut store);
    assert_eq!(dev.state(), DeviceState::Halted);
}

#[test]
fn a_pull_batch_applied_twice_changes_nothing() {
    let mut net = Net::new(1, 6);
    for v in 0..10 {
        net.hub.server_edit("task", Uuid::from_u128(77), "owner", 1);
        net.hub.server_edit("task", Uuid::from_u128(77), "a", v);
    }
    net.faults.dup_pct = 100;
    net.run_for(Millis::from_secs(5));
    let before = net.devs[0].storage.changes;
    // Replay every batch the hub would send from scratch: nothing changes but nothing breaks.
    let mut dev = std::mem::take(&mut net.devs[0].storage);
    for t in PROFILE {
        let mut cursor = Cursor(0);
        loop {
            let who = Principal {
                device: device_id(0),
                user: user_id(1),
                app: String::new(),
            };
            let lim = BatchLimits {
                max_items: 4,
                max_bytes: 1 << 20,
            };
            let c = net.hub.pull(&who, t, cursor, lim).unwrap();
            dev.apply_ops(t, &c.ops).unwrap();
            dev.import_rows(t, &c.entering).unwrap();
            dev.evict_rows(t, &c.leaving).unwrap();
            cursor = c.cursor;
            if !c.more {
                break;
            }
        }
    }
    assert_eq!(dev.changes, before);
    net.devs[0].storage = dev;
    net.heal_and_check();
}

#[test]
fn an_interrupted_pull_resumes_where_it_stopped() {
    let mut net = Net::new(1, 7);
    for r in 0..40u128 {
        net.hub.server_edit("task", Uuid::from_u128(r), "owner", 1);
    }
    // Let the handshake and a couple of batches through, then cut the link.
    for _ in 0..3 {
        net.pump();
    }
    let partial = net.devs[0].storage.cursor("task").unwrap();
    assert!(partial > Cursor(0) && partial < Cursor(40), "{partial:?}");
    net.disconnect(0);
    net.hub_events.clear();
    net.run_for(Millis::from_minutes(1));
    let sent: u64 = net
        .hub_events
        .iter()
        .filter_map(|(_, e)| match e {
            HubEvent::BatchSent { table, items, .. } if table == "task" => Some(*items as u64),
            _ => None,
        })
        .sum();
    assert_eq!(
        sent,
        40 - partial.0,
        "only what had not arrived was sent again"
    );
    assert_eq!(net.devs[0].storage.rows.len(), 40);
    net.check_converged();
}

#[test]
fn a_leaving_row_waits_for_its_pending_ops() {
    let mut net = Net::new(2, 8);
    let row = net.devs[0].storage.create("task", 1, "a", 1);
    net.run_for(Millis::from_secs(5));
    // Device 0 edits offline; meanwhile the hub gives the row to user 2.
    net.disconnect(0);
    let seq = net.devs[0].storage.write("task", row, "b", 9);
    net.hub.server_edit("task", row, "owner", 2);
    // Pull the leave before the push lands: evict waits.
    let key = ("task".to_string(), row);
    net.devs[0].storage.evict_rows("task", &[row]).unwrap();
    assert!(net.devs[0].storage.rows.contains_key(&key));
    assert!(net.devs[0].storage.deferred.contains(&key));
    net.heal_and_check();
    let s = &net.devs[0].storage;
    assert!(!s.rows.contains_key(&key), "evicted once pushed");
    assert!(s
        .errors
        .iter()
        .any(|e| e.seq == seq && e.kind == RejectionKind::Permission));
    assert!(
        net.devs[1].storage.rows.contains_key(&key),
        "moved to user 2's device"
    );
}

#[test]
fn a_download_that_does_not_match_its_hash_is_dropped_and_the_session_goes_on() {
    let mut net = Net::new(1, 9);
    let blob: Vec<u8> = (0..150_000u32).map(|i| (i % 13) as u8).collect();
    let sha = [5u8; 32];
    net.hub.blobs.insert(sha, blob.clone());
    net.run_for(Millis::from_secs(2));
    net.devs[0].storage.mismatch_downloads.insert(sha);
    net.fetch_blob(0, sha);
    net.run_for(Millis::from_secs(10));
    let events = &net.devs[0].events;
    assert!(events.contains(&DeviceEvent::BlobMismatch { sha256: sha }));
    assert!(!events.contains(&DeviceEvent::BlobComplete { sha256: sha }));
    assert!(
        !events.iter().any(|e| matches!(
            e,
            DeviceEvent::StorageFailed { .. } | DeviceEvent::Closed { .. }
        )),
        "the session goes on: {events:?}"
    );
    assert_eq!(net.devs[0].storage.blob_progress(&sha).unwrap(), 0);
    // Syncing still works in the same session, and a later download gets the good copy.
    let row = net.devs[0].storage.create("task", 1, "a", 1);
    net.local_ops(0);
    net.run_for(Millis::from_secs(5));
    assert!(net.hub.rows.contains_key(&("task".to_string(), row)));
    let last = net.devs[0].storage.local.keys().next_back().copied();
    assert_eq!(
        Some(net.devs[0].storage.acked),
        last,
        "pushed and acknowledged after the bad download"
    );
    net.fetch_blob(0, sha);
    net.run_for(Millis::from_secs(10));
    assert_eq!(net.devs[0].storage.blobs[&sha], blob);
}

#[test]
fn blobs_download_in_chunks_and_resume() {
    let mut net = Net::new(1, 9);
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let sha = [7u8; 32];
    net.hub.blobs.insert(sha, blob.clone());
    net.run_for(Millis::from_secs(2));
    net.fetch_blob(0, sha);
    net.pump();
    net.disconnect(0);
    let got = net.devs[0].storage.blob_progress(&sha).unwrap();
    assert!(got > 0 && got < blob.len() as u64, "{got}");
    net.run_for(Millis::from_secs(30));
    assert_eq!(net.devs[0].storage.blobs[&sha], blob);
    assert!(net.devs[0]
        .events
        .contains(&DeviceEvent::BlobComplete { sha256: sha }));
    // An unknown blob is reported, not retried forever.
    net.fetch_blob(0, [1; 32]);
    net.run_for(Millis::from_secs(5));
    assert!(net.devs[0]
        .events
        .contains(&DeviceEvent::BlobNotFound { sha256: [1; 32] }));
}

#[test]
fn keepalives_and_idle_timeouts() {
    let mut net = Net::new(1, 10);
    net.run_for(Millis::from_minutes(3));
    let d = &net.devs[0];
    assert!(d.link.is_some(), "pings keep a quiet session open");
    assert!(!d
        .events
        .iter()
        .any(|e| matches!(e, DeviceEvent::Closed { .. })));
    // A hub that stops answering is detected by the device.
    let mut dev = DeviceSession::new(device_config(0, false, 0));
    let mut store = RefDevice::new(1);
    dev.handle_connected(Millis(0));
    let _hello = dev.poll_transmit(Millis(0));
    let t = dev.poll_timeout().unwrap();
    assert_eq!(t, Millis::from_secs(10));
    dev.handle_timeout(t, &mut store);
    assert!(
        matches!(dev.poll_transmit(t), Some(Message::Close(c)) if c.code == CloseCode::HANDSHAKE_TIMEOUT)
    );
    // And a device that goes silent is dropped by the hub.
    let mut hub = RefHub::default();
    hub.devices.insert(device_id(0), (vec![0; 8], 1));
    let mut s = HubSession::new(HubConfig::new(Uuid::nil()), Millis(0));
    let mut dev = DeviceSession::new(device_config(0, false, 0));
    dev.handle_connected(Millis(0));
    s.handle_message(Millis(0), dev.poll_transmit(Millis(0)).unwrap(), &mut hub);
    assert_eq!(s.state(), HubState::Ready);
    let t = s.poll_timeout().unwrap();
    assert_eq!(t, Millis::from_secs(90));
    s.handle_timeout(t);
    assert!(s.is_closed());
}

#[test]
fn reconnect_backoff_grows_with_jitter_and_resets() {
    let mut dev = DeviceSession::new(device_config(0, false, 42));
    let store = RefDevice::new(1);
    let mut now = Millis(0);
    let mut delays = Vec::new();
    for _ in 0..12 {
        let at = dev.wants_connection_at(&store).unwrap();
        assert!(at >= now);
        now = at;
        dev.handle_connected(now);
        dev.handle_disconnected(now);
        delays.push(dev.wants_connection_at(&store).unwrap().0 - now.0);
    }
    for (n, d) in delays.iter().enumerate() {
        let cap = (1000u64 << n).min(300_000);
        assert!(*d >= cap / 2 && *d <= cap, "attempt {n}: {d} vs cap {cap}");
    }
    // Same seed, same delays; another seed, other delays.
    let replay = |seed| {
        let mut dev = DeviceSession::new(device_config(0, false, seed));
        (0..5)
            .map(|_| {
                dev.handle_connected(Millis(0));
                dev.handle_disconnected(Millis(0));
                dev.wants_connection_at(&store).unwrap().0
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(replay(42), replay(42));
    assert_ne!(replay(42), replay(43));
}

#[test]
fn tables_pull_at_their_interval_and_on_demand() {
    let mut net = Net::new(2, 11);
    net.run_for(Millis::from_secs(5));
    let pulls = |net: &Net, i: usize| {
        net.devs[i]
            .events
            .iter()
            .filter(|e| matches!(e, DeviceEvent::TableSynced { table } if table == "task"))
            .count()
    };
    assert_eq!(pulls(&net, 1), 1, "first sync pulls every table");
    net.run_for(Millis::from_minutes(4));
    assert_eq!(pulls(&net, 1), 1, "not before the 5-minute interval");
    net.run_for(Millis::from_minutes(2));
    assert_eq!(pulls(&net, 1), 2, "at the interval");
    net.sync_now(1, &["note"]);
    net.run_for(Millis::from_secs(1));
    assert_eq!(
        pulls(&net, 1),
        3,
        "task is pulled with its related table note"
    );
    assert_eq!(net.devs[1].session.state(), DeviceState::Ready);
}

#[test]
fn a_storage_failure_closes_the_session_and_sync_recovers() {
    let mut net = Net::new(1, 12);
    net.run_for(Millis::from_secs(2));
    net.hub.fail = true;
    net.devs[0].storage.create("task", 1, "a", 1);
    net.local_ops(0);
    net.run_for(Millis::from_secs(1));
    assert!(net
        .hub_events
        .iter()
        .any(|(_, e)| matches!(e, HubEvent::StorageFailed { .. })));
    assert!(net.devs[0].events.iter().any(
        |e| matches!(e, DeviceEvent::Closed { code, .. } if *code == CloseCode::STORAGE_FAILURE)
    ));
    net.hub.fail = false;
    net.heal_and_check();
}

#[test]
fn forged_cursors_and_foreign_tables_get_nothing() {
    let mut hub = RefHub::default();
    hub.devices.insert(device_id(0), (vec![0; 8], 1));
    hub.server_edit("secret", Uuid::from_u128(1), "owner", 1);
    hub.server_edit("task", Uuid::from_u128(2), "owner", 2);
    let mut s = HubSession::new(HubConfig::new(Uuid::nil()), Millis(0));
    let mut dev = DeviceSession::new(device_config(0, false, 0));
    dev.handle_connected(Millis(0));
    s.handle_message(Millis(0), dev.poll_transmit(Millis(0)).unwrap(), &mut hub);
    let _welcome = s.poll_transmit(Millis(0));
    let pull = Message::Pull(fieldsync_replication::proto::Pull {
        tables: vec![
            fieldsync_replication::proto::TableCursor {
                table: "secret".into(),
                cursor: Cursor(0),
            },
            fieldsync_replication::proto::TableCursor {
                table: "task".into(),
                cursor: Cursor(0),
            },
            fieldsync_replication::proto::TableCursor {
                table: "note".into(),
                cursor: Cursor(u64::MAX),
            },
        ],
    });
    s.handle_message(Millis(1), pull, &mut hub);
    let mut n = 0;
    let mut restarts = Vec::new();
    while let Some(m) = s.poll_transmit(Millis(1)) {
        let Message::PullBatch(b) = m else {
            panic!("{m:?}")
        };
        assert!(
            b.ops.is_empty() && b.entering.is_empty() && b.leaving.is_empty(),
            "{b:?}"
        );
        if b.is_restart() {
            restarts.push(b.table.clone());
        }
        n += 1;
    }
    // The cursor past the feed's end restarts that feed, which then holds nothing either.
    assert_eq!(restarts, ["note"]);
    assert_eq!(n, 4);
    assert!(!s.is_closed());
}

/// A hub restored from a backup older than what a device received: the device's cursor is past
/// the hub's feed, so the hub restarts the feed and the device gets what the restored hub
/// writes next (reading on from its old cursor would have skipped it).
#[test]
fn a_device_ahead_of_a_restored_hub_starts_its_feed_over() {
    let mut net = Net::new(1, 7);
    let (a, b, c, d) = (
        Uuid::from_u128(0xa),
        Uuid::from_u128(0xb),
        Uuid::from_u128(0xc),
        Uuid::from_u128(0xd),
    );
    net.hub.server_edit("task", a, "owner", 1);
    net.connect(0);
    net.run_for(Millis::from_minutes(1));
    let backup = net.hub.clone();
    net.hub.server_edit("task", b, "owner", 1);
    net.hub.server_edit("task", c, "owner", 1);
    net.sync_now(0, &["task"]);
    net.run_for(Millis::from_minutes(1));
    let ahead = net.devs[0].storage.cursor("task").unwrap();
    assert!(ahead.0 >= 3, "{ahead:?}");
    net.disconnect(0);
    // The restore: the hub's feed is back to one entry; one more row comes after it.
    net.hub = backup;
    net.hub.server_edit("task", d, "owner", 1);
    assert!((net.hub.log.len() as u64) < ahead.0);
    net.connect(0);
    net.run_for(Millis::from_minutes(1));
    let dev = &net.devs[0];
    let held = dev.storage.held("task");
    for row in [a, d] {
        assert!(
            held.contains_key(&("task".to_string(), row)),
            "{row} missing: {held:?}"
        );
    }
    // What the restored hub lost stays on the device.
    assert!(held.contains_key(&("task".to_string(), b)));
    assert!(dev.events.iter().any(|e| matches!(
        e,
        DeviceEvent::FeedRestarted { table, from, to } if table == "task" && *from == ahead && *to == Cursor(0)
    )));
    assert!(dev.storage.cursor("task").unwrap().0 >= net.hub.log.len() as u64);
    assert_eq!(dev.session.state(), DeviceState::Ready);

    // A late duplicate of a restart, landing when the device's cursor happens to equal its
    // `from` again, is stale: the pull it answered is over. Nothing moves, nothing waits.
    let now = net.now;
    let d = &mut net.devs[0];
    assert!(d.session.is_quiet());
    let current = d.storage.cursor("task").unwrap();
    let late = Message::PullBatch(fieldsync_replication::proto::PullBatch {
        table: "task".into(),
        from: current,
        cursor: Cursor(0),
        ops: vec![],
        entering: vec![],
        leaving: vec![],
        more: true,
    });
    d.session.handle_message(now, late, &mut d.storage);
    assert_eq!(d.storage.cursor("task").unwrap(), current);
    while let Some(e) = d.session.poll_event() {
        assert!(!matches!(e, DeviceEvent::FeedRestarted { .. }), "{e:?}");
    }
    assert!(d.session.is_quiet());
    assert_eq!(d.session.state(), DeviceState::Ready);
}

/// A hub restored from an older copy while its devices (live and polling) lose, duplicate and
/// reorder frames: every device ends up holding every row of its set on the restored hub,
/// with every op of it, and no session ends in a protocol violation.
#[test]
fn feeds_restart_after_a_restore_under_loss_duplication_and_reordering() {
    let row = |k: u128| Uuid::from_u128(0x500 + k);
    let mut restarts = 0;
    for seed in 0..16u64 {
        let mut net = Net::new(3, seed);
        let owner = |k: u128| (k % 3) as i64 + 1;
        for k in 0..6 {
            net.hub.server_edit("task", row(k), "owner", owner(k));
        }
        net.faults = Faults {
            loss_pct: 15,
            dup_pct: 20,
            reorder_pct: 20,
        };
        net.run_for(Millis::from_minutes(10));
        let backup = net.hub.clone();
        for k in 6..12 {
            net.hub.server_edit("task", row(k), "owner", owner(k));
        }
        for i in 0..3 {
            net.sync_now(i, &["task"]);
        }
        net.run_for(Millis::from_minutes(10));
        for i in 0..3 {
            net.disconnect(i);
        }
        // The restore, and two rows written on the restored hub.
        net.hub = backup;
        for k in 12..14 {
            net.hub.server_edit("task", row(k), "owner", owner(k));
        }
        for i in 0..3 {
            net.sync_now(i, &["task"]);
        }
        net.run_for(Millis::from_minutes(10));
        net.faults = Faults::default();
        for _ in 0..3 {
            for i in 0..3 {
                net.sync_now(i, &["task"]);
            }
            net.run_for(Millis::from_minutes(2));
        }
        for i in 0..3 {
            let d = &net.devs[i];
            let held = d.storage.held("task");
            for (key, ops) in net.hub.set_of(net.user(i)) {
                let mine = held.get(&key);
                assert!(
                    mine.is_some_and(|m| m.is_superset(&ops)),
                    "seed {seed}, device {i}: {key:?} {ops:?} vs {mine:?}"
                );
            }
            assert!(
                !d.events.iter().any(|e| matches!(
                    e,
                    DeviceEvent::Closed { code, .. } if *code == CloseCode::PROTOCOL_VIOLATION
                )),
                "seed {seed}, device {i}: {:?}",
                d.events
            );
            restarts += d
                .events
                .iter()
                .filter(|e| matches!(e, DeviceEvent::FeedRestarted { .. }))
                .count();
        }
    }
    // Not vacuous: feeds did restart.
    assert!(restarts >= 16, "{restarts} restarts");
}

// ---------------------------------------------------------------------------------------------
// The proptest: random edits and faults, then healing; everything converges.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Action {
    DeviceCreate {
        dev: usize,
        table: usize,
        value: i64,
        owner: i64,
    },
    DeviceEdit {
        dev: usize,
        pick: usize,
        column: bool,
        value: i64,
    },
    DeviceAssign {
        dev: usize,
        pick: usize,
        to: i64,
    },
    HubEdit {
        pick: usize,
        column: bool,
        value: i64,
    },
    HubAssign {
        pick: usize,
        to: i64,
    },
    Run {
        ms: u64,
    },
    Disconnect {
        dev: usize,
    },
    Restart {
        dev: usize,
    },
    Corrupt {
        dev: usize,
    },
    SyncNow {
        dev: usize,
    },
    /// Deliver only a few frames, so the next fault hits messages in flight.
    Partial {
        frames: u64,
    },
}

const DEVICES: usize = 3;

fn action() -> impl Strategy<Value = Action> {
    let dev = 0..DEVICES;
    prop_oneof![
        3 => (dev.clone(), 0..8usize, 0..20i64, 0..8i64).prop_map(|(dev, table, value, owner)| Action::DeviceCreate { dev, table, value, owner }),
        5 => (dev.clone(), any::<usize>(), any::<bool>(), 0..20i64).prop_map(|(dev, pick, column, value)| Action::DeviceEdit { dev, pick, column, value }),
        1 => (dev.clone(), any::<usize>(), 1..=DEVICES as i64).prop_map(|(dev, pick, to)| Action::DeviceAssign { dev, pick, to }),
        2 => (any::<usize>(), any::<bool>(), 0..20i64).prop_map(|(pick, column, value)| Action::HubEdit { pick, column, value }),
        1 => (any::<usize>(), 1..=DEVICES as i64).prop_map(|(pick, to)| Action::HubAssign { pick, to }),
        4 => (1..20_000u64).prop_map(|ms| Action::Run { ms }),
        1 => dev.clone().prop_map(|dev| Action::Disconnect { dev }),
        1 => dev.clone().prop_map(|dev| Action::Restart { dev }),
        1 => dev.clone().prop_map(|dev| Action::Corrupt { dev }),
        1 => dev.prop_map(|dev| Action::SyncNow { dev }),
        2 => (0..4u64).prop_map(|frames| Action::Partial { frames }),
    ]
}

fn run_scenario(seed: u64, faults: Faults, actions: &[Action]) -> Stats {
    let mut net = Net::new(DEVICES, seed);
    net.faults = faults;
    let tables = [
        "task", "note", "job", "task", "note", "job", "task", "secret",
    ];
    for a in actions {
        let now = net.now;
        match *a {
            Action::DeviceCreate {
                dev,
                table,
                value,
                owner,
            } => {
                // Mostly for the device's own user; sometimes (not allowed) for another.
                let user = if owner < DEVICES as i64 {
                    owner + 1
                } else {
                    net.user(dev)
                };
                let d = &mut net.devs[dev];
                d.storage.create(tables[table], user, "a", value);
                d.session.handle_local_ops(now, &mut d.storage);
            }
            Action::DeviceEdit {
                dev,
                pick,
                column,
                value,
            } => {
                let d = &mut net.devs[dev];
                let keys: Vec<Key> = d.storage.rows.keys().cloned().collect();
                if !keys.is_empty() {
                    let (t, r) = keys[pick % keys.len()].clone();
                    d.storage
                        .write(&t, r, if column { "a" } else { "b" }, value);
                    d.session.handle_local_ops(now, &mut d.storage);
                }
            }
            Action::DeviceAssign { dev, pick, to } => {
                let d = &mut net.devs[dev];
                let keys: Vec<Key> = d.storage.rows.keys().cloned().collect();
                if !keys.is_empty() {
                    let (t, r) = keys[pick % keys.len()].clone();
                    d.storage.write(&t, r, "owner", to);
                    d.session.handle_local_ops(now, &mut d.storage);
                }
            }
            Action::HubEdit {
                pick,
                column,
                value,
            } => {
                let keys: Vec<Key> = net.hub.rows.keys().cloned().collect();
                if !keys.is_empty() {
                    let (t, r) = keys[pick % keys.len()].clone();
                    net.hub
                        .server_edit(&t, r, if column { "a" } else { "b" }, value);
                    net.notify_all();
                }
            }
            Action::HubAssign { pick, to } => {
                let keys: Vec<Key> = net.hub.rows.keys().cloned().collect();
                if !keys.is_empty() {
                    let (t, r) = keys[pick % keys.len()].clone();
                    net.hub.server_edit(&t, r, "owner", to);
                    net.notify_all();
                }
            }
            Action::Run { ms } => net.run_for(Millis(ms)),
            Action::Disconnect { dev } => net.disconnect(dev),
            Action::Restart { dev } => net.restart(dev),
            Action::Corrupt { dev } => {
                if let Some(l) = net.devs[dev].link.as_mut() {
                    l.to_hub.push_back((vec![0xff; 20], false));
                }
            }
            Action::SyncNow { dev } => {
                let d = &mut net.devs[dev];
                d.session.sync_now(now, &mut d.storage, &[]);
            }
            Action::Partial { frames } => {
                net.budget = Some(frames);
                net.pump();
                net.budget = None;
                continue;
            }
        }
        net.pump();
    }
    net.heal_and_check();
    let mut stats = net.stats;
    stats.resolutions = net.hub.resolutions;
    stats.deferred_evictions = net.devs.iter().map(|d| d.storage.deferred_evictions).sum();
    stats
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_under_loss_duplication_reordering_and_disconnects(
        seed in any::<u64>(),
        loss_pct in 0u32..30,
        dup_pct in 0u32..30,
        reorder_pct in 0u32..30,
        actions in proptest::collection::vec(action(), 1..60),
    ) {
        run_scenario(seed, Faults { loss_pct, dup_pct, reorder_pct }, &actions);
    }
}

/// The chaos is not vacuous: over a fixed set of generated scenarios, every fault and every
/// protocol path the proptest is meant to cover actually happens.
#[test]
fn chaos_scenarios_reach_every_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = (
        any::<u64>(),
        0u32..30,
        0u32..30,
        0u32..30,
        proptest::collection::vec(action(), 20..60),
    );
    let mut total = Stats::default();
    for _ in 0..40 {
        let (seed, loss_pct, dup_pct, reorder_pct, actions) =
            strategy.new_tree(&mut runner).unwrap().current();
        let s = run_scenario(
            seed,
            Faults {
                loss_pct,
                dup_pct,
                reorder_pct,
            },
            &actions,
        );
        total.lost += s.lost;
        total.duplicated += s.duplicated;
        total.reordered += s.reordered;
        total.wire_closes += s.wire_closes;
        total.resolutions += s.resolutions;
        total.deferred_evictions += s.deferred_evictions;
        total.entering += s.entering;
        total.leaving += s.leaving;
        total.reconnects += s.reconnects;
        total.cut_in_flight += s.cut_in_flight;
        for k in 0..4 {
            total.rejected[k] += s.rejected[k];
        }
    }
    eprintln!("{total:?}");
    let t = total;
    for (what, n) in [
        ("lost", t.lost),
        ("duplicated", t.duplicated),
        ("reordered", t.reordered),
        ("wire closes", t.wire_closes),
        ("client-wins resolutions", t.resolutions),
        ("deferred evictions", t.deferred_evictions),
        ("rows entering", t.entering),
        ("rows leaving", t.leaving),
        ("reconnects", t.reconnects),
        ("frames cut in flight", t.cut_in_flight),
        (
            "conflict rejections",
            t.rejected[RejectionKind::Conflict as usize],
        ),
        (
            "row-not-found rejections",
            t.rejected[RejectionKind::RowNotFound as usize],
        ),
        (
            "permission rejections",
            t.rejected[RejectionKind::Permission as usize],
        ),
        (
            "validation rejections",
            t.rejected[RejectionKind::Validation as usize],
        ),
    ] {
        assert!(n > 0, "no {what} in the chaos scenarios: {t:?}");
    }
}

/// A device connected straight to a hub session, with no faults, for step-by-step tests.
fn handshake(hub: &mut RefHub, cfg: DeviceConfig, now: Millis) -> (DeviceSession, HubSession) {
    hub.devices.insert(cfg.device, (cfg.token.clone(), 1));
    let mut dev = DeviceSession::new(cfg);
    let mut s = HubSession::new(HubConfig::new(Uuid::nil()), now);
    dev.handle_connected(now);
    s.handle_message(now, dev.poll_transmit(now).unwrap(), hub);
    let welcome = s.poll_transmit(now).unwrap();
    let mut scratch = RefDevice::new(99);
    dev.handle_message(now, welcome, &mut scratch);
    assert_eq!(dev.state(), DeviceState::Ready);
    while dev.poll_transmit(now).is_some() {}
    (dev, s)
}

#[test]
fn pushes_are_cut_to_the_byte_bound_whatever_storage_returns() {
    let mut hub = RefHub::default();
    let mut cfg = device_config(0, false, 0);
    cfg.push_limits.max_bytes = 150;
    cfg.push_limits.max_items = 100;
    cfg.push_window = 100;
    let (mut dev, _s) = handshake(&mut hub, cfg, Millis(0));
    let mut store = RefDevice::new(1);
    for v in 0..5 {
        store.create("task", 1, "a", v);
    }
    dev.handle_local_ops(Millis(1), &mut store);
    let mut seqs = Vec::new();
    while let Some(m) = dev.poll_transmit(Millis(1)) {
        let Message::Push(p) = m else { panic!("{m:?}") };
        let bytes: usize = p.ops.iter().map(|o| o.change.len() + o.table.len()).sum();
        assert!(
            p.ops.len() == 1 || bytes <= 150,
            "{} ops, {bytes} bytes",
            p.ops.len()
        );
        assert_eq!(p.ops.first().unwrap().seq, p.after_seq + 1);
        seqs.extend(p.ops.iter().map(|o| o.seq));
    }
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "every op, once, in order"
    );
}

#[test]
fn a_busy_hub_sets_the_earliest_reconnect() {
    let mut hub = RefHub::default();
    let mut s = HubSession::new(HubConfig::new(Uuid::nil()), Millis(0));
    let mut dev = DeviceSession::new(device_config(0, false, 0));
    let mut store = RefDevice::new(1);
    dev.handle_connected(Millis(0));
    s.refuse_busy(Millis(0), Millis::from_minutes(3));
    let _hello = dev.poll_transmit(Millis(0));
    let refused = s.poll_transmit(Millis(0)).unwrap();
    assert!(s.is_closed());
    s.handle_message(Millis(0), Message::Ping(Ping { nonce: 0 }), &mut hub);
    dev.handle_message(Millis(0), refused, &mut store);
    assert_eq!(dev.state(), DeviceState::Closed);
    dev.handle_disconnected(Millis(0));
    let at = dev.wants_connection_at(&store).unwrap();
    assert!(at >= Millis::from_minutes(3), "{at:?}");
}

#[test]
fn keepalive_follows_the_hubs_idle_timeout() {
    let mut hub = RefHub::default();
    hub.devices.insert(device_id(0), (vec![0; 8], 1));
    let mut store = RefDevice::new(1);
    let mut dev = DeviceSession::new(device_config(0, false, 0));
    let mut cfg = HubConfig::new(Uuid::nil());
    cfg.idle_timeout = Millis::from_secs(30);
    let mut s = HubSession::new(cfg, Millis(0));
    dev.handle_connected(Millis(0));
    s.handle_message(Millis(0), dev.poll_transmit(Millis(0)).unwrap(), &mut hub);
    dev.handle_message(Millis(0), s.poll_transmit(Millis(0)).unwrap(), &mut store);
    // Answer the first pulls so only the keep-alive timer is left.
    let mut now = Millis(0);
    for _ in 0..10 {
        while let Some(m) = dev.poll_transmit(now) {
            s.handle_message(now, m, &mut hub);
        }
        while let Some(m) = s.poll_transmit(now) {
            dev.handle_message(now, m, &mut store);
        }
    }
    assert!(dev.is_quiet());
    now = dev.poll_timeout().unwrap();
    assert_eq!(now, Millis::from_secs(10), "a third of the hub's 30 s");
    dev.handle_timeout(now, &mut store);
    assert!(matches!(dev.poll_transmit(now), Some(Message::Ping(_))));
}

/// A hub with 20 tasks pulled 4 per batch, and device 0's session past Hello/Welcome at t = 0.
fn twenty_tasks_handshaken() -> (RefHub, HubSession, DeviceSession, RefDevice) {
    let mut hub = RefHub::default();
    for r in 0..20u128 {
        hub.server_edit("task", Uuid::from_u128(r), "owner", 1);
    }
    let mut cfg = HubConfig::new(Uuid::nil());
    cfg.pull_limits.max_items = 4;
    hub.devices.insert(device_id(0), (vec![0; 8], 1));
    let mut s = HubSession::new(cfg, Millis(0));
    let mut dev = DeviceSession::new(device_config(0, false, 0));
    let mut store = RefDevice::new(1);
    let t = Millis(0);
    dev.handle_connected(t);
    s.handle_message(t, dev.poll_transmit(t).unwrap(), &mut hub);
    dev.handle_message(t, s.poll_transmit(t).unwrap(), &mut store);
    (hub, s, dev, store)
}

#[test]
fn the_hub_keeps_two_batches_in_flight_per_table() {
    let (mut hub, mut s, mut dev, _) = twenty_tasks_handshaken();
    while let Some(m) = dev.poll_transmit(Millis(0)) {
        s.handle_message(Millis(0), m, &mut hub);
    }
    let mut task_batches = Vec::new();
    while let Some(m) = s.poll_transmit(Millis(0)) {
        if let Message::PullBatch(b) = &m {
            if b.table == "task" {
                task_batches.push((b.from, b.cursor, b.more));
            }
        }
    }
    assert_eq!(
        task_batches,
        vec![(Cursor(0), Cursor(4), true), (Cursor(4), Cursor(8), true)],
        "two ahead of the acks, no more"
    );
}

// ---------------------------------------------------------------------------------------------
// Frozen regressions (shrunk proptest failures), each with its postmortem.
// ---------------------------------------------------------------------------------------------

/// Postmortem (shrunk from the convergence proptest): a device pushed [create a row for
/// another user (refused: another owner), a column write (refused: no such row), assign the row
/// to itself (accepted: it *created* the row)]. The ack was lost, the push re-sent, and the hub
/// judged the first op again against the row that now existed: accepted. The device had
/// recorded it as a sync error and rolled it back. Fix: the hub answers an op it already
/// decided as it did the first time (`HubStorage::apply_push`).
#[test]
fn regression_a_resent_push_gets_the_same_answer() {
    let mut hub = RefHub::default();
    let (mut dev, mut s) = handshake(&mut hub, device_config(0, false, 0), Millis(0));
    let mut store = RefDevice::new(1);
    let row = Uuid::from_u128(5);
    store.write("task", row, "owner", 2);
    store.write("task", row, "a", 1);
    store.write("task", row, "owner", 1);
    dev.handle_local_ops(Millis(0), &mut store);
    let push = dev.poll_transmit(Millis(0)).unwrap();
    s.handle_message(Millis(0), push, &mut hub);
    let lost_ack = s.poll_transmit(Millis(0)).unwrap();
    assert!(matches!(&lost_ack, Message::PushAck(a) if a.rejected.len() == 2));
    // The ack is lost; the device re-sends after its request timeout.
    let t = dev.poll_timeout().unwrap();
    dev.handle_timeout(t, &mut store);
    let mut resent = None;
    while let Some(m) = dev.poll_transmit(t) {
        if let Message::Push(_) = m {
            resent = Some(m);
        }
    }
    s.handle_message(t, resent.expect("push re-sent"), &mut hub);
    let ack = s.poll_transmit(t).unwrap();
    assert_eq!(ack, lost_ack, "the same answer");
    dev.handle_message(t, ack, &mut store);
    let rejected: Vec<u64> = store.errors.iter().map(|e| e.seq).collect();
    assert_eq!(rejected, [1, 2]);
    assert!(
        !hub.held.contains(&(1, 1)),
        "a refused op stays off the hub"
    );
}

/// Postmortem: a device created a row and pushed it; the hub gave the row to another user
/// before the device's next pull. The feed from the device's cursor saw a row that was in the
/// set neither at the start nor at the end, so it said nothing, and the device kept a row it
/// may not see. Fix: a row the device wrote itself in the range is reported as leaving
/// (`PullChunk::leaving`).
#[test]
fn regression_a_row_created_here_and_moved_away_before_any_pull_is_evicted() {
    // Device 1 (user 2) is not live: it learns of rows only by pulling.
    let mut net = Net::new(2, 13);
    net.run_for(Millis::from_secs(2));
    let row = net.devs[1].storage.create("task", 2, "a", 1);
    net.local_ops(1);
    net.pump();
    let key = ("task".to_string(), row);
    assert!(net.hub.rows.contains_key(&key));
    net.hub.server_edit("task", row, "owner", 1);
    net.notify_all();
    net.heal_and_check();
    assert!(!net.devs[1].storage.rows.contains_key(&key));
    assert!(net.devs[0].storage.rows.contains_key(&key));
}

#[test]
fn a_hub_that_breaks_the_protocol_is_dropped() {
    let bad: Vec<Message> = vec![
        // A rejection of an op that was not in the push.
        Message::PushAck(fieldsync_replication::proto::PushAck {
            after_seq: 0,
            up_to_seq: 2,
            rejected: vec![Rejection {
                seq: 7,
                table: "task".into(),
                row: Uuid::nil(),
                operation: Operation::Write,
                kind: RejectionKind::Validation,
                message: String::new(),
                authoritative: None,
            }],
        }),
        // A table outside the profile.
        Message::PullBatch(fieldsync_replication::proto::PullBatch {
            table: "secret".into(),
            from: Cursor(0),
            cursor: Cursor(1),
            ops: vec![],
            entering: vec![],
            leaving: vec![],
            more: false,
        }),
        // A cursor that runs backwards with changes (only an empty batch restarts a feed).
        Message::PullBatch(fieldsync_replication::proto::PullBatch {
            table: "task".into(),
            from: Cursor(5),
            cursor: Cursor(1),
            ops: vec![],
            entering: vec![],
            leaving: vec![Uuid::nil()],
            more: false,
        }),
        // A message only devices send.
        Message::Pull(fieldsync_replication::proto::Pull { tables: vec![] }),
    ];
    for msg in bad {
        let mut hub = RefHub::default();
        let (mut dev, _s) = handshake(&mut hub, device_config(0, false, 0), Millis(0));
        let mut store = RefDevice::new(1);
        store.create("task", 1, "a", 1);
        dev.handle_local_ops(Millis(0), &mut store);
        while dev.poll_transmit(Millis(0)).is_some() {}
        dev.handle_message(Millis(1), msg.clone(), &mut store);
        assert_eq!(dev.state(), DeviceState::Closed, "{msg:?}");
        assert!(
            matches!(dev.poll_transmit(Millis(1)), Some(Message::Close(c)) if c.code == CloseCode::PROTOCOL_VIOLATION),
            "{msg:?}"
        );
        assert_eq!(store.acked, 0, "nothing acknowledged by a broken hub");
    }
}

/// Bounded batches make progress in short windows of coverage: a device with 2,000 pending ops
/// and 3,000 rows to receive, on a 1 Mbit/s link with 300 ms round trips that stays up 3
/// seconds at a time, gets further in every window and finishes in a few.
#[test]
fn a_three_second_window_makes_progress() {
    const BITS_PER_MS: u64 = 1_000;
    const ONE_WAY_MS: u64 = 150;
    let mut hub = RefHub::default();
    hub.devices.insert(device_id(0), (vec![0; 8], 1));
    for r in 0..3_000u128 {
        hub.server_edit("task", Uuid::from_u128(r), "owner", 1);
    }
    let mut store = RefDevice::new(1);
    for v in 0..1_000 {
        store.create("note", 1, "a", v % 12);
    }
    let mut dev = DeviceSession::new({
        let mut c = device_config(0, false, 7);
        c.push_limits.max_items = fieldsync_replication::proto::messages::PUSH_BATCH_OPS_MAX;
        c
    });
    let mut now = Millis(0);
    let mut windows = 0;
    let progress = |s: &RefDevice| s.acked + s.cursors.values().map(|c| c.0).sum::<u64>();
    loop {
        let done = store.acked == 2_000
            && PROFILE.iter().all(|t| store.last_sync.contains_key(*t))
            && store.cursors.get("task") == Some(&Cursor(hub.log.len() as u64));
        if done {
            break;
        }
        windows += 1;
        assert!(
            windows <= 8,
            "too many windows: acked {}, cursors {:?}",
            store.acked,
            store.cursors
        );
        now = now.max(dev.wants_connection_at(&store).unwrap());
        let end = now + Millis(3_000);
        let before = progress(&store);
        let mut s = HubSession::new(HubConfig::new(Uuid::nil()), now);
        dev.handle_connected(now);
        // (deliver at, sequence) -> (to the hub?, frame)
        let mut wire_q: BTreeMap<(Millis, u64), (bool, Vec<u8>)> = BTreeMap::new();
        let mut busy = [now, now];
        let mut n = 0u64;
        loop {
            let mut out: Vec<(bool, Message)> = Vec::new();
            while let Some(m) = dev.poll_transmit(now) {
                out.push((true, m));
            }
            while let Some(m) = s.poll_transmit(now) {
                out.push((false, m));
            }
            for (to_hub, m) in out {
                let bytes = wire::encode(&m).unwrap();
                let lane = usize::from(!to_hub);
                let sent = busy[lane].max(now) + Millis(bytes.len() as u64 * 8 / BITS_PER_MS);
                busy[lane] = sent;
                n += 1;
                wire_q.insert((sent + Millis(ONE_WAY_MS), n), (to_hub, bytes));
            }
            let next = [
                wire_q.keys().next().map(|k| k.0),
                dev.poll_timeout(),
                s.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
            if next >= end {
                break;
            }
            now = now.max(next);
            while let Some(entry) = wire_q.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let (to_hub, bytes) = entry.remove();
                let (m, _) = wire::decode(&bytes).unwrap();
                if to_hub {
                    s.handle_message(now, m, &mut hub);
                } else {
                    dev.handle_message(now, m, &mut store);
                }
            }
            if dev.poll_timeout().is_some_and(|t| t <= now) {
                dev.handle_timeout(now, &mut store);
            }
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
        // Coverage ends: whatever is on the wire is lost.
        now = end;
        dev.handle_disconnected(now);
        assert!(
            progress(&store) > before,
            "window {windows} made no progress"
        );
    }
    eprintln!("synced in {windows} windows of 3 s");
    assert!(windows >= 2, "the test should need more than one window");
    store.check().unwrap();
}

#[test]
fn a_stale_batch_is_acked_with_the_devices_cursor_and_acks_free_the_window() {
    let (mut hub, mut s, mut dev, mut store) = twenty_tasks_handshaken();
    let t = Millis(0);
    while let Some(m) = dev.poll_transmit(t) {
        s.handle_message(t, m, &mut hub);
    }
    let task_batches = |s: &mut HubSession| {
        let mut out = Vec::new();
        while let Some(m) = s.poll_transmit(t) {
            if let Message::PullBatch(b) = m {
                if b.table == "task" {
                    out.push(b);
                }
            }
        }
        out
    };
    let task_acks = |dev: &mut DeviceSession| {
        let mut out = Vec::new();
        while let Some(m) = dev.poll_transmit(t) {
            if let Message::PullAck(a) = m {
                if a.table == "task" {
                    out.push(a.cursor);
                }
            }
        }
        out
    };
    let sent = task_batches(&mut s);
    assert_eq!(sent.len(), 2, "two batches ahead of the acks");
    // The device applies the first batch, then gets it again (as after a feed reset): the copy
    // is stale, and the device says where it is instead of staying silent.
    dev.handle_message(t, Message::PullBatch(sent[0].clone()), &mut store);
    assert_eq!(task_acks(&mut dev), vec![Cursor(4)]);
    dev.handle_message(t, Message::PullBatch(sent[0].clone()), &mut store);
    assert_eq!(
        task_acks(&mut dev),
        vec![Cursor(4)],
        "a stale batch is acked"
    );
    // One ack at the second batch's cursor frees both places: the next two batches go out.
    s.handle_message(
        t,
        Message::PullAck(fieldsync_replication::proto::messages::PullAck {
            table: "task".into(),
            cursor: Cursor(8),
        }),
        &mut hub,
    );
    let next: Vec<_> = task_batches(&mut s)
        .iter()
        .map(|b| (b.from, b.cursor))
        .collect();
    assert_eq!(
        next,
        vec![(Cursor(8), Cursor(12)), (Cursor(12), Cursor(16))]
    );
}

/// Postmortem (the sync bench: 1,000 live devices on one hub stalled at about 700): every push
/// wakes every live session, and a live feed that found nothing for its device read again from
/// the device's last batch, so each wake-up re-read every change made since then. The hub's
/// work per push grew with devices × pushes; new devices waited over 10 s for `Welcome`, their
/// handshakes timed out, and the bench (which does not reconnect) waited for them forever.
/// Fix: a live feed remembers how far it read with nothing to send and reads on from there;
/// the batch it sends next still starts at the device's cursor, which the device accepts.
#[test]
fn regression_a_quiet_live_feed_reads_each_change_once() {
    let mut hub = RefHub::default();
    let mine = Uuid::from_u128(1);
    hub.server_edit("task", mine, "owner", 1);
    hub.devices.insert(device_id(0), (vec![0; 8], 1));
    let mut store = RefDevice::new(1);
    let mut dev = DeviceSession::new(device_config(0, true, 0));
    let mut s = HubSession::new(HubConfig::new(Uuid::nil()), Millis(0));
    let t = Millis(0);
    dev.handle_connected(t);
    s.handle_message(t, dev.poll_transmit(t).unwrap(), &mut hub);
    dev.handle_message(t, s.poll_transmit(t).unwrap(), &mut store);
    for _ in 0..10 {
        while let Some(m) = dev.poll_transmit(t) {
            s.handle_message(t, m, &mut hub);
        }
        while let Some(m) = s.poll_transmit(t) {
            dev.handle_message(t, m, &mut store);
        }
    }
    assert!(dev.is_quiet(), "the device synced and subscribed");
    let synced = store.cursors["task"];
    // Other users' rows change: nothing for this device, nothing sent, each change read once.
    hub.reads.clear();
    for k in 0..4u128 {
        hub.server_edit("task", Uuid::from_u128(100 + k), "owner", 2);
        s.handle_changes(t, &["task".to_string()], &mut hub);
        assert_eq!(s.poll_transmit(t), None, "nothing for the device");
    }
    let starts: Vec<u64> = hub.reads.iter().map(|(_, c)| c.0).collect();
    assert_eq!(
        starts,
        vec![synced.0, synced.0 + 1, synced.0 + 2, synced.0 + 3],
        "each wake-up reads on from where the last one stopped"
    );
    // The device's own row changes: one batch from the device's cursor, applied as is.
    hub.server_edit("task", mine, "a", 7);
    s.handle_changes(t, &["task".to_string()], &mut hub);
    assert_eq!(
        hub.reads.last(),
        Some(&("task".to_string(), Cursor(synced.0 + 4)))
    );
    let Some(Message::PullBatch(b)) = s.poll_transmit(t) else {
        panic!("a batch for the device's row")
    };
    assert_eq!((b.from, b.cursor), (synced, Cursor(synced.0 + 5)));
    dev.handle_message(t, Message::PullBatch(b), &mut store);
    assert_eq!(store.cursors["task"], Cursor(synced.0 + 5));
    assert!(
        matches!(dev.poll_transmit(t), Some(Message::PullAck(a)) if a.cursor == Cursor(synced.0 + 5)),
        "applied, not taken for a gap"
    );
    let ops = &store.rows[&("task".to_string(), mine)];
    assert!(ops.values().any(|o| o.column == "a" && o.value == 7));
}
