//! The hub: a [`HubSession`] per connection as a [`FrameSession`] woken by the
//! [`ChangeBus`], metrics, the bootstrap responder and the accept loop.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use fieldsync_replication::credential::{TokenRegistry, TokenStatus, TokenVerifier};
use fieldsync_replication::proto::{CloseCode, HubConfig, HubEvent, HubSession, Millis};
use fieldsync_replication::replica::{HubReplica, StoreTokenRegistry};
pub use fieldsync_replication::transport::ChangeBus;
use fieldsync_replication::transport::{
    accept_device, codes, drive_session_with_options, CloseReason, ConnectionLimits, DriveOptions,
    FrameFormat, FrameReader, FrameSession, FrameWriter, HubEndpoint, HubIdentity, SessionClock,
};
use fieldsync_replication::wire;
use fieldsync_store::Store;
use tracing::{info, info_span, warn, Instrument};
use uuid::Uuid;

use super::{Bootstrap, BOOTSTRAP_REQUEST};

/// The hub's replica, shared by every session.
pub type SharedReplica = Arc<Mutex<HubReplica>>;

fn lock(r: &SharedReplica) -> MutexGuard<'_, HubReplica> {
    // A panic in another session must not take the hub down with it: the replica's state is
    // durable per call, so the data behind a poisoned lock is still consistent.
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on the locked replica, off the runtime's workers ([`fieldsync_node::off_worker`]).
/// Sessions call it only while holding the hub's storage turn (`HubRuntime::storage_turn`),
/// so at most one of them at a time waits here, on one thread, not one thread per session.
pub fn with_replica<R>(r: &SharedReplica, f: impl FnOnce(&mut HubReplica) -> R) -> R {
    fieldsync_node::off_worker(|| f(&mut lock(r)))
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sessions authenticated and not yet ended.
    pub connected: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Pushed ops accepted.
    pub ops_in: AtomicU64,
    /// Items (ops, rows entering, rows leaving) sent in pull batches.
    pub ops_out: AtomicU64,
    /// Pushed ops rejected.
    pub rejections: AtomicU64,
    /// Sessions refused (token, version).
    pub refused_sessions: AtomicU64,
    /// Frames that could not be decoded.
    pub bad_frames: AtomicU64,
    /// Files and images devices finished uploading.
    pub files_in: AtomicU64,
}

/// A [`HubSession`] over the shared replica, as the transport driver sees it.
#[derive(Debug)]
pub struct HubAdapter {
    session: HubSession,
    replica: SharedReplica,
    bus: Arc<ChangeBus>,
    metrics: Arc<Metrics>,
    id: u64,
    out: VecDeque<Vec<u8>>,
    authenticated: bool,
    /// The code this side closed the session with, if it did.
    closed_with: Option<CloseCode>,
}

impl HubAdapter {
    /// A session for a connection accepted at `now_ms`.
    pub fn new(
        config: HubConfig,
        now_ms: u64,
        replica: SharedReplica,
        bus: Arc<ChangeBus>,
        metrics: Arc<Metrics>,
        id: u64,
    ) -> HubAdapter {
        HubAdapter {
            session: HubSession::new(config, Millis(now_ms)),
            replica,
            bus,
            metrics,
            id,
            out: VecDeque::new(),
            authenticated: false,
            closed_with: None,
        }
    }

