//! The per-connection driver: the async shell that runs a sans-IO session over a framed stream.
//!
//! One task per connection runs [`drive_session`], in the shape of quinn's `ConnectionDriver`:
//!
//! ```text
//! loop {
//!     1. write out:   while let Some(frame) = session.poll_frame() { writer.write_frame(frame) }
//!     2. closed?      if session.is_closed() { finish the stream, close the connection, return }
//!     3. wait for the first of:
//!          a frame    -> session.handle_frame(now, frame)   (Err(reason) -> close with reason)
//!          the timer  -> session.handle_timeout(now)         (deadline = session.poll_timeout())
//!          a wake-up  -> session.handle_wake(now)            (drive_session_with_wake only)
//!          peer's end -> return PeerFinished
//! }
//! ```
//!
//! The session never sees a socket or the clock: time comes from [`SessionClock`] as
//! milliseconds, so the simulator can drive the very same session with a fake clock. The sans-IO
//! sessions of `replication::proto` plug in through a small adapter implementing
//! [`FrameSession`] (encode/decode with the wire format inside `handle_frame`/`poll_frame`).
//!
//! An adapter for a `replication::proto` session is a few lines (sketch; `Millis`, `wire` and the
//! session types are the proto module's):
//!
//! ```text
//! struct HubAdapter<'a> { session: HubSession, storage: &'a mut dyn HubStorage, now_ms: u64 }
//! impl FrameSession for HubAdapter<'_> {
//!     fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
//!         self.now_ms = now_ms;
//!         match wire::decode(bytes) {            // reader uses FrameFormat::WIRE_V1
//!             Ok((msg, _)) => self.session.handle_message(Millis(now_ms), msg, self.storage),
//!             Err(e) => self.session.handle_wire_error(Millis(now_ms), &e),
//!         }
//!         Ok(())                                  // the session sends its own Close, then is_closed
//!     }
//!     fn poll_frame(&mut self) -> Option<Vec<u8>> {
//!         let msg = self.session.poll_transmit(Millis(self.now_ms))?;
//!         wire::encode(&msg).ok()
//!     }
//!     fn poll_timeout(&self) -> Option<u64> { self.session.poll_timeout().map(|m| m.0) }
//!     fn handle_timeout(&mut self, now_ms: u64) { self.now_ms = now_ms; self.session.handle_timeout(Millis(now_ms)) }
//!     fn handle_wake(&mut self, now_ms: u64) { self.now_ms = now_ms; self.session.handle_changes(Millis(now_ms), self.storage) }
//!     fn is_closed(&self) -> bool { self.session.is_closed() }
//! }
//! ```
//!
//! Backpressure: while step 1 writes, nothing is read; QUIC flow control then slows the peer.
//! A session must therefore not produce unbounded output in reply to input (bounded batches).
//!
//! File and image bytes travel on streams of their own: with the wire format
//! ([`FrameFormat::WIRE_V1`]), a `BlobChunk` or `BlobPut` frame the session sends goes on a new
//! unidirectional stream, written by a task of its own, so a chunk never waits behind — or
//! holds up — the control stream. At most [`BLOB_SENDS_IN_FLIGHT`] are in flight: step 1 waits
//! for one to finish before starting another, the same backpressure as a write. The driver
//! accepts the peer's unidirectional streams and hands their frames to the session like any
//! other (the protocol answers each chunk, so their order does not matter); a frame there must
//! be a blob frame of at most [`BLOB_FRAME_MAX`] bytes, or the connection is closed.

use std::sync::Arc;

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use quinn::{Connection, RecvStream, VarInt};

use super::codes;
use super::framed::{FrameError, FrameFormat, FrameReader, FrameWriter};
use crate::proto::messages::BLOB_CHUNK_MAX;
use crate::wire::FrameKind;

/// Frames from the peer's blob streams waiting for the loop.
const SIDE_FRAMES_QUEUED: usize = 4;
/// Blob frames being sent at once on streams of their own.
pub const BLOB_SENDS_IN_FLIGHT: usize = 8;
/// Largest frame body on a blob stream: a chunk of [`BLOB_CHUNK_MAX`] bytes and its fields.
pub const BLOB_FRAME_MAX: usize = BLOB_CHUNK_MAX + 1024;

/// Why a session ends a connection: an application close code and a short reason for the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The QUIC application close code (outside the transport's `codes` range).
    pub code: u32,
    /// A short human-readable reason sent to the peer.
    pub reason: String,
}

