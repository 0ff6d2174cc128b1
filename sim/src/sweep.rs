//! Sweeping a parameter and shrinking a failing scenario.

use crate::engine::RunOptions;
use crate::histogram::Percentiles;
use crate::metrics::{Invariant, SimReport};
use crate::scenario::{Connectivity, Dur, Scenario, ScenarioError};
use serde::Serialize;

/// A parameter and the values to sweep it over: `devices=10,100,1000`.
///
/// Names: `devices` (total, groups scaled in proportion), `duration`, `edits` (updates per
/// device-hour, every table), `loss`, `latency`, `bandwidth_kbps` (every group's link),
/// `sync_interval`, `batch`, `hot_fraction` (every table), `office_edits` (per hour).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepParam {
    /// Parameter name.
    pub name: String,
    /// Values, as written.
    pub values: Vec<String>,
}

const PARAMS: &[&str] = &[
    "devices",
    "duration",
    "edits",
    "loss",
    "latency",
    "bandwidth_kbps",
    "sync_interval",
    "batch",
    "hot_fraction",
    "office_edits",
];

impl std::str::FromStr for SweepParam {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, ScenarioError> {
        let (name, values) = s
            .split_once('=')
            .ok_or_else(|| ScenarioError::Param(format!("`{s}`: expected NAME=V1,V2,...")))?;
        let name = name.trim().to_string();
        if !PARAMS.contains(&name.as_str()) {
            return Err(ScenarioError::Param(format!(
                "unknown parameter `{name}` (one of: {})",
                PARAMS.join(", ")
            )));
        }
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(ScenarioError::Param(format!("`{s}`: no values")));
        }
        Ok(SweepParam { name, values })
    }
}

fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ScenarioError> {
    v.parse()
        .map_err(|_| ScenarioError::Param(format!("{name}: `{v}` is not a valid number")))
}

fn dur(name: &str, v: &str) -> Result<Dur, ScenarioError> {
    Dur::parse(v).map_err(|e| ScenarioError::Param(format!("{name}: {e}")))
}

impl SweepParam {
    /// The scenario with the parameter set to `value` (validated).
    pub fn apply(&self, base: &Scenario, value: &str) -> Result<Scenario, ScenarioError> {
        let mut s = base.clone();
        let n = self.name.as_str();
        match n {
            "devices" => {
                let want: u32 = num(n, value)?;
                let total = s.device_count().max(1);
                let groups = s.groups.len() as u32;
                if want < groups {
                    return Err(ScenarioError::Param(format!(
                        "devices={want}: fewer than the {groups} groups"
                    )));
                }
                for g in &mut s.groups {
                    g.devices =
                        ((u64::from(g.devices) * u64::from(want) / u64::from(total)) as u32).max(1);
                }
                let now = s.device_count();
                if let Some(g) = s.groups.first_mut() {
                    if now < want {
                        g.devices += want - now;
                    } else if now > want {
                        g.devices = g.devices.saturating_sub(now - want).max(1);
                    }
                }
            }
            "duration" => {
                let d = dur(n, value)?;
                for e in &mut s.events {
                    if e.at() > d {
                        e.set_at(d);
                    }
                }
                s.duration = d;
            }
            "edits" => {
                let r: f64 = num(n, value)?;
                s.workload
                    .tables
                    .iter_mut()
                    .for_each(|t| t.edits_per_device_hour = r);
            }
            "hot_fraction" => {
                let r: f64 = num(n, value)?;
                s.workload
                    .tables
                    .iter_mut()
                    .for_each(|t| t.hot_fraction = r);
            }
            "office_edits" => s.workload.office_edits_per_hour = num(n, value)?,
            "loss" => {
                let r: f64 = num(n, value)?;
                s.groups.iter_mut().for_each(|g| g.link.loss = r);
            }
            "latency" => {
                let d = dur(n, value)?;
                s.groups.iter_mut().for_each(|g| g.link.latency = d);
            }
            "bandwidth_kbps" => {
                let r: u64 = num(n, value)?;
                s.groups.iter_mut().for_each(|g| g.link.bandwidth_kbps = r);
            }
            "sync_interval" => s.sync.interval = dur(n, value)?,
            "batch" => s.sync.batch = num(n, value)?,
            _ => return Err(ScenarioError::Param(format!("unknown parameter `{n}`"))),
        }
        s.validate()?;
        Ok(s)
    }
}

