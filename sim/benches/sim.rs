//! Simulator speed on the real engine: simulated device-hours per wall-clock second and
//! replicated op deliveries per second, for the field-day scenario and a day of 1,000 devices
//! (24 hours, 12 edits per device-hour, patchy coverage), each next to the bare store work its
//! ops need, measured in the same run.
//!
//! Run: `cargo bench -p fieldsync-sim --bench sim`. `SIM_BENCH_DEVICES` shrinks the 1,000-device
//! day for a quick look, `SIM_BENCH_HOURS` shortens it (both for profiling; the figures in
//! `BENCHMARKS.md` use the defaults, 1,000 devices and 24 hours).
//!
//! Prints, per run, a line with the simulated device-hours per second and op deliveries per
//! second, a line with the bare store work, and a `BENCH` line in seconds per run.
//!
//! Devices run `replication::replica::DeviceReplica`; the hub runs `replication::replica::HubReplica`.
//!
//! `ours` is the wall time of the whole real-engine run: building the hub's and every device's
//! store, the simulated day and the settling. `base` is the bare store work of the same
//! changes, without any simulation, measured right after on fresh stores:
//!
//! - *create*: every change in the hub's log made again through `Store` transactions (the
//!   setup rows in one transaction, as the run does; then one commit per op, inserting the row
//!   the first time and setting a column after), immediate durability as in the run;
//! - *apply*: the hub's actual change bytes applied through `Store::apply_remote`, one call per
//!   change, to as many fresh stores as the run delivered each op on average (acknowledged at
//!   the hub plus delivered to devices, divided by the ops in the hub's log; at least one).
//!
//! The setup rows are applied once (the run imports them into every device that starts with
//! them), so `base` is lower than the store work the run really did and the ratio is an upper
//! bound of the simulation's overhead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench that cannot run should stop loudly

use fieldsync_sim::real::{scenario_schema, RealFactory, RealNode};
use fieldsync_sim::{Engine, RunOptions, Scenario, SimBuilder, HUB};
use fieldsync_store::{ActorId, Clock, Durability, LogEntry, RemoteOp, Store, StoreOptions, Value};
use std::path::Path;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Instant;

/// A store like the simulator's own (temporary, in memory), for the bare store work.
fn scratch_store(schema: &fieldsync_store::Schema, n: u8) -> Store {
    let options = StoreOptions::default()
        .with_actor(ActorId([n; 16]))
        .with_clock(Clock::manual(Arc::new(AtomicI64::new(1_767_592_800_000))))
        .with_durability(Durability::Immediate);
    Store::temporary(schema.clone(), options).unwrap()
}

/// The bare store work of the run's changes, in seconds: (create, apply).
fn base_work(
    schema: &fieldsync_store::Schema,
    log: &[LogEntry],
    setup: usize,
    replicas: usize,
) -> (f64, f64) {
    // Create: the same rows and edits through transactions.
    let store = scratch_store(schema, 1);
    let t = Instant::now();
    let mut tx = store.begin();
    for e in &log[..setup] {
        tx.insert_with_id(&e.table, e.row, &[("c0", Value::Integer(0))])
            .unwrap();
    }
    tx.commit().unwrap();
    for e in &log[setup..] {
        let mut tx = store.begin();
        let v = [("c1", Value::Integer(e.seq as i64))];
        if store.get(&e.table, e.row).unwrap().is_some() {
            tx.update(&e.table, e.row, &v).unwrap();
        } else if store.is_deleted(&e.table, e.row).unwrap() {
            continue;
        } else {
            tx.insert_with_id(&e.table, e.row, &v).unwrap();
        }
        tx.commit().unwrap();
    }
    let create = t.elapsed().as_secs_f64();
    drop(store);
    // Apply: the actual change bytes, to `replicas` stores.
    let mut apply = 0.0;
    for i in 0..replicas.max(1) {
        let store = scratch_store(schema, 2 + (i % 200) as u8);
        let t = Instant::now();
        let setup_ops: Vec<RemoteOp> = log[..setup].iter().map(LogEntry::to_remote).collect();
        store
            .apply_remote(&setup_ops, Durability::Immediate)
            .unwrap();
        for e in &log[setup..] {
            store
                .apply_remote(&[e.to_remote()], Durability::Immediate)
                .unwrap();
        }
        apply += t.elapsed().as_secs_f64();
    }
    (create, apply)
}