impl CloseReason {
    /// A close reason with `code` and `reason`.
    pub fn new(code: u32, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// A session the driver can run: frames in, frames out, one timer. All times are milliseconds
/// on the [`SessionClock`]'s scale.
///
/// Poll order after any `handle_*`: drain [`poll_frame`](FrameSession::poll_frame), then check
/// [`is_closed`](FrameSession::is_closed), then read [`poll_timeout`](FrameSession::poll_timeout).
pub trait FrameSession {
    /// Takes one frame received from the peer. `Err` ends the connection with that reason.
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason>;
    /// The next frame to send, if any.
    fn poll_frame(&mut self) -> Option<Vec<u8>>;
    /// When [`handle_timeout`](FrameSession::handle_timeout) should next be called, if ever.
    fn poll_timeout(&self) -> Option<u64>;
    /// Tells the session its timer deadline passed.
    fn handle_timeout(&mut self, now_ms: u64);
    /// Whether the session is done; the driver then finishes the stream and closes.
    fn is_closed(&self) -> bool;
    /// The application code the driver closes the connection with once the session is done:
    /// [`codes::DONE`] unless the session ended on an error (then `codes::SESSION_BASE` plus
    /// the session's own code, so the transport's close says what the session's said).
    fn close_code(&self) -> u32 {
        codes::DONE
    }
    /// Something outside this connection changed (e.g. another device's edit that a live
    /// subscriber should get now, not at its next poll). Called by
    /// [`drive_session_with_wake`] when its [`Notify`] fires. Does nothing by default.
    fn handle_wake(&mut self, now_ms: u64) {
        let _ = now_ms;
    }
}

/// Maps the tokio clock to session milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct SessionClock {
    origin: Instant,
    origin_ms: u64,
}

impl SessionClock {
    /// A clock reading `origin_ms` now (e.g. Unix milliseconds, or 0) and advancing with tokio's.
    pub fn new(origin_ms: u64) -> Self {
        Self {
            origin: Instant::now(),
            origin_ms,
        }
    }

    /// The current time in session milliseconds.
    pub fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.origin_ms.saturating_add(elapsed)
    }

    /// The tokio instant of session time `ms` (times in the past map to the origin).
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.origin + std::time::Duration::from_millis(ms.saturating_sub(self.origin_ms))
    }
}

/// How a driven session ended without error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriveOutcome {
    /// The session reported itself closed; we finished our stream and closed the connection.
    SessionClosed,
    /// The peer finished its side of the stream at a frame boundary.
    PeerFinished,
}

/// Why a driven session ended with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError {
    /// The session refused a frame; the connection was closed with its reason.
    #[error("session closed the connection (code {:#x}): {}", .0.code, .0.reason)]
    Session(CloseReason),
    /// The peer sent an invalid frame; the connection was closed with `codes::FRAME_ERROR`.
    #[error("peer sent an invalid frame: {0}")]
    PeerFrame(FrameError),
    /// The stream or connection failed (peer closed, lost, reset).
    #[error("stream failed: {0}")]
    Stream(FrameError),
    /// The peer stopped taking our frames (see [`stall_limit`]); the connection was closed with
    /// `codes::STALLED`.
    #[error("the peer took no frame of {bytes} bytes in {limit:?}")]
    Stalled {
        /// The frame's size.
        bytes: usize,
        /// How long it was given.
        limit: std::time::Duration,
    },
}

/// The slowest link a frame is allowed to drain over before its peer counts as stalled:
/// 128 kbit/s, well below a weak cellular signal.
pub const SLOWEST_PEER_BYTES_PER_SEC: u64 = 16 * 1024;

/// The slack [`stall_limit`] gives every frame: a round trip through a dead zone.
pub const STALL_SLACK: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a frame of `len` bytes may take to leave: `slack` ([`STALL_SLACK`] unless a test
/// drives the session with another) plus its length at [`SLOWEST_PEER_BYTES_PER_SEC`]. A peer
/// that keeps its connection alive but never reads (QUIC still acknowledges packets,
/// keep-alives keep it from going idle) would otherwise hold the session, its queued frames
/// and, on the hub, the drain at shutdown, for good.
pub fn stall_limit(slack: std::time::Duration, len: usize) -> std::time::Duration {
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    slack + std::time::Duration::from_millis(len.saturating_mul(1000) / SLOWEST_PEER_BYTES_PER_SEC)
}

/// Runs `session` over the framed stream `writer`/`reader` of `conn` until it ends.
///
/// Closes the connection when the session closes or refuses a frame, or when the peer sends an
/// invalid frame (code [`codes::FRAME_ERROR`]) — other connections on the endpoint are
/// unaffected.
pub async fn drive_session<S: FrameSession + ?Sized>(
    session: &mut S,
    conn: &Connection,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    clock: &SessionClock,
) -> Result<DriveOutcome, DriveError> {
    drive_session_with_wake(session, conn, writer, reader, clock, &Notify::new()).await
}

/// [`drive_session`], also calling [`FrameSession::handle_wake`] whenever `wake` is notified.
///
/// Use `wake.notify_one()` from the producer (e.g. the hub's change feed): a notification sent
/// while the driver is busy writing is kept and delivered at the next wait, never lost.
pub async fn drive_session_with_wake<S: FrameSession + ?Sized>(
    session: &mut S,
    conn: &Connection,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    clock: &SessionClock,
    wake: &Notify,
) -> Result<DriveOutcome, DriveError> {
    let options = DriveOptions::default();
    drive_session_with_options(session, conn, writer, reader, clock, wake, &options).await
}

/// How [`drive_session_with_options`] drives a session beyond the defaults.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// The slack of [`stall_limit`] ([`STALL_SLACK`]; tests use a short one).
    pub stall_slack: std::time::Duration,
    /// An async lock every session callback (`handle_frame`, `handle_timeout`,
    /// `handle_wake`) runs under. Sessions that share blocking storage take turns here,
    /// waiting asynchronously, instead of each blocking a thread on the storage's own lock.
    pub turn: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions {
            stall_slack: STALL_SLACK,
            turn: None,
        }
    }
}

