//! Wire format tests: golden bytes, every `WireError`, the incremental decoder, and proptests
//! that no input panics the decoder.

// Test helpers outside #[test] fns too: a panic here is a failed test, not a crash in the field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use fieldsync_replication::proto::messages::{
    BlobChunk, BlobPut, BlobPutAck, BlobPutStatus, BlobRequest, Close, CloseCode, Cursor, DeviceId,
    Hello, Message, Operation, Ping, Pong, Pull, PullAck, PullBatch, Push, PushAck, PushOp,
    Refused, Rejection, RejectionKind, RowChange, RowDoc, Subscribe, TableCursor, Welcome,
    MAX_CHANGE_LEN, PUSH_BATCH_OPS_MAX,
};
use fieldsync_replication::wire::{
    self, FrameDecoder, FrameHeader, FrameKind, WireError, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN,
};
use proptest::prelude::*;
use uuid::Uuid;

fn id(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(32).enumerate() {
        if i > 0 {
            s.push('\n');
        }
        for b in chunk {
            s.push_str(&format!("{b:02x}"));
        }
    }
    s.push('\n');
    s
}

fn from_hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Representative messages, one golden file each.
fn samples() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello(Hello {
                protocol_versions: vec![1],
                device: DeviceId(id(1)),
                token: vec![0xde, 0xad, 0xbe, 0xef],
                app: "field-service".into(),
                client: "fieldsync/0.1.0".into(),
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                protocol_version: 1,
                hub: id(2),
                user: id(3),
                idle_timeout_ms: 90_000,
            }),
        ),
        (
            "refused",
            Message::Refused(Refused {
                code: CloseCode::REVOKED,
                message: "device revoked".into(),
                retry_after_ms: Some(60_000),
            }),
        ),
        (
            "push",
            Message::Push(Push {
                after_seq: 41,
                up_to_seq: 44,
                ops: vec![
                    PushOp {
                        seq: 42,
                        table: "account".into(),
                        row: id(4),
                        change: vec![1, 2, 3],
                    },
                    PushOp {
                        seq: 44,
                        table: "contact".into(),
                        row: id(5),
                        change: vec![4, 5],
                    },
                ],
            }),
        ),
        (
            "push_ack",
            Message::PushAck(PushAck {
                after_seq: 41,
                up_to_seq: 44,
                rejected: vec![Rejection {
                    seq: 44,
                    table: "contact".into(),
                    row: id(5),
                    operation: Operation::Write,
                    kind: RejectionKind::Permission,
                    message: "no write privilege on contact".into(),
                    authoritative: Some(RowDoc {
                        row: id(5),
                        doc: vec![9, 9, 9],
                    }),
                }],
            }),
        ),
        (
            "pull",
            Message::Pull(Pull {
                tables: vec![
                    TableCursor {
                        table: "account".into(),
                        cursor: Cursor(0),
                    },
                    TableCursor {
                        table: "contact".into(),
                        cursor: Cursor(300),
                    },
                ],
            }),
        ),
        (
            "pull_batch",
            Message::PullBatch(PullBatch {
                table: "account".into(),
                from: Cursor(10),
                cursor: Cursor(20),
                ops: vec![RowChange {
                    row: id(6),
                    change: vec![7, 7],
                }],
                entering: vec![RowDoc {
                    row: id(7),
                    doc: vec![8; 5],
                }],
                leaving: vec![id(8)],
                more: true,
            }),
        ),
        (
            "pull_ack",
            Message::PullAck(PullAck {
                table: "account".into(),
                cursor: Cursor(20),
            }),
        ),
        (
            "subscribe",
            Message::Subscribe(Subscribe {
                tables: vec![TableCursor {
                    table: "msdyn_workorder".into(),
                    cursor: Cursor(65_536),
                }],
            }),
        ),
        (
            "blob_request",
            Message::BlobRequest(BlobRequest {
                sha256: [0xab; 32],
                offset: 65_536,
                max_len: 65_536,
            }),
        ),
        (
            "blob_chunk",
            Message::BlobChunk(BlobChunk {
                sha256: [0xab; 32],
                found: true,
                offset: 65_536,
                total: 65_540,
                data: vec![1, 2, 3, 4],
            }),
        ),
        (
            "blob_put",
            Message::BlobPut(BlobPut {
                sha256: [0xcd; 32],
                offset: 65_536,
                total: 65_540,
                data: vec![5, 6, 7, 8],
            }),
        ),
        (
            "blob_put_ack",
            Message::BlobPutAck(BlobPutAck {
                sha256: [0xcd; 32],
                offset: 0,
                status: BlobPutStatus::Continue { progress: 65_536 },
            }),
        ),
        ("ping", Message::Ping(Ping { nonce: 7 })),
        ("pong", Message::Pong(Pong { nonce: 7 })),
        (
            "close",
            Message::Close(Close {
                code: CloseCode(CloseCode::WIRE_BASE + 5),
                reason: "frame payload too large".into(),
            }),
        ),
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The encoded bytes of every sample match the checked-in hex. Regenerate (after a deliberate
/// format change, with a protocol version bump) with `UPDATE_GOLDEN=1`.
#[test]
fn golden_frames_do_not_drift() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, msg) in samples() {
        let bytes = wire::encode(&msg).unwrap();
        let path = golden_dir().join(format!("{name}.hex"));
        if update {
            std::fs::write(&path, to_hex(&bytes)).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(
            to_hex(&bytes),
            expected,
            "wire bytes of `{name}` changed; bump the protocol version"
        );
        let (decoded, used) = wire::decode(&from_hex(&expected)).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded, msg, "golden `{name}` decodes back");
    }
}

