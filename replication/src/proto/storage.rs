//! What the sessions need from storage: [`DeviceStorage`] on a device, [`HubStorage`] on a hub.
//!
//! The sessions know nothing of sled or automerge. The store implements these traits (rows as
//! automerge documents, the event log in sled); the tests implement them over `BTreeMap`s.
//! Every method that changes state must be durable when it returns: the session acknowledges
//! what it stored right after the call.

use uuid::Uuid;

use fieldsync_store::RowId;

use super::hub::ConflictPolicy;
use super::messages::{
    CloseCode, Cursor, DeviceId, Operation, PushOp, Rejection, RejectionKind, RowChange, RowDoc,
};
use super::time::Millis;

/// Storage failed; the session closes with [`CloseCode::STORAGE_FAILURE`] and is retried later
/// (except [`StorageError::BlobMismatch`], which the session handles and goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A failure that may pass (I/O error, lock contention); the sync is retried later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The stored data is damaged; retrying will not help until it is repaired.
    #[error("storage corrupt: {0}")]
    Corrupt(String),
    /// A downloaded blob, once complete, does not match its hash: storage dropped what was
    /// downloaded and still wants the blob (a later connection downloads it again).
    #[error("a downloaded blob does not match its hash")]
    BlobMismatch,
}

/// Upper bounds for one batch read from storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most items (ops, rows entering, rows leaving) in the batch.
    pub max_items: usize,
    /// Bytes of change and row data after which the batch is cut (at least one item is always
    /// returned, however large).
    pub max_bytes: usize,
}

/// One sync error as a device records it: the user lists these, and retries or discards them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncErrorRecord {
    /// When the device learned of it.
    pub at: Millis,
    /// The op's local sequence number.
    pub seq: u64,
    /// The table.
    pub table: String,
    /// The row.
    pub row: RowId,
    /// What the op tried to do.
    pub operation: Operation,
    /// The op's data (the change bytes), for a retry.
    pub op_data: Vec<u8>,
    /// Conflict, row not found, permission or validation.
    pub kind: RejectionKind,
    /// The hub's message.
    pub message: String,
}

impl SyncErrorRecord {
    /// The record for a rejection of `op`.
    pub fn new(at: Millis, rejection: &Rejection, op: &PushOp) -> SyncErrorRecord {
        SyncErrorRecord {
            at,
            seq: rejection.seq,
            table: rejection.table.clone(),
            row: rejection.row,
            operation: rejection.operation,
            op_data: op.change.clone(),
            kind: rejection.kind,
            message: rejection.message.clone(),
        }
    }
}

/// A device's side of sync: its local op log, its pulled rows, its cursors.
///
/// Crash safety comes from the order the session calls these in and from idempotence: a pulled
/// batch is applied (`apply_ops`, `import_rows`, `evict_rows`) before its cursor is stored
/// (`set_cursor`), so a crash in between re-pulls the batch, and applying it again changes
/// nothing.
pub trait DeviceStorage {
    /// Highest local sequence number the hub has acknowledged (0: none).
    fn acked_seq(&self) -> Result<u64, StorageError>;

    /// Highest sequence number of an op made on this device (not pulled from the hub).
    fn last_local_seq(&self) -> Result<u64, StorageError>;

    /// The device's own ops with sequence numbers above `after_seq`, oldest first, within
    /// `limits` (at least one if there is one). Ops pulled from the hub are never returned.
    fn pending_ops(&self, after_seq: u64, limits: BatchLimits)
        -> Result<Vec<PushOp>, StorageError>;

    /// The hub processed every local op up to `up_to_seq`; `rejected` lists the ones it refused.
    ///
    /// In one durable step: record a [`SyncErrorRecord`] per rejection and roll its op back
    /// (import the authoritative row if there is one), mark the prefix acknowledged (it may
    /// then be compacted), and carry out evictions that waited for these ops.
    fn record_ack(
        &mut self,
        now: Millis,
        up_to_seq: u64,
        rejected: &[Rejection],
    ) -> Result<(), StorageError>;