    /// Sends what the session has to send, then looks at its events.
    fn settle(&mut self, now: Millis) {
        while let Some(msg) = self.session.poll_transmit(now) {
            match wire::encode(&msg) {
                Ok(frame) => self.out.push_back(frame),
                Err(e) => warn!(error = %e, msg = msg.name(), "cannot encode a message"),
            }
        }
        while let Some(ev) = self.session.poll_event() {
            match ev {
                HubEvent::Authenticated { principal } => {
                    info!(device = %principal.device, user = %principal.user, app = %principal.app, "device connected");
                    self.authenticated = true;
                    self.bus.set_user(self.id, principal.user);
                    self.metrics.connected.fetch_add(1, Ordering::Relaxed);
                }
                HubEvent::Refused { code } => {
                    info!(%code, "session refused");
                    self.metrics
                        .refused_sessions
                        .fetch_add(1, Ordering::Relaxed);
                }
                HubEvent::OpsApplied {
                    accepted, rejected, ..
                } => {
                    self.metrics
                        .ops_in
                        .fetch_add(accepted as u64, Ordering::Relaxed);
                    self.metrics
                        .rejections
                        .fetch_add(rejected as u64, Ordering::Relaxed);
                    let changes = with_replica(&self.replica, HubReplica::take_changes);
                    self.bus.publish(&changes);
                }
                HubEvent::BlobStored { .. } => {
                    self.metrics.files_in.fetch_add(1, Ordering::Relaxed);
                    // The upstream bridge may now send the file on to Dataverse.
                    let changes = with_replica(&self.replica, HubReplica::take_changes);
                    self.bus.publish(&changes);
                }
                HubEvent::BatchSent { items, .. } => {
                    self.metrics
                        .ops_out
                        .fetch_add(items as u64, Ordering::Relaxed);
                }
                HubEvent::Closed {
                    code,
                    reason,
                    by_peer,
                } => {
                    info!(%code, %reason, by_peer, "session closed");
                    if !by_peer {
                        self.closed_with = Some(code);
                    }
                }
                HubEvent::StorageFailed { error } => warn!(%error, "hub storage failed"),
                other => tracing::debug!(?other, "hub event"),
            }
        }
    }
}

impl Drop for HubAdapter {
    fn drop(&mut self) {
        if self.authenticated {
            self.metrics.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.bus.unregister(self.id);
    }
}

impl FrameSession for HubAdapter {
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
        let now = Millis(now_ms);
        match wire::decode(bytes) {
            Ok((msg, _)) => {
                let (replica, session) = (self.replica.clone(), &mut self.session);
                with_replica(&replica, |r| session.handle_message(now, msg, r));
            }
            Err(e) => {
                self.metrics.bad_frames.fetch_add(1, Ordering::Relaxed);
                self.session.handle_wire_error(now, &e);
            }
        }
        self.settle(now);
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

    fn close_code(&self) -> u32 {
        match self.closed_with {
            Some(code) if code != CloseCode::NORMAL => codes::SESSION_BASE + u32::from(code.0),
            _ => codes::DONE,
        }
    }

    fn handle_wake(&mut self, now_ms: u64) {
        let now = Millis(now_ms);
        if self.bus.is_shutting_down() {
            self.session
                .close(now, CloseCode::GOING_AWAY, "the hub is shutting down");
        } else {
            let tables = self.bus.take(self.id);
            if !tables.is_empty() {
                let (replica, session) = (self.replica.clone(), &mut self.session);
                with_replica(&replica, |r| session.handle_changes(now, &tables, r));
            }
        }
        self.settle(now);
    }
}

/// Everything `hub serve` runs with.
#[derive(Debug)]
pub struct HubRuntime {
    /// The replica.
    pub replica: SharedReplica,
    /// The replica's store, for reads that need no lock (token records, the bridge's cursor).
    pub store: Store,
    /// Session config (timers, limits, conflict policies).
    pub config: HubConfig,
    /// Verifies tokens.
    pub verifier: TokenVerifier,
    /// The bundle each app's devices get at `device init`: app → bootstrap.
    pub bootstraps: HashMap<String, Bootstrap>,
    /// The change bus.
    pub bus: Arc<ChangeBus>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Transport limits.
    pub limits: ConnectionLimits,
    /// The upstream bridge's counters, once it runs.
    pub upstream: std::sync::OnceLock<Arc<fieldsync_node::upstream::BridgeStats>>,
    /// The live session of each device.
    pub sessions: LiveSessions,
    /// The sessions' turn at the replica (`DriveOptions::turn`): they queue for it
    /// asynchronously, so a burst of woken sessions does not become a thread each.
    pub storage_turn: Arc<tokio::sync::Mutex<()>>,
}

/// One live session per device: a device that connects again (a new network, a process
/// restarted after a kill) takes over from its old connection, which is closed. One
/// credential can so hold one session's streams and windows, not thousands.
#[derive(Debug, Default)]
pub struct LiveSessions {
    /// Device → its session's ticket, token id and connection.
    by_device: Mutex<HashMap<Uuid, (u64, Uuid, quinn::Connection)>>,
    next: AtomicU64,
}

impl LiveSessions {
    /// A ticket for a connection just accepted: tickets order connections by arrival.
    pub fn ticket(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Records `conn` (holding `ticket`, authenticated with token `token_id`) as `device`'s
    /// session and closes the one it replaces. A connection that arrived before the device's
    /// current one (its token check merely finished later) is the one closed; returns whether
    /// `conn` was admitted.
    pub fn admit(
        &self,
        device: Uuid,
        token_id: Uuid,
        ticket: u64,
        conn: &quinn::Connection,
    ) -> bool {
        let mut map = self.by_device.lock().unwrap_or_else(|p| p.into_inner());
        let newer_live = map
            .get(&device)
            .is_some_and(|(current, _, _)| *current > ticket);
        let (admitted, superseded) = if newer_live {
            (false, Some(conn.clone()))
        } else {
            let old = map.insert(device, (ticket, token_id, conn.clone()));
            (true, old.map(|(_, _, c)| c))
        };
        drop(map);
        if let Some(old) = superseded {
            info!(%device, "a newer connection of the device replaces an older one");
            old.close(
                quinn::VarInt::from_u32(codes::SUPERSEDED),
                b"replaced by a newer connection of this device",
            );
        }
        admitted
    }

    /// Forgets `device`'s session `ticket` (not a newer one that replaced it).
    pub fn release(&self, device: Uuid, ticket: u64) {
        let mut map = self.by_device.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&device).is_some_and(|(t, _, _)| *t == ticket) {
            map.remove(&device);
        }
    }

