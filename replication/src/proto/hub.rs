//! The hub side of a sync session: one per connected device.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tracing::{debug, info, warn};
use uuid::Uuid;

use super::messages::{
    BlobChunk, BlobPut, BlobPutAck, BlobPutStatus, BlobRequest, Close, CloseCode, Cursor, Hello,
    Message, Pong, PullBatch, Push, PushAck, Refused, Rejection, RowDoc, TableCursor, Welcome,
    BLOB_CHUNK_MAX, BLOB_UPLOAD_MAX, MAX_TEXT_LEN, PULL_BATCH_BYTES_MAX, PULL_BATCH_ITEMS_MAX,
    SUPPORTED_VERSIONS,
};
use super::storage::{
    BatchLimits, HubStorage, Principal, PullChunk, PushOutcome, StorageError, UploadOutcome,
};
use super::time::Millis;
use crate::proto::messages::truncate_text;
use crate::wire::WireError;

/// Most distinct tables one session tracks (a hostile device cannot grow the hub's memory).
pub const MAX_TRACKED_TABLES: usize = 1024;
/// Bytes of authoritative rows one `PushAck` carries; past this, rejections go without them
/// (the device re-pulls the rows).
pub const AUTHORITATIVE_BYTES_MAX: usize = 2 * 1024 * 1024;

/// How the hub resolves concurrent writes to a row of a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ConflictPolicy {
    /// Merge per column (the automerge rows); concurrent writes to one column are kept as a
    /// conflict with a deterministic winner.
    #[default]
    MergePerColumn,
    /// The hub's row wins over a device's concurrent write, for the whole row.
    ServerWins,
    /// The device's write wins over the hub's concurrent changes, for the whole row.
    ClientWins,
}

/// The conflict policy of each table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictPolicies {
    /// The policy of tables not listed.
    pub default: ConflictPolicy,
    /// Per-table policies.
    pub tables: BTreeMap<String, ConflictPolicy>,
}

impl ConflictPolicies {
    /// The policy of a table.
    pub fn for_table(&self, table: &str) -> ConflictPolicy {
        self.tables.get(table).copied().unwrap_or(self.default)
    }
}

/// How a hub serves its sessions.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub's id, sent in `Welcome`.
    pub hub: Uuid,
    /// Protocol versions the hub speaks.
    pub protocol_versions: Vec<u16>,
    /// Close a session that sent nothing for this long (devices ping every 25 s by default).
    pub idle_timeout: Millis,
    /// Close a session that has not sent `Hello` after this long.
    pub handshake_timeout: Millis,
    /// Bounds of one pulled batch.
    pub pull_limits: BatchLimits,
    /// Batches of one table sent ahead of the device's `PullAck`s (at least 1). Two hide one
    /// round trip on slow links while bounding what one device has in flight.
    pub pull_window: usize,
    /// Conflict policy per table (applied by [`HubStorage::apply_push`]).
    pub conflicts: ConflictPolicies,
}

impl HubConfig {
    /// A config with the default timers and limits.
    pub fn new(hub: Uuid) -> HubConfig {
        HubConfig {
            hub,
            protocol_versions: SUPPORTED_VERSIONS.to_vec(),
            idle_timeout: Millis::from_secs(90),
            handshake_timeout: Millis::from_secs(10),
            pull_limits: BatchLimits {
                max_items: PULL_BATCH_ITEMS_MAX,
                max_bytes: PULL_BATCH_BYTES_MAX,
            },
            pull_window: 2,
            conflicts: ConflictPolicies::default(),
        }
    }
}

/// Where a hub session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubState {
    /// Waiting for `Hello`.
    AwaitingHello,
    /// Serving an authenticated device.
    Ready,
    /// Ended; the driver sends what is left to send and drops the transport.
    Closed,
}

/// Something the hub's driver may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HubEvent {
    /// The device authenticated.
    Authenticated {
        /// Who it acts for.
        principal: Principal,
    },
    /// The session was refused at the handshake.
    Refused {
        /// Why.
        code: CloseCode,
    },
    /// Pushed ops were processed. The driver tells the other sessions
    /// ([`HubSession::handle_changes`]) when `accepted > 0`.
    OpsApplied {
        /// Ops accepted and applied.
        accepted: usize,
        /// Ops rejected.
        rejected: usize,
        /// Tables that changed.
        tables: Vec<String>,
    },
    /// A batch went out.
    BatchSent {
        /// The table.
        table: String,
        /// The batch's cursor.
        cursor: Cursor,
        /// Ops plus rows entering and leaving.
        items: usize,
    },
    /// An uploaded blob is complete on the hub (the upstream bridge may now send it on).
    BlobStored {
        /// Its hash.
        sha256: [u8; 32],
    },
    /// The session ended.
    Closed {
        /// Why.
        code: CloseCode,
        /// For people.
        reason: String,
        /// Whether the device ended it.
        by_peer: bool,
    },
    /// Hub storage failed; the session was closed.
    StorageFailed {
        /// The failure.
        error: StorageError,
    },
}

