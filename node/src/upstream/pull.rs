//! Pull with change tracking (`use-change-tracking-synchronize-data-external-systems.md`).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use fieldsync_replication::replica::FeedChanges;
use fieldsync_store::RowId;
use reqwest::Method;
use serde_json::Value as J;
use tracing::{debug, info, info_span, warn, Instrument};

use super::client::{ApiRequest, CHANGE_TRACKING_EXPIRED};
use super::state::{self, Base, StateWrites};
use super::{lock, map, Bridge, Merged, Merger, UpstreamError};

/// One entry of a change-tracking page.
enum Entry {
    Row(map::WireRow),
    Deleted(RowId),
}

/// A page's rows and deletions, and how many entries could not be read (skipped).
fn entries(table: &fieldsync_store::Table, page: &J) -> Result<(Vec<Entry>, u64), UpstreamError> {
    let value = page
        .get("value")
        .and_then(J::as_array)
        .ok_or_else(|| UpstreamError::BadReply("a page without `value`".into()))?;
    let mut skipped = 0;
    let list = value
        .iter()
        .map(|item| {
            let m = item
                .as_object()
                .ok_or_else(|| UpstreamError::BadReply("a page entry is not an object".into()))?;
            let deleted = m
                .get("@odata.context")
                .and_then(J::as_str)
                .is_some_and(|c| c.ends_with("$deletedEntity"))
                || m.get("reason").and_then(J::as_str) == Some("deleted");
            if deleted {
                let id = m
                    .get("id")
                    .and_then(J::as_str)
                    .and_then(|s| uuid::Uuid::parse_str(s).ok())
                    .ok_or_else(|| UpstreamError::BadReply("$deletedEntity without id".into()))?;
                Ok(Entry::Deleted(id))
            } else {
                Ok(Entry::Row(map::from_wire(table, m)?))
            }
        })
        .filter_map(|e: Result<Entry, UpstreamError>| match e {
            Ok(e) => Some(e),
            Err(error) => {
                warn!(table = %table.name, %error, "a row from Dataverse cannot be read; skipped");
                skipped += 1;
                None
            }
        })
        .collect();
    Ok((list, skipped))
}

impl Bridge {
    /// Pulls every relayed table. A table whose rows or replies fail does not hold up the
    /// others; the round still fails (with the first error) so it is retried with backoff.
    pub async fn pull(&self) -> Result<(), UpstreamError> {
        let pulled = self.pull_tables().await;
        let counted = self.tidy_pending_downloads();
        pulled.and(counted)
    }

    /// Drops the pending downloads of tables no longer relayed (nothing would retry them) and
    /// counts the others for the `pending_download_rows` gauge. Such a table's delta link goes
    /// too: were it relayed again, a full read must find those files (the changes after its
    /// link would not hold those rows, and a later device edit would send the old file back).
    fn tidy_pending_downloads(&self) -> Result<(), UpstreamError> {
        let hub = lock(&self.replica);
        let mut writes = StateWrites::default();
        let mut pending = 0u64;
        for (table, id) in state::pending_download_rows(hub.store())? {
            if self.tables.contains(&table) {
                pending += 1;
            } else {
                info!(%table, %id, "a pending download of a table no longer relayed is dropped; the table's next pull is a full read");
                writes.remove_pending_download(&table, id);
                writes.set_delta_link(&table, None);
            }
        }
        writes.commit(hub.store())?;
        self.stats
            .pending_download_rows
            .store(pending, Ordering::Relaxed);
        Ok(())
    }

