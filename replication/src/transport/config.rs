//! TLS and QUIC configuration: [`ConnectionLimits`], [`server_config`], [`client_config`].

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::credential::CertPin;

use super::identity::HubIdentity;
use super::verifier::PinnedServerVerifier;
use super::ALPN;

/// Why a TLS or QUIC configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// rustls refused the protocol versions, the certificate or the key.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC's initial packets need.
    #[error("QUIC needs TLS_AES_128_GCM_SHA256: {0}")]
    NoInitialCipherSuite(#[from] NoInitialCipherSuite),
}

/// Limits for one endpoint's connections: what an internet-facing hub (or a phone) accepts.
///
/// [`ConnectionLimits::hub`] is the hub's default, [`ConnectionLimits::device`] the device's.
/// Fields are public so a deployment can adjust one and keep the others.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionLimits {
    /// Bidirectional streams the peer may have open at once (control stream + blob requests).
    pub max_bidi_streams: u32,
    /// Unidirectional streams the peer may have open at once (one per blob transfer).
    pub max_uni_streams: u32,
    /// Bytes the peer may send on one stream before we read them.
    pub stream_receive_window_bytes: u32,
    /// Bytes the peer may send on the whole connection before we read them.
    pub receive_window_bytes: u32,
    /// Bytes we keep in flight to the peer.
    pub send_window_bytes: u64,
    /// A connection silent this long is dropped (also bounds a stalled handshake).
    pub idle_timeout_ms: u32,
    /// Send a keep-alive after this much silence; `None` to never (lets NATs forget us).
    pub keep_alive_interval_ms: Option<u32>,
    /// Handshakes in progress beyond which new connection attempts are refused.
    pub max_pending_handshakes: usize,
    /// Open connections (including handshaking) beyond which new attempts are refused.
    pub max_connections: usize,
    /// Connection attempts quinn buffers before the application sees them.
    pub max_incoming: usize,
    /// Bytes of early packets buffered per not-yet-accepted connection attempt.
    pub incoming_buffer_bytes: u64,
    /// Bytes of early packets buffered over all not-yet-accepted attempts.
    pub incoming_buffer_total_bytes: u64,
    /// UDP socket receive buffer to ask the OS for (it may grant less: see `net.core.rmem_max`).
    pub udp_recv_buffer_bytes: usize,
    /// UDP socket send buffer to ask the OS for.
    pub udp_send_buffer_bytes: usize,
    /// Largest frame accepted on a stream; a larger one closes the connection.
    pub max_frame_bytes: usize,
    /// Time a hub gives a new connection to present its token.
    pub auth_timeout_ms: u64,
    /// Time a handshake may take before its pending slot is freed (well under the idle timeout,
    /// so slow or stalled handshakes cannot hold the slots).
    pub handshake_timeout_ms: u64,
}

/// The connection window a hub grants before authentication: room for the token frame
/// ([`crate::credential::MAX_TOKEN_BYTES`] plus framing), little more.
pub const PRE_AUTH_RECEIVE_WINDOW: u32 = 16 << 10;

impl ConnectionLimits {
    /// Limits for a hub facing the internet: a few streams per device, windows sized so 1,000
    /// devices fit in memory, a cap on handshakes and connections, keep-alives fit for mobile.
    pub fn hub() -> Self {
        Self {
            max_bidi_streams: 8,
            max_uni_streams: 16,
            stream_receive_window_bytes: 1 << 20,
            receive_window_bytes: 4 << 20,
            send_window_bytes: 8 << 20,
            // Mobile carriers drop UDP NAT mappings after ~30 s; keep-alive well inside that and
            // give a device on a flaky link a minute before we forget it.
            idle_timeout_ms: 60_000,
            keep_alive_interval_ms: Some(15_000),
            max_pending_handshakes: 256,
            max_connections: 10_000,
            max_incoming: 1_024,
            incoming_buffer_bytes: 64 << 10,
            incoming_buffer_total_bytes: 16 << 20,
            udp_recv_buffer_bytes: 8 << 20,
            udp_send_buffer_bytes: 4 << 20,
            max_frame_bytes: 4 << 20,
            auth_timeout_ms: 10_000,
            handshake_timeout_ms: 10_000,
        }
    }

