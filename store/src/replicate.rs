//! What replication needs: the log since a seq, idempotent remote apply with a held area,
//! whole-row export/import, eviction, acknowledgement and compaction.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};
use tracing::{debug, info_span};

use crate::api::{ApplyOutcome, CompactReport, LogEntry, RemoteOp, RowExport};
use crate::codec::keys;
use crate::error::{corrupt, StoreError};
use crate::log::StoredEntry;
use crate::options::Durability;
use crate::row::{parse_change, row_change, CrdtState, MatRow, RowChange};
use crate::store::{on_every_core, Store};
use crate::value::RowId;
use crate::wal::WriteBatch;

/// Log entries folded per compaction batch.
const COMPACT_CHUNK: usize = 2048;

/// Remote ops from this many on are parsed on every core.
const PARALLEL_PARSE_MIN: usize = 64;

/// A log entry's seq and change bytes.
type SeqChange = (u64, Vec<u8>);

/// A row being changed by `apply_remote`.
struct Working {
    state: CrdtState,
    old: Option<MatRow>,
    /// Held changes of this row: hash → (change, bytes, stored on disk already).
    held: BTreeMap<[u8; 32], (RowChange, Vec<u8>, bool)>,
    held_loaded: bool,
    /// Held hashes to remove from disk.
    released: Vec<[u8; 32]>,
    changed: bool,
}

impl Store {
    /// Up to `limit` log entries with `seq > after_seq`, in order.
    pub fn ops_since(&self, after_seq: u64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let start = keys::log(after_seq.saturating_add(1));
        let end = [keys::LOG + 1];
        let mut out = Vec::new();
        for r in self.db().range(start.to_vec()..end.to_vec()).take(limit) {
            let (k, v) = r?;
            let seq = keys::log_seq(&k).ok_or_else(|| corrupt("a log key is malformed"))?;
            out.push(self.decode_log_entry(seq, &v)?);
        }
        Ok(out)
    }

    /// The log entry at `seq`, if the log holds it (not compacted away, not past the end).
    pub fn log_entry(&self, seq: u64) -> Result<Option<LogEntry>, StoreError> {
        match self.db().get(keys::log(seq))? {
            Some(v) => Ok(Some(self.decode_log_entry(seq, &v)?)),
            None => Ok(None),
        }
    }

    fn decode_log_entry(&self, seq: u64, stored: &[u8]) -> Result<LogEntry, StoreError> {
        let e = StoredEntry::decode(stored)
            .ok_or_else(|| corrupt(format!("log entry {seq} is too short")))?;
        Ok(LogEntry {
            seq,
            table: self.table_name(e.table),
            row: e.row,
            actor: e.actor,
            hash: e.hash,
            change: e.change,
        })
    }

    /// Apply changes made elsewhere.
    ///
    /// Idempotent: a change already applied (or already held) is counted as a duplicate and
    /// adds nothing. A change whose dependencies have not arrived is persisted in a held area
    /// and applied (logged) as soon as they do. Every op is validated first (bytes, table,
    /// columns, value types): if any is invalid, nothing of the batch is written.
    pub fn apply_remote(
        &self,
        ops: &[RemoteOp],
        durability: Durability,
    ) -> Result<ApplyOutcome, StoreError> {
        let _span = info_span!("apply_remote", ops = ops.len()).entered();
        let parsed = self.parse_remote(ops)?;
        self.apply_parsed(ops, parsed, durability)
    }

    /// Each op's table and its change checked against the table, in order. Parsing is
    /// independent per op (and, with the sled writes, the cost of an initial sync): many are
    /// parsed on every core. Each part stops at its first bad op, so the first error in op
    /// order is the one reported, as one by one.
    fn parse_remote(&self, ops: &[RemoteOp]) -> Result<Vec<(u16, RowChange)>, StoreError> {
        let parse = |part: &[RemoteOp]| -> Result<Vec<(u16, RowChange)>, StoreError> {
            part.iter()
                .map(|op| {
                    let (t, tab) = self.table(&op.table)?;
                    let invalid = |reason: String| StoreError::InvalidChange {
                        table: op.table.clone(),
                        row: op.row,
                        reason,
                    };
                    let (expanded, hash) = parse_change(&op.change).map_err(invalid)?;
                    Ok((t, row_change(tab, &expanded, hash).map_err(invalid)?))
                })
                .collect()
        };
        let mut parsed = Vec::with_capacity(ops.len());
        for part in on_every_core(ops, PARALLEL_PARSE_MIN, parse)? {
            parsed.extend(part?);
        }
        Ok(parsed)
    }

