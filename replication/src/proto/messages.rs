//! The messages a device and a hub exchange, and the limits every message is checked against.
//!
//! Each message travels in one frame (see [`crate::wire`]); the frame header names its kind, the
//! payload is the message body encoded with serde + bincode. Every batch is bounded so that a
//! few seconds of connectivity still make progress, and [`Message::validate`] checks the bounds
//! on both sides of the wire (before encoding, right after decoding).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use fieldsync_store::RowId;

use crate::wire::WireError;

/// The protocol versions this build speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];
/// The protocol version this build prefers (the newest it speaks).
pub const PROTOCOL_VERSION: u16 = 1;

/// Most protocol versions a `Hello` may offer.
pub const MAX_HELLO_VERSIONS: usize = 16;
/// Longest credential token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest table, app or client name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest human-readable message or close reason, in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// Most ops in one `Push` (a batch the builder fills up to [`PUSH_BATCH_BYTES_MAX`] first).
pub const PUSH_BATCH_OPS_MAX: usize = 256;
/// Payload bytes a device puts in one `Push` before it starts a new one (a soft target: one op
/// larger than this still travels alone).
pub const PUSH_BATCH_BYTES_MAX: usize = 128 * 1024;
/// Most ops plus rows entering plus rows leaving in one `PullBatch`.
pub const PULL_BATCH_ITEMS_MAX: usize = 512;
/// Payload bytes a hub puts in one `PullBatch` before it cuts the batch (soft, as for pushes).
pub const PULL_BATCH_BYTES_MAX: usize = 256 * 1024;
/// Most tables named by one `Pull` or `Subscribe`.
pub const MAX_TABLES_PER_REQUEST: usize = 256;
/// Longest single change or row document, in bytes: the store's limit on one local change.
pub const MAX_CHANGE_LEN: usize = fieldsync_store::MAX_CHANGE_BYTES;
/// Largest blob chunk, in bytes (files and images travel in chunks of at most this).
pub const BLOB_CHUNK_MAX: usize = 64 * 1024;
/// Largest file or image a device may upload, in bytes: Dataverse's default file column
/// limit (32 MB). The hub keeps an upload's pieces on disk until the last arrives, then hashes
/// and stores it; a column may allow more for files that come from Dataverse.
pub const BLOB_UPLOAD_MAX: u64 = 32 * 1024 * 1024;

/// The id of an enrolled device (a UUID made at enrollment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub Uuid);

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A position in the hub's change feed for one table, as one device sees it.
///
/// Opaque to the device, which only stores it and hands it back. Cursors only move forward,
/// except when the hub restarts a feed (a [`PullBatch`] whose `cursor` is before its `from`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Cursor(pub u64);

/// Why a session ended, as a stable number (unknown codes from newer peers are kept as is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// The work is done; nothing went wrong.
    pub const NORMAL: CloseCode = CloseCode(0);
    /// The peer sent a message that is not allowed at this point of the protocol.
    pub const PROTOCOL_VIOLATION: CloseCode = CloseCode(1);
    /// Nothing was received for longer than the idle timeout.
    pub const IDLE_TIMEOUT: CloseCode = CloseCode(2);
    /// The handshake did not finish in time.
    pub const HANDSHAKE_TIMEOUT: CloseCode = CloseCode(3);
    /// No protocol version in common.
    pub const UNSUPPORTED_VERSION: CloseCode = CloseCode(4);
    /// The token is unknown, forged or expired.
    pub const UNAUTHORIZED: CloseCode = CloseCode(5);
    /// The device's enrollment was revoked.
    pub const REVOKED: CloseCode = CloseCode(6);
    /// The hub is too busy; retry later.
    pub const BUSY: CloseCode = CloseCode(7);
    /// Local storage failed; the session ends and is retried later.
    pub const STORAGE_FAILURE: CloseCode = CloseCode(8);
    /// The hub is shutting down (drain); reconnect later.
    pub const GOING_AWAY: CloseCode = CloseCode(9);
    /// First code of the wire-error range: `WIRE_BASE + WireError::code()`.
    pub const WIRE_BASE: u16 = 100;

    /// Whether a device should stop reconnecting after this code (its credential is bad).
    pub fn is_fatal_for_device(self) -> bool {
        self == CloseCode::UNAUTHORIZED
            || self == CloseCode::REVOKED
            || self == CloseCode::UNSUPPORTED_VERSION
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match *self {
            CloseCode::NORMAL => "normal",
            CloseCode::PROTOCOL_VIOLATION => "protocol violation",
            CloseCode::IDLE_TIMEOUT => "idle timeout",
            CloseCode::HANDSHAKE_TIMEOUT => "handshake timeout",
            CloseCode::UNSUPPORTED_VERSION => "unsupported version",
            CloseCode::UNAUTHORIZED => "unauthorized",
            CloseCode::REVOKED => "revoked",
            CloseCode::BUSY => "busy",
            CloseCode::STORAGE_FAILURE => "storage failure",
            CloseCode::GOING_AWAY => "going away",
            CloseCode(c) if c >= CloseCode::WIRE_BASE => "wire error",
            _ => "unknown",
        };
        write!(f, "{} ({name})", self.0)
    }
}

