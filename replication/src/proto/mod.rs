//! The sans-IO sync protocol: device and hub sessions as state machines.
//!
//! Modelled on quinn-proto. A session does no I/O and never reads a clock: the driver (the QUIC
//! shell, the simulator, a test) hands it what arrived and the current time, and takes out what
//! to send, the next timer and events.
//!
//! - `handle_*` methods take what comes in: a message ([`DeviceSession::handle_message`]), a
//!   timer that fired (`handle_timeout`), a bad frame (`handle_wire_error`), a transport
//!   change (`handle_connected`, `handle_disconnected`), new local or hub changes.
//! - `poll_*` methods give what goes out, in this order after each `handle_*` call:
//!   `poll_transmit` until `None` (send each message in order on the session's stream),
//!   `poll_event` until `None`, then `poll_timeout` (call `handle_timeout` at that time).
//!
//! Storage is reached through two small traits, [`DeviceStorage`] and [`HubStorage`], passed
//! to the `handle_*` calls; the store's automerge-backed implementation plugs in behind them.
//! Randomness (reconnect jitter) comes from a seed in the config.
//!
//! # Driving a device
//!
//! ```text
//! loop {
//!     if idle: sleep until session.wants_connection_at(&storage); connect;
//!              on failure handle_disconnected(now), else handle_connected(now)
//!     wait for: bytes from the stream | the timer from poll_timeout() | a local commit
//!     bytes   -> decoder.feed(bytes); for each decoder.next_message():
//!                    Ok(msg) -> handle_message(now, msg, &mut storage)
//!                    Err(e)  -> handle_wire_error(now, &e)
//!     timer   -> handle_timeout(now, &mut storage)
//!     commit  -> handle_local_ops(now, &mut storage)
//!     while let Some(msg) = poll_transmit(now) { stream.write(wire::encode(&msg)?) }
//!     while let Some(ev) = poll_event() { ... }
//!     if state() is Closed or Halted: flush, drop the stream, handle_disconnected(now)
//! }
//! ```
//!
//! A hub runs one [`HubSession`] per connection the same way, and fans the tables of each
//! [`HubEvent::OpsApplied`] out to every other session with [`HubSession::handle_changes`].
//!
//! # Guarantees (checked by `replication/tests/proto_sessions.rs`)
//!
//! - A local op leaves the device's pending set only through `record_ack`, after the hub
//!   decided it durably; a rejected op becomes a sync error and is rolled back, never dropped.
//! - Cursors and the acknowledged sequence number only move forward — except a cursor past the
//!   end of the hub's feed, which the hub restarts (see [`messages::PullBatch`]); a batch is
//!   applied only on top of the cursor it was computed from, so loss, duplication and
//!   reordering of messages cost a re-send, never a wrong state.
//! - Every input from the network is checked; a bad frame or an out-of-protocol message closes
//!   that session only, with a [`CloseCode`].
//! - Everything is bounded: frame size, batch items and bytes, tables per request, tables a hub
//!   session tracks, batches in flight per table.

pub mod device;
pub mod hub;
pub mod messages;
pub mod schedule;
pub mod storage;
mod time;

pub use device::{DeviceConfig, DeviceEvent, DeviceSession, DeviceState};
pub use hub::{ConflictPolicies, ConflictPolicy, HubConfig, HubEvent, HubSession, HubState};
pub use messages::{
    BlobChunk, BlobPut, BlobPutAck, BlobPutStatus, BlobRequest, Close, CloseCode, Cursor, DeviceId,
    Hello, Message, Operation, Ping, Pong, Pull, PullAck, PullBatch, Push, PushAck, PushOp,
    Refused, Rejection, RejectionKind, RowChange, RowDoc, Subscribe, TableCursor, Welcome,
};
pub use schedule::SyncSchedule;
pub use storage::{
    BatchLimits, BlobSlice, DeviceStorage, HubStorage, Principal, PullChunk, PushOutcome, Refusal,
    StorageError, SyncErrorRecord, UploadOutcome,
};
pub use time::{Backoff, Millis};
