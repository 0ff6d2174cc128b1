//! Integrity: compare the materialized state with the log (and with real automerge
//! documents), rebuild it from the log, and report status.

use std::collections::BTreeMap;

use automerge::ReadDoc;
use tracing::{info, info_span, warn};

use crate::api::{CheckProblem, CheckReport, StoreStatus};
use crate::codec::{from_scalar, keys};
use crate::error::{corrupt, StoreError};
use crate::options::Durability;
use crate::row::{key_col, parse_change, row_change, CrdtState, MatRow, DELETED_COL};
use crate::store::{Store, FORMAT_VERSION};
use crate::value::{RowId, Value};
use crate::wal::WriteBatch;

/// Rows per batch when rebuilding.
const REBUILD_CHUNK: usize = 1024;

/// The meta key set while `rebuild` runs (see there).
pub(crate) const REBUILDING: &str = "rebuilding";

/// Where a row's history lives: a compacted document and log entries.
#[derive(Debug, Default)]
struct History {
    has_base: bool,
    seqs: Vec<u64>,
}

impl Store {
    /// Every row with a history, from the compacted documents and the log.
    fn histories(&self) -> Result<BTreeMap<(u16, RowId), History>, StoreError> {
        let mut rows: BTreeMap<(u16, RowId), History> = BTreeMap::new();
        for r in self.db().scan_prefix([keys::DOC]) {
            let (k, _) = r?;
            let key =
                keys::parse_row_key(&k).ok_or_else(|| corrupt("a document key is malformed"))?;
            rows.entry(key).or_default().has_base = true;
        }
        for r in self.db().scan_prefix([keys::LOG]) {
            let (k, v) = r?;
            let seq = keys::log_seq(&k).ok_or_else(|| corrupt("a log key is malformed"))?;
            let e = crate::log::StoredEntry::decode(&v)
                .ok_or_else(|| corrupt(format!("log entry {seq} is too short")))?;
            rows.entry((e.table, e.row)).or_default().seqs.push(seq);
        }
        Ok(rows)
    }

    /// The CRDT state of a row computed from its compacted document and its log entries.
    fn replay(&self, t: u16, id: RowId, h: &History) -> Result<CrdtState, StoreError> {
        let table = self.table_by_id(t)?;
        let mut state = CrdtState::default();
        if h.has_base {
            let base = self
                .db()
                .get(keys::row_key(keys::DOC, t, id))?
                .ok_or_else(|| corrupt(format!("the compacted document of {id} vanished")))?;
            let doc = automerge::Automerge::load(&base)
                .map_err(|e| corrupt(format!("the compacted document of {id}: {e}")))?;
            for c in doc.get_changes(&[]) {
                let change = row_change(table, &c.decode(), c.hash().0)
                    .map_err(|e| corrupt(format!("compacted document of {id}: {e}")))?;
                if !state.ready(&change) {
                    return Err(corrupt(format!(
                        "compacted document of {id} is out of order"
                    )));
                }
                state.apply(&change);
            }
            state.has_base = true;
        }
        for seq in &h.seqs {
            let e = self
                .load_entry(*seq)?
                .ok_or_else(|| corrupt(format!("log entry {seq} vanished")))?;
            let (expanded, hash) = parse_change(&e.change)
                .map_err(|err| corrupt(format!("log entry {seq}: {err}")))?;
            if hash != e.hash {
                return Err(corrupt(format!("log entry {seq} does not match its hash")));
            }
            let change = row_change(table, &expanded, hash)
                .map_err(|err| corrupt(format!("log entry {seq}: {err}")))?;
            if !state.ready(&change) {
                return Err(corrupt(format!(
                    "log entry {seq} comes before its dependencies"
                )));
            }
            state.apply(&change);
            state.pending.push(*seq);
        }
        Ok(state)
    }

    /// Whether a rebuild was interrupted (its marker is still set).
    pub(crate) fn rebuild_interrupted(&self) -> Result<bool, StoreError> {
        Ok(self.db().get(keys::meta(REBUILDING))?.is_some())
    }

    /// Recompute every materialized row, its CRDT state and its indexes from the log and the
    /// compacted documents, replacing what is stored.
    pub fn rebuild(&self) -> Result<(), StoreError> {
        let _span = info_span!("rebuild").entered();
        let _writer = self.writer();
        let histories = self.histories()?;
        // The deletes and rewrites below take many batches: a crash between them would leave
        // rows missing that the open-time tail check takes for evicted. The durable marker
        // makes every open until the last batch (which removes it) rebuild again.
        let mut marker = WriteBatch::default();
        marker.insert(keys::meta(REBUILDING), [1u8]);
        self.write(marker, Durability::Immediate)?;
        // Drop the derived state.
        self.remove_prefix(keys::ROW)?;
        self.remove_prefix(keys::INDEX)?;
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for ((t, id), h) in &histories {
            let state = self.replay(*t, *id, h)?;
            let table = self.table_by_id(*t)?;
            self.stage_row(&mut batch, *t, table, *id, None, &state);
            n += 1;
            if n % REBUILD_CHUNK == 0 {
                self.write(std::mem::take(&mut batch), Durability::Group)?;
            }
        }
        batch.remove(keys::meta(REBUILDING));
        self.write(batch, Durability::Immediate)?;
        info!(
            rows = histories.len(),
            "rebuilt materialized rows from the log"
        );
        Ok(())
    }