async fn take_turn(
    turn: &Option<Arc<tokio::sync::Mutex<()>>>,
) -> Option<tokio::sync::MutexGuard<'_, ()>> {
    match turn {
        Some(t) => Some(t.lock().await),
        None => None,
    }
}

/// [`drive_session_with_wake`] with `options`.
#[tracing::instrument(skip_all, fields(remote = %conn.remote_address()))]
pub async fn drive_session_with_options<S: FrameSession + ?Sized>(
    session: &mut S,
    conn: &Connection,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    clock: &SessionClock,
    wake: &Notify,
    options: &DriveOptions,
) -> Result<DriveOutcome, DriveError> {
    let stall_slack = options.stall_slack;
    let format = writer.format();
    // Tasks sending blob frames and reading the peer's blob streams; dropped (aborted) with
    // the driver.
    let mut side_tasks = JoinSet::new();
    let (side_tx, mut side_rx) = mpsc::channel(SIDE_FRAMES_QUEUED);
    let sends = Arc::new(Semaphore::new(BLOB_SENDS_IN_FLIGHT));
    let mut accepting = true;
    loop {
        let mut wrote = false;
        while let Some(frame) = session.poll_frame() {
            wrote = true;
            if travels_alone(format, &frame) {
                // Never closed, so never an error; waiting here is the backpressure.
                let Ok(permit) = sends.clone().acquire_owned().await else {
                    continue;
                };
                let (conn, max) = (conn.clone(), writer.max_frame_bytes());
                side_tasks.spawn(async move {
                    send_alone(conn, frame, format, max, stall_slack).await;
                    drop(permit);
                });
            } else {
                write_or_close(conn, writer, &frame, stall_slack).await?;
            }
        }
        // Finished side tasks need no more bookkeeping.
        while side_tasks.try_join_next().is_some() {}
        if wrote {
            // Let the connection's driver put the frames on the wire before the next frame is
            // handled: it cannot run until this task returns `Pending` — on a multi-thread
            // runtime it waits in this worker's LIFO slot, which other workers do not steal; on
            // a current-thread runtime (the device CLI) there is no other thread — so a long
            // `handle_frame` (a pulled batch written to disk) would otherwise hold back the ack
            // that lets the peer prepare the next batch.
            tokio::task::yield_now().await;
        }
        if session.is_closed() {
            let _ = writer.finish();
            // Give the peer our last frames before the close, then close the connection.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                writer.stream_mut().stopped(),
            )
            .await;
            conn.close(VarInt::from_u32(session.close_code()), b"session closed");
            tracing::debug!("session closed");
            return Ok(DriveOutcome::SessionClosed);
        }
        let deadline = session.poll_timeout().map(|ms| clock.instant_at(ms));
        tokio::select! {
            frame = reader.read_frame() => match frame {
                Ok(Some(bytes)) => {
                    let _turn = take_turn(&options.turn).await;
                    if let Err(reason) = session.handle_frame(clock.now_ms(), &bytes) {
                        tracing::info!(code = reason.code, reason = %reason.reason, "session refused a frame");
                        conn.close(VarInt::from_u32(reason.code), reason.reason.as_bytes());
                        return Err(DriveError::Session(reason));
                    }
                }
                Ok(None) => {
                    // Drain what the session still has to say, then report the peer's end.
                    while let Some(frame) = session.poll_frame() {
                        write_or_close(conn, writer, &frame, stall_slack).await?;
                    }
                    let _ = writer.finish();
                    return Ok(DriveOutcome::PeerFinished);
                }
                Err(e) if e.is_peer_violation() => {
                    tracing::warn!(error = %e, "closing connection: invalid frame");
                    reader.stop(codes::FRAME_ERROR);
                    conn.close(VarInt::from_u32(codes::FRAME_ERROR), e.to_string().as_bytes());
                    return Err(DriveError::PeerFrame(e));
                }
                Err(e) => return Err(DriveError::Stream(e)),
            },
            stream = conn.accept_uni(), if accepting => match stream {
                Ok(recv) => {
                    let max = reader.max_frame_bytes().min(BLOB_FRAME_MAX);
                    side_tasks.spawn(read_alone(recv, max, reader.format(), side_tx.clone()));
                }
                // The connection is gone; the control stream's read says how.
                Err(_) => accepting = false,
            },
            Some(side) = side_rx.recv() => match side {
                Ok(bytes) => {
                    let _turn = take_turn(&options.turn).await;
                    if let Err(reason) = session.handle_frame(clock.now_ms(), &bytes) {
                        tracing::info!(code = reason.code, reason = %reason.reason, "session refused a frame");
                        conn.close(VarInt::from_u32(reason.code), reason.reason.as_bytes());
                        return Err(DriveError::Session(reason));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "closing connection: invalid frame on a blob stream");
                    conn.close(VarInt::from_u32(codes::FRAME_ERROR), e.to_string().as_bytes());
                    return Err(DriveError::PeerFrame(e));
                }
            },
            () = sleep_until(deadline) => {
                let _turn = take_turn(&options.turn).await;
                session.handle_timeout(clock.now_ms());
            }
            () = wake.notified() => {
                let _turn = take_turn(&options.turn).await;
                session.handle_wake(clock.now_ms());
            }
        }
    }
}

