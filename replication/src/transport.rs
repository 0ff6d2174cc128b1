//! The QUIC transport: the thin async shell around the sans-IO sync sessions.
//!
//! Built on quinn 0.11 and rustls 0.23 (ring provider), behind the `quic` feature:
//!
//! - [`HubIdentity`]: the hub's self-signed certificate and key (rcgen), saved as PEM.
//! - [`PinnedServerVerifier`]: a device accepts exactly the certificate its credential pins.
//! - [`server_config`] / [`client_config`]: ALPN [`ALPN`], TLS 1.3 only, **no 0-RTT** (every sync
//!   message changes state, so none may be replayed), and the [`ConnectionLimits`] of a hub that
//!   faces the internet.
//! - [`HubEndpoint`] admits connections under a cap on pending handshakes and open connections;
//!   [`DeviceEndpoint`] connects with a pin. Both ask the OS for a bigger UDP receive buffer.
//! - [`authenticate`] / [`accept_device`]: the device presents its [`SignedToken`] on the first
//!   bidirectional stream, which then becomes the session's control stream.
//! - [`FrameWriter`] / [`FrameReader`]: length-prefixed frames with a maximum size; blob chunks
//!   travel on their own streams ([`open_blob_stream`], [`accept_blob_stream`]).
//! - [`drive_session`]: one loop per connection feeding a [`FrameSession`] (the adapter point for
//!   the sans-IO sessions in `replication::proto`).
//! - [`baseline`]: raw QUIC throughput and round trip, the reference the sync bench compares to.
//!
//! Framing is a plain `u32` big-endian length prefix by default, or the wire format's own
//! 12-byte header ([`FrameFormat::WIRE_V1`]) so its frames travel unchanged.
//!
//! [`SignedToken`]: crate::credential::SignedToken

mod auth;
pub mod baseline;
mod bus;
mod config;
mod driver;
mod endpoint;
mod framed;
mod identity;
mod verifier;

pub use auth::{
    accept_device, authenticate, connect_with_credential, AuthError, AuthenticatedDevice, HubLink,
    LinkError,
};
pub use bus::ChangeBus;
pub use config::{
    client_config, server_config, ConfigError, ConnectionLimits, PRE_AUTH_RECEIVE_WINDOW,
};
pub use driver::{
    drive_session, drive_session_with_options, drive_session_with_wake, stall_limit, CloseReason,
    DriveError, DriveOptions, DriveOutcome, FrameSession, SessionClock, SLOWEST_PEER_BYTES_PER_SEC,
    STALL_SLACK,
};
pub use endpoint::{ConnectError, DeviceEndpoint, EndpointError, HubEndpoint, PendingConnection};
pub use framed::{
    accept_bi_framed, accept_blob_stream, open_bi_framed, open_blob_stream, FrameError,
    FrameFormat, FrameReader, FrameWriter, FRAME_HEADER_BYTES,
};
pub use identity::{HubIdentity, IdentityError};
pub use verifier::{PinMismatch, PinnedServerVerifier};

/// The ALPN protocol id of fieldsync's sync protocol, version 1.
pub const ALPN: &[u8] = b"fieldsync/1";

/// The TLS server name devices send. Pinning, not the name, identifies the hub.
pub const HUB_SERVER_NAME: &str = "fieldsync-hub";

/// QUIC application close codes used by the transport.
///
/// Codes below `0x100` are the transport's; sessions pick their own codes (see [`CloseReason`]),
/// which should stay clear of this range.
pub mod codes {
    /// Normal close: the session ended.
    pub const DONE: u32 = 0x00;
    /// The peer sent an oversize, truncated or otherwise malformed frame.
    pub const FRAME_ERROR: u32 = 0x01;
    /// The hub is shutting down.
    pub const SHUTDOWN: u32 = 0x02;
    /// This side failed (e.g. its session produced a frame over the maximum size).
    pub const LOCAL_ERROR: u32 = 0x03;
    /// The peer stopped reading: a frame did not leave within `driver::stall_limit`.
    pub const STALLED: u32 = 0x04;
    /// A newer connection of the same device took over this one's session.
    pub const SUPERSEDED: u32 = 0x05;
    /// A session that ended on an error closes with this plus its own close code.
    pub const SESSION_BASE: u32 = 0x100;
    /// The device did not present its token in time.
    pub const AUTH_TIMEOUT: u32 = 0x10;
    /// The token is not a token (garbage, truncated or too large).
    pub const AUTH_MALFORMED: u32 = 0x11;
    /// The token's signature is invalid: forged, altered or from another hub.
    pub const AUTH_FORGED: u32 = 0x12;
    /// The hub has no record of the token.
    pub const AUTH_UNKNOWN: u32 = 0x13;
    /// The token was revoked.
    pub const AUTH_REVOKED: u32 = 0x14;
    /// The hub could not read its token records now; the device should retry later.
    pub const AUTH_UNAVAILABLE: u32 = 0x15;

    /// Whether a device should stop retrying after the hub closed with `code`: its
    /// credential is revoked, unknown, forged or malformed, which no retry changes.
    pub fn is_credential_refused(code: u64) -> bool {
        [AUTH_REVOKED, AUTH_UNKNOWN, AUTH_FORGED, AUTH_MALFORMED]
            .iter()
            .any(|c| u64::from(*c) == code)
    }
}
#[cfg(test)]
mod tests;
