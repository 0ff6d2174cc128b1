//! What a run reports: metrics, time series, violations and the trace digest.

use crate::histogram::{Histogram, Percentiles};
use serde::Serialize;
use std::fmt;

/// The invariants the checker evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Invariant {
    /// After the final heal, every replica of every row equals the hub's, and every op a device
    /// committed reached the hub (or was rejected).
    Convergence,
    /// Every op the hub acknowledged is still on the hub (checked when it restarts after a
    /// crash, on what it reopened, and at the end).
    NoAckedOpLost,
    /// No node reports the same op applied twice.
    NoOpAppliedTwice,
    /// Once a sync that started after a row left a device's set completes, the device no longer
    /// holds the row (unless its own pending ops still touch it).
    NoLeak,
    /// By the end of the run, every row that left a device's set has been evicted there.
    EvictionsHappen,
    /// A device's pull cursor never moves backwards (a crash may reset it to its durable value).
    CursorsForward,
}

impl Invariant {
    /// Every invariant.
    pub const ALL: [Invariant; 6] = [
        Invariant::Convergence,
        Invariant::NoAckedOpLost,
        Invariant::NoOpAppliedTwice,
        Invariant::NoLeak,
        Invariant::EvictionsHappen,
        Invariant::CursorsForward,
    ];
    /// The invariant's name as reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::Convergence => "convergence",
            Invariant::NoAckedOpLost => "no-acked-op-lost",
            Invariant::NoOpAppliedTwice => "no-op-applied-twice",
            Invariant::NoLeak => "no-leak",
            Invariant::EvictionsHappen => "evictions-happen",
            Invariant::CursorsForward => "cursors-forward",
        }
    }
    /// Look an invariant up by name.
    pub fn from_name(name: &str) -> Option<Invariant> {
        Invariant::ALL.into_iter().find(|i| i.name() == name)
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One invariant violation, with what led to it.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// Virtual time (ms).
    pub time_ms: u64,
    /// The node where it was seen (0 = hub).
    pub node: Option<u32>,
    /// The row involved, as `t<table>/r<id>`.
    pub row: Option<String>,
    /// The op involved.
    pub op: Option<u64>,
    /// What exactly is wrong.
    pub detail: String,
    /// The most recent simulation steps involving that node (oldest first).
    pub steps: Vec<String>,
}

/// Metrics of one device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceMetrics {
    /// Device number.
    pub device: u32,
    /// Its group.
    pub group: String,
    /// Edit → arrival here, for ops on rows this device should see.
    pub staleness: Percentiles,
    /// Bytes this device sent.
    pub bytes_up: u64,
    /// Bytes the hub sent to this device.
    pub bytes_down: u64,
    /// Connections opened (the battery proxy).
    pub connections_opened: u64,
    /// Ops the device committed.
    pub ops_committed: u64,
    /// Its ops the hub rejected.
    pub ops_rejected: u64,
    /// Rows evicted here.
    pub evictions: u64,
    /// Conflicts this device's edits met (detected at the hub while applying its push).
    pub conflicts: u64,
    /// Completed syncs (real engine: pulls that reached the end of a table's feed, the
    /// batches of a live connection included).
    pub syncs_completed: u64,
    /// Most pending ops at a sample.
    pub pending_ops_max: u64,
    /// Time the network was available (ms, until the end of the run).
    pub link_up_ms: u64,
}

/// Run-wide metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    /// Devices.
    pub devices: u32,
    /// Edit → arrival on each device that should see it, over all devices.
    pub staleness: Percentiles,
    /// Edits the workload issued (devices and office).
    pub ops_issued: u64,
    /// Edits nodes committed.
    pub ops_committed: u64,
    /// Edits a node refused locally (row not held yet, deleted...).
    pub edits_refused: u64,
    /// Office edits committed at the hub.
    pub office_ops: u64,
    /// Device ops the hub acknowledged.
    pub ops_acked: u64,
    /// Device ops the hub rejected.
    pub ops_rejected: u64,
    /// Ops applied on replicas other than their origin.
    pub ops_delivered: u64,
    /// Concurrent writes that lost (conflicts).
    pub conflicts: u64,
    /// Rows evicted from devices.
    pub evictions: u64,
    /// Completed device syncs.
    pub syncs_completed: u64,
    /// Bytes devices sent.
    pub bytes_up: u64,
    /// Bytes the hub sent.
    pub bytes_down: u64,
    /// Messages handed to a link.
    pub messages_sent: u64,
    /// Messages delivered.
    pub messages_delivered: u64,
    /// Messages lost (link down, loss, closed connection, dead receiver).
    pub messages_dropped: u64,
    /// Extra copies the links made.
    pub messages_duplicated: u64,
    /// Connections opened, all devices (the battery proxy).
    pub connections_opened: u64,
    /// Most pending ops on all devices at a sample.
    pub pending_ops_max: u64,
    /// Per device.
    pub per_device: Vec<DeviceMetrics>,
}

/// Time series sampled every `sample_interval_ms` (per-device series are kept for the HTML
/// report and not written to JSON).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    /// Sample spacing.
    pub sample_interval_ms: u64,
    /// Sample times.
    pub times_ms: Vec<u64>,
    /// Pending ops on all devices.
    pub pending_ops: Vec<u64>,
    /// Devices whose network was available.
    pub devices_up: Vec<u32>,
    /// Bytes sent up since the previous sample.
    pub bytes_up: Vec<u64>,
    /// Bytes sent down since the previous sample.
    pub bytes_down: Vec<u64>,
    /// Per device: pending ops at each sample.
    #[serde(skip)]
    pub device_pending: Vec<Vec<u32>>,
    /// Per device: 0 network down, 1 network up, 2 connected, at each sample.
    #[serde(skip)]
    pub device_link: Vec<Vec<u8>>,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// Scenario name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Devices.
    pub devices: u32,
    /// Scenario duration (ms): the final heal happens then.
    pub heal_ms: u64,
    /// When the run stopped (ms).
    pub end_ms: u64,
    /// Whether every replica converged after the final heal.
    pub converged: bool,
    /// Time from the final heal to convergence (ms).
    pub time_to_converge_ms: Option<u64>,
    /// Invariant violations (at most `RunOptions::max_violations` of each invariant).
    pub violations: Vec<Violation>,
    /// Violations found, including those not listed.
    pub violation_count: u64,
    /// FNV-1a digest of every delivered and dropped message, link change, crash and edit, as 16
    /// hex digits: equal on every machine for the same scenario and seed.
    pub trace_digest: String,
    /// Simulation steps processed.
    pub steps: u64,
    /// Metrics.
    pub metrics: Metrics,
    /// Time series.
    pub series: Series,
    /// Staleness distribution (for the HTML report).
    #[serde(skip)]
    pub staleness_histogram: Histogram,
}

impl SimReport {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
    /// Whether an invariant was violated.
    pub fn failed(&self) -> bool {
        self.violation_count > 0
    }
    /// Whether this invariant was violated.
    pub fn violates(&self, inv: Invariant) -> bool {
        self.violations.iter().any(|v| v.invariant == inv)
    }
}
