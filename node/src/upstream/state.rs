//! The bridge's durable state in the hub store's auxiliary space `upstream`:
//!
//! - `cur` → the push cursor: every hub log entry up to it is acknowledged by Dataverse;
//! - `dl/<table>` → the table's `@odata.deltaLink`, saved after its rows are applied;
//! - `bs/<table>\0<id>` → the row as last known upstream (its etag and relayed values): the base
//!   of the three-way merge that decides which columns Dataverse changed, and the proof that the
//!   row exists there;
//! - `fw/<table>\0<id>` → a row whose file content has not reached the hub yet (a device's
//!   upload under way), pushed once it has;
//! - `pd/<table>\0<id>` → a row whose file columns did not come down from Dataverse
//!   ([`PendingDownload`]): the row itself was applied, the download is retried with back-off;
//! - `wi/<table>\0<id>` → a write sent to Dataverse whose reply has not come back
//!   ([`WriteIntent`]): what the hub asked Dataverse to hold, so a lost reply does not make the
//!   hub's own write look like Dataverse's change;
//! - `rs/<table>\0<id>` → a row held back from a push whose changes the push cursor has passed
//!   ([`Resend`]): it must still be written. Only the push sets and clears it (a pull or a
//!   read never does), so nothing but the row's write — or Dataverse refusing it for good —
//!   forgets it.

use std::collections::BTreeMap;

use fieldsync_store::{AuxWrite, Durability, RowId, Store, Value};
use serde::{Deserialize, Serialize};

use super::UpstreamError;

const SPACE: &str = "upstream";
const K_CURSOR: &[u8] = b"cur";
const P_DELTA: &[u8] = b"dl/";
const P_BASE: &[u8] = b"bs/";
/// Rows with a file column whose content has not reached the hub yet (a device's upload
/// under way): `fw/` + table + 0 + row id.
const P_FILE_WAIT: &[u8] = b"fw/";
const P_PENDING_DOWNLOAD: &[u8] = b"pd/";
const P_WRITE_INTENT: &[u8] = b"wi/";
const P_RESEND: &[u8] = b"rs/";

/// The row as Dataverse last had it, as far as the hub knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Base {
    pub etag: String,
    pub values: BTreeMap<String, Value>,
    /// File and image columns as Dataverse has them.
    #[serde(default)]
    pub files: BTreeMap<String, FileState>,
}

impl Base {
    /// The file states that still hold for a newer version of the row whose file columns have
    /// these Dataverse file ids: a file is the same while its id is.
    pub fn files_kept(&self, ids: &BTreeMap<String, String>) -> BTreeMap<String, FileState> {
        self.files
            .iter()
            .filter(|(col, f)| ids.get(*col) == Some(&f.id))
            .map(|(col, f)| (col.clone(), f.clone()))
            .collect()
    }
}

/// File columns of a pulled row whose download failed (or waits for its retry): the row's
/// other columns were applied, the hub kept its previous content of these, and the row is read
/// again and the files downloaded once `retry_at_ms` has passed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDownload {
    /// Column → Dataverse's file id that did not come down.
    pub columns: BTreeMap<String, String>,
    /// Failed attempts so far at these files (a new file id in a column starts again at 0).
    pub attempts: u32,
    /// When to try again (milliseconds since the Unix epoch).
    pub retry_at_ms: u64,
    /// Why the last attempt failed.
    pub last_error: String,
}

/// Creates and updates sent to Dataverse whose outcome is not known (the reply was lost): per
/// column, the values sent (`Null` for a column sent empty) — any of them may be what Dataverse
/// applied. Saved before each request; removed with the base its reply gives, by
/// a reply saying it was not applied (a `4xx`), or by the row's next read — at the latest the
/// one that starts the next push round, so a later change made in Dataverse is not taken for
/// the hub's own write. A row that read cannot get (a `5xx`, a row too large to read) keeps its
/// intent and is held back from the push with a [`Resend`] mark: one such row must not stop
/// the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteIntent {
    pub values: BTreeMap<String, Vec<Value>>,
}

