//! Local writes: transactions and bulk import.

use std::collections::HashMap;

use tracing::{debug_span, info_span};

use crate::api::{CommitInfo, Row};
use crate::blob::ReferenceProblem;
use crate::codec::keys;
use crate::error::{StoreError, WriteError};
use crate::log::StoredEntry;
use crate::options::Durability;
use crate::row::{CrdtState, MatRow, DELETED_COL};
use crate::schema::Table;
use crate::store::{on_every_core, Store};
use crate::value::{RowId, Value};
use crate::wal::WriteBatch;

/// Rows per `apply_batch` in `bulk_insert`. sled copies the leaf a key lands in for every key
/// of a batch and frees the copies after it: at 256 rows a 100,000-row import peaked at
/// 210 MiB, at 64 at 170 MiB, and ran no slower (32: no lower, and 2% more on disk).
const BULK_CHUNK_ROWS: usize = 64;

/// Largest automerge change a local write may make, in bytes. Replication sends each change
/// whole, in one frame, so a larger change could never leave the device: the store refuses it
/// at commit ([`WriteError::ChangeTooLarge`]).
pub const MAX_CHANGE_BYTES: usize = 1024 * 1024;

/// Refuses a local change over [`MAX_CHANGE_BYTES`].
fn check_change_len(table: &Table, row: RowId, change: &[u8]) -> Result<(), WriteError> {
    if change.len() > MAX_CHANGE_BYTES {
        return Err(WriteError::ChangeTooLarge {
            table: table.name.clone(),
            row,
            bytes: change.len(),
            max: MAX_CHANGE_BYTES,
        });
    }
    Ok(())
}

/// Whether a new row with these values might encode to a change over [`MAX_CHANGE_BYTES`]:
/// a generous over-estimate (names, text and a margin per column for encoding), so that only
/// rows near the limit pay for building their change twice in `bulk_insert`.
fn may_exceed_change_limit(values: &[(String, Value)]) -> bool {
    let estimate: usize = values
        .iter()
        .map(|(name, value)| {
            let payload = match value {
                Value::Text(s) | Value::Memo(s) => s.len(),
                Value::File(b) | Value::Image(b) => b.name.len() + 48,
                _ => 16,
            };
            name.len() + payload + 64
        })
        .sum();
    estimate + 1024 > MAX_CHANGE_BYTES / 2
}

/// One row for [`Store::bulk_insert`]: an optional id and the column values.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRow {
    /// The row id (`None`: a new id is generated).
    pub id: Option<RowId>,
    /// Column values by logical name.
    pub values: Vec<(String, Value)>,
}

impl From<Vec<(String, Value)>> for BulkRow {
    fn from(values: Vec<(String, Value)>) -> Self {
        BulkRow { id: None, values }
    }
}

impl From<(Option<RowId>, Vec<(String, Value)>)> for BulkRow {
    fn from((id, values): (Option<RowId>, Vec<(String, Value)>)) -> Self {
        BulkRow { id, values }
    }
}

impl From<(RowId, Vec<(String, Value)>)> for BulkRow {
    fn from((id, values): (RowId, Vec<(String, Value)>)) -> Self {
        BulkRow {
            id: Some(id),
            values,
        }
    }
}

