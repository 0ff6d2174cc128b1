//! The bridge's file transfers and response sizes: large files in ranges and chunks against the
//! emulator, and against a stub server that misbehaves on purpose (a file that is not the size
//! it declares, a range longer than asked, a body longer than the bridge reads).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod upstream_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fieldsync_node::upstream::state::{self, PendingDownload};
use fieldsync_node::upstream::{UpstreamConfig, UpstreamError};
use fieldsync_store::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use upstream_support::{
    bridge, config, hub_replica, hub_replica_with_schema, EmulatorAndHub, ADMIN_TOKEN,
};
use uuid::Uuid;

fn pattern(len: usize, modulo: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i % modulo) as u8).collect()
}

/// The hub's `contract` file of an account, with its content.
fn hub_contract(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    id: Uuid,
) -> Option<(fieldsync_store::BlobRef, Vec<u8>)> {
    let r = replica.lock().unwrap();
    let row = r.store().get("account", id).unwrap()?;
    match row.get("contract") {
        Value::File(b) => Some((b.clone(), r.store().read_blob(b).unwrap())),
        _ => None,
    }
}

#[tokio::test]
async fn a_file_of_many_chunks_goes_up_and_comes_down_whole() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let mut cfg = config(&emu, dir.path());
    // Not a multiple of the store's 256 KiB blob chunks: each upload chunk spans two of them.
    cfg.file_chunk_bytes = 300_000;
    let b = bridge(cfg, &replica);
    let data = pattern(1_000_003, 251);
    let blob = replica
        .lock()
        .unwrap()
        .store()
        .put_blob("big.pdf", &mut data.as_slice())
        .unwrap();
    let id = Uuid::new_v4();
    replica
        .lock()
        .unwrap()
        .local_write(
            "account",
            id,
            &[
                ("name", Value::Text("Big file".into())),
                ("contract", Value::File(blob)),
            ],
        )
        .unwrap();
    let before = b
        .client()
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    b.push().await.unwrap();
    let sent = b
        .client()
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    // The row, the chunked upload's start, 4 chunks, the read of the new file id.
    assert_eq!(sent, 7);
    let http = reqwest::Client::new();
    let value = format!("{}/api/data/v9.2/accounts({id})/contract/$value", emu.url());
    let got = http
        .get(&value)
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.headers()["x-ms-file-size"], data.len().to_string());
    assert_eq!(got.bytes().await.unwrap().to_vec(), data);

    // The office replaces it with another large file: the hub downloads it in 3 ranges.
    let office = pattern(700_001, 13);
    emu.office_puts_file(id, "office.pdf", &office).await;
    let before = b
        .client()
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    b.pull_table("account").await.unwrap();
    let sent = b
        .client()
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert_eq!(sent, 1 + 3, "a page, then three ranges");
    let (here, content) = hub_contract(&replica, id).expect("downloaded");
    assert_eq!(here.name, "office.pdf");
    assert_eq!(here.size, office.len() as u64);
    assert_eq!(content, office);
}

/// How the stub answers a file download.
#[derive(Debug, Clone, Copy)]
enum FileReply {
    /// Honours ranges, but declares a size other than the content's.
    Ranges { declared: usize },
    /// Ignores `Range`: 200 with the whole content, declaring `declared`.
    Whole { declared: usize },
    /// 206 from the range's start to the content's end, whatever the range's end.
    RangeToEnd,
    /// Honours ranges with no `x-ms-file-size`; a range starting past the end is 416.
    Undeclared,
    /// Declares the range, sends half of it and closes the connection.
    CutMidway,
}

/// A stub Web API on loopback: one account whose `contract` file it serves per `reply`; or,
/// with `page_bytes`, an account page padded to that many bytes, streamed with no length. A
/// full read lists the account, a delta link (`$deltatoken`) nothing, and the account reads by
/// id.
struct Stub {
    account: Uuid,
    content: Vec<u8>,
    reply: FileReply,
    page_bytes: Option<usize>,
    /// Downloads of the file still to answer `404` (then `reply`).
    file_404s: Arc<AtomicUsize>,
    /// Downloads of the file still to be closed without a reply (then `reply`).
    file_resets: Arc<AtomicUsize>,
    /// File requests let through before `file_resets` starts closing them (a reset between
    /// two ranges).
    resets_from: usize,
    /// Requests for the file so far.
    file_requests: Arc<AtomicUsize>,
    /// Page replies still to take the server away: the listener is closed before the reply
    /// goes (so the next connection is refused) until `back` is told.
    vanish_after_pages: Arc<AtomicUsize>,
    back: Arc<tokio::sync::Notify>,
}