/// A row held back from a push (its write intent or its conflict could not be read): the push
/// cursor moved past its changes, so this mark is what says the row must still be written. Set
/// by the hold-back in one durable write before the cursor moves; cleared only once the row's
/// write and its files went through, or Dataverse refused the write for good (a `4xx`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resend {
    /// Rounds whose read of the row failed so far (a table's failed pull does not count).
    pub read_failures: u32,
    /// Past [`INTENT_READ_ATTEMPTS_MAX`] failures, the row is not read again before this time
    /// (milliseconds since the Unix epoch): it backs off, it is never dropped.
    pub retry_at_ms: u64,
    /// Why it was last held back.
    pub last_error: String,
}

/// Rounds in a row a held row is read again; after that its reads back off (doubling from
/// `file_retry_ms` up to `file_retry_max_ms`), the row still held and still to be written.
pub const INTENT_READ_ATTEMPTS_MAX: u32 = 10;

impl WriteIntent {
    /// Adds a write about to be sent.
    pub fn add(&mut self, sent: BTreeMap<String, Value>) {
        for (col, v) in sent {
            let list = self.values.entry(col).or_default();
            if !list.contains(&v) {
                list.push(v);
            }
        }
    }

    /// The base to merge `upstream` against when these writes may have been applied: a column
    /// Dataverse holds with a value the hub sent is taken as the hub's own write, not as a
    /// change made in Dataverse (the hub's later edits of it then stand); the others keep
    /// `base`. With no base (a create), a column not sent counts as empty.
    pub fn resolve(
        &self,
        base: Option<&BTreeMap<String, Value>>,
        upstream: &BTreeMap<String, Value>,
    ) -> BTreeMap<String, Value> {
        let mut out = base.cloned().unwrap_or_default();
        for (col, sent) in &self.values {
            let there = upstream.get(col).unwrap_or(&Value::Null);
            if sent.contains(there) {
                if there.is_null() {
                    out.remove(col);
                } else {
                    out.insert(col.clone(), there.clone());
                }
            }
        }
        out
    }
}

/// One file column upstream: Dataverse's file id and the content's SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub id: String,
    pub sha256: String,
}

fn base_prefix(table: &str) -> Vec<u8> {
    let mut k = P_BASE.to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k
}

fn base_key(table: &str, id: RowId) -> Vec<u8> {
    let mut k = base_prefix(table);
    k.extend_from_slice(id.as_bytes());
    k
}

fn delta_key(table: &str) -> Vec<u8> {
    let mut k = P_DELTA.to_vec();
    k.extend_from_slice(table.as_bytes());
    k
}

fn corrupt(what: &str) -> UpstreamError {
    UpstreamError::State(format!("the bridge's {what} is unreadable"))
}

pub fn cursor(store: &Store) -> Result<u64, UpstreamError> {
    match store.aux_get(SPACE, K_CURSOR)? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| corrupt("push cursor"))?,
        )),
    }
}

pub fn set_cursor(store: &Store, seq: u64) -> Result<(), UpstreamError> {
    store.aux_put(SPACE, K_CURSOR, &seq.to_be_bytes(), Durability::Immediate)?;
    Ok(())
}

pub fn delta_link(store: &Store, table: &str) -> Result<Option<String>, UpstreamError> {
    store
        .aux_get(SPACE, &delta_key(table))?
        .map(|v| String::from_utf8(v).map_err(|_| corrupt("delta link")))
        .transpose()
}

pub fn base(store: &Store, table: &str, id: RowId) -> Result<Option<Base>, UpstreamError> {
    store
        .aux_get(SPACE, &base_key(table, id))?
        .map(|v| serde_json::from_slice(&v).map_err(|_| corrupt("row base")))
        .transpose()
}

