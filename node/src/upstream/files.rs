//! File and image columns (`file-column-data.md`, `image-column-data.md`): uploaded with
//! `PATCH .../<column>` (chunked past `file_chunk_bytes`, `x-ms-transfer-mode: chunked`),
//! downloaded from `.../<column>/$value` (`?size=full` for images) in ranges. Which file a column
//! holds upstream is tracked per row (Dataverse's file id and the content's SHA-256), so a file
//! crosses the wire once per change.

use std::collections::BTreeMap;

use fieldsync_store::{BlobRef, ColumnType, RowId, Value};
use reqwest::Method;
use tracing::{debug, info_span, Instrument};

use super::client::ApiRequest;
use super::map::WireRow;
use super::state::{self, FileState, StateWrites};
use super::{lock, Bridge, UpstreamError};

fn blob_of(v: &Value) -> Option<&BlobRef> {
    match v {
        Value::File(b) | Value::Image(b) => Some(b),
        _ => None,
    }
}

impl Bridge {
    /// Downloads the files of pulled rows whose file id changed since the row's base, into the
    /// hub's blob store; records what to write and the new file states in each row.
    pub(crate) async fn fetch_files(
        &self,
        table: &str,
        rows: &mut [WireRow],
    ) -> Result<(), UpstreamError> {
        let (set, columns) = {
            let hub = lock(&self.replica);
            let tab = hub.store().schema().table(table)?;
            let cols: Vec<(String, ColumnType)> =
                tab.blob_columns().map(|c| (c.name.clone(), c.ty)).collect();
            (tab.entity_set.clone(), cols)
        };
        if columns.is_empty() {
            return Ok(());
        }
        for row in rows.iter_mut() {
            let base = state::base(lock(&self.replica).store(), table, row.id)?;
            for (col, ty) in &columns {
                let known = base.as_ref().and_then(|b| b.files.get(col));
                match (row.files.get(col), known) {
                    (Some(id), Some(k)) if *id == k.id => {}
                    (None, None) => {}
                    (None, Some(_)) => row.file_writes.push((col.clone(), Value::Null)),
                    (Some(id), _) => {
                        let id = id.clone();
                        let blob = self
                            .download(&set, row.id, col, *ty)
                            .instrument(info_span!("upstream_file_download", %table, column = %col))
                            .await?;
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
                    }
                }
            }
        }
        Ok(())
    }

    async fn download(
        &self,
        set: &str,
        id: RowId,
        column: &str,
        ty: ColumnType,
    ) -> Result<BlobRef, UpstreamError> {
        let size = if ty == ColumnType::Image {
            "?size=full"
        } else {
            ""
        };
        let path = format!("{set}({id})/{column}/$value{size}");
        let chunk = self.config.file_chunk_bytes.max(1);
        let mut bytes: Vec<u8> = Vec::new();
        let mut name = String::from("file");
        loop {
            let from = bytes.len() as u64;
            let req = ApiRequest::new(Method::GET, path.clone())
                .header("Range", format!("bytes={from}-{}", from + chunk - 1));
            let resp = self.client.send(&req).await?;
            if !resp.is_success() {
                return Err(resp.error());
            }
            if let Some(n) = resp.header("x-ms-file-name") {
                name = n.to_string();
            }
            let total = resp
                .header("x-ms-file-size")
                .and_then(|v| v.parse::<u64>().ok());
            let whole = resp.status == 200; // the server sent everything at once
            bytes.extend_from_slice(&resp.body);
            let done =
                whole || resp.body.is_empty() || total.is_none_or(|t| bytes.len() as u64 >= t);
            if done {
                break;
            }
        }
        debug!(column, bytes = bytes.len(), "file downloaded");
        let hub = lock(&self.replica);
        Ok(hub.store().put_blob(&name, &mut bytes.as_slice())?)
    }

    /// Sends the files that waited for their content to reach the hub (a device's upload):
    /// the rows whose every file is here now, or that are gone.
    pub(crate) async fn push_waiting_files(&self) -> Result<(), UpstreamError> {
        let ready: Vec<(String, RowId)> = {
            let hub = lock(&self.replica);
            let store = hub.store();
            let mut ready = Vec::new();
            for (table, id) in state::file_waits(store)? {
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
                match here {
                    _ if !differs => {}
                    // A device attached it and its upload has not finished: this column goes
                    // once the content is here (`push_waiting_files`).
                    Some(b) if !store.has_blob(b)? => waiting = true,
                    Some(b) => {
                        changes.push((c.name.clone(), Some((b.clone(), store.read_blob(b)?))))
                    }
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
                Some((blob, data)) => {
                    self.upload(&path, &blob.name, data)
                        .instrument(info_span!("upstream_file_upload", %table, column = %col))
                        .await?;
                    shas.insert(col, blob.hash_hex());
                }
            }
        }
        // Learn the new file ids and etag (an upload changes the row's version).
        let Some(row) = self.read_row(table, id).await? else {
            return Ok(()); // deleted meanwhile: the next pull says so
        };
        let mut hub = lock(&self.replica);
        let old = state::base(hub.store(), table, id)?;
        let files = row
            .files
            .iter()
            .filter_map(|(col, fid)| {
                let sha = shas.get(col).cloned().or_else(|| {
                    old.as_ref()
                        .and_then(|b| b.files.get(col))
                        .map(|f| f.sha256.clone())
                })?;
                Some((
                    col.clone(),
                    FileState {
                        id: fid.clone(),
                        sha256: sha,
                    },
                ))
            })
            .collect();
        // Merged like any row read from Dataverse (what changed there since the hub's write
        // comes in; values the hub refuses stay its own), and recorded as the new base.
        let row = WireRow {
            file_states: files,
            ..row
        };
        let tables = self.apply_page(&mut hub, table, &[row], &[], None)?;
        drop(hub);
        self.changed(&tables);
        Ok(())
    }

    async fn upload(&self, path: &str, name: &str, data: Vec<u8>) -> Result<(), UpstreamError> {
        let chunk = self.config.file_chunk_bytes.max(1) as usize;
        let octets = "application/octet-stream";
        let file_name = vec![("x-ms-file-name".to_string(), name.to_string())];
        if data.len() <= chunk {
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
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(chunk, |s| s.min(chunk))
            .max(1);
        let total = data.len();
        for (i, part) in data.chunks(size).enumerate() {
            let from = i * size;
            let range = format!("bytes {from}-{}/{total}", from + part.len() - 1);
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
                    part.to_vec(),
                )
                .await?;
            if !resp.is_success() {
                return Err(resp.error());
            }
        }
        Ok(())
    }
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
