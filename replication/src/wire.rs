//! The wire format: versioned, length-delimited frames carrying one [`Message`] each.
//!
//! ```text
//! offset  size  field
//!      0     4  magic  b"FSYN"
//!      4     2  protocol version, big-endian (one of SUPPORTED_VERSIONS)
//!      6     1  frame kind (FrameKind; names the message)
//!      7     1  flags, must be 0
//!      8     4  payload length, big-endian, at most MAX_PAYLOAD_LEN
//!     12     n  payload: the message body, serde + bincode 2 (standard config: little-endian,
//!               variable-length integers), decoded with a size limit
//! ```
//!
//! Every way a frame can be bad is a [`WireError`] with a stable [`WireError::code`]; a session
//! turns it into a `Close` of that session only (`CloseCode::WIRE_BASE + code`). The golden files
//! under `replication/tests/golden/` pin the bytes, so the format cannot drift silently.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto::messages::{CloseCode, Message, SUPPORTED_VERSIONS};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FSYN";
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry (4 MiB).
pub const MAX_PAYLOAD_LEN: usize = 4 * 1024 * 1024;
/// Largest whole frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD_LEN;

/// The bincode configuration of every payload; the limit caps what a decoder may claim.
type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_PAYLOAD_LEN>>;

const fn config() -> WireConfig {
    bincode::config::standard().with_limit::<MAX_PAYLOAD_LEN>()
}

/// The kind of a frame: which message its payload holds. The numbers are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameKind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Welcome`].
    Welcome = 2,
    /// [`Message::Refused`].
    Refused = 3,
    /// [`Message::Push`].
    Push = 4,
    /// [`Message::PushAck`].
    PushAck = 5,
    /// [`Message::Pull`].
    Pull = 6,
    /// [`Message::PullBatch`].
    PullBatch = 7,
    /// [`Message::PullAck`].
    PullAck = 8,
    /// [`Message::Subscribe`].
    Subscribe = 9,
    /// [`Message::BlobRequest`].
    BlobRequest = 10,
    /// [`Message::BlobChunk`].
    BlobChunk = 11,
    /// [`Message::Ping`].
    Ping = 12,
    /// [`Message::Pong`].
    Pong = 13,
    /// [`Message::Close`].
    Close = 14,
    /// [`Message::BlobPut`].
    BlobPut = 15,
    /// [`Message::BlobPutAck`].
    BlobPutAck = 16,
}

impl FrameKind {
    /// The kind with this number.
    pub fn from_u8(kind: u8) -> Option<FrameKind> {
        Some(match kind {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Refused,
            4 => FrameKind::Push,
            5 => FrameKind::PushAck,
            6 => FrameKind::Pull,
            7 => FrameKind::PullBatch,
            8 => FrameKind::PullAck,
            9 => FrameKind::Subscribe,
            10 => FrameKind::BlobRequest,
            11 => FrameKind::BlobChunk,
            12 => FrameKind::Ping,
            13 => FrameKind::Pong,
            14 => FrameKind::Close,
            15 => FrameKind::BlobPut,
            16 => FrameKind::BlobPutAck,
            _ => return None,
        })
    }

    /// The kind of frame that carries this message.
    pub fn of(msg: &Message) -> FrameKind {
        match msg {
            Message::Hello(_) => FrameKind::Hello,
            Message::Welcome(_) => FrameKind::Welcome,
            Message::Refused(_) => FrameKind::Refused,
            Message::Push(_) => FrameKind::Push,
            Message::PushAck(_) => FrameKind::PushAck,
            Message::Pull(_) => FrameKind::Pull,
            Message::PullBatch(_) => FrameKind::PullBatch,
            Message::PullAck(_) => FrameKind::PullAck,
            Message::Subscribe(_) => FrameKind::Subscribe,
            Message::BlobRequest(_) => FrameKind::BlobRequest,
            Message::BlobChunk(_) => FrameKind::BlobChunk,
            Message::Ping(_) => FrameKind::Ping,
            Message::Pong(_) => FrameKind::Pong,
            Message::Close(_) => FrameKind::Close,
            Message::BlobPut(_) => FrameKind::BlobPut,
            Message::BlobPutAck(_) => FrameKind::BlobPutAck,
        }
    }
}

