//! Push: the hub's log after the cursor, minus the Dataverse actor's own ops, written to
//! Dataverse (`create-entity-web-api.md`, `update-delete-entities-using-web-api.md`,
//! `perform-conditional-operations-using-web-api.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use fieldsync_store::{RowId, Value};
use reqwest::Method;
use serde_json::Value as J;
use tracing::{debug, info_span, warn, Instrument};

use super::client::{ApiRequest, ApiResponse, BatchOutcome, BATCH_REQUESTS_MAX};
use super::state::{self, Base, StateWrites};
use super::{lock, map, Bridge, Merger, UpstreamError, DATAVERSE_ACTOR};

/// Log entries read per push round.
const ENTRIES_PER_ROUND: usize = 10_000;
/// Times one row is re-read and re-written after `412` before the round gives up.
const CONFLICT_RETRIES: usize = 5;

/// One row to write, as the hub has it now.
#[derive(Debug, Clone)]
enum Write {
    /// Create (`PATCH` with `If-None-Match: *`, keeping the hub's id).
    Create { values: BTreeMap<String, Value> },
    /// Update (`PATCH` with `If-Match: <etag>`).
    Update {
        etag: String,
        values: BTreeMap<String, Value>,
        /// What Dataverse had at `etag`, as the hub last saw it: only what differs is sent.
        base: BTreeMap<String, Value>,
    },
    /// Delete.
    Delete,
}

/// How one row's write ended (other than in an error, which ends the round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowOutcome {
    /// Written with its files, or refused for good: nothing is left to send.
    Done,
    /// Its conflict could not be read: held back ([`state::Resend`]).
    Held,
}

#[derive(Debug, Clone)]
struct Item {
    table: String,
    id: RowId,
    write: Write,
}

impl Bridge {
    /// Writes what devices (and hub operators) changed since the cursor; moves the cursor only
    /// after Dataverse acknowledged all of it.
    pub async fn push(&self) -> Result<(), UpstreamError> {
        let (held, mut catch_up) = self.settle_intents().await?;
        self.push_waiting_files(&held).await?;
        loop {
            let (mut items, last) = self.pending(&held)?;
            if !catch_up.is_empty() {
                // Rows held back earlier go with the first batch, so their lookups are ordered
                // and relinked like the others'; a row also changed since is sent once, as now.
                let pending: BTreeSet<(&str, RowId)> =
                    items.iter().map(|i| (i.table.as_str(), i.id)).collect();
                catch_up.retain(|i| !pending.contains(&(i.table.as_str(), i.id)));
                catch_up.append(&mut items);
                items = lookup_targets_first(std::mem::take(&mut catch_up));
            }
            if items.is_empty() && last.is_none() {
                return Ok(());
            }
            let chunk = self.config.batch_size.clamp(1, BATCH_REQUESTS_MAX);
            let mut relink = Vec::new();
            for group in items.chunks(chunk) {
                self.push_group(group, &mut relink)
                    .instrument(info_span!("upstream_push", rows = group.len()))
                    .await?;
            }
            // Rows created without their lookups to rows Dataverse did not have yet (one
            // pointing at the other: an account and its primary contact) get them now.
            for (table, id) in relink {
                let item = item_of(&lock(&self.replica), &table, id)?;
                if let Some(item) = item {
                    self.push_one(item, &mut Vec::new()).await?;
                }
            }
            let Some(last) = last else {
                return Ok(()); // only held rows were written
            };
            state::set_cursor(lock(&self.replica).store(), last)?;
            debug!(cursor = last, rows = items.len(), "push acknowledged");
        }
    }