#[derive(Debug, Default)]
struct TableFeed {
    /// Where the next batch starts: the cursor of the last batch sent (or the device's).
    cursor: Cursor,
    /// Where the next read of the hub's feed starts: past `cursor` once a live feed's reads
    /// found nothing for the device up to here (nothing was sent, so the device's cursor is
    /// still `cursor`). Without it every wake-up re-read everything since the device's last
    /// batch: with many live devices, each push cost the hub every device's whole backlog.
    scanned: Cursor,
    /// The cursors of the batches sent and not yet acknowledged, oldest first.
    outstanding: VecDeque<Cursor>,
    /// The device asked for this table and the feed has not reached its end.
    requested: bool,
    /// The device subscribed (live mode).
    live: bool,
    /// The hub changed since the last read (live mode).
    dirty: bool,
}

enum Fail {
    Storage(StorageError),
    Violation(String),
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Fail {
        Fail::Storage(e)
    }
}

/// A hub's state machine for one device connection.
///
/// Inputs: `handle_message`, `handle_wire_error`, `handle_timeout`, `handle_changes` (another
/// session changed the hub's data), `close`. After each, drain `poll_transmit`, then
/// `poll_event`, then re-arm the timer from `poll_timeout`.
#[derive(Debug)]
pub struct HubSession {
    config: HubConfig,
    span: tracing::Span,
    state: HubState,
    principal: Option<Principal>,
    opened_at: Millis,
    last_received: Millis,
    feeds: BTreeMap<String, TableFeed>,
    transmit: VecDeque<Message>,
    events: VecDeque<HubEvent>,
}