/// Why bytes from the network are not a valid frame (or a message cannot be sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame does not start with the fieldsync magic bytes.
    #[error("bad magic {found:02x?}: not a fieldsync frame")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The frame's protocol version is not one this build speaks.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version in the header.
        version: u16,
    },
    /// The frame-kind byte names no known message.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// The header's reserved flags byte is not zero.
    #[error("reserved flags {flags:#04x} set")]
    ReservedFlags {
        /// The flags byte.
        flags: u8,
    },
    /// The payload length exceeds the maximum frame size.
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// The length in the header (or of the encoded message).
        len: u64,
        /// [`MAX_PAYLOAD_LEN`].
        max: usize,
    },
    /// The input ended inside a frame.
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes there were.
        available: usize,
    },
    /// The payload does not decode as the message its kind names.
    #[error("malformed {kind:?} payload: {detail}")]
    Malformed {
        /// The frame's kind.
        kind: FrameKind,
        /// The decoder's complaint.
        detail: String,
    },
    /// The payload decoded but bytes were left over.
    #[error("{extra} bytes left over after the {kind:?} payload")]
    TrailingBytes {
        /// The frame's kind.
        kind: FrameKind,
        /// How many bytes were left.
        extra: usize,
    },
    /// A message exceeds a protocol limit (batch size, name or text length).
    #[error("{what}: {len} exceeds the limit of {max}")]
    LimitExceeded {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A message could not be encoded.
    #[error("cannot encode message: {detail}")]
    Encode {
        /// The encoder's complaint.
        detail: String,
    },
}

impl WireError {
    /// A stable number for this kind of error (part of the protocol: it is sent in `Close`).
    pub fn code(&self) -> u16 {
        match self {
            WireError::BadMagic { .. } => 1,
            WireError::UnsupportedVersion { .. } => 2,
            WireError::UnknownKind { .. } => 3,
            WireError::ReservedFlags { .. } => 4,
            WireError::Oversize { .. } => 5,
            WireError::Truncated { .. } => 6,
            WireError::Malformed { .. } => 7,
            WireError::TrailingBytes { .. } => 8,
            WireError::LimitExceeded { .. } => 9,
            WireError::Encode { .. } => 10,
        }
    }

    /// The code a session closes with because of this error.
    pub fn close_code(&self) -> CloseCode {
        CloseCode(CloseCode::WIRE_BASE + self.code())
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of the payload.
    pub version: u16,
    /// What the payload holds.
    pub kind: FrameKind,
    /// Payload length in bytes.
    pub len: usize,
}

impl FrameHeader {
    /// Parses and checks the header at the start of `bytes` (needs [`HEADER_LEN`] bytes).
    pub fn parse(bytes: &[u8]) -> Result<FrameHeader, WireError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(WireError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        };
        let found = [h[0], h[1], h[2], h[3]];
        if found != MAGIC {
            return Err(WireError::BadMagic { found });
        }
        let version = u16::from_be_bytes([h[4], h[5]]);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(WireError::UnsupportedVersion { version });
        }
        let kind = FrameKind::from_u8(h[6]).ok_or(WireError::UnknownKind { kind: h[6] })?;
        if h[7] != 0 {
            return Err(WireError::ReservedFlags { flags: h[7] });
        }
        let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        if len as usize > MAX_PAYLOAD_LEN {
            return Err(WireError::Oversize {
                len: u64::from(len),
                max: MAX_PAYLOAD_LEN,
            });
        }
        Ok(FrameHeader {
            version,
            kind,
            len: len as usize,
        })
    }
}

fn encode_body<T: Serialize>(body: &T, out: &mut Vec<u8>) -> Result<(), WireError> {
    let bytes = bincode::serde::encode_to_vec(body, config()).map_err(|e| WireError::Encode {
        detail: e.to_string(),
    })?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Encodes `msg` as one frame of the current protocol version, appended to `out`.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    msg.validate()?;
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&crate::proto::messages::PROTOCOL_VERSION.to_be_bytes());
    out.push(FrameKind::of(msg) as u8);
    out.push(0);
    out.extend_from_slice(&[0; 4]);
    let body = start + HEADER_LEN;
    let encoded = match msg {
        Message::Hello(m) => encode_body(m, out),
        Message::Welcome(m) => encode_body(m, out),
        Message::Refused(m) => encode_body(m, out),
        Message::Push(m) => encode_body(m, out),
        Message::PushAck(m) => encode_body(m, out),
        Message::Pull(m) => encode_body(m, out),
        Message::PullBatch(m) => encode_body(m, out),
        Message::PullAck(m) => encode_body(m, out),
        Message::Subscribe(m) => encode_body(m, out),
        Message::BlobRequest(m) => encode_body(m, out),
        Message::BlobChunk(m) => encode_body(m, out),
        Message::Ping(m) => encode_body(m, out),
        Message::Pong(m) => encode_body(m, out),
        Message::Close(m) => encode_body(m, out),
        Message::BlobPut(m) => encode_body(m, out),
        Message::BlobPutAck(m) => encode_body(m, out),
    };
    let len = out.len() - body;
    if let Err(e) = encoded {
        out.truncate(start);
        return Err(e);
    }
    if len > MAX_PAYLOAD_LEN {
        out.truncate(start);
        return Err(WireError::Oversize {
            len: len as u64,
            max: MAX_PAYLOAD_LEN,
        });
    }
    // `len <= MAX_PAYLOAD_LEN < u32::MAX`, checked just above.
    out[start + 8..body].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

