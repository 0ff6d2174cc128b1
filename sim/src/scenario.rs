//! Scenario files: who is in the field, how their coverage behaves, what they edit, and what
//! happens to them during the day.
//!
//! A scenario is TOML. Durations are strings with units (`"250ms"`, `"45s"`, `"30m"`, `"8h"`,
//! `"1d"`, combinable: `"1h30m"`) or integers in milliseconds. Devices are numbered from 1 in the
//! order of the groups (the hub is node 0). Every field but `name`, `duration` and `groups` has a
//! default.
//!
//! ```toml
//! name = "field-day"
//! description = "40 technicians, 8 hours, patchy coverage"
//! duration = "8h"          # workload and events run this long; then every fault heals
//! settle = "1h"            # at most this long after the final heal to converge (default 1h)
//! sample_interval = "1m"   # pending-ops / connectivity / bytes series resolution (default 1m)
//!
//! [sync]
//! interval = "5m"          # pull interval when nothing happens (default 5m)
//! batch = 64               # ops or rows per message (default 64)
//! live = true              # stay connected and let the hub poke devices (default true);
//!                          # false: connect only to sync, disconnect when idle
//! request_timeout = "10s"  # resend an unanswered request after this long (default 10s)
//!
//! [[groups]]
//! name = "technicians"
//! devices = 40
//! clock_skew = "2m"        # each device's clock is off by a uniform amount in [-2m, +2m]
//! edit_factor = 1.0        # multiplies the workload's per-device rates (default 1)
//! connectivity = { model = "gilbert-elliott", mean_up = "20m", mean_down = "8m" }
//! # or { model = "always-on" } (default)
//! # or { model = "scheduled", outages = [{ start = "2h", end = "3h" }], stagger = "5m" }
//! # or { model = "trace", file = "traces/van.csv", offset = "30m" }  (see below)
//! link = { latency = "80ms", jitter = "40ms", bandwidth_kbps = 2000, loss = 0.01,
//!          duplicate = 0.001, reorder = 0.01 }
//!
//! [workload]
//! office_edits_per_hour = 30   # edits made upstream (at the hub) on any row
//! [[workload.tables]]
//! name = "workorder"
//! rows_per_device = 20         # rows each device owns at the start
//! columns = 8
//! edits_per_device_hour = 6    # updates of the device's own rows
//! creates_per_device_hour = 0.5
//! deletes_per_device_hour = 0.1
//! hot_rows = 5                 # rows every device sees and edits (conflicts)
//! hot_fraction = 0.1           # share of a device's updates that go to hot rows
//!
//! [[events]]                   # `at` is virtual time; `group` or `device` picks devices
//! at = "2h"                    # (neither: every device); `spread` staggers the devices
//! kind = "partition"           # uniformly over [at, at + spread]
//! group = "rural"
//! ```
//!
//! Event kinds: `partition` / `heal` (force devices' links down / release them), `hold` /
//! `release` (connection stays up but nothing is delivered / deliver what was held),
//! `device-crash` / `device-restart`, `hub-crash` / `hub-restart`, `reassign` (`rows` random
//! rows of `table` owned by devices of `from_group` move to random devices of `to_group`),
//! `profile-change` (`tables`: the tables the devices' profile now selects), `role-change` or
//! `team-change` (`revoke` / `grant`: tables the user may no longer / again read).
//!
//! **Connectivity trace files** are CSV with a header line `t_ms,state,latency_ms,bandwidth_kbps,loss`
//! and one line per change: `t_ms` (virtual ms since the start, non-decreasing), `state` (`up` or
//! `down`), `latency_ms` (one-way), `bandwidth_kbps` (0 = unlimited), `loss` (probability in
//! [0, 1)). Empty lines and lines starting with `#` are ignored. Each line holds until the next;
//! the last holds to the end. The first line holds from time 0 whatever its `t_ms`. The path is
//! relative to the scenario file; `offset` delays each device's replay by a uniform amount in
//! [0, offset] so that a group does not move in lockstep.

use crate::connectivity::{parse_trace, TraceRow};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};

