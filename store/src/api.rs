//! Plain public data types returned and taken by [`Store`](crate::Store).

use std::collections::BTreeMap;

use crate::options::ActorId;
use crate::value::{RowId, Value};

/// The log sequence numbers a commit wrote (one entry per row touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// The first log entry of the commit.
    pub first_seq: u64,
    /// The last log entry of the commit (equal to `first_seq` for one row; an empty
    /// transaction has `first_seq = last_seq + 1`).
    pub last_seq: u64,
}

/// A materialized row: the winning value of every column.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The table's logical name.
    pub table: String,
    /// The primary id.
    pub id: RowId,
    /// Every non-null column by logical name (system columns included).
    pub values: BTreeMap<String, Value>,
    /// Whether some column holds concurrent values (see [`Store::conflicts`](crate::Store::conflicts)).
    pub has_conflicts: bool,
}

impl Row {
    /// The value of a column (`Value::Null` if absent).
    pub fn get(&self, column: &str) -> &Value {
        const NULL: Value = Value::Null;
        self.values.get(column).unwrap_or(&NULL)
    }
}

/// One log entry: one automerge change to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The local sequence number (dense, increasing, starts at 1).
    pub seq: u64,
    /// The table of the row.
    pub table: String,
    /// The row.
    pub row: RowId,
    /// The actor that made the change (this store's for local edits).
    pub actor: ActorId,
    /// The automerge change hash.
    pub hash: [u8; 32],
    /// The automerge change bytes.
    pub change: Vec<u8>,
}

impl LogEntry {
    /// The entry as a [`RemoteOp`], to apply on another store.
    pub fn to_remote(&self) -> RemoteOp {
        RemoteOp {
            table: self.table.clone(),
            row: self.row,
            change: self.change.clone(),
        }
    }
}

/// A change received from elsewhere (its hash is recomputed from the bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOp {
    /// The table of the row.
    pub table: String,
    /// The row.
    pub row: RowId,
    /// The automerge change bytes.
    pub change: Vec<u8>,
}

/// What `apply_remote` did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// Changes applied (each added one log entry), including held changes released by this
    /// batch.
    pub applied: usize,
    /// Changes already applied or already held: no-ops.
    pub duplicates: usize,
    /// Changes of this batch now held until their dependencies arrive.
    pub held: usize,
}

/// A whole row document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowExport {
    /// The table.
    pub table: String,
    /// The row.
    pub id: RowId,
    /// The whole history of the row as bytes `automerge::Automerge::load` accepts: the row's
    /// change chunks one after the other when it has no compacted base (no document is built
    /// to export or import it), else a saved document.
    pub doc: Vec<u8>,
}

/// A column holding concurrent values.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnConflict {
    /// The column's logical name.
    pub column: String,
    /// The value reads return until someone writes the column again (automerge's
    /// deterministic winner: the highest op id).
    pub winner: Value,
    /// Every concurrent value and the actor that wrote it, ascending op id (winner last).
    pub values: Vec<(Value, ActorId)>,
}

/// What `compact` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactReport {
    /// Acknowledged log entries removed.
    pub entries_removed: u64,
    /// Rows whose compacted document was rewritten.
    pub rows_compacted: u64,
    /// Removed entries that belonged to evicted rows.
    pub entries_of_evicted_rows: u64,
}

/// One inconsistency found by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckProblem {
    /// The table, if the problem is about a row.
    pub table: Option<String>,
    /// The row, if the problem is about a row.
    pub row: Option<RowId>,
    /// What is wrong.
    pub what: String,
}

/// The result of `check`: the materialized state compared with the log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// Rows checked.
    pub rows: u64,
    /// Log entries checked.
    pub log_entries: u64,
    /// Index entries checked.
    pub index_entries: u64,
    /// Everything that does not match (empty: consistent).
    pub problems: Vec<CheckProblem>,
}

impl std::fmt::Display for CheckProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.table, &self.row) {
            (Some(t), Some(r)) => write!(f, "{t}/{r}: {}", self.what),
            (None, Some(r)) => write!(f, "{r}: {}", self.what),
            _ => f.write_str(&self.what),
        }
    }
}

/// `ok (R rows, L log entries, I index entries)` or `N problems: first; second; ...`.
impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_ok() {
            return write!(
                f,
                "ok ({} rows, {} log entries, {} index entries)",
                self.rows, self.log_entries, self.index_entries
            );
        }
        write!(f, "{} problems: ", self.problems.len())?;
        for (i, p) in self.problems.iter().take(5).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        if self.problems.len() > 5 {
            f.write_str("; ...")?;
        }
        Ok(())
    }
}

impl CheckReport {
    /// Whether nothing was found wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Counts and sizes, for `fieldsync device status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreStatus {
    /// This store's actor.
    pub actor: ActorId,
    /// Live (not deleted) rows per table.
    pub rows_per_table: BTreeMap<String, u64>,
    /// Deleted rows (tombstones) over all tables.
    pub deleted_rows: u64,
    /// The last log sequence number.
    pub last_seq: u64,
    /// The acknowledged prefix of the log.
    pub acked_seq: u64,
    /// Log entries not yet compacted away.
    pub log_entries: u64,
    /// Remote changes held for missing dependencies.
    pub held_changes: u64,
    /// Bytes the data directory takes on disk.
    pub disk_bytes: u64,
}