/// Whether `frame` carries file or image bytes, which travel on a stream of their own.
fn travels_alone(format: FrameFormat, frame: &[u8]) -> bool {
    format == FrameFormat::WIRE_V1
        && frame
            .get(6)
            .and_then(|k| FrameKind::from_u8(*k))
            .is_some_and(|k| matches!(k, FrameKind::BlobChunk | FrameKind::BlobPut))
}

/// Sends one frame on a new unidirectional stream. A failure loses only this frame, which the
/// protocol asks for again.
async fn send_alone(
    conn: Connection,
    frame: Vec<u8>,
    format: FrameFormat,
    max: usize,
    stall_slack: std::time::Duration,
) {
    let sent = async {
        let send = conn.open_uni().await?;
        let mut writer = FrameWriter::new(send, max).with_format(format);
        writer.write_frame(&frame).await?;
        writer.finish()
    };
    // A send that never drains would hold its slot (`BLOB_SENDS_IN_FLIGHT`) and so, in the
    // end, the whole session.
    match tokio::time::timeout(stall_limit(stall_slack, frame.len()), sent).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "a blob frame was not sent"),
        Err(_) => tracing::debug!(bytes = frame.len(), "a blob frame was not taken in time"),
    }
}

/// Reads the frames of one of the peer's blob streams into the loop. A stream the peer reset
/// is dropped quietly; an invalid frame goes to the loop, which closes the connection.
async fn read_alone(
    recv: RecvStream,
    max: usize,
    format: FrameFormat,
    to_loop: mpsc::Sender<Result<Vec<u8>, FrameError>>,
) {
    let mut reader = FrameReader::new(recv, max).with_format(format);
    loop {
        match reader.read_frame().await {
            Ok(Some(frame)) if !travels_alone(format, &frame) => {
                let kind = frame.get(6).copied().unwrap_or(0);
                let _ = to_loop.send(Err(FrameError::NotABlobFrame { kind })).await;
                return;
            }
            Ok(Some(frame)) => {
                if to_loop.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) if e.is_peer_violation() => {
                let _ = to_loop.send(Err(e)).await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "a blob stream ended early");
                return;
            }
        }
    }
}

/// Writes one frame; a frame our own session made too large closes the connection
/// ([`codes::LOCAL_ERROR`]) rather than leaving the peer waiting, and so does a peer that does
/// not take the frame within [`stall_limit`] ([`codes::STALLED`]).
async fn write_or_close(
    conn: &Connection,
    writer: &mut FrameWriter,
    frame: &[u8],
    stall_slack: std::time::Duration,
) -> Result<(), DriveError> {
    let limit = stall_limit(stall_slack, frame.len());
    let Ok(written) = tokio::time::timeout(limit, writer.write_frame(frame)).await else {
        tracing::warn!(
            bytes = frame.len(),
            ?limit,
            "closing connection: the peer stopped reading"
        );
        conn.close(VarInt::from_u32(codes::STALLED), b"peer stopped reading");
        return Err(DriveError::Stalled {
            bytes: frame.len(),
            limit,
        });
    };
    match written {
        Ok(()) => Ok(()),
        Err(e) => {
            if matches!(e, FrameError::Oversize { .. }) {
                tracing::error!(error = %e, "session produced an oversize frame");
                conn.close(
                    VarInt::from_u32(codes::LOCAL_ERROR),
                    b"oversize frame from session",
                );
            }
            Err(DriveError::Stream(e))
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