fn bench(name: &str, s: &Scenario) {
    let opts = RunOptions {
        engine: Engine::Real,
        ..RunOptions::default()
    };
    let t = Instant::now();
    let mut sim = SimBuilder::new(s)
        .rng_seed(1)
        .options(opts)
        .build(RealFactory::new(1, None).with_device_replica(true))
        .unwrap();
    sim.run_to_end();
    let (log, setup) = match sim.node(HUB) {
        Some(RealNode::Hub(h)) => {
            let store = h.storage().store().expect("the hub is up at the end");
            (
                store.ops_since(0, usize::MAX).unwrap(),
                h.storage().setup_rows() as usize,
            )
        }
        _ => panic!("node 0 is the hub"),
    };
    let r = sim.finish();
    let wall = t.elapsed().as_secs_f64();
    let m = &r.metrics;
    let device_hours = f64::from(r.devices) * r.heal_ms as f64 / 3.6e6;
    let deliveries = m.ops_delivered + m.ops_acked;
    let op_changes = log.len().saturating_sub(setup).max(1);
    let replicas = ((deliveries as f64 / op_changes as f64).round() as usize).max(1);
    let tables: Vec<(String, u32)> = s
        .workload
        .tables
        .iter()
        .map(|t| (t.name.clone(), 64))
        .collect();
    let schema = scenario_schema(&tables).unwrap();
    let (create, apply) = base_work(&schema, &log, setup, replicas);
    let base = create + apply;
    println!(
        "{name}: {} devices, {device_hours:.0} device-hours in {wall:.2} s = {:.0} device-hours/s; \
         {deliveries} op deliveries = {:.0}/s; converged {}, violations {}",
        r.devices,
        device_hours / wall,
        deliveries as f64 / wall,
        r.converged,
        r.violation_count
    );
    println!(
        "{name}: bare store work: {} changes ({setup} setup rows) made in {create:.3} s, \
         applied to {replicas} store(s) in {apply:.3} s",
        log.len()
    );
    println!(
        "BENCH name={name} ours={wall:.3} base={base:.3} unit=s ratio={:.3}",
        wall / base.max(1e-9)
    );
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let field_day = Scenario::from_file(&dir.join("field-day.toml")).unwrap();
    bench("sim_field_day", &field_day);
    let devices: u32 = std::env::var("SIM_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let hours: u32 = std::env::var("SIM_BENCH_HOURS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let day = Scenario::from_toml_str(
        &format!(
            "name = 'day-{devices}'\nduration = '{hours}h'\nsettle = '1h'\nsample_interval = '5m'\n\
             [[groups]]\nname = 'all'\ndevices = {devices}\nclock_skew = '1m'\n\
             connectivity = {{ model = 'gilbert-elliott', mean_up = '30m', mean_down = '10m' }}\n\
             link = {{ latency = '80ms', jitter = '40ms', bandwidth_kbps = 2000, loss = 0.01 }}\n\
             [workload]\noffice_edits_per_hour = 100\n\
             [[workload.tables]]\nname = 'msdyn_workorder'\nrows_per_device = 12\n\
             edits_per_device_hour = 12\nhot_rows = 5\nhot_fraction = 0.01\n"
        ),
        Path::new("."),
    )
    .unwrap();
    // A shrunk day prints under its own name, so it is never read as the figure.
    let name = if (devices, hours) == (1000, 24) {
        "sim_day_1000".to_string()
    } else {
        format!("sim_day_{devices}_devices_{hours}h")
    };
    bench(&name, &day);
    if let Some(mib) = peak_rss_mib() {
        println!("peak RSS {mib:.0} MiB");
    }
}