impl Stub {
    /// A stub serving one account whose file is `content`, answered per `reply`.
    fn file(content: Vec<u8>, reply: FileReply) -> Stub {
        Stub {
            account: Uuid::new_v4(),
            content,
            reply,
            page_bytes: None,
            file_404s: Arc::default(),
            file_resets: Arc::default(),
            resets_from: 0,
            file_requests: Arc::default(),
            vanish_after_pages: Arc::default(),
            back: Arc::default(),
        }
    }

    async fn start(self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let stub = Arc::new(self);
        let base = url.clone();
        let (vanish, mut vanishing) =
            tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
        tokio::spawn(async move {
            let mut listener = listener;
            loop {
                let gone = tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else {
                            return;
                        };
                        let stub = stub.clone();
                        let base = base.clone();
                        let vanish = vanish.clone();
                        tokio::spawn(async move { stub.serve(socket, &base, vanish).await });
                        None
                    }
                    Some(ack) = vanishing.recv() => Some(ack),
                };
                if let Some(ack) = gone {
                    drop(listener); // connections are refused from now on
                    let _ = ack.send(());
                    stub.back.notified().await;
                    listener = TcpListener::bind(addr).await.unwrap();
                }
            }
        });
        url
    }

    async fn serve(
        &self,
        mut socket: TcpStream,
        base: &str,
        vanish: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
    ) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let path = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let range = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("range")
                .then(|| v.trim().to_string())
        });
        if path.contains("/contract/$value") {
            let index = self.file_requests.fetch_add(1, Ordering::SeqCst);
            let reset = index >= self.resets_from
                && self
                    .file_resets
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if reset {
                return; // closed, no reply
            }
            let refuse = self
                .file_404s
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if refuse {
                let body = r#"{"error":{"code":"0x80060891","message":"The file is not there."}}"#;
                let _ = socket
                    .write_all(format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            } else {
                self.serve_file(socket, range).await;
            }
            return;
        }
        let row = serde_json::json!({
            "@odata.etag": "W/\"1\"",
            "accountid": self.account.to_string(),
            "name": "Stub",
            "contract": "file-1",
        });
        let page = if path.contains("accounts(") {
            row.to_string()
        } else {
            let rows = if path.contains("$deltatoken") {
                Vec::new()
            } else {
                vec![row]
            };
            serde_json::json!({
                "value": rows,
                "@odata.deltaLink": format!("{base}/api/data/v9.2/accounts?$deltatoken=1"),
            })
            .to_string()
        };
        let vanishes = self
            .vanish_after_pages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if vanishes {
            let (ack, closed) = tokio::sync::oneshot::channel();
            let _ = vanish.send(ack);
            let _ = closed.await;
        }
        match self.page_bytes {
            None => {
                let _ = socket
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                            page.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
            Some(total) => {
                // No length: the body runs until the connection closes, far past any cap.
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"value\":[")
                    .await;
                let piece = vec![b' '; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    if socket.write_all(&piece).await.is_err() {
                        return; // the client stopped reading
                    }
                    sent += piece.len();
                }
                let _ = socket.write_all(b"]}").await;
            }
        }
    }

    async fn serve_file(&self, mut socket: TcpStream, range: Option<String>) {
        let content = &self.content;
        let bounds = range.as_deref().and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
        });
        if let FileReply::CutMidway = self.reply {
            let (a, b) = bounds.unwrap_or((0, content.len().saturating_sub(1)));
            let body = &content[a.min(content.len())..(b + 1).min(content.len())];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nx-ms-file-size: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                content.len(),
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body[..body.len() / 2]).await;
            return;
        }
        if let FileReply::Undeclared = self.reply {
            let (a, b) = bounds.unwrap_or((0, content.len().saturating_sub(1)));
            let head = if a >= content.len() {
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            } else {
                let body = &content[a..(b + 1).min(content.len())];
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            let _ = socket.write_all(head.as_bytes()).await;
            if a < content.len() {
                let _ = socket
                    .write_all(&content[a..(b + 1).min(content.len())])
                    .await;
            }
            return;
        }
        let (status, declared, body): (&str, usize, &[u8]) = match (self.reply, bounds) {
            (FileReply::Ranges { declared }, Some((a, b))) => {
                let a = a.min(content.len());
                let b = (b + 1).min(content.len());
                ("206 Partial Content", declared, &content[a..b])
            }
            (FileReply::Whole { declared }, _) | (FileReply::Ranges { declared }, None) => {
                ("200 OK", declared, &content[..])
            }
            (FileReply::RangeToEnd, Some((a, _))) => (
                "206 Partial Content",
                content.len(),
                &content[a.min(content.len())..],
            ),
            (FileReply::RangeToEnd, None) | (FileReply::Undeclared | FileReply::CutMidway, _) => {
                ("200 OK", content.len(), &content[..])
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nx-ms-file-size: {declared}\r\nx-ms-file-name: stub.pdf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = socket.write_all(head.as_bytes()).await;
        let _ = socket.write_all(body).await;
    }
}

/// Pulls the stub's account into a fresh hub (ranges of 64 KiB) whose file does not come down:
/// the pull goes through, the row arrives without its file, the delta link is saved, and the
/// download is recorded as pending; nothing of the file is stored (no blob of the content or of
/// any prefix the bridge may have held, no file left in the hub's directory). Returns the
/// pending record.
async fn pull_defers_the_file_and_stores_nothing(stub: Stub) -> PendingDownload {
    let dir = tempfile::tempdir().unwrap();
    let hub_dir = dir.path().join("hub");
    let replica = hub_replica(&hub_dir);
    let account = stub.account;
    let content = stub.content.clone();
    let url = stub.start().await;
    let mut cfg = UpstreamConfig::new(url);
    cfg.file_chunk_bytes = 64 * 1024;
    let b = bridge(cfg, &replica);
    let listing = |d: &std::path::Path| {
        let mut v: Vec<String> = walk(d);
        v.sort();
        v
    };
    let before = listing(&hub_dir);
    b.pull_table("account").await.unwrap();
    let store = replica.lock().unwrap();
    let row = store
        .store()
        .get("account", account)
        .unwrap()
        .expect("the row arrives without its file");
    assert_eq!(row.get("name"), &Value::Text("Stub".into()));
    assert_eq!(row.get("contract"), &Value::Null);
    assert!(
        state::delta_link(store.store(), "account")
            .unwrap()
            .is_some(),
        "the table's pull moved on"
    );
    for len in [content.len(), 10_000, 65_536, 100_000, 250_000] {
        let prefix = &content[..len.min(content.len())];
        let sha: [u8; 32] = Sha256::digest(prefix).into();
        assert_eq!(
            store.store().blob_size(&sha).unwrap(),
            None,
            "{len} bytes were stored"
        );
    }
    let pending = state::pending_download(store.store(), "account", account)
        .unwrap()
        .expect("the download is pending");
    assert_eq!(
        pending.columns.get("contract").map(String::as_str),
        Some("file-1")
    );
    assert_eq!(pending.attempts, 1);
    assert_eq!(b.stats.downloads_failed.load(Ordering::Relaxed), 1);
    drop(store);
    let after = listing(&hub_dir);
    let new: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
    assert!(
        new.iter().all(|p| !p.contains("tmp")),
        "a temporary file was left: {new:?}"
    );
    pending
}

fn walk(d: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[tokio::test]
async fn a_download_cut_midway_is_the_files_failure_not_the_rounds() {
    let pending = pull_defers_the_file_and_stores_nothing(Stub::file(
        pattern(150_000, 13),
        FileReply::CutMidway,
    ))
    .await;
    assert!(pending.last_error.contains("cut off"), "{pending:?}");
}

/// A download whose connection closes before any reply (a reset, a gateway's stream reset, a
/// slow first byte) is the file's failure, not the round's: a file that always fails so must
/// not keep the table's pull (and every later table's) stopped.
#[tokio::test]
async fn a_download_with_no_reply_is_the_files_failure_not_the_rounds() {
    let stub = Stub::file(
        pattern(150_000, 11),
        FileReply::Ranges { declared: 150_000 },
    );
    stub.file_resets.store(usize::MAX, Ordering::SeqCst);
    let pending = pull_defers_the_file_and_stores_nothing(stub).await;
    assert!(pending.last_error.contains("cut off"), "{pending:?}");
}

/// A reset between two ranges of a large file is the file's failure too.
#[tokio::test]
async fn a_reset_between_two_ranges_is_the_files_failure_not_the_rounds() {
    let mut stub = Stub::file(
        pattern(150_000, 19),
        FileReply::Ranges { declared: 150_000 },
    );
    stub.resets_from = 1;
    stub.file_resets.store(1, Ordering::SeqCst);
    let pending = pull_defers_the_file_and_stores_nothing(stub).await;
    assert!(pending.last_error.contains("cut off"), "{pending:?}");
}

/// Waits until the stub listens again.
async fn wait_until_up(url: &str) {
    let addr = url.trim_start_matches("http://");
    while TcpStream::connect(addr).await.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A download that finds no connection for its first range means Dataverse is away: the round
/// stops there, rather than every row of the page waiting for its own failed download while
/// the delta link moves on.
#[tokio::test]
async fn a_download_with_no_connection_stops_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let content = pattern(10_000, 17);
    let stub = Stub::file(content.clone(), FileReply::Ranges { declared: 10_000 });
    stub.vanish_after_pages.store(1, Ordering::SeqCst);
    let back = stub.back.clone();
    let account = stub.account;
    let url = stub.start().await;
    let b = bridge(UpstreamConfig::new(url.clone()), &replica);
    let stopped = b.pull_table("account").await.unwrap_err();
    assert!(
        matches!(stopped, UpstreamError::NoConnection(_)),
        "{stopped:?}"
    );
    {
        let r = replica.lock().unwrap();
        assert_eq!(state::delta_link(r.store(), "account").unwrap(), None);
        assert_eq!(
            state::pending_download(r.store(), "account", account).unwrap(),
            None
        );
        assert!(
            r.store().get("account", account).unwrap().is_none(),
            "the page waits"
        );
    }
    assert_eq!(b.stats.downloads_failed.load(Ordering::Relaxed), 0);
    // Dataverse is back: the same page comes again, with its file.
    back.notify_one();
    wait_until_up(&url).await;
    b.pull_table("account").await.unwrap();
    assert!(hub_contract(&replica, account).unwrap().1 == content);
}

/// A file whose download keeps stopping the round (no connection for it each time, right after
/// its page was read) stops only so many: then it is an ordinary pending download, the page is
/// applied and the pull moves on.
#[tokio::test]
async fn a_file_that_keeps_stopping_the_round_becomes_a_pending_download() {
    use fieldsync_node::upstream::files::ROUND_STOPS_PER_FILE_MAX;
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let content = pattern(10_000, 23);
    let stub = Stub::file(content.clone(), FileReply::Ranges { declared: 10_000 });
    stub.vanish_after_pages
        .store(ROUND_STOPS_PER_FILE_MAX as usize, Ordering::SeqCst);
    let back = stub.back.clone();
    let account = stub.account;
    let url = stub.start().await;
    let mut cfg = UpstreamConfig::new(url.clone());
    cfg.file_retry_ms = 300;
    cfg.file_retry_max_ms = 300;
    let b = bridge(cfg, &replica);
    for _ in 1..ROUND_STOPS_PER_FILE_MAX {
        let stopped = b.pull_table("account").await.unwrap_err();
        assert!(
            matches!(stopped, UpstreamError::NoConnection(_)),
            "{stopped:?}"
        );
        back.notify_one();
        wait_until_up(&url).await;
    }
    b.pull_table("account").await.unwrap();
    {
        let r = replica.lock().unwrap();
        assert!(r.store().get("account", account).unwrap().is_some());
        assert!(state::delta_link(r.store(), "account").unwrap().is_some());
        let pending = state::pending_download(r.store(), "account", account)
            .unwrap()
            .expect("pending");
        assert_eq!(pending.attempts, 1);
    }
    assert_eq!(b.stats.downloads_failed.load(Ordering::Relaxed), 1);
    back.notify_one();
    wait_until_up(&url).await;
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    b.pull_table("account").await.unwrap();
    assert!(hub_contract(&replica, account).unwrap().1 == content);
}

#[tokio::test]
async fn a_file_shorter_than_its_declared_size_is_refused() {
    let pending = pull_defers_the_file_and_stores_nothing(Stub::file(
        pattern(250_000, 7),
        FileReply::Ranges { declared: 300_000 },
    ))
    .await;
    assert!(
        pending.last_error.contains("not the length it declares"),
        "{pending:?}"
    );
}

#[tokio::test]
async fn a_file_longer_than_its_declared_size_is_refused_without_reading_it_all() {
    let pending = pull_defers_the_file_and_stores_nothing(Stub::file(
        pattern(1_000_000, 11),
        FileReply::Whole { declared: 10_000 },
    ))
    .await;
    assert!(
        pending
            .last_error
            .contains("10000 bytes expected from offset 0, 10001 received"),
        "{pending:?}"
    );
}

#[tokio::test]
async fn a_range_longer_than_asked_is_refused() {
    let pending = pull_defers_the_file_and_stores_nothing(Stub::file(
        pattern(200_000, 5),
        FileReply::RangeToEnd,
    ))
    .await;
    assert!(
        pending
            .last_error
            .contains("65536 bytes expected from offset 0"),
        "{pending:?}"
    );
}

#[tokio::test]
async fn a_server_that_ignores_ranges_but_sends_the_declared_file_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let content = pattern(150_000, 3);
    let stub = Stub::file(content.clone(), FileReply::Whole { declared: 150_000 });
    let account = stub.account;
    let url = stub.start().await;
    let mut cfg = UpstreamConfig::new(url);
    cfg.file_chunk_bytes = 64 * 1024;
    let b = bridge(cfg, &replica);
    b.pull_table("account").await.unwrap();
    let (blob, got) = hub_contract(&replica, account).expect("downloaded");
    assert_eq!(blob.name, "stub.pdf");
    assert_eq!(got, content);
}

#[tokio::test]
async fn a_file_of_whole_ranges_with_no_declared_size_ends_at_the_servers_416() {
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let content = pattern(2 * 64 * 1024, 13);
    let stub = Stub::file(content.clone(), FileReply::Undeclared);
    let account = stub.account;
    let url = stub.start().await;
    let mut cfg = UpstreamConfig::new(url);
    cfg.file_chunk_bytes = 64 * 1024;
    let b = bridge(cfg, &replica);
    b.pull_table("account").await.unwrap();
    let (_, got) = hub_contract(&replica, account).expect("downloaded");
    assert_eq!(got, content);
}

#[tokio::test]
async fn a_response_longer_than_the_limit_is_refused_as_it_streams() {
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let url = Stub {
        page_bytes: Some(256 * 1024 * 1024),
        ..Stub::file(Vec::new(), FileReply::RangeToEnd)
    }
    .start()
    .await;
    let mut cfg = UpstreamConfig::new(url);
    cfg.response_bytes_max = 1024 * 1024;
    let b = bridge(cfg, &replica);
    let started = std::time::Instant::now();
    let err = b.pull_table("account").await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::ResponseTooLarge { limit: 1_048_576 }),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[tokio::test]
async fn a_page_longer_than_the_limit_is_refused_by_its_length() {
    // Against the emulator, whose pages declare their length: refused before reading, and the
    // same pull goes through with the default limit.
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let mut cfg = config(&emu, dir.path());
    cfg.response_bytes_max = 512;
    let err = bridge(cfg, &replica)
        .pull_table("account")
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::ResponseTooLarge { limit: 512 }),
        "{err:?}"
    );
    bridge(config(&emu, dir.path()), &replica)
        .pull_table("account")
        .await
        .unwrap();
    let all = replica
        .lock()
        .unwrap()
        .store()
        .scan("account")
        .unwrap()
        .count();
    assert!(all > 1);
    // A limit a few rows fit in, but not the whole page (2 KiB here): the bridge asks for
    // fewer rows.
    let other = tempfile::tempdir().unwrap();
    let replica = hub_replica(&other.path().join("hub"));
    let mut cfg = config(&emu, dir.path());
    cfg.response_bytes_max = 2048;
    bridge(cfg, &replica).pull_table("account").await.unwrap();
    let r = replica.lock().unwrap();
    assert_eq!(r.store().scan("account").unwrap().count(), all);
}