    /// Remove every key under `prefix`, a bounded batch at a time.
    fn remove_prefix(&self, prefix: u8) -> Result<(), StoreError> {
        loop {
            let mut batch = WriteBatch::default();
            for r in self.db().scan_prefix([prefix]).take(REBUILD_CHUNK * 8) {
                let (k, _) = r?;
                batch.remove(k);
            }
            if batch.is_empty() {
                return Ok(());
            }
            self.write(batch, Durability::Group)?;
        }
    }

    /// Recompute every index entry from the stored rows (the rows and the log stay as they
    /// are): what an index layout change needs.
    fn rebuild_indexes(&self) -> Result<(), StoreError> {
        let _span = info_span!("rebuild_indexes").entered();
        let _writer = self.writer();
        self.remove_prefix(keys::INDEX)?;
        let mut batch = WriteBatch::default();
        let mut rows = 0usize;
        for r in self.db().scan_prefix([keys::ROW]) {
            let (k, v) = r?;
            let (t, id) =
                keys::parse_row_key(&k).ok_or_else(|| corrupt("a row key is malformed"))?;
            let table = self.table_by_id(t)?;
            let mat = self.decode_mat(t, &v)?;
            for key in self.index_keys(t, table, id, &mat) {
                batch.insert(key, &[][..]);
            }
            rows += 1;
            if rows.is_multiple_of(REBUILD_CHUNK) {
                self.write(std::mem::take(&mut batch), Durability::Group)?;
            }
        }
        self.write(batch, Durability::Group)?;
        info!(rows, "rebuilt the indexes from the rows");
        Ok(())
    }

    /// Bring a store written in an older format (`from`) to the current one: the indexes are
    /// rebuilt (from the rows, or everything from the log if a row does not decode), then
    /// the new format is recorded, durably. A crash before that leaves the old format
    /// recorded, and the next open does it again.
    pub(crate) fn upgrade_format(&self, from: u32) -> Result<(), StoreError> {
        let _span = info_span!("upgrade_format", from, to = FORMAT_VERSION).entered();
        match self.rebuild_indexes() {
            Ok(()) => {}
            Err(StoreError::Corrupt(reason)) => {
                warn!(%reason, "a row does not decode; rebuilding everything from the log");
                self.rebuild()?;
            }
            Err(e) => return Err(e),
        }
        let mut batch = WriteBatch::default();
        batch.insert(keys::meta("format"), &FORMAT_VERSION.to_be_bytes()[..]);
        self.write(batch, Durability::Immediate)?;
        info!(from, to = FORMAT_VERSION, "upgraded the store format");
        Ok(())
    }