    /// Ends the live sessions authenticated with `token_id`, just revoked; returns how many.
    /// Their devices hear `AUTH_REVOKED`, as a new connection with the token would.
    pub fn end_revoked(&self, token_id: Uuid) -> usize {
        let map = self.by_device.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = 0;
        for (_, token, conn) in map.values() {
            if *token == token_id {
                close_revoked(conn);
                ended += 1;
            }
        }
        ended
    }
}

/// Ends a session whose token was revoked: its device hears `AUTH_REVOKED`, as a new
/// connection with the token would.
fn close_revoked(conn: &quinn::Connection) {
    conn.close(
        quinn::VarInt::from_u32(codes::AUTH_REVOKED),
        b"the token was revoked",
    );
}

/// A running hub: its endpoint and the tasks serving it.
#[derive(Debug)]
pub struct RunningHub {
    /// The QUIC endpoint.
    pub endpoint: Arc<HubEndpoint>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Shared state.
    pub runtime: Arc<HubRuntime>,
    accept: tokio::task::JoinHandle<()>,
    clock: tokio::task::JoinHandle<()>,
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

/// How often a running hub re-evaluates time-dependent row filters (`last-x-days` and the
/// like): rows cross their boundaries as time passes, with no write to route.
pub const TIME_FILTER_TICK: Duration = Duration::from_secs(300);

/// Moves the replica's time every [`TIME_FILTER_TICK`] and wakes the sessions whose sets moved.
fn start_clock(runtime: Arc<HubRuntime>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TIME_FILTER_TICK);
        // A tick that waited on a busy replica is not made up in a burst.
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The first tick is immediate: the replica was opened with the current time.
        every.tick().await;
        loop {
            every.tick().await;
            let replica = runtime.replica.clone();
            let moved = tokio::task::spawn_blocking(move || {
                let mut r = lock(&replica);
                let now = i64::try_from(super::unix_ms()).unwrap_or(i64::MAX);
                r.handle_time(now).map(|()| r.take_changes())
            })
            .await;
            match moved {
                Ok(Ok(changes)) => runtime.bus.publish(&changes),
                Ok(Err(e)) => warn!(error = %e, "re-evaluating time filters failed"),
                Err(e) => warn!(error = %e, "re-evaluating time filters stopped"),
            }
        }
    })
}

/// Binds `listen` and starts accepting devices.
pub fn start_hub(
    runtime: Arc<HubRuntime>,
    identity: &HubIdentity,
    listen: SocketAddr,
) -> Result<RunningHub> {
    let endpoint = Arc::new(
        HubEndpoint::bind(listen, identity, runtime.limits.clone())
            .with_context(|| format!("cannot listen on {listen}"))?,
    );
    let addr = endpoint
        .local_addr()
        .context("cannot read the listening address")?;
    let tasks = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    let accept = {
        let endpoint = endpoint.clone();
        let runtime = runtime.clone();
        let tasks = tasks.clone();
        tokio::spawn(async move {
            while let Some(pending) = endpoint.accept().await {
                let runtime = runtime.clone();
                let remote = pending.remote_address();
                runtime
                    .metrics
                    .connections_total
                    .fetch_add(1, Ordering::Relaxed);
                let span = info_span!("connection", %remote);
                let mut set = tasks.lock().unwrap_or_else(|p| p.into_inner());
                // Reap finished connection tasks so the set stays small.
                while set.try_join_next().is_some() {}
                set.spawn(
                    async move {
                        let conn = match pending.complete().await {
                            Ok(c) => c,
                            Err(e) => {
                                info!(error = %e, "handshake failed");
                                return;
                            }
                        };
                        serve_connection(runtime, conn).await;
                    }
                    .instrument(span),
                );
            }
        })
    };
    let clock = start_clock(runtime.clone());
    Ok(RunningHub {
        endpoint,
        addr,
        runtime,
        accept,
        clock,
        tasks,
    })
}