#[tokio::test]
async fn a_file_that_fails_to_come_down_stalls_nothing_and_comes_down_later() {
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let content = pattern(150_000, 17);
    let stub = Stub::file(content.clone(), FileReply::Ranges { declared: 150_000 });
    // The first two downloads find no file (Dataverse's 404 of a file).
    stub.file_404s.store(2, Ordering::SeqCst);
    let account = stub.account;
    let requests = stub.file_requests.clone();
    let url = stub.start().await;
    let mut cfg = UpstreamConfig::new(url);
    cfg.file_chunk_bytes = 64 * 1024;
    cfg.file_retry_ms = 1_000;
    cfg.file_retry_max_ms = 1_500;
    let b = bridge(cfg.clone(), &replica);
    // The row arrives; the file does not, and holds up nothing.
    b.pull_table("account").await.unwrap();
    assert!(hub_contract(&replica, account).is_none());
    let row = replica
        .lock()
        .unwrap()
        .store()
        .get("account", account)
        .unwrap();
    assert!(row.is_some(), "the row waits for its file");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    // Not due yet: the next round does not ask again.
    b.pull_table("account").await.unwrap();
    assert_eq!(
        requests.load(Ordering::SeqCst),
        1,
        "retried before its time"
    );
    // Due: it fails once more, and the wait grows (up to its bound).
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    b.pull_table("account").await.unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    let pending = state::pending_download(replica.lock().unwrap().store(), "account", account)
        .unwrap()
        .expect("still pending");
    assert_eq!(pending.attempts, 2);
    assert!(pending.last_error.contains("404"), "{pending:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        pending.retry_at_ms > now + 1_000 && pending.retry_at_ms <= now + 1_500,
        "{pending:?} at {now}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;
    // A hub restarted meanwhile (the record is durable); the delta link brings nothing: the
    // retry alone reads the row and brings the file.
    let b = bridge(cfg, &replica);
    b.pull_table("account").await.unwrap();
    let (blob, got) = hub_contract(&replica, account).expect("downloaded on retry");
    assert_eq!(got, content);
    assert_eq!(blob.name, "stub.pdf");
    {
        let r = replica.lock().unwrap();
        assert_eq!(
            state::pending_download(r.store(), "account", account).unwrap(),
            None
        );
        // The base knows the file now: it is not downloaded again.
        let base = state::base(r.store(), "account", account).unwrap().unwrap();
        assert_eq!(base.files["contract"].id, "file-1");
        assert_eq!(base.files["contract"].sha256, blob.hash_hex());
    }
    b.pull_table("account").await.unwrap();
    assert_eq!(
        requests.load(Ordering::SeqCst),
        2 + 3,
        "three ranges, then nothing more"
    );
}

/// A file over its column's maximum in the hub's schema is not taken: the download stops at the
/// range that shows it (the first, with a declared size; the one that passes the maximum,
/// without), the row comes in without it, and the file stays pending — tried again with
/// back-off, in case Dataverse replaces it — its error naming the maximum.
#[tokio::test]
async fn a_file_over_its_columns_maximum_is_not_taken() {
    let schema = upstream_support::example("schema.toml").replace(
        "contract = { type = \"file\", max_size_kb = 16384 }",
        "contract = { type = \"file\", max_size_kb = 64 }",
    );
    for (reply, ranges_read) in [
        (FileReply::Ranges { declared: 100_000 }, 1),
        // 16 KiB ranges: the fifth brings 80 KiB, past the 64 KiB maximum.
        (FileReply::Undeclared, 5),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let replica = hub_replica_with_schema(&dir.path().join("hub"), &schema);
        let stub = Stub::file(pattern(100_000, 17), reply);
        let account = stub.account;
        let requests = stub.file_requests.clone();
        let url = stub.start().await;
        let mut cfg = UpstreamConfig::new(url);
        cfg.file_chunk_bytes = 16 * 1024;
        let b = bridge(cfg, &replica);
        b.pull_table("account").await.unwrap();
        let r = replica.lock().unwrap();
        assert!(r.store().get("account", account).unwrap().is_some());
        drop(r);
        assert!(hub_contract(&replica, account).is_none());
        assert_eq!(requests.load(Ordering::SeqCst), ranges_read);
        let pending = state::pending_download(replica.lock().unwrap().store(), "account", account)
            .unwrap()
            .expect("pending");
        assert!(
            pending
                .last_error
                .contains("over its column's maximum of 65536"),
            "{pending:?}"
        );
    }
}

/// Bytes this thread has written with `write` and its kin (Linux's per-thread I/O accounting).
#[cfg(target_os = "linux")]
fn written_by_this_thread() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A download's temporary file is written on tokio's blocking threads, not on the runtime
/// thread driving the bridge: on a current-thread runtime, what that thread writes during a
/// pull is the store's own writes of the blob (measured alone first), not the file once more.
#[cfg(target_os = "linux")]
#[test]
fn a_downloads_temporary_file_is_not_written_on_the_runtime_thread() {
    let content = pattern(4 << 20, 251);
    let stub = Stub::file(
        content.clone(),
        FileReply::Ranges {
            declared: content.len(),
        },
    );
    let account = stub.account;
    // The stub serves from a thread of its own: its socket writes are not this thread's.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tx.send(stub.start().await).unwrap();
            std::future::pending::<()>().await
        })
    });
    let url = rx.recv().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let replica = hub_replica(&dir.path().join("hub"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // What storing a blob of this size writes from this thread, in a hub of its own in
        // the same state as the one pulling (how much a store writes depends on what it holds).
        let other = hub_replica(&dir.path().join("other"));
        let before = written_by_this_thread();
        other
            .lock()
            .unwrap()
            .store()
            .put_blob("other.pdf", &mut pattern(content.len(), 241).as_slice())
            .unwrap();
        let storing = written_by_this_thread() - before;
        let mut cfg = UpstreamConfig::new(url);
        cfg.file_chunk_bytes = 1 << 20;
        let b = bridge(cfg, &replica);
        let before = written_by_this_thread();
        b.pull_table("account").await.unwrap();
        let pulling = written_by_this_thread() - before;
        let (_, got) = hub_contract(&replica, account).expect("downloaded");
        assert_eq!(got, content);
        assert!(
            pulling < storing + content.len() as u64 / 2,
            "the runtime thread wrote {pulling} bytes; storing the blob writes {storing}"
        );
    });
}

