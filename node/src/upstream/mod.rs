//! The hub's upstream bridge to Dataverse (issue 5, item 1).
//!
//! - **Pull** ([`pull`]): per offline table, change tracking (`Prefer: odata.track-changes`),
//!   pages followed by `@odata.nextLink`, the `@odata.deltaLink` kept per table. Rows Dataverse
//!   changed become ops of the fixed [`DATAVERSE_ACTOR`] applied to the hub store and routed to
//!   devices like a pushed op; `$deletedEntity` becomes a tombstone; an expired token
//!   (`0x80044352`) triggers a full re-read that reconciles.
//! - **Push** ([`push`]): a cursor over the hub's log is the durable outbound queue; it moves
//!   only after Dataverse acknowledged every row up to it. Ops of the Dataverse actor are not
//!   echoed back. Writes go in `$batch` change sets; a failed change set is retried one request
//!   each, where `412` re-reads the row, merges it and writes again.
//!   Before each create or update the values sent are saved as a write intent: if the reply is
//!   lost, the row's next read takes what Dataverse holds of them as the hub's own write. A
//!   `4xx` reply drops the intent (nothing was applied), and each push round starts by reading
//!   the rows whose intents are left — after pulling the tables that hold a lost create, so a
//!   create deleted in Dataverse since is not made again. A row that cannot be settled
//!   now — its read fails (a `5xx`, a row past `response_bytes_max`), or its table's changes
//!   (needed to settle a lost create) cannot be pulled — is held back while the others go on: it keeps its intent and
//!   gets a durable "still to be written" mark (`rs/`, [`state::Resend`]) before the cursor
//!   moves past its changes. Only the push touches that mark (a pull that reads the row
//!   settles its intent, not the mark), and a mark is cleared only once the row's write and
//!   files went through or Dataverse refused it for good. Marked rows go with the round's
//!   first batch (their lookups ordered and relinked like the others'). A held row is never
//!   dropped: after [`state::INTENT_READ_ATTEMPTS_MAX`] failed rounds its tries back off
//!   (doubling from `file_retry_ms` to `file_retry_max_ms`). Reads end a round only on a
//!   failure of the whole round ([`UpstreamError::is_round_wide`]: no connection, no reply,
//!   credentials, throttling); a write's `5xx` or conflicts without end still end it (known
//!   limit: a row whose write always fails stops the push until it is fixed upstream).
//!
//!   Known limit: a held row's write intent is kept while it is held, so until the row is read
//!   an office change holding a value the hub once sent is taken for the hub's write.
//! - **Files** ([`files`]): downloaded in ranges into a temporary file written off the async
//!   workers. A download that fails leaves the column as the hub had it, records the row as a
//!   pending download and lets the rest of the page (and the delta link) go on; each pull of
//!   the table retries the due ones with a doubling wait (`file_retry_ms` up to
//!   `file_retry_max_ms`; a new file id starts its own count), dropping them only when their
//!   table is no longer relayed (its delta link goes too: relaying it again starts with a full
//!   read). Only a download whose first range finds no connection (Dataverse away) stops the
//!   round: the page is not applied and is read again — for one file at most
//!   [`files::ROUND_STOPS_PER_FILE_MAX`] rounds (counted in memory), then it is an ordinary
//!   pending download. A reset or a timeout once connected, or any failure on a later range,
//!   is the file's. While a column's download is pending, a device's file for it is not sent
//!   (Dataverse's newer file wins): warned and counted (`uploads_held`).
//! - **State** ([`state`]): in the hub store's auxiliary space, never in `store`'s row data.
//!
//! A pulled row is merged three ways: the columns whose upstream value differs from the
//! row's base (what Dataverse had when the hub last saw it) are the ones Dataverse changed, and
//! only those are written. Writes are made by a scratch in-memory store whose actor is
//! [`DATAVERSE_ACTOR`] after it imported the hub's current document of the row, so the change
//! is causally after everything the hub knows and the hub applies it as a remote op.

