//! The device side of a sync session.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tracing::{debug, info, warn};
use uuid::Uuid;

use super::messages::{
    BlobPut, BlobPutAck, BlobPutStatus, BlobRequest, Close, CloseCode, DeviceId, Hello, Message,
    Ping, Pong, Pull, PullAck, PullBatch, Push, PushAck, Rejection, Subscribe, TableCursor,
    BLOB_CHUNK_MAX, MAX_CHANGE_LEN, MAX_TABLES_PER_REQUEST, MAX_TEXT_LEN, PUSH_BATCH_BYTES_MAX,
    PUSH_BATCH_OPS_MAX, SUPPORTED_VERSIONS,
};
use super::schedule::SyncSchedule;
use super::storage::{BatchLimits, DeviceStorage, StorageError};
use super::time::{Backoff, Millis, SplitMix64};
use crate::proto::messages::{truncate_text, BlobChunk, Cursor, Welcome};
use crate::wire::WireError;

/// Blob downloads a session keeps in flight at once (each is one chunk request at a time).
const CONCURRENT_DOWNLOADS: usize = 4;
/// A blob the hub did not have (an attachment still uploading from another device) is asked
/// for again after this long, on the same connection (a live one may last for days).
const BLOB_RETRY: Millis = Millis::from_secs(60);

/// How a device syncs: identity, schedule, timers, limits.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The enrolled device.
    pub device: DeviceId,
    /// The credential token the hub signed.
    pub token: Vec<u8>,
    /// The app whose offline profile the device syncs.
    pub app: String,
    /// Client software name and version, sent in `Hello`.
    pub client: String,
    /// Protocol versions offered in `Hello`.
    pub protocol_versions: Vec<u16>,
    /// Effective per-table sync intervals and pull groups.
    pub schedule: SyncSchedule,
    /// Live mode: subscribe so the hub pushes changes as they happen.
    pub live: bool,
    /// Send a `Ping` after this long without sending anything (mobile NATs drop idle flows
    /// after about 30 s).
    pub keepalive_interval: Millis,
    /// Close the session after this long without receiving anything.
    pub idle_timeout: Millis,
    /// Close the session if the hub has not answered `Hello` after this long.
    pub handshake_timeout: Millis,
    /// Re-send a push, pull or blob request that made no progress for this long.
    pub request_timeout: Millis,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Seed of the reconnect jitter.
    pub rng_seed: u64,
    /// Bounds of one push.
    pub push_limits: BatchLimits,
    /// Pushes in flight at once.
    pub push_window: usize,
}

impl DeviceConfig {
    /// A config with the default timers and limits.
    pub fn new(device: DeviceId, token: Vec<u8>, app: &str, schedule: SyncSchedule) -> Self {
        DeviceConfig {
            device,
            token,
            app: app.to_string(),
            client: concat!("fieldsync/", env!("CARGO_PKG_VERSION")).to_string(),
            protocol_versions: SUPPORTED_VERSIONS.to_vec(),
            schedule,
            live: false,
            keepalive_interval: Millis::from_secs(25),
            idle_timeout: Millis::from_secs(60),
            handshake_timeout: Millis::from_secs(10),
            request_timeout: Millis::from_secs(20),
            backoff: Backoff::default(),
            rng_seed: 0,
            push_limits: BatchLimits {
                max_items: PUSH_BATCH_OPS_MAX,
                max_bytes: PUSH_BATCH_BYTES_MAX,
            },
            push_window: 2,
        }
    }
}

/// Where a device session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// No transport; see [`DeviceSession::wants_connection_at`].
    Idle,
    /// `Hello` sent, waiting for `Welcome`.
    Handshaking,
    /// Syncing.
    Ready,
    /// The session ended; the driver drops the transport and calls `handle_disconnected`.
    Closed,
    /// The hub refused the credential; the device does not reconnect until re-enrolled.
    Halted,
}