/// Ids of every row of `table` known to exist upstream.
pub fn known_ids(store: &Store, table: &str) -> Result<Vec<RowId>, UpstreamError> {
    let prefix = base_prefix(table);
    store
        .aux_scan(SPACE, &prefix)?
        .into_iter()
        .map(|(key, _)| {
            let bytes: [u8; 16] = key
                .get(prefix.len()..)
                .ok_or_else(|| corrupt("row base key"))?
                .try_into()
                .map_err(|_| corrupt("row base key"))?;
            Ok(RowId::from_bytes(bytes))
        })
        .collect()
}

/// `prefix` + table + 0 + row id: the key of per-row records other than the base.
fn row_key(prefix: &[u8], table: &str, id: RowId) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The table and row id of a [`row_key`].
fn parse_row_key(prefix: &[u8], key: &[u8], what: &str) -> Result<(String, RowId), UpstreamError> {
    let rest = key.get(prefix.len()..).ok_or_else(|| corrupt(what))?;
    let split = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| corrupt(what))?;
    let table = std::str::from_utf8(&rest[..split]).map_err(|_| corrupt(what))?;
    let id: [u8; 16] = rest[split + 1..].try_into().map_err(|_| corrupt(what))?;
    Ok((table.to_string(), RowId::from_bytes(id)))
}

/// The rows of the per-row records under `prefix` (their values unread).
fn rows_under(
    store: &Store,
    prefix: &[u8],
    what: &str,
) -> Result<Vec<(String, RowId)>, UpstreamError> {
    store
        .aux_scan(SPACE, prefix)?
        .into_iter()
        .map(|(key, _)| parse_row_key(prefix, &key, what))
        .collect()
}

/// Rows whose files wait for their content to reach the hub.
pub fn file_waits(store: &Store) -> Result<Vec<(String, RowId)>, UpstreamError> {
    rows_under(store, P_FILE_WAIT, "file wait key")
}

/// A row's JSON record under `prefix`, if any (`what` names it in errors).
fn row_record<T: serde::de::DeserializeOwned>(
    store: &Store,
    prefix: &[u8],
    table: &str,
    id: RowId,
    what: &str,
) -> Result<Option<T>, UpstreamError> {
    store
        .aux_get(SPACE, &row_key(prefix, table, id))?
        .map(|v| serde_json::from_slice(&v).map_err(|_| corrupt(what)))
        .transpose()
}

/// The downloads of a row that did not come down yet.
pub fn pending_download(
    store: &Store,
    table: &str,
    id: RowId,
) -> Result<Option<PendingDownload>, UpstreamError> {
    row_record(store, P_PENDING_DOWNLOAD, table, id, "pending download")
}

/// Every row of `table` with downloads that did not come down yet.
pub fn pending_downloads(
    store: &Store,
    table: &str,
) -> Result<Vec<(String, RowId, PendingDownload)>, UpstreamError> {
    let mut prefix = P_PENDING_DOWNLOAD.to_vec();
    prefix.extend_from_slice(table.as_bytes());
    prefix.push(0);
    store
        .aux_scan(SPACE, &prefix)?
        .into_iter()
        .map(|(key, value)| {
            let (table, id) = parse_row_key(P_PENDING_DOWNLOAD, &key, "pending download key")?;
            let pending =
                serde_json::from_slice(&value).map_err(|_| corrupt("pending download"))?;
            Ok((table, id, pending))
        })
        .collect()
}

/// Every row with downloads that did not come down yet, without reading the records.
pub fn pending_download_rows(store: &Store) -> Result<Vec<(String, RowId)>, UpstreamError> {
    rows_under(store, P_PENDING_DOWNLOAD, "pending download key")
}

/// The write to a row sent to Dataverse whose reply did not come back, if any.
pub fn write_intent(
    store: &Store,
    table: &str,
    id: RowId,
) -> Result<Option<WriteIntent>, UpstreamError> {
    row_record(store, P_WRITE_INTENT, table, id, "write intent")
}

/// Every row with a write whose reply did not come back.
pub fn write_intents(store: &Store) -> Result<Vec<(String, RowId)>, UpstreamError> {
    rows_under(store, P_WRITE_INTENT, "write intent key")
}