pub mod auth;
pub mod client;
pub mod config;
pub mod files;
pub mod map;
pub mod pull;
pub mod push;
pub mod state;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fieldsync_replication::replica::{FeedChanges, HubReplica, HubReplicaError};
use fieldsync_store::{
    ActorId, OpenError, RemoteOp, RowId, Schema, SchemaError, Store, StoreError, StoreOptions,
    Value, WriteError,
};
use tokio::sync::Notify;
use tracing::{info, warn};

pub use client::DataverseClient;
pub use config::{AuthConfig, SecretSource, UpstreamConfig};

/// The actor of every change that came from Dataverse: the hub refuses it from devices.
pub const DATAVERSE_ACTOR: ActorId = fieldsync_replication::replica::UPSTREAM_ACTOR;

/// What can go wrong talking to Dataverse or applying what it says.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection to Dataverse could be made (refused, timed out, no such host): it is
    /// away, so the round stops. The request never left: nothing was applied.
    #[error("Dataverse cannot be reached: {0}")]
    NoConnection(String),
    /// A connection was made but no whole reply came (reset, closed, timed out): a write's
    /// outcome is unknown, a page read stops the round; in a file download it is the file's
    /// failure ([`UpstreamError::DownloadCut`]).
    #[error("Dataverse is unreachable: {0}")]
    Unreachable(String),
    /// A file download failed on the wire after its first connection was made (reset, closed
    /// midway, a later range that found no connection): that file is tried again later, the
    /// round goes on.
    #[error("a file download was cut off: {0}")]
    DownloadCut(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("Dataverse answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("throttled: Dataverse asks to wait {retry_after:?}")]
    Throttled { retry_after: Duration },
    #[error("unexpected reply from Dataverse: {0}")]
    BadReply(String),
    /// A response body longer than the bridge reads (`response_bytes_max`, or what a file
    /// range asked for): reading stopped there.
    #[error("a response from Dataverse is longer than {limit} bytes (the limit is `response_bytes_max` in hub.toml's [upstream])")]
    ResponseTooLarge { limit: u64 },
    /// A file download whose bytes do not match the length Dataverse declared for it (its
    /// `x-ms-file-size`, or the range asked for): nothing is stored. `received` is what came
    /// from `at`; a server that sent more is cut at `expected + 1`.
    #[error("a file from Dataverse is not the length it declares: {expected} bytes expected from offset {at}, {received} received")]
    FileLength {
        at: u64,
        expected: u64,
        received: u64,
    },
    /// A file from Dataverse larger than its column's maximum in the hub's schema
    /// (`max_size_kb`): nothing is stored, the download stops at the first range that shows it.
    #[error("a file from Dataverse of {size} bytes is over its column's maximum of {max} (the schema's max_size_kb)")]
    FileTooLarge { size: u64, max: u64 },
    #[error("local I/O: {0}")]
    Io(String),
    #[error("cannot build the request: {0}")]
    BadRequest(String),
    #[error("bridge state: {0}")]
    State(String),
    #[error("hub store: {0}")]
    Store(#[from] StoreError),
    #[error("hub store: {0}")]
    Write(#[from] WriteError),
    #[error("schema: {0}")]
    Schema(#[from] SchemaError),
    #[error("scratch store: {0}")]
    Open(#[from] OpenError),
    #[error("hub: {0}")]
    Hub(#[from] HubReplicaError),
}

impl UpstreamError {
    /// Whether Dataverse refused this request for good (a 4xx other than 401, 408 and 429):
    /// sending it again gets the same answer. Anything else — the network, the token
    /// endpoint, a reply that did not parse, the hub's own store — may pass.
    pub fn is_refusal(&self) -> bool {
        matches!(self, UpstreamError::Api { status, .. }
            if (400..500).contains(status) && !matches!(status, 401 | 408 | 429))
    }

    /// Whether this failure is the whole round's, not one row's or one file's: Dataverse is away
    /// (no connection, no reply), refuses the credentials, or asks to wait past the limit.
    /// Every other request would fail the same way, so the round stops and backs off.
    pub fn is_round_wide(&self) -> bool {
        matches!(
            self,
            UpstreamError::NoConnection(_)
                | UpstreamError::Unreachable(_)
                | UpstreamError::Auth(_)
                | UpstreamError::Throttled { .. }
        )
    }

    /// Whether the hub's store refused what Dataverse holds (a value or a change too large for
    /// it) rather than failing: that row is skipped, not the round.
    pub fn is_hub_refusal(&self) -> bool {
        matches!(self, UpstreamError::Write(e) if !matches!(e, WriteError::Store(_)))
    }
}

/// Counters, for tests, benches and operators.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Rows pulled whose changes were applied to the hub.
    pub rows_pulled: AtomicU64,
    /// Rows deleted in the hub because Dataverse deleted them.
    pub rows_deleted: AtomicU64,
    /// Rows written to Dataverse (creates, updates, deletes).
    pub rows_pushed: AtomicU64,
    /// `412`s resolved by re-reading and merging.
    pub conflicts: AtomicU64,
    /// Change sets that failed and were retried one request each.
    pub failed_change_sets: AtomicU64,
    /// Rows Dataverse refused for good (logged; the queue moves on).
    pub refused: AtomicU64,
    /// Rows from Dataverse the hub could not take (a value its schema refuses, a malformed
    /// entry): logged and skipped, so one row does not stop its table's pull.
    pub rows_skipped: AtomicU64,
    /// File downloads from Dataverse that failed: their rows were applied, the files are
    /// tried again with back-off (`upstream` aux records `pd/`).
    pub downloads_failed: AtomicU64,
    /// Times a row was held back from a push (its write intent or conflict could not be read,
    /// or its table's changes could not be pulled): the row is marked to be
    /// written later (`rs/`), never dropped; the others go on.
    pub intents_unsettled: AtomicU64,
    /// A device's file not sent because Dataverse holds a newer file for that column that has
    /// not come down yet (Dataverse's wins; the device's is not sent later).
    pub uploads_held: AtomicU64,
    /// Writes whose reply did not come back (the connection failed, possibly after the
    /// request went out): the row's next read decides what Dataverse holds.
    pub replies_lost: AtomicU64,
    /// A gauge: rows whose files from Dataverse did not come down yet (`pd/`), as counted when
    /// the bridge started and at the end of each pull (so a metrics scrape reads no record).
    pub pending_download_rows: AtomicU64,
    /// Full re-reads after an expired change-tracking token.
    pub full_reads: AtomicU64,
    /// Rounds that failed (upstream down, throttled past the limit).
    pub failed_rounds: AtomicU64,
}

/// Told which tables rows pulled from Dataverse changed (the hub wakes device sessions).
pub type ChangeHook = Box<dyn Fn(&FeedChanges) + Send + Sync>;

/// The bridge between one hub and its upstream environment.
pub struct Bridge {
    pub(crate) client: DataverseClient,
    pub(crate) config: UpstreamConfig,
    pub(crate) replica: Arc<Mutex<HubReplica>>,
    on_change: ChangeHook,
    pub(crate) tables: Vec<String>,
    pub stats: Arc<BridgeStats>,
    /// Per Dataverse file id, rounds its download stopped (see
    /// [`files::ROUND_STOPS_PER_FILE_MAX`]); in memory: a restart starts the counts again.
    round_stops_by_file: Mutex<BTreeMap<String, u32>>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("config", &self.config)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock(r: &Mutex<HubReplica>) -> MutexGuard<'_, HubReplica> {
    // Same reasoning as the hub's sessions: the replica is durable per call.
    // The wait for a device session's storage work must not hold a runtime worker (the
    // guard stays on this thread: `block_in_place` runs in place).
    crate::off_worker(|| r.lock().unwrap_or_else(|p| p.into_inner()))
}

impl Bridge {
    /// A bridge for the hub's `replica`; `on_change` is told which tables pulled rows changed
    /// (the hub wakes its device sessions with it). Every offline table of the schema is
    /// relayed.
    pub fn new(
        config: UpstreamConfig,
        replica: Arc<Mutex<HubReplica>>,
        on_change: ChangeHook,
    ) -> Result<Bridge, UpstreamError> {
        let client = DataverseClient::new(&config)?;
        let (tables, pending): (Vec<String>, Vec<(String, RowId)>) = {
            let hub = lock(&replica);
            let store = hub.store();
            let tables = store
                .schema()
                .tables()
                .filter(|t| t.offline)
                .map(|t| t.name.clone())
                .collect();
            (tables, state::pending_download_rows(store)?)
        };
        let stats = BridgeStats::default();
        // The gauge reads what a restarted hub still waits for before its first pull ends.
        let waiting = pending.iter().filter(|(t, _)| tables.contains(t)).count();
        stats
            .pending_download_rows
            .store(waiting as u64, Ordering::Relaxed);
        Ok(Bridge {
            client,
            config,
            replica,
            on_change,
            tables,
            stats: Arc::new(stats),
            round_stops_by_file: Mutex::default(),
        })
    }

    /// The HTTP client (its counters count requests).
    pub fn client(&self) -> &DataverseClient {
        &self.client
    }

    /// One round: push what the hub owes Dataverse, then pull what changed there — also when
    /// the push failed (what Dataverse changed still reaches devices; the push's error is the
    /// round's).
    pub async fn sync_once(&self) -> Result<(), UpstreamError> {
        let pushed = self.push().await;
        let pulled = self.pull().await;
        match (pushed, pulled) {
            // Throttling says how long to wait: it wins over the push's error (logged here).
            (Err(e), Err(t @ UpstreamError::Throttled { .. })) => {
                warn!(error = %e, "upstream push failed");
                Err(t)
            }
            (pushed, pulled) => pushed.and(pulled),
        }
    }

    pub(crate) fn changed(&self, changes: &FeedChanges) {
        if !changes.is_empty() {
            (self.on_change)(changes);
        }
    }

    /// Runs rounds until dropped: after a success, waits for `wake` (a local change) or the
    /// poll interval; after a failure, backs off exponentially. Devices never wait on this.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>) {
        let mut backoff = Duration::from_millis(self.config.backoff_ms);
        let max = Duration::from_millis(self.config.backoff_max_ms);
        info!(url = %self.config.url, tables = self.tables.len(), "upstream bridge running");
        loop {
            match self.sync_once().await {
                Ok(()) => {
                    backoff = Duration::from_millis(self.config.backoff_ms);
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(self.config.poll_interval()) => {}
                    }
                }
                Err(e) => {
                    self.stats.failed_rounds.fetch_add(1, Ordering::Relaxed);
                    // Dataverse's wait, within the backoff's bounds: a huge Retry-After must
                    // not park the bridge for years.
                    let wait = match &e {
                        UpstreamError::Throttled { retry_after } => {
                            (*retry_after).max(backoff).min(max)
                        }
                        _ => backoff,
                    };
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "upstream round failed; the queue is kept");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}

/// Turns upstream facts into Dataverse-actor ops on the hub, one batch at a time.
pub(crate) struct Merger {
    schema: Schema,
    /// Made on the first row that needs writing: most pages change nothing.
    scratch: Option<Store>,
    ops: Vec<RemoteOp>,
}

/// What merging one upstream row decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Merged {
    /// Some columns were written.
    Written,
    /// Nothing to write (already known, or the hub's values already match).
    Unchanged,
    /// The hub deleted the row: it is not brought back.
    DeletedHere,
}

impl Merger {
    pub fn new(schema: &Schema) -> Result<Merger, UpstreamError> {
        Ok(Merger {
            schema: schema.clone(),
            scratch: None,
            ops: Vec::new(),
        })
    }

    /// The Dataverse actor's scratch store, with `table`/`id` loaded from the hub if it has
    /// the row (whether it has it is the second value).
    fn scratch_with(
        &mut self,
        hub: &Store,
        table: &str,
        id: RowId,
    ) -> Result<(Store, bool), UpstreamError> {
        let scratch = match &self.scratch {
            Some(s) => s.clone(),
            None => {
                let options = StoreOptions::default()
                    .with_actor(DATAVERSE_ACTOR)
                    .with_durability(fieldsync_store::Durability::Group);
                let s = Store::temporary(self.schema.clone(), options)?;
                self.scratch = Some(s.clone());
                s
            }
        };
        let exists = match hub.export_row(table, id)? {
            Some(doc) => {
                scratch.import_row(&doc, fieldsync_store::Durability::Group)?;
                true
            }
            None => false,
        };
        Ok((scratch, exists))
    }

    fn take_ops(&mut self, scratch: &Store, before: u64) -> Result<(), UpstreamError> {
        let entries = scratch.ops_since(before, usize::MAX)?;
        self.ops.extend(entries.iter().map(|e| e.to_remote()));
        Ok(())
    }

    /// Merges an upstream row: the columns that differ from `base` are Dataverse's changes;
    /// those that also differ from the hub's row are written, with `files` (downloaded file
    /// columns) in the same change.
    pub fn upsert(
        &mut self,
        hub: &Store,
        table: &str,
        id: RowId,
        upstream: &BTreeMap<String, Value>,
        base: Option<&BTreeMap<String, Value>>,
        files: &[(String, Value)],
    ) -> Result<Merged, UpstreamError> {
        let current = hub.get(table, id)?;
        if current.is_none() && hub.is_deleted(table, id)? {
            return Ok(Merged::DeletedHere);
        }
        let tab = hub.schema().table(table)?;
        let null = Value::Null;
        let mut writes: Vec<(&str, Value)> = Vec::new();
        for c in map::synced(tab) {
            let up = upstream.get(&c.name).unwrap_or(&null);
            let was = base.map(|b| b.get(&c.name).unwrap_or(&null));
            if was == Some(up) {
                continue; // Dataverse did not change this column
            }
            let here = current
                .as_ref()
                .map(|r| r.get(&c.name).clone())
                .unwrap_or(Value::Null);
            if &here != up {
                writes.push((c.name.as_str(), up.clone()));
            }
        }
        for (col, v) in files {
            let here = current.as_ref().map(|r| r.get(col)).unwrap_or(&null);
            if here != v {
                writes.push((col.as_str(), v.clone()));
            }
        }
        if writes.is_empty() {
            return Ok(Merged::Unchanged);
        }
        let (scratch, exists) = self.scratch_with(hub, table, id)?;
        let before = scratch.last_seq();
        let mut tx = scratch.begin();
        if exists {
            tx.update(table, id, &writes)?;
        } else {
            writes.retain(|(_, v)| !v.is_null());
            tx.insert_with_id(table, id, &writes)?;
        }
        tx.commit()?;
        self.take_ops(&scratch, before)?;
        Ok(Merged::Written)
    }

    /// Dataverse deleted the row: a tombstone from the Dataverse actor, if the hub has it.
    pub fn delete(&mut self, hub: &Store, table: &str, id: RowId) -> Result<bool, UpstreamError> {
        if hub.get(table, id)?.is_none() {
            return Ok(false);
        }
        let (scratch, _) = self.scratch_with(hub, table, id)?;
        let before = scratch.last_seq();
        let mut tx = scratch.begin();
        tx.delete(table, id)?;
        tx.commit()?;
        self.take_ops(&scratch, before)?;
        Ok(true)
    }

    /// Applies the collected ops to the hub (durably, routed to devices); returns what
    /// they touched.
    pub fn apply(&mut self, replica: &mut HubReplica) -> Result<FeedChanges, UpstreamError> {
        if self.ops.is_empty() {
            return Ok(FeedChanges::default());
        }
        let ops = std::mem::take(&mut self.ops);
        replica.apply_upstream(&ops)?;
        Ok(replica.take_changes())
    }
}