/// The first message of a session, device to hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol versions the device speaks.
    pub protocol_versions: Vec<u16>,
    /// The enrolled device.
    pub device: DeviceId,
    /// The credential token the hub signed at enrollment.
    pub token: Vec<u8>,
    /// The app (and so the offline profile) the device syncs for.
    pub app: String,
    /// Client software name and version, for the hub's logs.
    pub client: String,
}

/// The hub accepts the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides speak from now on.
    pub protocol_version: u16,
    /// The hub's id.
    pub hub: Uuid,
    /// The user the device acts for.
    pub user: Uuid,
    /// The hub closes a session it heard nothing from for this long (ms).
    pub idle_timeout_ms: u64,
}

/// The hub refuses the session; it closes right after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Why.
    pub code: CloseCode,
    /// For people.
    pub message: String,
    /// When the hub would take the device back (ms from now), if it says.
    pub retry_after_ms: Option<u64>,
}

/// One local op a device pushes: one change to one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOp {
    /// The device's local sequence number of the op.
    pub seq: u64,
    /// The table.
    pub table: String,
    /// The row.
    pub row: RowId,
    /// The change, as the store encodes it (automerge change bytes).
    pub change: Vec<u8>,
}

/// A batch of the device's unacknowledged ops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    /// Every local op at or below this sequence number was in an earlier push.
    pub after_seq: u64,
    /// Every local op in `(after_seq, up_to_seq]` is in this batch.
    pub up_to_seq: u64,
    /// The ops, in increasing `seq`.
    pub ops: Vec<PushOp>,
}

/// What kind of write an op was, as the hub's authority saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// A new row.
    Create,
    /// A change to an existing row's columns.
    Write,
    /// A delete (tombstone).
    Delete,
    /// An owner change.
    Assign,
    /// A lookup set to point at another row.
    Append,
}

/// Why the hub rejected an op (the sync-error types of Power Apps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RejectionKind {
    /// The op conflicts with the hub's row under the table's conflict policy.
    Conflict,
    /// The row (or the row a lookup points at) does not exist on the hub.
    RowNotFound,
    /// The user lacks the privilege (create, write, append-to, ...) or the row is outside the set.
    Permission,
    /// The values break a rule of the schema or the business.
    Validation,
}

/// A whole row as the store exports it (automerge `save()` bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowDoc {
    /// The row.
    pub row: RowId,
    /// The exported document.
    pub doc: Vec<u8>,
}

/// One change to one row of the table a batch is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowChange {
    /// The row.
    pub row: RowId,
    /// The change bytes.
    pub change: Vec<u8>,
}

/// One op the hub did not accept; the device records a sync error and rolls back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The device's sequence number of the op.
    pub seq: u64,
    /// The table.
    pub table: String,
    /// The row.
    pub row: RowId,
    /// What the op tried to do.
    pub operation: Operation,
    /// Why it was refused.
    pub kind: RejectionKind,
    /// The hub's message, for people.
    pub message: String,
    /// The hub's row, for the device to roll back to; `None` when the row does not exist on the
    /// hub or the device may not read it.
    pub authoritative: Option<RowDoc>,
}

/// The hub processed (accepted or rejected, durably) every op of a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushAck {
    /// The `after_seq` of the push acknowledged.
    pub after_seq: u64,
    /// The `up_to_seq` of the push acknowledged.
    pub up_to_seq: u64,
    /// The ops the hub refused (every other op of the push was accepted).
    pub rejected: Vec<Rejection>,
}

/// A table and where the device stands in its feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCursor {
    /// The table.
    pub table: String,
    /// The device's cursor for it.
    pub cursor: Cursor,
}

/// Ask for the changes to these tables since the cursors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// The tables and cursors.
    pub tables: Vec<TableCursor>,
}