#[test]
fn header_layout() {
    let bytes = wire::encode(&Message::Ping(Ping { nonce: 1 })).unwrap();
    assert_eq!(&bytes[..4], b"FSYN");
    assert_eq!(&bytes[4..6], &[0, 1], "protocol version 1, big-endian");
    assert_eq!(bytes[6], FrameKind::Ping as u8);
    assert_eq!(bytes[7], 0);
    assert_eq!(&bytes[8..12], &[0, 0, 0, 1], "payload: one varint byte");
    assert_eq!(bytes.len(), HEADER_LEN + 1);
}

fn frame(version: u16, kind: u8, flags: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&version.to_be_bytes());
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn frame_of<T: serde::Serialize>(kind: FrameKind, body: &T) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(body, bincode::config::standard()).unwrap();
    frame(1, kind as u8, 0, payload.len() as u32, &payload)
}

#[test]
fn every_wire_error_has_a_stable_code() {
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"HTTP/1.1 200 OK\r\n".to_vec(), 1),
        (frame(2, FrameKind::Ping as u8, 0, 1, &[0]), 2),
        (frame(1, 200, 0, 1, &[0]), 3),
        (frame(1, FrameKind::Ping as u8, 0x80, 1, &[0]), 4),
        (
            frame(1, FrameKind::Ping as u8, 0, MAX_PAYLOAD_LEN as u32 + 1, &[]),
            5,
        ),
        (frame(1, FrameKind::Ping as u8, 0, 4, &[0]), 6),
        (frame(1, FrameKind::Hello as u8, 0, 1, &[5]), 7),
        (frame(1, FrameKind::Ping as u8, 0, 2, &[7, 0]), 8),
    ];
    for (bytes, code) in cases {
        let err = wire::decode(&bytes).unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(err.close_code(), CloseCode(CloseCode::WIRE_BASE + code));
    }
}