/// Most devices a scenario may have.
pub const DEVICES_MAX: u32 = 100_000;
/// Most tables a scenario may have (they are bit masks in profiles and roles).
pub const TABLES_MAX: usize = 64;
/// Longest scenario duration: 30 days.
pub const DURATION_MAX_MS: u64 = 30 * 24 * 3_600_000;

/// Why a scenario (or a trace file it names) was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The scenario or trace file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not match the scenario format.
    #[error("scenario is not valid TOML for the scenario format: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("scenario field `{field}`: {reason}")]
    Invalid {
        /// The field, as a path (`groups[1].link.loss`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// An event or parameter names a group that does not exist.
    #[error("unknown group `{0}`")]
    UnknownGroup(String),
    /// An event or parameter names a table that does not exist.
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    /// A line of a connectivity trace file is malformed.
    #[error("trace file {path}, line {line}: {reason}")]
    Trace {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A sweep parameter is malformed or unknown.
    #[error("sweep parameter: {0}")]
    Param(String),
    /// The engine could not build a node for this scenario (for example, a store that
    /// cannot be created).
    #[error("the engine cannot build the run: {0}")]
    Engine(String),
    /// A scenario could not be written back as TOML.
    #[error("cannot write the scenario as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A duration in milliseconds, written `"8h"`, `"1h30m"`, `"250ms"` or as an integer (ms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub u64);

impl Dur {
    /// Milliseconds.
    pub fn ms(self) -> u64 {
        self.0
    }
    /// From seconds.
    pub fn secs(s: u64) -> Dur {
        Dur(s * 1000)
    }
    /// From minutes.
    pub fn mins(m: u64) -> Dur {
        Dur(m * 60_000)
    }
    /// From hours.
    pub fn hours(h: u64) -> Dur {
        Dur(h * 3_600_000)
    }
    /// Parse `"1h30m"`, `"250ms"`, `"2.5h"`, `"0"`.
    pub fn parse(s: &str) -> Result<Dur, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration".into());
        }
        if let Ok(ms) = s.parse::<u64>() {
            return Ok(Dur(ms));
        }
        let mut total: f64 = 0.0;
        let mut rest = s;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("`{s}`: number without a unit (ms, s, m, h, d)"))?;
            if num_len == 0 {
                return Err(format!("`{s}`: expected a number"));
            }
            let num: f64 = rest[..num_len]
                .parse()
                .map_err(|_| format!("`{s}`: bad number"))?;
            rest = &rest[num_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let factor = match rest[..unit_len].trim() {
                "ms" => 1.0,
                "s" => 1_000.0,
                "m" | "min" => 60_000.0,
                "h" => 3_600_000.0,
                "d" => 86_400_000.0,
                u => return Err(format!("`{s}`: unknown unit `{u}` (ms, s, m, h, d)")),
            };
            rest = &rest[unit_len..];
            total += num * factor;
        }
        if !total.is_finite() || !(0.0..=1e15).contains(&total) {
            return Err(format!("`{s}`: out of range"));
        }
        Ok(Dur(total.round() as u64))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0;
        if ms == 0 {
            return write!(f, "0s");
        }
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms >= size {
                write!(f, "{}{}", ms / size, unit)?;
                ms %= size;
            }
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(ms) => Ok(Dur(ms)),
            Raw::Str(s) => Dur::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A whole scenario (see the module docs for the file format).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (shown in reports).
    pub name: String,
    /// One line on what it models.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// How long the workload and the events run; then every fault heals.
    pub duration: Dur,
    /// Longest time allowed after the final heal to converge.
    #[serde(default = "default_settle")]
    pub settle: Dur,
    /// Resolution of the time series.
    #[serde(default = "default_sample")]
    pub sample_interval: Dur,
    /// Sync protocol settings.
    #[serde(default)]
    pub sync: SyncConfig,
    /// Groups of devices.
    pub groups: Vec<Group>,
    /// What users edit.
    #[serde(default)]
    pub workload: Workload,
    /// Timed events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    /// Which nodes run it: `"real"` (fieldsync's store and protocol) or `"reference"` (the
    /// built-in protocol). Unset: the caller's choice (the CLI's `--engine`, default real).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::engine::Engine>,
}

fn default_settle() -> Dur {
    Dur::hours(1)
}
fn default_sample() -> Dur {
    Dur::mins(1)
}