/// The mark of a row held back from a push, if any ([`Resend`]).
pub fn resend(store: &Store, table: &str, id: RowId) -> Result<Option<Resend>, UpstreamError> {
    row_record(store, P_RESEND, table, id, "resend mark")
}

/// Every row held back from a push that is still to be written.
pub fn resends(store: &Store) -> Result<Vec<(String, RowId)>, UpstreamError> {
    rows_under(store, P_RESEND, "resend mark key")
}

/// A batch of state changes, written in one atomic step.
#[derive(Debug, Default)]
pub struct StateWrites(Vec<AuxWrite>);

impl StateWrites {
    pub fn put_base(&mut self, table: &str, id: RowId, base: &Base) -> Result<(), UpstreamError> {
        let bytes = serde_json::to_vec(base)
            .map_err(|e| UpstreamError::State(format!("a row base does not serialize: {e}")))?;
        self.0.push(AuxWrite::Put(base_key(table, id), bytes));
        Ok(())
    }

    /// Marks (or clears) a row whose file content the hub does not have yet.
    pub fn set_file_wait(&mut self, table: &str, id: RowId, waiting: bool) {
        let k = row_key(P_FILE_WAIT, table, id);
        self.0.push(if waiting {
            AuxWrite::Put(k, Vec::new())
        } else {
            AuxWrite::Remove(k)
        });
    }

    pub fn remove_base(&mut self, table: &str, id: RowId) {
        self.0.push(AuxWrite::Remove(base_key(table, id)));
    }

    /// Sets a row's JSON record under `prefix` (`what` names it in errors).
    fn put_row_record<T: Serialize>(
        &mut self,
        prefix: &[u8],
        table: &str,
        id: RowId,
        what: &str,
        value: &T,
    ) -> Result<(), UpstreamError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| UpstreamError::State(format!("a {what} does not serialize: {e}")))?;
        self.0
            .push(AuxWrite::Put(row_key(prefix, table, id), bytes));
        Ok(())
    }

    pub fn put_pending_download(
        &mut self,
        table: &str,
        id: RowId,
        pending: &PendingDownload,
    ) -> Result<(), UpstreamError> {
        self.put_row_record(P_PENDING_DOWNLOAD, table, id, "pending download", pending)
    }

    pub fn remove_pending_download(&mut self, table: &str, id: RowId) {
        self.0
            .push(AuxWrite::Remove(row_key(P_PENDING_DOWNLOAD, table, id)));
    }

    pub fn put_write_intent(
        &mut self,
        table: &str,
        id: RowId,
        intent: &WriteIntent,
    ) -> Result<(), UpstreamError> {
        self.put_row_record(P_WRITE_INTENT, table, id, "write intent", intent)
    }

    pub fn remove_write_intent(&mut self, table: &str, id: RowId) {
        self.0
            .push(AuxWrite::Remove(row_key(P_WRITE_INTENT, table, id)));
    }

    pub fn put_resend(
        &mut self,
        table: &str,
        id: RowId,
        mark: &Resend,
    ) -> Result<(), UpstreamError> {
        self.put_row_record(P_RESEND, table, id, "resend mark", mark)
    }

    pub fn remove_resend(&mut self, table: &str, id: RowId) {
        self.0.push(AuxWrite::Remove(row_key(P_RESEND, table, id)));
    }

    pub fn set_delta_link(&mut self, table: &str, link: Option<&str>) {
        match link {
            Some(l) => self
                .0
                .push(AuxWrite::Put(delta_key(table), l.as_bytes().to_vec())),
            None => self.0.push(AuxWrite::Remove(delta_key(table))),
        }
    }

    pub fn commit(self, store: &Store) -> Result<(), UpstreamError> {
        if !self.0.is_empty() {
            store.aux_apply(SPACE, &self.0, Durability::Immediate)?;
        }
        Ok(())
    }
}