/// Like `Pull`, and keep sending as soon as a row of the device's set changes (live mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// The tables and cursors.
    pub tables: Vec<TableCursor>,
}

/// The changes to one table of the device's set between two cursors.
///
/// A batch whose `cursor` is before its `from` carries nothing and **restarts the feed**: the
/// device's cursor is not a position of the hub's feed (the hub's store was restored from an
/// older backup, maybe written again since), so the device sets its cursor back to `cursor`
/// and the hub sends the table again from there; rows arrive whole and merge into what the
/// device holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullBatch {
    /// The table.
    pub table: String,
    /// The cursor this batch continues from; a device applies it only if that is its cursor.
    pub from: Cursor,
    /// The cursor after this batch.
    pub cursor: Cursor,
    /// Changes to rows that were in the set and still are.
    pub ops: Vec<RowChange>,
    /// Rows that entered the set, whole.
    pub entering: Vec<RowDoc>,
    /// Rows that left the set, to evict once the device's own ops on them are pushed.
    pub leaving: Vec<RowId>,
    /// Whether more changes follow (after the device's `PullAck`).
    pub more: bool,
}

impl PullBatch {
    /// Whether this batch restarts the feed (see the type's docs).
    pub fn is_restart(&self) -> bool {
        self.cursor < self.from
    }
}

/// The device applied a batch durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullAck {
    /// The table.
    pub table: String,
    /// The batch's `cursor`.
    pub cursor: Cursor,
}

/// Ask for a piece of a file or image, from an offset (a resumed download asks from where it
/// stopped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// First byte wanted.
    pub offset: u64,
    /// Most bytes wanted (at most [`BLOB_CHUNK_MAX`]).
    pub max_len: u32,
}

/// A piece of a file or image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunk {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Whether the hub has the blob and the device may read it (if not, the rest is empty).
    pub found: bool,
    /// Offset of `data` in the content.
    pub offset: u64,
    /// Size of the whole content.
    pub total: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// A keep-alive probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed in the `Pong`.
    pub nonce: u64,
}

/// The answer to a `Ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The `Ping`'s nonce.
    pub nonce: u64,
}

/// The sender ends the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    /// Why.
    pub code: CloseCode,
    /// For people and logs.
    pub reason: String,
}

/// A piece of a file or image the device attached, for the hub (device → hub). A device sends
/// its chunks one at a time, each after the hub acknowledged the one before, starting at
/// offset 0: a hub that already holds a prefix answers with where to go on from, so an
/// interrupted upload resumes from the last chunk the hub stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobPut {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Offset of `data` in the content.
    pub offset: u64,
    /// Size of the whole content.
    pub total: u64,
    /// The bytes (at most [`BLOB_CHUNK_MAX`]).
    pub data: Vec<u8>,
}

/// What the hub did with a [`BlobPut`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobPutStatus {
    /// The hub holds this many leading bytes: send the chunk that starts there.
    Continue {
        /// Bytes the hub holds.
        progress: u64,
    },
    /// The hub holds the whole content and checked its hash.
    Complete,
    /// The hub will not take this blob (no row of the device's set refers to it, it is larger
    /// than the row says or than [`BLOB_UPLOAD_MAX`], or its bytes do not match the hash).
    Refused {
        /// For people.
        message: String,
    },
}

/// The hub's answer to a [`BlobPut`] (hub → device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobPutAck {
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// The offset of the `BlobPut` this answers (a device ignores answers to pieces it no
    /// longer waits for: a duplicated or late answer must not start a second stream).
    pub offset: u64,
    /// What the hub did.
    pub status: BlobPutStatus,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Device → hub: open a session.
    Hello(Hello),
    /// Hub → device: session open.
    Welcome(Welcome),
    /// Hub → device: session refused.
    Refused(Refused),
    /// Device → hub: local ops.
    Push(Push),
    /// Hub → device: ops processed.
    PushAck(PushAck),
    /// Device → hub: send changes since these cursors.
    Pull(Pull),
    /// Hub → device: changes to one table.
    PullBatch(PullBatch),
    /// Device → hub: batch applied.
    PullAck(PullAck),
    /// Device → hub: pull, then keep pushing changes as they happen.
    Subscribe(Subscribe),
    /// Device → hub: send a piece of a blob.
    BlobRequest(BlobRequest),
    /// Hub → device: a piece of a blob.
    BlobChunk(BlobChunk),
    /// Device → hub: a piece of a blob the device attached.
    BlobPut(BlobPut),
    /// Hub → device: what the hub did with it.
    BlobPutAck(BlobPutAck),
    /// Either way: keep-alive probe.
    Ping(Ping),
    /// Either way: keep-alive answer.
    Pong(Pong),
    /// Either way: end of session.
    Close(Close),
}

