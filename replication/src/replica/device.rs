//! [`DeviceReplica`]: the device's side of sync over its [`Store`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use fieldsync_store::{
    AuxWrite, BlobRef, ColumnConflict, Durability, LogEntry, RemoteOp, RowExport, RowId, Store,
    StoreError, Value, DELETED_KEY,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info_span, warn};

use super::{dec, enc, parse_row_key, row_key, sha_key, storage_err, ReplicaError};
use crate::profile::Profile;
use crate::proto::{
    BatchLimits, BlobSlice, Cursor, DeviceStorage, Millis, Operation, PushOp, Rejection,
    RejectionKind, RowChange, RowDoc, StorageError, SyncErrorRecord,
};

/// The aux space of a device's replication metadata.
const SPACE: &str = "device";
const K_ACKED: &[u8] = b"acked";
const P_CURSOR: &[u8] = b"cur/";
const P_ERROR: &[u8] = b"err/";
const P_EVICT: &[u8] = b"ev/";
const P_ROLLBACK: &[u8] = b"rb/";
const P_BLOB_PROGRESS: &[u8] = b"bp/";
const P_BLOB_CHUNK: &[u8] = b"bc/";
const P_BLOB_DONE: &[u8] = b"bd/";
/// A blob to download: `bw/` + sha256 → the row key (table, row) that refers to it.
const P_BLOB_WANTED: &[u8] = b"bw/";
/// A blob to upload: `bu/` + sha256 → the row key of a row the hub accepted it in.
const P_BLOB_UPLOAD: &[u8] = b"bu/";
/// Log entries read per step when looking for the device's own ops.
const SCAN_STEP: usize = 1024;
/// Acknowledged log entries a device lets pile up before it compacts them into the rows'
/// documents: a device used for months must not keep every change it ever made or pulled,
/// and one compaction per few thousand entries keeps its cost off most syncs.
pub const DEFAULT_COMPACT_BACKLOG: u64 = 4096;

/// A sync error as stored (a serde mirror of [`SyncErrorRecord`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredError {
    at: u64,
    seq: u64,
    table: String,
    row: RowId,
    operation: Operation,
    op_data: Vec<u8>,
    kind: RejectionKind,
    message: String,
}

impl From<StoredError> for SyncErrorRecord {
    fn from(e: StoredError) -> SyncErrorRecord {
        SyncErrorRecord {
            at: Millis(e.at),
            seq: e.seq,
            table: e.table,
            row: e.row,
            operation: e.operation,
            op_data: e.op_data,
            kind: e.kind,
            message: e.message,
        }
    }
}

/// A rollback waiting to run: evict the row, import the hub's row, re-apply the hub's
/// changes that arrived while it waited.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Rollback {
    /// The hub's row (the newest one heard of), if the device may read it.
    doc: Option<Vec<u8>>,
    /// Changes pulled for the row after `doc`.
    changes: Vec<Vec<u8>>,
}

/// A table's position in the hub's feed, as stored.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct StoredCursor {
    cursor: u64,
    synced_at: Option<u64>,
}

/// One table's sync state, for `fieldsync device status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSyncStatus {
    /// The table.
    pub table: String,
    /// Its cursor in the hub's feed.
    pub cursor: Cursor,
    /// When a pull of it last reached the end of the feed.
    pub last_sync: Option<Millis>,
}

/// A device's [`DeviceStorage`] over its [`Store`].
///
/// The device's own ops are the store's log entries made by the store's actor; pulled ops
/// share the log and are never pushed. The protocol's acknowledged sequence number is kept in
/// the aux space; the store's own acknowledged prefix is moved to just before the first
/// unacknowledged own op, so that pulled entries never block an eviction or a compaction.
#[derive(Debug, Clone)]
pub struct DeviceReplica {
    store: Store,
    /// Per table, the file and image columns the offline profile downloads (none without a
    /// profile: see [`DeviceReplica::with_profile`]).
    fetched_columns: BTreeMap<String, Vec<String>>,
    /// Compact the store's log once this many acknowledged entries are in it.
    compact_backlog: u64,
    /// `(a, b)`: this store's log holds no own entry with a seq in `(a, b]`. Log entries are
    /// never rewritten (only acknowledged ones are removed) and a new one always takes a seq
    /// above the last, so a span once scanned stays clean for as long as this replica's store
    /// is open; the pushes then skip the pulled entries they have read before instead of
    /// reading them each time.
    clean_span: Arc<Mutex<(u64, u64)>>,
}

/// A downloaded blob's chunks read back from the aux space in offset order, one at a time;
/// remembers their keys for the cleanup.
struct StoredChunks<'a> {
    replica: &'a DeviceReplica,
    sha256: [u8; 32],
    offset: u64,
    total: u64,
    buf: Vec<u8>,
    pos: usize,
    keys: Vec<Vec<u8>>,
}

