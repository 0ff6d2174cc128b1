//! `fieldsync device init --credential`, `device sync`, `device errors`, `device config` and
//! the sync part of `device status`.
//!
//! An enrolled device keeps its sync settings next to its store:
//!
//! ```text
//! DIR/sync/device.toml        enrollments (app, user, profile, credential file), wifi_only
//! DIR/sync/credential-N.toml  the credentials (mode 0600)
//! DIR/sync/profile.toml       the offline profile the hub sent (per-table sync intervals)
//! ```
//!
//! A device enrolled for a second app whose offline profile is the same keeps one store: the
//! second enrollment is recorded and nothing is downloaded again (the data is the same set).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use anyhow::{anyhow, bail, Context, Result};
use fieldsync_replication::credential::Credential;
use fieldsync_replication::proto::{DeviceConfig, DeviceId, DeviceSession, SyncSchedule};
use fieldsync_replication::replica::DeviceReplica;
use fieldsync_replication::Profile;
use fieldsync_store::{OpenError, Schema, Store, StoreOptions};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::sync::device::{fetch_bootstrap, run_sync, wifi_allows, SyncMode, SyncReport};
use crate::sync::Bootstrap;

/// One enrollment of the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub app: String,
    pub user: String,
    pub profile: String,
    pub credential: String,
}

/// `DIR/sync/device.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceFile {
    #[serde(default)]
    pub wifi_only: bool,
    #[serde(default)]
    pub enrollments: Vec<Enrollment>,
}

fn sync_dir(data: &Path) -> PathBuf {
    data.join("sync")
}

fn load_file(data: &Path) -> Result<Option<DeviceFile>> {
    let path = sync_dir(data).join("device.toml");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(
        toml::from_str(&text).with_context(|| format!("{}", path.display()))?,
    ))
}