impl HubSession {
    /// A session for a connection accepted at `now`.
    pub fn new(config: HubConfig, now: Millis) -> HubSession {
        HubSession {
            config,
            span: tracing::debug_span!("hub_session", device = tracing::field::Empty),
            state: HubState::AwaitingHello,
            principal: None,
            opened_at: now,
            last_received: now,
            feeds: BTreeMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> HubState {
        self.state
    }

    /// Who the session acts for, once authenticated.
    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == HubState::Closed
    }

    /// A message arrived from the device.
    pub fn handle_message(&mut self, now: Millis, msg: Message, storage: &mut dyn HubStorage) {
        let _g = self.span.clone().entered();
        if self.state == HubState::Closed {
            return;
        }
        self.last_received = now;
        let r = self.dispatch(now, msg, storage);
        self.settle(now, r);
    }

    /// A bad frame arrived: this session closes with the error's code; no other is touched.
    pub fn handle_wire_error(&mut self, now: Millis, error: &WireError) {
        let _g = self.span.clone().entered();
        warn!(%error, code = error.code(), "bad frame from device");
        self.close(now, error.close_code(), &error.to_string());
    }

    /// The hub's data changed in `tables` (another session's push, a server-side edit; empty:
    /// any table): live feeds of those tables look for changes in the device's set.
    pub fn handle_changes(&mut self, now: Millis, tables: &[String], storage: &mut dyn HubStorage) {
        let _g = self.span.clone().entered();
        if self.state != HubState::Ready {
            return;
        }
        for (table, feed) in self.feeds.iter_mut() {
            if feed.live && (tables.is_empty() || tables.contains(table)) {
                feed.dirty = true;
            }
        }
        let r = self.pump(now, storage);
        self.settle(now, r);
    }

    /// A timer armed from [`poll_timeout`](Self::poll_timeout) fired.
    pub fn handle_timeout(&mut self, now: Millis) {
        let _g = self.span.clone().entered();
        match self.state {
            HubState::AwaitingHello if now >= self.opened_at + self.config.handshake_timeout => {
                self.close(now, CloseCode::HANDSHAKE_TIMEOUT, "no Hello")
            }
            HubState::Ready if now >= self.last_received + self.config.idle_timeout => {
                self.close(now, CloseCode::IDLE_TIMEOUT, "device silent")
            }
            _ => {}
        }
    }

    /// Ends the session (e.g. [`CloseCode::GOING_AWAY`] when the hub drains).
    pub fn close(&mut self, now: Millis, code: CloseCode, reason: &str) {
        let _ = now;
        if self.state == HubState::Closed {
            return;
        }
        let reason = truncate_text(reason, MAX_TEXT_LEN);
        info!(%code, %reason, "closing session");
        self.transmit.push_back(Message::Close(Close {
            code,
            reason: reason.clone(),
        }));
        self.state = HubState::Closed;
        self.events.push_back(HubEvent::Closed {
            code,
            reason,
            by_peer: false,
        });
    }

    /// The next message to send, in order.
    pub fn poll_transmit(&mut self, now: Millis) -> Option<Message> {
        let _ = now;
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        match self.state {
            HubState::AwaitingHello => Some(self.opened_at + self.config.handshake_timeout),
            HubState::Ready => Some(self.last_received + self.config.idle_timeout),
            HubState::Closed => None,
        }
    }

    fn settle(&mut self, now: Millis, r: Result<(), Fail>) {
        match r {
            Ok(()) => {}
            Err(Fail::Storage(error)) => {
                warn!(%error, "hub storage failed; closing session");
                self.close(now, CloseCode::STORAGE_FAILURE, "hub storage failure");
                self.events.push_back(HubEvent::StorageFailed { error });
            }
            Err(Fail::Violation(why)) => {
                warn!(%why, "device broke the protocol; closing session");
                self.close(now, CloseCode::PROTOCOL_VIOLATION, &why);
            }
        }
    }

    fn dispatch(
        &mut self,
        now: Millis,
        msg: Message,
        storage: &mut dyn HubStorage,
    ) -> Result<(), Fail> {
        match (self.state, msg) {
            (_, Message::Close(c)) => {
                info!(code = %c.code, reason = %c.reason, "device closed the session");
                self.state = HubState::Closed;
                self.events.push_back(HubEvent::Closed {
                    code: c.code,
                    reason: c.reason,
                    by_peer: true,
                });
                Ok(())
            }
            (HubState::AwaitingHello, Message::Hello(h)) => self.on_hello(h, storage),
            (HubState::Ready, Message::Hello(_)) => {
                debug!("repeated Hello ignored");
                Ok(())
            }
            (HubState::Ready, Message::Ping(p)) => {
                self.transmit
                    .push_back(Message::Pong(Pong { nonce: p.nonce }));
                Ok(())
            }
            (HubState::Ready, Message::Pong(_)) => Ok(()),
            (HubState::Ready, Message::Push(p)) => self.on_push(now, p, storage),
            (HubState::Ready, Message::Pull(p)) => self.on_pull(now, p.tables, false, storage),
            (HubState::Ready, Message::Subscribe(s)) => self.on_pull(now, s.tables, true, storage),
            (HubState::Ready, Message::PullAck(a)) => {
                if let Some(feed) = self.feeds.get_mut(&a.table) {
                    // The device holds everything up to its cursor: every batch that ends there
                    // or before is done, whether it applied it, an ack was lost, or it ignored
                    // the batch as stale (it then acks its own cursor). Waiting for an exact
                    // match kept such batches in the window until the device's request timeout.
                    let before = feed.outstanding.len();
                    feed.outstanding.retain(|c| *c > a.cursor);
                    if feed.outstanding.len() == before {
                        debug!(table = %a.table, "PullAck for no outstanding batch ignored");
                    }
                }
                self.pump(now, storage)
            }
            (HubState::Ready, Message::BlobRequest(r)) => self.on_blob_request(r, storage),
            (HubState::Ready, Message::BlobPut(p)) => self.on_blob_put(now, p, storage),
            (_, other) => Err(Fail::Violation(format!(
                "unexpected {} from the device",
                other.name()
            ))),
        }
    }

    fn on_hello(&mut self, h: Hello, storage: &mut dyn HubStorage) -> Result<(), Fail> {
        self.span
            .record("device", tracing::field::display(h.device));
        let version = h
            .protocol_versions
            .iter()
            .filter(|v| self.config.protocol_versions.contains(v))
            .max()
            .copied();
        let Some(version) = version else {
            let message = format!(
                "no common protocol version: device offers {:?}, hub speaks {:?}",
                h.protocol_versions, self.config.protocol_versions
            );
            self.refuse(CloseCode::UNSUPPORTED_VERSION, message);
            return Ok(());
        };
        match storage.authenticate(h.device, &h.token, &h.app)? {
            Ok(principal) => {
                info!(user = %principal.user, app = %principal.app, version, "device authenticated");
                self.transmit.push_back(Message::Welcome(Welcome {
                    protocol_version: version,
                    hub: self.config.hub,
                    user: principal.user,
                    idle_timeout_ms: self.config.idle_timeout.0,
                }));
                self.state = HubState::Ready;
                self.events.push_back(HubEvent::Authenticated {
                    principal: principal.clone(),
                });
                self.principal = Some(principal);
            }
            Err(refusal) => self.refuse(refusal.code, refusal.message),
        }
        Ok(())
    }

    /// Refuses a device before its handshake because the hub is at a connection limit; the
    /// device retries no sooner than `retry_after`.
    pub fn refuse_busy(&mut self, now: Millis, retry_after: Millis) {
        let _ = now;
        let _g = self.span.clone().entered();
        if self.state == HubState::AwaitingHello {
            self.refuse_with(CloseCode::BUSY, "hub busy".into(), Some(retry_after));
        }
    }

    fn refuse(&mut self, code: CloseCode, message: String) {
        self.refuse_with(code, message, None);
    }

    fn refuse_with(&mut self, code: CloseCode, message: String, retry_after: Option<Millis>) {
        info!(%code, %message, "refusing device");
        self.transmit.push_back(Message::Refused(Refused {
            code,
            message: truncate_text(&message, MAX_TEXT_LEN),
            retry_after_ms: retry_after.map(|m| m.0),
        }));
        self.state = HubState::Closed;
        self.events.push_back(HubEvent::Refused { code });
    }

    fn on_push(&mut self, now: Millis, p: Push, storage: &mut dyn HubStorage) -> Result<(), Fail> {
        let Some(who) = &self.principal else {
            return Err(Fail::Violation("push before authentication".into()));
        };
        if p.up_to_seq < p.after_seq {
            return Err(Fail::Violation("push range runs backwards".into()));
        }
        let mut prev = p.after_seq;
        for op in &p.ops {
            if op.seq <= prev || op.seq > p.up_to_seq {
                return Err(Fail::Violation(format!(
                    "push op seq {} out of order or outside ({}, {}]",
                    op.seq, p.after_seq, p.up_to_seq
                )));
            }
            prev = op.seq;
        }
        let mut rejected = Vec::new();
        let mut copies = Vec::new();
        let mut tables = BTreeSet::new();
        let mut accepted = 0usize;
        for op in &p.ops {
            let policy = self.config.conflicts.for_table(&op.table);
            match storage.apply_push(now, who, policy, op)? {
                PushOutcome::Accepted => {
                    accepted += 1;
                    tables.insert(op.table.clone());
                }
                PushOutcome::Rejected {
                    operation,
                    kind,
                    message,
                    authoritative,
                } => {
                    debug!(seq = op.seq, table = %op.table, ?kind, "op rejected");
                    rejected.push(Rejection {
                        seq: op.seq,
                        table: op.table.clone(),
                        row: op.row,
                        operation,
                        kind,
                        message: truncate_text(&message, MAX_TEXT_LEN / 4),
                        authoritative: None,
                    });
                    copies.push(authoritative);
                }
            }
        }
        // The device rolls a row back to the copy of its last rejection in the batch: only
        // that one is sent. A copy past the budget is not, and the hub hears so.
        let mut budget = AUTHORITATIVE_BYTES_MAX;
        for i in 0..rejected.len() {
            let Some(doc) = copies.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let (table, row) = (rejected[i].table.clone(), rejected[i].row);
            let last_of_row = !rejected[i + 1..]
                .iter()
                .any(|r| r.row == row && r.table == table);
            if !last_of_row {
                continue;
            }
            if doc.len() <= budget {
                budget -= doc.len();
                rejected[i].authoritative = Some(RowDoc { row, doc });
            } else {
                storage.row_copy_withheld(who, &table, row)?;
            }
        }
        debug!(
            after = p.after_seq,
            up_to = p.up_to_seq,
            accepted,
            rejected = rejected.len(),
            "push processed"
        );
        self.events.push_back(HubEvent::OpsApplied {
            accepted,
            rejected: rejected.len(),
            tables: tables.into_iter().collect(),
        });
        self.transmit.push_back(Message::PushAck(PushAck {
            after_seq: p.after_seq,
            up_to_seq: p.up_to_seq,
            rejected,
        }));
        Ok(())
    }

    fn on_pull(
        &mut self,
        now: Millis,
        tables: Vec<TableCursor>,
        live: bool,
        storage: &mut dyn HubStorage,
    ) -> Result<(), Fail> {
        for t in tables {
            if !self.feeds.contains_key(&t.table) && self.feeds.len() >= MAX_TRACKED_TABLES {
                return Err(Fail::Violation("too many tables".into()));
            }
            let feed = self.feeds.entry(t.table).or_default();
            feed.cursor = t.cursor;
            feed.scanned = t.cursor;
            feed.outstanding.clear();
            feed.requested = true;
            feed.live |= live;
        }
        self.pump(now, storage)
    }

    /// Sends the next batch of every feed that has no batch outstanding and something to send.
    fn pump(&mut self, now: Millis, storage: &mut dyn HubStorage) -> Result<(), Fail> {
        let _ = now;
        let Some(who) = &self.principal else {
            return Ok(());
        };
        let window = self.config.pull_window.max(1);
        for (table, feed) in self.feeds.iter_mut() {
            while feed.outstanding.len() < window && (feed.requested || (feed.live && feed.dirty)) {
                let read_from = feed.scanned.max(feed.cursor);
                let chunk = storage.pull(who, table, read_from, self.config.pull_limits)?;
                if chunk.restart {
                    // The device's cursor is not a position of this hub's feed (it was fed
                    // from a log this store lost part of): tell it to start over, and go
                    // on from the beginning in the same window (the device applies batches in
                    // order, so the next one finds its cursor already moved back).
                    // Storage logged it (once per device and table).
                    debug!(%table, cursor = read_from.0, "restarting the device's feed");
                    let restart = Cursor::default();
                    self.transmit.push_back(Message::PullBatch(PullBatch {
                        table: table.clone(),
                        from: feed.cursor,
                        cursor: restart,
                        ops: Vec::new(),
                        entering: Vec::new(),
                        leaving: Vec::new(),
                        more: true,
                    }));
                    feed.outstanding.push_back(restart);
                    feed.cursor = restart;
                    feed.scanned = restart;
                    feed.requested = true;
                    continue;
                }
                let items = chunk.ops.len() + chunk.entering.len() + chunk.leaving.len();
                if chunk.cursor < read_from {
                    return Err(Fail::Storage(StorageError::Corrupt(format!(
                        "feed of `{table}` broke its contract: cursor {} -> {}",
                        read_from.0, chunk.cursor.0
                    ))));
                }
                feed.dirty = false;
                if !feed.requested && chunk.is_empty() && !chunk.more {
                    // Nothing for the device up to `chunk.cursor`: the next read starts there.
                    // The next batch still starts at the device's cursor, and covers this span
                    // as the empty batch the hub did not send would have.
                    debug!(%table, scanned = chunk.cursor.0, "live feed: nothing new for the device");
                    feed.scanned = chunk.cursor;
                    break;
                }
                let (cursor, more) = (chunk.cursor, chunk.more);
                let parts = split_chunk(chunk);
                let last = parts.len().saturating_sub(1);
                for (i, part) in parts.into_iter().enumerate() {
                    // Every part but the last leaves the device's cursor where it is: a
                    // device cut off between parts pulls the whole seq again (applying is
                    // idempotent), as the cursor cannot stand inside a seq.
                    let (part_cursor, part_more) = if i == last {
                        (cursor, more)
                    } else {
                        (feed.cursor, true)
                    };
                    self.transmit.push_back(Message::PullBatch(PullBatch {
                        table: table.clone(),
                        from: feed.cursor,
                        cursor: part_cursor,
                        ops: part.ops,
                        entering: part.entering,
                        leaving: part.leaving,
                        more: part_more,
                    }));
                    feed.outstanding.push_back(part_cursor);
                }
                self.events.push_back(HubEvent::BatchSent {
                    table: table.clone(),
                    cursor,
                    items,
                });
                feed.cursor = cursor;
                feed.scanned = cursor;
                feed.requested = more;
                // A live feed that just caught up stays quiet until the hub changes again.
                if !more {
                    break;
                }
            }
        }
        Ok(())
    }

    fn on_blob_request(
        &mut self,
        r: BlobRequest,
        storage: &mut dyn HubStorage,
    ) -> Result<(), Fail> {
        let Some(who) = &self.principal else {
            return Err(Fail::Violation("blob request before authentication".into()));
        };
        let max_len = (r.max_len as usize).min(BLOB_CHUNK_MAX);
        let reply = match storage.blob_chunk(who, &r.sha256, r.offset, max_len)? {
            Some(mut slice) => {
                slice.data.truncate(max_len);
                BlobChunk {
                    sha256: r.sha256,
                    found: true,
                    offset: r.offset,
                    total: slice.total,
                    data: slice.data,
                }
            }
            None => BlobChunk {
                sha256: r.sha256,
                found: false,
                offset: r.offset,
                total: 0,
                data: Vec::new(),
            },
        };
        self.transmit.push_back(Message::BlobChunk(reply));
        Ok(())
    }

    fn on_blob_put(
        &mut self,
        now: Millis,
        p: BlobPut,
        storage: &mut dyn HubStorage,
    ) -> Result<(), Fail> {
        let Some(who) = &self.principal else {
            return Err(Fail::Violation("blob upload before authentication".into()));
        };
        let status = if p.total > BLOB_UPLOAD_MAX {
            BlobPutStatus::Refused {
                message: format!(
                    "{} bytes is over the {BLOB_UPLOAD_MAX}-byte upload limit",
                    p.total
                ),
            }
        } else {
            match storage.put_blob_chunk(now, who, &p.sha256, p.offset, p.total, &p.data)? {
                UploadOutcome::Continue(progress) => BlobPutStatus::Continue { progress },
                UploadOutcome::Complete => {
                    self.events
                        .push_back(HubEvent::BlobStored { sha256: p.sha256 });
                    BlobPutStatus::Complete
                }
                UploadOutcome::Refused(message) => BlobPutStatus::Refused {
                    message: truncate_text(&message, MAX_TEXT_LEN),
                },
            }
        };
        debug!(offset = p.offset, total = p.total, ?status, "blob upload");
        self.transmit.push_back(Message::BlobPutAck(BlobPutAck {
            sha256: p.sha256,
            offset: p.offset,
            status,
        }));
        Ok(())
    }
}

/// `chunk` as batches the wire takes: at most [`PULL_BATCH_ITEMS_MAX`] items and, past the
/// first item, [`PULL_BATCH_BYTES_MAX`] bytes each. Storage cuts batches between seqs only,
/// so the items of one seq (a role change bringing thousands of rows into a set at once)
/// can make one chunk more than a batch.
fn split_chunk(chunk: PullChunk) -> Vec<PullChunk> {
    let items = chunk.ops.len() + chunk.entering.len() + chunk.leaving.len();
    let bytes = chunk.ops.iter().map(|o| o.change.len()).sum::<usize>()
        + chunk.entering.iter().map(|r| r.doc.len()).sum::<usize>()
        + chunk.leaving.len() * LEAVING_BYTES;
    if items <= PULL_BATCH_ITEMS_MAX && bytes <= PULL_BATCH_BYTES_MAX {
        return vec![chunk];
    }
    let mut parts = Parts::default();
    // Ops first, then rows entering, then rows leaving: the order a device applies a batch in.
    for op in chunk.ops {
        parts.room(op.change.len()).ops.push(op);
    }
    for row in chunk.entering {
        parts.room(row.doc.len()).entering.push(row);
    }
    for row in chunk.leaving {
        parts.room(LEAVING_BYTES).leaving.push(row);
    }
    parts.done.push(parts.part);
    parts.done
}

/// What a row leaving a batch weighs (its id).
const LEAVING_BYTES: usize = 16;

/// The batches [`split_chunk`] has made, and the one it fills with its items and bytes.
#[derive(Default)]
struct Parts {
    done: Vec<PullChunk>,
    part: PullChunk,
    items: usize,
    bytes: usize,
}

impl Parts {
    /// The batch an item of `size` bytes goes in: a new one past either limit.
    fn room(&mut self, size: usize) -> &mut PullChunk {
        if self.items > 0
            && (self.items >= PULL_BATCH_ITEMS_MAX || self.bytes + size > PULL_BATCH_BYTES_MAX)
        {
            self.done.push(std::mem::take(&mut self.part));
            self.items = 0;
            self.bytes = 0;
        }
        self.items += 1;
        self.bytes += size;
        &mut self.part
    }
}