    /// Limits for a device: one hub connection, windows sized for a phone.
    pub fn device() -> Self {
        Self {
            max_bidi_streams: 8,
            max_uni_streams: 16,
            stream_receive_window_bytes: 2 << 20,
            receive_window_bytes: 8 << 20,
            send_window_bytes: 4 << 20,
            idle_timeout_ms: 60_000,
            keep_alive_interval_ms: Some(15_000),
            max_pending_handshakes: 0,
            max_connections: 0,
            max_incoming: 0,
            incoming_buffer_bytes: 0,
            incoming_buffer_total_bytes: 0,
            udp_recv_buffer_bytes: 2 << 20,
            udp_send_buffer_bytes: 1 << 20,
            max_frame_bytes: 4 << 20,
            auth_timeout_ms: 10_000,
            handshake_timeout_ms: 10_000,
        }
    }

    /// What a hub grants a connection before its device has shown a valid token: the one
    /// bidirectional stream the token travels on, no unidirectional streams, and a connection
    /// window of [`PRE_AUTH_RECEIVE_WINDOW`] bytes, so a client with no credential cannot make
    /// the hub buffer megabytes per connection. [`ConnectionLimits::grant`] opens the rest.
    pub fn pre_auth_transport_config(&self) -> TransportConfig {
        let mut t = self.transport_config();
        t.max_concurrent_bidi_streams(VarInt::from_u32(1))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .receive_window(VarInt::from_u32(PRE_AUTH_RECEIVE_WINDOW));
        t
    }

    /// Grants an authenticated connection the streams and window of these limits.
    pub fn grant(&self, conn: &quinn::Connection) {
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(self.max_bidi_streams));
        conn.set_max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams));
        conn.set_receive_window(VarInt::from_u32(self.receive_window_bytes));
    }

    /// The quinn transport configuration for these limits.
    pub fn transport_config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window_bytes))
            .receive_window(VarInt::from_u32(self.receive_window_bytes))
            .send_window(self.send_window_bytes)
            .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
                self.idle_timeout_ms,
            ))))
            .keep_alive_interval(
                self.keep_alive_interval_ms
                    .map(|ms| Duration::from_millis(u64::from(ms))),
            );
        t
    }
}

impl Default for ConnectionLimits {
    /// The hub's limits.
    fn default() -> Self {
        Self::hub()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The hub's QUIC server configuration: its identity, ALPN [`ALPN`], TLS 1.3, **0-RTT off**
/// (`max_early_data_size = 0`; quinn's convenience constructor turns it on), and `limits`.
pub fn server_config(
    identity: &HubIdentity,
    limits: &ConnectionLimits,
) -> Result<quinn::ServerConfig, ConfigError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data can be replayed, and no sync message is safe to apply twice blindly.
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config
        .transport_config(Arc::new(limits.pre_auth_transport_config()))
        .max_incoming(limits.max_incoming)
        .incoming_buffer_size(limits.incoming_buffer_bytes)
        .incoming_buffer_size_total(limits.incoming_buffer_total_bytes)
        // Phones move between Wi-Fi and cellular: let them keep their connection.
        .migration(true);
    Ok(config)
}

/// A device's QUIC client configuration: trusts only the certificate `pin` names, ALPN
/// [`ALPN`], TLS 1.3, early data never enabled, and `limits`.
///
/// Also returns the verifier, which remembers a pin mismatch for the error message.
pub fn client_config(
    pin: CertPin,
    limits: &ConnectionLimits,
) -> Result<(quinn::ClientConfig, Arc<PinnedServerVerifier>), ConfigError> {
    let provider = provider();
    let verifier = PinnedServerVerifier::new(pin, provider.signature_verification_algorithms);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Never offer early data (and the transport never calls `Connecting::into_0rtt`).
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(limits.transport_config()));
    Ok((config, verifier))
}