/// One row of a sweep's table.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// The parameter's value.
    pub value: String,
    /// Devices in the run.
    pub devices: u32,
    /// Whether it converged.
    pub converged: bool,
    /// Time from the final heal to convergence.
    pub time_to_converge_ms: Option<u64>,
    /// Invariant violations.
    pub violations: u64,
    /// Staleness over all devices.
    pub staleness: Percentiles,
    /// Bytes up.
    pub bytes_up: u64,
    /// Bytes down.
    pub bytes_down: u64,
    /// Connections opened.
    pub connections_opened: u64,
    /// Conflicts.
    pub conflicts: u64,
    /// Rejected ops.
    pub ops_rejected: u64,
    /// Most pending ops at a sample.
    pub pending_ops_max: u64,
    /// The run's digest.
    pub trace_digest: String,
}

impl SweepRow {
    fn from_report(value: &str, r: &SimReport) -> SweepRow {
        SweepRow {
            value: value.to_string(),
            devices: r.devices,
            converged: r.converged,
            time_to_converge_ms: r.time_to_converge_ms,
            violations: r.violation_count,
            staleness: r.metrics.staleness,
            bytes_up: r.metrics.bytes_up,
            bytes_down: r.metrics.bytes_down,
            connections_opened: r.metrics.connections_opened,
            conflicts: r.metrics.conflicts,
            ops_rejected: r.metrics.ops_rejected,
            pending_ops_max: r.metrics.pending_ops_max,
            trace_digest: r.trace_digest.clone(),
        }
    }
}