impl RunningHub {
    /// Drains: sessions close with "going away" after the message they are handling, then
    /// the endpoint closes and the store is flushed.
    pub async fn shut_down(self) -> Result<()> {
        info!("draining connections");
        self.accept.abort();
        self.clock.abort();
        self.runtime.bus.shut_down();
        let mut set = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("some connections did not drain in 5 s; closing them");
            set.abort_all();
        }
        self.endpoint.close(
            fieldsync_replication::transport::codes::SHUTDOWN,
            "hub shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        with_replica(&self.runtime.replica, |r| r.store().sync())
            .context("cannot flush the hub store")?;
        info!("hub stopped");
        Ok(())
    }
}

async fn serve_connection(runtime: Arc<HubRuntime>, conn: quinn::Connection) {
    let ticket = runtime.sessions.ticket();
    // The store handle, not the replica's lock: a connection that has not shown a token must
    // not wait behind (or hold up) the sessions' storage work.
    let registry = StoreTokenRegistry(runtime.store.clone());
    let limits = &runtime.limits;
    let auth = match accept_device(&conn, &runtime.verifier, &registry, limits).await {
        Ok(a) => a,
        Err(e) => {
            info!(error = %e, "device not admitted");
            runtime
                .metrics
                .refused_sessions
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let token = auth.token;
    info!(device = %token.device_id, user = %token.user_id, app = %token.app, "token accepted");
    if !runtime
        .sessions
        .admit(token.device_id, token.token_id, ticket, &conn)
    {
        return;
    }
    // A revocation between the token check and `admit` missed this session in
    // `LiveSessions::end_revoked`; it is on record by now, so this read sees it.
    if registry.status(&token.token_id) == TokenStatus::Revoked {
        runtime.sessions.release(token.device_id, ticket);
        close_revoked(&conn);
        return;
    }
    // Bootstrap streams: one JSON bundle per request, only the token's app.
    if let Some(bundle) = runtime.bootstraps.get(&token.app) {
        let conn = conn.clone();
        let bundle = bundle.clone();
        let user = token.user_id.clone();
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                let mut writer = FrameWriter::new(send, super::BOOTSTRAP_MAX_BYTES);
                let mut reader = FrameReader::new(recv, 64);
                match reader.read_frame().await {
                    Ok(Some(req)) if req == BOOTSTRAP_REQUEST => {
                        let mut b = bundle.clone();
                        b.user = user.clone();
                        let Ok(json) = serde_json::to_vec(&b) else {
                            return;
                        };
                        let _ = writer.write_frame(&json).await;
                        let _ = writer.finish();
                        let _ = writer.stream_mut().stopped().await;
                    }
                    _ => return,
                }
            }
        });
    }
    let mut writer = auth.writer.with_format(FrameFormat::WIRE_V1);
    let mut reader = auth.reader.with_format(FrameFormat::WIRE_V1);
    let clock = SessionClock::new(super::unix_ms());
    let (id, wake) = runtime.bus.register();
    let mut adapter = HubAdapter::new(
        runtime.config.clone(),
        clock.now_ms(),
        runtime.replica.clone(),
        runtime.bus.clone(),
        runtime.metrics.clone(),
        id,
    );
    if runtime.bus.is_shutting_down() {
        adapter.handle_wake(clock.now_ms());
    }
    let options = DriveOptions {
        turn: Some(runtime.storage_turn.clone()),
        ..DriveOptions::default()
    };
    match drive_session_with_options(
        &mut adapter,
        &conn,
        &mut writer,
        &mut reader,
        &clock,
        &wake,
        &options,
    )
    .await
    {
        Ok(outcome) => info!(?outcome, "connection ended"),
        Err(e) => info!(error = %e, "connection ended"),
    }
    runtime.sessions.release(token.device_id, ticket);
    // However the session ended (the peer finished or broke its stream too), the connection
    // goes with it: the bootstrap responder's handle and keep-alives would hold it open,
    // sessionless, against `max_connections`.
    conn.close(quinn::VarInt::from_u32(codes::DONE), b"session ended");
}