/// Sync protocol settings handed to every node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Pull interval when nothing happens.
    pub interval: Dur,
    /// Ops (or rows) per message.
    pub batch: u32,
    /// Stay connected and let the hub poke devices; `false`: connect only to sync.
    pub live: bool,
    /// Resend an unanswered request after this long.
    pub request_timeout: Dur,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            interval: Dur::mins(5),
            batch: 64,
            live: true,
            request_timeout: Dur::secs(10),
        }
    }
}

/// A group of devices that share connectivity and behaviour.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Name (events refer to it).
    pub name: String,
    /// Number of devices.
    pub devices: u32,
    /// Each device's clock is off by a uniform amount in [-clock_skew, +clock_skew].
    #[serde(default)]
    pub clock_skew: Dur,
    /// Multiplies the workload's per-device rates.
    #[serde(default = "one")]
    pub edit_factor: f64,
    /// When the devices' network is available.
    #[serde(default)]
    pub connectivity: Connectivity,
    /// Link quality when it is available.
    #[serde(default)]
    pub link: LinkConfig,
}

fn one() -> f64 {
    1.0
}

/// When a device's network is available.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Connectivity {
    /// Always available.
    #[default]
    AlwaysOn,
    /// Down during the listed intervals.
    Scheduled {
        /// The outages.
        outages: Vec<Outage>,
        /// Each device's outages shift by a uniform amount in [0, stagger].
        #[serde(default)]
        stagger: Dur,
    },
    /// Two-state Markov on/off model with exponential sojourn times.
    GilbertElliott {
        /// Mean time up.
        mean_up: Dur,
        /// Mean time down.
        mean_down: Dur,
    },
    /// Replay of a trace file (see the module docs).
    Trace {
        /// CSV file, relative to the scenario file.
        file: PathBuf,
        /// Each device's replay is delayed by a uniform amount in [0, offset] (the first
        /// line's state holds until then).
        #[serde(default)]
        offset: Dur,
        /// The parsed rows (loaded by [`Scenario::from_file`] / [`Scenario::load_traces`]).
        #[serde(skip)]
        rows: Vec<TraceRow>,
    },
}

/// One scheduled outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Start.
    pub start: Dur,
    /// End (exclusive).
    pub end: Dur,
}

/// Per-link quality (both directions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// One-way latency.
    pub latency: Dur,
    /// Extra one-way delay, uniform in [0, jitter].
    pub jitter: Dur,
    /// Bandwidth in kbit/s (0: unlimited); serialization delay is size / bandwidth.
    pub bandwidth_kbps: u64,
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Probability a message is delayed past later ones (by up to 3x the latency).
    pub reorder: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            latency: Dur(50),
            jitter: Dur(10),
            bandwidth_kbps: 10_000,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }
}

/// What users edit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Edits made upstream by office users (at the hub) per hour, on random rows.
    pub office_edits_per_hour: f64,
    /// Per-table rates.
    pub tables: Vec<TableLoad>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            office_edits_per_hour: 0.0,
            tables: vec![TableLoad::default()],
        }
    }
}

/// One table's rows and edit rates.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableLoad {
    /// Table name.
    pub name: String,
    /// Rows each device owns at the start.
    pub rows_per_device: u32,
    /// Columns per row.
    pub columns: u32,
    /// Updates per device-hour.
    pub edits_per_device_hour: f64,
    /// Creates per device-hour.
    pub creates_per_device_hour: f64,
    /// Deletes per device-hour.
    pub deletes_per_device_hour: f64,
    /// Rows every device sees and may edit.
    pub hot_rows: u32,
    /// Share of updates that go to hot rows.
    pub hot_fraction: f64,
}

impl Default for TableLoad {
    fn default() -> Self {
        TableLoad {
            name: "workorder".into(),
            rows_per_device: 10,
            columns: 8,
            edits_per_device_hour: 6.0,
            creates_per_device_hour: 0.0,
            deletes_per_device_hour: 0.0,
            hot_rows: 0,
            hot_fraction: 0.0,
        }
    }
}

