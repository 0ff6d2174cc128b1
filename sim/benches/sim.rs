//! Simulator speed: simulated device-hours per wall-clock second and replicated op deliveries
//! per second, for the field-day scenario and a day of 1,000 devices (24 hours, 12 edits per
//! device-hour, patchy coverage), each next to the bare store work its ops need.
//!
//! Run: `cargo bench -p fieldsync-sim --bench sim`. `SIM_BENCH_DEVICES` shrinks the 1,000-device
//! day for a quick look.
//!
//! The base is the automerge work the run's ops need without any simulation: one change made per
//! committed op and one change applied per replica that receives it (acknowledged at the hub,
//! delivered to a device), priced from a sample of real automerge changes on a row document.
//! While the simulator runs its built-in nodes (not yet the real store), `ours` measures the
//! simulator's own overhead next to that base.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench that cannot run should stop loudly

use automerge::transaction::Transactable;
use fieldsync_sim::{run_scenario, RunOptions, Scenario};
use std::path::Path;
use std::time::Instant;

/// Seconds per created change and per applied change, from a sample: 100 row documents of 20
/// changes each (rows are small documents with short histories).
fn automerge_costs() -> (f64, f64) {
    const ROWS: usize = 100;
    const CHANGES: usize = 20;
    let t = Instant::now();
    let mut all = Vec::with_capacity(ROWS);
    for _ in 0..ROWS {
        let mut doc = automerge::AutoCommit::new();
        let mut changes = Vec::with_capacity(CHANGES);
        for i in 0..CHANGES {
            doc.put(automerge::ROOT, format!("c{}", i % 8), i as i64)
                .unwrap();
            doc.commit();
            changes.push(doc.get_last_local_change().unwrap().raw_bytes().to_vec());
        }
        all.push(changes);
    }
    let n = (ROWS * CHANGES) as f64;
    let create = t.elapsed().as_secs_f64() / n;
    let t = Instant::now();
    for changes in &all {
        let mut other = automerge::Automerge::new();
        for c in changes {
            let c = automerge::Change::try_from(c.as_slice()).unwrap();
            other.apply_changes([c]).unwrap();
        }
    }
    let apply = t.elapsed().as_secs_f64() / n;
    (create, apply)
}

fn bench(name: &str, s: &Scenario, costs: (f64, f64)) {
    let t = Instant::now();
    let r = run_scenario(s, 1, &RunOptions::default()).unwrap();
    let wall = t.elapsed().as_secs_f64();
    let m = &r.metrics;
    let device_hours = f64::from(r.devices) * r.heal_ms as f64 / 3.6e6;
    let deliveries = m.ops_delivered + m.ops_acked;
    let base = m.ops_committed as f64 * costs.0 + deliveries as f64 * costs.1;
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
    let costs = automerge_costs();
    println!(
        "automerge: {:.1} us per change made, {:.1} us per change applied",
        costs.0 * 1e6,
        costs.1 * 1e6
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let field_day = Scenario::from_file(&dir.join("field-day.toml")).unwrap();
    bench("sim_field_day", &field_day, costs);
    let devices: u32 = std::env::var("SIM_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let day = Scenario::from_toml_str(
        &format!(
            "name = 'day-{devices}'\nduration = '24h'\nsettle = '1h'\nsample_interval = '5m'\n\
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
    bench("sim_day_1000", &day, costs);
    if let Some(mib) = peak_rss_mib() {
        println!("peak RSS {mib:.0} MiB");
    }
}
