//! Sync over real QUIC on loopback, each figure next to its baseline from the same run.
//!
//! `cargo bench -p fieldsync-replication --features quic --bench sync`
//!
//! Everything runs the real code: the field-service schema, profile and app
//! (`examples/field-service/`), realistic rows (`common/field_service.rs`, shared with the
//! routing bench), [`HubReplica`] over a real hub store, [`DeviceReplica`] over a real device
//! store, the sans-IO sessions, the wire format and `replication::transport` (pinned TLS,
//! the hub's connection limits, the per-connection driver with its wake-up for live mode).
//! The adapters below are the few lines the transport's driver docs sketch; `node` has its own
//! richer ones (metrics, reports), which this crate cannot depend on.
//!
//! - `initial_sync`: a fresh device (new on-disk store, default options: every batch durable)
//!   syncs its whole set, about `FIELDSYNC_BENCH_ROWS` rows (100,000), from a hub holding the
//!   rows of two technicians of one crew. Timed from the authenticated connection to the last
//!   table synced; in µs per row. Base: the very bytes the hub sent (captured frame by frame)
//!   sent raw over one QUIC stream of a loopback pair with the hub's limits, and written to
//!   sled on arrival (one record per row-sized slice, one durable flush per frame, as the
//!   device store commits one durable write per batch).
//! - `edit_visible_p50`, `edit_visible_p99`: device A (technician 1) changes a work order their
//!   crew owns; device B (technician 2), connected in live mode, has the change in its store.
//!   Timed from A's local commit to B's store holding the new value; in ms. Base: one QUIC
//!   round trip (100 bytes each way) on a loopback pair, p50 and p99 of the same run.
//! - `hub_memory_per_device`: a hub in its own process (this binary re-run with `--child hub`)
//!   with `FIELDSYNC_BENCH_DEVICE_HUB_ROWS` rows (100,000) and `FIELDSYNC_BENCH_DEVICES`
//!   technicians (1,000), one device each. Each device connects in live mode, pushes 5 ops (a
//!   new work order and 4 edits to it), pulls its whole set (the product catalog included), and
//!   stays connected. The hub's RSS (VmRSS of `/proc/self/status`, read by the hub process on
//!   request) is taken idle (store and replica open, no device), with the first device synced
//!   and connected, and with every device synced and connected. ours = (RSS with all devices −
//!   idle) / devices; base = RSS with one device − idle; in MiB. A `#` line gives the hub's ops
//!   per second while the other devices sync (ops pushed and accepted plus items pulled, over
//!   the wall time from their first connection to the last one done; they connect in waves of
//!   64). These devices use a light in-memory `DeviceStorage` (`LightDevice`: its own ops,
//!   acks, cursors; pulled rows are counted, not stored) so the bench process does not hold
//!   1,000 sled stores; the hub does the same work either way.
//! - `hub_rss_1m_rows`: a second hub process with `FIELDSYNC_BENCH_HUB_ROWS` rows (1,000,000)
//!   and 1,000 technicians: ours = its RSS after open and one device's full sync (it is still
//!   connected); base = the size on disk of the hub's store directory right after the rows
//!   were written (rows, log, indexes); in MiB.
//!
//! Counts scale with `FIELDSYNC_BENCH_ROWS`, `FIELDSYNC_BENCH_EDITS`,
//! `FIELDSYNC_BENCH_DEVICES`, `FIELDSYNC_BENCH_DEVICE_HUB_ROWS` and `FIELDSYNC_BENCH_HUB_ROWS`
//! (a count of 0 skips that part); the counts used are printed. The `quic` feature is
//! required (`--features quic`): the transport is behind it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "common/field_service.rs"]
mod field_service;

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use field_service::{counts, environment, example, id_of, owner_team, owner_user, row_values};
use fieldsync_replication::credential::{
    HubSigningKey, MemoryTokenRegistry, SignedToken, TokenVerifier,
};
use fieldsync_replication::proto::{
    BatchLimits, BlobSlice, ConflictPolicy, Cursor, DeviceConfig, DeviceEvent, DeviceId,
    DeviceSession, DeviceState, DeviceStorage, HubConfig, HubEvent, HubSession, HubStorage, Millis,
    Principal, PullChunk, PushOp, PushOutcome, Refusal, Rejection, RowChange, RowDoc, StorageError,
    SyncSchedule, UploadOutcome,
};
use fieldsync_replication::replica::{DeviceReplica, HubReplica};
use fieldsync_replication::transport::baseline::{loopback_pair, percentile, round_trip_latencies};
use fieldsync_replication::transport::{
    accept_device, authenticate, drive_session_with_wake, ChangeBus, CloseReason, ConnectionLimits,
    DeviceEndpoint, FrameFormat, FrameSession, HubEndpoint, HubIdentity, SessionClock,
};
use fieldsync_replication::{apps_from_toml, wire, Profile, Router};
use fieldsync_store::{ActorId, RowId, Schema, Store, StoreOptions, Value};
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

