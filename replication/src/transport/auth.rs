//! Token presentation: the device's first bidirectional stream carries its signed token.
//!
//! ```text
//! device                                   hub
//!   open_bi, frame(token bytes)  ───────▶  verify signature, known, not revoked
//!                                ◀───────  frame([AUTH_OK])        (stream stays open: the
//!                                          or close(AUTH_*, reason)  session's control stream)
//! ```
//!
//! A refused device sees the connection closed with one of the `codes::AUTH_*` codes.
//!
//! The exchange uses [`FrameFormat::LengthPrefixed`](super::FrameFormat); the session may switch
//! both halves with `with_format` afterwards (the device sends nothing between its token and
//! the hub's answer, so no frame of the new format can be buffered yet). The hub verifies the
//! token here, before any session state exists for the connection.

use std::time::Duration;

use quinn::{Connection, ConnectionError, VarInt};

use crate::credential::MAX_TOKEN_BYTES;
use crate::credential::{Credential, SignedToken, Token, TokenError, TokenRegistry, TokenVerifier};

use super::codes;
use super::config::ConnectionLimits;
use super::endpoint::{ConnectError, DeviceEndpoint, EndpointError};
use super::framed::{open_bi_framed, FrameError, FrameReader, FrameWriter};

/// The hub's reply accepting a token.
const AUTH_OK: &[u8] = &[0x01];

