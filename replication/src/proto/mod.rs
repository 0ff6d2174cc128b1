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

pub mod device;
pub mod hub;
pub mod messages;
pub mod schedule;
pub mod storage;
mod time;

pub use device::{DeviceConfig, DeviceEvent, DeviceSession, DeviceState};
pub use hub::{ConflictPolicies, ConflictPolicy, HubConfig, HubEvent, HubSession, HubState};
pub use messages::{
    BlobChunk, BlobRequest, Close, CloseCode, Cursor, DeviceId, Hello, Message, Operation, Ping,
    Pong, Pull, PullAck, PullBatch, Push, PushAck, PushOp, Refused, Rejection, RejectionKind,
    RowChange, RowDoc, Subscribe, TableCursor, Welcome,
};
pub use schedule::SyncSchedule;
pub use storage::{
    BatchLimits, BlobSlice, DeviceStorage, HubStorage, Principal, PullChunk, PushOutcome, Refusal,
    StorageError, SyncErrorRecord,
};
pub use time::{Backoff, Millis};