    async fn pull_tables(&self) -> Result<(), UpstreamError> {
        let mut first_error = None;
        for table in self.tables.clone() {
            let pulled = self
                .pull_table(&table)
                .instrument(info_span!("upstream_pull", %table))
                .await;
            match pulled {
                Ok(()) => {}
                // Dataverse itself is away, refusing us or asking to wait: so is every table.
                Err(e) if e.is_round_wide() => return Err(e),
                Err(e) => {
                    warn!(%table, error = %e, "pulling the table failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn prefer(&self, page_size: usize) -> String {
        format!(
            "odata.track-changes, odata.maxpagesize={}",
            page_size.clamp(1, 5000)
        )
    }

    /// Pulls one table: from its delta link, or a full read when there is none or it expired.
    pub async fn pull_table(&self, table: &str) -> Result<(), UpstreamError> {
        let (set, select, link) = {
            let hub = lock(&self.replica);
            let tab = hub.store().schema().table(table)?;
            (
                tab.entity_set.clone(),
                map::select(tab),
                state::delta_link(hub.store(), table)?,
            )
        };
        let read = async {
            if let Some(link) = link {
                match self.read_pages(table, &link, false).await {
                    Err(UpstreamError::Api { code, .. }) if code == CHANGE_TRACKING_EXPIRED => {
                        info!(table, "change-tracking token expired: full re-read");
                        self.stats.full_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    other => return other,
                }
            }
            self.read_pages(table, &format!("{set}?$select={select}"), true)
                .await
        };
        let read = read.await;
        // Files that did not come down before are tried again whatever this read did, unless
        // Dataverse is away altogether.
        if read.as_ref().is_err_and(UpstreamError::is_round_wide) {
            return read;
        }
        let retried = self.retry_downloads(table).await;
        read.and(retried)
    }

    /// Follows `@odata.nextLink` from `first` to the delta link, applying each page. A full
    /// read then deletes rows known upstream that it did not see.
    async fn read_pages(&self, table: &str, first: &str, full: bool) -> Result<(), UpstreamError> {
        let mut url = first.to_string();
        let mut seen: BTreeSet<RowId> = BTreeSet::new();
        // A full read that could not read every entry cannot say which rows are gone.
        let mut unread = 0u64;
        // Rows with large columns can make a page outgrow `response_bytes_max`: the same page
        // is then asked for again with half as many rows, down to one.
        let mut page_size = self.config.page_size;
        loop {
            let req =
                ApiRequest::new(Method::GET, url.clone()).header("Prefer", self.prefer(page_size));
            let resp = match self.client.send(&req).await {
                Err(UpstreamError::ResponseTooLarge { limit }) if page_size > 1 => {
                    page_size /= 2;
                    warn!(
                        table,
                        limit, page_size, "a page was too large; asking for fewer rows"
                    );
                    continue;
                }
                other => other?,
            };
            if !resp.is_success() {
                return Err(resp.error());
            }
            let page = resp.json()?;
            let next = page
                .get("@odata.nextLink")
                .and_then(J::as_str)
                .map(String::from);
            let delta = page
                .get("@odata.deltaLink")
                .and_then(J::as_str)
                .map(String::from);
            let (mut rows, deletions) = {
                let hub = lock(&self.replica);
                let tab = hub.store().schema().table(table)?.clone();
                let (list, skipped) = entries(&tab, &page)?;
                self.stats
                    .rows_skipped
                    .fetch_add(skipped, Ordering::Relaxed);
                unread += skipped;
                if full {
                    seen.extend(list.iter().map(|e| match e {
                        Entry::Row(r) => r.id,
                        Entry::Deleted(id) => *id,
                    }));
                }
                let mut deletions = Vec::new();
                let mut rows = Vec::new();
                for e in list {
                    match e {
                        Entry::Row(r) => rows.push(r),
                        Entry::Deleted(id) => deletions.push(id),
                    }
                }
                if next.is_none() && full && unread > 0 {
                    warn!(
                        table,
                        unread,
                        "entries of a full read could not be read: no row is taken for deleted"
                    );
                } else if next.is_none() && full {
                    // The last page of a full read: whatever is known upstream and was not
                    // seen was deleted while the hub was not looking.
                    for id in state::known_ids(hub.store(), table)? {
                        if !seen.contains(&id) {
                            deletions.push(id);
                        }
                    }
                }
                (rows, deletions)
            };
            self.fetch_files(table, &mut rows).await?;
            let link = if next.is_none() {
                delta.as_deref()
            } else {
                None
            };
            let tables = {
                let mut hub = lock(&self.replica);
                self.apply_page(&mut hub, table, &rows, &deletions, link)?
            };
            self.changed(&tables);
            match next {
                Some(n) => url = n,
                None if delta.is_some() => return Ok(()),
                None => {
                    return Err(UpstreamError::BadReply(
                        "the last page has no @odata.deltaLink (is change tracking enabled?)"
                            .into(),
                    ))
                }
            }
        }
    }

    /// Reads one row as Dataverse has it now (`None`: it does not exist).
    pub(crate) async fn read_row(
        &self,
        table: &str,
        id: RowId,
    ) -> Result<Option<map::WireRow>, UpstreamError> {
        let (set, select, tab) = {
            let hub = lock(&self.replica);
            let tab = hub.store().schema().table(table)?.clone();
            (tab.entity_set.clone(), map::select(&tab), tab)
        };
        let resp = self
            .client
            .send(&ApiRequest::new(
                Method::GET,
                format!("{set}({id})?$select={select}"),
            ))
            .await?;
        if resp.status == 404 {
            return Ok(None);
        }
        if !resp.is_success() {
            return Err(resp.error());
        }
        let body = resp.json()?;
        let obj = body
            .as_object()
            .ok_or_else(|| UpstreamError::BadReply("a row that is not an object".into()))?;
        map::from_wire(&tab, obj).map(Some)
    }

    /// Applies one page's rows and deletions to the hub, then (only then) records their bases
    /// and, on the last page, the delta link.
    pub(crate) fn apply_page(
        &self,
        hub: &mut fieldsync_replication::replica::HubReplica,
        table: &str,
        rows: &[map::WireRow],
        deletions: &[RowId],
        delta_link: Option<&str>,
    ) -> Result<FeedChanges, UpstreamError> {
        let mut merger = Merger::new(hub.store().schema())?;
        let tab = hub.store().schema().table(table)?.clone();
        let mut writes = StateWrites::default();
        let mut pulled = 0u64;
        let mut deleted = 0u64;
        for row in rows {
            if row.downloads_done {
                writes.remove_pending_download(table, row.id);
            }
            let base = state::base(hub.store(), table, row.id)?;
            // A write whose reply was lost: this read says what Dataverse made of it.
            let intent = state::write_intent(hub.store(), table, row.id)?;
            if intent.is_some() {
                writes.remove_write_intent(table, row.id);
            }
            if base.as_ref().is_some_and(|b| b.etag == row.etag) && row.file_writes.is_empty() {
                continue; // this version is known (pulled before, or written by the hub)
            }
            // A value the hub's schema refuses (a choice option added in Dataverse since) is
            // taken as unchanged — the last known one, else the hub's — in the base too, so
            // the hub never writes it back: the row's other columns still come in.
            let (values, refused) = map::within_schema(&tab, row.values.clone(), || {
                Ok::<_, UpstreamError>(match &base {
                    Some(b) => b.values.clone(),
                    None => hub
                        .store()
                        .get(table, row.id)?
                        .map(|r| r.values)
                        .unwrap_or_default(),
                })
            })?;
            if !refused.is_empty() {
                warn!(table, row = %row.id, columns = ?refused, "values from Dataverse the hub's schema refuses are left as they were");
                self.stats.rows_skipped.fetch_add(1, Ordering::Relaxed);
            }
            // The columns Dataverse holds as the hub sent them are the hub's own write, not
            // Dataverse's change: the hub's later edits of them stand.
            let merge_base = match &intent {
                Some(i) => Some(i.resolve(base.as_ref().map(|b| &b.values), &values)),
                None => base.as_ref().map(|b| b.values.clone()),
            };
            match merger.upsert(
                hub.store(),
                table,
                row.id,
                &values,
                merge_base.as_ref(),
                &row.file_writes,
            ) {
                Ok(Merged::Written) => pulled += 1,
                Ok(Merged::Unchanged | Merged::DeletedHere) => {}
                // Any other write the hub refuses (a change too large for it): this version
                // is skipped, so one row does not stop the table's pull. The hub keeps what it
                // knew of the row, at the version Dataverse has now, so a write from a device
                // is not refused as a conflict forever.
                Err(error) if error.is_hub_refusal() => {
                    warn!(table, row = %row.id, %error, "a row from Dataverse has a value the hub refuses; skipped");
                    self.stats.rows_skipped.fetch_add(1, Ordering::Relaxed);
                    if let Some(b) = &base {
                        writes.put_base(
                            table,
                            row.id,
                            &Base {
                                etag: row.etag.clone(),
                                values: b.values.clone(),
                                files: b.files.clone(),
                            },
                        )?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            // Files not downloaded this time keep their known state while their id is the same.
            let mut files = row.file_states.clone();
            if let Some(b) = &base {
                for (col, st) in b.files_kept(&row.files) {
                    files.entry(col).or_insert(st);
                }
            }
            writes.put_base(
                table,
                row.id,
                &Base {
                    etag: row.etag.clone(),
                    values,
                    files,
                },
            )?;
        }
        for id in deletions {
            if merger.delete(hub.store(), table, *id)? {
                deleted += 1;
            }
            writes.remove_base(table, *id);
            writes.remove_pending_download(table, *id);
            writes.remove_write_intent(table, *id);
        }
        if let Some(link) = delta_link {
            writes.set_delta_link(table, Some(link));
        }
        let tables = merger.apply(hub)?;
        writes.commit(hub.store())?;
        self.stats.rows_pulled.fetch_add(pulled, Ordering::Relaxed);
        self.stats
            .rows_deleted
            .fetch_add(deleted, Ordering::Relaxed);
        debug!(table, rows = rows.len(), pulled, deleted, "page applied");
        Ok(tables)
    }
}