    /// Settles the writes whose reply was lost in an earlier round and finds what the rows held
    /// back from earlier pushes ([`state::Resend`]) have to write, before anything else is
    /// sent: a row with a write intent is read again (one `GET`) and merged, which says what
    /// Dataverse made of the write and clears its intent; a held row's write is then returned
    /// (one whose intent a pull already settled straight away), for the round's first batch. A
    /// row that cannot be read for good (or of a table no longer relayed) has its intent
    /// dropped. One whose read fails otherwise (a `5xx`, a row past `response_bytes_max`) keeps
    /// its intent and is held back from this round's push — the rows returned first — until it
    /// can be read: every round at first, then backing off after
    /// [`state::INTENT_READ_ATTEMPTS_MAX`] failures, never dropped. Only a failure of the whole
    /// round (Dataverse away) ends it.
    async fn settle_intents(
        &self,
    ) -> Result<(BTreeSet<(String, RowId)>, Vec<Item>), UpstreamError> {
        let (intents, marked) = {
            let hub = lock(&self.replica);
            (
                state::write_intents(hub.store())?,
                state::resends(hub.store())?,
            )
        };
        let unpulled = self.pull_before_settling_creates(&intents).await?;
        let rows: BTreeSet<(String, RowId)> = intents.into_iter().chain(marked).collect();
        let now = crate::unix_ms();
        let mut held = BTreeSet::new();
        let mut catch_up = Vec::new();
        for (table, id) in rows {
            let (intent, mark, has_base) = {
                let hub = lock(&self.replica);
                let store = hub.store();
                (
                    state::write_intent(store, &table, id)?,
                    state::resend(store, &table, id)?,
                    state::base(store, &table, id)?.is_some(),
                )
            };
            if !self.tables.contains(&table) {
                if intent.is_some() || mark.is_some() {
                    warn!(%table, %id, "a row of a table no longer relayed is not settled or written");
                    let mut w = StateWrites::default();
                    w.remove_write_intent(&table, id);
                    w.remove_resend(&table, id);
                    w.commit(lock(&self.replica).store())?;
                }
                continue;
            }
            if intent.is_none() && mark.is_none() {
                continue; // settled meanwhile (by the pull first, or an earlier row's write)
            }
            // A lost create of a table whose changes could not be pulled: a read's `404` would
            // not tell it from an office delete. Not the row's read failure.
            if intent.is_some() && !has_base && unpulled.contains(&table) {
                let unsure = UpstreamError::State(format!(
                    "{table} could not be pulled: a lost create cannot be told from a deleted row"
                ));
                self.hold_back(&table, id, &unsure, false)?;
                held.insert((table, id));
                continue;
            }
            if mark.as_ref().is_some_and(|m| m.retry_at_ms > now) {
                held.insert((table, id)); // backing off: its turn comes later
                continue;
            }
            let next = if intent.is_some() {
                let settled = self
                    .refresh(&table, id)
                    .instrument(info_span!("upstream_settle_intent", %table, %id))
                    .await;
                match settled {
                    // The read cleared the intent.
                    Ok(next) => next,
                    Err(e) if e.is_round_wide() => return Err(e),
                    Err(e) if e.is_refusal() || matches!(e, UpstreamError::BadReply(_)) => {
                        warn!(%table, %id, error = %e, "a row with a lost reply cannot be read; its write intent is dropped");
                        let mut w = StateWrites::default();
                        w.remove_write_intent(&table, id);
                        w.commit(lock(&self.replica).store())?;
                        // A held row is still written: the write says what Dataverse has.
                        item_of(&lock(&self.replica), &table, id)?
                    }
                    Err(e) => {
                        self.hold_back(&table, id, &e, true)?;
                        held.insert((table, id));
                        continue;
                    }
                }
            } else {
                item_of(&lock(&self.replica), &table, id)?
            };
            if mark.is_none() {
                continue; // its changes are still after the cursor: the push writes them
            }
            match next {
                Some(item) => catch_up.push(item),
                None => self.unmark(&table, id)?, // nothing to write (deleted on both sides)
            }
        }
        Ok((held, catch_up))
    }