    /// `apply_remote` of ops already parsed (`parsed[i]` is `ops[i]`'s).
    fn apply_parsed(
        &self,
        ops: &[RemoteOp],
        parsed: Vec<(u16, RowChange)>,
        durability: Durability,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut outcome = ApplyOutcome::default();
        let mut writer = self.writer();
        let mut seq = writer.next_seq;
        let mut batch = WriteBatch::default();
        let mut rows: HashMap<(u16, RowId), Working> = HashMap::new();
        let mut order: Vec<(u16, RowId)> = Vec::new();
        let mut batch_held: Vec<[u8; 32]> = Vec::new();
        let mut holds_any: HashMap<u16, bool> = HashMap::new();
        for ((t, change), op) in parsed.into_iter().zip(ops) {
            let (id, bytes) = (op.row, &op.change);
            if let std::collections::hash_map::Entry::Vacant(slot) = rows.entry((t, id)) {
                let state = self.load_state(t, id)?;
                let old = match &state {
                    Some(s) => Some(s.materialize(self.table_by_id(t)?)),
                    None => None,
                };
                slot.insert(Working {
                    state: state.unwrap_or_default(),
                    old,
                    held: BTreeMap::new(),
                    held_loaded: false,
                    released: Vec::new(),
                    changed: false,
                });
                order.push((t, id));
            }
            let Some(w) = rows.get_mut(&(t, id)) else {
                continue;
            };
            if !w.held_loaded {
                if self.table_holds_changes(t, &mut holds_any) {
                    self.load_held(t, id, w)?;
                } else {
                    w.held_loaded = true;
                }
            }
            if w.state.has_change(&change.hash) || w.held.contains_key(&change.hash) {
                outcome.duplicates += 1;
                continue;
            }
            if !w.state.ready(&change) {
                batch_held.push(change.hash);
                w.held.insert(change.hash, (change, bytes.clone(), false));
                continue;
            }
            self.apply_one(&mut batch, &mut seq, t, id, w, change, bytes.clone());
            outcome.applied += 1;
            // Release whatever this made ready.
            loop {
                let ready: Vec<[u8; 32]> = w
                    .held
                    .iter()
                    .filter(|(_, (c, _, _))| w.state.ready(c))
                    .map(|(h, _)| *h)
                    .collect();
                if ready.is_empty() {
                    break;
                }
                for h in ready {
                    if let Some((c, b, on_disk)) = w.held.remove(&h) {
                        if w.state.ready(&c) {
                            if on_disk {
                                w.released.push(h);
                            }
                            self.apply_one(&mut batch, &mut seq, t, id, w, c, b);
                            outcome.applied += 1;
                        } else {
                            w.held.insert(h, (c, b, on_disk));
                        }
                    }
                }
            }
        }
        for key in &order {
            let (t, id) = *key;
            let Some(w) = rows.get(key) else { continue };
            for h in &w.released {
                batch.remove(keys::held(t, id, h));
            }
            for (h, (_, bytes, on_disk)) in &w.held {
                if !on_disk {
                    batch.insert(keys::held(t, id, h), bytes.as_slice());
                }
            }
            if w.changed {
                let tab = self.table_by_id(t)?;
                self.stage_row(&mut batch, t, tab, id, w.old.as_ref(), &w.state);
            }
        }
        outcome.held = batch_held
            .iter()
            .filter(|h| {
                rows.values()
                    .any(|w| w.held.get(*h).is_some_and(|(_, _, on_disk)| !on_disk))
            })
            .count();
        self.write(batch, Durability::Group)?;
        self.set_next_seq(&mut writer, seq);
        drop(writer);
        self.make_durable(durability)?;
        debug!(?outcome, "applied remote changes");
        Ok(outcome)
    }

    /// Whether table `t` has held changes on disk, asked once per table (`known`): they are
    /// rare, and a table with none needs no scan per row (an initial sync brings thousands).
    fn table_holds_changes(&self, t: u16, known: &mut HashMap<u16, bool>) -> bool {
        *known.entry(t).or_insert_with(|| {
            let prefix = keys::table_prefix(keys::HELD, t);
            self.db().scan_prefix(prefix).next().is_some()
        })
    }