const APP: &str = "Field Service Mobile";
const MIB: f64 = 1024.0 * 1024.0;
const OPS_PER_LIGHT_DEVICE: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn schema() -> Schema {
    Schema::from_toml(&example("schema.toml")).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The hub: a HubSession per connection over one shared HubReplica, woken for live sessions.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct HubStats {
    /// Time spent in the hub's session and replica (handling messages and wake-ups).
    busy_ns: AtomicU64,
    /// Time spent in `HubReplica::pull` (part of `busy_ns`), and its calls.
    pull_ns: AtomicU64,
    pulls: AtomicU64,
    ops_in: AtomicU64,
    items_out: AtomicU64,
    rejected: AtomicU64,
}

struct Hub {
    replica: Mutex<HubReplica>,
    config: HubConfig,
    verifier: TokenVerifier,
    registry: MemoryTokenRegistry,
    bus: ChangeBus,
    stats: HubStats,
    /// Every frame the hub sends, while `Some` (the initial sync's baseline resends them).
    capture: Mutex<Option<Vec<Vec<u8>>>>,
}

struct HubAdapter {
    hub: Arc<Hub>,
    session: HubSession,
    id: u64,
    out: VecDeque<Vec<u8>>,
}

impl HubAdapter {
    fn settle(&mut self, now: Millis) {
        while let Some(msg) = self.session.poll_transmit(now) {
            let frame = wire::encode(&msg).unwrap();
            if let Some(c) = self.hub.capture.lock().unwrap().as_mut() {
                c.push(frame.clone());
            }
            self.out.push_back(frame);
        }
        while let Some(ev) = self.session.poll_event() {
            match ev {
                HubEvent::Authenticated { principal } => {
                    self.hub.bus.set_user(self.id, principal.user);
                }
                HubEvent::OpsApplied {
                    accepted, rejected, ..
                } => {
                    let s = &self.hub.stats;
                    s.ops_in.fetch_add(accepted as u64, Ordering::Relaxed);
                    s.rejected.fetch_add(rejected as u64, Ordering::Relaxed);
                    let changes = self.hub.replica.lock().unwrap().take_changes();
                    self.hub.bus.publish(&changes);
                }
                HubEvent::BatchSent { items, .. } => {
                    self.hub
                        .stats
                        .items_out
                        .fetch_add(items as u64, Ordering::Relaxed);
                }
                HubEvent::StorageFailed { error } => panic!("hub storage failed: {error}"),
                _ => {}
            }
        }
    }
}

impl FrameSession for HubAdapter {
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
        let now = Millis(now_ms);
        let t = Instant::now();
        match wire::decode(bytes) {
            Ok((msg, _)) => {
                let hub = self.hub.clone();
                let mut replica = hub.replica.lock().unwrap();
                let mut storage = TimedHub {
                    inner: &mut replica,
                    stats: &hub.stats,
                };
                self.session.handle_message(now, msg, &mut storage);
            }
            Err(e) => self.session.handle_wire_error(now, &e),
        }
        self.settle(now);
        let busy = t.elapsed().as_nanos() as u64;
        self.hub.stats.busy_ns.fetch_add(busy, Ordering::Relaxed);
        Ok(())
    }
    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }
    fn poll_timeout(&self) -> Option<u64> {
        self.session.poll_timeout().map(|m| m.0)
    }
    fn handle_timeout(&mut self, now_ms: u64) {
        self.session.handle_timeout(Millis(now_ms));
        self.settle(Millis(now_ms));
    }
    fn is_closed(&self) -> bool {
        self.session.is_closed() && self.out.is_empty()
    }
    fn handle_wake(&mut self, now_ms: u64) {
        let now = Millis(now_ms);
        let t = Instant::now();
        let tables = self.hub.bus.take(self.id);
        if !tables.is_empty() {
            let hub = self.hub.clone();
            let mut replica = hub.replica.lock().unwrap();
            let mut storage = TimedHub {
                inner: &mut replica,
                stats: &hub.stats,
            };
            self.session.handle_changes(now, &tables, &mut storage);
        }
        self.settle(now);
        let busy = t.elapsed().as_nanos() as u64;
        self.hub.stats.busy_ns.fetch_add(busy, Ordering::Relaxed);
    }
}

/// Accepts devices on `endpoint` until it closes; one task per connection.
async fn serve(endpoint: Arc<HubEndpoint>, hub: Arc<Hub>) {
    while let Some(pending) = endpoint.accept().await {
        let hub = hub.clone();
        // 1,000 devices connect at once: give each more time to show its token.
        let mut limits = endpoint.limits().clone();
        limits.auth_timeout_ms = 30_000;
        tokio::spawn(async move {
            let Ok(conn) = pending.complete().await else {
                return;
            };
            let Ok(auth) = accept_device(&conn, &hub.verifier, &hub.registry, &limits).await else {
                return;
            };
            let mut writer = auth.writer.with_format(FrameFormat::WIRE_V1);
            let mut reader = auth.reader.with_format(FrameFormat::WIRE_V1);
            let clock = SessionClock::new(unix_ms());
            let (id, wake) = hub.bus.register();
            let mut adapter = HubAdapter {
                session: HubSession::new(hub.config.clone(), Millis(clock.now_ms())),
                hub: hub.clone(),
                id,
                out: VecDeque::new(),
            };
            let _ = drive_session_with_wake(
                &mut adapter,
                &conn,
                &mut writer,
                &mut reader,
                &clock,
                &wake,
            )
            .await;
            hub.bus.unregister(id);
        });
    }
}

/// Writes `rows` rows of the data set into `store`, 1,000 per transaction.
fn load_rows(store: &Store, data: &field_service::Data, total: usize) -> usize {
    let mut n = 0;
    let mut tx = store.begin();
    for (table, count) in counts(total) {
        for i in 0..count {
            let values = row_values(data, table, i, 0);
            let values: Vec<(&str, Value)> = values
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            tx.insert_with_id(table, id_of(table, i), &values).unwrap();
            n += 1;
            if n % 1_000 == 0 {
                tx.commit().unwrap();
                tx = store.begin();
            }
        }
    }
    tx.commit().unwrap();
    n
}

/// The hub's replica over `store` (with a signing key, to enroll devices) and its verifier.
fn open_hub(store: Store, env: &fieldsync_replication::Environment) -> (HubReplica, TokenVerifier) {
    let schema = store.schema().clone();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let apps = apps_from_toml(&example("apps.toml"), &schema).unwrap();
    let key = HubSigningKey::generate().unwrap();
    let replica = HubReplica::open(
        store,
        env.clone(),
        apps,
        vec![profile],
        key.verifier(),
        unix_ms() as i64,
    )
    .unwrap();
    let verifier = key.verifier();
    (replica.with_signing_key(key), verifier)
}

fn start_hub(
    replica: HubReplica,
    verifier: TokenVerifier,
    registry: MemoryTokenRegistry,
) -> (Arc<Hub>, Arc<HubEndpoint>, SocketAddr, HubIdentity) {
    let identity = HubIdentity::generate("bench hub").unwrap();
    let endpoint = Arc::new(
        HubEndpoint::bind(
            (Ipv4Addr::LOCALHOST, 0).into(),
            &identity,
            ConnectionLimits::hub(),
        )
        .unwrap(),
    );
    let addr = endpoint.local_addr().unwrap();
    let hub = Arc::new(Hub {
        replica: Mutex::new(replica),
        config: HubConfig::new(Uuid::from_u128(0x4ab)),
        verifier,
        registry,
        bus: ChangeBus::default(),
        stats: HubStats::default(),
        capture: Mutex::new(None),
    });
    tokio::spawn(serve(endpoint.clone(), hub.clone()));
    (hub, endpoint, addr, identity)
}