    /// A create whose reply was lost, of a row Dataverse does not have now, was either never
    /// applied or applied and then deleted there (an office delete): a read (`404`) cannot tell,
    /// and taking it for never created would create the row again over the office's delete.
    /// The table's changes can (a deletion), so every relayed table with such a row (a write
    /// intent and no base) is pulled first. Returns the tables whose pull failed (not for the
    /// whole round): their creates are held back.
    async fn pull_before_settling_creates(
        &self,
        intents: &[(String, RowId)],
    ) -> Result<BTreeSet<String>, UpstreamError> {
        let mut tables = BTreeSet::new();
        {
            let hub = lock(&self.replica);
            for (table, id) in intents {
                if self.tables.contains(table) && state::base(hub.store(), table, *id)?.is_none() {
                    tables.insert(table.clone());
                }
            }
        }
        let mut unpulled = BTreeSet::new();
        for table in tables {
            match self
                .pull_table(&table)
                .instrument(info_span!("upstream_pull_before_settling", %table))
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_round_wide() => return Err(e),
                Err(e) => {
                    warn!(%table, error = %e, "pulling a table before settling its lost creates failed; they wait");
                    unpulled.insert(table);
                }
            }
        }
        Ok(unpulled)
    }

    /// Holds a row back from the push (its read failed, not for good, not for the whole round,
    /// or its table could not be pulled): its write intent is kept and its [`state::Resend`]
    /// mark saved — durably, before the push cursor moves past the row's changes — so it is
    /// written once it can be read. A failed read of the row itself (`counted`) adds to its
    /// failures; past [`state::INTENT_READ_ATTEMPTS_MAX`] of them its reads back off.
    fn hold_back(
        &self,
        table: &str,
        id: RowId,
        error: &UpstreamError,
        counted: bool,
    ) -> Result<(), UpstreamError> {
        self.stats.intents_unsettled.fetch_add(1, Ordering::Relaxed);
        let hub = lock(&self.replica);
        let mut mark = state::resend(hub.store(), table, id)?.unwrap_or_default();
        if counted {
            mark.read_failures = mark.read_failures.saturating_add(1);
            let past = mark
                .read_failures
                .saturating_sub(state::INTENT_READ_ATTEMPTS_MAX - 1);
            if past > 0 {
                let wait = self.config.file_retry_delay(past).as_millis() as u64;
                mark.retry_at_ms = crate::unix_ms().saturating_add(wait);
            }
        }
        mark.last_error = error.to_string();
        warn!(%table, %id, %error, read_failures = mark.read_failures, retry_at_ms = mark.retry_at_ms, "a row with a lost reply or a conflict cannot be read; it is held back, the others go on");
        let mut w = StateWrites::default();
        w.put_resend(table, id, &mark)?;
        w.commit(hub.store())
    }

    /// Clears a held row's [`state::Resend`] mark, if it has one: its write went through (files
    /// included) or Dataverse refused it for good.
    fn unmark(&self, table: &str, id: RowId) -> Result<(), UpstreamError> {
        let hub = lock(&self.replica);
        if state::resend(hub.store(), table, id)?.is_none() {
            return Ok(());
        }
        let mut w = StateWrites::default();
        w.remove_resend(table, id);
        w.commit(hub.store())
    }

    /// Drops the write intents of rows whose reply came and says the write was not applied (a
    /// `4xx`: refused, a conflict, a change set rolled back). A `5xx` may come from a gateway
    /// whose server did apply it, and a `2xx` (a change set whose parts do not add up) may be
    /// applied too: those intents wait for the row's next read.
    fn not_applied(&self, items: &[Item], status: u16) -> Result<(), UpstreamError> {
        if !(400..500).contains(&status) {
            return Ok(());
        }
        let mut w = StateWrites::default();
        for item in items {
            w.remove_write_intent(&item.table, item.id);
        }
        w.commit(lock(&self.replica).store())
    }

    /// The rows changed after the cursor (in log order, once each, but for those `held` back)
    /// and the last entry read.
    fn pending(
        &self,
        held: &BTreeSet<(String, RowId)>,
    ) -> Result<(Vec<Item>, Option<u64>), UpstreamError> {
        let hub = lock(&self.replica);
        let store = hub.store();
        let cursor = state::cursor(store)?;
        let entries = store.ops_since(cursor, ENTRIES_PER_ROUND)?;
        let last = entries.last().map(|e| e.seq);
        let mut seen = BTreeSet::new();
        let mut items = Vec::new();
        for e in entries {
            if e.actor == DATAVERSE_ACTOR || !self.tables.contains(&e.table) {
                continue; // never echo back what came from Dataverse
            }
            let row = (e.table.clone(), e.row);
            if held.contains(&row) || !seen.insert(row) {
                continue;
            }
            if let Some(item) = item_of(&hub, &e.table, e.row)? {
                items.push(item);
            }
        }
        Ok((lookup_targets_first(items), last))
    }

    async fn push_group(
        &self,
        group: &[Item],
        relink: &mut Vec<(String, RowId)>,
    ) -> Result<(), UpstreamError> {
        // Rows whose body would change nothing send only their files.
        let mut writing = Vec::with_capacity(group.len());
        let mut requests = Vec::with_capacity(group.len());
        let mut files_only = Vec::new();
        {
            let hub = lock(&self.replica);
            for item in group {
                match request_of(&hub, item)? {
                    Some(req) => {
                        writing.push(item.clone());
                        requests.push(req);
                    }
                    None => files_only.push(item),
                }
            }
        }
        for item in files_only {
            self.push_files_of(item).await?;
            self.unmark(&item.table, item.id)?;
        }
        let group = writing.as_slice();
        if group.len() > 1 {
            self.note_intents(group)?;
            let outcome = self.client.change_set(&requests).await;
            match self.reply_lost(outcome)? {
                BatchOutcome::Applied(responses) => {
                    let tables = {
                        let mut hub = lock(&self.replica);
                        let mut merger = Merger::new(hub.store().schema())?;
                        let mut writes = StateWrites::default();
                        for (item, resp) in group.iter().zip(&responses) {
                            record(&hub, &mut writes, &mut merger, item, resp)?;
                        }
                        let tables = merger.apply(&mut hub)?;
                        writes.commit(hub.store())?;
                        tables
                    };
                    self.changed(&tables);
                    self.stats
                        .rows_pushed
                        .fetch_add(group.len() as u64, Ordering::Relaxed);
                    for item in group {
                        self.push_files_of(item).await?;
                        self.unmark(&item.table, item.id)?;
                    }
                    return Ok(());
                }
                BatchOutcome::Failed(resp) => {
                    // The change set was rolled back as a whole: find the culprit row by row.
                    self.not_applied(group, resp.status)?;
                    self.stats
                        .failed_change_sets
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(
                        status = resp.status,
                        "change set failed; writing one by one"
                    );
                    if resp.status == 429 || resp.status >= 500 {
                        return Err(resp.error());
                    }
                }
            }
        }
        for item in group {
            self.push_one(item.clone(), relink).await?;
        }
        Ok(())
    }

    /// Writes one row (see [`Bridge::write_row`]); a held row's mark is cleared once that is
    /// done, unless the row was held back again.
    async fn push_one(
        &self,
        item: Item,
        relink: &mut Vec<(String, RowId)>,
    ) -> Result<(), UpstreamError> {
        let (table, id) = (item.table.clone(), item.id);
        match self.write_row(item, relink).await? {
            RowOutcome::Done => self.unmark(&table, id),
            RowOutcome::Held => Ok(()),
        }
    }

    /// Writes one row; on `412` re-reads it, merges it as a Dataverse op and writes again. Done
    /// once written with its files or refused for good; held back if the re-read failed.
    async fn write_row(
        &self,
        mut item: Item,
        relink: &mut Vec<(String, RowId)>,
    ) -> Result<RowOutcome, UpstreamError> {
        for _ in 0..CONFLICT_RETRIES {
            let Some(req) = request_of(&lock(&self.replica), &item)? else {
                // Nothing the row's body would change (a file-only edit, a value written
                // again, a merge Dataverse won): no request, only its files.
                self.push_files_of(&item).await?;
                return Ok(RowOutcome::Done);
            };
            self.note_intents(std::slice::from_ref(&item))?;
            let resp = self.reply_lost(self.client.send(&req).await)?;
            if resp.is_success() || (resp.status == 404 && matches!(item.write, Write::Delete)) {
                let tables = {
                    let mut hub = lock(&self.replica);
                    let mut merger = Merger::new(hub.store().schema())?;
                    let mut writes = StateWrites::default();
                    record(&hub, &mut writes, &mut merger, &item, &resp)?;
                    let tables = merger.apply(&mut hub)?;
                    writes.commit(hub.store())?;
                    tables
                };
                self.changed(&tables);
                self.stats.rows_pushed.fetch_add(1, Ordering::Relaxed);
                self.push_files_of(&item).await?;
                return Ok(RowOutcome::Done);
            }
            self.not_applied(std::slice::from_ref(&item), resp.status)?;
            let err = resp.error();
            match resp.status {
                // A create that finds nothing is not a delete: a lookup names a row Dataverse
                // does not have (refused, or not written yet).
                404 if matches!(item.write, Write::Create { .. }) => {
                    // Created first without its lookups to rows Dataverse does not have yet
                    // (written later this round, or in a cycle); they follow in an update.
                    let without = without_lookups_to_new_rows(&lock(&self.replica), &item)?;
                    match without {
                        Some(values) if !relink.contains(&(item.table.clone(), item.id)) => {
                            relink.push((item.table.clone(), item.id));
                            item.write = Write::Create { values };
                        }
                        _ => {
                            self.refused(&item.table, item.id, &err);
                            return Ok(RowOutcome::Done);
                        }
                    }
                }
                412 | 404 => {
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    let sent = etag_of(&item).map(str::to_string);
                    let refreshed = match self.refresh(&item.table, item.id).await {
                        Ok(r) => r,
                        // The row as Dataverse has it cannot be read (refused, malformed):
                        // this row waits for its next change, the others go on.
                        Err(e) if e.is_refusal() || matches!(e, UpstreamError::BadReply(_)) => {
                            self.refused(&item.table, item.id, &e);
                            return Ok(RowOutcome::Done);
                        }
                        Err(e) if e.is_round_wide() => return Err(e),
                        // It may be read later (a `5xx`): held back until then, the others
                        // go on.
                        Err(e) => {
                            self.hold_back(&item.table, item.id, &e, true)?;
                            return Ok(RowOutcome::Held);
                        }
                    };
                    match refreshed {
                        // 404 for a row Dataverse still has, unchanged: a lookup to a row
                        // it does not have. Writing again would get the same answer.
                        Some(next) if resp.status == 404 && etag_of(&next) == sent.as_deref() => {
                            self.refused(&next.table, next.id, &err);
                            return Ok(RowOutcome::Done);
                        }
                        Some(next) => item = next,
                        None => return Ok(RowOutcome::Done), // nothing left to write
                    }
                }
                _ if err.is_refusal() => {
                    self.refused(&item.table, item.id, &err);
                    return Ok(RowOutcome::Done);
                }
                _ => return Err(err),
            }
        }
        Err(UpstreamError::BadReply(format!(
            "{} {} kept changing upstream ({CONFLICT_RETRIES} conflicts in a row)",
            item.table, item.id
        )))
    }

    /// Saves what the hub is about to ask Dataverse to hold for these rows, before it asks:
    /// if the reply is lost, the row's next read tells the hub's write from a change made in
    /// Dataverse ([`state::WriteIntent`]). Deletes need none (a repeated delete finds `404`).
    fn note_intents(&self, items: &[Item]) -> Result<(), UpstreamError> {
        let hub = lock(&self.replica);
        let schema = hub.store().schema();
        let mut writes = StateWrites::default();
        for item in items {
            let tab = schema.table(&item.table)?;
            let sent = match &item.write {
                Write::Create { values } => map::synced(tab)
                    .map(|c| {
                        let v = values.get(&c.name).cloned().unwrap_or(Value::Null);
                        (c.name.clone(), v)
                    })
                    .collect(),
                Write::Update { values, base, .. } => map::synced(tab)
                    .filter_map(|c| {
                        let v = values.get(&c.name).unwrap_or(&Value::Null);
                        (v != base.get(&c.name).unwrap_or(&Value::Null))
                            .then(|| (c.name.clone(), v.clone()))
                    })
                    .collect(),
                Write::Delete => continue,
            };
            // An earlier write whose reply was lost may be the one Dataverse holds: kept.
            let mut intent =
                state::write_intent(hub.store(), &item.table, item.id)?.unwrap_or_default();
            intent.add(sent);
            writes.put_write_intent(&item.table, item.id, &intent)?;
        }
        writes.commit(hub.store())
    }

    /// A request whose reply did not come back (the connection failed once it was sent) may
    /// or may not have been applied: counted, and the round fails with the write intents kept
    /// (also when no connection was made: nothing was applied, and the next read says so).
    fn reply_lost<T>(&self, sent: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        if let Err(e @ UpstreamError::Unreachable(_)) = &sent {
            self.stats.replies_lost.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "a write's reply was lost: the row's next read decides what Dataverse holds");
        }
        sent
    }

    /// A write Dataverse refused for good (a bad value, a missing privilege, a lookup to a row
    /// it does not have): keeping it would block every later write, so it is logged, counted
    /// and skipped. The row is written again with its next change.
    pub(crate) fn refused(&self, table: &str, row: RowId, err: &UpstreamError) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!(%table, %row, error = %err, "Dataverse refused a write; skipped");
    }

    /// Sends a written row's files; one Dataverse refuses for good is logged and skipped (a
    /// later round must not stop on it), a failure that may pass ends the round.
    async fn push_files_of(&self, item: &Item) -> Result<(), UpstreamError> {
        if matches!(item.write, Write::Delete) {
            return Ok(());
        }
        match self.push_files(&item.table, item.id).await {
            Err(e) if e.is_refusal() => {
                self.refused(&item.table, item.id, &e);
                Ok(())
            }
            other => other,
        }
    }

    /// Reads one row (one `GET`) and merges it into the hub as a Dataverse op, or deletes it if
    /// Dataverse no longer has it.
    pub async fn pull_row(&self, table: &str, id: RowId) -> Result<(), UpstreamError> {
        self.refresh(table, id).await.map(|_| ())
    }

    /// Re-reads a row after a conflict, merges it into the hub as a Dataverse op (or deletes
    /// it if Dataverse did), and says what to write now.
    async fn refresh(&self, table: &str, id: RowId) -> Result<Option<Item>, UpstreamError> {
        let row = match self.read_row(table, id).await? {
            Some(row) => {
                let mut rows = vec![row];
                self.fetch_files(table, &mut rows).await?;
                Some(rows)
            }
            None => None,
        };
        let mut hub = lock(&self.replica);
        let tables = match &row {
            Some(rows) => self.apply_page(&mut hub, table, rows, &[], None)?,
            // Deleted upstream while the hub changed it: Dataverse, the system of record, wins.
            None if state::base(hub.store(), table, id)?.is_some() => {
                self.apply_page(&mut hub, table, &[], &[id], None)?
            }
            // Never in Dataverse (a create that did not arrive — a lost create deleted there
            // since was found by the table's pull before settling): left to the push.
            None => {
                let mut w = StateWrites::default();
                w.remove_write_intent(table, id);
                w.commit(hub.store())?;
                self.apply_page(&mut hub, table, &[], &[], None)?
            }
        };
        let next = item_of(&hub, table, id)?;
        drop(hub);
        self.changed(&tables);
        Ok(next)
    }
}