    fn load_held(&self, t: u16, id: RowId, w: &mut Working) -> Result<(), StoreError> {
        let tab = self.table_by_id(t)?;
        for r in self.db().scan_prefix(keys::row_key(keys::HELD, t, id)) {
            let (k, v) = r?;
            let hash: [u8; 32] = k
                .get(19..)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| corrupt("a held key is malformed"))?;
            let (expanded, h2) =
                parse_change(&v).map_err(|e| corrupt(format!("a held change: {e}")))?;
            if h2 != hash {
                return Err(corrupt("a held change does not match its hash"));
            }
            let c = row_change(tab, &expanded, hash)
                .map_err(|e| corrupt(format!("a held change: {e}")))?;
            w.held.insert(hash, (c, v.to_vec(), true));
        }
        w.held_loaded = true;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_one(
        &self,
        batch: &mut crate::wal::WriteBatch,
        seq: &mut u64,
        t: u16,
        id: RowId,
        w: &mut Working,
        change: RowChange,
        bytes: Vec<u8>,
    ) {
        w.state.apply(&change);
        w.state.pending.push(*seq);
        w.changed = true;
        let entry = StoredEntry {
            table: t,
            row: id,
            actor: change.actor,
            hash: change.hash,
            change: bytes,
        };
        batch.insert(&keys::log(*seq)[..], entry.encode());
        *seq += 1;
    }

    /// The whole row document (its compacted base plus every logged change), automerge
    /// `save()` format. `None` if the row is not in the store. Deleted rows export their
    /// tombstone.
    pub fn export_row(&self, table: &str, id: RowId) -> Result<Option<RowExport>, StoreError> {
        let (t, _) = self.table(table)?;
        let Some(state) = self.load_state(t, id)? else {
            return Ok(None);
        };
        // A base that is change chunks (a row imported whole) takes the row's pending
        // changes after it as they are; a saved document is rebuilt with them.
        let chunk_base = if state.has_base {
            let base = self
                .db()
                .get(keys::row_key(keys::DOC, t, id))?
                .ok_or_else(|| corrupt(format!("the compacted document of {id} is missing")))?;
            match change_chunks(&base) {
                Ok(Some(_)) => Some(base.to_vec()),
                _ => None,
            }
        } else {
            Some(Vec::new())
        };
        let doc = if let Some(mut doc) = chunk_base {
            // The row's history is change chunks one after the other, bytes
            // `Automerge::load` accepts. No document is built here, and `import_rows` takes
            // them without building one either.
            for seq in &state.pending {
                let e = self
                    .load_entry(*seq)?
                    .ok_or_else(|| corrupt(format!("log entry {seq} of row {id} is missing")))?;
                doc.extend_from_slice(&e.change);
            }
            doc
        } else {
            self.row_document(t, id, &state)?.save()
        };
        Ok(Some(RowExport {
            table: table.to_string(),
            id,
            doc,
        }))
    }

    /// The whole row as one saved automerge document (`save()` format): for a row with a long
    /// history, far fewer bytes than the change chunks `export_row` gives. `None` if the row
    /// is not in the store.
    pub fn export_row_saved(
        &self,
        table: &str,
        id: RowId,
    ) -> Result<Option<RowExport>, StoreError> {
        let (t, _) = self.table(table)?;
        let Some(state) = self.load_state(t, id)? else {
            return Ok(None);
        };
        Ok(Some(RowExport {
            table: table.to_string(),
            id,
            doc: self.row_document(t, id, &state)?.save(),
        }))
    }

    /// The automerge document of a row: its compacted base plus its pending log entries.
    pub(crate) fn row_document(
        &self,
        t: u16,
        id: RowId,
        state: &CrdtState,
    ) -> Result<automerge::Automerge, StoreError> {
        let mut doc = if state.has_base {
            let base = self
                .db()
                .get(keys::row_key(keys::DOC, t, id))?
                .ok_or_else(|| corrupt(format!("the compacted document of {id} is missing")))?;
            automerge::Automerge::load(&base)
                .map_err(|e| corrupt(format!("the compacted document of {id}: {e}")))?
        } else {
            automerge::Automerge::new()
        };
        let mut changes = Vec::with_capacity(state.pending.len());
        for seq in &state.pending {
            let e = self
                .load_entry(*seq)?
                .ok_or_else(|| corrupt(format!("log entry {seq} of row {id} is missing")))?;
            let c = automerge::Change::try_from(e.change.as_slice())
                .map_err(|err| corrupt(format!("log entry {seq}: {err}")))?;
            changes.push(c);
        }
        doc.apply_changes(changes)
            .map_err(|e| corrupt(format!("the changes of row {id} do not apply: {e}")))?;
        Ok(doc)
    }

