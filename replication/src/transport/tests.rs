//! Tests over real QUIC on 127.0.0.1: pinning, tokens, framing, the driver, limits, no 0-RTT.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use quinn::ConnectionError;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::*;
use crate::credential::{HubSigningKey, MemoryTokenRegistry, SignedToken, Token, TokenError};
use crate::wire::FrameKind;

const STEP: Duration = Duration::from_secs(10);

/// Echoes frames; `close` ends the session, `bad…` is refused, `timer:N` asks for a tick in N ms.
#[derive(Debug, Default)]
struct EchoSession {
    out: Vec<Vec<u8>>,
    timer_ms: Option<u64>,
    closed: bool,
}

impl FrameSession for EchoSession {
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
        if bytes == b"close" {
            self.out.push(b"bye".to_vec());
            self.closed = true;
        } else if bytes.starts_with(b"bad") {
            return Err(CloseReason::new(0x1000, "bad frame"));
        } else if let Some(ms) = bytes.strip_prefix(b"timer:") {
            let ms: u64 = std::str::from_utf8(ms).unwrap().parse().unwrap();
            self.timer_ms = Some(now_ms + ms);
        } else {
            self.out.push(bytes.to_vec());
        }
        Ok(())
    }
    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }
    fn poll_timeout(&self) -> Option<u64> {
        self.timer_ms
    }
    fn handle_timeout(&mut self, _now_ms: u64) {
        self.timer_ms = None;
        self.out.push(b"tick".to_vec());
    }
    fn is_closed(&self) -> bool {
        self.closed
    }
}

/// What a hub connection task ended with.
#[derive(Debug)]
enum HubEvent {
    Auth(Result<Token, String>),
    Driven(Result<DriveOutcome, String>),
}

struct TestHub {
    endpoint: Arc<HubEndpoint>,
    addr: SocketAddr,
    identity: HubIdentity,
    key: HubSigningKey,
    registry: Arc<RwLock<MemoryTokenRegistry>>,
    events: mpsc::UnboundedReceiver<(Uuid, HubEvent)>,
}

impl TestHub {
    fn start(limits: ConnectionLimits) -> Self {
        let identity = HubIdentity::generate("test hub").unwrap();
        let endpoint = Arc::new(
            HubEndpoint::bind((Ipv4Addr::LOCALHOST, 0).into(), &identity, limits).unwrap(),
        );
        let addr = endpoint.local_addr().unwrap();
        let key = HubSigningKey::generate().unwrap();
        let registry = Arc::new(RwLock::new(MemoryTokenRegistry::new()));
        let (tx, events) = mpsc::unbounded_channel();
        let (ep, verifier, reg) = (endpoint.clone(), key.verifier(), registry.clone());
        tokio::spawn(async move {
            while let Some(pending) = ep.accept().await {
                let (verifier, reg, tx) = (verifier.clone(), reg.clone(), tx.clone());
                let limits = ep.limits().clone();
                tokio::spawn(async move {
                    let Ok(conn) = pending.complete().await else {
                        return;
                    };
                    let auth = accept_device(&conn, &verifier, &*reg, &limits).await;
                    let mut device = match auth {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = tx.send((Uuid::nil(), HubEvent::Auth(Err(e.to_string()))));
                            return;
                        }
                    };
                    let id = device.token.device_id;
                    let _ = tx.send((id, HubEvent::Auth(Ok(device.token.clone()))));
                    let mut session = EchoSession::default();
                    let clock = SessionClock::new(0);
                    let outcome = drive_session(
                        &mut session,
                        &conn,
                        &mut device.writer,
                        &mut device.reader,
                        &clock,
                    )
                    .await;
                    let _ = tx.send((id, HubEvent::Driven(outcome.map_err(|e| e.to_string()))));
                });
            }
        });
        Self {
            endpoint,
            addr,
            identity,
            key,
            registry,
            events,
        }
    }

    fn enroll(&self, device: u128) -> SignedToken {
        let token = Token {
            device_id: Uuid::from_u128(device),
            user_id: format!("user{device}"),
            app: "field-service".into(),
            issued_at_ms: 1,
            token_id: Uuid::new_v4(),
        };
        let signed = self.key.sign(&token).unwrap();
        self.registry.write().unwrap().insert_issued(token.token_id);
        signed
    }

    async fn event(&mut self) -> (Uuid, HubEvent) {
        tokio::time::timeout(STEP, self.events.recv())
            .await
            .unwrap()
            .unwrap()
    }
}

struct TestDevice {
    _endpoint: DeviceEndpoint,
    conn: quinn::Connection,
    writer: FrameWriter,
    reader: FrameReader,
}