/// The Prometheus text of the hub's metrics.
pub fn render_metrics(endpoint: &HubEndpoint, runtime: &HubRuntime) -> String {
    use std::fmt::Write;
    let m = &runtime.metrics;
    let mut s = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    counter(
        "fieldsync_hub_connected_devices",
        "Devices with an authenticated session.",
        "gauge",
        m.connected.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_connections_total",
        "QUIC connections accepted.",
        "counter",
        m.connections_total.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_ops_in_total",
        "Pushed ops accepted and applied (rate() gives ops in per second).",
        "counter",
        m.ops_in.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_ops_out_total",
        "Ops and rows sent in pull batches (rate() gives ops out per second).",
        "counter",
        m.ops_out.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_rejections_total",
        "Pushed ops rejected (permission, validation, conflict, not found).",
        "counter",
        m.rejections.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_refused_sessions_total",
        "Sessions refused (bad, unknown or revoked tokens).",
        "counter",
        m.refused_sessions.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_files_uploaded_total",
        "Files and images devices finished uploading (hash checked, stored).",
        "counter",
        m.files_in.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_bad_frames_total",
        "Frames that failed to decode.",
        "counter",
        m.bad_frames.load(Ordering::Relaxed),
    );
    counter(
        "fieldsync_hub_refused_connections_total",
        "Connection attempts refused at the endpoint's limits.",
        "counter",
        endpoint.refused_connections(),
    );
    counter(
        "fieldsync_hub_pending_handshakes",
        "Handshakes in progress (queue depth).",
        "gauge",
        endpoint.pending_handshakes() as u64,
    );
    counter(
        "fieldsync_hub_wake_queue_depth",
        "Changed tables waiting to be fanned out to live sessions.",
        "gauge",
        runtime.bus.queue_depth() as u64,
    );
    counter(
        "fieldsync_hub_sessions",
        "Sessions being driven.",
        "gauge",
        runtime.bus.session_count() as u64,
    );
    if let Some(up) = runtime.upstream.get() {
        for (name, help, v) in [
            (
                "rows_pulled_total",
                "Rows changed in Dataverse and merged into the hub.",
                &up.rows_pulled,
            ),
            (
                "rows_deleted_total",
                "Rows deleted in Dataverse and tombstoned on the hub.",
                &up.rows_deleted,
            ),
            (
                "rows_pushed_total",
                "Rows written to Dataverse.",
                &up.rows_pushed,
            ),
            (
                "conflicts_total",
                "412s resolved by re-reading and merging.",
                &up.conflicts,
            ),
            (
                "refused_total",
                "Writes Dataverse refused for good (logged, skipped).",
                &up.refused,
            ),
            (
                "rows_skipped_total",
                "Rows from Dataverse with values the hub's schema refuses (left as they were).",
                &up.rows_skipped,
            ),
            (
                "downloads_failed_total",
                "File downloads from Dataverse that failed (their rows applied; retried with back-off).",
                &up.downloads_failed,
            ),
            (
                "uploads_held_total",
                "Files from the hub not sent because Dataverse's newer file had not come down yet (Dataverse's wins).",
                &up.uploads_held,
            ),
            (
                "intents_unsettled_total",
                "Times a row was held back from a push (its read failed, or its table could not be pulled); it is written later, never dropped.",
                &up.intents_unsettled,
            ),
            (
                "replies_lost_total",
                "Writes to Dataverse whose reply was lost (resolved by the row's next read).",
                &up.replies_lost,
            ),
            (
                "full_reads_total",
                "Full re-reads after an expired change-tracking token.",
                &up.full_reads,
            ),
            (
                "failed_rounds_total",
                "Bridge rounds that failed (Dataverse down, throttled).",
                &up.failed_rounds,
            ),
        ] {
            counter(
                &format!("fieldsync_upstream_{name}"),
                help,
                "counter",
                v.load(Ordering::Relaxed),
            );
        }
        let store = &runtime.store;
        let behind = fieldsync_node::upstream::state::cursor(store)
            .map(|c| store.last_seq().saturating_sub(c))
            .unwrap_or_default();
        counter(
            "fieldsync_upstream_queue_entries",
            "Hub log entries not yet acknowledged by Dataverse (the outbound queue).",
            "gauge",
            behind,
        );
        counter(
            "fieldsync_upstream_pending_download_rows",
            "Rows whose files from Dataverse did not come down yet (retried with back-off).",
            "gauge",
            up.pending_download_rows.load(Ordering::Relaxed),
        );
    }
    let (lags, unknown) = with_replica(&runtime.replica, |r| {
        (r.device_lags(), r.cursors_not_in_log())
    });
    let _ = writeln!(
        s,
        "# HELP fieldsync_hub_cursors_not_in_log Devices' tables that pulled with a cursor the hub's log does not hold: past its end, or another entry where it points (a restored hub, or forged cursors; docs/operations.md).\n# TYPE fieldsync_hub_cursors_not_in_log gauge\nfieldsync_hub_cursors_not_in_log {unknown}"
    );
    let _ = writeln!(
        s,
        "# HELP fieldsync_hub_device_lag_entries Hub log entries after the cursor a device last pulled from.\n# TYPE fieldsync_hub_device_lag_entries gauge"
    );
    for l in lags {
        let _ = writeln!(
            s,
            "fieldsync_hub_device_lag_entries{{device=\"{}\",table=\"{}\"}} {}",
            l.device, l.table, l.behind
        );
    }
    s
}

