//! [`HubEndpoint`] (admission under limits) and [`DeviceEndpoint`] (pinned connections).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::{Connection, ConnectionError, Endpoint, EndpointConfig, TokioRuntime};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::Instrument;

use crate::credential::CertPin;

use super::config::{client_config, server_config, ConfigError, ConnectionLimits};
use super::identity::HubIdentity;
use super::verifier::{PinMismatch, PinnedServerVerifier};
use super::HUB_SERVER_NAME;

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The TLS or QUIC configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Creating or binding the UDP socket failed.
    #[error("UDP socket on {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a device could not connect to its hub.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The hub presented a certificate other than the pinned one.
    #[error(transparent)]
    PinMismatch(#[from] PinMismatch),
    /// The hub refused the connection (over its connection or handshake limit).
    #[error("hub refused the connection (busy)")]
    Refused,
    /// quinn could not start the connection (bad address, endpoint closed).
    #[error("cannot start connection: {0}")]
    Start(#[from] quinn::ConnectError),
    /// The handshake or connection failed (timeout, TLS alert, reset).
    #[error("connection failed: {0}")]
    Connection(#[from] ConnectionError),
}

/// Creates a UDP socket for `addr`, asking the OS for bigger buffers (logged if it grants less).
///
/// quinn's default (the OS default, ~208 KB on Linux) loses packets at full speed.
fn bind_udp(
    addr: SocketAddr,
    limits: &ConnectionLimits,
) -> Result<(std::net::UdpSocket, usize), EndpointError> {
    let err = |source| EndpointError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Dual-stack where the OS allows it; a v6-only socket still works for v6 peers.
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(limits.udp_recv_buffer_bytes) {
        tracing::warn!(error = %e, "cannot set UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(limits.udp_send_buffer_bytes) {
        tracing::warn!(error = %e, "cannot set UDP send buffer size");
    }
    let granted = socket.recv_buffer_size().unwrap_or(0);
    // Linux reports twice the usable size; it caps requests at net.core.rmem_max.
    if granted < limits.udp_recv_buffer_bytes {
        tracing::info!(
            requested = limits.udp_recv_buffer_bytes,
            granted,
            "OS granted a smaller UDP receive buffer (raise net.core.rmem_max for full speed)"
        );
    }
    socket.bind(&addr.into()).map_err(err)?;
    Ok((socket.into(), granted))
}

/// The hub's listening endpoint, admitting connections under [`ConnectionLimits`].
#[derive(Debug)]
pub struct HubEndpoint {
    endpoint: Endpoint,
    limits: ConnectionLimits,
    pending: Arc<AtomicUsize>,
    refused: AtomicU64,
    udp_recv_buffer_bytes: usize,
}

/// A connection attempt the hub admitted; complete its handshake in its own task.
#[derive(Debug)]
pub struct PendingConnection {
    connecting: quinn::Connecting,
    remote: SocketAddr,
    timeout: std::time::Duration,
    _slot: PendingSlot,
}

/// Holds one of the hub's pending-handshake slots until dropped.
#[derive(Debug)]
struct PendingSlot(Arc<AtomicUsize>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HubEndpoint {
    /// Binds `addr` and serves `identity` under `limits`.
    pub fn bind(
        addr: SocketAddr,
        identity: &HubIdentity,
        limits: ConnectionLimits,
    ) -> Result<Self, EndpointError> {
        let config = server_config(identity, &limits)?;
        let (socket, granted) = bind_udp(addr, &limits)?;
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr, source })?;
        tracing::info!(%addr, pin = %identity.pin(), "hub endpoint listening");
        Ok(Self {
            endpoint,
            limits,
            pending: Arc::new(AtomicUsize::new(0)),
            refused: AtomicU64::new(0),
            udp_recv_buffer_bytes: granted,
        })
    }

    /// The address the endpoint is bound to (useful after binding port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.endpoint.local_addr()
    }

    /// The UDP receive buffer the OS reported after our request.
    pub fn udp_recv_buffer_bytes(&self) -> usize {
        self.udp_recv_buffer_bytes
    }

    /// Handshakes admitted and not yet completed or dropped.
    pub fn pending_handshakes(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Connection attempts refused so far for being over a limit (for `/metrics`).
    pub fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The underlying quinn endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The limits this endpoint enforces.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The next admitted connection attempt; `None` once the endpoint is closed.
    ///
    /// Attempts beyond [`ConnectionLimits::max_pending_handshakes`] or
    /// [`ConnectionLimits::max_connections`] are refused (the client sees `CONNECTION_REFUSED`);
    /// once half the handshake slots are taken, unvalidated addresses must first answer a retry,
    /// which costs a spoofed flood its amplification.
    pub async fn accept(&self) -> Option<PendingConnection> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let remote = incoming.remote_address();
            let pending = self.pending.load(Ordering::Acquire);
            let open = self.endpoint.open_connections();
            if pending >= self.limits.max_pending_handshakes || open >= self.limits.max_connections
            {
                tracing::warn!(%remote, pending, open, "refusing connection: hub at its limit");
                incoming.refuse();
                self.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if pending * 2 >= self.limits.max_pending_handshakes
                && !incoming.remote_address_validated()
                && incoming.may_retry()
            {
                tracing::debug!(%remote, pending, "asking for address validation (retry)");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            match incoming.accept() {
                Ok(connecting) => {
                    self.pending.fetch_add(1, Ordering::AcqRel);
                    return Some(PendingConnection {
                        connecting,
                        remote,
                        timeout: std::time::Duration::from_millis(self.limits.handshake_timeout_ms),
                        _slot: PendingSlot(self.pending.clone()),
                    });
                }
                Err(e) => tracing::debug!(%remote, error = %e, "connection attempt failed"),
            }
        }
    }

    /// Closes every connection with `code` and stops accepting.
    pub fn close(&self, code: u32, reason: &str) {
        self.endpoint
            .close(quinn::VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until every connection's close has been sent (call after [`HubEndpoint::close`]).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl PendingConnection {
    /// The address the attempt came from.
    pub fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// Completes the handshake within [`ConnectionLimits::handshake_timeout_ms`]
    /// ([`ConnectionError::TimedOut`] after that). The pending slot is released when this
    /// returns or is dropped.
    pub async fn complete(self) -> Result<Connection, ConnectionError> {
        let remote = self.remote;
        let handshake = self
            .connecting
            .instrument(tracing::debug_span!("handshake", %remote));
        let conn = match tokio::time::timeout(self.timeout, handshake).await {
            Ok(result) => result?,
            Err(_) => {
                tracing::info!(%remote, "handshake timed out");
                return Err(ConnectionError::TimedOut);
            }
        };
        tracing::debug!(%remote, "handshake complete");
        Ok(conn)
    }
}

/// A device's client endpoint: connects only to the hub whose certificate matches its pin.
#[derive(Debug)]
pub struct DeviceEndpoint {
    endpoint: Endpoint,
    verifier: Arc<PinnedServerVerifier>,
    limits: ConnectionLimits,
}

impl DeviceEndpoint {
    /// A client endpoint on `local` (e.g. `0.0.0.0:0`) trusting only `pin`.
    pub fn bind(
        local: SocketAddr,
        pin: CertPin,
        limits: ConnectionLimits,
    ) -> Result<Self, EndpointError> {
        let (config, verifier) = client_config(pin, &limits)?;
        let (socket, _) = bind_udp(local, &limits)?;
        let mut endpoint = Endpoint::new(
            EndpointConfig::default(),
            None,
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind {
            addr: local,
            source,
        })?;
        endpoint.set_default_client_config(config);
        Ok(Self {
            endpoint,
            verifier,
            limits,
        })
    }

    /// A client endpoint on an ephemeral port of the same family as `hub`.
    pub fn for_hub(
        hub: SocketAddr,
        pin: CertPin,
        limits: ConnectionLimits,
    ) -> Result<Self, EndpointError> {
        let local: SocketAddr = if hub.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        Self::bind(local, pin, limits)
    }

    /// The limits this endpoint's connections use.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The underlying quinn endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Connects to the hub at `hub` (full 1-RTT handshake; 0-RTT is never used).
    pub async fn connect(&self, hub: SocketAddr) -> Result<Connection, ConnectError> {
        let span = tracing::debug_span!("connect", %hub);
        let connecting = self.endpoint.connect(hub, HUB_SERVER_NAME)?;
        match connecting.instrument(span).await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                if let Some(mismatch) = self.verifier.take_mismatch() {
                    return Err(ConnectError::PinMismatch(mismatch));
                }
                if matches!(e, ConnectionError::ConnectionClosed(ref c)
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
                {
                    return Err(ConnectError::Refused);
                }
                Err(ConnectError::Connection(e))
            }
        }
    }

    /// Closes all connections and waits until the close is sent.
    pub async fn shutdown(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(super::codes::DONE), b"");
        self.endpoint.wait_idle().await;
    }
}