    /// Merge a whole exported row (idempotent, like `apply_remote` of its changes).
    pub fn import_row(&self, row: &RowExport, durability: Durability) -> Result<(), StoreError> {
        self.import_rows(std::slice::from_ref(row), durability)
    }

    /// Merge many exported rows (idempotent, like `apply_remote` of their changes).
    ///
    /// A row this store does not hold yet is stored as its export: the export becomes the
    /// row's compacted document, as if it had arrived and been compacted, with no log entry —
    /// an initial sync leaves no log behind to compact. A row sent as change chunks (what
    /// `export_row` gives for a row with no compacted base) is read without building its
    /// automerge document; a saved document is loaded to read its changes. A row the store
    /// holds (or holds changes of, waiting for their dependencies) is merged through
    /// `apply_remote`. Every change of every row is checked first: a row that does not decode
    /// refuses the whole call and nothing is written. Each row is imported atomically; a crash
    /// within the call may leave some rows imported, and importing them again changes nothing.
    pub fn import_rows(
        &self,
        rows: &[RowExport],
        durability: Durability,
    ) -> Result<(), StoreError> {
        let _span = info_span!("import_rows", rows = rows.len()).entered();
        let as_export_error = |e: StoreError| match e {
            // A bad change inside an export is a bad export.
            StoreError::InvalidChange { table, row, reason } => {
                StoreError::InvalidExport { table, row, reason }
            }
            other => other,
        };
        // Every row's changes, the rows one after the other.
        let mut ops = Vec::new();
        let mut per_row = Vec::with_capacity(rows.len());
        for row in rows {
            self.table(&row.table)?;
            let invalid = |reason: String| StoreError::InvalidExport {
                table: row.table.clone(),
                row: row.id,
                reason,
            };
            let op = |change: Vec<u8>| RemoteOp {
                table: row.table.clone(),
                row: row.id,
                change,
            };
            let before = ops.len();
            if let Some(chunks) = change_chunks(&row.doc).map_err(invalid)? {
                ops.extend(chunks.into_iter().map(|c| op(c.to_vec())));
            } else {
                let doc = match std::panic::catch_unwind(|| automerge::Automerge::load(&row.doc)) {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => return Err(invalid(e.to_string())),
                    Err(_) => return Err(invalid("the document could not be decoded".into())),
                };
                ops.extend(
                    doc.get_changes(&[])
                        .into_iter()
                        .map(|c| op(c.raw_bytes().to_vec())),
                );
            }
            per_row.push(ops.len() - before);
        }
        let parsed = self.parse_remote(&ops).map_err(as_export_error)?;

        let mut merged_ops = Vec::new();
        let mut merged_parsed = Vec::new();
        let writer = self.writer();
        let mut batch = WriteBatch::default();
        let mut holds_any = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut changes = ops.into_iter().zip(parsed);
        for (row, n) in rows.iter().zip(per_row) {
            let row_changes: Vec<(RemoteOp, (u16, RowChange))> = changes.by_ref().take(n).collect();
            let Some((_, (t, _))) = row_changes.first() else {
                continue;
            };
            let t = *t;
            let fresh = seen.insert((t, row.id))
                && self.load_state(t, row.id)?.is_none()
                && !(self.table_holds_changes(t, &mut holds_any)
                    && self
                        .db()
                        .scan_prefix(keys::row_key(keys::HELD, t, row.id))
                        .next()
                        .is_some());
            let base = if fresh {
                base_state(row_changes.iter().map(|(_, (_, c))| c))
            } else {
                None
            };
            match base {
                Some(state) => {
                    let tab = self.table_by_id(t)?;
                    batch.insert(&keys::row_key(keys::DOC, t, row.id)[..], row.doc.as_slice());
                    self.stage_row(&mut batch, t, tab, row.id, None, &state);
                }
                None => {
                    for (op, p) in row_changes {
                        merged_ops.push(op);
                        merged_parsed.push(p);
                    }
                }
            }
        }
        self.write(batch, Durability::Group)?;
        drop(writer);
        if merged_ops.is_empty() {
            return self.make_durable(durability);
        }
        self.apply_parsed(&merged_ops, merged_parsed, durability)?;
        Ok(())
    }