/// Connections the metrics port serves at once; more are dropped at accept.
const METRICS_CONNECTIONS: usize = 64;
/// The whole of one metrics request, from accept to the last byte written.
const METRICS_REQUEST_TIME: Duration = Duration::from_secs(5);

/// Serves `/healthz` and `/metrics` on `addr` (plain HTTP/1.1, one request per connection).
/// A request gets [`METRICS_REQUEST_TIME`] in all, and at most [`METRICS_CONNECTIONS`] are
/// served at once, so a slow or idle client cannot hold the port's tasks and descriptors.
pub async fn serve_metrics(listener: tokio::net::TcpListener, hub: Arc<RunningHubView>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin on the error.
                warn!(error = %e, "metrics port cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropping the socket closes it
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(METRICS_REQUEST_TIME, answer_metrics(&mut sock, &hub)).await;
            drop(slot);
        });
    }
}

/// Reads one request head (bounded) and answers it.
async fn answer_metrics(sock: &mut tokio::net::TcpStream, hub: &RunningHubView) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                n += k;
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match path {
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", (hub.render)()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// What the metrics server reads from.
pub struct RunningHubView {
    /// Renders the metrics text.
    pub render: Box<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for RunningHubView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunningHubView")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldsync_replication::transport::baseline::loopback_pair;

    #[tokio::test]
    async fn the_newest_connection_of_a_device_keeps_its_session() {
        let sessions = LiveSessions::default();
        let device = Uuid::from_u128(7);
        let token = Uuid::from_u128(8);
        let mut pairs = Vec::new();
        for _ in 0..3 {
            pairs.push(loopback_pair(ConnectionLimits::hub()).await.unwrap());
        }
        let (first, second, third) = (sessions.ticket(), sessions.ticket(), sessions.ticket());
        // The second connection's token check finishes first.
        assert!(sessions.admit(device, token, second, &pairs[1].hub_conn));
        // The first one's finishes later: it is the one closed, not the newer session.
        assert!(!sessions.admit(device, token, first, &pairs[0].hub_conn));
        assert!(pairs[0].hub_conn.close_reason().is_some());
        assert!(pairs[1].hub_conn.close_reason().is_none());
        // A newer connection replaces the session.
        assert!(sessions.admit(device, token, third, &pairs[2].hub_conn));
        assert!(pairs[1].hub_conn.close_reason().is_some());
        assert!(pairs[2].hub_conn.close_reason().is_none());
        // A stale release leaves the newer session in place.
        sessions.release(device, second);
        assert!(sessions
            .by_device
            .lock()
            .unwrap()
            .get(&device)
            .is_some_and(|(t, _, _)| *t == third));
        // Revoking another token ends nothing; revoking the session's ends it.
        assert_eq!(sessions.end_revoked(Uuid::from_u128(9)), 0);
        assert!(pairs[2].hub_conn.close_reason().is_none());
        assert_eq!(sessions.end_revoked(token), 1);
        assert!(pairs[2].hub_conn.close_reason().is_some());
    }
}