    /// Compare the materialized state with the log, in full: every row is replayed from its
    /// compacted document and log entries and compared with the stored row, its CRDT state
    /// and its index entries; every row is also loaded as a real automerge document and its
    /// values and conflicts compared; every index entry must belong to a live row.
    pub fn check(&self) -> Result<CheckReport, StoreError> {
        let _span = info_span!("check").entered();
        let _writer = self.writer();
        let mut report = CheckReport::default();
        let histories = self.histories()?;
        let problem = |t: u16, id: RowId, what: String| CheckProblem {
            table: Some(self.table_name(t)),
            row: Some(id),
            what,
        };
        for ((t, id), h) in &histories {
            let (t, id) = (*t, *id);
            report.rows += 1;
            report.log_entries += h.seqs.len() as u64;
            let table = self.table_by_id(t)?;
            let fresh = match self.replay(t, id, h) {
                Ok(s) => s,
                Err(e) => {
                    report.problems.push(problem(t, id, e.to_string()));
                    continue;
                }
            };
            let stored = match self.load_state(t, id) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    report.problems.push(problem(
                        t,
                        id,
                        "the row has a history but no state".into(),
                    ));
                    continue;
                }
                Err(e) => {
                    report.problems.push(problem(t, id, e.to_string()));
                    continue;
                }
            };
            if stored.heads != fresh.heads
                || stored.hashes != fresh.hashes
                || stored.pending != fresh.pending
                || stored.max_op != fresh.max_op
                || stored.has_base != fresh.has_base
                || stored.conflicts(table) != fresh.conflicts(table)
            {
                report
                    .problems
                    .push(problem(t, id, "the CRDT state differs from the log".into()));
            }
            let want = fresh.materialize(table);
            match self.load_mat(t, id) {
                Ok(Some(m)) if m == want => {
                    for k in self.index_keys(t, table, id, &m) {
                        report.index_entries += 1;
                        if !self.db().contains_key(&k)? {
                            report.problems.push(problem(
                                t,
                                id,
                                "an index entry is missing".into(),
                            ));
                        }
                    }
                }
                Ok(_) => report.problems.push(problem(
                    t,
                    id,
                    "the materialized row differs from the log".into(),
                )),
                Err(e) => report.problems.push(problem(t, id, e.to_string())),
            }
            // The slow reference: the real automerge document.
            match self.row_document(t, id, &fresh) {
                Ok(doc) => {
                    if let Some(what) = compare_with_automerge(table, &fresh, &doc) {
                        report.problems.push(problem(t, id, what));
                    }
                }
                Err(e) => report.problems.push(problem(t, id, e.to_string())),
            }
        }
        // Rows without a history, and index entries without a row.
        for r in self.db().scan_prefix([keys::ROW]) {
            let (k, _) = r?;
            let key = keys::parse_row_key(&k).ok_or_else(|| corrupt("a row key is malformed"))?;
            if !histories.contains_key(&key) {
                report
                    .problems
                    .push(problem(key.0, key.1, "a row without any history".into()));
            }
        }
        for r in self.db().scan_prefix([keys::INDEX]) {
            let (k, _) = r?;
            let ok = (|| -> Result<bool, StoreError> {
                let (Some(&hi), Some(&lo)) = (k.get(1), k.get(2)) else {
                    return Err(corrupt("index key malformed"));
                };
                let t = u16::from_be_bytes([hi, lo]);
                let id = keys::index_row(&k).ok_or_else(|| corrupt("index key malformed"))?;
                let Some(m) = self.load_mat(t, id)? else {
                    return Ok(false);
                };
                let table = self.table_by_id(t)?;
                Ok(self
                    .index_keys(t, table, id, &m)
                    .iter()
                    .any(|e| e[..] == k[..]))
            })();
            if !matches!(ok, Ok(true)) {
                report.problems.push(crate::api::CheckProblem {
                    table: None,
                    row: keys::index_row(&k),
                    what: "an index entry that matches no row".into(),
                });
            }
        }
        if report.is_ok() {
            info!(rows = report.rows, "check passed");
        } else {
            tracing::warn!(problems = report.problems.len(), "check found problems");
        }
        Ok(report)
    }

    /// Counts and sizes.
    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        let mut s = StoreStatus {
            actor: self.actor(),
            last_seq: self.last_seq(),
            acked_seq: self.acked_seq()?,
            ..StoreStatus::default()
        };
        for (i, name) in self.inner.tables.iter().enumerate() {
            let mut live = 0;
            for r in self
                .db()
                .scan_prefix(keys::table_prefix(keys::ROW, i as u16))
            {
                let (_, v) = r?;
                let m: MatRow = self.decode_mat(i as u16, &v)?;
                if m.deleted {
                    s.deleted_rows += 1;
                } else {
                    live += 1;
                }
            }
            s.rows_per_table.insert(name.clone(), live);
        }
        s.log_entries = self.db().scan_prefix([keys::LOG]).count() as u64;
        s.held_changes = self.db().scan_prefix([keys::HELD]).count() as u64;
        s.disk_bytes = match self.dir() {
            Some(d) => dir_size(d),
            None => self.db().size_on_disk()?,
        };
        Ok(s)
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Compare the row state with the real automerge document: the visible values of every key.
fn compare_with_automerge(
    table: &crate::schema::Table,
    state: &CrdtState,
    doc: &automerge::Automerge,
) -> Option<String> {
    let mut from_doc: BTreeMap<u16, Vec<Value>> = BTreeMap::new();
    for key in doc.keys(automerge::ROOT) {
        let Some(c) = key_col(table, &key) else {
            return Some(format!("the document has an unknown key `{key}`"));
        };
        let ty = if c == DELETED_COL {
            crate::schema::ColumnType::Boolean
        } else {
            table.columns.get(usize::from(c))?.ty
        };
        let values = match doc.get_all(automerge::ROOT, key.as_str()) {
            Ok(v) => v,
            Err(e) => return Some(e.to_string()),
        };
        let mut vs = Vec::new();
        for (v, _) in values {
            let Some(s) = v.as_scalar() else {
                return Some(format!("`{key}` holds an object"));
            };
            let Some(val) = from_scalar(ty, s) else {
                return Some(format!("`{key}` holds a value of the wrong type"));
            };
            vs.push(val);
        }
        from_doc.insert(c, vs);
    }
    let from_state: BTreeMap<u16, Vec<Value>> = state
        .keys
        .iter()
        .map(|k| (k.col, k.ops.iter().map(|o| o.value.clone()).collect()))
        .collect();
    if from_doc != from_state {
        return Some(format!(
            "the row state differs from its automerge document: {from_state:?} vs {from_doc:?}"
        ));
    }
    None
}