impl Message {
    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refused(_) => "Refused",
            Message::Push(_) => "Push",
            Message::PushAck(_) => "PushAck",
            Message::Pull(_) => "Pull",
            Message::PullBatch(_) => "PullBatch",
            Message::PullAck(_) => "PullAck",
            Message::Subscribe(_) => "Subscribe",
            Message::BlobRequest(_) => "BlobRequest",
            Message::BlobChunk(_) => "BlobChunk",
            Message::BlobPut(_) => "BlobPut",
            Message::BlobPutAck(_) => "BlobPutAck",
            Message::Ping(_) => "Ping",
            Message::Pong(_) => "Pong",
            Message::Close(_) => "Close",
        }
    }

    /// Checks every bound of the protocol (batch sizes, name and text lengths).
    ///
    /// Called by [`crate::wire`] before encoding and right after decoding, so an over-limit
    /// message neither leaves nor enters a session.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => {
                limit(
                    "hello.protocol_versions",
                    h.protocol_versions.len(),
                    MAX_HELLO_VERSIONS,
                )?;
                limit("hello.token", h.token.len(), MAX_TOKEN_LEN)?;
                limit("hello.app", h.app.len(), MAX_NAME_LEN)?;
                limit("hello.client", h.client.len(), MAX_NAME_LEN)
            }
            Message::Welcome(_) | Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Refused(r) => limit("refused.message", r.message.len(), MAX_TEXT_LEN),
            Message::Push(p) => {
                limit("push.ops", p.ops.len(), PUSH_BATCH_OPS_MAX)?;
                for op in &p.ops {
                    limit("push.op.table", op.table.len(), MAX_NAME_LEN)?;
                    limit("push.op.change", op.change.len(), MAX_CHANGE_LEN)?;
                }
                Ok(())
            }
            Message::PushAck(a) => {
                limit("push_ack.rejected", a.rejected.len(), PUSH_BATCH_OPS_MAX)?;
                for r in &a.rejected {
                    limit("rejection.table", r.table.len(), MAX_NAME_LEN)?;
                    limit("rejection.message", r.message.len(), MAX_TEXT_LEN)?;
                    if let Some(doc) = &r.authoritative {
                        limit("rejection.authoritative", doc.doc.len(), MAX_CHANGE_LEN)?;
                    }
                }
                Ok(())
            }
            Message::Pull(Pull { tables }) | Message::Subscribe(Subscribe { tables }) => {
                limit("pull.tables", tables.len(), MAX_TABLES_PER_REQUEST)?;
                for t in tables {
                    limit("pull.table", t.table.len(), MAX_NAME_LEN)?;
                }
                Ok(())
            }
            Message::PullBatch(b) => {
                limit("pull_batch.table", b.table.len(), MAX_NAME_LEN)?;
                let items = b.ops.len() + b.entering.len() + b.leaving.len();
                limit("pull_batch.items", items, PULL_BATCH_ITEMS_MAX)?;
                for op in &b.ops {
                    limit("pull_batch.op.change", op.change.len(), MAX_CHANGE_LEN)?;
                }
                for row in &b.entering {
                    limit("pull_batch.entering.doc", row.doc.len(), MAX_CHANGE_LEN)?;
                }
                Ok(())
            }
            Message::PullAck(a) => limit("pull_ack.table", a.table.len(), MAX_NAME_LEN),
            Message::BlobRequest(r) => {
                limit("blob_request.max_len", r.max_len as usize, BLOB_CHUNK_MAX)
            }
            Message::BlobChunk(c) => limit("blob_chunk.data", c.data.len(), BLOB_CHUNK_MAX),
            Message::BlobPut(p) => limit("blob_put.data", p.data.len(), BLOB_CHUNK_MAX),
            Message::BlobPutAck(a) => match &a.status {
                BlobPutStatus::Refused { message } => {
                    limit("blob_put_ack.message", message.len(), MAX_TEXT_LEN)
                }
                BlobPutStatus::Continue { .. } | BlobPutStatus::Complete => Ok(()),
            },
            Message::Close(c) => limit("close.reason", c.reason.len(), MAX_TEXT_LEN),
        }
    }
}

fn limit(what: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        Err(WireError::LimitExceeded { what, len, max })
    } else {
        Ok(())
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary (for messages and reasons).
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