// ---------------------------------------------------------------------------------------------
// Devices: a DeviceSession over any DeviceStorage, driven over a real connection.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// Connected, everything pushed and acknowledged, every table pulled.
    Done,
    /// A pulled batch was applied.
    Applied,
}

struct DeviceAdapter<S> {
    session: DeviceSession,
    storage: S,
    out: VecDeque<Vec<u8>>,
    signals: mpsc::UnboundedSender<Signal>,
    done: bool,
    /// Why the session ended, if it did.
    closed: Option<String>,
    items_in: u64,
    rejected: u64,
    /// Time spent in the device's session and storage handling frames.
    busy_ns: Arc<AtomicU64>,
}

impl<S: DeviceStorage> DeviceAdapter<S> {
    fn settle(&mut self, now: Millis) {
        while let Some(msg) = self.session.poll_transmit(now) {
            self.out.push_back(wire::encode(&msg).unwrap());
        }
        while let Some(ev) = self.session.poll_event() {
            match ev {
                DeviceEvent::BatchApplied {
                    ops,
                    entering,
                    leaving,
                    ..
                } => {
                    self.items_in += (ops + entering + leaving) as u64;
                    let _ = self.signals.send(Signal::Applied);
                }
                DeviceEvent::PushAcked { rejected, .. } => self.rejected += rejected.len() as u64,
                DeviceEvent::Refused { message, .. } => panic!("hub refused a device: {message}"),
                DeviceEvent::StorageFailed { error } => panic!("device storage: {error}"),
                DeviceEvent::Closed {
                    code,
                    reason,
                    by_peer,
                } => {
                    let by = if by_peer { "hub" } else { "device" };
                    self.closed = Some(format!("closed by the {by}: {code} ({reason})"));
                }
                _ => {}
            }
        }
        if !self.done && self.session.state() == DeviceState::Ready && self.session.is_quiet() {
            let pending =
                self.storage.last_local_seq().unwrap() > self.storage.acked_seq().unwrap();
            if !pending {
                self.done = true;
                let _ = self.signals.send(Signal::Done);
            }
        }
    }
}

impl<S: DeviceStorage> FrameSession for DeviceAdapter<S> {
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
        let now = Millis(now_ms);
        let t = Instant::now();
        match wire::decode(bytes) {
            Ok((msg, _)) => self.session.handle_message(now, msg, &mut self.storage),
            Err(e) => self.session.handle_wire_error(now, &e),
        }
        self.settle(now);
        let busy = t.elapsed().as_nanos() as u64;
        self.busy_ns.fetch_add(busy, Ordering::Relaxed);
        Ok(())
    }
    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }
    fn poll_timeout(&self) -> Option<u64> {
        self.session.poll_timeout().map(|m| m.0)
    }
    fn handle_timeout(&mut self, now_ms: u64) {
        self.session
            .handle_timeout(Millis(now_ms), &mut self.storage);
        self.settle(Millis(now_ms));
    }
    fn is_closed(&self) -> bool {
        !matches!(
            self.session.state(),
            DeviceState::Handshaking | DeviceState::Ready
        ) && self.out.is_empty()
    }
    /// New local ops were committed (the bench notifies after each edit).
    fn handle_wake(&mut self, now_ms: u64) {
        self.session
            .handle_local_ops(Millis(now_ms), &mut self.storage);
        self.settle(Millis(now_ms));
    }
}

/// A [`DeviceStorage`] that times the calls a pulled batch makes (the initial sync's
/// breakdown line).
struct Timed<S> {
    inner: S,
    /// ns in apply_ops + import_rows + evict_rows, and in set_cursor (the batch's flush).
    apply_ns: Arc<AtomicU64>,
    cursor_ns: Arc<AtomicU64>,
}

fn timed<T>(acc: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    acc.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

impl<S: DeviceStorage> DeviceStorage for Timed<S> {
    fn acked_seq(&self) -> Result<u64, StorageError> {
        self.inner.acked_seq()
    }
    fn last_local_seq(&self) -> Result<u64, StorageError> {
        self.inner.last_local_seq()
    }
    fn pending_ops(&self, after: u64, limits: BatchLimits) -> Result<Vec<PushOp>, StorageError> {
        self.inner.pending_ops(after, limits)
    }
    fn record_ack(&mut self, now: Millis, up_to: u64, r: &[Rejection]) -> Result<(), StorageError> {
        self.inner.record_ack(now, up_to, r)
    }
    fn apply_ops(&mut self, table: &str, ops: &[RowChange]) -> Result<(), StorageError> {
        timed(&self.apply_ns, || self.inner.apply_ops(table, ops))
    }
    fn import_rows(&mut self, table: &str, rows: &[RowDoc]) -> Result<(), StorageError> {
        timed(&self.apply_ns, || self.inner.import_rows(table, rows))
    }
    fn evict_rows(&mut self, table: &str, rows: &[RowId]) -> Result<(), StorageError> {
        timed(&self.apply_ns, || self.inner.evict_rows(table, rows))
    }
    fn cursor(&self, table: &str) -> Result<Cursor, StorageError> {
        self.inner.cursor(table)
    }
    fn set_cursor(
        &mut self,
        table: &str,
        cursor: Cursor,
        synced_at: Option<Millis>,
    ) -> Result<(), StorageError> {
        timed(&self.cursor_ns, || {
            self.inner.set_cursor(table, cursor, synced_at)
        })
    }
    fn restart_cursor(&mut self, table: &str, cursor: Cursor) -> Result<(), StorageError> {
        timed(&self.cursor_ns, || self.inner.restart_cursor(table, cursor))
    }
    fn last_sync(&self, table: &str) -> Result<Option<Millis>, StorageError> {
        self.inner.last_sync(table)
    }
    fn blob_progress(&self, sha: &[u8; 32]) -> Result<u64, StorageError> {
        self.inner.blob_progress(sha)
    }
    fn write_blob_chunk(
        &mut self,
        sha: &[u8; 32],
        offset: u64,
        data: &[u8],
        total: u64,
    ) -> Result<(), StorageError> {
        self.inner.write_blob_chunk(sha, offset, data, total)
    }
    fn blobs_to_fetch(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        self.inner.blobs_to_fetch()
    }
    fn blobs_to_upload(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        self.inner.blobs_to_upload()
    }
    fn read_blob_range(
        &self,
        sha: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        self.inner.read_blob_range(sha, offset, max_len)
    }
    fn record_upload(&mut self, sha: &[u8; 32], stored: bool) -> Result<(), StorageError> {
        self.inner.record_upload(sha, stored)
    }
}

/// The hub's replica as one session sees it, timing `pull` (the initial sync's breakdown).
struct TimedHub<'a> {
    inner: &'a mut HubReplica,
    stats: &'a HubStats,
}

