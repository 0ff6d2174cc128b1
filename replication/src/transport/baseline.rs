//! Raw QUIC baselines on loopback: what the sync bench compares itself to.
//!
//! [`raw_stream_throughput`] sends bytes over one QUIC stream; [`round_trip_latencies`] times
//! request/response pairs on one bidirectional stream. Both use the real endpoints of this
//! module (pinned TLS, the [`ConnectionLimits`] you pass: the bench passes the hub's, which the
//! sync runs under too), so the only difference from a sync is the sync itself.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use quinn::Connection;

use super::config::ConnectionLimits;
use super::endpoint::{ConnectError, DeviceEndpoint, EndpointError, HubEndpoint};
use super::identity::{HubIdentity, IdentityError};

/// Why a baseline run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaselineError {
    /// The hub certificate could not be made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// An endpoint could not be bound.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The device could not connect.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The hub endpoint closed before the connection arrived.
    #[error("hub endpoint closed")]
    HubClosed,
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream write failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A stream read failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Reading to the end of a stream failed.
    #[error("read to end: {0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    /// A stream was closed locally.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The socket address could not be read.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The receiver got a different byte count than was sent.
    #[error("received {got} bytes, sent {sent}")]
    ByteCount {
        /// Bytes received.
        got: u64,
        /// Bytes sent.
        sent: u64,
    },
}

/// A hub and a device endpoint on 127.0.0.1 with one connection between them.
#[derive(Debug)]
pub struct LoopbackPair {
    /// The hub's endpoint.
    pub hub: HubEndpoint,
    /// The device's endpoint.
    pub device: DeviceEndpoint,
    /// The hub's side of the connection.
    pub hub_conn: Connection,
    /// The device's side of the connection.
    pub device_conn: Connection,
}

/// Hub limits with much bigger windows: how far raw QUIC goes when flow control never binds.
pub fn bulk_limits() -> ConnectionLimits {
    let mut limits = ConnectionLimits::hub();
    limits.stream_receive_window_bytes = 16 << 20;
    limits.receive_window_bytes = 32 << 20;
    limits.send_window_bytes = 32 << 20;
    limits
}

/// Sets up a hub and a device on loopback and connects them.
pub async fn loopback_pair(limits: ConnectionLimits) -> Result<LoopbackPair, BaselineError> {
    let identity = HubIdentity::generate("baseline hub")?;
    let hub = HubEndpoint::bind((Ipv4Addr::LOCALHOST, 0).into(), &identity, limits.clone())?;
    let hub_addr: SocketAddr = hub.local_addr()?;
    let device = DeviceEndpoint::for_hub(hub_addr, identity.pin(), limits)?;
    let (device_conn, hub_conn) = tokio::join!(device.connect(hub_addr), async {
        match hub.accept().await {
            Some(pending) => pending.complete().await.map_err(BaselineError::from),
            None => Err(BaselineError::HubClosed),
        }
    });
    let hub_conn = hub_conn?;
    // No token on this pair: grant what the hub grants an authenticated device.
    hub.limits().grant(&hub_conn);
    Ok(LoopbackPair {
        hub_conn,
        device_conn: device_conn?,
        hub,
        device,
    })
}

/// Bytes moved and the time it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Bytes delivered.
    pub bytes: u64,
    /// From the first write to the receiver's end of stream.
    pub elapsed: Duration,
}

impl Throughput {
    /// Mebibytes per second.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Microseconds per 64 KiB.
    pub fn us_per_64kib(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / (self.bytes as f64 / 65536.0).max(1e-9)
    }
}

/// Sends `total_bytes` from device to hub on one unidirectional stream in `write_bytes` writes.
pub async fn raw_stream_throughput(
    pair: &LoopbackPair,
    total_bytes: u64,
    write_bytes: usize,
) -> Result<Throughput, BaselineError> {
    let chunk = vec![0xA5u8; write_bytes.max(1)];
    let started = Instant::now();
    let send = async {
        let mut stream = pair.device_conn.open_uni().await?;
        let mut left = total_bytes;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
            stream.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        stream.finish()?;
        let _ = stream.stopped().await;
        Ok::<_, BaselineError>(())
    };
    let receive = async {
        let mut stream = pair.hub_conn.accept_uni().await?;
        let mut got = 0u64;
        while let Some(c) = stream
            .read_chunk(usize::MAX, true)
            .await
            .map_err(|e| BaselineError::Read(e.into()))?
        {
            got += c.bytes.len() as u64;
        }
        Ok::<_, BaselineError>(got)
    };
    let (sent, got) = tokio::join!(send, receive);
    sent?;
    let got = got?;
    let elapsed = started.elapsed();
    if got != total_bytes {
        return Err(BaselineError::ByteCount {
            got,
            sent: total_bytes,
        });
    }
    Ok(Throughput {
        bytes: got,
        elapsed,
    })
}

/// Times `samples` request/response exchanges of `payload_bytes` each way on one bidirectional
/// stream (the hub echoes). Returns the round trips, sorted.
pub async fn round_trip_latencies(
    pair: &LoopbackPair,
    samples: usize,
    payload_bytes: usize,
) -> Result<Vec<Duration>, BaselineError> {
    let request = vec![0x5Au8; payload_bytes];
    let echo = async {
        let (mut send, mut recv) = pair.hub_conn.accept_bi().await?;
        let mut buf = vec![0u8; payload_bytes];
        for _ in 0..samples {
            recv.read_exact(&mut buf).await?;
            send.write_all(&buf).await?;
        }
        send.finish()?;
        let _ = send.stopped().await;
        Ok::<_, BaselineError>(())
    };
    let client = async {
        let (mut send, mut recv) = pair.device_conn.open_bi().await?;
        let mut reply = vec![0u8; payload_bytes];
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            send.write_all(&request).await?;
            recv.read_exact(&mut reply).await?;
            times.push(t.elapsed());
        }
        send.finish()?;
        Ok::<_, BaselineError>(times)
    };
    let (echoed, times) = tokio::join!(echo, client);
    echoed?;
    let mut times = times?;
    times.sort_unstable();
    Ok(times)
}

/// The `p`-th percentile (0.0–1.0) of sorted durations; zero if empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
