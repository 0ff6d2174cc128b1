//! File and image columns (`file-column-data.md`, `image-column-data.md`): uploaded with
//! `PATCH .../<column>` (chunked past `file_chunk_bytes`, `x-ms-transfer-mode: chunked`),
//! downloaded from `.../<column>/$value` (`?size=full` for images) in ranges, through a
//! temporary file and checked against `x-ms-file-size` before they become a blob; uploads read
//! one chunk at a time from the store. Which file a column holds upstream is tracked per row
//! (Dataverse's file id and the content's SHA-256), so a file crosses the wire once per change.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, SeekFrom};
use std::path::Path;

use std::sync::atomic::Ordering;

use fieldsync_store::{BlobRef, ColumnType, RowId, StoreError, Value};
use reqwest::Method;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tracing::{debug, info_span, warn, Instrument};

use super::client::ApiRequest;
use super::map::WireRow;
use super::state::{self, FileState, PendingDownload, StateWrites};
use super::{lock, Bridge, UpstreamError};

/// Rounds one file's download may stop (no connection for its first range while the page
/// before it was read) before it counts as an ordinary failed download.
pub const ROUND_STOPS_PER_FILE_MAX: u32 = 3;

fn blob_of(v: &Value) -> Option<&BlobRef> {
    match v {
        Value::File(b) | Value::Image(b) => Some(b),
        _ => None,
    }
}

impl Bridge {
    /// Downloads the files of pulled rows whose file id changed since the row's base, into the
    /// hub's blob store; records what to write and the new file states in each row. Columns
    /// already in a row's `file_states` (content the hub just uploaded) are taken as they are.
    ///
    /// A download that fails does not fail the rows: the column keeps the hub's previous
    /// content (and its previous state in the base, so the push does not send it back), and
    /// the row is recorded as a [`PendingDownload`] — durably, before the row is applied —
    /// retried with back-off by [`Bridge::retry_downloads`]. Only a failure that is the whole
    /// round's (no reply at all, credentials, throttling past the wait) stops here: a body cut
    /// midway is the file's ([`UpstreamError::DownloadCut`]).
    pub(crate) async fn fetch_files(
        &self,
        table: &str,
        rows: &mut [WireRow],
    ) -> Result<(), UpstreamError> {
        let (set, columns) = {
            let hub = lock(&self.replica);
            let tab = hub.store().schema().table(table)?;
            let cols: Vec<(String, ColumnType, u64)> = tab
                .blob_columns()
                .map(|c| (c.name.clone(), c.ty, c.max_file_bytes().unwrap_or(0)))
                .collect();
            (tab.entity_set.clone(), cols)
        };
        if columns.is_empty() {
            return Ok(());
        }
        for row in rows.iter_mut() {
            let (base, pending) = {
                let hub = lock(&self.replica);
                (
                    state::base(hub.store(), table, row.id)?,
                    state::pending_download(hub.store(), table, row.id)?,
                )
            };
            let now = crate::unix_ms();
            // Columns still to come down, and the last failure of this attempt.
            let mut missing = BTreeMap::new();
            let mut failure: Option<UpstreamError> = None;
            for (col, ty, max) in &columns {
                if row.file_states.contains_key(col) {
                    continue;
                }
                let known = base.as_ref().and_then(|b| b.files.get(col));
                let id = match (row.files.get(col), known) {
                    (Some(id), Some(k)) if *id == k.id => continue,
                    (None, None) => continue,
                    (None, Some(_)) => {
                        row.file_writes.push((col.clone(), Value::Null));
                        continue;
                    }
                    (Some(id), _) => id.clone(),
                };
                // The same file failed lately: its turn comes at `retry_at_ms`.
                let waits = pending
                    .as_ref()
                    .is_some_and(|p| p.columns.get(col) == Some(&id) && now < p.retry_at_ms);
                let downloaded = if waits {
                    None
                } else {
                    Some(
                        self.download(&set, row.id, col, *ty, *max)
                            .instrument(info_span!("upstream_file_download", %table, column = %col))
                            .await,
                    )
                };
                match downloaded {
                    Some(Ok(blob)) => {
                        self.round_stops_by_file(|stops| stops.remove(&id));
                        row.file_states.insert(
                            col.clone(),
                            FileState {
                                id,
                                sha256: blob.hash_hex(),
                            },
                        );
                        let value = match ty {
                            ColumnType::Image => Value::Image(blob),
                            _ => Value::File(blob),
                        };
                        row.file_writes.push((col.clone(), value));
                        continue;
                    }
                    // Dataverse itself is away (no connection for the file's first range),
                    // refusing the credentials or asking to wait: so is every other file, and
                    // the page is not applied — unless this file stopped rounds too often.
                    Some(Err(e)) if e.is_round_wide() && !self.stopped_rounds_too_often(&id) => {
                        return Err(e)
                    }
                    Some(Err(e)) => {
                        warn!(table, row = %row.id, column = %col, error = %e, "a file from Dataverse did not come down; its row goes on, the file is tried again later");
                        self.stats.downloads_failed.fetch_add(1, Ordering::Relaxed);
                        failure = Some(e);
                    }
                    None => {}
                }
                // Not here yet: the hub keeps what it had, and so does the base.
                if let Some(k) = known {
                    row.file_states.insert(col.clone(), k.clone());
                }
                missing.insert(col.clone(), id);
            }
            if missing.is_empty() {
                row.downloads_done = pending.is_some();
                continue;
            }
            // Another file than the one that failed (Dataverse replaced it): its own count.
            let same_files = pending
                .as_ref()
                .is_some_and(|p| missing.iter().all(|(c, id)| p.columns.get(c) == Some(id)));
            let previous = pending.filter(|_| same_files).unwrap_or_default();
            let record = PendingDownload {
                columns: missing,
                ..previous
            };
            let record = match failure {
                Some(e) => self.failed_again(record, &e, now),
                None => record, // waits for its turn, as it was
            };
            self.save_pending(table, row.id, &record)?;
        }
        Ok(())
    }