/// A hub account with a file `F1` known to Dataverse; the office replaces it with `F2`, the
/// hub's download of `F2` fails once (found by the pull, or by the push's re-read after a
/// `412` when `pull_first` is false), and meanwhile a device renames the row (and, with
/// `device_file`, attaches a file `F3` of its own). The push must not send `F1` (nor `F3`:
/// Dataverse's newer file wins, as its values do) over `F2`, and the download's retry brings
/// `F2` to the hub.
async fn a_device_edit_during_a_pending_download(pull_first: bool, device_file: bool) {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&["--test-faults"]);
    let mut cfg = config(&emu, dir.path());
    cfg.file_retry_ms = 500;
    cfg.file_retry_max_ms = 500;
    let b = bridge(cfg, &replica);
    let (first, second) = (pattern(5_000, 7), pattern(6_000, 11));
    let blob = replica
        .lock()
        .unwrap()
        .store()
        .put_blob("f1.pdf", &mut first.as_slice())
        .unwrap();
    let id = Uuid::new_v4();
    let write = |values: &[(&str, Value)]| {
        replica
            .lock()
            .unwrap()
            .local_write("account", id, values)
            .unwrap();
    };
    write(&[
        ("name", Value::Text("Before".into())),
        ("contract", Value::File(blob)),
    ]);
    b.push().await.unwrap();
    b.pull().await.unwrap();
    assert!(emu.office_gets_file(id).await == Some(first.clone()));

    emu.office_puts_file(id, "f2.pdf", &second).await;
    emu.fail_file_downloads(1).await;
    if pull_first {
        b.pull_table("account").await.unwrap();
        assert!(hub_contract(&replica, id).unwrap().1 == first);
    }
    write(&[("name", Value::Text("Renamed".into()))]);
    if device_file {
        let third = pattern(7_000, 13);
        let blob = replica
            .lock()
            .unwrap()
            .store()
            .put_blob("f3.pdf", &mut third.as_slice())
            .unwrap();
        write(&[("contract", Value::File(blob))]);
    }
    b.push().await.unwrap();
    assert_eq!(b.stats.downloads_failed.load(Ordering::Relaxed), 1);
    // Holding a device's file back is counted (and logged); an untouched column is not.
    let held = b.stats.uploads_held.load(Ordering::Relaxed);
    if device_file {
        assert!(held >= 1, "the held file was not counted");
    } else {
        assert_eq!(held, 0);
    }
    let upstream = emu.row("accounts", id).await.unwrap();
    assert_eq!(upstream["name"], "Renamed");
    assert!(
        emu.office_gets_file(id).await == Some(second.clone()),
        "a file of the hub's went over the office's newer one"
    );
    let pending = state::pending_download(replica.lock().unwrap().store(), "account", id).unwrap();
    assert!(pending.is_some(), "the download is still to come");

    // Once due, the download is tried again and the office's file comes to the hub.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    b.pull().await.unwrap();
    let (here, content) = hub_contract(&replica, id).expect("a file");
    assert!(
        content == second,
        "the office's file did not come to the hub"
    );
    assert_eq!(here.name, "f2.pdf");
    assert_eq!(
        state::pending_download(replica.lock().unwrap().store(), "account", id).unwrap(),
        None
    );
    b.push().await.unwrap();
    assert!(emu.office_gets_file(id).await == Some(second));
}