/// Something the app or the driver may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// The hub welcomed the device.
    Connected {
        /// The version in use.
        protocol_version: u16,
        /// The user the device acts for.
        user: Uuid,
    },
    /// The hub refused the session.
    Refused {
        /// Why.
        code: CloseCode,
        /// The hub's message.
        message: String,
    },
    /// The hub processed local ops; rejected ones are now sync errors and were rolled back.
    PushAcked {
        /// Every local op up to here is processed.
        up_to_seq: u64,
        /// The ops the hub refused.
        rejected: Vec<Rejection>,
    },
    /// The hub restarted a table's feed: this device's cursor is not a position of it (the
    /// hub's store was restored from an older backup). The table is pulled again from `to`;
    /// rows the restored hub lacks stay on the device.
    FeedRestarted {
        /// The table.
        table: String,
        /// The cursor the device had.
        from: Cursor,
        /// The cursor it goes on from.
        to: Cursor,
    },
    /// A pulled batch was applied.
    BatchApplied {
        /// The table.
        table: String,
        /// The new cursor.
        cursor: Cursor,
        /// Changes applied.
        ops: usize,
        /// Rows that entered the set.
        entering: usize,
        /// Rows that left the set.
        leaving: usize,
    },
    /// A table is up to date with the hub.
    TableSynced {
        /// The table.
        table: String,
    },
    /// A blob is fully downloaded.
    BlobComplete {
        /// Its hash.
        sha256: [u8; 32],
    },
    /// A downloaded blob did not match its hash: dropped, and asked for again at the next
    /// connection.
    BlobMismatch {
        /// Its hash.
        sha256: [u8; 32],
    },
    /// The hub has no such blob for this device (yet: an attachment whose upload has not
    /// finished is asked for again at the next connection).
    BlobNotFound {
        /// Its hash.
        sha256: [u8; 32],
    },
    /// A blob the device attached is on the hub.
    BlobUploaded {
        /// Its hash.
        sha256: [u8; 32],
    },
    /// The hub refused a blob the device attached; it is not offered again.
    BlobUploadRefused {
        /// Its hash.
        sha256: [u8; 32],
        /// The hub's message.
        message: String,
    },
    /// The session ended.
    Closed {
        /// Why.
        code: CloseCode,
        /// For people.
        reason: String,
        /// Whether the hub ended it.
        by_peer: bool,
    },
    /// The transport is gone; the device reconnects at `reconnect_at` at the earliest.
    Disconnected {
        /// Earliest reconnect time (`None`: halted).
        reconnect_at: Option<Millis>,
    },
    /// Local storage failed; the session was closed.
    StorageFailed {
        /// The failure.
        error: StorageError,
    },
}

/// Why handling an input failed (turned into a close).
enum Fail {
    Storage(StorageError),
    Violation(String),
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Fail {
        Fail::Storage(e)
    }
}

/// The blob being uploaded: the chunk in flight.
#[derive(Debug, Clone, Copy)]
struct Upload {
    sha256: [u8; 32],
    offset: u64,
    total: u64,
    since: Millis,
}

/// State of one transport connection.
#[derive(Debug, Default)]
struct Conn {
    opened_at: Millis,
    last_received: Millis,
    last_sent: Millis,
    ping_nonce: u64,
    acked: u64,
    sent_through: u64,
    in_flight: VecDeque<(u64, u64)>,
    push_progress: Millis,
    /// Tables with a pull under way, and when it last made progress.
    pulls: BTreeMap<String, Millis>,
    /// Blob requests outstanding, and when they were sent.
    blob_requests: BTreeMap<[u8; 32], Millis>,
    /// Blobs storage wanted that were asked for on this connection.
    fetches_asked: BTreeSet<[u8; 32]>,
    /// Those the hub did not have, and when it said so (asked again after [`BLOB_RETRY`]).
    not_found: BTreeMap<[u8; 32], Millis>,
    /// The upload under way.
    upload: Option<Upload>,
    closed_code: Option<CloseCode>,
    retry_after: Option<Millis>,
    /// The keep-alive interval in force: the config's, shortened to a third of the hub's idle
    /// timeout.
    keepalive: Millis,
    next_due: Option<Millis>,
}

/// A device's sync state machine. It lives as long as the app; each transport connection is
/// announced with [`handle_connected`](Self::handle_connected) and
/// [`handle_disconnected`](Self::handle_disconnected).
///
/// Inputs: `handle_connected`, `handle_message`, `handle_wire_error`, `handle_timeout`,
/// `handle_local_ops`, `sync_now`, `fetch_blob`, `close`, `handle_disconnected`. After each,
/// drain `poll_transmit`, then `poll_event`, then re-arm the timer from `poll_timeout`. While
/// idle, connect at [`wants_connection_at`](Self::wants_connection_at).
#[derive(Debug)]
pub struct DeviceSession {
    config: DeviceConfig,
    span: tracing::Span,
    rng: SplitMix64,
    state: DeviceState,
    attempts: u32,
    reconnect_at: Millis,
    conn: Conn,
    on_demand: BTreeSet<String>,
    blobs_wanted: BTreeSet<[u8; 32]>,
    transmit: VecDeque<Message>,
    events: VecDeque<DeviceEvent>,
}