/// A timed event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Event {
    /// Force the devices' links down.
    Partition {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
        /// Stagger the devices over [at, at + spread].
        #[serde(default, skip_serializing_if = "is_zero")]
        spread: Dur,
    },
    /// Release a partition.
    Heal {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
        /// Stagger the devices over [at, at + spread].
        #[serde(default, skip_serializing_if = "is_zero")]
        spread: Dur,
    },
    /// Keep connections up but deliver nothing.
    Hold {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
    },
    /// Deliver what was held.
    Release {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
    },
    /// Crash devices (they lose what was not durable).
    DeviceCrash {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
    },
    /// Restart crashed devices.
    DeviceRestart {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
    },
    /// Crash the hub.
    HubCrash {
        /// When.
        at: Dur,
    },
    /// Restart the hub.
    HubRestart {
        /// When.
        at: Dur,
    },
    /// Move rows between devices' sets.
    Reassign {
        /// When.
        at: Dur,
        /// Table of the rows (default: the first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        /// How many rows.
        rows: u32,
        /// Take rows owned by devices of this group (default: any).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_group: Option<String>,
        /// Give them to devices of this group (default: any).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_group: Option<String>,
    },
    /// The devices' offline profile now selects exactly these tables.
    ProfileChange {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
        /// Tables selected.
        tables: Vec<String>,
    },
    /// The devices' user gains or loses read access to tables (a role or team change;
    /// `team-change` is accepted as another name).
    #[serde(alias = "team-change")]
    RoleChange {
        /// When.
        at: Dur,
        /// Devices of this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// This device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<u32>,
        /// Tables no longer readable.
        #[serde(default)]
        revoke: Vec<String>,
        /// Tables readable again.
        #[serde(default)]
        grant: Vec<String>,
    },
}

fn is_zero(d: &Dur) -> bool {
    d.0 == 0
}

impl Event {
    /// When the event happens.
    pub fn at(&self) -> Dur {
        match self {
            Event::Partition { at, .. }
            | Event::Heal { at, .. }
            | Event::Hold { at, .. }
            | Event::Release { at, .. }
            | Event::DeviceCrash { at, .. }
            | Event::DeviceRestart { at, .. }
            | Event::HubCrash { at }
            | Event::HubRestart { at }
            | Event::Reassign { at, .. }
            | Event::ProfileChange { at, .. }
            | Event::RoleChange { at, .. } => *at,
        }
    }
    /// Set when the event happens.
    pub fn set_at(&mut self, t: Dur) {
        match self {
            Event::Partition { at, .. }
            | Event::Heal { at, .. }
            | Event::Hold { at, .. }
            | Event::Release { at, .. }
            | Event::DeviceCrash { at, .. }
            | Event::DeviceRestart { at, .. }
            | Event::HubCrash { at }
            | Event::HubRestart { at }
            | Event::Reassign { at, .. }
            | Event::ProfileChange { at, .. }
            | Event::RoleChange { at, .. } => *at = t,
        }
    }
    /// The (group, device) target, for events that pick devices.
    pub fn target(&self) -> Option<(Option<&str>, Option<u32>)> {
        match self {
            Event::Partition { group, device, .. }
            | Event::Heal { group, device, .. }
            | Event::Hold { group, device, .. }
            | Event::Release { group, device, .. }
            | Event::DeviceCrash { group, device, .. }
            | Event::DeviceRestart { group, device, .. }
            | Event::ProfileChange { group, device, .. }
            | Event::RoleChange { group, device, .. } => Some((group.as_deref(), *device)),
            _ => None,
        }
    }
}