/// A create's values without its lookups to rows Dataverse does not have (no base: not
/// written there yet); `None` if it has no such lookup.
fn without_lookups_to_new_rows(
    hub: &fieldsync_replication::replica::HubReplica,
    item: &Item,
) -> Result<Option<BTreeMap<String, Value>>, UpstreamError> {
    let Write::Create { values } = &item.write else {
        return Ok(None);
    };
    let store = hub.store();
    let tab = store.schema().table(&item.table)?;
    let mut kept = values.clone();
    for c in &tab.columns {
        let (Some(target), Some(Value::Lookup(to))) = (&c.target, values.get(&c.name)) else {
            continue;
        };
        if state::base(store, target, *to)?.is_none() {
            kept.remove(&c.name);
        }
    }
    Ok((kept.len() < values.len()).then_some(kept))
}

fn etag_of(item: &Item) -> Option<&str> {
    match &item.write {
        Write::Update { etag, .. } => Some(etag),
        _ => None,
    }
}

/// `items` with every row a lookup of another names (and that is created in this round)
/// before it: Dataverse refuses a lookup to a row it does not have yet. Otherwise in log
/// order; a cycle keeps log order.
fn lookup_targets_first(items: Vec<Item>) -> Vec<Item> {
    // Only rows being created: a row being deleted is no lookup's target.
    let position: BTreeMap<RowId, usize> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| matches!(it.write, Write::Create { .. }))
        .map(|(i, it)| (it.id, i))
        .collect();
    let targets = |it: &Item| -> Vec<usize> {
        match &it.write {
            Write::Create { values } | Write::Update { values, .. } => values
                .values()
                .filter_map(|v| match v {
                    Value::Lookup(id) => position.get(id).copied(),
                    _ => None,
                })
                .collect(),
            Write::Delete => Vec::new(),
        }
    };
    let mut order = Vec::with_capacity(items.len());
    let mut state = vec![0u8; items.len()]; // 0 new, 1 visiting, 2 placed
    for start in 0..items.len() {
        let mut stack = vec![(start, false)];
        while let Some((i, expanded)) = stack.pop() {
            if expanded {
                state[i] = 2;
                order.push(i);
                continue;
            }
            if state[i] != 0 {
                continue;
            }
            state[i] = 1;
            stack.push((i, true));
            for t in targets(&items[i]).into_iter().rev() {
                if t != i && state[t] == 0 {
                    stack.push((t, false));
                }
            }
        }
    }
    let mut slots: Vec<Option<Item>> = items.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
        .collect()
}