impl std::io::Read for StoredChunks<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.offset >= self.total {
                return Ok(0);
            }
            let mut key = sha_key(P_BLOB_CHUNK, &self.sha256);
            key.extend_from_slice(&self.offset.to_be_bytes());
            let chunk = self
                .replica
                .get(&key)
                .map_err(|e| std::io::Error::other(e.to_string()))?
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    std::io::Error::other(format!("blob chunk at {} is missing", self.offset))
                })?;
            self.offset += chunk.len() as u64;
            self.keys.push(key);
            self.buf = chunk;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn seq_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn u64_of(bytes: &[u8]) -> Result<u64, StorageError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Corrupt("a stored counter is not 8 bytes".into()))
}

impl DeviceReplica {
    /// The device's replica over `store` (its metadata, if any, is in the store already).
    pub fn new(store: Store) -> DeviceReplica {
        DeviceReplica {
            store,
            fetched_columns: BTreeMap::new(),
            compact_backlog: DEFAULT_COMPACT_BACKLOG,
            clean_span: Arc::default(),
        }
    }

    /// Compacts the store's log once `entries` acknowledged entries are in it (default
    /// [`DEFAULT_COMPACT_BACKLOG`]; at least 1).
    pub fn with_compact_backlog(mut self, entries: u64) -> DeviceReplica {
        self.compact_backlog = entries.max(1);
        self
    }

    /// Downloads the files and images `profile` selects, for rows the device holds, as they
    /// arrive (without a profile the device fetches blobs only when asked).
    pub fn with_profile(mut self, profile: &Profile) -> DeviceReplica {
        let schema = self.store.schema();
        self.fetched_columns = profile
            .items
            .iter()
            .filter_map(|(name, item)| {
                let tab = schema.table(name).ok()?;
                let cols: Vec<String> = tab
                    .blob_columns()
                    .filter(|c| item.downloads_column(tab, &c.name))
                    .map(|c| c.name.clone())
                    .collect();
                (!cols.is_empty()).then(|| (name.clone(), cols))
            })
            .collect();
        self
    }

    /// The file and image values of a stored row, by column.
    fn blobs_of(&self, table: &str, row: RowId) -> Result<Vec<(String, BlobRef)>, StorageError> {
        self.store.blob_refs(table, row).map_err(storage_err)
    }

    /// A table's cursor record and its key (a default record if the table was never pulled).
    fn stored_cursor(&self, table: &str) -> Result<(Vec<u8>, StoredCursor), StorageError> {
        let mut k = P_CURSOR.to_vec();
        k.extend_from_slice(table.as_bytes());
        let c = match self.get(&k)? {
            Some(v) => dec(&v, "a cursor")?,
            None => StoredCursor::default(),
        };
        Ok((k, c))
    }

