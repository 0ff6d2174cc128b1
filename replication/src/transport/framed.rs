//! Length-prefixed frames over QUIC streams, and streams per blob transfer.
//!
//! A frame is a `u32` big-endian length followed by that many bytes. The payload is opaque here:
//! the wire format (`replication::wire`) encodes and versions messages; this layer only delimits
//! them and enforces a maximum size on both sides. Swapping the prefix for the wire format's own
//! header touches only [`FrameWriter::write_frame`] and [`FrameReader::read_frame`].

use quinn::{Connection, ConnectionError, ReadError, RecvStream, SendStream, WriteError};

/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_BYTES: usize = 4;

/// How much a reader asks the stream for at once when it does not yet know a frame's length.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame announced (or was asked to carry) more than the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// The announced or attempted length.
        len: usize,
        /// The maximum frame size.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes of an unfinished frame)")]
    Truncated {
        /// Bytes received of the unfinished frame, header included.
        buffered: usize,
    },
    /// Reading from the stream failed (reset, connection lost).
    #[error("stream read failed: {0}")]
    Read(#[from] ReadError),
    /// Writing to the stream failed (stopped, connection lost).
    #[error("stream write failed: {0}")]
    Write(#[from] WriteError),
    /// Opening or accepting a stream failed because the connection is gone.
    #[error("connection failed: {0}")]
    Connection(#[from] ConnectionError),
    /// The stream was already finished or reset locally.
    #[error("stream already closed")]
    ClosedStream,
}

impl FrameError {
    /// The application close code, if the peer closed the connection with one.
    pub fn peer_close_code(&self) -> Option<u64> {
        let conn = match self {
            FrameError::Connection(e) => e,
            FrameError::Read(ReadError::ConnectionLost(e)) => e,
            FrameError::Write(WriteError::ConnectionLost(e)) => e,
            _ => return None,
        };
        match conn {
            ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }

    /// Whether the peer sent bytes that are not valid frames (our side should close with
    /// [`codes::FRAME_ERROR`](super::codes::FRAME_ERROR)).
    pub fn is_peer_violation(&self) -> bool {
        matches!(
            self,
            FrameError::Oversize { .. } | FrameError::Truncated { .. }
        )
    }
}

/// Writes frames to a QUIC send stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: SendStream,
    max_frame_bytes: usize,
}

impl FrameWriter {
    /// Frames on `send`, refusing to send frames over `max_frame_bytes`.
    pub fn new(send: SendStream, max_frame_bytes: usize) -> Self {
        Self {
            send,
            max_frame_bytes,
        }
    }

    /// Sends one frame. Not cancel-safe: a dropped future may leave half a frame on the stream.
    pub async fn write_frame(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|_| payload.len() <= self.max_frame_bytes)
            .ok_or(FrameError::Oversize {
                len: payload.len(),
                max: self.max_frame_bytes,
            })?;
        self.send.write_all(&len.to_be_bytes()).await?;
        self.send.write_all(payload).await?;
        Ok(())
    }

    /// Writes raw bytes with no frame header (for a transport that frames differently, or tests).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Ends the stream after what was written; the peer's reader then sees a clean end.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        self.send.finish().map_err(|_| FrameError::ClosedStream)
    }

    /// The underlying stream (for priorities, `stopped()`, resets).
    pub fn stream_mut(&mut self) -> &mut SendStream {
        &mut self.send
    }
}

/// Reads frames from a QUIC receive stream, enforcing a maximum frame size.
///
/// [`FrameReader::read_frame`] is cancel-safe: partial frames are kept in the reader, so it can
/// sit in a `tokio::select!` next to a timer.
#[derive(Debug)]
pub struct FrameReader {
    recv: RecvStream,
    buf: Vec<u8>,
    start: usize,
    max_frame_bytes: usize,
}

impl FrameReader {
    /// Frames from `recv`; a frame over `max_frame_bytes` is an error.
    pub fn new(recv: RecvStream, max_frame_bytes: usize) -> Self {
        Self {
            recv,
            buf: Vec::new(),
            start: 0,
            max_frame_bytes,
        }
    }