impl DeviceSession {
    /// A session with no connection yet.
    pub fn new(config: DeviceConfig) -> DeviceSession {
        let span = tracing::debug_span!("device_session", device = %config.device);
        DeviceSession {
            rng: SplitMix64::new(config.rng_seed),
            config,
            span,
            state: DeviceState::Idle,
            attempts: 0,
            reconnect_at: Millis::ZERO,
            conn: Conn::default(),
            on_demand: BTreeSet::new(),
            blobs_wanted: BTreeSet::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// The config.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Whether nothing is in flight: no push awaiting its ack, no pull or blob under way.
    pub fn is_quiet(&self) -> bool {
        self.conn.in_flight.is_empty()
            && self.conn.pulls.is_empty()
            && self.conn.blob_requests.is_empty()
            && self.conn.upload.is_none()
            && self.on_demand.is_empty()
    }

    /// When the device should open a connection, while idle: now if it has pending ops or
    /// uploads, an on-demand sync, a wanted blob or is in live mode; else when the next table is due —
    /// never before the reconnect backoff allows. `None` while connected or halted.
    pub fn wants_connection_at(&self, storage: &dyn DeviceStorage) -> Option<Millis> {
        if self.state != DeviceState::Idle {
            return None;
        }
        let pending = match (storage.last_local_seq(), storage.acked_seq()) {
            (Ok(last), Ok(acked)) => last > acked,
            _ => true,
        } || storage.blobs_to_upload().map_or(true, |b| !b.is_empty());
        let need = if pending
            || self.config.live
            || !self.on_demand.is_empty()
            || !self.blobs_wanted.is_empty()
        {
            Some(Millis::ZERO)
        } else {
            next_due(&self.config.schedule, storage, &BTreeMap::new()).unwrap_or(Some(Millis::ZERO))
        };
        need.map(|n| n.max(self.reconnect_at))
    }

    /// The transport is up: the session sends `Hello`.
    pub fn handle_connected(&mut self, now: Millis) {
        let _g = self.span.clone().entered();
        if matches!(self.state, DeviceState::Halted) {
            return;
        }
        debug!("connected; sending Hello");
        self.conn = Conn {
            opened_at: now,
            last_received: now,
            last_sent: now,
            keepalive: self.config.keepalive_interval,
            ..Conn::default()
        };
        self.state = DeviceState::Handshaking;
        self.transmit.clear();
        self.transmit.push_back(Message::Hello(Hello {
            protocol_versions: self.config.protocol_versions.clone(),
            device: self.config.device,
            token: self.config.token.clone(),
            app: self.config.app.clone(),
            client: self.config.client.clone(),
        }));
    }

    /// The transport is gone (closed by either side, failed to connect, or lost).
    pub fn handle_disconnected(&mut self, now: Millis) {
        let _g = self.span.clone().entered();
        self.transmit.clear();
        if self.state == DeviceState::Halted {
            self.events
                .push_back(DeviceEvent::Disconnected { reconnect_at: None });
            return;
        }
        let code = self.conn.closed_code;
        let reconnect_at = if code == Some(CloseCode::NORMAL) {
            now
        } else {
            let delay = self.config.backoff.delay(self.attempts, &mut self.rng);
            self.attempts = self.attempts.saturating_add(1);
            let mut at = now + delay;
            if let Some(retry) = self.conn.retry_after {
                at = at.max(now + retry);
            }
            at
        };
        info!(?code, reconnect_at = reconnect_at.0, "disconnected");
        self.reconnect_at = reconnect_at;
        self.state = DeviceState::Idle;
        self.conn = Conn::default();
        self.events.push_back(DeviceEvent::Disconnected {
            reconnect_at: Some(reconnect_at),
        });
    }

    /// A bad frame arrived: the session closes with the error's code.
    pub fn handle_wire_error(&mut self, now: Millis, error: &WireError) {
        let _g = self.span.clone().entered();
        warn!(%error, code = error.code(), "bad frame from hub");
        self.close(now, error.close_code(), &error.to_string());
    }

    /// Ends the session: sends `Close` (the driver sends it, then drops the transport).
    pub fn close(&mut self, now: Millis, code: CloseCode, reason: &str) {
        let _ = now;
        if !matches!(self.state, DeviceState::Handshaking | DeviceState::Ready) {
            return;
        }
        let reason = truncate_text(reason, MAX_TEXT_LEN);
        self.transmit.push_back(Message::Close(Close {
            code,
            reason: reason.clone(),
        }));
        self.conn.closed_code = Some(code);
        self.state = DeviceState::Closed;
        self.events.push_back(DeviceEvent::Closed {
            code,
            reason,
            by_peer: false,
        });
    }

    /// New local ops were committed: push them if connected.
    pub fn handle_local_ops(&mut self, now: Millis, storage: &mut dyn DeviceStorage) {
        let _g = self.span.clone().entered();
        if self.state == DeviceState::Ready {
            let r = self.pump_push(now, storage);
            self.settle(now, r);
        }
    }

    /// Pull these tables (every table if empty) now rather than at their interval.
    pub fn sync_now(&mut self, now: Millis, storage: &mut dyn DeviceStorage, tables: &[&str]) {
        let _g = self.span.clone().entered();
        let schedule = &self.config.schedule;
        let wanted: Vec<String> = if tables.is_empty() {
            schedule.tables().map(str::to_string).collect()
        } else {
            tables
                .iter()
                .filter(|t| schedule.contains(t))
                .flat_map(|t| schedule.group(t).iter().cloned())
                .collect()
        };
        self.on_demand.extend(wanted);
        if self.state == DeviceState::Ready {
            let r = self.start_pulls(now, storage);
            self.settle(now, r);
        }
    }

    /// Download a blob (resuming from what storage already holds).
    pub fn fetch_blob(&mut self, now: Millis, storage: &mut dyn DeviceStorage, sha256: [u8; 32]) {
        let _g = self.span.clone().entered();
        self.blobs_wanted.insert(sha256);
        if self.state == DeviceState::Ready {
            let r = self.pump_downloads(now, storage);
            self.settle(now, r);
        }
    }

    /// A message arrived from the hub.
    pub fn handle_message(&mut self, now: Millis, msg: Message, storage: &mut dyn DeviceStorage) {
        let _g = self.span.clone().entered();
        if !matches!(self.state, DeviceState::Handshaking | DeviceState::Ready) {
            debug!(msg = msg.name(), "message after close ignored");
            return;
        }
        self.conn.last_received = now;
        let r = self.dispatch(now, msg, storage);
        self.settle(now, r);
    }

    /// A timer armed from [`poll_timeout`](Self::poll_timeout) fired (early calls are harmless).
    pub fn handle_timeout(&mut self, now: Millis, storage: &mut dyn DeviceStorage) {
        let _g = self.span.clone().entered();
        let r = self.on_timeout(now, storage);
        self.settle(now, r);
    }

    /// The next message to send, in order.
    pub fn poll_transmit(&mut self, now: Millis) -> Option<Message> {
        let msg = self.transmit.pop_front()?;
        self.conn.last_sent = now;
        Some(msg)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next (`None`: no timer).
    pub fn poll_timeout(&self) -> Option<Millis> {
        let c = &self.conn;
        let cfg = &self.config;
        match self.state {
            DeviceState::Handshaking => {
                Some((c.opened_at + cfg.handshake_timeout).min(c.last_received + cfg.idle_timeout))
            }
            DeviceState::Ready => {
                let mut t = (c.last_received + cfg.idle_timeout)
                    .min(c.last_sent.max(c.last_received) + c.keepalive);
                if !c.in_flight.is_empty() {
                    t = t.min(c.push_progress + cfg.request_timeout);
                }
                for since in c.pulls.values().chain(c.blob_requests.values()) {
                    t = t.min(*since + cfg.request_timeout);
                }
                if let Some(u) = &c.upload {
                    t = t.min(u.since + cfg.request_timeout);
                }
                if let Some(at) = c.not_found.values().min() {
                    t = t.min(*at + BLOB_RETRY);
                }
                if let Some(due) = c.next_due {
                    t = t.min(due);
                }
                Some(t)
            }
            _ => None,
        }
    }

    fn settle(&mut self, now: Millis, r: Result<(), Fail>) {
        match r {
            Ok(()) => {}
            Err(Fail::Storage(error)) => {
                warn!(%error, "storage failed; closing session");
                self.close(now, CloseCode::STORAGE_FAILURE, &error.to_string());
                self.events.push_back(DeviceEvent::StorageFailed { error });
            }
            Err(Fail::Violation(why)) => {
                warn!(%why, "hub broke the protocol; closing session");
                self.close(now, CloseCode::PROTOCOL_VIOLATION, &why);
            }
        }
    }

    fn on_timeout(&mut self, now: Millis, storage: &mut dyn DeviceStorage) -> Result<(), Fail> {
        let cfg = &self.config;
        match self.state {
            DeviceState::Handshaking => {
                if now >= self.conn.opened_at + cfg.handshake_timeout {
                    self.close(now, CloseCode::HANDSHAKE_TIMEOUT, "no Welcome from the hub");
                } else if now >= self.conn.last_received + cfg.idle_timeout {
                    self.close(now, CloseCode::IDLE_TIMEOUT, "hub silent");
                }
                Ok(())
            }
            DeviceState::Ready => {
                if now >= self.conn.last_received + cfg.idle_timeout {
                    self.close(now, CloseCode::IDLE_TIMEOUT, "hub silent");
                    return Ok(());
                }
                let quiet_since = self.conn.last_sent.max(self.conn.last_received);
                if now >= quiet_since + self.conn.keepalive {
                    self.conn.ping_nonce = self.conn.ping_nonce.wrapping_add(1);
                    self.transmit.push_back(Message::Ping(Ping {
                        nonce: self.conn.ping_nonce,
                    }));
                    self.conn.last_sent = now;
                }
                if !self.conn.in_flight.is_empty()
                    && now >= self.conn.push_progress + cfg.request_timeout
                {
                    debug!(acked = self.conn.acked, "push stalled; re-sending");
                    self.conn.in_flight.clear();
                    self.conn.sent_through = self.conn.acked;
                }
                let timeout = cfg.request_timeout;
                let stalled: Vec<String> = self
                    .conn
                    .pulls
                    .iter()
                    .filter(|(_, since)| now >= **since + timeout)
                    .map(|(t, _)| t.clone())
                    .collect();
                for t in &stalled {
                    debug!(table = %t, "pull stalled; asking again");
                    self.conn.pulls.remove(t);
                }
                self.request_pulls(now, storage, stalled)?;
                let stalled_blobs: Vec<[u8; 32]> = self
                    .conn
                    .blob_requests
                    .iter()
                    .filter(|(_, since)| now >= **since + timeout)
                    .map(|(b, _)| *b)
                    .collect();
                for b in stalled_blobs {
                    self.request_blob(now, storage, b)?;
                }
                let retry: Vec<[u8; 32]> = self
                    .conn
                    .not_found
                    .iter()
                    .filter(|(_, at)| now >= **at + BLOB_RETRY)
                    .map(|(b, _)| *b)
                    .collect();
                if !retry.is_empty() {
                    for b in &retry {
                        self.conn.not_found.remove(b);
                        self.conn.fetches_asked.remove(b);
                    }
                    self.want_stored_fetches(now, storage)?;
                }
                if let Some(u) = self.conn.upload {
                    if now >= u.since + timeout {
                        debug!(offset = u.offset, "upload stalled; sending its chunk again");
                        self.send_upload_chunk(now, storage, u.sha256, u.offset)?;
                    }
                }
                self.pump_push(now, storage)?;
                self.start_pulls(now, storage)
            }
            _ => Ok(()),
        }
    }

    fn dispatch(
        &mut self,
        now: Millis,
        msg: Message,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        match (self.state, msg) {
            (_, Message::Close(c)) => {
                info!(code = %c.code, reason = %c.reason, "hub closed the session");
                self.conn.closed_code = Some(c.code);
                self.state = DeviceState::Closed;
                self.events.push_back(DeviceEvent::Closed {
                    code: c.code,
                    reason: c.reason,
                    by_peer: true,
                });
                Ok(())
            }
            (_, Message::Ping(p)) => {
                self.transmit
                    .push_back(Message::Pong(Pong { nonce: p.nonce }));
                Ok(())
            }
            (_, Message::Pong(_)) => Ok(()),
            (DeviceState::Handshaking, Message::Welcome(w)) => self.on_welcome(now, w, storage),
            (DeviceState::Ready, Message::Welcome(_)) => {
                debug!("repeated Welcome ignored");
                Ok(())
            }
            (DeviceState::Handshaking, Message::Refused(r)) => {
                info!(code = %r.code, message = %r.message, "hub refused the session");
                self.conn.closed_code = Some(r.code);
                self.conn.retry_after = r.retry_after_ms.map(Millis);
                self.state = if r.code.is_fatal_for_device() {
                    DeviceState::Halted
                } else {
                    DeviceState::Closed
                };
                self.events.push_back(DeviceEvent::Refused {
                    code: r.code,
                    message: r.message,
                });
                Ok(())
            }
            (DeviceState::Ready, Message::PushAck(a)) => self.on_push_ack(now, a, storage),
            (DeviceState::Ready, Message::PullBatch(b)) => self.on_pull_batch(now, b, storage),
            (DeviceState::Ready, Message::BlobChunk(c)) => self.on_blob_chunk(now, c, storage),
            (DeviceState::Ready, Message::BlobPutAck(a)) => self.on_blob_put_ack(now, a, storage),
            (_, other) => Err(Fail::Violation(format!(
                "unexpected {} from the hub",
                other.name()
            ))),
        }
    }

    fn on_welcome(
        &mut self,
        now: Millis,
        w: Welcome,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        if !self.config.protocol_versions.contains(&w.protocol_version) {
            return Err(Fail::Violation(format!(
                "hub chose version {} which the device did not offer",
                w.protocol_version
            )));
        }
        info!(version = w.protocol_version, user = %w.user, "session open");
        self.state = DeviceState::Ready;
        self.attempts = 0;
        let hub_idle = Millis(w.idle_timeout_ms / 3).max(Millis::from_secs(1));
        self.conn.keepalive = self.config.keepalive_interval.min(hub_idle);
        let acked = storage.acked_seq()?;
        self.conn.acked = acked;
        self.conn.sent_through = acked;
        self.events.push_back(DeviceEvent::Connected {
            protocol_version: w.protocol_version,
            user: w.user,
        });
        if self.config.live {
            let tables: Vec<String> = self.config.schedule.tables().map(str::to_string).collect();
            let mut cursors = Vec::with_capacity(tables.len());
            for t in tables {
                cursors.push(TableCursor {
                    cursor: storage.cursor(&t)?,
                    table: t.clone(),
                });
                self.conn.pulls.insert(t, now);
            }
            for chunk in cursors.chunks(MAX_TABLES_PER_REQUEST) {
                self.transmit.push_back(Message::Subscribe(Subscribe {
                    tables: chunk.to_vec(),
                }));
            }
        }
        self.pump_push(now, storage)?;
        self.start_pulls(now, storage)?;
        self.want_stored_fetches(now, storage)?;
        self.pump_upload(now, storage)
    }

    fn pump_push(&mut self, now: Millis, storage: &mut dyn DeviceStorage) -> Result<(), Fail> {
        if self.state != DeviceState::Ready {
            return Ok(());
        }
        while self.conn.in_flight.len() < self.config.push_window.max(1) {
            let mut ops = storage.pending_ops(self.conn.sent_through, self.config.push_limits)?;
            // Hold storage to the bounds: the frame must fit, whatever storage returned.
            let max_bytes = self.config.push_limits.max_bytes.min(PUSH_BATCH_BYTES_MAX);
            let mut bytes = 0usize;
            let keep = ops
                .iter()
                .take(PUSH_BATCH_OPS_MAX)
                .enumerate()
                .take_while(|(i, op)| {
                    bytes += op.change.len() + op.table.len();
                    *i == 0 || bytes <= max_bytes
                })
                .count();
            ops.truncate(keep.max(1));
            if let Some(op) = ops.iter().find(|op| op.change.len() > MAX_CHANGE_LEN) {
                // Never dropped, never sendable: say so and stop pushing (the store refuses such
                // a change at commit, so only a damaged log holds one).
                return Err(Fail::Storage(StorageError::Corrupt(format!(
                    "pending op {} is {} bytes, over the {MAX_CHANGE_LEN}-byte limit",
                    op.seq,
                    op.change.len()
                ))));
            }
            let Some(last) = ops.last() else { break };
            let up_to = last.seq;
            let mut prev = self.conn.sent_through;
            for op in &ops {
                if op.seq <= prev {
                    return Err(Fail::Storage(StorageError::Corrupt(format!(
                        "pending ops out of order: {} after {}",
                        op.seq, prev
                    ))));
                }
                prev = op.seq;
            }
            debug!(after = self.conn.sent_through, up_to, n = ops.len(), "push");
            if self.conn.in_flight.is_empty() {
                self.conn.push_progress = now;
            }
            self.transmit.push_back(Message::Push(Push {
                after_seq: self.conn.sent_through,
                up_to_seq: up_to,
                ops,
            }));
            self.conn
                .in_flight
                .push_back((self.conn.sent_through, up_to));
            self.conn.sent_through = up_to;
        }
        Ok(())
    }

    fn on_push_ack(
        &mut self,
        now: Millis,
        ack: PushAck,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        let range = (ack.after_seq, ack.up_to_seq);
        if ack.after_seq != self.conn.acked || self.conn.in_flight.front() != Some(&range) {
            debug!(
                ?range,
                acked = self.conn.acked,
                "stale or out-of-order PushAck ignored"
            );
            return Ok(());
        }
        if let Some(r) = ack
            .rejected
            .iter()
            .find(|r| r.seq <= ack.after_seq || r.seq > ack.up_to_seq)
        {
            return Err(Fail::Violation(format!(
                "rejection of seq {} outside the acknowledged range",
                r.seq
            )));
        }
        storage.record_ack(now, ack.up_to_seq, &ack.rejected)?;
        self.conn.in_flight.pop_front();
        self.conn.acked = ack.up_to_seq;
        self.conn.push_progress = now;
        if !ack.rejected.is_empty() {
            info!(
                n = ack.rejected.len(),
                "hub rejected ops; recorded as sync errors"
            );
        }
        self.events.push_back(DeviceEvent::PushAcked {
            up_to_seq: ack.up_to_seq,
            rejected: ack.rejected,
        });
        self.pump_push(now, storage)?;
        // Attachments of the ops just accepted may now go up.
        self.pump_upload(now, storage)
    }

    fn due_tables(&self, now: Millis, storage: &dyn DeviceStorage) -> Result<Vec<String>, Fail> {
        let schedule = &self.config.schedule;
        let mut due = BTreeSet::new();
        for t in schedule.tables() {
            let interval = schedule.interval(t).unwrap_or(Millis::ZERO);
            let is_due = self.on_demand.contains(t)
                || match storage.last_sync(t)? {
                    None => true,
                    Some(at) => now >= at + interval,
                };
            if is_due {
                due.extend(schedule.group(t).iter().cloned());
            }
        }
        Ok(due.into_iter().collect())
    }

    fn start_pulls(&mut self, now: Millis, storage: &mut dyn DeviceStorage) -> Result<(), Fail> {
        if self.state != DeviceState::Ready {
            return Ok(());
        }
        let due = self.due_tables(now, storage)?;
        let due: Vec<String> = due
            .into_iter()
            .filter(|t| !self.conn.pulls.contains_key(t))
            .collect();
        self.request_pulls(now, storage, due)?;
        self.conn.next_due = next_due(&self.config.schedule, storage, &self.conn.pulls)?;
        Ok(())
    }

    fn request_pulls(
        &mut self,
        now: Millis,
        storage: &mut dyn DeviceStorage,
        tables: Vec<String>,
    ) -> Result<(), Fail> {
        let mut cursors = Vec::with_capacity(tables.len());
        for t in tables {
            cursors.push(TableCursor {
                cursor: storage.cursor(&t)?,
                table: t.clone(),
            });
            self.conn.pulls.insert(t, now);
        }
        for chunk in cursors.chunks(MAX_TABLES_PER_REQUEST) {
            debug!(n = chunk.len(), "pull");
            self.transmit.push_back(Message::Pull(Pull {
                tables: chunk.to_vec(),
            }));
        }
        Ok(())
    }

    fn on_pull_batch(
        &mut self,
        now: Millis,
        b: PullBatch,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        if !self.config.schedule.contains(&b.table) {
            return Err(Fail::Violation(format!(
                "batch for table `{}` outside the profile",
                b.table
            )));
        }
        if b.is_restart() && !(b.ops.is_empty() && b.entering.is_empty() && b.leaving.is_empty()) {
            return Err(Fail::Violation(format!(
                "batch for `{}` moves the cursor back and carries changes",
                b.table
            )));
        }
        let current = storage.cursor(&b.table)?;
        if b.is_restart() {
            // A hub restarts a feed only in answer to a pull from the device's cursor, so one
            // that finds the cursor moved on, or no pull of the table under way, is a stale
            // copy (only a faulty link delivers one: a new connection starts afresh).
            if b.from == current && self.conn.pulls.contains_key(&b.table) {
                warn!(table = %b.table, from = b.from.0, to = b.cursor.0, "the hub restarted this table's feed (its store is older than this device's cursor: restored from a backup?); pulling the table again");
                storage.restart_cursor(&b.table, b.cursor)?;
                self.events.push_back(DeviceEvent::FeedRestarted {
                    table: b.table.clone(),
                    from: b.from,
                    to: b.cursor,
                });
                // The batches that follow come from the new cursor.
                self.conn.pulls.insert(b.table.clone(), now);
            } else {
                debug!(table = %b.table, "stale feed restart ignored");
            }
            let cursor = storage.cursor(&b.table)?;
            self.transmit.push_back(Message::PullAck(PullAck {
                table: b.table,
                cursor,
            }));
            return Ok(());
        }
        if b.from != current {
            if b.cursor <= current {
                // Already held; say where this device is, so the hub frees the batch's place
                // in its window.
                debug!(table = %b.table, "stale batch ignored");
                self.transmit.push_back(Message::PullAck(PullAck {
                    table: b.table.clone(),
                    cursor: current,
                }));
            } else {
                debug!(table = %b.table, from = b.from.0, current = current.0, "gap; pulling again");
                self.conn.pulls.remove(&b.table);
                self.request_pulls(now, storage, vec![b.table])?;
            }
            return Ok(());
        }
        storage.apply_ops(&b.table, &b.ops)?;
        storage.import_rows(&b.table, &b.entering)?;
        storage.evict_rows(&b.table, &b.leaving)?;
        let synced = (!b.more).then_some(now);
        storage.set_cursor(&b.table, b.cursor, synced)?;
        self.transmit.push_back(Message::PullAck(PullAck {
            table: b.table.clone(),
            cursor: b.cursor,
        }));
        self.events.push_back(DeviceEvent::BatchApplied {
            table: b.table.clone(),
            cursor: b.cursor,
            ops: b.ops.len(),
            entering: b.entering.len(),
            leaving: b.leaving.len(),
        });

        if b.more {
            self.conn.pulls.insert(b.table, now);
        } else {
            self.conn.pulls.remove(&b.table);
            self.on_demand.remove(&b.table);
            self.events
                .push_back(DeviceEvent::TableSynced { table: b.table });
            // The rows that came in may name files and images to fetch.
            self.want_stored_fetches(now, storage)?;
            self.conn.next_due = next_due(&self.config.schedule, storage, &self.conn.pulls)?;
        }
        Ok(())
    }

    fn request_blob(
        &mut self,
        now: Millis,
        storage: &mut dyn DeviceStorage,
        sha256: [u8; 32],
    ) -> Result<(), Fail> {
        if self.state != DeviceState::Ready {
            return Ok(());
        }
        let offset = storage.blob_progress(&sha256)?;
        self.transmit.push_back(Message::BlobRequest(BlobRequest {
            sha256,
            offset,
            max_len: BLOB_CHUNK_MAX as u32,
        }));
        self.conn.blob_requests.insert(sha256, now);
        Ok(())
    }

    fn on_blob_chunk(
        &mut self,
        now: Millis,
        c: BlobChunk,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        if !self.blobs_wanted.contains(&c.sha256) {
            return Ok(());
        }
        if !c.found {
            // An answer to an older request (chunks travel on their own streams, so answers
            // may overtake each other) must not cancel a download that has moved on.
            if storage.blob_progress(&c.sha256)? != c.offset {
                return Ok(());
            }
            self.blobs_wanted.remove(&c.sha256);
            self.conn.blob_requests.remove(&c.sha256);
            if self.conn.fetches_asked.contains(&c.sha256) {
                self.conn.not_found.insert(c.sha256, now);
            }
            self.events
                .push_back(DeviceEvent::BlobNotFound { sha256: c.sha256 });
            return self.pump_downloads(now, storage);
        }
        let progress = storage.blob_progress(&c.sha256)?;
        if c.offset != progress {
            debug!(offset = c.offset, progress, "stale blob chunk ignored");
            return Ok(());
        }
        let end = c.offset.saturating_add(c.data.len() as u64);
        if end > c.total || (c.data.is_empty() && end < c.total) {
            return Err(Fail::Violation("blob chunk outside the blob".into()));
        }
        match storage.write_blob_chunk(&c.sha256, c.offset, &c.data, c.total) {
            Err(StorageError::BlobMismatch) => {
                // Not this session's to repair: the blob is dropped and asked for again at
                // the next connection; everything else goes on.
                warn!("a downloaded blob does not match its hash; dropped, to fetch again later");
                self.blobs_wanted.remove(&c.sha256);
                self.conn.blob_requests.remove(&c.sha256);
                self.events
                    .push_back(DeviceEvent::BlobMismatch { sha256: c.sha256 });
                return self.pump_downloads(now, storage);
            }
            other => other?,
        }
        if end >= c.total {
            self.blobs_wanted.remove(&c.sha256);
            self.conn.blob_requests.remove(&c.sha256);
            self.events
                .push_back(DeviceEvent::BlobComplete { sha256: c.sha256 });
            self.pump_downloads(now, storage)
        } else {
            self.request_blob(now, storage, c.sha256)
        }
    }

    /// Adds the blobs storage wants (attachments of rows it holds) to the downloads, once per
    /// connection each.
    fn want_stored_fetches(
        &mut self,
        now: Millis,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        for sha in storage.blobs_to_fetch()? {
            if self.conn.fetches_asked.insert(sha) {
                self.blobs_wanted.insert(sha);
            }
        }
        self.pump_downloads(now, storage)
    }

    /// Starts wanted downloads, up to [`CONCURRENT_DOWNLOADS`] at once.
    fn pump_downloads(&mut self, now: Millis, storage: &mut dyn DeviceStorage) -> Result<(), Fail> {
        if self.state != DeviceState::Ready {
            return Ok(());
        }
        let room = CONCURRENT_DOWNLOADS.saturating_sub(self.conn.blob_requests.len());
        let next: Vec<[u8; 32]> = self
            .blobs_wanted
            .iter()
            .filter(|b| !self.conn.blob_requests.contains_key(*b))
            .take(room)
            .copied()
            .collect();
        for b in next {
            self.request_blob(now, storage, b)?;
        }
        Ok(())
    }

    /// Starts the next upload if none is under way: its first chunk goes at offset 0 (a hub
    /// holding a prefix answers with where to go on from).
    fn pump_upload(&mut self, now: Millis, storage: &mut dyn DeviceStorage) -> Result<(), Fail> {
        if self.state != DeviceState::Ready || self.conn.upload.is_some() {
            return Ok(());
        }
        for sha in storage.blobs_to_upload()? {
            if self.send_upload_chunk(now, storage, sha, 0)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Sends the chunk of an upload at `offset`; `false` if the device no longer has the
    /// content (the blob then leaves the upload queue).
    fn send_upload_chunk(
        &mut self,
        now: Millis,
        storage: &mut dyn DeviceStorage,
        sha256: [u8; 32],
        offset: u64,
    ) -> Result<bool, Fail> {
        let Some(slice) = storage.read_blob_range(&sha256, offset, BLOB_CHUNK_MAX)? else {
            warn!(sha256 = ?&sha256[..8], "an attachment to upload is not stored; dropped");
            storage.record_upload(&sha256, false)?;
            self.conn.upload = None;
            return Ok(false);
        };
        let mut data = slice.data;
        data.truncate(BLOB_CHUNK_MAX);
        if offset.saturating_add(data.len() as u64) > slice.total
            || (data.is_empty() && offset < slice.total)
        {
            return Err(Fail::Storage(StorageError::Corrupt(format!(
                "a stored blob gave {} bytes at {offset} of {}",
                data.len(),
                slice.total
            ))));
        }
        self.transmit.push_back(Message::BlobPut(BlobPut {
            sha256,
            offset,
            total: slice.total,
            data,
        }));
        self.conn.upload = Some(Upload {
            sha256,
            offset,
            total: slice.total,
            since: now,
        });
        Ok(true)
    }

    fn on_blob_put_ack(
        &mut self,
        now: Millis,
        a: BlobPutAck,
        storage: &mut dyn DeviceStorage,
    ) -> Result<(), Fail> {
        let Some(u) = self
            .conn
            .upload
            .filter(|u| u.sha256 == a.sha256 && u.offset == a.offset)
        else {
            debug!(offset = a.offset, "stale BlobPutAck ignored");
            return Ok(());
        };
        match a.status {
            BlobPutStatus::Continue { progress } => {
                if progress > u.total {
                    return Err(Fail::Violation(format!(
                        "upload progress {progress} past the blob's {} bytes",
                        u.total
                    )));
                }
                if !self.send_upload_chunk(now, storage, u.sha256, progress)? {
                    self.pump_upload(now, storage)?;
                }
                Ok(())
            }
            BlobPutStatus::Complete => {
                storage.record_upload(&u.sha256, true)?;
                self.conn.upload = None;
                self.events
                    .push_back(DeviceEvent::BlobUploaded { sha256: u.sha256 });
                self.pump_upload(now, storage)
            }
            BlobPutStatus::Refused { message } => {
                warn!(%message, "the hub refused an attachment");
                storage.record_upload(&u.sha256, false)?;
                self.conn.upload = None;
                self.events.push_back(DeviceEvent::BlobUploadRefused {
                    sha256: u.sha256,
                    message,
                });
                self.pump_upload(now, storage)
            }
        }
    }
}

/// The earliest time a table of the schedule that is not being pulled is due (`Some(ZERO)` if
/// one never synced).
fn next_due(
    schedule: &SyncSchedule,
    storage: &dyn DeviceStorage,
    pulling: &BTreeMap<String, Millis>,
) -> Result<Option<Millis>, StorageError> {
    let mut due: Option<Millis> = None;
    for t in schedule.tables().filter(|t| !pulling.contains_key(*t)) {
        let at = match storage.last_sync(t)? {
            None => Millis::ZERO,
            Some(at) => at + schedule.interval(t).unwrap_or(Millis::ZERO),
        };
        due = Some(due.map_or(at, |d| d.min(at)));
    }
    Ok(due)
}