#[test]
fn each_wire_error_variant() {
    assert!(matches!(
        wire::decode(b"GET / HTTP/1.1\r\n"),
        Err(WireError::BadMagic { found }) if &found == b"GET "
    ));
    assert_eq!(
        wire::decode(&frame(9, FrameKind::Ping as u8, 0, 1, &[0])),
        Err(WireError::UnsupportedVersion { version: 9 })
    );
    assert_eq!(
        wire::decode(&frame(1, 0, 0, 0, &[])),
        Err(WireError::UnknownKind { kind: 0 })
    );
    assert_eq!(
        wire::decode(&frame(1, FrameKind::Pong as u8, 1, 1, &[0])),
        Err(WireError::ReservedFlags { flags: 1 })
    );
    assert_eq!(
        wire::decode(&frame(1, FrameKind::Push as u8, 0, u32::MAX, &[])),
        Err(WireError::Oversize {
            len: u64::from(u32::MAX),
            max: MAX_PAYLOAD_LEN
        })
    );
    assert_eq!(
        wire::decode(&MAGIC),
        Err(WireError::Truncated {
            needed: HEADER_LEN,
            available: 4
        })
    );
    let ping = wire::encode(&Message::Ping(Ping { nonce: 300 })).unwrap();
    assert_eq!(
        wire::decode(&ping[..ping.len() - 1]),
        Err(WireError::Truncated {
            needed: ping.len(),
            available: ping.len() - 1
        })
    );
    assert!(matches!(
        wire::decode(&frame(1, FrameKind::Welcome as u8, 0, 2, &[1, 0])),
        Err(WireError::Malformed {
            kind: FrameKind::Welcome,
            ..
        })
    ));
    // A bool that is neither 0 nor 1.
    let mut chunk = frame_of(
        FrameKind::BlobChunk,
        &BlobChunk {
            sha256: [0; 32],
            found: true,
            offset: 0,
            total: 0,
            data: vec![],
        },
    );
    chunk[HEADER_LEN + 32] = 2;
    assert!(matches!(
        wire::decode(&chunk),
        Err(WireError::Malformed {
            kind: FrameKind::BlobChunk,
            ..
        })
    ));
    assert_eq!(
        wire::decode(&frame(1, FrameKind::Pong as u8, 0, 3, &[1, 2, 3])),
        Err(WireError::TrailingBytes {
            kind: FrameKind::Pong,
            extra: 2
        })
    );
    // Over-limit batches are refused on decode (a hostile peer) and on encode (our own bug).
    let big = Push {
        after_seq: 0,
        up_to_seq: PUSH_BATCH_OPS_MAX as u64 + 1,
        ops: (1..=PUSH_BATCH_OPS_MAX as u64 + 1)
            .map(|seq| PushOp {
                seq,
                table: "t".into(),
                row: id(1),
                change: vec![],
            })
            .collect(),
    };
    let limit = WireError::LimitExceeded {
        what: "push.ops",
        len: PUSH_BATCH_OPS_MAX + 1,
        max: PUSH_BATCH_OPS_MAX,
    };
    assert_eq!(
        wire::decode(&frame_of(FrameKind::Push, &big)),
        Err(limit.clone())
    );
    assert_eq!(wire::encode(&Message::Push(big)), Err(limit));
    // Each row is within its limit, the whole frame is not.
    let huge = PullBatch {
        table: "account".into(),
        from: Cursor(0),
        cursor: Cursor(1),
        ops: vec![],
        entering: (0..5)
            .map(|i| RowDoc {
                row: id(i),
                doc: vec![0; MAX_CHANGE_LEN],
            })
            .collect(),
        leaving: vec![],
        more: false,
    };
    let err = wire::encode(&Message::PullBatch(huge)).unwrap_err();
    assert!(matches!(err, WireError::Oversize { .. }), "{err}");
    assert_eq!(err.code(), 5);
    assert_eq!(
        WireError::Encode {
            detail: String::new()
        }
        .code(),
        10
    );
}

