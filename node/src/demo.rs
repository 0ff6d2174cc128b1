//! `fieldsync demo`: an embedded hub and three devices on loopback QUIC with the field-service
//! example. Two devices edit offline, one edit conflicts, one write is not allowed, an owner
//! change moves a row between devices; they reconnect and the demo prints what each holds.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use anyhow::{anyhow, Context, Result};
use fieldsync_replication::credential::Credential;
use fieldsync_replication::replica::DeviceReplica;
use fieldsync_store::{Durability, RowId, Store, StoreOptions, Value};
use uuid::Uuid;

use crate::hub_cmd::{hub_values, init_hub, open_hub, runtime_of};
use crate::sync::device::fetch_bootstrap;
use crate::sync::hub::{start_hub, HubRuntime};

const SCHEMA: &str = include_str!("../../examples/field-service/schema.toml");
const ENVIRONMENT: &str = include_str!("../../examples/field-service/environment.toml");
const APPS: &str = include_str!("../../examples/field-service/apps.toml");
const PROFILE: &str = include_str!("../../examples/field-service/profile.toml");
const APP: &str = "Field Service Mobile";
const WO: &str = "msdyn_workorder";

struct Device {
    name: &'static str,
    user: &'static str,
    about: &'static str,
    dir: PathBuf,
}