    /// The size the row that wants blob `sha256` gives it (`None` for a blob no held row
    /// wants, such as one fetched on request).
    fn wanted_blob_size(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StorageError> {
        let Some(key) = self.get(&sha_key(P_BLOB_WANTED, sha256))? else {
            return Ok(None);
        };
        Ok(self.row_blob(&key, sha256)?.map(|b| b.size))
    }

    /// Blob `sha256` as the row under `key` (a `row_key`) refers to it, if it still does.
    fn row_blob(&self, key: &[u8], sha256: &[u8; 32]) -> Result<Option<BlobRef>, StorageError> {
        let Some((table, row)) = parse_row_key(key) else {
            return Ok(None);
        };
        Ok(self
            .blobs_of(&table, row)?
            .into_iter()
            .find(|(_, b)| b.sha256 == *sha256)
            .map(|(_, b)| b))
    }

    /// Forgets what was downloaded of blob `sha256` (its chunks and progress); it stays wanted.
    fn drop_blob_download(&self, sha256: &[u8; 32]) -> Result<(), StorageError> {
        let mut writes: Vec<AuxWrite> = self
            .store
            .aux_scan(SPACE, &sha_key(P_BLOB_CHUNK, sha256))
            .map_err(storage_err)?
            .into_iter()
            .map(|(k, _)| AuxWrite::Remove(k))
            .collect();
        writes.push(AuxWrite::Remove(sha_key(P_BLOB_PROGRESS, sha256)));
        self.apply(&writes)
    }

    /// Records the blobs these rows refer to in downloaded columns that are not stored yet.
    fn want_blobs_of(&self, table: &str, rows: &BTreeSet<RowId>) -> Result<(), StorageError> {
        let Some(cols) = self.fetched_columns.get(table) else {
            return Ok(());
        };
        let mut writes = Vec::new();
        for row in rows {
            for (col, b) in self.blobs_of(table, *row)? {
                if cols.contains(&col) && !self.has_blob(&b.sha256)? {
                    writes.push(AuxWrite::Put(
                        sha_key(P_BLOB_WANTED, &b.sha256),
                        row_key(&[], table, *row),
                    ));
                }
            }
        }
        // Made durable with the pulled batch's cursor, as the rows are.
        self.store
            .aux_apply(SPACE, &writes, Durability::Group)
            .map_err(storage_err)
    }

    /// The upload-queue entries for the attachments of own ops in `(acked, up_to]` the hub
    /// accepted: the files and images each op set (not the row's current values: a later op
    /// may replace one and be rejected) that this device stored rather than downloaded.
    fn uploads_for_acked(
        &self,
        acked: u64,
        up_to: u64,
        rejected: &[Rejection],
    ) -> Result<Vec<AuxWrite>, StorageError> {
        let schema = self.store.schema();
        let has_blobs = |t: &str| {
            schema
                .table(t)
                .is_ok_and(|tab| tab.blob_columns().next().is_some())
        };
        if !schema.tables().any(|t| has_blobs(&t.name)) {
            return Ok(Vec::new());
        }
        let mut writes = Vec::new();
        for e in self.own_entries_through(acked, up_to, usize::MAX)? {
            if !has_blobs(&e.table) || rejected.iter().any(|r| r.seq == e.seq) {
                continue;
            }
            let set = self
                .store
                .inspect_change(&e.table, e.row, &e.change)
                .map_err(storage_err)?;
            for v in set.columns.values() {
                if let Value::File(b) | Value::Image(b) = v {
                    if self.has_blob(&b.sha256)?
                        && self.get(&sha_key(P_BLOB_DONE, &b.sha256))?.is_none()
                    {
                        writes.push(AuxWrite::Put(
                            sha_key(P_BLOB_UPLOAD, &b.sha256),
                            row_key(&[], &e.table, e.row),
                        ));
                    }
                }
            }
        }
        Ok(writes)
    }

    fn has_blob(&self, sha256: &[u8; 32]) -> Result<bool, StorageError> {
        Ok(self.store.blob_size(sha256).map_err(storage_err)?.is_some())
    }

    /// Whether `row` of `table` still refers to blob `sha256`.
    fn row_refers_to(&self, key: &[u8], sha256: &[u8; 32]) -> Result<bool, StorageError> {
        Ok(self.row_blob(key, sha256)?.is_some())
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The rows of `table` with a key under `prefix` (a `row_key` space).
    fn rows_under(&self, prefix: &[u8], table: &str) -> Result<HashSet<RowId>, StorageError> {
        let mut p = prefix.to_vec();
        p.extend_from_slice(table.as_bytes());
        p.push(0);
        Ok(self
            .store
            .aux_scan(SPACE, &p)
            .map_err(storage_err)?
            .iter()
            .filter_map(|(k, _)| RowId::from_slice(k.get(p.len()..)?).ok())
            .collect())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.store.aux_get(SPACE, key).map_err(storage_err)
    }

    fn apply(&self, writes: &[AuxWrite]) -> Result<(), StorageError> {
        self.store
            .aux_apply(SPACE, writes, Durability::Immediate)
            .map_err(storage_err)
    }

    /// The device's own log entries after `after`, oldest first, at most `limit`.
    fn own_entries(&self, after: u64, limit: usize) -> Result<Vec<LogEntry>, StorageError> {
        self.own_entries_through(after, u64::MAX, limit)
    }

    /// [`Self::own_entries`] with sequence numbers in `(after, up_to]`.
    fn own_entries_through(
        &self,
        after: u64,
        up_to: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StorageError> {
        let me = self.store.actor();
        let mut out = Vec::new();
        // The store's acknowledged prefix ends just before the first unacknowledged own op
        // (see `advance_store_ack`): nothing pending lies below it, so skip the pulled entries.
        let floor = self.store.acked_seq().map_err(storage_err)?;
        let start = after.max(floor);
        // Seqs are written in order under the writer lock, so a scan that sees seq s has seen
        // every seq below it (both engines' scans keep that; the device_robustness tests check
        // it). The clean span also stops at the last seq published before the scan, so that it
        // rests on that alone for entries written while it ran.
        let published = self.store.last_seq();
        let (a, b) = *self.clean_span.lock().unwrap_or_else(|e| e.into_inner());
        let mut from = if a <= start && start < b { b } else { start };
        // The scan's own clean span: `(start, clean_to]` holds no own entry.
        let mut clean_to = from;
        let mut found_own = false;
        'scan: loop {
            let batch = self.store.ops_since(from, SCAN_STEP).map_err(storage_err)?;
            let Some(last) = batch.last() else { break };
            from = last.seq;
            let done = batch.len() < SCAN_STEP;
            for e in batch {
                if e.seq > up_to {
                    break 'scan;
                }
                if e.actor == me {
                    found_own = true;
                    out.push(e);
                    if out.len() >= limit {
                        break 'scan;
                    }
                } else if !found_own {
                    clean_to = e.seq;
                }
            }
            if done {
                break;
            }
        }
        let clean_to = clean_to.min(published);
        if clean_to > start {
            let mut span = self.clean_span.lock().unwrap_or_else(|e| e.into_inner());
            *span = if start <= span.1 && clean_to >= span.0 {
                (span.0.min(start), span.1.max(clean_to))
            } else {
                (start, clean_to)
            };
        }
        Ok(out)
    }

    fn has_own_pending_on(&self, table: &str, row: RowId) -> Result<bool, StorageError> {
        let acked = self.acked_seq()?;
        Ok(self
            .own_entries(acked, usize::MAX)?
            .iter()
            .any(|e| e.table == table && e.row == row))
    }

    fn entry_at(&self, seq: u64) -> Result<Option<LogEntry>, StorageError> {
        Ok(self
            .store
            .ops_since(seq.saturating_sub(1), 1)
            .map_err(storage_err)?
            .into_iter()
            .find(|e| e.seq == seq))
    }

    /// Moves the store's acknowledged prefix to just before the first unacknowledged own op.
    fn advance_store_ack(&self) -> Result<(), StorageError> {
        let acked = self.acked_seq()?;
        // The log's end is read before the scan: an own op committed (by another thread)
        // while it runs lies after `end`, so it is neither found nor taken as acknowledged.
        let end = self.store.last_seq();
        let first = self.own_entries_through(acked, end, 1)?;
        let up_to = match first.first() {
            Some(e) => e.seq.saturating_sub(1),
            None => end,
        };
        self.store.acknowledge(up_to).map_err(storage_err)?;
        // Compaction saves space; it never decides what syncs. A failure (or a backlog that
        // does not read) is logged and tried again at the next acknowledgement, not turned
        // into a failed session.
        match self.store.compaction_backlog() {
            Ok(n) if n >= self.compact_backlog => match self.store.compact() {
                Ok(report) => debug!(?report, "device log compacted"),
                Err(e) => warn!(error = %e, "compacting the device's log failed"),
            },
            Ok(_) => {}
            Err(e) => warn!(error = %e, "the device's compaction backlog does not read"),
        }
        Ok(())
    }

    /// Evicts a row now if nothing blocks it; returns whether it is gone.
    fn try_evict(&self, table: &str, row: RowId) -> Result<bool, StorageError> {
        if self.has_own_pending_on(table, row)? {
            return Ok(false);
        }
        match self.store.evict_row(table, row) {
            Ok(_) => Ok(true),
            Err(StoreError::UnacknowledgedChanges { .. }) => Ok(false),
            Err(StoreError::Schema(e)) => {
                warn!(table, %row, error = %e, "eviction for an unknown table ignored");
                Ok(true)
            }
            Err(e) => Err(storage_err(e)),
        }
    }

    /// Carries out rollbacks and evictions that waited for acknowledgements.
    fn run_deferred(&self) -> Result<(), StorageError> {
        let mut writes = Vec::new();
        for (k, v) in self
            .store
            .aux_scan(SPACE, P_ROLLBACK)
            .map_err(storage_err)?
        {
            let Some((table, row)) = k.get(P_ROLLBACK.len()..).and_then(parse_row_key) else {
                writes.push(AuxWrite::Remove(k));
                continue;
            };
            if !self.try_evict(&table, row)? {
                continue;
            }
            let rb: Rollback = dec(&v, "a rollback")?;
            if let Some(doc) = rb.doc {
                let export = RowExport {
                    table: table.clone(),
                    id: row,
                    doc,
                };
                if let Err(e) = self.store.import_row(&export, Durability::Immediate) {
                    warn!(%table, %row, error = %e, "the hub's row for a rollback does not import");
                }
            }
            if !rb.changes.is_empty() {
                let ops: Vec<RemoteOp> = rb
                    .changes
                    .into_iter()
                    .map(|change| RemoteOp {
                        table: table.clone(),
                        row,
                        change,
                    })
                    .collect();
                if let Err(e) = self.store.apply_remote(&ops, Durability::Immediate) {
                    warn!(%table, %row, error = %e, "changes kept for a rollback do not apply");
                }
            }
            debug!(%table, %row, "rolled back");
            writes.push(AuxWrite::Remove(k));
        }
        for (k, _) in self.store.aux_scan(SPACE, P_EVICT).map_err(storage_err)? {
            let Some((table, row)) = k.get(P_EVICT.len()..).and_then(parse_row_key) else {
                writes.push(AuxWrite::Remove(k));
                continue;
            };
            if self.try_evict(&table, row)? {
                debug!(%table, %row, "deferred eviction done");
                writes.push(AuxWrite::Remove(k));
            }
        }
        if !writes.is_empty() {
            self.apply(&writes)?;
        }
        Ok(())
    }

    /// Every recorded sync error, by id (the op's sequence number), oldest first.
    pub fn sync_errors(&self) -> Result<Vec<(u64, SyncErrorRecord)>, ReplicaError> {
        let mut out = Vec::new();
        for (k, v) in self.store.aux_scan(SPACE, P_ERROR)? {
            let id = u64_of(k.get(P_ERROR.len()..).unwrap_or_default())?;
            let e: StoredError = dec(&v, "a sync error")?;
            out.push((id, e.into()));
        }
        Ok(out)
    }

    /// Re-applies a rejected op's data as a new local edit (pushed with the next sync) and
    /// removes the error; returns the new edit's sequence number.
    pub fn retry_error(&self, id: u64) -> Result<u64, ReplicaError> {
        let _span = info_span!("retry_error", id).entered();
        let key = seq_key(P_ERROR, id);
        let Some(v) = self.store.aux_get(SPACE, &key)? else {
            return Err(ReplicaError::NoSuchError(id));
        };
        let e: StoredError = dec(&v, "a sync error")?;
        let inspection = self.store.inspect_change(&e.table, e.row, &e.op_data)?;
        let delete = inspection.columns.contains_key(DELETED_KEY);
        let values: Vec<(&str, Value)> = inspection
            .columns
            .iter()
            .filter(|(c, _)| c.as_str() != DELETED_KEY)
            .map(|(c, v)| (c.as_str(), v.clone()))
            .collect();
        let mut tx = self.store.begin();
        if self.store.get(&e.table, e.row)?.is_some() {
            if delete {
                tx.delete(&e.table, e.row)?;
            } else {
                tx.update(&e.table, e.row, &values)?;
            }
        } else if delete {
            // The rollback removed the row (the device may not read it): re-inserting the
            // delete's other columns would create a row of nothing but `modifiedon`.
            return Err(ReplicaError::RowGone {
                table: e.table,
                row: e.row,
            });
        } else {
            let values: Vec<(&str, Value)> =
                values.into_iter().filter(|(_, v)| !v.is_null()).collect();
            tx.insert_with_id(&e.table, e.row, &values)?;
        }
        let seq = tx.commit_with(Durability::Immediate)?.last_seq;
        self.store.aux_remove(SPACE, &key, Durability::Immediate)?;
        Ok(seq)
    }

    /// Forgets a sync error (its op stays rolled back); returns whether it was there.
    pub fn discard_error(&self, id: u64) -> Result<bool, ReplicaError> {
        Ok(self
            .store
            .aux_remove(SPACE, &seq_key(P_ERROR, id), Durability::Immediate)?)
    }

    /// Every table the device has pulled, with its cursor and last sync.
    pub fn table_sync_status(&self) -> Result<Vec<TableSyncStatus>, ReplicaError> {
        let mut out = Vec::new();
        for (k, v) in self.store.aux_scan(SPACE, P_CURSOR)? {
            let table = String::from_utf8_lossy(k.get(P_CURSOR.len()..).unwrap_or_default());
            let c: StoredCursor = dec(&v, "a cursor")?;
            out.push(TableSyncStatus {
                table: table.into_owned(),
                cursor: Cursor(c.cursor),
                last_sync: c.synced_at.map(Millis),
            });
        }
        Ok(out)
    }

    /// How many own ops wait for the hub.
    pub fn pending_op_count(&self) -> Result<u64, ReplicaError> {
        let acked = self.acked_seq()?;
        Ok(self.own_entries(acked, usize::MAX)?.len() as u64)
    }

    /// Files and images waiting to go up (attached in ops the hub accepted) and to come down
    /// (for rows held, as of the last pull), for `fieldsync device status`.
    pub fn pending_files(&self) -> Result<(usize, usize), ReplicaError> {
        Ok((
            self.store.aux_scan(SPACE, P_BLOB_UPLOAD)?.len(),
            self.store.aux_scan(SPACE, P_BLOB_WANTED)?.len(),
        ))
    }

    /// Rows holding concurrent values, with every value (the winner and those that lost).
    pub fn rows_with_conflicts(
        &self,
    ) -> Result<Vec<(String, RowId, Vec<ColumnConflict>)>, ReplicaError> {
        let mut out = Vec::new();
        let tables: Vec<String> = self
            .store
            .schema()
            .tables()
            .map(|t| t.name.clone())
            .collect();
        for t in tables {
            for row in self.store.scan(&t)? {
                let row = row?;
                if row.has_conflicts {
                    let c = self.store.conflicts(&t, row.id)?;
                    out.push((t.clone(), row.id, c));
                }
            }
        }
        Ok(out)
    }

    /// Rows whose rollback to the hub's copy (after a rejection) waits until the row can be
    /// evicted: the device's own later ops are not acknowledged yet.
    pub fn deferred_rollbacks(&self) -> Result<Vec<(String, RowId)>, ReplicaError> {
        self.rows_keyed_under(P_ROLLBACK)
    }

    /// Rows whose eviction waits for own ops to be acknowledged.
    pub fn deferred_evictions(&self) -> Result<Vec<(String, RowId)>, ReplicaError> {
        self.rows_keyed_under(P_EVICT)
    }

    /// The (table, row)s of the aux keys `prefix` + row key.
    fn rows_keyed_under(&self, prefix: &[u8]) -> Result<Vec<(String, RowId)>, ReplicaError> {
        Ok(self
            .store
            .aux_scan(SPACE, prefix)?
            .into_iter()
            .filter_map(|(k, _)| k.get(prefix.len()..).and_then(parse_row_key))
            .collect())
    }
}

impl DeviceStorage for DeviceReplica {
    fn acked_seq(&self) -> Result<u64, StorageError> {
        match self.get(K_ACKED)? {
            Some(v) => u64_of(&v),
            None => Ok(0),
        }
    }

    fn last_local_seq(&self) -> Result<u64, StorageError> {
        let acked = self.acked_seq()?;
        Ok(self
            .own_entries(acked, usize::MAX)?
            .last()
            .map_or(acked, |e| e.seq))
    }

    fn pending_ops(
        &self,
        after_seq: u64,
        limits: BatchLimits,
    ) -> Result<Vec<PushOp>, StorageError> {
        let entries = self.own_entries(after_seq, limits.max_items.max(1))?;
        let mut out = Vec::with_capacity(entries.len());
        let mut bytes = 0usize;
        for e in entries {
            bytes += e.change.len();
            if !out.is_empty() && bytes > limits.max_bytes {
                break;
            }
            out.push(PushOp {
                seq: e.seq,
                table: e.table,
                row: e.row,
                change: e.change,
            });
        }
        Ok(out)
    }

    fn record_ack(
        &mut self,
        now: Millis,
        up_to_seq: u64,
        rejected: &[Rejection],
    ) -> Result<(), StorageError> {
        let _span = info_span!("record_ack", up_to_seq, rejected = rejected.len()).entered();
        let acked = self.acked_seq()?;
        if up_to_seq <= acked {
            return Ok(());
        }
        let mut writes = self.uploads_for_acked(acked, up_to_seq, rejected)?;
        for r in rejected {
            let op_data = self.entry_at(r.seq)?.map(|e| e.change).unwrap_or_default();
            let stored = StoredError {
                at: now.0,
                seq: r.seq,
                table: r.table.clone(),
                row: r.row,
                operation: r.operation,
                op_data,
                kind: r.kind,
                message: r.message.clone(),
            };
            writes.push(AuxWrite::Put(seq_key(P_ERROR, r.seq), enc(&stored)));
            let rb = Rollback {
                doc: r
                    .authoritative
                    .as_ref()
                    .filter(|d| d.row == r.row)
                    .map(|d| d.doc.clone()),
                changes: Vec::new(),
            };
            writes.push(AuxWrite::Put(
                row_key(P_ROLLBACK, &r.table, r.row),
                enc(&rb),
            ));
        }
        writes.push(AuxWrite::Put(
            K_ACKED.to_vec(),
            up_to_seq.to_be_bytes().to_vec(),
        ));
        self.apply(&writes)?;
        self.advance_store_ack()?;
        self.run_deferred()
    }

    fn apply_ops(&mut self, table: &str, ops: &[RowChange]) -> Result<(), StorageError> {
        let _span = info_span!("apply_ops", table, n = ops.len()).entered();
        let remote: Vec<RemoteOp> = ops
            .iter()
            .map(|c| RemoteOp {
                table: table.to_string(),
                row: c.row,
                change: c.change.clone(),
            })
            .collect();
        // A row waiting for a rollback will be rebuilt from the hub's row: keep these changes
        // to apply on top of it (recorded first, so a crash in between loses none).
        let mut writes = Vec::new();
        let mut pending: BTreeMap<RowId, Rollback> = BTreeMap::new();
        for c in ops {
            let k = row_key(P_ROLLBACK, table, c.row);
            if let std::collections::btree_map::Entry::Vacant(slot) = pending.entry(c.row) {
                match self.get(&k)? {
                    Some(v) => {
                        slot.insert(dec(&v, "a rollback")?);
                    }
                    None => continue,
                }
            }
            if let Some(rb) = pending.get_mut(&c.row) {
                rb.changes.push(c.change.clone());
            }
        }
        for (row, rb) in pending {
            writes.push(AuxWrite::Put(row_key(P_ROLLBACK, table, row), enc(&rb)));
        }
        if !writes.is_empty() {
            self.apply(&writes)?;
        }
        // Made durable by the batch's cursor write (`set_cursor`), which comes after it in
        // the store's log: one flush per pulled batch, not one per part of it.
        self.store
            .apply_remote(&remote, Durability::Group)
            .map_err(storage_err)?;
        self.want_blobs_of(table, &ops.iter().map(|c| c.row).collect())?;
        self.advance_store_ack()
    }

    fn import_rows(&mut self, table: &str, rows: &[RowDoc]) -> Result<(), StorageError> {
        let _span = info_span!("import_rows", table, n = rows.len()).entered();
        // One store write for the whole batch, no automerge document built per row (the hub
        // sends rows as change chunks); no flush here: see the end.
        let exports: Vec<RowExport> = rows
            .iter()
            .map(|d| RowExport {
                table: table.to_string(),
                id: d.row,
                doc: d.doc.clone(),
            })
            .collect();
        self.store
            .import_rows(&exports, Durability::Group)
            .map_err(storage_err)?;
        // Deferred evictions and waiting rollbacks are rare: read the table's few once rather
        // than probing (and deleting) a key per imported row.
        let evicting = self.rows_under(P_EVICT, table)?;
        let rolling = self.rows_under(P_ROLLBACK, table)?;
        let mut writes = Vec::new();
        for d in rows {
            if evicting.contains(&d.row) {
                writes.push(AuxWrite::Remove(row_key(P_EVICT, table, d.row)));
            }
            // A rollback waiting for this row rebuilds it from this newer hub row.
            if rolling.contains(&d.row) {
                let rb = Rollback {
                    doc: Some(d.doc.clone()),
                    changes: Vec::new(),
                };
                writes.push(AuxWrite::Put(row_key(P_ROLLBACK, table, d.row), enc(&rb)));
            }
        }
        // Rows and aux writes are made durable by the batch's cursor write (`set_cursor`),
        // which follows them in the store's log: a crash before it loses the batch and its
        // cursor together, and the batch is pulled again.
        self.store
            .aux_apply(SPACE, &writes, Durability::Group)
            .map_err(storage_err)?;
        self.want_blobs_of(table, &rows.iter().map(|d| d.row).collect())?;
        self.advance_store_ack()?;
        self.run_deferred()
    }

    fn evict_rows(&mut self, table: &str, rows: &[RowId]) -> Result<(), StorageError> {
        let _span = info_span!("evict_rows", table, n = rows.len()).entered();
        self.advance_store_ack()?;
        let mut writes = Vec::new();
        for r in rows {
            if self.try_evict(table, *r)? {
                writes.push(AuxWrite::Remove(row_key(P_EVICT, table, *r)));
            } else {
                debug!(table, row = %r, "eviction deferred");
                writes.push(AuxWrite::Put(row_key(P_EVICT, table, *r), Vec::new()));
            }
        }
        if !writes.is_empty() {
            self.apply(&writes)?;
        }
        Ok(())
    }

    fn cursor(&self, table: &str) -> Result<Cursor, StorageError> {
        Ok(Cursor(self.stored_cursor(table)?.1.cursor))
    }

    fn set_cursor(
        &mut self,
        table: &str,
        cursor: Cursor,
        synced_at: Option<Millis>,
    ) -> Result<(), StorageError> {
        let (k, mut c) = self.stored_cursor(table)?;
        c.cursor = c.cursor.max(cursor.0);
        if let Some(at) = synced_at {
            c.synced_at = Some(at.0);
        }
        self.apply(&[AuxWrite::Put(k, enc(&c))])
    }

    fn restart_cursor(&mut self, table: &str, cursor: Cursor) -> Result<(), StorageError> {
        let (k, mut c) = self.stored_cursor(table)?;
        c.cursor = cursor.0;
        self.apply(&[AuxWrite::Put(k, enc(&c))])
    }

    fn last_sync(&self, table: &str) -> Result<Option<Millis>, StorageError> {
        Ok(self.stored_cursor(table)?.1.synced_at.map(Millis))
    }

    fn blob_progress(&self, sha256: &[u8; 32]) -> Result<u64, StorageError> {
        if let Some(v) = self.get(&sha_key(P_BLOB_DONE, sha256))? {
            return u64_of(&v);
        }
        match self.get(&sha_key(P_BLOB_PROGRESS, sha256))? {
            Some(v) => u64_of(&v),
            None => Ok(0),
        }
    }

    fn write_blob_chunk(
        &mut self,
        sha256: &[u8; 32],
        offset: u64,
        data: &[u8],
        total: u64,
    ) -> Result<(), StorageError> {
        let progress = self.blob_progress(sha256)?;
        if offset < progress {
            return Ok(());
        }
        // The hub's `total` is checked against the size the row gives, so a hub that lies
        // about it cannot make the device store (and ask for) bytes without end.
        if let Some(size) = self.wanted_blob_size(sha256)? {
            if total != size {
                warn!(
                    total,
                    size, "a blob chunk's total is not the row's file size"
                );
                self.drop_blob_download(sha256)?;
                return Err(StorageError::BlobMismatch);
            }
        }
        if offset > progress {
            return Err(StorageError::Corrupt(format!(
                "blob chunk at {offset} but {progress} bytes stored"
            )));
        }
        let end = offset + data.len() as u64;
        let mut chunk_key = sha_key(P_BLOB_CHUNK, sha256);
        chunk_key.extend_from_slice(&offset.to_be_bytes());
        self.apply(&[
            AuxWrite::Put(chunk_key, data.to_vec()),
            AuxWrite::Put(sha_key(P_BLOB_PROGRESS, sha256), end.to_be_bytes().to_vec()),
        ])?;
        if end < total {
            return Ok(());
        }
        // Read back one chunk at a time: a large file is never held in memory whole.
        let mut chunks = StoredChunks {
            replica: self,
            sha256: *sha256,
            offset: 0,
            total,
            buf: Vec::new(),
            pos: 0,
            keys: Vec::new(),
        };
        let stored = self.store.put_blob("blob", &mut chunks);
        let mut cleanup: Vec<AuxWrite> = chunks.keys.into_iter().map(AuxWrite::Remove).collect();
        cleanup.push(AuxWrite::Remove(sha_key(P_BLOB_PROGRESS, sha256)));
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                // A chunk missing or unreadable: start this download over.
                warn!(error = %e, "a downloaded blob cannot be read back; dropped");
                self.drop_blob_download(sha256)?;
                return Err(StorageError::BlobMismatch);
            }
        };
        if stored.sha256 != *sha256 {
            // The download starts over at a later connection (the blob stays wanted: the hub
            // may have a good copy by then). The content just stored under its own hash is
            // referred to by nothing.
            self.apply(&cleanup)?;
            return Err(StorageError::BlobMismatch);
        }
        cleanup.push(AuxWrite::Put(
            sha_key(P_BLOB_DONE, sha256),
            total.to_be_bytes().to_vec(),
        ));
        cleanup.push(AuxWrite::Remove(sha_key(P_BLOB_WANTED, sha256)));
        self.apply(&cleanup)
    }

