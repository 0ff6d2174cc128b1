//! The device: a [`DeviceSession`] over its [`DeviceReplica`] as a [`FrameSession`], the
//! connect/reconnect loop of `device sync`, and the bootstrap fetch of `device init`.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fieldsync_replication::credential::Credential;
use fieldsync_replication::proto::{
    CloseCode, DeviceEvent, DeviceSession, DeviceState, DeviceStorage, Millis,
};
use fieldsync_replication::replica::DeviceReplica;
use fieldsync_replication::transport::{
    codes, connect_with_credential, drive_session, open_bi_framed, AuthError, CloseReason,
    ConnectionLimits, FrameFormat, FrameSession, LinkError, SessionClock,
};
use fieldsync_replication::wire;
use tracing::{info, warn};

use super::{Bootstrap, BOOTSTRAP_MAX_BYTES, BOOTSTRAP_REQUEST};

/// What one `device sync` run did, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct SyncReport {
    /// Local ops the hub processed.
    pub pushed_up_to: u64,
    /// Rejections received (each is now a sync error).
    pub rejected: Vec<String>,
    /// Changes applied from the hub.
    pub ops_in: usize,
    /// Rows that entered the device's set.
    pub entering: usize,
    /// Rows that left it.
    pub leaving: usize,
    /// Tables that reached the end of their feed.
    pub tables_synced: usize,
    /// Tables whose feed the hub restarted (this device was fed from a log the hub's store
    /// does not hold: restored from a backup).
    pub feeds_restarted: Vec<String>,
    /// Attachments uploaded to the hub.
    pub files_up: usize,
    /// Files and images downloaded.
    pub files_down: usize,
    /// Attachments the hub refused (each with its message).
    pub files_refused: Vec<String>,
    /// The hub refused the device (fatal).
    pub refused: Option<String>,
    /// The session ended with an error code.
    pub failed: Option<String>,
}

/// A [`DeviceSession`] over the device's replica, as the transport driver sees it.
#[derive(Debug)]
pub struct DeviceAdapter<'a> {
    session: &'a mut DeviceSession,
    storage: &'a mut DeviceReplica,
    out: VecDeque<Vec<u8>>,
    once: bool,
    done: bool,
    report: &'a mut SyncReport,
}

impl<'a> DeviceAdapter<'a> {
    /// Wraps the session and storage for one connection.
    pub fn new(
        session: &'a mut DeviceSession,
        storage: &'a mut DeviceReplica,
        once: bool,
        report: &'a mut SyncReport,
    ) -> Self {
        DeviceAdapter {
            session,
            storage,
            out: VecDeque::new(),
            once,
            done: false,
            report,
        }
    }

    /// Whether a `--once` run finished its work.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Collects what the session has to send and its events; in `--once` mode closes the
    /// session once everything is pushed and every table pulled to the end.
    pub fn settle(&mut self, now: Millis) {
        loop {
            while let Some(msg) = self.session.poll_transmit(now) {
                match wire::encode(&msg) {
                    Ok(frame) => self.out.push_back(frame),
                    Err(e) => warn!(error = %e, msg = msg.name(), "cannot encode a message"),
                }
            }
            while let Some(ev) = self.session.poll_event() {
                record_event(self.report, ev);
            }
            if self.once && !self.done && self.session.state() == DeviceState::Ready {
                let pending = match (self.storage.last_local_seq(), self.storage.acked_seq()) {
                    (Ok(last), Ok(acked)) => last > acked,
                    _ => true,
                };
                if self.session.is_quiet() && !pending {
                    self.done = true;
                    self.session.close(now, CloseCode::NORMAL, "sync complete");
                    continue;
                }
            }
            break;
        }
    }
}

fn record_event(report: &mut SyncReport, ev: DeviceEvent) {
    match ev {
        DeviceEvent::Connected { user, .. } => info!(%user, "connected to the hub"),
        DeviceEvent::Refused { code, message } => {
            report.refused = Some(format!("the hub refused this device: {message} ({code})"));
        }
        DeviceEvent::PushAcked {
            up_to_seq,
            rejected,
        } => {
            report.pushed_up_to = report.pushed_up_to.max(up_to_seq);
            for r in rejected {
                report.rejected.push(format!(
                    "{:?} {} {} rejected ({:?}): {}",
                    r.operation, r.table, r.row, r.kind, r.message
                ));
            }
        }
        DeviceEvent::BatchApplied {
            ops,
            entering,
            leaving,
            ..
        } => {
            report.ops_in += ops;
            report.entering += entering;
            report.leaving += leaving;
        }
        DeviceEvent::TableSynced { .. } => report.tables_synced += 1,
        DeviceEvent::FeedRestarted { table, .. } => {
            if !report.feeds_restarted.contains(&table) {
                report.feeds_restarted.push(table);
            }
        }
        DeviceEvent::BlobUploaded { .. } => report.files_up += 1,
        DeviceEvent::BlobComplete { .. } => report.files_down += 1,
        DeviceEvent::BlobUploadRefused { sha256, message } => report
            .files_refused
            .push(format!("{}: {message}", hex::encode(sha256))),
        DeviceEvent::Closed {
            code,
            reason,
            by_peer,
        } => {
            if code != CloseCode::NORMAL {
                report.failed = Some(format!(
                    "session closed by {}: {reason} ({code})",
                    if by_peer { "the hub" } else { "this device" }
                ));
            }
        }
        DeviceEvent::StorageFailed { error } => {
            report.failed = Some(format!("device storage failed: {error}"));
        }
        other => tracing::debug!(?other, "device event"),
    }
}