#[test]
fn decoder_splits_a_stream_fed_byte_by_byte() {
    let mut stream = Vec::new();
    for (_, msg) in samples() {
        wire::encode_into(&msg, &mut stream).unwrap();
    }
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for b in &stream {
        dec.feed(std::slice::from_ref(b));
        while let Some(m) = dec.next_message().unwrap() {
            out.push(m);
        }
    }
    dec.finish().unwrap();
    let expected: Vec<Message> = samples().into_iter().map(|(_, m)| m).collect();
    assert_eq!(out, expected);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn decoder_refuses_oversize_before_buffering_the_payload() {
    let mut dec = FrameDecoder::new();
    dec.feed(&frame(1, FrameKind::Push as u8, 0, 64 * 1024 * 1024, &[]));
    let err = dec.next_message().unwrap_err();
    assert_eq!(err.code(), 5);
    // The decoder is spent: more bytes change nothing.
    dec.feed(&wire::encode(&Message::Ping(Ping { nonce: 1 })).unwrap());
    assert_eq!(dec.next_message().unwrap_err(), err);
}

#[test]
fn decoder_reports_a_stream_cut_inside_a_frame() {
    let bytes = wire::encode(&Message::Ping(Ping { nonce: 1 })).unwrap();
    let mut dec = FrameDecoder::new();
    dec.feed(&bytes[..5]);
    assert_eq!(dec.next_message().unwrap(), None);
    assert_eq!(
        dec.finish(),
        Err(WireError::Truncated {
            needed: HEADER_LEN,
            available: 5
        })
    );
    dec.feed(&bytes[5..HEADER_LEN]);
    assert_eq!(
        dec.finish(),
        Err(WireError::Truncated {
            needed: bytes.len(),
            available: HEADER_LEN
        })
    );
}

#[test]
fn header_parse_checks_in_order() {
    let h = FrameHeader::parse(&frame(1, FrameKind::Close as u8, 0, 9, &[])).unwrap();
    assert_eq!(h.kind, FrameKind::Close);
    assert_eq!(h.len, 9);
    assert_eq!(h.version, 1);
}

fn arb_push() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        proptest::collection::vec(
            (
                "[a-z_]{1,20}",
                any::<[u8; 16]>(),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            0..20,
        ),
    )
        .prop_map(|(after, ops)| {
            let after = after / 2;
            let ops: Vec<PushOp> = ops
                .into_iter()
                .enumerate()
                .map(|(i, (table, row, change))| PushOp {
                    seq: after + 1 + i as u64,
                    table,
                    row: Uuid::from_bytes(row),
                    change,
                })
                .collect();
            Message::Push(Push {
                after_seq: after,
                up_to_seq: after + ops.len() as u64,
                ops,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode(&bytes);
        let mut dec = FrameDecoder::new();
        dec.feed(&bytes);
        while let Ok(Some(_)) = dec.next_message() {}
        let _ = dec.finish();
    }

    #[test]
    fn random_payloads_behind_a_valid_header_never_panic(
        kind in 1u8..=14,
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = wire::decode(&frame(1, kind, 0, payload.len() as u32, &payload));
    }

    #[test]
    fn mutated_frames_never_panic(
        idx in 0usize..14,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = wire::encode(&samples()[idx].1).unwrap();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        if let Ok((msg, _)) = wire::decode(&bytes) {
            // Whatever decodes is within the limits and encodes again.
            prop_assert!(msg.validate().is_ok());
            prop_assert!(wire::encode(&msg).is_ok());
        }
    }

    #[test]
    fn pushes_round_trip(msg in arb_push(), split in any::<usize>()) {
        let bytes = wire::encode(&msg).unwrap();
        let (decoded, used) = wire::decode(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&decoded, &msg);
        let mut dec = FrameDecoder::new();
        let at = split % (bytes.len() + 1);
        dec.feed(&bytes[..at]);
        let first = dec.next_message().unwrap();
        dec.feed(&bytes[at..]);
        let got = match first { Some(m) => m, None => dec.next_message().unwrap().unwrap() };
        prop_assert_eq!(got, msg);
    }
}
