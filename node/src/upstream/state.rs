//! The bridge's durable state in the hub store's auxiliary space `upstream`:
//!
//! - `cur` → the push cursor: every hub log entry up to it is acknowledged by Dataverse;
//! - `dl/<table>` → the table's `@odata.deltaLink`, saved after its rows are applied;
//! - `bs/<table>\0<id>` → the row as last known upstream (its etag and relayed values): the base
//!   of the three-way merge that decides which columns Dataverse changed, and the proof that the
//!   row exists there.

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

fn file_wait_key(table: &str, id: RowId) -> Vec<u8> {
    let mut k = P_FILE_WAIT.to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Rows whose files wait for their content to reach the hub.
pub fn file_waits(store: &Store) -> Result<Vec<(String, RowId)>, UpstreamError> {
    store
        .aux_scan(SPACE, P_FILE_WAIT)?
        .into_iter()
        .map(|(key, _)| {
            let rest = key
                .get(P_FILE_WAIT.len()..)
                .ok_or_else(|| corrupt("file wait key"))?;
            let split = rest
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| corrupt("file wait key"))?;
            let table =
                std::str::from_utf8(&rest[..split]).map_err(|_| corrupt("file wait key"))?;
            let id: [u8; 16] = rest[split + 1..]
                .try_into()
                .map_err(|_| corrupt("file wait key"))?;
            Ok((table.to_string(), RowId::from_bytes(id)))
        })
        .collect()
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
        let k = file_wait_key(table, id);
        self.0.push(if waiting {
            AuxWrite::Put(k, Vec::new())
        } else {
            AuxWrite::Remove(k)
        });
    }

    pub fn remove_base(&mut self, table: &str, id: RowId) {
        self.0.push(AuxWrite::Remove(base_key(table, id)));
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
