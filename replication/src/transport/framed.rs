//! Length-delimited frames over QUIC streams, and streams per blob transfer.
//!
//! Two [`FrameFormat`]s, so the transport can carry the wire format's frames as they are:
//!
//! - [`FrameFormat::LengthPrefixed`] (the default): a `u32` big-endian length, then that many
//!   opaque bytes; readers return the bytes without the prefix.
//! - [`FrameFormat::HeaderLength`]: self-delimiting frames whose fixed header holds the body
//!   length ([`FrameFormat::WIRE_V1`] is `replication::wire`'s 12-byte header with the length at
//!   offset 8). Writers send frames as they are; readers return whole frames, header included,
//!   for the wire decoder. Magic, version and kind are the wire decoder's business, not ours.
//!
//! Either way the maximum size is enforced on both sides: a writer refuses to send an oversize
//! frame, and a reader refuses one as soon as its header arrives, before buffering the body.

use quinn::{Connection, ConnectionError, ReadError, RecvStream, SendStream, WriteError};

/// Bytes of the length prefix in front of every [`FrameFormat::LengthPrefixed`] frame.
pub const FRAME_HEADER_BYTES: usize = 4;

/// How frames are delimited on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FrameFormat {
    /// A `u32` big-endian length prefix the transport adds and strips.
    #[default]
    LengthPrefixed,
    /// Frames with a fixed header that holds the body length as a `u32` big-endian; the
    /// transport neither adds nor strips anything.
    HeaderLength {
        /// Bytes of the fixed header.
        header_bytes: usize,
        /// Offset of the `u32` body length inside the header.
        length_offset: usize,
    },
}

impl FrameFormat {
    /// The wire format's frames: 12-byte header, body length at offset 8.
    pub const WIRE_V1: FrameFormat = FrameFormat::HeaderLength {
        header_bytes: 12,
        length_offset: 8,
    };

    /// Bytes of header in front of each body.
    fn header_bytes(self) -> usize {
        match self {
            FrameFormat::LengthPrefixed => FRAME_HEADER_BYTES,
            FrameFormat::HeaderLength { header_bytes, .. } => header_bytes,
        }
    }

    /// The body length announced by `header` (which has [`Self::header_bytes`] bytes).
    fn body_len(self, header: &[u8]) -> Option<usize> {
        let offset = match self {
            FrameFormat::LengthPrefixed => 0,
            FrameFormat::HeaderLength { length_offset, .. } => length_offset,
        };
        let b = header.get(offset..offset + 4)?;
        usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok()
    }
}

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
    /// (Writer) a frame's header does not announce the number of bytes that follow it.
    #[error("frame header announces {announced:?} body bytes, the frame has {actual}")]
    Inconsistent {
        /// The body length in the header, if there was a whole header.
        announced: Option<usize>,
        /// The body bytes actually present.
        actual: usize,
    },
    /// The stream was already finished or reset locally.
    #[error("stream already closed")]
    ClosedStream,
    /// A frame on a blob stream that does not carry blob bytes.
    #[error("a frame of kind {kind} on a blob stream")]
    NotABlobFrame {
        /// The frame's kind byte.
        kind: u8,
    },
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
            FrameError::Oversize { .. }
                | FrameError::Truncated { .. }
                | FrameError::NotABlobFrame { .. }
        )
    }
}

/// Writes frames to a QUIC send stream.
#[derive(Debug)]
pub struct FrameWriter {
    send: SendStream,
    max_frame_bytes: usize,
    format: FrameFormat,
}

impl FrameWriter {
    /// Frames on `send`, refusing to send frames over `max_frame_bytes`.
    pub fn new(send: SendStream, max_frame_bytes: usize) -> Self {
        Self {
            send,
            max_frame_bytes,
            format: FrameFormat::LengthPrefixed,
        }
    }

    /// Sends one frame (for [`FrameFormat::HeaderLength`], a whole frame whose header must
    /// announce exactly the bytes that follow it). The maximum applies to the body.
    ///
    /// Not cancel-safe: a dropped future may leave half a frame on the stream.
    pub async fn write_frame(&mut self, frame: &[u8]) -> Result<(), FrameError> {
        let max = self.max_frame_bytes;
        match self.format {
            FrameFormat::LengthPrefixed => {
                let len = u32::try_from(frame.len())
                    .ok()
                    .filter(|_| frame.len() <= max)
                    .ok_or(FrameError::Oversize {
                        len: frame.len(),
                        max,
                    })?;
                self.send.write_all(&len.to_be_bytes()).await?;
                self.send.write_all(frame).await?;
            }
            format @ FrameFormat::HeaderLength { header_bytes, .. } => {
                let body = frame.len().checked_sub(header_bytes);
                let announced = frame.get(..header_bytes).and_then(|h| format.body_len(h));
                if body.is_none() || announced != body {
                    return Err(FrameError::Inconsistent {
                        announced,
                        actual: body.unwrap_or(0),
                    });
                }
                let len = body.unwrap_or(0);
                if len > max {
                    return Err(FrameError::Oversize { len, max });
                }
                self.send.write_all(frame).await?;
            }
        }
        Ok(())
    }

    /// The same writer with another frame format.
    pub fn with_format(mut self, format: FrameFormat) -> Self {
        self.format = format;
        self
    }

    /// The frame format in use.
    pub fn format(&self) -> FrameFormat {
        self.format
    }

    /// The largest frame body this writer sends.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
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
    format: FrameFormat,
}

impl FrameReader {
    /// Frames from `recv`; a frame over `max_frame_bytes` is an error.
    pub fn new(recv: RecvStream, max_frame_bytes: usize) -> Self {
        Self {
            recv,
            buf: Vec::new(),
            start: 0,
            max_frame_bytes,
            format: FrameFormat::LengthPrefixed,
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
            let header_bytes = self.format.header_bytes();
            if available >= header_bytes {
                let header = &self.buf[self.start..self.start + header_bytes];
                let len = self.format.body_len(header).unwrap_or(usize::MAX);
                if len > self.max_frame_bytes {
                    return Err(FrameError::Oversize {
                        len,
                        max: self.max_frame_bytes,
                    });
                }
                let total = header_bytes + len;
                if available >= total {
                    let from = match self.format {
                        FrameFormat::LengthPrefixed => self.start + header_bytes,
                        FrameFormat::HeaderLength { .. } => self.start,
                    };
                    let frame = self.buf[from..self.start + total].to_vec();
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

    /// The same reader with another frame format (before anything was read).
    pub fn with_format(mut self, format: FrameFormat) -> Self {
        self.format = format;
        self
    }

    /// The frame format in use.
    pub fn format(&self) -> FrameFormat {
        self.format
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