#[tokio::test]
async fn a_device_edit_after_a_failed_download_does_not_send_the_old_file_back() {
    a_device_edit_during_a_pending_download(true, false).await;
}

#[tokio::test]
async fn a_device_file_during_a_pending_download_does_not_go_over_dataverses_newer_one() {
    a_device_edit_during_a_pending_download(true, true).await;
}

#[tokio::test]
async fn a_device_edit_that_meets_a_failed_download_on_412_does_not_send_the_old_file_back() {
    a_device_edit_during_a_pending_download(false, false).await;
}

/// A pending download's failures are counted per file: when Dataverse replaces the file that
/// kept failing, the new one starts from its first attempt (and its first short wait).
#[tokio::test]
async fn a_new_file_replacing_a_failing_one_starts_its_own_count() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&["--test-faults"]);
    let mut cfg = config(&emu, dir.path());
    cfg.file_retry_ms = 300;
    cfg.file_retry_max_ms = 60_000;
    let b = bridge(cfg, &replica);
    let (status, created) = emu
        .call(
            reqwest::Method::POST,
            "accounts",
            Some(serde_json::json!({"name": "Files"})),
        )
        .await;
    assert!(status < 300, "{created}");
    b.pull().await.unwrap();
    let id = replica
        .lock()
        .unwrap()
        .store()
        .scan("account")
        .unwrap()
        .map(|r| r.unwrap())
        .find(|r| r.get("name") == &Value::Text("Files".into()))
        .expect("pulled")
        .id;
    let attempts = || {
        state::pending_download(replica.lock().unwrap().store(), "account", id)
            .unwrap()
            .expect("pending")
            .attempts
    };
    emu.office_puts_file(id, "one.pdf", &pattern(3_000, 5))
        .await;
    emu.fail_file_downloads(10).await;
    b.pull().await.unwrap();
    assert_eq!(attempts(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    b.pull().await.unwrap();
    assert_eq!(attempts(), 2, "the same file failed again");
    assert_eq!(b.stats.pending_download_rows.load(Ordering::Relaxed), 1);
    emu.office_puts_file(id, "two.pdf", &pattern(4_000, 9))
        .await;
    b.pull().await.unwrap();
    let pending = state::pending_download(replica.lock().unwrap().store(), "account", id)
        .unwrap()
        .expect("pending");
    assert_eq!(pending.attempts, 1, "{pending:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(pending.retry_at_ms <= now + 300, "{pending:?} at {now}");
}

/// A pending download of a table the hub no longer relays would never be retried: the pull
/// drops it, and the gauge counts only the others. That table's delta link goes too, so that
/// relaying it again starts with a full read that finds the file.
#[tokio::test]
async fn pending_downloads_of_tables_no_longer_relayed_are_dropped() {
    let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);
    let (retired, kept) = (Uuid::new_v4(), Uuid::new_v4());
    let record = PendingDownload {
        columns: [("contract".to_string(), "file-9".to_string())].into(),
        attempts: 1,
        retry_at_ms: u64::MAX,
        last_error: "503".into(),
    };
    {
        let r = replica.lock().unwrap();
        let mut w = state::StateWrites::default();
        w.put_pending_download("retired_table", retired, &record)
            .unwrap();
        w.put_pending_download("account", kept, &record).unwrap();
        w.set_delta_link("retired_table", Some("retired?$deltatoken=1"));
        w.commit(r.store()).unwrap();
    }
    // A bridge started on this state counts what waits before its first pull.
    let b = bridge(config(&emu, dir.path()), &replica);
    assert_eq!(b.stats.pending_download_rows.load(Ordering::Relaxed), 1);
    b.pull().await.unwrap();
    let r = replica.lock().unwrap();
    assert_eq!(
        state::delta_link(r.store(), "retired_table").unwrap(),
        None,
        "relaying the table again starts with a full read"
    );
    let left: Vec<_> = state::pending_download_rows(r.store()).unwrap();
    assert_eq!(left, vec![("account".to_string(), kept)]);
    assert_eq!(b.stats.pending_download_rows.load(Ordering::Relaxed), 1);
}