impl TestDevice {
    async fn connect(hub: &TestHub, token: &SignedToken) -> Result<Self, AuthError> {
        let limits = ConnectionLimits::device();
        let endpoint = DeviceEndpoint::for_hub(hub.addr, hub.identity.pin(), limits).unwrap();
        let conn = endpoint.connect(hub.addr).await.unwrap();
        let (writer, reader) = authenticate(&conn, token, STEP, 1 << 20).await?;
        Ok(Self {
            _endpoint: endpoint,
            conn,
            writer,
            reader,
        })
    }

    async fn echo(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.writer.write_frame(bytes).await.unwrap();
        self.read().await.unwrap()
    }

    async fn read(&mut self) -> Option<Vec<u8>> {
        tokio::time::timeout(STEP, self.reader.read_frame())
            .await
            .unwrap()
            .unwrap()
    }

    async fn closed(&self) -> ConnectionError {
        tokio::time::timeout(STEP, self.conn.closed())
            .await
            .unwrap()
    }
}

fn app_code(e: &ConnectionError) -> Option<u64> {
    match e {
        ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

#[tokio::test]
async fn frames_echo_through_the_driver_and_the_timer_fires() {
    let mut hub = TestHub::start(ConnectionLimits::hub());
    let token = hub.enroll(1);
    let mut dev = TestDevice::connect(&hub, &token).await.unwrap();
    let (id, ev) = hub.event().await;
    assert_eq!(id, Uuid::from_u128(1));
    assert!(
        matches!(ev, HubEvent::Auth(Ok(ref t)) if t.user_id == "user1" && t.app == "field-service")
    );

    assert_eq!(dev.echo(b"hello").await, b"hello");
    assert_eq!(dev.echo(b"").await, b"");
    let big = vec![7u8; 300_000];
    assert_eq!(dev.echo(&big).await, big);
    // Many frames in flight at once, then read them back in order.
    for i in 0..100u32 {
        dev.writer.write_frame(&i.to_be_bytes()).await.unwrap();
    }
    for i in 0..100u32 {
        assert_eq!(dev.read().await.unwrap(), i.to_be_bytes());
    }
    dev.writer.write_frame(b"timer:30").await.unwrap();
    assert_eq!(dev.read().await.unwrap(), b"tick");

    dev.writer.write_frame(b"close").await.unwrap();
    assert_eq!(dev.read().await.unwrap(), b"bye");
    assert_eq!(
        dev.read().await,
        None,
        "hub finishes its stream after closing"
    );
    let (_, ev) = hub.event().await;
    assert!(matches!(
        ev,
        HubEvent::Driven(Ok(DriveOutcome::SessionClosed))
    ));
    assert_eq!(app_code(&dev.closed().await), Some(u64::from(codes::DONE)));
}

#[tokio::test]
async fn the_right_pin_connects_and_a_wrong_pin_is_refused() {
    let hub = TestHub::start(ConnectionLimits::hub());
    let limits = ConnectionLimits::device();

    let good = DeviceEndpoint::for_hub(hub.addr, hub.identity.pin(), limits.clone()).unwrap();
    let conn = good.connect(hub.addr).await.unwrap();
    assert_eq!(
        conn.handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol
            .as_deref(),
        Some(ALPN)
    );

    let impostor = HubIdentity::generate("impostor").unwrap();
    let wrong = DeviceEndpoint::for_hub(hub.addr, impostor.pin(), limits).unwrap();
    match wrong.connect(hub.addr).await {
        Err(ConnectError::PinMismatch(m)) => {
            assert_eq!(m.expected, impostor.pin());
            assert_eq!(m.presented, hub.identity.pin());
        }
        other => panic!("expected a pin mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn forged_revoked_and_unknown_tokens_are_refused() {
    let mut hub = TestHub::start(ConnectionLimits::hub());

    let other_hub = HubSigningKey::generate().unwrap();
    let good = hub.enroll(1);
    let forged = other_hub.sign(good.token()).unwrap();
    let revoked = hub.enroll(2);
    hub.registry
        .write()
        .unwrap()
        .revoke(revoked.token().token_id);
    let unknown = hub
        .key
        .sign(&Token {
            token_id: Uuid::new_v4(),
            ..good.token().clone()
        })
        .unwrap();

    for (token, code, hub_err) in [
        (
            &forged,
            codes::AUTH_FORGED,
            TokenError::BadSignature.to_string(),
        ),
        (
            &revoked,
            codes::AUTH_REVOKED,
            TokenError::Revoked(revoked.token().token_id).to_string(),
        ),
        (
            &unknown,
            codes::AUTH_UNKNOWN,
            TokenError::Unknown(unknown.token().token_id).to_string(),
        ),
    ] {
        match TestDevice::connect(&hub, token).await {
            Err(AuthError::Refused { code: got, reason }) => {
                assert_eq!(got, u64::from(code));
                assert_eq!(reason, hub_err);
            }
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("token accepted"),
        }
        let (_, ev) = hub.event().await;
        assert!(
            matches!(ev, HubEvent::Auth(Err(ref e)) if e.contains(&hub_err)),
            "{ev:?}"
        );
    }

    // Garbage instead of a token.
    let endpoint =
        DeviceEndpoint::for_hub(hub.addr, hub.identity.pin(), ConnectionLimits::device()).unwrap();
    let conn = endpoint.connect(hub.addr).await.unwrap();
    let (mut w, _r) = open_bi_framed(&conn, 1 << 20).await.unwrap();
    w.write_frame(b"let me in").await.unwrap();
    let closed = tokio::time::timeout(STEP, conn.closed()).await.unwrap();
    assert_eq!(app_code(&closed), Some(u64::from(codes::AUTH_MALFORMED)));

    // And the genuine token still works.
    let mut dev = TestDevice::connect(&hub, &good).await.unwrap();
    assert_eq!(dev.echo(b"ok").await, b"ok");
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_auth_timeout() {
    let mut limits = ConnectionLimits::hub();
    limits.auth_timeout_ms = 200;
    let hub = TestHub::start(limits);
    let endpoint =
        DeviceEndpoint::for_hub(hub.addr, hub.identity.pin(), ConnectionLimits::device()).unwrap();
    let conn = endpoint.connect(hub.addr).await.unwrap();
    let closed = tokio::time::timeout(STEP, conn.closed()).await.unwrap();
    assert_eq!(app_code(&closed), Some(u64::from(codes::AUTH_TIMEOUT)));
}

#[tokio::test]
async fn garbage_and_oversize_frames_close_only_that_connection() {
    let mut limits = ConnectionLimits::hub();
    limits.max_frame_bytes = 1024;
    let mut hub = TestHub::start(limits);
    let mut bystander = TestDevice::connect(&hub, &hub.enroll(1)).await.unwrap();
    hub.event().await;
    assert_eq!(bystander.echo(b"before").await, b"before");

    // An oversize length prefix: refused as soon as the header arrives.
    let mut big = TestDevice::connect(&hub, &hub.enroll(2)).await.unwrap();
    hub.event().await;
    big.writer.write_raw(&u32::MAX.to_be_bytes()).await.unwrap();
    assert_eq!(
        app_code(&big.closed().await),
        Some(u64::from(codes::FRAME_ERROR))
    );
    let (id, ev) = hub.event().await;
    assert_eq!(id, Uuid::from_u128(2));
    assert!(
        matches!(ev, HubEvent::Driven(Err(ref e)) if e.contains("exceeds")),
        "{ev:?}"
    );

    // A frame just over the limit, sent whole.
    let mut over = TestDevice::connect(&hub, &hub.enroll(3)).await.unwrap();
    hub.event().await;
    let mut frame = 1025u32.to_be_bytes().to_vec();
    frame.extend(vec![0u8; 1025]);
    over.writer.write_raw(&frame).await.unwrap();
    assert_eq!(
        app_code(&over.closed().await),
        Some(u64::from(codes::FRAME_ERROR))
    );
    hub.event().await;

    // Half a frame, then the end of the stream.
    let mut trunc = TestDevice::connect(&hub, &hub.enroll(4)).await.unwrap();
    hub.event().await;
    trunc.writer.write_raw(&[0, 0, 0, 10, 1, 2]).await.unwrap();
    trunc.writer.finish().unwrap();
    assert_eq!(
        app_code(&trunc.closed().await),
        Some(u64::from(codes::FRAME_ERROR))
    );
    let (_, ev) = hub.event().await;
    assert!(
        matches!(ev, HubEvent::Driven(Err(ref e)) if e.contains("inside a frame")),
        "{ev:?}"
    );

    // A frame the session refuses: closed with the session's own code.
    let mut refused = TestDevice::connect(&hub, &hub.enroll(5)).await.unwrap();
    hub.event().await;
    refused.writer.write_frame(b"bad!").await.unwrap();
    assert_eq!(app_code(&refused.closed().await), Some(0x1000));
    hub.event().await;

    // The bystander never noticed.
    assert_eq!(bystander.echo(b"after").await, b"after");
    assert_eq!(hub.endpoint.pending_handshakes(), 0);
}

#[tokio::test]
async fn the_device_refuses_oversize_frames_from_the_hub_side_too() {
    // The writer checks the limit before sending: a sender-side assertion on the same boundary.
    let hub = TestHub::start(ConnectionLimits::hub());
    let mut dev = TestDevice::connect(&hub, &hub.enroll(1)).await.unwrap();
    let mut w = FrameWriter::new(dev.conn.open_uni().await.unwrap(), 10);
    assert!(matches!(
        w.write_frame(&[0u8; 11]).await,
        Err(FrameError::Oversize { len: 11, max: 10 })
    ));
    assert_eq!(dev.echo(b"still fine").await, b"still fine");
}

#[tokio::test]
async fn blobs_travel_on_their_own_streams() {
    let hub = TestHub::start(ConnectionLimits::hub());
    let mut dev = TestDevice::connect(&hub, &hub.enroll(1)).await.unwrap();
    // Device to device over the same kind of connection: use a raw pair for the blob receiver.
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let sender = async {
        let mut w = open_blob_stream(&pair.device_conn, b"blob-7@chunk-0", 1 << 16)
            .await
            .unwrap();
        for i in 0..10u8 {
            w.write_frame(&vec![i; 60_000]).await.unwrap();
        }
        w.finish().unwrap();
        let _ = w.stream_mut().stopped().await;
    };
    let receiver = async {
        let (header, mut r) = accept_blob_stream(&pair.hub_conn, 1 << 16)
            .await
            .unwrap()
            .unwrap();
        let mut chunks = 0u8;
        while let Some(chunk) = r.read_frame().await.unwrap() {
            assert_eq!(chunk, vec![chunks; 60_000]);
            chunks += 1;
        }
        (header, chunks)
    };
    let ((), (header, chunks)) =
        tokio::time::timeout(STEP, async { tokio::join!(sender, receiver) })
            .await
            .unwrap();
    assert_eq!(header, b"blob-7@chunk-0");
    assert_eq!(chunks, 10);
    // The control stream is independent of blob streams.
    assert_eq!(dev.echo(b"control").await, b"control");
}

#[tokio::test]
async fn zero_rtt_is_never_accepted() {
    let identity = HubIdentity::generate("0rtt hub").unwrap();
    let pin = identity.pin();

    // A client that *would* use 0-RTT if the hub allowed it.
    let eager_client = || {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = PinnedServerVerifier::new(pin, provider.signature_verification_algorithms);
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.enable_early_data = true;
        quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ))
    };

    // Returns whether the second connection could send 0-RTT data.
    async fn second_connection_has_0rtt(
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
    ) -> bool {
        let hub = quinn::Endpoint::server(server, (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let addr = hub.local_addr().unwrap();
        let hub_task = tokio::spawn(async move {
            while let Some(incoming) = hub.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.accept().unwrap().await {
                        // Exchange a little so session tickets reach the client.
                        if let Ok((mut s, mut r)) = conn.accept_bi().await {
                            let data = r.read_to_end(64).await.unwrap_or_default();
                            let _ = s.write_all(&data).await;
                            let _ = s.finish();
                        }
                        conn.closed().await;
                    }
                });
            }
        });
        let mut device = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        device.set_default_client_config(client);
        let first = device
            .connect(addr, HUB_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut s, mut r) = first.open_bi().await.unwrap();
        s.write_all(b"hi").await.unwrap();
        s.finish().unwrap();
        r.read_to_end(64).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.close(0u32.into(), b"");
        let zero_rtt = match device.connect(addr, HUB_SERVER_NAME).unwrap().into_0rtt() {
            Ok((conn, accepted)) => {
                let accepted = accepted.await;
                conn.close(0u32.into(), b"");
                accepted
            }
            Err(connecting) => {
                connecting.await.unwrap();
                false
            }
        };
        hub_task.abort();
        zero_rtt
    }

    // Control: quinn's convenience server config would take 0-RTT from this client...
    let convenient = quinn::ServerConfig::with_single_cert(
        vec![identity.cert_der().clone()],
        identity.key_der(),
    )
    .unwrap();
    let mut convenient = convenient;
    let crypto = {
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der())
        .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = u32::MAX;
        Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap())
    };
    convenient.crypto = crypto;
    let ours = server_config(&identity, &ConnectionLimits::hub()).unwrap();
    tokio::time::timeout(STEP, async {
        assert!(
            second_connection_has_0rtt(convenient, eager_client()).await,
            "control: 0-RTT possible"
        );
        // ...ours never does.
        assert!(
            !second_connection_has_0rtt(ours, eager_client()).await,
            "0-RTT accepted"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let mut limits = ConnectionLimits::hub();
    limits.max_connections = 2;
    let hub = TestHub::start(limits);
    let pin = hub.identity.pin();
    let mut devices = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..2 {
        let d = DeviceEndpoint::for_hub(hub.addr, pin, ConnectionLimits::device()).unwrap();
        conns.push(d.connect(hub.addr).await.unwrap());
        devices.push(d);
    }
    // open_connections counts both; a third is refused.
    let d = DeviceEndpoint::for_hub(hub.addr, pin, ConnectionLimits::device()).unwrap();
    let third = tokio::time::timeout(STEP, d.connect(hub.addr))
        .await
        .unwrap();
    assert!(matches!(third, Err(ConnectError::Refused)), "{third:?}");
}

#[tokio::test]
async fn pending_handshakes_beyond_the_cap_are_refused() {
    let mut limits = ConnectionLimits::hub();
    limits.max_pending_handshakes = 0;
    let hub = TestHub::start(limits);
    let d =
        DeviceEndpoint::for_hub(hub.addr, hub.identity.pin(), ConnectionLimits::device()).unwrap();
    let r = tokio::time::timeout(STEP, d.connect(hub.addr))
        .await
        .unwrap();
    assert!(matches!(r, Err(ConnectError::Refused)), "{r:?}");
}

/// Writes `bytes` one at a time with a yield between, so frames arrive in many pieces.
async fn trickle(w: &mut FrameWriter, bytes: &[u8]) {
    for b in bytes {
        w.write_raw(std::slice::from_ref(b)).await.unwrap();
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn frames_split_into_single_bytes_reassemble() {
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let (mut w, _) = open_bi_framed(&pair.device_conn, 1024).await.unwrap();
    let mut raw = Vec::new();
    for frame in [&b"abc"[..], b"", &[9u8; 300]] {
        raw.extend_from_slice(&u32::try_from(frame.len()).unwrap().to_be_bytes());
        raw.extend_from_slice(frame);
    }
    let send = async {
        trickle(&mut w, &raw).await;
        w.finish().unwrap();
    };
    let recv = async {
        let (_, mut r) = accept_bi_framed(&pair.hub_conn, 1024).await.unwrap();
        let mut got = Vec::new();
        while let Some(f) = r.read_frame().await.unwrap() {
            got.push(f);
        }
        got
    };
    let ((), got) = tokio::time::timeout(STEP, async { tokio::join!(send, recv) })
        .await
        .unwrap();
    assert_eq!(got, vec![b"abc".to_vec(), vec![], vec![9u8; 300]]);
}

/// A frame in the wire format's layout: magic, version, kind, flags, length, body.
fn wire_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = b"FSYN".to_vec();
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&[kind, 0]);
    f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn wire_format_frames_travel_unchanged() {
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let (w, _) = open_bi_framed(&pair.device_conn, 64).await.unwrap();
    let mut w = w.with_format(FrameFormat::WIRE_V1);
    // The writer checks the header against the frame before sending.
    let mut lying = wire_frame(4, b"body");
    lying[11] = 9;
    assert!(matches!(
        w.write_frame(&lying).await,
        Err(FrameError::Inconsistent {
            announced: Some(9),
            actual: 4
        })
    ));
    assert!(matches!(
        w.write_frame(b"short").await,
        Err(FrameError::Inconsistent {
            announced: None,
            ..
        })
    ));
    assert!(matches!(
        w.write_frame(&wire_frame(4, &[0; 65])).await,
        Err(FrameError::Oversize { len: 65, max: 64 })
    ));
    let frames = [
        wire_frame(1, b"hello"),
        wire_frame(12, b""),
        wire_frame(4, &[7; 64]),
    ];
    let send = async {
        for f in &frames {
            w.write_frame(f).await.unwrap();
        }
        // Then one that announces more than the reader accepts.
        w.write_raw(&wire_frame(4, &[0; 65])[..12]).await.unwrap();
    };
    let recv = async {
        let (_, r) = accept_bi_framed(&pair.hub_conn, 64).await.unwrap();
        let mut r = r.with_format(FrameFormat::WIRE_V1);
        let mut got = Vec::new();
        for _ in 0..frames.len() {
            got.push(r.read_frame().await.unwrap().unwrap());
        }
        (got, r.read_frame().await)
    };
    let ((), (got, last)) = tokio::time::timeout(STEP, async { tokio::join!(send, recv) })
        .await
        .unwrap();
    assert_eq!(got, frames);
    assert!(matches!(
        last,
        Err(FrameError::Oversize { len: 65, max: 64 })
    ));
}

/// Sends `wake` on every wake-up.
#[derive(Debug, Default)]
struct WakeSession {
    out: Vec<Vec<u8>>,
}

impl FrameSession for WakeSession {
    fn handle_frame(&mut self, _now_ms: u64, _bytes: &[u8]) -> Result<(), CloseReason> {
        Ok(())
    }
    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop()
    }
    fn poll_timeout(&self) -> Option<u64> {
        None
    }
    fn handle_timeout(&mut self, _now_ms: u64) {}
    fn is_closed(&self) -> bool {
        false
    }
    fn handle_wake(&mut self, _now_ms: u64) {
        self.out.push(b"wake".to_vec());
    }
}

#[tokio::test]
async fn a_wake_up_reaches_the_session_without_a_frame() {
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let (mut dw, mut dr) = open_bi_framed(&pair.device_conn, 64).await.unwrap();
    dw.write_frame(b"subscribe").await.unwrap();
    let (mut hw, mut hr) = accept_bi_framed(&pair.hub_conn, 64).await.unwrap();
    let wake = Arc::new(tokio::sync::Notify::new());
    let (conn, w2) = (pair.hub_conn.clone(), wake.clone());
    let driver = tokio::spawn(async move {
        let mut session = WakeSession::default();
        let clock = SessionClock::new(0);
        drive_session_with_wake(&mut session, &conn, &mut hw, &mut hr, &clock, &w2).await
    });
    // A notification sent before the driver waits is kept, not lost.
    wake.notify_one();
    let f = tokio::time::timeout(STEP, dr.read_frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.as_deref(), Some(&b"wake"[..]));
    wake.notify_one();
    let f = tokio::time::timeout(STEP, dr.read_frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.as_deref(), Some(&b"wake"[..]));
    dw.finish().unwrap();
    let outcome = tokio::time::timeout(STEP, driver).await.unwrap().unwrap();
    assert!(
        matches!(outcome, Ok(DriveOutcome::PeerFinished)),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_credential_file_is_all_a_device_needs() {
    let hub = TestHub::start(ConnectionLimits::hub());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.cred");
    crate::credential::Credential::new(hub.addr.to_string(), hub.identity.pin(), hub.enroll(1))
        .save(&path)
        .unwrap();
    let cred = crate::credential::Credential::load(&path).unwrap();
    let mut link = connect_with_credential(&cred, ConnectionLimits::device())
        .await
        .unwrap();
    link.writer.write_frame(b"via credential").await.unwrap();
    let echoed = tokio::time::timeout(STEP, link.reader.read_frame())
        .await
        .unwrap();
    assert_eq!(echoed.unwrap().as_deref(), Some(&b"via credential"[..]));

    let mut bad = cred.clone();
    bad.hub_address = "no-such-host.invalid:1".into();
    assert!(matches!(
        connect_with_credential(&bad, ConnectionLimits::device()).await,
        Err(LinkError::Resolve { .. })
    ));
}

/// An [`EchoSession`] driven on the hub side of `pair` in the wire format, with the device's
/// control stream (opened by one ping, which is echoed).
async fn wire_echo_driver(
    pair: &baseline::LoopbackPair,
) -> (
    FrameWriter,
    FrameReader,
    tokio::task::JoinHandle<Result<DriveOutcome, DriveError>>,
) {
    let (dw, dr) = open_bi_framed(&pair.device_conn, 1024).await.unwrap();
    let (mut dw, dr) = (
        dw.with_format(FrameFormat::WIRE_V1),
        dr.with_format(FrameFormat::WIRE_V1),
    );
    // The first frame opens the stream for the hub to accept.
    dw.write_frame(&wire_frame(FrameKind::Ping as u8, &[7]))
        .await
        .unwrap();
    let (hw, hr) = accept_bi_framed(&pair.hub_conn, 1024).await.unwrap();
    let (mut hw, mut hr) = (
        hw.with_format(FrameFormat::WIRE_V1),
        hr.with_format(FrameFormat::WIRE_V1),
    );
    let conn = pair.hub_conn.clone();
    let driver = tokio::spawn(async move {
        let mut session = EchoSession::default();
        let clock = SessionClock::new(0);
        drive_session(&mut session, &conn, &mut hw, &mut hr, &clock).await
    });
    (dw, dr, driver)
}

/// Sends `frame` alone on a new unidirectional stream of `conn`, in the wire format.
async fn send_on_uni(conn: &quinn::Connection, frame: &[u8]) {
    let send = conn.open_uni().await.unwrap();
    let mut w = FrameWriter::new(send, 1 << 20).with_format(FrameFormat::WIRE_V1);
    w.write_frame(frame).await.unwrap();
    w.finish().unwrap();
}

#[tokio::test]
async fn blob_frames_of_the_wire_format_travel_on_streams_of_their_own() {
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let (mut dw, mut dr, driver) = wire_echo_driver(&pair).await;
    let blob_put = wire_frame(FrameKind::BlobPut as u8, &[1; 100]);
    let blob_chunk = wire_frame(FrameKind::BlobChunk as u8, &[2; 100]);
    let ping = wire_frame(FrameKind::Ping as u8, &[7]);
    let next_uni = |conn: quinn::Connection| async move {
        let recv = conn.accept_uni().await.unwrap();
        let mut r = FrameReader::new(recv, 1024).with_format(FrameFormat::WIRE_V1);
        r.read_frame().await.unwrap().unwrap()
    };
    // A blob frame sent on the control stream is echoed on a stream of its own; the ping
    // behind it comes back on the control stream.
    dw.write_frame(&blob_put).await.unwrap();
    dw.write_frame(&ping).await.unwrap();
    let echoed = tokio::time::timeout(STEP, next_uni(pair.device_conn.clone()))
        .await
        .unwrap();
    assert_eq!(echoed, blob_put);
    for _ in 0..2 {
        let f = tokio::time::timeout(STEP, dr.read_frame())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            f.as_deref(),
            Some(&ping[..]),
            "only pings on the control stream"
        );
    }
    // A blob frame arriving on a stream of its own reaches the session.
    send_on_uni(&pair.device_conn, &blob_chunk).await;
    let echoed = tokio::time::timeout(STEP, next_uni(pair.device_conn.clone()))
        .await
        .unwrap();
    assert_eq!(echoed, blob_chunk);
    // An oversize frame on such a stream closes the connection as on the control stream.
    send_on_uni(
        &pair.device_conn,
        &wire_frame(FrameKind::BlobPut as u8, &[0; 2000]),
    )
    .await;
    let outcome = tokio::time::timeout(STEP, driver).await.unwrap().unwrap();
    assert!(
        matches!(outcome, Err(DriveError::PeerFrame(_))),
        "{outcome:?}"
    );
    let closed = tokio::time::timeout(STEP, pair.device_conn.closed())
        .await
        .unwrap();
    assert_eq!(app_code(&closed), Some(u64::from(codes::FRAME_ERROR)));
}

#[tokio::test]
async fn only_blob_frames_may_come_on_a_blob_stream() {
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let (_dw, _dr, driver) = wire_echo_driver(&pair).await;
    // A push sent outside the control stream would skip its order and its backpressure.
    send_on_uni(
        &pair.device_conn,
        &wire_frame(FrameKind::Push as u8, &[0; 10]),
    )
    .await;
    let outcome = tokio::time::timeout(STEP, driver).await.unwrap().unwrap();
    assert!(
        matches!(
            outcome,
            Err(DriveError::PeerFrame(FrameError::NotABlobFrame { kind: 4 }))
        ),
        "{outcome:?}"
    );
    let closed = tokio::time::timeout(STEP, pair.device_conn.closed())
        .await
        .unwrap();
    assert_eq!(app_code(&closed), Some(u64::from(codes::FRAME_ERROR)));
}

#[tokio::test]
async fn a_connection_without_a_token_gets_one_stream_and_a_small_window() {
    let mut hub = TestHub::start(ConnectionLimits::hub());
    let limits = ConnectionLimits::device();
    let stranger = DeviceEndpoint::for_hub(hub.addr, hub.identity.pin(), limits.clone()).unwrap();
    let conn = stranger.connect(hub.addr).await.unwrap();
    let short = Duration::from_millis(500);
    assert!(
        tokio::time::timeout(short, conn.open_uni()).await.is_err(),
        "no unidirectional stream before a token"
    );
    // The one bidirectional stream takes the token window's worth and no more: QUIC flow
    // control lets a write go only as far as the hub's credit.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    assert!(tokio::time::timeout(short, conn.open_bi()).await.is_err());
    let junk = vec![0xffu8; 4 * PRE_AUTH_RECEIVE_WINDOW as usize];
    let taken = tokio::time::timeout(STEP, send.write(&junk))
        .await
        .unwrap()
        .unwrap();
    assert!(
        taken <= PRE_AUTH_RECEIVE_WINDOW as usize,
        "a stranger made the hub take {taken} bytes"
    );
    // (The junk is no token: the hub refuses it.)
    let (_, ev) = hub.event().await;
    assert!(matches!(ev, HubEvent::Auth(Err(_))), "{ev:?}");

    // A device with a token gets its streams and window.
    let token = hub.enroll(9);
    let dev = TestDevice::connect(&hub, &token).await.unwrap();
    let (_, ev) = hub.event().await;
    assert!(matches!(ev, HubEvent::Auth(Ok(_))));
    let mut uni = tokio::time::timeout(STEP, dev.conn.open_uni())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(STEP, uni.write_all(&junk))
        .await
        .unwrap()
        .unwrap();
}

/// Queues `frames` frames of `size` bytes at once (a session with a lot to say).
#[derive(Debug)]
struct FloodSession {
    left: usize,
    size: usize,
}

impl FrameSession for FloodSession {
    fn handle_frame(&mut self, _now_ms: u64, _bytes: &[u8]) -> Result<(), CloseReason> {
        Ok(())
    }
    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.left = self.left.checked_sub(1)?;
        Some(vec![1; self.size])
    }
    fn poll_timeout(&self) -> Option<u64> {
        None
    }
    fn handle_timeout(&mut self, _now_ms: u64) {}
    fn is_closed(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_closed_not_waited_for() {
    let pair = baseline::loopback_pair(ConnectionLimits::hub())
        .await
        .unwrap();
    let (mut dw, _dr) = open_bi_framed(&pair.device_conn, 1 << 20).await.unwrap();
    dw.write_frame(b"hello").await.unwrap();
    let (mut hw, mut hr) = accept_bi_framed(&pair.hub_conn, 1 << 20).await.unwrap();
    let conn = pair.hub_conn.clone();
    // Far more than the device's windows hold; the device never reads a byte of it.
    let size = 16 << 10;
    let slack = Duration::from_millis(300);
    let driver = tokio::spawn(async move {
        let mut session = FloodSession { left: 4096, size };
        let clock = SessionClock::new(0);
        let wake = tokio::sync::Notify::new();
        let options = DriveOptions {
            stall_slack: slack,
            turn: None,
        };
        drive_session_with_options(
            &mut session,
            &conn,
            &mut hw,
            &mut hr,
            &clock,
            &wake,
            &options,
        )
        .await
    });
    let limit = stall_limit(slack, size);
    let outcome = tokio::time::timeout(STEP, driver).await.unwrap().unwrap();
    assert!(
        matches!(outcome, Err(DriveError::Stalled { limit: l, .. }) if l == limit),
        "{outcome:?}"
    );
    let closed = tokio::time::timeout(STEP, pair.device_conn.closed())
        .await
        .unwrap();
    assert_eq!(app_code(&closed), Some(u64::from(codes::STALLED)));
}

/// Echoes like [`EchoSession`] but takes `hold` in every `handle_frame`, counting how many
/// sessions are inside a callback at once.
struct SlowSession {
    echo: EchoSession,
    hold: Duration,
    inside: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
}

impl FrameSession for SlowSession {
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.inside.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        std::thread::sleep(self.hold);
        self.inside.fetch_sub(1, SeqCst);
        self.echo.handle_frame(now_ms, bytes)
    }
    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.echo.poll_frame()
    }
    fn poll_timeout(&self) -> Option<u64> {
        None
    }
    fn handle_timeout(&mut self, _now_ms: u64) {}
    fn is_closed(&self) -> bool {
        self.echo.is_closed()
    }
}

/// The most sessions inside a callback at once, over `n` connections each sending one frame.
async fn most_at_once(n: usize, turn: Option<Arc<tokio::sync::Mutex<()>>>) -> usize {
    let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut pairs = Vec::new();
    let mut drivers = Vec::new();
    for _ in 0..n {
        let pair = baseline::loopback_pair(ConnectionLimits::hub())
            .await
            .unwrap();
        let (mut dw, dr) = open_bi_framed(&pair.device_conn, 1024).await.unwrap();
        dw.write_frame(b"hello").await.unwrap();
        let (mut hw, mut hr) = accept_bi_framed(&pair.hub_conn, 1024).await.unwrap();
        let conn = pair.hub_conn.clone();
        let options = DriveOptions {
            turn: turn.clone(),
            ..DriveOptions::default()
        };
        let mut session = SlowSession {
            echo: EchoSession::default(),
            hold: Duration::from_millis(150),
            inside: inside.clone(),
            most: most.clone(),
        };
        drivers.push(tokio::spawn(async move {
            let clock = SessionClock::new(0);
            let wake = tokio::sync::Notify::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                drive_session_with_options(
                    &mut session,
                    &conn,
                    &mut hw,
                    &mut hr,
                    &clock,
                    &wake,
                    &options,
                ),
            )
            .await;
        }));
        pairs.push((pair, dw, dr));
    }
    for d in drivers {
        d.await.unwrap();
    }
    most.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_sharing_a_turn_take_their_callbacks_one_at_a_time() {
    // Control: with no turn, the blocking callbacks of several sessions overlap.
    assert!(most_at_once(4, None).await > 1);
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    assert_eq!(most_at_once(4, Some(turn)).await, 1);
}