/// Why authentication failed (on either side).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer did not complete the exchange in time.
    #[error("authentication timed out")]
    Timeout,
    /// (Hub) the device's token was refused; the connection was closed with its code.
    #[error("token refused: {0}")]
    Token(#[from] TokenError),
    /// (Device) the hub refused the token and closed the connection with this code and reason.
    #[error("hub refused the token (code {code:#x}): {reason}")]
    Refused {
        /// The application close code (one of `codes::AUTH_*`).
        code: u64,
        /// The hub's reason text.
        reason: String,
    },
    /// (Device) the hub answered something other than acceptance.
    #[error("unexpected reply from the hub")]
    UnexpectedReply,
    /// The stream failed or carried invalid frames.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A device the hub authenticated, with its control stream.
#[derive(Debug)]
pub struct AuthenticatedDevice {
    /// The verified token: device, user, app.
    pub token: Token,
    /// Writer of the control stream.
    pub writer: FrameWriter,
    /// Reader of the control stream.
    pub reader: FrameReader,
}

/// The close code for a refused token.
fn close_code(err: &TokenError) -> u32 {
    match err {
        TokenError::BadSignature => codes::AUTH_FORGED,
        TokenError::Unknown(_) => codes::AUTH_UNKNOWN,
        TokenError::Revoked(_) => codes::AUTH_REVOKED,
        TokenError::Unavailable(_) => codes::AUTH_UNAVAILABLE,
        _ => codes::AUTH_MALFORMED,
    }
}

/// (Hub) waits for the device's token on its first bidirectional stream and checks it, for at
/// most `limits.auth_timeout_ms`.
///
/// On success grants the connection `limits` ([`ConnectionLimits::grant`]), replies and returns the stream for the session. On failure closes the connection
/// with the matching `codes::AUTH_*` code and returns the reason; nothing else is read.
#[tracing::instrument(skip_all, fields(remote = %conn.remote_address()))]
pub async fn accept_device<R: TokenRegistry + ?Sized>(
    conn: &Connection,
    verifier: &TokenVerifier,
    registry: &R,
    limits: &ConnectionLimits,
) -> Result<AuthenticatedDevice, AuthError> {
    let timeout = Duration::from_millis(limits.auth_timeout_ms);
    let max_frame_bytes = limits.max_frame_bytes;
    let first = tokio::time::timeout(timeout, async {
        // The token frame is small: cap it, whatever the session's frame limit.
        let (send, recv) = conn.accept_bi().await?;
        let writer = FrameWriter::new(send, max_frame_bytes);
        let mut reader = FrameReader::new(recv, MAX_TOKEN_BYTES);
        let bytes = reader.read_frame().await?;
        reader.set_max_frame_bytes(max_frame_bytes);
        Ok::<_, FrameError>((writer, reader, bytes))
    })
    .await;
    let (mut writer, reader, bytes) = match first {
        Err(_) => {
            conn.close(VarInt::from_u32(codes::AUTH_TIMEOUT), b"no token in time");
            return Err(AuthError::Timeout);
        }
        Ok(Err(e)) => {
            if e.is_peer_violation() {
                conn.close(
                    VarInt::from_u32(codes::AUTH_MALFORMED),
                    e.to_string().as_bytes(),
                );
            }
            return Err(AuthError::Frame(e));
        }
        Ok(Ok((_, _, None))) => {
            conn.close(VarInt::from_u32(codes::AUTH_MALFORMED), b"no token");
            return Err(AuthError::Token(TokenError::Malformed("no token")));
        }
        Ok(Ok((w, r, Some(bytes)))) => (w, r, bytes),
    };
    match verifier.verify(&bytes, registry) {
        Ok(token) => {
            // Only now the streams and window a session needs (the server config starts every
            // connection with just the token's stream: `pre_auth_transport_config`).
            limits.grant(conn);
            writer.write_frame(AUTH_OK).await?;
            tracing::info!(device = %token.device_id, user = %token.user_id, app = %token.app, "device authenticated");
            Ok(AuthenticatedDevice {
                token,
                writer,
                reader,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing device token");
            conn.close(VarInt::from_u32(close_code(&e)), e.to_string().as_bytes());
            Err(AuthError::Token(e))
        }
    }
}

/// (Device) presents `token` on a new bidirectional stream and waits for the hub's answer.
///
/// Returns the stream, which becomes the session's control stream.
#[tracing::instrument(skip_all, fields(hub = %conn.remote_address()))]
pub async fn authenticate(
    conn: &Connection,
    token: &SignedToken,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(FrameWriter, FrameReader), AuthError> {
    let exchange = async {
        let (mut writer, mut reader) = open_bi_framed(conn, max_frame_bytes).await?;
        writer.write_frame(token.as_bytes()).await?;
        let reply = reader.read_frame().await?;
        Ok::<_, FrameError>((writer, reader, reply))
    };
    let result = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(AuthError::Timeout),
        Ok(r) => r,
    };
    match result {
        Ok((writer, reader, Some(reply))) if reply == AUTH_OK => Ok((writer, reader)),
        Ok(_) => Err(AuthError::UnexpectedReply),
        Err(e) => Err(refusal(conn, e)),
    }
}

/// Turns a failed exchange into [`AuthError::Refused`] when the hub closed with a reason.
fn refusal(conn: &Connection, e: FrameError) -> AuthError {
    if let Some(ConnectionError::ApplicationClosed(close)) = conn.close_reason() {
        return AuthError::Refused {
            code: close.error_code.into_inner(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        };
    }
    AuthError::Frame(e)
}

/// Why a device could not open an authenticated link to its hub.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The hub address in the credential did not resolve.
    #[error("cannot resolve hub address {address}: {reason}")]
    Resolve {
        /// The address as written in the credential.
        address: String,
        /// Why it did not resolve.
        reason: String,
    },
    /// The local endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The connection failed (wrong pin, refused, unreachable).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The hub refused the token, or the exchange failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// A device's authenticated connection to its hub, with the session's control stream.
#[derive(Debug)]
pub struct HubLink {
    /// The device's endpoint (keep it alive as long as the connection).
    pub endpoint: DeviceEndpoint,
    /// The connection (open blob streams on it).
    pub conn: Connection,
    /// Writer of the control stream.
    pub writer: FrameWriter,
    /// Reader of the control stream.
    pub reader: FrameReader,
}

/// (Device) resolves the credential's hub address, connects with its pin and presents its token.
#[tracing::instrument(skip_all, fields(hub = %credential.hub_address))]
pub async fn connect_with_credential(
    credential: &Credential,
    limits: ConnectionLimits,
) -> Result<HubLink, LinkError> {
    let resolve = |reason: String| LinkError::Resolve {
        address: credential.hub_address.clone(),
        reason,
    };
    let hub = tokio::net::lookup_host(credential.hub_address.as_str())
        .await
        .map_err(|e| resolve(e.to_string()))?
        .next()
        .ok_or_else(|| resolve("no addresses".to_owned()))?;
    let timeout = Duration::from_millis(limits.auth_timeout_ms);
    let max_frame_bytes = limits.max_frame_bytes;
    let endpoint = DeviceEndpoint::for_hub(hub, credential.cert_pin, limits)?;
    let conn = endpoint.connect(hub).await?;
    let (writer, reader) = authenticate(&conn, &credential.token, timeout, max_frame_bytes).await?;
    Ok(HubLink {
        endpoint,
        conn,
        writer,
        reader,
    })
}