    /// The next frame, or `None` when the peer finished the stream at a frame boundary.
    ///
    /// An oversize length prefix is refused as soon as the header arrives, before its body is
    /// buffered; a stream that ends mid-frame is [`FrameError::Truncated`].
    pub async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            let available = self.buf.len() - self.start;
            let mut want = READ_CHUNK_BYTES;
            if available >= FRAME_HEADER_BYTES {
                let mut header = [0u8; FRAME_HEADER_BYTES];
                header.copy_from_slice(&self.buf[self.start..self.start + FRAME_HEADER_BYTES]);
                let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
                if len > self.max_frame_bytes {
                    return Err(FrameError::Oversize {
                        len,
                        max: self.max_frame_bytes,
                    });
                }
                let total = FRAME_HEADER_BYTES + len;
                if available >= total {
                    let body = self.start + FRAME_HEADER_BYTES;
                    let frame = self.buf[body..body + len].to_vec();
                    self.start += total;
                    self.compact();
                    return Ok(Some(frame));
                }
                // Never buffer beyond the frame in hand: memory stays under one max frame.
                want = total - available;
            }
            match self.recv.read_chunk(want, true).await? {
                Some(chunk) => {
                    self.compact();
                    self.buf.extend_from_slice(&chunk.bytes);
                }
                None if available == 0 => return Ok(None),
                None => {
                    return Err(FrameError::Truncated {
                        buffered: available,
                    })
                }
            }
        }
    }

    /// The largest frame this reader accepts.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Changes the largest frame this reader accepts (e.g. a tight limit before authentication).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Tells the peer to stop sending on this stream (e.g. after an oversize frame).
    pub fn stop(&mut self, code: u32) {
        // Already stopped or finished: nothing left to tell.
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }

    /// The underlying stream.
    pub fn stream_mut(&mut self) -> &mut RecvStream {
        &mut self.recv
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Opens a bidirectional stream as a framed pair.
pub async fn open_bi_framed(
    conn: &Connection,
    max_frame_bytes: usize,
) -> Result<(FrameWriter, FrameReader), FrameError> {
    let (send, recv) = conn.open_bi().await?;
    Ok((
        FrameWriter::new(send, max_frame_bytes),
        FrameReader::new(recv, max_frame_bytes),
    ))
}

/// Accepts the peer's next bidirectional stream as a framed pair.
pub async fn accept_bi_framed(
    conn: &Connection,
    max_frame_bytes: usize,
) -> Result<(FrameWriter, FrameReader), FrameError> {
    let (send, recv) = conn.accept_bi().await?;
    Ok((
        FrameWriter::new(send, max_frame_bytes),
        FrameReader::new(recv, max_frame_bytes),
    ))
}

/// Opens a unidirectional stream for one blob transfer and sends `header` as its first frame.
///
/// The header is the protocol's (blob id, first chunk index, ...); chunks follow as frames and
/// [`FrameWriter::finish`] marks the end. One stream per transfer means a large file never
/// blocks the control stream, and a transfer cut off mid-way resumes from the last whole chunk.
pub async fn open_blob_stream(
    conn: &Connection,
    header: &[u8],
    max_frame_bytes: usize,
) -> Result<FrameWriter, FrameError> {
    let send = conn.open_uni().await?;
    let mut writer = FrameWriter::new(send, max_frame_bytes);
    writer.write_frame(header).await?;
    Ok(writer)
}

/// Accepts the peer's next blob stream: its header frame and a reader for the chunks.
///
/// Returns `None` if the peer finished the stream without sending a header.
pub async fn accept_blob_stream(
    conn: &Connection,
    max_frame_bytes: usize,
) -> Result<Option<(Vec<u8>, FrameReader)>, FrameError> {
    let recv = conn.accept_uni().await?;
    let mut reader = FrameReader::new(recv, max_frame_bytes);
    Ok(reader.read_frame().await?.map(|header| (header, reader)))
}