fn decode_body<T: DeserializeOwned>(kind: FrameKind, payload: &[u8]) -> Result<T, WireError> {
    let (body, used): (T, usize) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| WireError::Malformed {
            kind,
            detail: e.to_string(),
        })?;
    if used != payload.len() {
        return Err(WireError::TrailingBytes {
            kind,
            extra: payload.len() - used,
        });
    }
    Ok(body)
}

/// Decodes the payload of a frame whose header is `header`.
pub fn decode_payload(header: &FrameHeader, payload: &[u8]) -> Result<Message, WireError> {
    let kind = header.kind;
    let msg = match kind {
        FrameKind::Hello => Message::Hello(decode_body(kind, payload)?),
        FrameKind::Welcome => Message::Welcome(decode_body(kind, payload)?),
        FrameKind::Refused => Message::Refused(decode_body(kind, payload)?),
        FrameKind::Push => Message::Push(decode_body(kind, payload)?),
        FrameKind::PushAck => Message::PushAck(decode_body(kind, payload)?),
        FrameKind::Pull => Message::Pull(decode_body(kind, payload)?),
        FrameKind::PullBatch => Message::PullBatch(decode_body(kind, payload)?),
        FrameKind::PullAck => Message::PullAck(decode_body(kind, payload)?),
        FrameKind::Subscribe => Message::Subscribe(decode_body(kind, payload)?),
        FrameKind::BlobRequest => Message::BlobRequest(decode_body(kind, payload)?),
        FrameKind::BlobChunk => Message::BlobChunk(decode_body(kind, payload)?),
        FrameKind::Ping => Message::Ping(decode_body(kind, payload)?),
        FrameKind::Pong => Message::Pong(decode_body(kind, payload)?),
        FrameKind::Close => Message::Close(decode_body(kind, payload)?),
        FrameKind::BlobPut => Message::BlobPut(decode_body(kind, payload)?),
        FrameKind::BlobPutAck => Message::BlobPutAck(decode_body(kind, payload)?),
    };
    msg.validate()?;
    Ok(msg)
}

/// Decodes the one frame at the start of `bytes`; returns the message and the bytes it used.
pub fn decode(bytes: &[u8]) -> Result<(Message, usize), WireError> {
    let header = FrameHeader::parse(bytes)?;
    let end = HEADER_LEN + header.len;
    let Some(payload) = bytes.get(HEADER_LEN..end) else {
        return Err(WireError::Truncated {
            needed: end,
            available: bytes.len(),
        });
    };
    Ok((decode_payload(&header, payload)?, end))
}

/// Splits a byte stream into messages: feed bytes as they arrive, pop messages as they complete.
///
/// The header is checked as soon as its 12 bytes are in, so an oversize or foreign frame is
/// refused before its payload is buffered. After the first error the decoder is spent and
/// returns that error again: a stream cannot be resynchronized.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<WireError>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes received from the stream. Call [`next_message`](Self::next_message) until
    /// it returns `Ok(None)` after each feed: the buffer then holds at most one partial frame,
    /// so it stays under [`MAX_FRAME_LEN`] plus one read.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `Ok(None)` if more bytes are needed, or the stream's error.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let pending = &self.buf[self.start..];
        if pending.len() < HEADER_LEN {
            return Ok(None);
        }
        let result = FrameHeader::parse(pending).and_then(|header| {
            let end = HEADER_LEN + header.len;
            match pending.get(HEADER_LEN..end) {
                None => Ok(None),
                Some(payload) => decode_payload(&header, payload).map(|m| Some((m, end))),
            }
        });
        match result {
            Ok(Some((msg, used))) => {
                self.start += used;
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::debug!(error = %e, code = e.code(), "bad frame");
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Call at the end of the stream: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let available = self.buffered();
        if available == 0 {
            return Ok(());
        }
        let needed = match FrameHeader::parse(&self.buf[self.start..]) {
            Ok(h) => HEADER_LEN + h.len,
            Err(WireError::Truncated { needed, .. }) => needed,
            Err(e) => return Err(e),
        };
        Err(WireError::Truncated { needed, available })
    }
}