    /// Applies changes pulled from the hub; a change already applied is skipped.
    fn apply_ops(&mut self, table: &str, ops: &[RowChange]) -> Result<(), StorageError>;

    /// Imports rows entering the device's set, merging with any copy already held; an
    /// eviction waiting for the row (see `evict_rows`) is cancelled.
    fn import_rows(&mut self, table: &str, rows: &[RowDoc]) -> Result<(), StorageError>;

    /// Evicts rows that left the device's set; a row with unacknowledged local ops is evicted
    /// only once `record_ack` covers them. Evicting an absent row is a no-op.
    fn evict_rows(&mut self, table: &str, rows: &[RowId]) -> Result<(), StorageError>;

    /// The device's cursor for a table ([`Cursor::default`] if it never pulled it).
    fn cursor(&self, table: &str) -> Result<Cursor, StorageError>;

    /// Stores a table's cursor durably, and with it everything the batch applied before it
    /// (the pulled batch's one flush); `synced_at` is set when the pull reached the end of
    /// the feed (the table's "last sync").
    fn set_cursor(
        &mut self,
        table: &str,
        cursor: Cursor,
        synced_at: Option<Millis>,
    ) -> Result<(), StorageError>;

    /// Sets a table's cursor back to `cursor`, durably: the hub's feed restarted (see
    /// [`PullChunk::restart`]). The only way a cursor moves backwards; the last sync is kept.
    fn restart_cursor(&mut self, table: &str, cursor: Cursor) -> Result<(), StorageError>;

    /// When the table last finished a pull.
    fn last_sync(&self, table: &str) -> Result<Option<Millis>, StorageError>;

    /// How many leading bytes of a blob are stored (a download resumes from there).
    fn blob_progress(&self, sha256: &[u8; 32]) -> Result<u64, StorageError>;

    /// Stores the bytes of a blob at `offset` (the current progress); `total` is its size.
    /// When the last chunk completes content that does not match `sha256`, drops everything
    /// downloaded of it (progress back to 0), keeps it among the blobs to fetch, and returns
    /// [`StorageError::BlobMismatch`].
    fn write_blob_chunk(
        &mut self,
        sha256: &[u8; 32],
        offset: u64,
        data: &[u8],
        total: u64,
    ) -> Result<(), StorageError>;

    /// Blobs referenced by rows the device holds, in columns its profile downloads, that it
    /// does not have yet (a download is started for each on connecting and at the end of each
    /// table's pull).
    fn blobs_to_fetch(&self) -> Result<Vec<[u8; 32]>, StorageError>;

    /// Blobs the device attached in ops the hub has accepted, that the hub does not hold yet
    /// (uploaded in that order).
    fn blobs_to_upload(&self) -> Result<Vec<[u8; 32]>, StorageError>;

    /// Up to `max_len` bytes of a stored blob from `offset`, if the device has it whole.
    fn read_blob_range(
        &self,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError>;

    /// The hub holds the blob (`true`) or refused it for good (`false`): it leaves the upload
    /// queue either way.
    fn record_upload(&mut self, sha256: &[u8; 32], stored: bool) -> Result<(), StorageError>;
}

/// What a hub did with a piece of an uploaded blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// The hub holds this many leading bytes.
    Continue(u64),
    /// The hub holds the whole content, hash checked.
    Complete,
    /// Not taken; for people.
    Refused(String),
}

/// Who a hub session acts for, once the device's token checked out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The device.
    pub device: DeviceId,
    /// The user it acts for (privileges and the offline profile are the user's).
    pub user: Uuid,
    /// The app, which selects the offline profile.
    pub app: String,
}

/// Why the hub refuses a device (an expected outcome, not a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code sent in `Refused`.
    pub code: CloseCode,
    /// For people.
    pub message: String,
}

/// What the hub's authority decided about one pushed op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Checked and applied durably (or already held: a duplicate is accepted again).
    Accepted,
    /// Refused; nothing was applied.
    Rejected {
        /// What the op tried to do.
        operation: Operation,
        /// Why it was refused.
        kind: RejectionKind,
        /// For people.
        message: String,
        /// The hub's row, only if the principal may read it.
        authoritative: Option<Vec<u8>>,
    },
}