fn item_of(
    hub: &fieldsync_replication::replica::HubReplica,
    table: &str,
    id: RowId,
) -> Result<Option<Item>, UpstreamError> {
    let store = hub.store();
    let base = state::base(store, table, id)?;
    let write = match (store.get(table, id)?, base) {
        (Some(row), Some(b)) => Write::Update {
            etag: b.etag,
            values: row.values,
            base: b.values,
        },
        (Some(row), None) => Write::Create { values: row.values },
        (None, Some(_)) => Write::Delete,
        (None, None) => return Ok(None), // never reached Dataverse: nothing to undo
    };
    Ok(Some(Item {
        table: table.to_string(),
        id,
        write,
    }))
}

/// The request that writes `item`; `None` for an update whose body would have no column.
fn request_of(
    hub: &fieldsync_replication::replica::HubReplica,
    item: &Item,
) -> Result<Option<ApiRequest>, UpstreamError> {
    let schema = hub.store().schema();
    let tab = schema.table(&item.table)?;
    let path = format!("{}({})", tab.entity_set, item.id);
    Ok(Some(match &item.write {
        Write::Create { values } => ApiRequest::new(Method::PATCH, path)
            .header("If-None-Match", "*")
            .header("Prefer", "return=representation")
            .json(map::to_wire(schema, tab, values)?),
        Write::Update { etag, values, base } => {
            let body = map::changes_to_wire(schema, tab, values, base)?;
            if body.as_object().is_some_and(|m| m.is_empty()) {
                return Ok(None);
            }
            ApiRequest::new(Method::PATCH, path)
                .header("If-Match", etag.clone())
                .header("Prefer", "return=representation")
                .json(body)
        }
        Write::Delete => ApiRequest::new(Method::DELETE, path),
    }))
}