fn save_file(data: &Path, file: &DeviceFile) -> Result<()> {
    let path = sync_dir(data).join("device.toml");
    let text = format!(
        "# fieldsync device sync settings (written by `device init` and `device config`).\n{}",
        toml::to_string(file).context("cannot encode device.toml")?
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// The enrolled device's file, with a clear error for a device that is not enrolled.
pub fn enrolled(data: &Path) -> Result<DeviceFile> {
    match load_file(data)? {
        Some(f) if !f.enrollments.is_empty() => Ok(f),
        _ => bail!(
            "{} is not an enrolled device (run `fieldsync device init --data DIR --credential CRED`)",
            data.display()
        ),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `device init --credential`: fetch schema and profile from the hub and create the store.
pub fn init_with_credential(data: &Path, credential_path: &Path) -> Result<()> {
    let credential = Credential::load(credential_path)
        .with_context(|| format!("cannot read credential {}", credential_path.display()))?;
    let bundle = runtime()?.block_on(fetch_bootstrap(&credential))?;
    println!("{}", finish_init(data, &credential, &bundle)?);
    Ok(())
}

/// Creates (or extends, for a second app with the same profile) an enrolled device from the
/// hub's bundle; returns what to tell the user.
pub fn finish_init(data: &Path, credential: &Credential, bundle: &Bootstrap) -> Result<String> {
    let schema = Schema::from_toml(&bundle.schema_toml).context("the hub's schema")?;
    Profile::from_toml(&bundle.profile_toml, &schema).context("the hub's offline profile")?;
    let mut file = load_file(data)?.unwrap_or_default();
    if let Some(first) = file.enrollments.first() {
        if first.profile != bundle.profile_name {
            bail!(
                "{} syncs profile `{}`; app `{}` uses profile `{}` (use another --data directory)",
                data.display(),
                first.profile,
                bundle.app,
                bundle.profile_name
            );
        }
        if file.enrollments.iter().any(|e| e.app == bundle.app) {
            bail!(
                "{} is already enrolled for app `{}`",
                data.display(),
                bundle.app
            );
        }
    } else {
        match Store::create(data, schema.clone(), StoreOptions::default()) {
            Ok(store) => drop(store),
            // An init stopped (killed, or failed to write its files) after creating the
            // store: take that store up again if it is still the empty one it made.
            Err(OpenError::AlreadyExists(_)) => resume_interrupted_init(data, &schema)?,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create a device store in {}", data.display()))
            }
        }
    }
    let dir = sync_dir(data);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = format!("credential-{}.toml", file.enrollments.len() + 1);
    credential
        .save(&dir.join(&name))
        .context("cannot store the credential")?;
    std::fs::write(dir.join("profile.toml"), &bundle.profile_toml)
        .context("cannot store the profile")?;
    let shared = !file.enrollments.is_empty();
    file.enrollments.push(Enrollment {
        app: bundle.app.clone(),
        user: bundle.user.clone(),
        profile: bundle.profile_name.clone(),
        credential: name,
    });
    save_file(data, &file)?;
    Ok(if shared {
        format!(
            "enrolled {} for app `{}`: same profile `{}` as app `{}`, keeping the one copy of the data",
            data.display(),
            bundle.app,
            bundle.profile_name,
            file.enrollments[0].app
        )
    } else {
        format!(
            "enrolled device {} for app `{}` (profile `{}`, user {}) with hub {} at {}; run `fieldsync device sync --data {} --once`",
            credential.token.token().device_id,
            bundle.app,
            bundle.profile_name,
            bundle.user,
            bundle.hub,
            credential.hub_address,
            data.display()
        )
    })
}

/// Accepts the store an interrupted `device init` left in `data` (no enrollment recorded):
/// only if it has the hub's schema and nothing was ever written to it.
fn resume_interrupted_init(data: &Path, schema: &Schema) -> Result<()> {
    let store = Store::open(data, StoreOptions::default())
        .with_context(|| format!("cannot open the device store in {}", data.display()))?;
    let untouched = store.last_seq() == 0
        && schema.tables().all(|t| {
            store
                .row_ids(&t.name)
                .map(|mut rows| rows.next().is_none())
                .unwrap_or(false)
        });
    if store.schema() != schema || !untouched {
        bail!(
            "{} holds a device store that is not enrolled with this hub (use another --data directory)",
            data.display()
        );
    }
    info!(data = %data.display(), "taking up the store of an interrupted device init");
    Ok(())
}

/// The device's session config from its first enrollment.
pub fn session_for(data: &Path, store: &Store, live: bool) -> Result<(DeviceSession, Credential)> {
    let file = enrolled(data)?;
    let e = &file.enrollments[0];
    let cred_path = sync_dir(data).join(&e.credential);
    let credential = Credential::load(&cred_path)
        .with_context(|| format!("cannot read credential {}", cred_path.display()))?;
    let profile = device_profile(data, store)?;
    let token = credential.token.token();
    let mut config = DeviceConfig::new(
        DeviceId(token.device_id),
        credential.token.as_bytes().to_vec(),
        &token.app,
        SyncSchedule::for_profile(store.schema(), &profile),
    );
    config.live = live;
    config.rng_seed =
        u64::from_le_bytes(token.device_id.as_bytes()[..8].try_into().unwrap_or([7; 8]))
            ^ crate::sync::unix_ms();
    Ok((DeviceSession::new(config), credential))
}

/// The offline profile the hub sent at enrollment.
fn device_profile(data: &Path, store: &Store) -> Result<Profile> {
    let profile_path = sync_dir(data).join("profile.toml");
    let profile_text = std::fs::read_to_string(&profile_path)
        .with_context(|| format!("cannot read {}", profile_path.display()))?;
    Profile::from_toml(&profile_text, store.schema()).context("the device's profile")
}

/// `device sync`.
pub fn sync(data: &Path, watch: bool) -> Result<()> {
    let rt = runtime()?;
    let summary = rt.block_on(async {
        let mut stop: Pin<Box<dyn Future<Output = ()>>> = if watch {
            Box::pin(async {
                let _ = crate::hub_cmd::wait_for_signal().await;
            })
        } else {
            Box::pin(std::future::pending())
        };
        sync_device(data, watch, &mut stop).await
    })?;
    for r in &summary.0.rejected {
        println!("rejected: {r}");
    }
    for f in &summary.0.files_refused {
        println!("attachment refused: {f}");
    }
    println!("{}", summary.1);
    Ok(())
}

/// Syncs the device in `data` (once, or live until `stop`); the report and a summary line.
pub async fn sync_device(
    data: &Path,
    watch: bool,
    stop: &mut (dyn Future<Output = ()> + Unpin),
) -> Result<(SyncReport, String)> {
    let file = enrolled(data)?;
    if let Err(reason) = wifi_allows(file.wifi_only) {
        bail!(reason);
    }
    let store = crate::device_cmd::open_store(data)?;
    let (mut session, credential) = session_for(data, &store, watch)?;
    let mut replica =
        DeviceReplica::new(store.clone()).with_profile(&device_profile(data, &store)?);
    let mode = SyncMode {
        once: !watch,
        max_attempts: 3,
    };
    let report = run_sync(
        &credential,
        &mut session,
        &mut replica,
        mode,
        file.wifi_only,
        stop,
    )
    .await?;
    store.sync().context("cannot flush the device store")?;
    let pending = replica.pending_op_count().unwrap_or(0);
    let mut line = format!(
        "synced with {}: pushed through seq {}, {} rejected; pulled {} changes, {} rows in, {} rows out; {} files up, {} down; {} pending",
        credential.hub_address,
        report.pushed_up_to,
        report.rejected.len(),
        report.ops_in,
        report.entering,
        report.leaving,
        report.files_up,
        report.files_down,
        pending
    );
    if !report.feeds_restarted.is_empty() {
        line.push_str(&format!(
            "\nthe hub's store is older than this device's (restored from a backup?): pulled {} again from the start; rows the hub no longer has stay on this device",
            report.feeds_restarted.join(", ")
        ));
    }
    Ok((report, line))
}

fn fmt_ms(ms: u64) -> String {
    fieldsync_store::format_datetime(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// `device errors`.
pub fn errors(data: &Path, retry: Option<u64>, discard: Option<u64>) -> Result<()> {
    let store = crate::device_cmd::open_store(data)?;
    let replica = DeviceReplica::new(store);
    if let Some(id) = retry {
        let seq = replica
            .retry_error(id)
            .with_context(|| format!("cannot retry sync error {id}"))?;
        println!("sync error {id} re-applied as local op {seq}; it is pushed with the next sync");
        return Ok(());
    }
    if let Some(id) = discard {
        if replica
            .discard_error(id)
            .with_context(|| format!("cannot discard sync error {id}"))?
        {
            println!("sync error {id} discarded (the edit stays rolled back)");
            return Ok(());
        }
        bail!("no sync error with id {id}");
    }
    let list = replica.sync_errors().context("cannot list sync errors")?;
    if list.is_empty() {
        println!("no sync errors");
    }
    for (id, e) in list {
        println!(
            "{id}\t{}\t{}\t{}\t{:?}\t{:?}\t{}",
            fmt_ms(e.at.0),
            e.table,
            e.row,
            e.operation,
            e.kind,
            e.message
        );
    }
    Ok(())
}

/// `device config`.
pub fn config(data: &Path, wifi_only: Option<bool>) -> Result<()> {
    let mut file = enrolled(data)?;
    if let Some(w) = wifi_only {
        file.wifi_only = w;
        save_file(data, &file)?;
    }
    println!("wifi_only = {}", file.wifi_only);
    for e in &file.enrollments {
        println!(
            "enrolled app `{}` (profile `{}`, user {})",
            e.app, e.profile, e.user
        );
    }
    Ok(())
}

/// The sync lines of `device status` (nothing for a device that is not enrolled).
pub fn status_lines(data: &Path, store: &Store) -> Result<()> {
    let Some(file) = load_file(data)? else {
        return Ok(());
    };
    let replica = DeviceReplica::new(store.clone());
    println!("sync:");
    for e in &file.enrollments {
        println!("  app           {} (profile {})", e.app, e.profile);
    }
    println!("  wifi only     {}", file.wifi_only);
    let (up, down) = replica.pending_files().map_err(|e| anyhow!(e))?;
    println!("  files         {up} to upload, {down} to download");
    for t in replica.table_sync_status().map_err(|e| anyhow!(e))? {
        let last = t
            .last_sync
            .map(|m| fmt_ms(m.0))
            .unwrap_or_else(|| "never".into());
        println!("  last sync     {:<28} {last}", t.table);
    }
    let errors = replica.sync_errors().map_err(|e| anyhow!(e))?;
    println!("  sync errors   {}", errors.len());
    for (id, e) in errors {
        println!(
            "    {id} {:?} {} {} ({:?}): {}",
            e.operation, e.table, e.row, e.kind, e.message
        );
    }
    let conflicts = replica.rows_with_conflicts().map_err(|e| anyhow!(e))?;
    println!("  conflicts     {}", conflicts.len());
    for (table, row, cols) in conflicts {
        for c in cols {
            let lost: Vec<String> = c
                .values
                .iter()
                .filter(|(v, _)| *v != c.winner)
                .map(|(v, _)| format!("{v}"))
                .collect();
            println!(
                "    {table} {row} {}: kept {} lost {}",
                c.column,
                c.winner,
                lost.join(", ")
            );
        }
    }
    let deferred = replica.deferred_evictions().map_err(|e| anyhow!(e))?;
    if !deferred.is_empty() {
        println!("  evictions waiting for pushes: {}", deferred.len());
    }
    Ok(())
}