impl Scenario {
    /// Parse TOML; trace files are resolved against `base_dir` and loaded.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Scenario, ScenarioError> {
        let mut s: Scenario = toml::from_str(text)?;
        s.load_traces(base_dir)?;
        s.validate()?;
        Ok(s)
    }

    /// Read, parse and validate a scenario file (and the trace files it names).
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Scenario::from_toml_str(&text, base)
    }

    /// Write the scenario back as TOML (trace files by path).
    pub fn to_toml(&self) -> Result<String, ScenarioError> {
        Ok(toml::to_string(self)?)
    }

    /// Write the scenario as TOML leaving out every value equal to its default (what
    /// `--shrink` prints): shorter, and it reads back to the same scenario.
    pub fn to_toml_minimal(&self) -> Result<String, ScenarioError> {
        fn table_of<T: Serialize>(v: &T) -> Result<toml::Table, ScenarioError> {
            Ok(toml::Table::try_from(v)?)
        }
        fn prune(v: &mut toml::Table, d: &toml::Table, keep: &[&str]) {
            v.retain(|k, val| keep.contains(&k) || d.get(k) != Some(val));
        }
        let mut top = table_of(self)?;
        let defaults = table_of(&Scenario {
            name: String::new(),
            description: String::new(),
            duration: Dur(0),
            settle: default_settle(),
            sample_interval: default_sample(),
            sync: SyncConfig::default(),
            groups: Vec::new(),
            workload: Workload::default(),
            events: Vec::new(),
            engine: None,
        })?;
        if let Some(toml::Value::Table(sync)) = top.get_mut("sync") {
            if let Some(toml::Value::Table(d)) = defaults.get("sync") {
                prune(sync, d, &[]);
            }
        }
        let group_default = table_of(&Group {
            name: String::new(),
            devices: 0,
            clock_skew: Dur(0),
            edit_factor: 1.0,
            connectivity: Connectivity::AlwaysOn,
            link: LinkConfig::default(),
        })?;
        if let Some(toml::Value::Array(groups)) = top.get_mut("groups") {
            for g in groups.iter_mut() {
                if let toml::Value::Table(g) = g {
                    if let (Some(toml::Value::Table(link)), Some(toml::Value::Table(d))) =
                        (g.get_mut("link"), group_default.get("link"))
                    {
                        prune(link, d, &[]);
                    }
                    prune(g, &group_default, &["name", "devices"]);
                    g.retain(|_, v| !matches!(v, toml::Value::Table(t) if t.is_empty()));
                }
            }
        }
        let table_default = table_of(&TableLoad::default())?;
        if let Some(toml::Value::Table(w)) = top.get_mut("workload") {
            if let Some(toml::Value::Array(tables)) = w.get_mut("tables") {
                for t in tables.iter_mut() {
                    if let toml::Value::Table(t) = t {
                        prune(t, &table_default, &["name"]);
                    }
                }
            }
            if let Some(toml::Value::Table(d)) = defaults.get("workload") {
                prune(w, d, &[]);
            }
        }
        prune(&mut top, &defaults, &["name", "duration", "groups"]);
        top.retain(|_, v| !matches!(v, toml::Value::Table(t) if t.is_empty()));
        Ok(toml::to_string(&top)?)
    }

    /// Load every trace file the groups name, relative to `base_dir`.
    pub fn load_traces(&mut self, base_dir: &Path) -> Result<(), ScenarioError> {
        for g in &mut self.groups {
            if let Connectivity::Trace { file, rows, .. } = &mut g.connectivity {
                let path = if file.is_absolute() {
                    file.clone()
                } else {
                    base_dir.join(&*file)
                };
                let text = std::fs::read_to_string(&path).map_err(|source| ScenarioError::Io {
                    path: path.clone(),
                    source,
                })?;
                *rows = parse_trace(&text, &path)?;
            }
        }
        Ok(())
    }

    /// Total number of devices.
    pub fn device_count(&self) -> u32 {
        self.groups.iter().map(|g| g.devices).sum()
    }

    /// Index of a table by name.
    pub fn table_index(&self, name: &str) -> Result<u32, ScenarioError> {
        self.workload
            .tables
            .iter()
            .position(|t| t.name == name)
            .map(|i| i as u32)
            .ok_or_else(|| ScenarioError::UnknownTable(name.to_string()))
    }

    /// Index of a group by name.
    pub fn group_index(&self, name: &str) -> Result<usize, ScenarioError> {
        self.groups
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| ScenarioError::UnknownGroup(name.to_string()))
    }

    /// Check every value and cross-reference; a scenario that passes runs without panicking.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.duration.0 == 0 || self.duration.0 > DURATION_MAX_MS {
            return Err(invalid("duration", "must be > 0 and at most 30 days"));
        }
        if self.settle.0 > DURATION_MAX_MS {
            return Err(invalid("settle", "at most 30 days"));
        }
        if self.sample_interval.0 < 100 {
            return Err(invalid("sample_interval", "must be at least 100ms"));
        }
        if (self.duration.0 + self.settle.0) / self.sample_interval.0 > 1_000_000 {
            return Err(invalid("sample_interval", "more than 1,000,000 samples"));
        }
        if self.sync.batch == 0 || self.sync.batch > 100_000 {
            return Err(invalid("sync.batch", "must be in 1..=100000"));
        }
        if self.sync.interval.0 < 1000 {
            return Err(invalid("sync.interval", "must be at least 1s"));
        }
        if self.sync.request_timeout.0 < 10 {
            return Err(invalid("sync.request_timeout", "must be at least 10ms"));
        }
        if self.groups.is_empty() {
            return Err(invalid("groups", "at least one group"));
        }
        let total: u64 = self.groups.iter().map(|g| u64::from(g.devices)).sum();
        if total == 0 || total > u64::from(DEVICES_MAX) {
            return Err(invalid("groups", "between 1 and 100000 devices in all"));
        }
        for (i, g) in self.groups.iter().enumerate() {
            let f = |x: &str| format!("groups[{i}].{x}");
            // Group names become app and profile names (quoted in the real engine's TOML).
            if g.name.is_empty()
                || g.name.len() > 64
                || g.name
                    .chars()
                    .any(|c| c == '"' || c == '\\' || c.is_control())
            {
                return Err(invalid(
                    f("name"),
                    "1 to 64 characters, no quote, backslash or control character",
                ));
            }
            if self.groups.iter().filter(|o| o.name == g.name).count() > 1 {
                return Err(invalid(f("name"), format!("duplicate group `{}`", g.name)));
            }
            if !(g.edit_factor.is_finite() && g.edit_factor >= 0.0 && g.edit_factor <= 1000.0) {
                return Err(invalid(f("edit_factor"), "must be in [0, 1000]"));
            }
            if g.clock_skew.0 > 86_400_000 {
                return Err(invalid(f("clock_skew"), "at most 1 day"));
            }
            for (name, p) in [
                ("link.loss", g.link.loss),
                ("link.duplicate", g.link.duplicate),
                ("link.reorder", g.link.reorder),
            ] {
                if !(0.0..=1.0).contains(&p) {
                    return Err(invalid(f(name), "a probability in [0, 1]"));
                }
            }
            if g.link.loss >= 1.0 {
                return Err(invalid(f("link.loss"), "must be below 1"));
            }
            if g.link.latency.0 > 600_000 || g.link.jitter.0 > 600_000 {
                return Err(invalid(f("link.latency"), "latency and jitter at most 10m"));
            }
            match &g.connectivity {
                Connectivity::AlwaysOn => {}
                Connectivity::Scheduled { outages, .. } => {
                    for (k, o) in outages.iter().enumerate() {
                        if o.end <= o.start {
                            return Err(invalid(
                                f(&format!("connectivity.outages[{k}]")),
                                "end must be after start",
                            ));
                        }
                    }
                }
                Connectivity::GilbertElliott { mean_up, mean_down } => {
                    if mean_up.0 == 0 || mean_down.0 == 0 {
                        return Err(invalid(
                            f("connectivity"),
                            "mean_up and mean_down must be > 0",
                        ));
                    }
                }
                Connectivity::Trace { rows, file, .. } => {
                    if rows.is_empty() {
                        return Err(invalid(
                            f("connectivity.file"),
                            format!("trace {} has no rows (or was not loaded)", file.display()),
                        ));
                    }
                }
            }
        }
        let tables = &self.workload.tables;
        if tables.is_empty() || tables.len() > TABLES_MAX {
            return Err(invalid("workload.tables", "between 1 and 64 tables"));
        }
        let o = self.workload.office_edits_per_hour;
        if !(o.is_finite() && (0.0..=1e6).contains(&o)) {
            return Err(invalid(
                "workload.office_edits_per_hour",
                "must be in [0, 1e6]",
            ));
        }
        let mut total_rows: u64 = 0;
        for (i, t) in tables.iter().enumerate() {
            let f = |x: &str| format!("workload.tables[{i}].{x}");
            if !fieldsync_store::Schema::is_valid_name(&t.name) {
                return Err(invalid(
                    f("name"),
                    format!(
                        "`{}` is not a table name: 1 to 64 lower-case ASCII letters, digits \
                         and `_`, starting with a letter",
                        t.name
                    ),
                ));
            }
            if tables.iter().filter(|o| o.name == t.name).count() > 1 {
                return Err(invalid(f("name"), format!("duplicate table `{}`", t.name)));
            }
            if t.columns == 0 || t.columns > 1024 {
                return Err(invalid(f("columns"), "must be in 1..=1024"));
            }
            for (name, r) in [
                ("edits_per_device_hour", t.edits_per_device_hour),
                ("creates_per_device_hour", t.creates_per_device_hour),
                ("deletes_per_device_hour", t.deletes_per_device_hour),
            ] {
                if !(r.is_finite() && (0.0..=100_000.0).contains(&r)) {
                    return Err(invalid(f(name), "must be in [0, 100000]"));
                }
            }
            if !(0.0..=1.0).contains(&t.hot_fraction) {
                return Err(invalid(f("hot_fraction"), "a fraction in [0, 1]"));
            }
            if t.hot_fraction > 0.0 && t.hot_rows == 0 {
                return Err(invalid(f("hot_fraction"), "needs hot_rows > 0"));
            }
            total_rows += u64::from(t.rows_per_device) * total + u64::from(t.hot_rows);
        }
        if total_rows > 50_000_000 {
            return Err(invalid(
                "workload.tables",
                "more than 50,000,000 rows in all",
            ));
        }
        for (i, e) in self.events.iter().enumerate() {
            let f = |x: &str| format!("events[{i}].{x}");
            if e.at() > self.duration {
                return Err(invalid(f("at"), "after the scenario's duration"));
            }
            if let Some((group, device)) = e.target() {
                if let Some(g) = group {
                    self.group_index(g)?;
                }
                if let Some(d) = device {
                    if d == 0 || u64::from(d) > total {
                        return Err(invalid(f("device"), format!("devices are 1..={total}")));
                    }
                }
            }
            match e {
                Event::Reassign {
                    table,
                    from_group,
                    to_group,
                    ..
                } => {
                    if let Some(t) = table {
                        self.table_index(t)?;
                    }
                    for g in [from_group, to_group].into_iter().flatten() {
                        self.group_index(g)?;
                    }
                }
                Event::ProfileChange { tables, .. } => {
                    for t in tables {
                        self.table_index(t)?;
                    }
                }
                Event::RoleChange { revoke, grant, .. } => {
                    for t in revoke.iter().chain(grant) {
                        self.table_index(t)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A copy cut down to at most `max_devices` devices (every group keeps at least one) and at
    /// most `max_duration`, with event times scaled in proportion; for fast tests.
    pub fn downscaled(&self, max_devices: u32, max_duration: Dur) -> Scenario {
        let mut s = self.clone();
        let total = s.device_count().max(1);
        if total > max_devices {
            for g in &mut s.groups {
                let scaled =
                    (u64::from(g.devices) * u64::from(max_devices) / u64::from(total)) as u32;
                g.devices = scaled.max(1);
            }
        }
        let new_total = s.device_count();
        if s.duration > max_duration && s.duration.0 > 0 {
            let num = max_duration.0;
            let den = s.duration.0;
            let scale =
                |d: Dur| Dur(((u128::from(d.0) * u128::from(num)) / u128::from(den)) as u64);
            for e in &mut s.events {
                let t = scale(e.at());
                e.set_at(t);
                if let Event::Partition { spread, .. } | Event::Heal { spread, .. } = e {
                    *spread = scale(*spread);
                }
            }
            for g in &mut s.groups {
                if let Connectivity::Scheduled { outages, stagger } = &mut g.connectivity {
                    for o in outages.iter_mut() {
                        o.start = scale(o.start);
                        o.end = Dur(scale(o.end).0.max(o.start.0 + 1));
                    }
                    *stagger = scale(*stagger);
                }
            }
            s.duration = max_duration;
        }
        // Device numbers in events must stay in range.
        for e in &mut s.events {
            if let Event::Partition { device, .. }
            | Event::Heal { device, .. }
            | Event::Hold { device, .. }
            | Event::Release { device, .. }
            | Event::DeviceCrash { device, .. }
            | Event::DeviceRestart { device, .. }
            | Event::ProfileChange { device, .. }
            | Event::RoleChange { device, .. } = e
            {
                if let Some(d) = device {
                    *d = (*d).min(new_total).max(1);
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("8h"), Ok(Dur(8 * 3_600_000)));
        assert_eq!(Dur::parse("1h30m"), Ok(Dur(90 * 60_000)));
        assert_eq!(Dur::parse("250ms"), Ok(Dur(250)));
        assert_eq!(Dur::parse("2.5s"), Ok(Dur(2500)));
        assert_eq!(Dur::parse("42"), Ok(Dur(42)));
        assert!(Dur::parse("5 parsecs").is_err());
        assert!(Dur::parse("h").is_err());
        assert!(Dur::parse("").is_err());
        for ms in [0, 250, 1000, 90_000, 5_400_000, 86_400_000, 3_601_500] {
            assert_eq!(Dur::parse(&Dur(ms).to_string()), Ok(Dur(ms)), "{ms}");
        }
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let base = Path::new(".");
        let e = Scenario::from_toml_str("name = 1", base).unwrap_err();
        assert!(matches!(e, ScenarioError::Toml(_)));
        let e = Scenario::from_toml_str(
            "name='x'\nduration='1h'\n[[groups]]\nname='a'\ndevices=2\nlink={loss=2.0}",
            base,
        )
        .unwrap_err();
        assert!(matches!(e, ScenarioError::Invalid { .. }), "{e}");
        let e = Scenario::from_toml_str(
            "name='x'\nduration='1h'\n[[groups]]\nname='a'\ndevices=2\n[[events]]\nat='1m'\nkind='partition'\ngroup='b'",
            base,
        )
        .unwrap_err();
        assert!(matches!(e, ScenarioError::UnknownGroup(_)), "{e}");
        let e = Scenario::from_toml_str(
            "name='x'\nduration='1h'\n[[groups]]\nname='a'\ndevices=2\nconnectivity={model='trace',file='nope.csv'}",
            base,
        )
        .unwrap_err();
        assert!(matches!(e, ScenarioError::Io { .. }), "{e}");
        let e = Scenario::from_toml_str(
            "name='x'\nduration='1h'\nbogus=3\n[[groups]]\nname='a'\ndevices=2",
            base,
        )
        .unwrap_err();
        assert!(matches!(e, ScenarioError::Toml(_)), "{e}");
        // a typo in an event must not silently widen it to every device
        let e = Scenario::from_toml_str(
            "name='x'\nduration='1h'\n[[groups]]\nname='a'\ndevices=2\n[[events]]\nat='1m'\nkind='partition'\ngrup='a'",
            base,
        )
        .unwrap_err();
        assert!(matches!(e, ScenarioError::Toml(_)), "{e}");
        let e = Scenario::from_toml_str(
            "name='x'\nduration='1h'\n[[groups]]\nname='a'\ndevices=2\nconnectivity={model='gilbert-elliott',mean_up='1m',mean_dwn='1m'}",
            base,
        )
        .unwrap_err();
        assert!(matches!(e, ScenarioError::Toml(_)), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let s = Scenario::from_toml_str(
            "name='x'\nduration='1h'\n[[groups]]\nname='a'\ndevices=2\nconnectivity={model='gilbert-elliott',mean_up='10m',mean_down='5m'}\n[[events]]\nat='30m'\nkind='hub-crash'\n[[events]]\nat='31m'\nkind='hub-restart'",
            Path::new("."),
        )
        .unwrap();
        let text = s.to_toml().unwrap();
        let back = Scenario::from_toml_str(&text, Path::new(".")).unwrap();
        assert_eq!(back.events, s.events);
        assert_eq!(back.groups[0].connectivity, s.groups[0].connectivity);
        assert_eq!(back.duration, s.duration);
        let min = s.to_toml_minimal().unwrap();
        assert!(
            !min.contains("bandwidth_kbps") && !min.contains("[sync]"),
            "{min}"
        );
        let back = Scenario::from_toml_str(&min, Path::new(".")).unwrap();
        assert_eq!(back.to_toml().unwrap(), text);
    }
}