impl FrameSession for DeviceAdapter<'_> {
    fn handle_frame(&mut self, now_ms: u64, bytes: &[u8]) -> Result<(), CloseReason> {
        let now = Millis(now_ms);
        match wire::decode(bytes) {
            Ok((msg, _)) => self.session.handle_message(now, msg, self.storage),
            Err(e) => self.session.handle_wire_error(now, &e),
        }
        self.settle(now);
        Ok(())
    }

    fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.session.poll_timeout().map(|m| m.0)
    }

    fn handle_timeout(&mut self, now_ms: u64) {
        self.session.handle_timeout(Millis(now_ms), self.storage);
        self.settle(Millis(now_ms));
    }

    fn is_closed(&self) -> bool {
        !matches!(
            self.session.state(),
            DeviceState::Handshaking | DeviceState::Ready
        ) && self.out.is_empty()
    }
}

/// Whether the device may sync now under its Wi-Fi-only setting: `Err(reason)` if not.
pub fn wifi_allows(wifi_only: bool) -> std::result::Result<(), String> {
    if !wifi_only {
        return Ok(());
    }
    match on_wifi() {
        Some(true) => Ok(()),
        Some(false) => Err("sync is set to Wi-Fi only and no Wi-Fi link is up (`device config --wifi-only false` to allow any network)".into()),
        None => Err("sync is set to Wi-Fi only and this system does not say which links are Wi-Fi".into()),
    }
}

/// Whether an up network interface is Wi-Fi (Linux: /sys/class/net/*/wireless and operstate);
/// `None` if the OS does not tell. `FIELDSYNC_FAKE_LINK=wifi|cellular` overrides (tests).
pub fn on_wifi() -> Option<bool> {
    if let Ok(fake) = std::env::var("FIELDSYNC_FAKE_LINK") {
        return Some(fake == "wifi");
    }
    let dir = std::fs::read_dir("/sys/class/net").ok()?;
    let mut any = false;
    for entry in dir.flatten() {
        let path = entry.path();
        if path.join("wireless").exists() || path.join("phy80211").exists() {
            let up = std::fs::read_to_string(path.join("operstate"))
                .map(|s| s.trim() == "up")
                .unwrap_or(false);
            if up {
                return Some(true);
            }
        }
        any = true;
    }
    if !any {
        // Fall back to /proc/net/wireless: a line per wireless interface after two headers.
        let text = std::fs::read_to_string("/proc/net/wireless").ok()?;
        return Some(text.lines().count() > 2);
    }
    Some(false)
}

/// How `device sync` runs.
#[derive(Debug, Clone, Copy)]
pub struct SyncMode {
    /// Push, pull every table to the end, exit.
    pub once: bool,
    /// Give up (once mode) after this many failed connection attempts.
    pub max_attempts: u32,
}