impl HubStorage for TimedHub<'_> {
    fn authenticate(
        &mut self,
        device: DeviceId,
        token: &[u8],
        app: &str,
    ) -> Result<Result<Principal, Refusal>, StorageError> {
        self.inner.authenticate(device, token, app)
    }
    fn apply_push(
        &mut self,
        now: Millis,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
    ) -> Result<PushOutcome, StorageError> {
        self.inner.apply_push(now, who, policy, op)
    }
    fn row_copy_withheld(
        &mut self,
        who: &Principal,
        table: &str,
        row: RowId,
    ) -> Result<(), StorageError> {
        self.inner.row_copy_withheld(who, table, row)
    }
    fn pull(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError> {
        self.stats.pulls.fetch_add(1, Ordering::Relaxed);
        timed(&self.stats.pull_ns, || {
            self.inner.pull(who, table, after, limits)
        })
    }
    fn blob_chunk(
        &mut self,
        who: &Principal,
        sha: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        self.inner.blob_chunk(who, sha, offset, max_len)
    }
    fn put_blob_chunk(
        &mut self,
        now: Millis,
        who: &Principal,
        sha: &[u8; 32],
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<UploadOutcome, StorageError> {
        self.inner
            .put_blob_chunk(now, who, sha, offset, total, data)
    }
}

/// A connected device: its signals, the notify that tells it about local edits, its task.
struct Running<S> {
    signals: mpsc::UnboundedReceiver<Signal>,
    local_ops: Arc<Notify>,
    busy_ns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<DeviceAdapter<S>>,
}

impl<S> Running<S> {
    async fn wait(&mut self, want: Signal, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.signals.recv()).await {
                Ok(Some(s)) if s == want => return,
                Ok(Some(_)) => {}
                Ok(None) => panic!("device ended before {want:?}"),
                Err(_) => panic!("no {want:?} in {timeout:?}"),
            }
        }
    }
}