    /// Drop a row from this device: its materialized row, indexes, CRDT state, compacted
    /// document and held changes, and its log entries (all acknowledged) in the same write,
    /// so nothing of the row is left to rebuild it from.
    ///
    /// Refused with [`StoreError::UnacknowledgedChanges`] if the row has log entries after the
    /// acknowledged prefix (they would never reach the hub). Returns whether the row was there.
    pub fn evict_row(&self, table: &str, id: RowId) -> Result<bool, StoreError> {
        let _span = info_span!("evict_row", table, row = %id).entered();
        let (t, tab) = self.table(table)?;
        let writer = self.writer();
        let acked = self.meta_u64("acked")?;
        let state = self.load_state(t, id)?;
        let mut batch = WriteBatch::default();
        let mut found = false;
        if let Some(state) = &state {
            if let Some(&last) = state.pending.iter().rev().find(|s| **s > acked) {
                return Err(StoreError::UnacknowledgedChanges {
                    table: table.to_string(),
                    row: id,
                    seq: last,
                });
            }
            found = true;
            if let Some(mat) = self.load_mat(t, id)? {
                for k in self.index_keys(t, tab, id, &mat) {
                    batch.remove(k);
                }
            }
            batch.remove(&keys::row_key(keys::ROW, t, id)[..]);
            batch.remove(&keys::row_key(keys::DOC, t, id)[..]);
            // Its log entries are all acknowledged: drop them now so nothing of the row
            // is left to rebuild it from.
            for s in &state.pending {
                batch.remove(&keys::log(*s)[..]);
            }
            batch.insert(keys::meta("seq"), &(writer.next_seq - 1).to_be_bytes()[..]);
        }
        for r in self.db().scan_prefix(keys::row_key(keys::HELD, t, id)) {
            let (k, _) = r?;
            batch.remove(k);
            found = true;
        }
        self.write(batch, Durability::Group)?;
        drop(writer);
        self.make_durable(self.inner.options.durability)?;
        Ok(found)
    }

    /// Mark the log up to `up_to_seq` as delivered to the hub: `compact` may fold it away.
    /// Acknowledging less than before is a no-op.
    pub fn acknowledge(&self, up_to_seq: u64) -> Result<(), StoreError> {
        let writer = self.writer();
        let last = writer.next_seq - 1;
        if up_to_seq > last {
            return Err(StoreError::AckBeyondLog {
                requested: up_to_seq,
                last,
            });
        }
        let acked = self.meta_u64("acked")?;
        if up_to_seq > acked {
            self.db()
                .insert(keys::meta("acked"), &up_to_seq.to_be_bytes()[..])?;
        }
        drop(writer);
        Ok(())
    }

    /// At most how many log entries [`Store::compact`] would fold away now: the span from the
    /// first entry still in the log to the acknowledged seq (an upper bound: evictions leave
    /// gaps). Cheap (one key read), so a caller can ask after every acknowledgement.
    pub fn compaction_backlog(&self) -> Result<u64, StoreError> {
        let acked = self.meta_u64("acked")?;
        if acked == 0 {
            return Ok(0);
        }
        let first = match self
            .db()
            .range(keys::log(1).to_vec()..=keys::log(acked).to_vec())
            .next()
        {
            Some(r) => {
                let (k, _) = r?;
                keys::log_seq(&k).ok_or_else(|| corrupt("a log key is malformed"))?
            }
            None => return Ok(0),
        };
        Ok(acked + 1 - first)
    }