/// A set of writes committed atomically: all rows or none.
///
/// Writes are checked against the schema when they are made; existence checks are made again
/// under the writer lock at commit. Dropping a transaction without committing discards it.
pub struct Transaction<'s> {
    store: &'s Store,
    rows: Vec<PendingRow>,
    by_id: HashMap<(u16, RowId), usize>,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("rows", &self.rows.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct PendingRow {
    table: u16,
    id: RowId,
    insert: bool,
    delete: bool,
    /// Column writes in order, one per column (later writes replace earlier ones).
    puts: Vec<(u16, Value)>,
}

impl PendingRow {
    fn put(&mut self, col: u16, value: Value) {
        if let Some(p) = self.puts.iter_mut().find(|(c, _)| *c == col) {
            p.1 = value;
        } else {
            self.puts.push((col, value));
        }
    }
}

/// Check one value against a table: the schema, finite floats, and for a file or image
/// reference its column's maximum size, its size against content held, and an image column's
/// content ([`Store::image_problem`]) — those unless the row already holds that very value
/// (`current`: it may predate the check or a lower maximum, and writing it again — a form
/// saved whole, a retried op, a hub's own rewrite — adds nothing).
fn check_one(
    store: &Store,
    table: &Table,
    name: &str,
    value: &Value,
    current: Option<&Row>,
) -> Result<u16, WriteError> {
    table.check_value(name, value)?;
    let invalid = |reason: String| WriteError::InvalidValue {
        table: table.name.clone(),
        column: name.to_string(),
        reason,
    };
    let set_now = current.is_none_or(|row| row.get(name) != value);
    match value {
        Value::Float(f) if !f.is_finite() => return Err(invalid("floats must be finite".into())),
        Value::File(_) | Value::Image(_) if set_now => {
            match store.reference_problem(table, name, value)? {
                Some(ReferenceProblem::TooLarge(e)) => return Err(e.into()),
                Some(problem) => return Err(invalid(problem.to_string())),
                None => {}
            }
        }
        _ => {}
    }
    crate::row::key_col(table, name).ok_or_else(|| {
        crate::schema::SchemaError::UnknownColumn {
            table: table.name.clone(),
            column: name.to_string(),
        }
        .into()
    })
}

/// Check values against a table (and the row's current values, for an update) and turn them
/// into (column number, value).
fn checked(
    store: &Store,
    table: &Table,
    values: &[(&str, Value)],
    current: Option<&Row>,
) -> Result<Vec<(u16, Value)>, WriteError> {
    let mut out = Vec::with_capacity(values.len());
    for (name, value) in values {
        let col = check_one(store, table, name, value, current)?;
        if let Some(p) = out.iter_mut().find(|(c, _): &&mut (u16, Value)| *c == col) {
            p.1 = value.clone();
        } else {
            out.push((col, value.clone()));
        }
    }
    Ok(out)
}

fn col_of(table: &Table, name: &str) -> Option<u16> {
    table.column_index(name).and_then(|i| u16::try_from(i).ok())
}

/// Add the system columns a new row gets: createdon, modifiedon (now), statecode (active).
fn insert_defaults(table: &Table, puts: &mut Vec<(u16, Value)>, now: i64) {
    for (name, v) in [
        ("createdon", Value::DateTime(now)),
        ("modifiedon", Value::DateTime(now)),
        ("statecode", Value::Choice(crate::STATE_ACTIVE)),
    ] {
        if let Some(c) = col_of(table, name) {
            if !puts.iter().any(|(pc, _)| *pc == c) {
                puts.push((c, v));
            }
        }
    }
    puts.retain(|(_, v)| !v.is_null());
}

/// The column writes of a new row from values already checked against `table`.
fn new_row_puts(table: &Table, values: Vec<(String, Value)>, now: i64) -> Vec<(u16, Value)> {
    let mut puts: Vec<(u16, Value)> = Vec::with_capacity(values.len() + 3);
    for (name, value) in values {
        let Some(c) = col_of(table, &name) else {
            continue;
        };
        if let Some(p) = puts.iter_mut().find(|(pc, _)| *pc == c) {
            p.1 = value;
        } else {
            puts.push((c, value));
        }
    }
    insert_defaults(table, &mut puts, now);
    puts
}

impl Store {
    /// Start a transaction.
    pub fn begin(&self) -> Transaction<'_> {
        Transaction {
            store: self,
            rows: Vec::new(),
            by_id: HashMap::new(),
        }
    }

    /// Insert many rows fast: documents are built on every core, written in large atomic
    /// batches, made durable once at the end (per [`StoreOptions::durability`]).
    ///
    /// Every row is checked against the schema before anything is written. `progress` is
    /// called with the number of rows written so far after each batch. A crash in the middle
    /// leaves a prefix of whole batches.
    ///
    /// [`StoreOptions::durability`]: crate::StoreOptions::durability
    ///
    /// A row is either its values (`Vec<(String, Value)>`, a new id is generated) or
    /// `(Option<RowId>, values)` to give its id; a given id that exists (or repeats in
    /// `rows`) is refused with [`WriteError::RowExists`] before anything is written.
    pub fn bulk_insert<R: Into<BulkRow>>(
        &self,
        table: &str,
        rows: Vec<R>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<RowId>, WriteError> {
        let _span = info_span!("bulk_insert", table, rows = rows.len()).entered();
        let (t, tab) = self.table(table)?;
        let now = self.inner.options.clock.now_ms();
        // First pass: check every row, fix every id; nothing is copied.
        let rows: Vec<BulkRow> = rows.into_iter().map(Into::into).collect();
        let me = self.actor();
        let mut ids = Vec::with_capacity(rows.len());
        let mut given = std::collections::HashSet::new();
        for row in &rows {
            for (name, value) in &row.values {
                check_one(self, tab, name, value, None)?;
            }
            let id = match row.id {
                Some(id) => {
                    if !given.insert(id)
                        || self
                            .db()
                            .contains_key(keys::row_key(keys::ROW, t, id))
                            .map_err(StoreError::from)?
                    {
                        return Err(WriteError::RowExists {
                            table: table.to_string(),
                            id,
                        });
                    }
                    id
                }
                None => self.new_row_id(),
            };
            if may_exceed_change_limit(&row.values) {
                // Built here too, so that a change too large is refused before any batch
                // is written.
                let puts = new_row_puts(tab, row.values.clone(), now);
                let (bytes, _) = CrdtState::default().local_change(tab, me, now, &puts);
                check_change_len(tab, id, &bytes)?;
            }
            ids.push(id);
        }
        drop(given);
        let mut done = 0;
        let total = rows.len();
        let mut input = rows.into_iter().zip(ids.iter().copied());
        while done < total {
            // Second pass, one batch at a time: the batch's rows are consumed (and freed).
            let chunk: Vec<(RowId, Vec<(u16, Value)>)> = input
                .by_ref()
                .take(BULK_CHUNK_ROWS)
                .map(|(row, id)| (id, new_row_puts(tab, row.values, now)))
                .collect();
            if chunk.is_empty() {
                break;
            }
            let chunk = chunk.as_slice();
            // Build the changes on every core: this is the expensive part.
            let build = |part: &[(RowId, Vec<(u16, Value)>)]| {
                part.iter()
                    .map(|(id, puts)| {
                        let state = CrdtState::default();
                        let (bytes, change) = state.local_change(tab, me, now, puts);
                        (*id, bytes, change)
                    })
                    .collect::<Vec<_>>()
            };
            let built: Vec<_> = on_every_core(chunk, 1, build)?
                .into_iter()
                .flatten()
                .collect();
            let mut writer = self.writer();
            let mut seq = writer.next_seq;
            let mut batch = WriteBatch::default();
            for (id, bytes, change) in built {
                let mut state = CrdtState::default();
                state.apply(&change);
                state.pending.push(seq);
                let entry = StoredEntry {
                    table: t,
                    row: id,
                    actor: me,
                    hash: change.hash,
                    change: bytes,
                };
                batch.insert(&keys::log(seq)[..], entry.encode());
                self.stage_row(&mut batch, t, tab, id, None, &state);
                seq += 1;
            }
            self.write(batch, Durability::Group)?;
            self.set_next_seq(&mut writer, seq);
            drop(writer);
            done += chunk.len();
            progress(done);
        }
        self.make_durable(self.inner.options.durability)?;
        Ok(ids)
    }
}

impl Transaction<'_> {
    fn pending(&mut self, t: u16, id: RowId) -> Option<&mut PendingRow> {
        self.by_id
            .get(&(t, id))
            .copied()
            .and_then(|i| self.rows.get_mut(i))
    }

    /// Insert a row with a new id; returns the id. `createdon`, `modifiedon` default to now
    /// and `statecode` to active.
    pub fn insert(&mut self, table: &str, values: &[(&str, Value)]) -> Result<RowId, WriteError> {
        let id = self.store.new_row_id();
        self.insert_with_id(table, id, values)?;
        Ok(id)
    }

    /// Insert a row with a given id (refused if the id exists, deleted or not).
    pub fn insert_with_id(
        &mut self,
        table: &str,
        id: RowId,
        values: &[(&str, Value)],
    ) -> Result<(), WriteError> {
        let (t, tab) = self.store.table(table)?;
        let mut puts = checked(self.store, tab, values, None)?;
        if self.by_id.contains_key(&(t, id)) {
            return Err(WriteError::RowExists {
                table: table.to_string(),
                id,
            });
        }
        if let Some(m) = self.store.load_mat(t, id)? {
            return Err(if m.deleted {
                WriteError::RowDeleted {
                    table: table.to_string(),
                    id,
                }
            } else {
                WriteError::RowExists {
                    table: table.to_string(),
                    id,
                }
            });
        }
        insert_defaults(tab, &mut puts, self.store.inner.options.clock.now_ms());
        self.by_id.insert((t, id), self.rows.len());
        self.rows.push(PendingRow {
            table: t,
            id,
            insert: true,
            delete: false,
            puts,
        });
        Ok(())
    }

    fn existing(&mut self, table: &str, id: RowId) -> Result<(u16, &Table), WriteError> {
        let store = self.store;
        let (t, tab) = store.table(table)?;
        if let Some(p) = self.pending(t, id) {
            if p.delete {
                return Err(WriteError::RowDeleted {
                    table: table.to_string(),
                    id,
                });
            }
            return Ok((t, tab));
        }
        // Only the deleted flag is needed: it is the first byte of the stored row.
        let stored = store
            .db()
            .get(crate::codec::keys::row_key(keys::ROW, t, id))
            .map_err(StoreError::from)?;
        match stored.as_deref().map(crate::row::peek_deleted) {
            None => Err(WriteError::RowNotFound {
                table: table.to_string(),
                id,
            }),
            Some(None) => Err(WriteError::Store(StoreError::Corrupt(format!(
                "row {table}/{id} does not decode"
            )))),
            Some(Some(true)) => Err(WriteError::RowDeleted {
                table: table.to_string(),
                id,
            }),
            Some(Some(false)) => {
                self.by_id.insert((t, id), self.rows.len());
                self.rows.push(PendingRow {
                    table: t,
                    id,
                    insert: false,
                    delete: false,
                    puts: Vec::new(),
                });
                Ok((t, tab))
            }
        }
    }

    /// Set columns of an existing row (`Value::Null` clears a column). `modifiedon` is set
    /// to now unless given.
    pub fn update(
        &mut self,
        table: &str,
        id: RowId,
        values: &[(&str, Value)],
    ) -> Result<(), WriteError> {
        let (t, tab) = self.store.table(table)?;
        // Only a write of a file or image column needs the row as it is (see `check_one`).
        let current = if values
            .iter()
            .any(|(_, v)| matches!(v, Value::File(_) | Value::Image(_)))
        {
            self.store.get(table, id)?
        } else {
            None
        };
        let puts = checked(self.store, tab, values, current.as_ref())?;
        let (t2, _) = self.existing(table, id)?;
        debug_assert_eq!(t, t2);
        let now = self.store.inner.options.clock.now_ms();
        let modified = col_of(tab, "modifiedon");
        let explicit = puts.iter().any(|(c, _)| Some(*c) == modified);
        let Some(p) = self.pending(t, id) else {
            return Err(WriteError::RowNotFound {
                table: table.to_string(),
                id,
            });
        };
        for (c, v) in puts {
            p.put(c, v);
        }
        if let (Some(m), false) = (modified, explicit) {
            p.put(m, Value::DateTime(now));
        }
        Ok(())
    }

    /// Delete a row: a tombstone that replicates. A delete wins over concurrent edits.
    pub fn delete(&mut self, table: &str, id: RowId) -> Result<(), WriteError> {
        let (t, _) = self.existing(table, id)?;
        if let Some(p) = self.pending(t, id) {
            p.delete = true;
        }
        Ok(())
    }

    /// Commit with the store's default durability.
    pub fn commit(self) -> Result<CommitInfo, WriteError> {
        let d = self.store.inner.options.durability;
        self.commit_with(d)
    }

    /// Commit atomically: one log entry per row touched, rows and indexes in the same batch
    /// (`Store::write`). With [`Durability::Immediate`] the commit is on disk when this
    /// returns, and before any reader sees it.
    pub fn commit_with(self, durability: Durability) -> Result<CommitInfo, WriteError> {
        let store = self.store;
        let _span = debug_span!("commit", rows = self.rows.len(), ?durability).entered();
        let me = store.actor();
        let now = store.inner.options.clock.now_ms();
        let mut writer = store.writer();
        let first_seq = writer.next_seq;
        let mut seq = first_seq;
        let mut batch = WriteBatch::default();
        for row in &self.rows {
            let tab = store.table_by_id(row.table)?;
            let mut old_state = store.load_state(row.table, row.id)?;
            // A local change only moves index entries when it writes an indexed column (or
            // inserts or deletes the row): otherwise the old row need not be materialized
            // nor its index keys recomputed.
            let touches_index = row.insert
                || row.delete
                || row.puts.iter().any(|(c, _)| {
                    tab.columns
                        .get(usize::from(*c))
                        .is_none_or(|col| col.ty.is_indexed())
                });
            let old_deleted = old_state.as_ref().map(|s| s.deleted);
            let old_mat: Option<MatRow> = if touches_index {
                old_state.as_ref().map(|s| s.materialize(tab))
            } else {
                None
            };
            let mut state = match (old_deleted, row.insert) {
                (Some(true), _) => {
                    return Err(WriteError::RowDeleted {
                        table: store.table_name(row.table),
                        id: row.id,
                    })
                }
                (Some(false), true) => {
                    return Err(WriteError::RowExists {
                        table: store.table_name(row.table),
                        id: row.id,
                    })
                }
                (None, false) => {
                    return Err(WriteError::RowNotFound {
                        table: store.table_name(row.table),
                        id: row.id,
                    })
                }
                (Some(false), false) => old_state.take().unwrap_or_default(),
                (None, true) => CrdtState::default(),
            };
            let with_delete;
            let puts: &[(u16, Value)] = if row.delete {
                let mut p = row.puts.clone();
                p.push((DELETED_COL, Value::Boolean(true)));
                with_delete = p;
                &with_delete
            } else {
                &row.puts
            };
            let (bytes, change) = state.local_change(tab, me, now, puts);
            check_change_len(tab, row.id, &bytes)?;
            state.apply(&change);
            state.pending.push(seq);
            let entry = StoredEntry {
                table: row.table,
                row: row.id,
                actor: me,
                hash: change.hash,
                change: bytes,
            };
            batch.insert(&keys::log(seq)[..], entry.encode());
            if touches_index {
                store.stage_row(&mut batch, row.table, tab, row.id, old_mat.as_ref(), &state);
            } else {
                batch.insert(
                    &keys::row_key(keys::ROW, row.table, row.id)[..],
                    crate::store::encode(&state),
                );
            }
            seq += 1;
        }
        if seq > first_seq {
            // Durable before readers see it (`Store::write`).
            store.write(batch, durability)?;
        }
        store.set_next_seq(&mut writer, seq);
        drop(writer);
        if seq == first_seq {
            store.make_durable(durability)?;
        }
        Ok(CommitInfo {
            first_seq,
            last_seq: seq - 1,
        })
    }
}