/// Records what Dataverse now has for a written row: the returned row, or (without a body)
/// what was sent and the `ETag` header.
fn record(
    hub: &fieldsync_replication::replica::HubReplica,
    writes: &mut StateWrites,
    merger: &mut Merger,
    item: &Item,
    resp: &ApiResponse,
) -> Result<(), UpstreamError> {
    // The reply came: what Dataverse holds is known.
    writes.remove_write_intent(&item.table, item.id);
    let values = match &item.write {
        Write::Delete => {
            writes.remove_base(&item.table, item.id);
            return Ok(());
        }
        Write::Create { values } | Write::Update { values, .. } => values,
    };
    let tab = hub.store().schema().table(&item.table)?;
    let returned = serde_json::from_slice::<J>(&resp.body)
        .ok()
        .and_then(|b| b.as_object().and_then(|m| map::from_wire(tab, m).ok()));
    let base = match returned {
        Some(row) => {
            // Columns Dataverse set itself (the owner of a create, the business unit) come
            // back to the hub; its timestamps do not count as a change.
            let mut sent = map::relayed(tab, values);
            for stamp in ["createdon", "modifiedon"] {
                match row.values.get(stamp) {
                    Some(v) => sent.insert(stamp.to_string(), v.clone()),
                    None => sent.remove(stamp),
                };
            }
            // A value Dataverse holds that the hub's schema refuses stays the hub's, in the
            // base too, so the hub never writes it back.
            let (upstream, refused) =
                map::within_schema(tab, row.values, || Ok::<_, UpstreamError>(values.clone()))?;
            if !refused.is_empty() {
                warn!(table = %item.table, row = %item.id, columns = ?refused, "Dataverse holds values the hub's schema refuses; kept the hub's");
            }
            match merger.upsert(
                hub.store(),
                &item.table,
                item.id,
                &upstream,
                Some(&sent),
                &[],
            ) {
                Ok(_) => {}
                // What Dataverse set itself cannot be written to the hub (a change too large
                // for it): the write stands, the hub keeps its own values.
                Err(error) if error.is_hub_refusal() => {
                    warn!(table = %item.table, row = %item.id, %error, "Dataverse returned values the hub cannot take; kept the hub's");
                }
                Err(e) => return Err(e),
            }
            Base {
                etag: row.etag,
                values: upstream,
                files: kept_files(hub, item, &row.files)?,
            }
        }
        None => Base {
            etag: resp
                .header("etag")
                .ok_or_else(|| UpstreamError::BadReply("a write answered without an etag".into()))?
                .to_string(),
            values: map::relayed(tab, values),
            files: state::base(hub.store(), &item.table, item.id)?
                .map(|b| b.files)
                .unwrap_or_default(),
        },
    };
    writes.put_base(&item.table, item.id, &base)
}

/// The file states of the row's previous base that still hold (same file id upstream), and
/// those of columns whose newer file has not come down yet (a pending download): the hub still
/// holds the previous content, so the base keeps its state, or the push would take that
/// content for the hub's change and send it back over Dataverse's newer file.
fn kept_files(
    hub: &fieldsync_replication::replica::HubReplica,
    item: &Item,
    ids: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, state::FileState>, UpstreamError> {
    let store = hub.store();
    let Some(base) = state::base(store, &item.table, item.id)? else {
        return Ok(BTreeMap::new());
    };
    let mut kept = base.files_kept(ids);
    if let Some(pending) = state::pending_download(store, &item.table, item.id)? {
        for col in pending.columns.keys() {
            if let Some(known) = base.files.get(col) {
                kept.insert(col.clone(), known.clone());
            }
        }
    }
    Ok(kept)
}