/// Connects `storage` as the device of `token` in live mode, asks for every table and starts
/// driving the session. Returns once the connection is authenticated.
async fn connect<S: DeviceStorage + Send + 'static>(
    endpoint: &DeviceEndpoint,
    hub: SocketAddr,
    token: &SignedToken,
    schedule: SyncSchedule,
    mut storage: S,
) -> Running<S> {
    let limits = ConnectionLimits::device();
    let conn = endpoint.connect(hub).await.unwrap();
    let (writer, reader) = authenticate(
        &conn,
        token,
        Duration::from_secs(30),
        limits.max_frame_bytes,
    )
    .await
    .unwrap();
    let t = token.token();
    let mut config = DeviceConfig::new(
        DeviceId(t.device_id),
        token.as_bytes().to_vec(),
        &t.app,
        schedule,
    );
    config.live = true;
    let mut session = DeviceSession::new(config);
    let clock = SessionClock::new(unix_ms());
    let now = Millis(clock.now_ms());
    session.sync_now(now, &mut storage, &[]);
    session.handle_connected(now);
    let (tx, rx) = mpsc::unbounded_channel();
    let local_ops = Arc::new(Notify::new());
    let wake = local_ops.clone();
    let busy_ns = Arc::new(AtomicU64::new(0));
    let busy = busy_ns.clone();
    let task = tokio::spawn(async move {
        let mut adapter = DeviceAdapter {
            session,
            storage,
            out: VecDeque::new(),
            signals: tx,
            done: false,
            closed: None,
            items_in: 0,
            rejected: 0,
            busy_ns: busy,
        };
        adapter.settle(now);
        let mut writer = writer.with_format(FrameFormat::WIRE_V1);
        let mut reader = reader.with_format(FrameFormat::WIRE_V1);
        let outcome =
            drive_session_with_wake(&mut adapter, &conn, &mut writer, &mut reader, &clock, &wake)
                .await;
        if !adapter.done {
            // This bench does not reconnect: say why the device stopped, and close its signals
            // so a waiter fails now rather than at its timeout.
            eprintln!(
                "# device {} ended before it synced: {}; driver: {outcome:?}",
                adapter.session.config().device,
                adapter.closed.as_deref().unwrap_or("session still open")
            );
            adapter.signals = mpsc::unbounded_channel().0;
        }
        adapter
    });
    Running {
        signals: rx,
        local_ops,
        busy_ns,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1 and 2: initial sync and edit-to-visible, hub in this process.
// ---------------------------------------------------------------------------------------------

/// Total rows whose data set gives technician 0 (of 2) about `target` rows in their set,
/// found with the routing index alone (no store).
fn calibrate(target: usize) -> usize {
    let schema = schema();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let (env, mut d) = environment(2);
    let probe = (target * 2).max(2_000);
    for (t, c) in counts(probe) {
        d.counts.insert(t, c);
    }
    let mut router = Router::new(&schema, &env, &profile, field_service::NOW).unwrap();
    for (t, c) in counts(probe) {
        for i in 0..c {
            router.load_row(t, id_of(t, i), Some(&row_values(&d, t, i, 0)));
        }
    }
    router.rebuild();
    let held = router.reevaluate_user(d.users[0]).max(1);
    probe * target / held
}

struct LatencyFigures {
    rows: usize,
    sync: Duration,
    base: Duration,
    bytes: u64,
    edits: Vec<Duration>,
    rtts: Vec<Duration>,
}

async fn sync_and_latency(target_rows: usize, edits: usize) -> LatencyFigures {
    let schema = schema();
    let total = calibrate(target_rows);
    let (env, mut d) = environment(2);
    for (t, c) in counts(total) {
        d.counts.insert(t, c);
    }
    let dir = tempfile::tempdir().unwrap();
    let hub_store = Store::create(
        &dir.path().join("hub"),
        schema.clone(),
        StoreOptions::default(),
    )
    .unwrap();
    let t = Instant::now();
    let written = load_rows(&hub_store, &d, total);
    println!(
        "# initial sync: hub store of {written} rows written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (mut replica, verifier) = open_hub(hub_store, &env);
    let now = unix_ms();
    // A work order the crew (both technicians) owns: the row both devices edit and watch.
    let shared = Uuid::from_u128(0x5ea7ed);
    replica
        .local_write(
            "msdyn_workorder",
            shared,
            &[
                ("msdyn_name", Value::Text("WO-SHARED".into())),
                ("ownerid", owner_team(d.teams[0])),
                ("statecode", Value::Choice(0)),
                ("msdyn_systemstatus", Value::Choice(690_970_000)),
            ],
        )
        .unwrap();
    let _ = owner_user;
    let mut registry = MemoryTokenRegistry::new();
    let mut tokens = Vec::new();
    for (i, u) in d.users.iter().enumerate() {
        let tok = replica
            .enroll(&u.to_string(), APP, Uuid::from_u128(0xde0 + i as u128), now)
            .unwrap();
        registry.insert_issued(tok.token().token_id);
        tokens.push(tok);
    }
    let held = replica.device_set(d.users[0], APP).len();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let schedule = SyncSchedule::for_profile(&schema, &profile);
    let (hub, _endpoint, addr, identity) = start_hub(replica, verifier, registry);
    let device_endpoint =
        DeviceEndpoint::for_hub(addr, identity.pin(), ConnectionLimits::device()).unwrap();

    // Initial sync of device A.
    let store_a = Store::create(
        &dir.path().join("a"),
        schema.clone(),
        StoreOptions::default(),
    )
    .unwrap();
    *hub.capture.lock().unwrap() = Some(Vec::new());
    let apply_ns = Arc::new(AtomicU64::new(0));
    let cursor_ns = Arc::new(AtomicU64::new(0));
    let storage_a = Timed {
        // As `fieldsync device sync` builds it: with the profile, so files and images the
        // profile selects are looked for in every row that arrives.
        inner: DeviceReplica::new(store_a.clone()).with_profile(&profile),
        apply_ns: apply_ns.clone(),
        cursor_ns: cursor_ns.clone(),
    };
    let mut a = connect(
        &device_endpoint,
        addr,
        &tokens[0],
        schedule.clone(),
        storage_a,
    )
    .await;
    let t = Instant::now();
    a.wait(Signal::Done, Duration::from_secs(3_600)).await;
    let sync = t.elapsed();
    let frames = hub.capture.lock().unwrap().take().unwrap();
    let rows = store_rows(&store_a);
    assert_eq!(rows, held, "device A holds its whole set");
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let secs = |ns: u64| ns as f64 / 1e9;
    println!(
        "# initial sync: hub busy {:.2} s (HubReplica::pull {:.2} s); device busy {:.2} s (applying batches {:.2} s, storing cursors {:.2} s)",
        secs(hub.stats.busy_ns.load(Ordering::Relaxed)),
        secs(hub.stats.pull_ns.load(Ordering::Relaxed)),
        secs(a.busy_ns.load(Ordering::Relaxed)),
        secs(apply_ns.load(Ordering::Relaxed)),
        secs(cursor_ns.load(Ordering::Relaxed))
    );
    println!(
        "# initial sync: {rows} rows (technician 1's set of {} hub rows), {:.1} MiB in {} frames, {:.2} s",
        written + 1,
        bytes as f64 / MIB,
        frames.len(),
        sync.as_secs_f64()
    );
    let base = raw_quic_into_sled(&frames, rows, dir.path()).await;

    // Device B: technician 2, live.
    let store_b = Store::create(
        &dir.path().join("b"),
        schema.clone(),
        StoreOptions::default(),
    )
    .unwrap();
    let mut b = connect(
        &device_endpoint,
        addr,
        &tokens[1],
        schedule,
        DeviceReplica::new(store_b.clone()).with_profile(&profile),
    )
    .await;
    b.wait(Signal::Done, Duration::from_secs(3_600)).await;
    assert!(store_b.get("msdyn_workorder", shared).unwrap().is_some());

    let mut times = Vec::with_capacity(edits);
    for k in 0..edits + 20 {
        let name = format!("WO-SHARED edit {k}");
        let mut tx = store_a.begin();
        tx.update(
            "msdyn_workorder",
            shared,
            &[("msdyn_name", Value::Text(name.clone()))],
        )
        .unwrap();
        tx.commit().unwrap();
        let t = Instant::now();
        a.local_ops.notify_one();
        loop {
            b.wait(Signal::Applied, Duration::from_secs(30)).await;
            let row = store_b.get("msdyn_workorder", shared).unwrap().unwrap();
            if row.values.get("msdyn_name") == Some(&Value::Text(name.clone())) {
                break;
            }
        }
        // The first edits warm up (caches, congestion window).
        if k >= 20 {
            times.push(t.elapsed());
        }
    }
    times.sort_unstable();
    let pair = loopback_pair(ConnectionLimits::hub()).await.unwrap();
    round_trip_latencies(&pair, 500, 100).await.unwrap();
    let rtts = round_trip_latencies(&pair, 5_000, 100).await.unwrap();
    a.task.abort();
    b.task.abort();
    LatencyFigures {
        rows,
        sync,
        base,
        bytes,
        edits: times,
        rtts,
    }
}

fn store_rows(store: &Store) -> usize {
    store
        .schema()
        .tables()
        .map(|t| store.scan(&t.name).map(|s| s.count()).unwrap_or(0))
        .sum()
}

/// The initial sync's baseline: `frames` (their bytes, back to back) over one raw QUIC stream,
/// the receiver writing them into sled as `rows` records with a durable flush per frame.
async fn raw_quic_into_sled(frames: &[Vec<u8>], rows: usize, dir: &Path) -> Duration {
    let total: usize = frames.iter().map(Vec::len).sum();
    let record = (total / rows.max(1)).max(1);
    let frame_lens: Vec<usize> = frames.iter().map(Vec::len).collect();
    let payload: Vec<u8> = frames.concat();
    let db = sled::open(dir.join("baseline-sled")).unwrap();
    let pair = loopback_pair(ConnectionLimits::hub()).await.unwrap();
    let started = Instant::now();
    let send = async {
        let mut s = pair.hub_conn.open_uni().await.unwrap();
        for chunk in payload.chunks(64 << 10) {
            s.write_all(chunk).await.unwrap();
        }
        s.finish().unwrap();
        let _ = s.stopped().await;
    };
    let receive = async {
        let mut s = pair.device_conn.accept_uni().await.unwrap();
        let mut buf: Vec<u8> = Vec::new();
        let mut next_frame = 0;
        let mut key = 0u64;
        while let Some(c) = s.read_chunk(usize::MAX, true).await.unwrap() {
            buf.extend_from_slice(&c.bytes);
            while next_frame < frame_lens.len() && buf.len() >= frame_lens[next_frame] {
                let frame: Vec<u8> = buf.drain(..frame_lens[next_frame]).collect();
                let mut batch = sled::Batch::default();
                for rec in frame.chunks(record) {
                    batch.insert(&key.to_be_bytes(), rec);
                    key += 1;
                }
                db.apply_batch(batch).unwrap();
                db.flush().unwrap();
                next_frame += 1;
            }
        }
        assert_eq!(next_frame, frame_lens.len());
    };
    tokio::join!(send, receive);
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Part 3 and 4: a hub in its own process, 1,000 devices, 1,000,000 rows.
// ---------------------------------------------------------------------------------------------

/// A device that keeps its own ops, acks and cursors in memory and counts what it pulls.
struct LightDevice {
    ops: Vec<PushOp>,
    acked: u64,
    cursors: HashMap<String, (Cursor, Option<Millis>)>,
    pulled: u64,
}

impl DeviceStorage for LightDevice {
    fn acked_seq(&self) -> Result<u64, StorageError> {
        Ok(self.acked)
    }
    fn last_local_seq(&self) -> Result<u64, StorageError> {
        Ok(self.ops.last().map_or(0, |o| o.seq))
    }
    fn pending_ops(&self, after: u64, limits: BatchLimits) -> Result<Vec<PushOp>, StorageError> {
        Ok(self
            .ops
            .iter()
            .filter(|o| o.seq > after)
            .take(limits.max_items.max(1))
            .cloned()
            .collect())
    }
    fn record_ack(&mut self, _: Millis, up_to: u64, _: &[Rejection]) -> Result<(), StorageError> {
        self.acked = self.acked.max(up_to);
        Ok(())
    }
    fn apply_ops(&mut self, _: &str, ops: &[RowChange]) -> Result<(), StorageError> {
        self.pulled += ops.len() as u64;
        Ok(())
    }
    fn import_rows(&mut self, _: &str, rows: &[RowDoc]) -> Result<(), StorageError> {
        self.pulled += rows.len() as u64;
        Ok(())
    }
    fn evict_rows(&mut self, _: &str, rows: &[RowId]) -> Result<(), StorageError> {
        self.pulled += rows.len() as u64;
        Ok(())
    }
    fn cursor(&self, table: &str) -> Result<Cursor, StorageError> {
        Ok(self.cursors.get(table).map(|c| c.0).unwrap_or_default())
    }
    fn set_cursor(
        &mut self,
        table: &str,
        cursor: Cursor,
        synced_at: Option<Millis>,
    ) -> Result<(), StorageError> {
        let e = self.cursors.entry(table.to_string()).or_default();
        e.0 = cursor;
        if synced_at.is_some() {
            e.1 = synced_at;
        }
        Ok(())
    }
    fn restart_cursor(&mut self, table: &str, cursor: Cursor) -> Result<(), StorageError> {
        self.cursors.entry(table.to_string()).or_default().0 = cursor;
        Ok(())
    }
    fn last_sync(&self, table: &str) -> Result<Option<Millis>, StorageError> {
        Ok(self.cursors.get(table).and_then(|c| c.1))
    }
    fn blob_progress(&self, _: &[u8; 32]) -> Result<u64, StorageError> {
        Ok(0)
    }
    fn write_blob_chunk(
        &mut self,
        _: &[u8; 32],
        _: u64,
        _: &[u8],
        _: u64,
    ) -> Result<(), StorageError> {
        Ok(())
    }
    // The light device attaches and fetches no files.
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

/// The device's 5 ops, made by a scratch store with the device's own automerge actor: a new
/// work order owned by `user`, then 4 edits to it.
fn light_device(schema: &Schema, device: Uuid, user: Uuid) -> LightDevice {
    let options = StoreOptions {
        actor: Some(ActorId(*device.as_bytes())),
        fsync: false,
        ..StoreOptions::default()
    };
    let scratch = Store::temporary(schema.clone(), options).unwrap();
    let mut tx = scratch.begin();
    let id = tx
        .insert(
            "msdyn_workorder",
            &[
                ("msdyn_name", Value::Text(format!("WO-{device}"))),
                ("ownerid", owner_user(user)),
                ("statecode", Value::Choice(0)),
                ("msdyn_systemstatus", Value::Choice(690_970_000)),
            ],
        )
        .unwrap();
    tx.commit().unwrap();
    for k in 1..OPS_PER_LIGHT_DEVICE {
        let mut tx = scratch.begin();
        tx.update(
            "msdyn_workorder",
            id,
            &[(
                "msdyn_systemstatus",
                Value::Choice(690_970_000 + (k as i32 % 4)),
            )],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let ops = scratch
        .ops_since(0, OPS_PER_LIGHT_DEVICE)
        .unwrap()
        .into_iter()
        .map(|e| PushOp {
            seq: e.seq,
            table: e.table,
            row: e.row,
            change: e.change,
        })
        .collect();
    LightDevice {
        ops,
        acked: 0,
        cursors: HashMap::new(),
        pulled: 0,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = e.metadata().unwrap();
        n += if meta.is_dir() {
            dir_bytes(&e.path())
        } else {
            meta.len()
        };
    }
    n
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `--child hub DIR ROWS USERS DEVICES`: writes the rows, opens the replica, enrolls one
/// device for each of the first DEVICES users (tokens to DIR/tokens), serves, and answers
/// `rss` / `stats` lines on stdin.
fn child_hub(dir: &Path, rows: usize, users: usize, devices: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let schema = schema();
    let (env, mut d) = environment(users);
    for (t, c) in counts(rows) {
        d.counts.insert(t, c);
    }
    let store_dir = dir.join("hub");
    let store = Store::create(&store_dir, schema, StoreOptions::default()).unwrap();
    let t = Instant::now();
    let written = load_rows(&store, &d, rows);
    store.sync().unwrap();
    let load = t.elapsed();
    let disk = dir_bytes(&store_dir);
    let t = Instant::now();
    let (mut replica, verifier) = open_hub(store, &env);
    let open = t.elapsed();
    let mut registry = MemoryTokenRegistry::new();
    let mut lines = String::new();
    for (i, u) in d.users.iter().enumerate().take(devices) {
        let device = Uuid::from_u128(0xd_0000 + i as u128);
        let tok = replica
            .enroll(&u.to_string(), APP, device, unix_ms())
            .unwrap();
        registry.insert_issued(tok.token().token_id);
        lines.push_str(&format!("{u} {}\n", hex(tok.as_bytes())));
    }
    std::fs::write(dir.join("tokens"), lines).unwrap();
    rt.block_on(async {
        let (hub, _endpoint, addr, identity) = start_hub(replica, verifier, registry);
        println!(
            "READY {addr} {} {written} {disk} {:.1} {:.1}",
            hex(identity.pin().as_bytes()),
            load.as_secs_f64(),
            open.as_secs_f64()
        );
        std::io::stdout().flush().unwrap();
        let stats = hub.clone();
        let stdin = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for line in std::io::stdin().lock().lines() {
                let line = line.unwrap_or_default();
                let quit = line.trim() == "quit";
                out.push(line);
                if quit {
                    break;
                }
                // Answer each command as it comes: print from this thread.
                match out.last().map(String::as_str) {
                    Some("rss") => {
                        // Let freed memory settle before reading.
                        std::thread::sleep(Duration::from_millis(500));
                        println!("RSS {} {}", status_kib("VmRSS:"), status_kib("VmHWM:"));
                    }
                    Some("stats") => {
                        let s = &stats.stats;
                        println!(
                            "STATS {} {} {} {} {} {}",
                            s.ops_in.load(Ordering::Relaxed),
                            s.items_out.load(Ordering::Relaxed),
                            s.rejected.load(Ordering::Relaxed),
                            s.busy_ns.load(Ordering::Relaxed),
                            s.pulls.load(Ordering::Relaxed),
                            s.pull_ns.load(Ordering::Relaxed)
                        );
                    }
                    _ => println!("?"),
                }
                std::io::stdout().flush().unwrap();
            }
        });
        let _ = stdin.await;
        let s = &hub.stats;
        eprintln!(
            "# hub child: {} ops in, {} items out, {} rejected; busy {:.1} s, {} pulls in {:.1} s",
            s.ops_in.load(Ordering::Relaxed),
            s.items_out.load(Ordering::Relaxed),
            s.rejected.load(Ordering::Relaxed),
            s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
            s.pulls.load(Ordering::Relaxed),
            s.pull_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
    });
}

struct HubChild {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HubChild {
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).unwrap();
        s
    }

    /// (VmRSS, VmHWM) of the hub in bytes.
    fn rss(&mut self) -> (u64, u64) {
        writeln!(self.stdin, "rss").unwrap();
        self.stdin.flush().unwrap();
        let l = self.line();
        let mut it = l
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse::<u64>().unwrap() * 1024);
        (it.next().unwrap(), it.next().unwrap())
    }

    /// (ops pushed and accepted, items pulled, ops rejected, ns busy, pulls, ns in pulls) so far.
    fn stats(&mut self) -> (u64, u64, u64, u64, u64, u64) {
        writeln!(self.stdin, "stats").unwrap();
        self.stdin.flush().unwrap();
        let l = self.line();
        let v: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        (v[0], v[1], v[2], v[3], v[4], v[5])
    }
}

struct MemoryFigures {
    devices: usize,
    disk: u64,
    idle: u64,
    one: u64,
    all: u64,
    peak: u64,
    ops: u64,
    elapsed: Duration,
}

/// A hub process with `rows` rows and `users` technicians; devices of the first `devices`
/// connect (the first alone, then the others in waves).
async fn hub_memory(rows: usize, users: usize, devices: usize) -> MemoryFigures {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--child", "hub"])
        .arg(dir.path())
        .args([rows.to_string(), users.to_string(), devices.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut hub = HubChild {
        child,
        stdin,
        stdout,
    };
    let ready = hub.line();
    let f: Vec<&str> = ready.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"READY"), "hub child: {ready}");
    let addr: SocketAddr = f[1].parse().unwrap();
    let pin =
        fieldsync_replication::credential::CertPin::from_bytes(unhex(f[2]).try_into().unwrap());
    let written: usize = f[3].parse().unwrap();
    let disk: u64 = f[4].parse().unwrap();
    println!(
        "# hub process: {written} rows written in {} s, replica opened in {} s, {:.1} MiB on disk",
        f[5],
        f[6],
        disk as f64 / MIB
    );
    let tokens: Vec<(Uuid, SignedToken)> = std::fs::read_to_string(dir.path().join("tokens"))
        .unwrap()
        .lines()
        .map(|l| {
            let (u, t) = l.split_once(' ').unwrap();
            (
                u.parse().unwrap(),
                SignedToken::from_bytes(unhex(t)).unwrap(),
            )
        })
        .collect();
    let schema = schema();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let schedule = SyncSchedule::for_profile(&schema, &profile);
    let t = Instant::now();
    let mut storages: Vec<LightDevice> = tokens
        .iter()
        .map(|(u, tok)| light_device(&schema, tok.token().device_id, *u))
        .collect();
    println!(
        "# {} light devices' ops made in {:.1} s",
        storages.len(),
        t.elapsed().as_secs_f64()
    );
    let (idle, _) = hub.rss();
    let endpoint =
        Arc::new(DeviceEndpoint::for_hub(addr, pin, ConnectionLimits::device()).unwrap());
    let mut running = Vec::with_capacity(devices);
    let first = storages.remove(0);
    let t = Instant::now();
    let mut d0 = connect(&endpoint, addr, &tokens[0].1, schedule.clone(), first).await;
    d0.wait(Signal::Done, Duration::from_secs(600)).await;
    let first_sync = t.elapsed();
    running.push(d0);
    let (one, _) = hub.rss();
    let before = hub.stats();
    println!(
        "# first device synced alone in {:.2} s: {} items, hub busy {:.2} s, {} pulls in {:.2} s",
        first_sync.as_secs_f64(),
        before.1,
        before.3 as f64 / 1e9,
        before.4,
        before.5 as f64 / 1e9
    );
    let started = Instant::now();
    // Connect in waves well under the hub's pending-handshake cap.
    let mut rest = tokens.iter().skip(1).zip(storages);
    loop {
        let wave: Vec<_> = rest.by_ref().take(64).collect();
        if wave.is_empty() {
            break;
        }
        let mut joins = Vec::new();
        for ((_, tok), storage) in wave {
            let endpoint = endpoint.clone();
            let tok = tok.clone();
            let schedule = schedule.clone();
            joins.push(tokio::spawn(async move {
                let mut d = connect(&endpoint, addr, &tok, schedule, storage).await;
                d.wait(Signal::Done, Duration::from_secs(1_800)).await;
                d
            }));
        }
        for j in joins {
            running.push(j.await.unwrap());
        }
        eprintln!(
            "# {} devices synced after {:.1} s",
            running.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let elapsed = started.elapsed();
    let after = hub.stats();
    let (all, peak) = hub.rss();
    assert_eq!(after.2, 0, "the hub rejected pushed ops");
    let ops = (after.0 - before.0) + (after.1 - before.1);
    for d in running {
        d.task.abort();
    }
    writeln!(hub.stdin, "quit").unwrap();
    drop(hub.stdin);
    let status = hub.child.wait().unwrap();
    assert!(status.success());
    MemoryFigures {
        devices,
        disk,
        idle,
        one,
        all,
        peak,
        ops,
        elapsed,
    }
}

/// Logs to stderr as `RUST_LOG` asks (nothing when unset), tagged with the process's role.
fn init_logging(role: &'static str) {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(move || {
            let mut err = std::io::stderr();
            let _ = write!(err, "[{role}] ");
            err
        })
        .try_init();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    init_logging(if args.iter().any(|a| a == "--child") {
        "hub"
    } else {
        "devices"
    });
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        let dir = Path::new(&args[pos + 2]);
        child_hub(
            dir,
            args[pos + 3].parse().unwrap(),
            args[pos + 4].parse().unwrap(),
            args[pos + 5].parse().unwrap(),
        );
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let rows = env_usize("FIELDSYNC_BENCH_ROWS", 100_000);
    let edits = env_usize("FIELDSYNC_BENCH_EDITS", 1_000);
    let hub_rows = env_usize("FIELDSYNC_BENCH_HUB_ROWS", 1_000_000);
    let devices = env_usize("FIELDSYNC_BENCH_DEVICES", 1_000);
    let device_hub_rows = env_usize("FIELDSYNC_BENCH_DEVICE_HUB_ROWS", 100_000);
    println!(
        "# sync bench: initial sync of ~{rows} rows; {edits} edits; {devices} devices on a hub of {device_hub_rows} rows; a hub of {hub_rows} rows"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mib = |b: u64| b as f64 / MIB;
    // A count of 0 skips that part (e.g. to re-measure only the 1,000,000-row hub).
    if rows > 0 {
        let l = rt.block_on(sync_and_latency(rows, edits));
        let us_row = |d: Duration| d.as_secs_f64() * 1e6 / l.rows as f64;
        println!(
            "# initial sync base: {:.1} MiB raw over QUIC into sled in {:.2} s",
            l.bytes as f64 / MIB,
            l.base.as_secs_f64()
        );
        println!(
            "BENCH name=initial_sync ours={:.2} base={:.2} unit=us_per_row ratio={:.2}",
            us_row(l.sync),
            us_row(l.base),
            l.sync.as_secs_f64() / l.base.as_secs_f64()
        );
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "# edit_visible over {} edits: p90 {:.2} ms, p95 {:.2} ms, max {:.1} ms, {} over 20 ms",
            l.edits.len(),
            ms(percentile(&l.edits, 0.90)),
            ms(percentile(&l.edits, 0.95)),
            ms(l.edits.last().copied().unwrap_or_default()),
            l.edits
                .iter()
                .filter(|d| **d > Duration::from_millis(20))
                .count()
        );
        for (name, p) in [("edit_visible_p50", 0.50), ("edit_visible_p99", 0.99)] {
            let ours = ms(percentile(&l.edits, p));
            let base = ms(percentile(&l.rtts, p));
            println!(
                "BENCH name={name} ours={ours:.3} base={base:.3} unit=ms ratio={:.2}",
                ours / base
            );
        }
    }
    if devices > 0 {
        let m = rt.block_on(hub_memory(device_hub_rows, devices, devices));
        let per_device = (m.all.saturating_sub(m.idle)) as f64 / MIB / m.devices as f64;
        let one = m.one.saturating_sub(m.idle) as f64 / MIB;
        println!(
            "# hub RSS: idle {:.1} MiB, one device {:.1} MiB, {} devices {:.1} MiB, peak {:.1} MiB",
            mib(m.idle),
            mib(m.one),
            m.devices,
            mib(m.all),
            mib(m.peak)
        );
        println!(
            "# hub_ops_per_second={:.0} ({} devices each pushing {OPS_PER_LIGHT_DEVICE} ops and pulling its set, {:.1} s)",
            m.ops as f64 / m.elapsed.as_secs_f64(),
            m.devices,
            m.elapsed.as_secs_f64()
        );
        println!(
            "BENCH name=hub_memory_per_device ours={per_device:.3} base={one:.3} unit=MiB ratio={:.2}",
            per_device / one.max(1e-9)
        );
    }
    if hub_rows == 0 {
        return;
    }
    let big = rt.block_on(hub_memory(hub_rows, 1_000, 1));
    println!(
        "# hub of {hub_rows} rows: RSS idle {:.1} MiB, serving one device's sync {:.1} MiB, peak {:.1} MiB",
        mib(big.idle),
        mib(big.one),
        mib(big.peak)
    );
    println!(
        "BENCH name=hub_rss_1m_rows ours={:.1} base={:.1} unit=MiB ratio={:.2}",
        mib(big.one),
        mib(big.disk),
        big.one as f64 / big.disk as f64
    );
}
