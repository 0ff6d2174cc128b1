//! The auxiliary key space: durable replication metadata next to the rows (cursors, sync
//! errors, acknowledged-op decisions, per-device bookkeeping), and a read-only look at what a
//! remote change would do to a row before it is applied.
//!
//! Keys live in the store's one sled tree under the `X` prefix: `X` · space length (1 byte) ·
//! space · key. Spaces keep unrelated users of the aux area apart.

use std::collections::BTreeMap;

use tracing::trace_span;

use crate::codec::keys;
use crate::error::StoreError;
use crate::options::{ActorId, Durability};
use crate::row::{parse_change, row_change, DELETED_COL, DELETED_KEY};
use crate::store::Store;
use crate::value::{RowId, Value};
use crate::wal::WriteBatch;

/// Prefix byte of the auxiliary key space (see `docs/storage.md`).
pub(crate) const AUX: u8 = b'X';

/// Longest aux space name, in bytes.
pub const AUX_SPACE_MAX: usize = 64;

/// A key (without its space prefix) and its value, as `aux_scan` returns them.
pub type AuxEntry = (Vec<u8>, Vec<u8>);

/// One write of an [`Store::aux_apply`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuxWrite {
    /// Set `key` of the space to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key` of the space.
    Remove(Vec<u8>),
}

/// What a remote change would do to a row (see [`Store::inspect_change`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeInspection {
    /// The automerge change hash.
    pub hash: [u8; 32],
    /// The actor that made the change.
    pub actor: ActorId,
    /// Whether the row exists in the store (deleted rows included).
    pub row_exists: bool,
    /// Whether the row is deleted (has a tombstone).
    pub row_deleted: bool,
    /// Whether the store already applied (or holds) this change.
    pub applied: bool,
    /// Whether the change could be applied now: its dependencies are applied and it is its
    /// actor's next change to the row. A change that is not ready would be held.
    pub ready: bool,
    /// The columns the change sets, by logical name (`Value::Null`: cleared); a delete sets
    /// [`DELETED_KEY`] to `true`.
    pub columns: BTreeMap<String, Value>,
    /// Columns (other than `modifiedon`) that would hold concurrent values once the change is
    /// applied: the row has a visible value there the change does not overwrite.
    pub concurrent: Vec<String>,
}

fn aux_key(space: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    if space.len() > AUX_SPACE_MAX {
        return Err(StoreError::Corrupt(format!(
            "aux space name `{space}` is longer than {AUX_SPACE_MAX} bytes"
        )));
    }
    let mut k = Vec::with_capacity(2 + space.len() + key.len());
    k.push(AUX);
    k.push(space.len() as u8);
    k.extend_from_slice(space.as_bytes());
    k.extend_from_slice(key);
    Ok(k)
}

impl Store {
    /// Set `key` in the aux `space` to `value`; durable on return with
    /// [`Durability::Immediate`] (flushed like a commit).
    pub fn aux_put(
        &self,
        space: &str,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), StoreError> {
        let _span = trace_span!("aux_put", space).entered();
        let mut batch = WriteBatch::default();
        batch.insert(aux_key(space, key)?, value);
        self.write(batch, durability)
    }

    /// The value of `key` in the aux `space`.
    pub fn aux_get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db().get(aux_key(space, key)?)?.map(|v| v.to_vec()))
    }

    /// Remove `key` from the aux `space`; returns whether it was there.
    pub fn aux_remove(
        &self,
        space: &str,
        key: &[u8],
        durability: Durability,
    ) -> Result<bool, StoreError> {
        let key = aux_key(space, key)?;
        let existed = self.db().contains_key(&key)?;
        let mut batch = WriteBatch::default();
        batch.remove(key);
        self.write(batch, durability)?;
        Ok(existed)
    }

    /// Apply several aux writes of one space atomically (one sled batch).
    pub fn aux_apply(
        &self,
        space: &str,
        writes: &[AuxWrite],
        durability: Durability,
    ) -> Result<(), StoreError> {
        let _span = trace_span!("aux_apply", space, writes = writes.len()).entered();
        let mut batch = WriteBatch::default();
        for w in writes {
            match w {
                AuxWrite::Put(k, v) => batch.insert(aux_key(space, k)?, v.as_slice()),
                AuxWrite::Remove(k) => batch.remove(aux_key(space, k)?),
            }
        }
        self.write(batch, durability)
    }

    /// Every (key, value) of the aux `space` whose key starts with `prefix`, in key order
    /// (keys without the space prefix).
    pub fn aux_scan(&self, space: &str, prefix: &[u8]) -> Result<Vec<AuxEntry>, StoreError> {
        let full = aux_key(space, prefix)?;
        let skip = 2 + space.len();
        let mut out = Vec::new();
        for r in self.db().scan_prefix(full) {
            let (k, v) = r?;
            out.push((k.get(skip..).unwrap_or_default().to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Like [`Store::aux_scan`] over keys in `[from, to)` of the space, at most `limit` items.
    pub fn aux_range(
        &self,
        space: &str,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<AuxEntry>, StoreError> {
        let a = aux_key(space, from)?;
        let b = aux_key(space, to)?;
        let skip = 2 + space.len();
        let mut out = Vec::new();
        if a >= b {
            return Ok(out);
        }
        for r in self.db().range(a..b).take(limit) {
            let (k, v) = r?;
            out.push((k.get(skip..).unwrap_or_default().to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Decode a remote change for a row and compare it with the row as stored, without
    /// writing anything: which columns it sets, whether it is already applied, whether it is
    /// ready, which columns it would leave in conflict.
    pub fn inspect_change(
        &self,
        table: &str,
        id: RowId,
        change: &[u8],
    ) -> Result<ChangeInspection, StoreError> {
        let (t, tab) = self.table(table)?;
        let invalid = |reason: String| StoreError::InvalidChange {
            table: table.to_string(),
            row: id,
            reason,
        };
        let (expanded, hash) = parse_change(change).map_err(invalid)?;
        let rc = row_change(tab, &expanded, hash).map_err(invalid)?;
        let state = self.load_state(t, id)?;
        let held = self.db().contains_key(keys::held(t, id, &hash))?;
        let mat = self.load_mat(t, id)?;
        let mut columns = BTreeMap::new();
        let mut concurrent = Vec::new();
        for op in &rc.ops {
            let name = if op.col == DELETED_COL {
                DELETED_KEY.to_string()
            } else {
                tab.columns
                    .get(usize::from(op.col))
                    .map(|c| c.name.clone())
                    .unwrap_or_default()
            };
            columns.insert(name.clone(), op.value.clone().unwrap_or(Value::Null));
            if let Some(s) = &state {
                let live = s
                    .keys
                    .iter()
                    .find(|k| k.col == op.col)
                    .map(|k| k.ops.as_slice())
                    .unwrap_or_default();
                let others = live.iter().any(|l| {
                    let actor = s
                        .actors
                        .get(usize::from(l.actor))
                        .copied()
                        .unwrap_or_default();
                    !op.pred.contains(&(l.counter, actor))
                });
                if others && op.value.is_some() && name != "modifiedon" && name != DELETED_KEY {
                    concurrent.push(name);
                }
            }
        }
        Ok(ChangeInspection {
            hash,
            actor: rc.actor,
            row_exists: state.is_some(),
            row_deleted: mat.is_some_and(|m| m.deleted),
            applied: held || state.as_ref().is_some_and(|s| s.has_change(&hash)),
            ready: state.unwrap_or_default().ready(&rc),
            columns,
            concurrent,
        })
    }
}