/// Changes to one table of a device's set, read from the hub's feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullChunk {
    /// Changes to rows in the set at the start cursor and at `cursor`.
    pub ops: Vec<RowChange>,
    /// Rows in the set at `cursor` but not at the start, whole (as of `cursor`).
    pub entering: Vec<RowDoc>,
    /// Rows not in the set at `cursor` that the device may hold: in the set at the start, or
    /// written by the device itself in this range (it holds what it created even if the row
    /// left its set before the feed told it the row was there). Never other rows: their ids
    /// would leak.
    pub leaving: Vec<RowId>,
    /// Where this chunk ends (never before the start cursor).
    pub cursor: Cursor,
    /// Whether the feed goes on after `cursor`.
    pub more: bool,
    /// The start cursor is not a position of the hub's feed (past its end, or it names an
    /// entry the log does not hold there): the hub's store is not the one the device was fed
    /// from (restored from a backup, maybe written again since), or the cursor was forged. The
    /// chunk holds nothing else; the device starts the table over from the beginning.
    pub restart: bool,
}

impl PullChunk {
    /// Whether the chunk carries nothing for the device.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.entering.is_empty() && self.leaving.is_empty()
    }
}

/// A piece of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSlice {
    /// Size of the whole blob.
    pub total: u64,
    /// The bytes from the requested offset.
    pub data: Vec<u8>,
}

/// A hub's side of sync: authentication, the authority that checks and applies pushed ops, and
/// the per-device change feed.
///
/// Privilege checks (create only where the user may create, write only rows the user may
/// write, a lookup only to a row the user may append to) and the row-set rules happen behind
/// this trait. Nested results separate failures (outer) from expected outcomes (inner).
pub trait HubStorage {
    /// Checks a device's token for the app; the principal the session then acts for.
    fn authenticate(
        &mut self,
        device: DeviceId,
        token: &[u8],
        app: &str,
    ) -> Result<Result<Principal, Refusal>, StorageError>;

    /// Checks one pushed op against the principal's privileges and row set and, if allowed,
    /// applies it durably, resolving conflicts by `policy` (the resolution is itself an op).
    ///
    /// An op the hub already decided must get the same answer again, durably: `Accepted` if
    /// it holds the op (without checking it again), the same rejection if it refused it (its authoritative row may be newer). A push
    /// re-sent after a lost acknowledgement is judged against a hub that has moved on (a later
    /// op of the same push may have created the row), and a flipped answer would leave the
    /// device with a sync error for an op the hub holds, or the reverse.
    fn apply_push(
        &mut self,
        now: Millis,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
    ) -> Result<PushOutcome, StorageError>;

    /// The hub's row that came with a rejection of an op on `row` was not sent after all (the
    /// acknowledgement had no room left for it): the device drops its copy of the row, and
    /// the hub must no longer count it as held there.
    fn row_copy_withheld(
        &mut self,
        who: &Principal,
        table: &str,
        row: RowId,
    ) -> Result<(), StorageError>;

    /// The changes to `table` in the principal's set after `after`, within `limits`.
    ///
    /// Any cursor a device sends must be handled, forged ones included: a table outside the
    /// principal's profile yields an empty chunk, and nothing outside the set is ever returned.
    fn pull(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError>;

    /// Bytes of a blob from `offset`, if it exists and a row the principal may read refers to
    /// it.
    fn blob_chunk(
        &mut self,
        who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError>;

    /// Takes a piece of a blob the principal's device attached (in an op the hub accepted, or
    /// named by a row of its set), if it starts where this device's upload ends and `total`
    /// is the size the op or row gives. `Continue` need not be durable (a lost piece is sent
    /// again); the last piece completes the blob, kept only if its bytes match the hash, and
    /// `Complete` is durable.
    fn put_blob_chunk(
        &mut self,
        now: Millis,
        who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<UploadOutcome, StorageError>;
}