    /// Whether the download of file `id`, which just failed as if Dataverse were away, has
    /// stopped [`ROUND_STOPS_PER_FILE_MAX`] rounds: then it is recorded as an ordinary pending
    /// download (retried with back-off), so one file cannot keep the pulls stopped.
    fn stopped_rounds_too_often(&self, id: &str) -> bool {
        self.round_stops_by_file(|stops| {
            let n = stops.entry(id.to_string()).or_insert(0);
            *n += 1;
            let too_often = *n >= ROUND_STOPS_PER_FILE_MAX;
            if too_often {
                stops.remove(id);
            }
            too_often
        })
    }

    fn round_stops_by_file<T>(&self, f: impl FnOnce(&mut BTreeMap<String, u32>) -> T) -> T {
        // A map of counts is consistent whatever a panicking holder left.
        let mut stops = self
            .round_stops_by_file
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut stops)
    }

    /// A pending download after one more failed attempt at `now`: tried again after a wait
    /// that doubles with each failure, up to `file_retry_max_ms`.
    fn failed_again(
        &self,
        pending: PendingDownload,
        error: &UpstreamError,
        now: u64,
    ) -> PendingDownload {
        let attempts = pending.attempts.saturating_add(1);
        let wait = self.config.file_retry_delay(attempts);
        PendingDownload {
            attempts,
            retry_at_ms: now.saturating_add(wait.as_millis() as u64),
            last_error: error.to_string(),
            ..pending
        }
    }

    /// Records (durably) a row's downloads still to come.
    fn save_pending(
        &self,
        table: &str,
        id: RowId,
        pending: &PendingDownload,
    ) -> Result<(), UpstreamError> {
        let mut w = StateWrites::default();
        w.put_pending_download(table, id, pending)?;
        w.commit(lock(&self.replica).store())
    }

    /// Tries again the downloads of `table` whose time has come: reads each row as Dataverse
    /// has it now, downloads its files that differ from the base, and applies it like a pulled
    /// row (which clears the record once every file is here).
    pub(crate) async fn retry_downloads(&self, table: &str) -> Result<(), UpstreamError> {
        let now = crate::unix_ms();
        let due: Vec<(RowId, PendingDownload)> = {
            let hub = lock(&self.replica);
            state::pending_downloads(hub.store(), table)?
                .into_iter()
                .filter(|(_, _, p)| p.retry_at_ms <= now)
                .map(|(_, id, p)| (id, p))
                .collect()
        };
        for (id, pending) in due {
            let row = match self.read_row(table, id).await {
                Ok(row) => row,
                Err(e) if e.is_round_wide() => return Err(e),
                Err(e) => {
                    // The row cannot be read now: its files wait another turn.
                    warn!(table, %id, error = %e, "a row whose files are pending cannot be read; tried again later");
                    self.save_pending(table, id, &self.failed_again(pending, &e, now))?;
                    continue;
                }
            };
            let Some(row) = row else {
                // Gone from Dataverse: its deletion comes with the changes, and so do its files.
                let mut w = StateWrites::default();
                w.remove_pending_download(table, id);
                w.commit(lock(&self.replica).store())?;
                continue;
            };
            let mut rows = vec![row];
            self.fetch_files(table, &mut rows)
                .instrument(info_span!("upstream_download_retry", %table, %id))
                .await?;
            let tables = {
                let mut hub = lock(&self.replica);
                self.apply_page(&mut hub, table, &rows, &[], None)?
            };
            self.changed(&tables);
        }
        Ok(())
    }

    /// Downloads a file in ranges of `file_chunk_bytes` into an anonymous temporary file in
    /// the hub's data directory (memory holds one network read, not the file), checks every
    /// range and the total against the `x-ms-file-size` Dataverse declares, and only then
    /// stores it as a blob: a download that does not add up stores nothing, nor one of a file
    /// over `max` bytes (the column's maximum), which stops as soon as a range shows it.
    async fn download(
        &self,
        set: &str,
        id: RowId,
        column: &str,
        ty: ColumnType,
        max: u64,
    ) -> Result<BlobRef, UpstreamError> {
        let size = if ty == ColumnType::Image {
            "?size=full"
        } else {
            ""
        };
        let path = format!("{set}({id})/{column}/$value{size}");
        let chunk = self.config.file_chunk_bytes.max(1);
        let dir = lock(&self.replica).store().dir().map(Path::to_path_buf);
        // Creating, writing and rewinding the temporary file are blocking I/O: never on the
        // runtime's workers (created in `off_worker`, then written through `tokio::fs`).
        let created = crate::off_worker(|| match dir {
            Some(d) => tempfile::tempfile_in(d),
            None => tempfile::tempfile(),
        });
        let mut file = tokio::fs::File::from_std(created.map_err(|e| {
            UpstreamError::Io(format!("cannot create a download's temporary file: {e}"))
        })?);
        let mut received = 0u64;
        let mut declared: Option<u64> = None;
        let mut name = String::from("file");
        let mut first_request = true;
        loop {
            let asked = declared.map_or(chunk, |d| chunk.min(d.saturating_sub(received)).max(1));
            let range = format!("bytes={received}-{}", received.saturating_add(asked - 1));
            let sent = self
                .client
                .get_streaming(&path, &[("Range".to_string(), range)])
                .await;
            let resp = match sent {
                Ok(resp) => resp,
                // No connection for the first range: Dataverse is away (the caller stops the
                // round). Any other failure on the wire — a reset, a slow first byte, no
                // connection between two ranges — is this file's.
                Err(e @ UpstreamError::NoConnection(_)) if first_request => return Err(e),
                Err(e) => return Err(cut_midway(e)),
            };
            first_request = false;
            // With no size declared, a file whose length is a multiple of the range size is
            // only known to end when the next range starts past it.
            if resp.status == 416 && declared.is_none() && received > 0 {
                break;
            }
            if !resp.is_success() {
                return Err(resp
                    .read_to_end(self.client.response_bytes_max())
                    .await
                    .map_err(cut_midway)?
                    .error());
            }
            if let Some(n) = resp.header("x-ms-file-name") {
                name = n.to_string();
            }
            let size = resp
                .header("x-ms-file-size")
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        UpstreamError::BadReply(format!("x-ms-file-size is not a size: {v:?}"))
                    })
                })
                .transpose()?;
            // Every range of one download is of one file: a size that changes midway means the
            // file was replaced (or the server is confused).
            if let (Some(was), Some(now)) = (declared, size) {
                if was != now {
                    return Err(UpstreamError::BadReply(format!(
                        "x-ms-file-size changed from {was} to {now} during a download"
                    )));
                }
            }
            declared = declared.or(size);
            if let Some(size) = declared.filter(|d| *d > max) {
                return Err(UpstreamError::FileTooLarge { size, max });
            }
            let whole = resp.status == 200; // the server ignored the range: everything at once
            if let Some(start) = resp.header("content-range").and_then(range_start) {
                if !whole && start != received {
                    return Err(UpstreamError::BadReply(format!(
                        "asked for bytes from {received}, the reply starts at {start}"
                    )));
                }
            }
            if whole {
                // From the start, whatever came before.
                rewind(&mut file, true).await?;
                received = 0;
            }
            let expected = match (whole, declared) {
                (true, Some(d)) => d,
                (true, None) => self.client.response_bytes_max(),
                (false, Some(d)) => chunk.min(d.saturating_sub(received)),
                (false, None) => asked,
            };
            let at = received;
            let got = match resp.copy_to(&mut file, expected).await {
                Err(UpstreamError::ResponseTooLarge { .. }) => {
                    return Err(UpstreamError::FileLength {
                        at,
                        expected,
                        received: expected + 1,
                    })
                }
                other => other.map_err(cut_midway)?,
            };
            received += got;
            if received > max {
                return Err(UpstreamError::FileTooLarge {
                    size: received,
                    max,
                });
            }
            // A range shorter than the file still holds is a lie (or a cut connection): with a
            // declared size every range but the last is whole, and the last ends the file.
            if declared.is_some() && got != expected {
                return Err(UpstreamError::FileLength {
                    at,
                    expected,
                    received: got,
                });
            }
            let done = whole || got == 0 || declared.map_or(got < asked, |d| received >= d);
            if done {
                break;
            }
        }
        if let Some(d) = declared {
            if received != d {
                return Err(UpstreamError::FileLength {
                    at: 0,
                    expected: d,
                    received,
                });
            }
        }
        debug!(column, bytes = received, "file downloaded");
        rewind(&mut file, false).await?;
        let mut file = file.into_std().await;
        // The store reads the file as it hashes and keeps it: blocking, so off the workers, and
        // through the store's own handle, not under the replica's lock — device sessions go on
        // meanwhile (blobs are content-addressed: nothing of the replica's state changes).
        let store = lock(&self.replica).store().clone();
        crate::off_worker(|| Ok(store.put_blob(&name, &mut BufReader::new(&mut file))?))
    }

    /// Sends the files that waited for their content to reach the hub (a device's upload):
    /// the rows whose every file is here now, or that are gone, but for those `held` back
    /// (their row could not be read: they wait on).
    pub(crate) async fn push_waiting_files(
        &self,
        held: &BTreeSet<(String, RowId)>,
    ) -> Result<(), UpstreamError> {
        let ready: Vec<(String, RowId)> = {
            let hub = lock(&self.replica);
            let store = hub.store();
            let mut ready = Vec::new();
            for (table, id) in state::file_waits(store)? {
                if held.contains(&(table.clone(), id)) {
                    continue;
                }
                let row = store.get(&table, id)?;
                let mut here = true;
                for v in row.iter().flat_map(|r| r.values.values()) {
                    if let Some(b) = blob_of(v) {
                        here &= store.has_blob(b)?;
                    }
                }
                if here {
                    ready.push((table, id));
                }
            }
            ready
        };
        for (table, id) in ready {
            if self.tables.contains(&table) {
                match self
                    .push_files(&table, id)
                    .instrument(info_span!("upstream_waiting_file", %table, %id))
                    .await
                {
                    Ok(()) => {}
                    // Dataverse refuses it for good: sending it again every round would not
                    // change that (nor hold up the others). A failure that may pass ends the
                    // round, and the file stays waiting.
                    Err(e) if e.is_refusal() => self.refused(&table, id, &e),
                    Err(e) => return Err(e),
                }
            }
            // Cleared once sent: a failed round leaves it to the next.
            let mut w = StateWrites::default();
            w.set_file_wait(&table, id, false);
            w.commit(lock(&self.replica).store())?;
        }
        Ok(())
    }

    /// After a row was written: uploads (or removes) its file columns where the hub's content
    /// differs from what Dataverse has, then records the row as Dataverse now has it.
    pub(crate) async fn push_files(&self, table: &str, id: RowId) -> Result<(), UpstreamError> {
        let (set, changes) = {
            let hub = lock(&self.replica);
            let store = hub.store();
            let tab = store.schema().table(table)?;
            let Some(row) = store.get(table, id)? else {
                return Ok(());
            };
            let base = state::base(store, table, id)?;
            let pending = state::pending_download(store, table, id)?;
            let mut changes = Vec::new();
            let mut waiting = false;
            for c in tab.blob_columns() {
                let here = blob_of(row.get(&c.name));
                let there = base.as_ref().and_then(|b| b.files.get(&c.name));
                let differs = match (here, there) {
                    (Some(b), Some(t)) => b.hash_hex() != t.sha256,
                    (None, None) => false,
                    _ => true,
                };
                // Dataverse holds a newer file the hub has not downloaded yet: it wins over
                // the hub's, as a change made there wins over a concurrent one here.
                if pending
                    .as_ref()
                    .is_some_and(|p| p.columns.contains_key(&c.name))
                {
                    if differs {
                        warn!(table, %id, column = %c.name, "a file from the hub is not sent: Dataverse's newer file is still to come down and wins");
                        self.stats.uploads_held.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                match here {
                    _ if !differs => {}
                    // A device attached it and its upload has not finished: this column goes
                    // once the content is here (`push_waiting_files`).
                    Some(b) if !store.has_blob(b)? => waiting = true,
                    Some(b) => changes.push((c.name.clone(), Some(b.clone()))),
                    None => changes.push((c.name.clone(), None)),
                }
            }
            if waiting {
                debug!(table, %id, "a file waits for its upload to the hub");
                let mut w = StateWrites::default();
                w.set_file_wait(table, id, true);
                w.commit(store)?;
            }
            (tab.entity_set.clone(), changes)
        };
        if changes.is_empty() {
            return Ok(());
        }
        let mut shas = BTreeMap::new();
        for (col, content) in changes {
            let path = format!("{set}({id})/{col}");
            match content {
                None => {
                    let resp = self
                        .client
                        .send(&ApiRequest::new(Method::DELETE, path))
                        .await?;
                    if !resp.is_success() && resp.status != 404 {
                        return Err(resp.error());
                    }
                }
                Some(blob) => {
                    self.upload(&path, &blob)
                        .instrument(info_span!("upstream_file_upload", %table, column = %col))
                        .await?;
                    shas.insert(col, blob.hash_hex());
                }
            }
        }
        // Learn the new file ids and etag (an upload changes the row's version).
        let Some(mut row) = self.read_row(table, id).await? else {
            return Ok(()); // deleted meanwhile: the next pull says so
        };
        for (col, sha256) in shas {
            if let Some(fid) = row.files.get(&col) {
                let state = FileState {
                    id: fid.clone(),
                    sha256,
                };
                row.file_states.insert(col, state);
            }
        }
        // A column the hub did not send that changed in Dataverse meanwhile comes down.
        self.fetch_files(table, std::slice::from_mut(&mut row))
            .await?;
        // Merged like any row read from Dataverse (what changed there since the hub's write
        // comes in; values the hub refuses stay its own), and recorded as the new base.
        let mut hub = lock(&self.replica);
        let tables = self.apply_page(&mut hub, table, &[row], &[], None)?;
        drop(hub);
        self.changed(&tables);
        Ok(())
    }

    /// Uploads a blob: in one request up to `file_chunk_bytes`, else chunked, each chunk read
    /// from the store as it is sent (memory holds one chunk, not the file).
    async fn upload(&self, path: &str, blob: &BlobRef) -> Result<(), UpstreamError> {
        let chunk = self.config.file_chunk_bytes.max(1);
        let octets = "application/octet-stream";
        let name = blob.name.as_str();
        let file_name = vec![("x-ms-file-name".to_string(), name.to_string())];
        if blob.size <= chunk {
            let data = lock(&self.replica).store().read_blob(blob)?;
            let resp = self
                .client
                .send_bytes(Method::PATCH, path, &file_name, octets, data)
                .await?;
            return if resp.is_success() {
                Ok(())
            } else {
                Err(resp.error())
            };
        }
        let start = self
            .client
            .send_bytes(
                Method::PATCH,
                &format!("{path}?x-ms-file-name={}", encode(name)),
                &[("x-ms-transfer-mode".to_string(), "chunked".to_string())],
                octets,
                Vec::new(),
            )
            .await?;
        if !start.is_success() {
            return Err(start.error());
        }
        let location = start
            .header("location")
            .ok_or_else(|| UpstreamError::BadReply("a chunked upload without Location".into()))?
            .to_string();
        let size = start
            .header("x-ms-chunk-size")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(chunk, |s| s.min(chunk))
            .max(1);
        let total = blob.size;
        let mut from = 0u64;
        while from < total {
            let part = self.read_blob_span(blob, from, size.min(total - from))?;
            let range = format!("bytes {from}-{}/{total}", from + part.len() as u64 - 1);
            let resp = self
                .client
                .send_bytes(
                    Method::PATCH,
                    &location,
                    &[
                        ("Content-Range".to_string(), range),
                        ("x-ms-file-name".to_string(), name.to_string()),
                    ],
                    octets,
                    part,
                )
                .await?;
            if !resp.is_success() {
                return Err(resp.error());
            }
            from += size;
        }
        Ok(())
    }

    /// `len` bytes of a blob from `from`, gathered from the store's chunks (each checked
    /// against its hash).
    fn read_blob_span(
        &self,
        blob: &BlobRef,
        from: u64,
        len: u64,
    ) -> Result<Vec<u8>, UpstreamError> {
        let hub = lock(&self.replica);
        let store = hub.store();
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        while (out.len() as u64) < len {
            let at = from + out.len() as u64;
            let want = usize::try_from(len - out.len() as u64).unwrap_or(usize::MAX);
            let piece = match store.read_blob_range(&blob.sha256, at, want)? {
                Some((_, piece)) if !piece.is_empty() => piece,
                Some(_) => return Err(StoreError::BlobCorrupt(blob.hash_hex()).into()),
                None => return Err(StoreError::BlobNotFound(blob.hash_hex()).into()),
            };
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }
}

/// A download that failed on the wire once it had begun is the file's failure, not
/// Dataverse's absence.
fn cut_midway(e: UpstreamError) -> UpstreamError {
    match e {
        UpstreamError::Unreachable(m) | UpstreamError::NoConnection(m) => {
            UpstreamError::DownloadCut(m)
        }
        other => other,
    }
}

/// Back to the start of a download's temporary file once its writes are done, emptied first if
/// `truncate` (a server that sent the whole file after ranges).
async fn rewind(file: &mut tokio::fs::File, truncate: bool) -> Result<(), UpstreamError> {
    let rewound = async {
        file.flush().await?;
        if truncate {
            file.set_len(0).await?;
        }
        file.seek(SeekFrom::Start(0)).await.map(|_| ())
    };
    rewound
        .await
        .map_err(|e| UpstreamError::Io(format!("cannot rewind a download: {e}")))
}

/// The first byte of a `Content-Range: bytes <start>-<end>/<size>`.
fn range_start(v: &str) -> Option<u64> {
    let (start, _) = v.trim().strip_prefix("bytes ")?.split_once('-')?;
    start.trim().parse().ok()
}

/// Percent-encodes a file name for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