    /// Fold the acknowledged log prefix into the rows' compacted automerge documents and
    /// remove it from the log. Unacknowledged entries are never touched.
    pub fn compact(&self) -> Result<CompactReport, StoreError> {
        let _span = info_span!("compact").entered();
        let mut report = CompactReport::default();
        loop {
            let writer = self.writer();
            let acked = self.meta_u64("acked")?;
            let last = writer.next_seq - 1;
            if acked == 0 {
                break;
            }
            let mut by_row: BTreeMap<(u16, RowId), Vec<SeqChange>> = BTreeMap::new();
            let mut seqs = Vec::new();
            for r in self
                .db()
                .range(keys::log(1).to_vec()..=keys::log(acked).to_vec())
                .take(COMPACT_CHUNK)
            {
                let (k, v) = r?;
                let seq = keys::log_seq(&k).ok_or_else(|| corrupt("a log key is malformed"))?;
                let e = StoredEntry::decode(&v)
                    .ok_or_else(|| corrupt(format!("log entry {seq} is too short")))?;
                by_row
                    .entry((e.table, e.row))
                    .or_default()
                    .push((seq, e.change));
                seqs.push(seq);
            }
            if seqs.is_empty() {
                break;
            }
            let mut batch = WriteBatch::default();
            for ((t, id), entries) in by_row {
                let Some(mut state) = self.load_state(t, id)? else {
                    report.entries_of_evicted_rows += entries.len() as u64;
                    continue;
                };
                // Entries of an earlier, evicted incarnation of the row are not its history.
                let (entries, stale): (Vec<_>, Vec<_>) = entries
                    .into_iter()
                    .partition(|(s, _)| state.pending.binary_search(s).is_ok());
                report.entries_of_evicted_rows += stale.len() as u64;
                if entries.is_empty() {
                    continue;
                }
                let mut doc = if state.has_base {
                    let base = self
                        .db()
                        .get(keys::row_key(keys::DOC, t, id))?
                        .ok_or_else(|| corrupt(format!("compacted document of {id} missing")))?;
                    automerge::Automerge::load(&base)
                        .map_err(|e| corrupt(format!("compacted document of {id}: {e}")))?
                } else {
                    automerge::Automerge::new()
                };
                let mut changes = Vec::with_capacity(entries.len());
                for (seq, bytes) in &entries {
                    changes.push(
                        automerge::Change::try_from(bytes.as_slice())
                            .map_err(|e| corrupt(format!("log entry {seq}: {e}")))?,
                    );
                }
                doc.apply_changes(changes)
                    .map_err(|e| corrupt(format!("row {id} does not compact: {e}")))?;
                state
                    .pending
                    .retain(|s| entries.iter().all(|(e, _)| e != s));
                state.has_base = true;
                batch.insert(&keys::row_key(keys::DOC, t, id)[..], doc.save());
                batch.insert(
                    &keys::row_key(keys::ROW, t, id)[..],
                    crate::store::encode(&state),
                );
                report.rows_compacted += 1;
            }
            for s in &seqs {
                batch.remove(&keys::log(*s)[..]);
            }
            report.entries_removed += seqs.len() as u64;
            // Keep last_seq when the log becomes empty.
            batch.insert(keys::meta("seq"), &last.to_be_bytes()[..]);
            self.write(batch, Durability::Group)?;
            drop(writer);
        }
        self.sync()?;
        debug!(?report, "compacted");
        Ok(report)
    }
}

/// The state of a row made of `changes` alone, stored as its compacted document; `None` if
/// they are not in causal order or repeat one (then they are applied one by one instead).
fn base_state<'a>(changes: impl Iterator<Item = &'a RowChange>) -> Option<CrdtState> {
    let mut state = CrdtState::default();
    for c in changes {
        if state.has_change(&c.hash) || !state.ready(c) {
            return None;
        }
        state.apply(c);
    }
    state.has_base = true;
    Some(state)
}

/// The chunks of `bytes` if it starts with an automerge change chunk (plain or compressed):
/// then every chunk must be a whole change chunk. `Ok(None)` for anything else (a saved
/// document). Only the chunk framing is read here (magic, checksum, type, LEB128 length);
/// `apply_remote` checks the rest.
fn change_chunks(mut bytes: &[u8]) -> Result<Option<Vec<&[u8]>>, String> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    const CHANGE: u8 = 1;
    const COMPRESSED_CHANGE: u8 = 2;
    let is_change = |b: &[u8]| {
        b.get(..4) == Some(&MAGIC[..]) && matches!(b.get(8), Some(&CHANGE | &COMPRESSED_CHANGE))
    };
    if !is_change(bytes) {
        return Ok(None);
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if !is_change(bytes) {
            return Err(format!("chunk {} is not an automerge change", out.len()));
        }
        let whole = bytes
            .get(9..)
            .and_then(uleb128)
            .and_then(|(len, leb)| {
                9usize
                    .checked_add(leb)?
                    .checked_add(usize::try_from(len).ok()?)
            })
            .and_then(|total| Some((bytes.get(..total)?, bytes.get(total..)?)));
        let Some((chunk, rest)) = whole else {
            return Err(format!("change chunk {} is cut short", out.len()));
        };
        // The checksum is the start of the SHA-256 of type, length and contents (for a
        // compressed chunk, of its uncompressed form: automerge checks that one).
        if chunk.get(8) == Some(&CHANGE) {
            let sum = Sha256::digest(chunk.get(8..).unwrap_or_default());
            if sum.get(..4) != chunk.get(4..8) {
                return Err(format!("change chunk {} fails its checksum", out.len()));
            }
        }
        out.push(chunk);
        bytes = rest;
    }
    Ok(Some(out))
}

/// An unsigned LEB128 number and how many bytes it took.
fn uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}