pub fn run(dir: Option<&Path>, upstream_emulator: bool) -> Result<()> {
    let tmp;
    let root = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let started = std::time::Instant::now();
    let input = root.join("input");
    std::fs::create_dir_all(&input).context("cannot create the demo directory")?;
    for (name, text) in [
        ("schema.toml", SCHEMA),
        ("environment.toml", ENVIRONMENT),
        ("apps.toml", APPS),
        ("profile.toml", PROFILE),
    ] {
        std::fs::write(input.join(name), text).context("cannot write the example files")?;
    }
    let hub_dir = root.join("hub");
    init_hub(
        &hub_dir,
        &input.join("environment.toml"),
        &input.join("apps.toml"),
        Some(&input.join("schema.toml")),
        Some(&input.join("profile.toml")),
    )?;
    let hub = open_hub(&hub_dir)?;
    let pin = hub.identity.pin();
    let (runtime, identity, _) = runtime_of(hub);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let running = start_hub(runtime.clone(), &identity, "127.0.0.1:0".parse()?)?;
        println!("fieldsync demo — field-service example, in {}", root.display());
        println!("hub listening on {} (QUIC, TLS pinned to {pin})\n", running.addr);

        // The hub's data: work orders for three technicians and one for a team.
        let wo_ana = put(&runtime, WO, &["msdyn_name=WO-101 Boiler check", "ownerid=user:ana@contoso.com", "statecode=0", "msdyn_systemstatus=690970000", "msdyn_priority=2"])?;
        let wo_move = put(&runtime, WO, &["msdyn_name=WO-102 Meter swap", "ownerid=user:ana@contoso.com", "statecode=0", "msdyn_systemstatus=690970001"])?;
        let wo_team = put(&runtime, WO, &["msdyn_name=WO-103 Burst pipe (emergency)", "ownerid=team:Emergency Crew", "statecode=0", "msdyn_systemstatus=690970000", "msdyn_workordersummary=Water in the basement"])?;
        put(&runtime, WO, &["msdyn_name=WO-201 Heat pump service", "ownerid=user:ines@contoso.com", "statecode=0", "msdyn_systemstatus=690970000"])?;
        put(&runtime, WO, &["msdyn_name=WO-301 Annual inspection", "ownerid=user:lena@contoso.com", "statecode=0", "msdyn_systemstatus=690970002"])?;
        put(&runtime, "product", &["name=Pump seal kit", "productnumber=PS-10"])?;
        let upstream = match upstream_emulator {
            true => {
                let up = crate::demo_upstream::start(&root, &runtime, SCHEMA).await?;
                up.bridge.sync_once().await?;
                println!("Dataverse (emulator) at {}: the hub wrote its {} rows there\n", up.api,
                    up.bridge.stats.rows_pushed.load(std::sync::atomic::Ordering::Relaxed));
                Some(up)
            }
            false => None,
        };

        let devices = [
            Device { name: "ana", user: "ana@contoso.com", about: "Contoso North; teams North Technicians, Emergency Crew", dir: root.join("ana") },
            Device { name: "ines", user: "ines@contoso.com", about: "Contoso South; teams South Technicians, Emergency Crew", dir: root.join("ines") },
            Device { name: "lena", user: "lena@contoso.com", about: "Contoso South; teams South Technicians, Key Accounts", dir: root.join("lena") },
        ];
        println!("devices (app `{APP}`, each enrolled with a hub-signed token):");
        for d in &devices {
            let token = {
                let mut r = runtime.replica.lock().map_err(|_| anyhow!("hub lock poisoned"))?;
                r.enroll(d.user, APP, Uuid::new_v4(), crate::sync::unix_ms())?
            };
            let cred = Credential::new(running.addr.to_string(), identity.pin(), token);
            let bundle = fetch_bootstrap(&cred).await?;
            crate::device_sync::finish_init(&d.dir, &cred, &bundle)?;
            println!("  {:<5} {:<18} {}", d.name, d.user, d.about);
        }
        println!("\n1. first sync (each device downloads its own set):");
        for d in &devices {
            sync(d).await?;
            println!("  {:<5} holds {}", d.name, holdings(&d.dir)?);
        }

        println!("\n2. offline: ana and ines edit without signal");
        edit(&devices[0].dir, WO, wo_team, &[("msdyn_workordersummary", "Pipe clamped, pump restarted")])?;
        println!("  ana   WO-103 summary = \"Pipe clamped, pump restarted\"");
        edit(&devices[0].dir, WO, wo_ana, &[("msdyn_systemstatus", "690970002")])?;
        println!("  ana   WO-101 status  = in progress");
        edit(&devices[1].dir, WO, wo_team, &[("msdyn_workordersummary", "Basement pumped dry")])?;
        println!("  ines  WO-103 summary = \"Basement pumped dry\"   (same column: a conflict)");
        let product = Uuid::new_v4();
        create(&devices[1].dir, "product", product, &[("name", "Homemade gasket")])?;
        println!("  ines  creates product \"Homemade gasket\"        (technicians may only read the catalog)");
        put_existing(&runtime, WO, wo_move, &["ownerid=user:lena@contoso.com"])?;
        println!("  hub   dispatcher reassigns WO-102 from ana to lena");

        println!("\n3. they reconnect:");
        for d in [&devices[0], &devices[1], &devices[2], &devices[0]] {
            let (report, line) = sync(d).await?;
            println!("  {:<5} {line}", d.name);
            for r in &report.rejected {
                println!("        rejected: {r}");
            }
        }

        println!("\n4. what each device holds now:");
        for d in &devices {
            println!("  {:<5} {}", d.name, holdings(&d.dir)?);
        }
        println!("\nconflict on WO-103 (merge per column; every replica converges to the same winner):");
        for d in &devices[..2] {
            let store = open(&d.dir)?;
            let row = store.get(WO, wo_team)?.ok_or_else(|| anyhow!("WO-103 missing on {}", d.name))?;
            let summary = row.values.get("msdyn_workordersummary").map(|v| v.to_string()).unwrap_or_default();
            let lost: Vec<String> = store
                .conflicts(WO, wo_team)?
                .into_iter()
                .flat_map(|c| c.values.into_iter().filter(move |(v, _)| *v != c.winner).map(|(v, _)| v.to_string()))
                .collect();
            println!("  {:<5} summary = \"{summary}\"; lost value(s): {}", d.name, if lost.is_empty() { "none".into() } else { lost.join(", ") });
        }
        println!("\nrejected write (rolled back on ines, kept as a sync error: `fieldsync device errors`):");
        {
            let store = open(&devices[1].dir)?;
            let replica = DeviceReplica::new(store.clone());
            for (id, e) in replica.sync_errors()? {
                println!("  error {id}: {:?} {} {} — {:?}: {}", e.operation, e.table, e.row, e.kind, e.message);
            }
            println!("  product {product} on ines now: {}", if store.get("product", product)?.is_some() { "still there (!)" } else { "gone" });
        }
        println!("\nowner change: WO-102 evicted from ana ({}), now on lena ({})",
            if open(&devices[0].dir)?.get(WO, wo_move)?.is_some() { "still there (!)" } else { "gone" },
            if open(&devices[2].dir)?.get(WO, wo_move)?.is_some() { "present" } else { "missing (!)" });
        if let Some(up) = upstream {
            println!("\n5. with Dataverse upstream:");
            up.bridge.sync_once().await?;
            let wo = up.office(reqwest::Method::GET, &format!("msdyn_workorders({wo_ana})?$select=msdyn_systemstatus"), None).await?;
            println!("  Dataverse WO-101 msdyn_systemstatus = {} (ana's offline edit, relayed by the hub)", wo["msdyn_systemstatus"]);
            let wo = up.office(reqwest::Method::GET, &format!("msdyn_workorders({wo_move})?$select=_ownerid_value"), None).await?;
            let lena = runtime.replica.lock().map_err(|_| anyhow!("hub lock poisoned"))?
                .environment().user_by_name("lena@contoso.com").map(|u| u.id.to_string()).unwrap_or_default();
            println!("  Dataverse WO-102 owner is lena: {}", wo["_ownerid_value"].as_str() == Some(lena.as_str()));
            let wo = up.office(reqwest::Method::GET, &format!("msdyn_workorders({wo_team})?$select=msdyn_workordersummary"), None).await?;
            println!("  Dataverse WO-103 summary = {} (the conflict's winner, as on the devices)", wo["msdyn_workordersummary"]);
            up.office(reqwest::Method::PATCH, &format!("msdyn_workorders({wo_ana})"),
                Some(serde_json::json!({"msdyn_workordersummary": "Customer called: gate code 4711"}))).await?;
            println!("  office (Web API) PATCH WO-101 summary = \"Customer called: gate code 4711\"");
            up.bridge.sync_once().await?;
            let (_, line) = sync(&devices[0]).await?;
            let summary = open(&devices[0].dir)?.get(WO, wo_ana)?
                .and_then(|r| r.values.get("msdyn_workordersummary").map(|v| v.to_string()))
                .unwrap_or_default();
            println!("  ana   {line}\n  ana   WO-101 summary = \"{summary}\" (pulled by the hub through change tracking)");
            let ines = open(&devices[1].dir)?.get(WO, wo_ana)?.is_some();
            println!("  ines  holds WO-101: {ines} (not in her set)");
            up.stop();
        }
        running.shut_down().await?;
        println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
        Ok::<_, anyhow::Error>(())
    })
}