    fn blobs_to_fetch(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for (k, v) in self
            .store
            .aux_scan(SPACE, P_BLOB_WANTED)
            .map_err(storage_err)?
        {
            let Some(sha) = k
                .get(P_BLOB_WANTED.len()..)
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
            else {
                stale.push(AuxWrite::Remove(k));
                continue;
            };
            // Stored meanwhile (attached here, or another row's download), or no longer
            // referred to: not wanted.
            if self.has_blob(&sha)? || !self.row_refers_to(&v, &sha)? {
                stale.push(AuxWrite::Remove(k));
            } else {
                out.push(sha);
            }
        }
        if !stale.is_empty() {
            self.apply(&stale)?;
        }
        Ok(out)
    }

    fn blobs_to_upload(&self) -> Result<Vec<[u8; 32]>, StorageError> {
        Ok(self
            .store
            .aux_scan(SPACE, P_BLOB_UPLOAD)
            .map_err(storage_err)?
            .into_iter()
            .filter_map(|(k, _)| <[u8; 32]>::try_from(k.get(P_BLOB_UPLOAD.len()..)?).ok())
            .collect())
    }

    fn read_blob_range(
        &self,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        Ok(self
            .store
            .read_blob_range(sha256, offset, max_len)
            .map_err(storage_err)?
            .map(|(total, data)| BlobSlice { total, data }))
    }

    fn record_upload(&mut self, sha256: &[u8; 32], stored: bool) -> Result<(), StorageError> {
        debug!(stored, "upload finished");
        self.apply(&[AuxWrite::Remove(sha_key(P_BLOB_UPLOAD, sha256))])
    }
}