/// Run the scenario once per value of the parameter (with `opts.engine`), calling
/// `progress(done, total)` after each run.
pub fn sweep(
    scenario: &Scenario,
    seed: u64,
    param: &SweepParam,
    opts: &RunOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<SweepRow>, ScenarioError> {
    let _span = tracing::info_span!("sweep", param = %param.name).entered();
    let mut rows = Vec::new();
    for (i, v) in param.values.iter().enumerate() {
        let s = param.apply(scenario, v)?;
        let r = crate::run_scenario(&s, seed, opts)?;
        rows.push(SweepRow::from_report(v, &r));
        progress(i + 1, param.values.len());
    }
    Ok(rows)
}

/// What [`shrink`] found.
#[derive(Clone, Debug)]
pub struct ShrinkOutcome {
    /// The invariant kept failing while reducing (None: the scenario did not fail).
    pub invariant: Option<Invariant>,
    /// The reduced scenario (the original if it did not fail).
    pub scenario: Scenario,
    /// Runs made.
    pub runs: usize,
    /// Devices before and after.
    pub devices: (u32, u32),
    /// Events before and after.
    pub events: (usize, usize),
    /// Duration before and after.
    pub duration: (Dur, Dur),
    /// The failing report of the reduced scenario.
    pub report: Option<SimReport>,
}

fn candidates(s: &Scenario) -> Vec<Scenario> {
    let mut out = Vec::new();
    let mut push = |f: &dyn Fn(&mut Scenario)| {
        let mut c = s.clone();
        f(&mut c);
        out.push(c);
    };
    // Fewer groups.
    if s.groups.len() > 1 {
        for gi in (0..s.groups.len()).rev() {
            push(&|c: &mut Scenario| {
                let name = c.groups[gi].name.clone();
                c.groups.remove(gi);
                c.events.retain(|e| {
                    e.target().and_then(|t| t.0) != Some(name.as_str())
                        && !matches!(e, crate::scenario::Event::Reassign { from_group: Some(g), .. } | crate::scenario::Event::Reassign { to_group: Some(g), .. } if *g == name)
                });
            });
        }
    }
    // Fewer devices.
    for gi in 0..s.groups.len() {
        let n = s.groups[gi].devices;
        if n > 1 {
            push(&|c: &mut Scenario| c.groups[gi].devices = n / 2);
            if n > 2 {
                push(&|c: &mut Scenario| c.groups[gi].devices = n - 1);
            }
        }
    }
    // Fewer events.
    for ei in (0..s.events.len()).rev() {
        push(&|c: &mut Scenario| {
            c.events.remove(ei);
        });
    }
    // Shorter.
    if s.duration.0 > 60_000 {
        for f in [2u64, 4, 8] {
            let d = Dur((s.duration.0 / f).max(60_000));
            push(&|c: &mut Scenario| {
                for e in &mut c.events {
                    if e.at() > d {
                        e.set_at(d);
                    }
                }
                c.duration = d;
            });
        }
    }
    // Less work.
    if s.workload.office_edits_per_hour > 0.0 {
        push(&|c: &mut Scenario| c.workload.office_edits_per_hour = 0.0);
    }
    for ti in 0..s.workload.tables.len() {
        let t = &s.workload.tables[ti];
        if t.creates_per_device_hour > 0.0 || t.deletes_per_device_hour > 0.0 {
            push(&|c: &mut Scenario| {
                c.workload.tables[ti].creates_per_device_hour = 0.0;
                c.workload.tables[ti].deletes_per_device_hour = 0.0;
            });
        }
        if t.edits_per_device_hour > 0.5 {
            push(&|c: &mut Scenario| c.workload.tables[ti].edits_per_device_hour /= 2.0);
        }
        if t.hot_rows > 0 {
            push(&|c: &mut Scenario| {
                c.workload.tables[ti].hot_rows = 0;
                c.workload.tables[ti].hot_fraction = 0.0;
            });
        }
        if t.rows_per_device > 1 {
            let r = t.rows_per_device / 2;
            push(&|c: &mut Scenario| c.workload.tables[ti].rows_per_device = r);
        }
    }
    // Simpler networks.
    for gi in 0..s.groups.len() {
        if s.groups[gi].connectivity != Connectivity::AlwaysOn {
            push(&|c: &mut Scenario| c.groups[gi].connectivity = Connectivity::AlwaysOn);
        }
        let l = &s.groups[gi].link;
        if l.loss > 0.0 || l.duplicate > 0.0 || l.reorder > 0.0 {
            push(&|c: &mut Scenario| {
                let l = &mut c.groups[gi].link;
                l.loss = 0.0;
                l.duplicate = 0.0;
                l.reorder = 0.0;
            });
        }
        if s.groups[gi].clock_skew.0 > 0 {
            push(&|c: &mut Scenario| c.groups[gi].clock_skew = Dur(0));
        }
    }
    out
}

/// Greedily reduce a scenario (fewer groups, devices, events, ops, shorter, simpler links)
/// while the same invariant still fails with the same seed; at most `max_runs` runs.
///
/// `invariant`: the one to keep failing (default: the first the original run violates).
pub fn shrink(
    scenario: &Scenario,
    seed: u64,
    opts: &RunOptions,
    invariant: Option<Invariant>,
    max_runs: usize,
) -> Result<ShrinkOutcome, ScenarioError> {
    let _span = tracing::info_span!("shrink", scenario = %scenario.name, seed).entered();
    let first = crate::run_scenario(scenario, seed, opts)?;
    let mut runs = 1;
    let target = invariant
        .filter(|i| first.violates(*i))
        .or_else(|| first.violations.first().map(|v| v.invariant));
    let mut outcome = ShrinkOutcome {
        invariant: target,
        scenario: scenario.clone(),
        runs,
        devices: (scenario.device_count(), scenario.device_count()),
        events: (scenario.events.len(), scenario.events.len()),
        duration: (scenario.duration, scenario.duration),
        report: None,
    };
    let Some(target) = target else {
        return Ok(outcome);
    };
    let mut best = scenario.clone();
    let mut best_report = first;
    'outer: while runs < max_runs {
        for c in candidates(&best) {
            if runs >= max_runs {
                break 'outer;
            }
            if c.validate().is_err() {
                continue;
            }
            runs += 1;
            let r = crate::run_scenario(&c, seed, opts)?;
            if r.violates(target) {
                tracing::debug!(
                    devices = c.device_count(),
                    events = c.events.len(),
                    "shrunk"
                );
                best = c;
                best_report = r;
                continue 'outer;
            }
        }
        break;
    }
    best.name = format!("{}-shrunk", scenario.name);
    outcome.runs = runs;
    outcome.devices.1 = best.device_count();
    outcome.events.1 = best.events.len();
    outcome.duration.1 = best.duration;
    outcome.scenario = best;
    outcome.report = Some(best_report);
    Ok(outcome)
}