fn put(runtime: &HubRuntime, table: &str, values: &[&str]) -> Result<RowId> {
    put_existing(runtime, table, Uuid::new_v4(), values)
}

fn put_existing(runtime: &HubRuntime, table: &str, id: RowId, values: &[&str]) -> Result<RowId> {
    let args: Vec<String> = values.iter().map(|s| s.to_string()).collect();
    let mut r = runtime
        .replica
        .lock()
        .map_err(|_| anyhow!("hub lock poisoned"))?;
    let vals = hub_values(&r, table, &args)?;
    let refs: Vec<(&str, Value)> = vals.iter().map(|(c, v)| (c.as_str(), v.clone())).collect();
    r.local_write(table, id, &refs)?;
    let changed = r.take_changes();
    drop(r);
    runtime.bus.publish(&changed);
    Ok(id)
}

fn open(dir: &Path) -> Result<Store> {
    Store::open(dir, StoreOptions::default())
        .with_context(|| format!("cannot open {}", dir.display()))
}

fn parse(store: &Store, table: &str, values: &[(&str, &str)]) -> Result<Vec<(String, Value)>> {
    let t = store.schema().table(table)?;
    values
        .iter()
        .map(|(c, v)| {
            let col = t.column(c).ok_or_else(|| anyhow!("no column {c}"))?;
            Ok((
                c.to_string(),
                Value::parse(col.ty, v).map_err(|e| e.in_column(t, c))?,
            ))
        })
        .collect()
}

fn edit(dir: &Path, table: &str, id: RowId, values: &[(&str, &str)]) -> Result<()> {
    let store = open(dir)?;
    let vals = parse(&store, table, values)?;
    let refs: Vec<(&str, Value)> = vals.iter().map(|(c, v)| (c.as_str(), v.clone())).collect();
    let mut tx = store.begin();
    tx.update(table, id, &refs)?;
    tx.commit_with(Durability::Immediate)?;
    Ok(())
}

fn create(dir: &Path, table: &str, id: RowId, values: &[(&str, &str)]) -> Result<()> {
    let store = open(dir)?;
    let vals = parse(&store, table, values)?;
    let refs: Vec<(&str, Value)> = vals.iter().map(|(c, v)| (c.as_str(), v.clone())).collect();
    let mut tx = store.begin();
    tx.insert_with_id(table, id, &refs)?;
    tx.commit_with(Durability::Immediate)?;
    Ok(())
}

async fn sync(d: &Device) -> Result<(crate::sync::device::SyncReport, String)> {
    let mut stop: Pin<Box<dyn Future<Output = ()>>> = Box::pin(std::future::pending());
    crate::device_sync::sync_device(&d.dir, false, &mut stop)
        .await
        .with_context(|| format!("{} could not sync", d.name))
}

fn holdings(dir: &Path) -> Result<String> {
    let store = open(dir)?;
    let mut names: Vec<String> = Vec::new();
    for row in store.scan(WO)? {
        let row = row?;
        if let Some(Value::Text(n)) = row.values.get("msdyn_name") {
            names.push(n.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    names.sort();
    let products = store.scan("product")?.count();
    Ok(format!(
        "work orders [{}], {products} product(s)",
        names.join(", ")
    ))
}