/// Runs the device's session: connect, sync, and (watch mode) reconnect with backoff and jitter
/// until `stop` resolves.
pub async fn run_sync(
    credential: &Credential,
    session: &mut DeviceSession,
    storage: &mut DeviceReplica,
    mode: SyncMode,
    wifi_only: bool,
    stop: &mut (dyn std::future::Future<Output = ()> + Unpin),
) -> Result<SyncReport> {
    let clock = SessionClock::new(super::unix_ms());
    let mut report = SyncReport::default();
    let mut failures = 0u32;
    loop {
        let now = Millis(clock.now_ms());
        if session.state() == DeviceState::Halted {
            bail!(report
                .refused
                .clone()
                .unwrap_or_else(|| "the hub refused this device's credential".into()));
        }
        if mode.once {
            // Every table now, not at its interval.
            session.sync_now(now, storage, &[]);
        }
        let at = session
            .wants_connection_at(storage)
            .unwrap_or(Millis(now.0 + 60_000));
        if at > now {
            let wait = Duration::from_millis(at.0 - now.0);
            info!(
                wait_ms = wait.as_millis() as u64,
                "waiting before connecting"
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut *stop => return Ok(report),
            }
        }
        if let Err(reason) = wifi_allows(wifi_only) {
            if mode.once {
                bail!(reason);
            }
            warn!(%reason, "not syncing");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(30)) => continue,
                () = &mut *stop => return Ok(report),
            }
        }
        let link = tokio::select! {
            link = connect_with_credential(credential, ConnectionLimits::device()) => link,
            () = &mut *stop => return Ok(report),
        };
        let link = match link {
            Ok(l) => l,
            // Retrying cannot help a credential the hub does not take: stop and say so.
            Err(LinkError::Auth(AuthError::Refused { code, reason }))
                if codes::is_credential_refused(code) =>
            {
                bail!(
                    "the hub at {} refuses this device's credential: {reason} (enroll the device again)",
                    credential.hub_address
                );
            }
            Err(e) => {
                failures += 1;
                session.handle_disconnected(Millis(clock.now_ms()));
                while session.poll_event().is_some() {}
                if mode.once && failures >= mode.max_attempts {
                    return Err(anyhow!(e)).with_context(|| {
                        format!("cannot sync with the hub at {}", credential.hub_address)
                    });
                }
                warn!(error = %e, "cannot reach the hub; retrying with backoff");
                continue;
            }
        };
        let now = Millis(clock.now_ms());
        session.handle_connected(now);
        if mode.once {
            session.sync_now(now, storage, &[]);
        }
        let mut writer = link.writer.with_format(FrameFormat::WIRE_V1);
        let mut reader = link.reader.with_format(FrameFormat::WIRE_V1);
        let done;
        {
            let mut adapter = DeviceAdapter::new(session, storage, mode.once, &mut report);
            adapter.settle(now);
            let driven = tokio::select! {
                r = drive_session(&mut adapter, &link.conn, &mut writer, &mut reader, &clock) => Some(r),
                () = &mut *stop => None,
            };
            done = adapter.done();
            match driven {
                None => {
                    adapter.session.close(
                        Millis(clock.now_ms()),
                        CloseCode::NORMAL,
                        "device stopping",
                    );
                    adapter.settle(Millis(clock.now_ms()));
                    while let Some(f) = adapter.poll_frame() {
                        let _ = writer.write_frame(&f).await;
                    }
                    let _ = writer.finish();
                    link.conn.close(0u32.into(), b"device stopping");
                    link.endpoint.shutdown().await;
                    return Ok(report);
                }
                Some(Ok(outcome)) => info!(?outcome, "session ended"),
                Some(Err(e)) => warn!(error = %e, "session ended"),
            }
        }
        link.conn.close(0u32.into(), b"done");
        link.endpoint.shutdown().await;
        session.handle_disconnected(Millis(clock.now_ms()));
        while let Some(ev) = session.poll_event() {
            record_event(&mut report, ev);
        }
        if mode.once {
            if done {
                return Ok(report);
            }
            if let Some(r) = &report.refused {
                bail!("{r}");
            }
            failures += 1;
            if failures >= mode.max_attempts {
                bail!(report.failed.clone().unwrap_or_else(|| {
                    "the connection to the hub ended before the sync finished".into()
                }));
            }
            report.failed = None;
        }
    }
}

/// Connects once with `credential` and fetches the schema and profile of its app.
pub async fn fetch_bootstrap(credential: &Credential) -> Result<Bootstrap> {
    let link = connect_with_credential(credential, ConnectionLimits::device())
        .await
        .with_context(|| format!("cannot reach the hub at {}", credential.hub_address))?;
    let (mut writer, mut reader) = open_bi_framed(&link.conn, BOOTSTRAP_MAX_BYTES)
        .await
        .context("cannot open the bootstrap stream")?;
    writer
        .write_frame(BOOTSTRAP_REQUEST)
        .await
        .context("cannot ask the hub for the schema")?;
    let _ = writer.finish();
    let bytes = tokio::time::timeout(Duration::from_secs(20), reader.read_frame())
        .await
        .map_err(|_| anyhow!("the hub did not send the schema in time"))?
        .context("cannot read the schema from the hub")?
        .ok_or_else(|| anyhow!("the hub has no offline profile for this credential's app"))?;
    let bundle: Bootstrap =
        serde_json::from_slice(&bytes).context("the hub's schema bundle does not decode")?;
    link.conn.close(0u32.into(), b"bootstrap done");
    link.endpoint.shutdown().await;
    Ok(bundle)
}
