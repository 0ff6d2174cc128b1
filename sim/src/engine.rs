//! The discrete-event core: virtual time, one seeded random source, an event queue ordered by
//! (time, sequence number), hosts behind [`FieldNode`], links, workload, faults, invariants.
//!
//! ```
//! use fieldsync_sim::{Scenario, SimBuilder, SimpleFactory};
//! let scenario = Scenario::from_toml_str(
//!     "name = 'two'\nduration = '10m'\n[[groups]]\nname = 'a'\ndevices = 2",
//!     std::path::Path::new("."),
//! ).unwrap();
//! let mut sim = SimBuilder::new(&scenario).rng_seed(7).build(SimpleFactory::default()).unwrap();
//! sim.run_until(60_000);
//! sim.partition(fieldsync_sim::NodeId(1)); // fault controls: partition/repair/crash/bounce/hold/release
//! let report = sim.finish();
//! assert!(report.converged, "{:?}", report.violations);
//! ```

use crate::connectivity::{exp_ms, sub_rng, ConnectivityModel, LinkParams};
use crate::digest::Fnv64;
use crate::histogram::Histogram;
use crate::invariants::{Checker, Finding};
use crate::metrics::{DeviceMetrics, Invariant, Metrics, Series, SimReport, Violation};
use crate::node::{
    AdminEvent, Edit, EditKind, EditResult, FieldNode, NodeContext, NodeEvent, NodeFactory, NodeId,
    OpId, RowKey, SimMessage, Transmit, HUB, SIM_EPOCH_MS,
};
use crate::scenario::{Event, Scenario, ScenarioError};
use crate::world::{Owner, World};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

/// How a run behaves (not what it simulates: that is the scenario).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Most violations listed in the report per invariant (all are counted).
    pub max_violations: usize,
    /// Stop at the first violation (shrinking uses this).
    pub stop_on_violation: bool,
    /// Steps kept per violation.
    pub steps_per_violation: usize,
    /// Interval of convergence checks after the final heal (ms).
    pub converge_check_ms: u64,
    /// For the built-in nodes: a planted bug (tests and demonstrations only).
    pub planted_bug: Option<crate::simple::PlantedBug>,
    /// Which nodes [`crate::run_scenario`] builds (default: the reference nodes, fast; the
    /// CLI defaults to the real engine).
    pub engine: Engine,
    /// Real engine: devices run `replication::replica::DeviceReplica` for the protocol's
    /// storage calls (default) rather than the simulator's minimal adapter.
    pub device_replica: bool,
}

/// Which node implementation a run uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// The built-in last-writer-wins protocol ([`crate::simple`]): fast, for framework tests.
    #[default]
    Reference,
    /// fieldsync's real store and protocol sessions ([`crate::real`]).
    Real,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Reference => "reference",
            Engine::Real => "real",
        })
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "reference" => Ok(Engine::Reference),
            "real" => Ok(Engine::Real),
            other => Err(format!("unknown engine `{other}` (real, reference)")),
        }
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_violations: 10,
            stop_on_violation: false,
            steps_per_violation: 16,
            converge_check_ms: 1_000,
            planted_bug: None,
            engine: Engine::Reference,
            device_replica: true,
        }
    }
}

/// Builds a [`Sim`], turmoil style: `SimBuilder::new(&scenario).rng_seed(42).build(factory)`.
#[derive(Debug)]
pub struct SimBuilder<'a> {
    scenario: &'a Scenario,
    seed: u64,
    options: RunOptions,
}

impl<'a> SimBuilder<'a> {
    /// A builder for this scenario (seed 0, default options).
    pub fn new(scenario: &'a Scenario) -> Self {
        SimBuilder {
            scenario,
            seed: 0,
            options: RunOptions::default(),
        }
    }
    /// The seed of the run's one random source.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Run options.
    pub fn options(mut self, options: RunOptions) -> Self {
        self.options = options;
        self
    }
    /// Validate the scenario and build the hosts.
    pub fn build<F: NodeFactory>(self, factory: F) -> Result<Sim<F::Node>, ScenarioError> {
        self.scenario.validate()?;
        Sim::new(self.scenario, self.seed, self.options, factory)
    }
}

#[derive(Debug)]
enum Ev<M> {
    Deliver {
        from: NodeId,
        to: NodeId,
        epoch: u64,
        /// When the sender sent it (virtual time).
        sent: u64,
        msg: M,
    },
    Timer {
        node: NodeId,
        gen: u64,
    },
    Link {
        device: NodeId,
        up: bool,
        quality: Option<(u64, u64, f64)>,
    },
    Fault(Fault),
    Edit {
        device: NodeId,
    },
    Office,
    Sample,
    Heal,
    ConvergeCheck,
}

#[derive(Clone, Debug)]
enum Fault {
    Partition(NodeId),
    Repair(NodeId),
    Hold(NodeId),
    Release(NodeId),
    Crash(NodeId),
    Restart(NodeId),
    Reassign {
        table: u32,
        rows: u32,
        from: Option<usize>,
        to: Option<usize>,
    },
    Profile {
        device: NodeId,
        tables: u64,
    },
    Role {
        device: NodeId,
        revoke: u64,
        grant: u64,
    },
}

#[derive(Debug)]
struct Queued<M> {
    at: u64,
    seq: u64,
    ev: Ev<M>,
}

impl<M> PartialEq for Queued<M> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<M> Eq for Queued<M> {}
impl<M> PartialOrd for Queued<M> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<M> Ord for Queued<M> {
    fn cmp(&self, o: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse for earliest first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug)]
struct Host<N> {
    node: N,
    alive: bool,
    skew: i64,
    timer_at: Option<u64>,
    timer_gen: u64,
    group: usize,
}

#[derive(Debug)]
struct Link<M> {
    model: Option<ConnectivityModel>,
    net_up: bool,
    partitioned: bool,
    connected: bool,
    epoch: u64,
    held: bool,
    /// Held messages: from, to, epoch, sent, message.
    held_msgs: Vec<(NodeId, NodeId, u64, u64, M)>,
    params: LinkParams,
    busy: [u64; 2],
    last_arrival: [u64; 2],
    avail_since: Option<u64>,
    up_ms: u64,
    rng: ChaCha8Rng,
}

impl<M> Link<M> {
    fn available(&self) -> bool {
        self.net_up && !self.partitioned
    }
}

#[derive(Clone, Copy, Debug)]
enum StepKind {
    Delivered(&'static str, usize),
    Dropped(&'static str, &'static str),
    Connected,
    Disconnected,
    NetUp,
    NetDown,
    Partition,
    Repair,
    Crash,
    Restart,
    Edit(OpId, RowKey, EditResult),
    Admin(&'static str),
    Node(NodeEvent),
}

#[derive(Clone, Copy, Debug)]
struct Step {
    t: u64,
    node: NodeId,
    peer: Option<NodeId>,
    kind: StepKind,
}

impl Step {
    fn render(&self) -> String {
        let t = format!("t={}.{:03}s", self.t / 1000, self.t % 1000);
        let n = self.node;
        let p = self
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        match self.kind {
            StepKind::Delivered(k, b) => format!("{t} {p}→{n} {k} ({b} B) delivered"),
            StepKind::Dropped(k, why) => format!("{t} {n}→{p} {k} dropped: {why}"),
            StepKind::Connected => format!("{t} {n} connected to {p}"),
            StepKind::Disconnected => format!("{t} {n} disconnected from {p}"),
            StepKind::NetUp => format!("{t} {n} network up"),
            StepKind::NetDown => format!("{t} {n} network down"),
            StepKind::Partition => format!("{t} {n} partitioned"),
            StepKind::Repair => format!("{t} {n} partition repaired"),
            StepKind::Crash => format!("{t} {n} crashed"),
            StepKind::Restart => format!("{t} {n} restarted"),
            StepKind::Edit(op, row, r) => format!("{t} {n} edits {row} as {op}: {r:?}"),
            StepKind::Admin(what) => format!("{t} {n} admin: {what}"),
            StepKind::Node(ev) => format!("{t} {n} {ev}"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct OpMeta {
    issued: u64,
}

const RECENT_STEPS: usize = 4096;

/// A running simulation (see the module docs). Build it with [`SimBuilder`].
pub struct Sim<N: FieldNode> {
    scenario: Scenario,
    seed: u64,
    opts: RunOptions,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Queued<N::Msg>>,
    hosts: Vec<Host<N>>,
    links: Vec<Link<N::Msg>>,
    rng: ChaCha8Rng,
    digest: Fnv64,
    recent: VecDeque<Step>,
    steps: u64,
    checker: Checker,
    oracle: World,
    deleted: BTreeSet<RowKey>,
    hot_by_table: Vec<Vec<RowKey>>,
    initial_rows_end: u64,
    next_row: u64,
    ops: Vec<OpMeta>,
    pending_admin: Vec<AdminEvent>,
    healed: bool,
    heal_at: u64,
    end_at: u64,
    converged_at: Option<u64>,
    dirty_since_check: bool,
    /// The device the last convergence check found behind: checked first next time, as it
    /// is the likeliest to be behind still.
    behind_at_check: Option<NodeId>,
    stopped: bool,
    // metrics
    m: Metrics,
    dev: Vec<DeviceMetrics>,
    stale_all: Histogram,
    stale_dev: Vec<Histogram>,
    series: Series,
    bytes_up_acc: u64,
    bytes_down_acc: u64,
    /// While a message is handed to its receiver: when it was sent.
    delivering_sent: Option<u64>,
    /// While a message is handed to its receiver: its sender.
    delivering_from: Option<NodeId>,
}

impl<N: FieldNode> std::fmt::Debug for Sim<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("scenario", &self.scenario.name)
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("nodes", &self.hosts.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

fn bit(t: u32) -> u64 {
    1u64 << (t % 64)
}

impl<N: FieldNode> Sim<N> {
    fn new<F: NodeFactory<Node = N>>(
        scenario: &Scenario,
        seed: u64,
        opts: RunOptions,
        mut factory: F,
    ) -> Result<Sim<N>, ScenarioError> {
        let _span = tracing::info_span!("sim_build", scenario = %scenario.name, seed).entered();
        let devices = scenario.device_count();
        let tables: Vec<String> = scenario
            .workload
            .tables
            .iter()
            .map(|t| t.name.clone())
            .collect();
        // Initial world: each device owns rows_per_device rows of each table; hot rows shared.
        let mut world = World::new(devices);
        let mut next_row: u64 = 0;
        let mut hot_by_table = Vec::new();
        for (ti, t) in scenario.workload.tables.iter().enumerate() {
            let mut hot = Vec::new();
            for _ in 0..t.hot_rows {
                let r = RowKey {
                    table: ti as u32,
                    id: next_row,
                };
                next_row += 1;
                world.set_owner(r, Owner::Shared);
                hot.push(r);
            }
            hot_by_table.push(hot);
            for d in 1..=devices {
                for _ in 0..t.rows_per_device {
                    let r = RowKey {
                        table: ti as u32,
                        id: next_row,
                    };
                    next_row += 1;
                    world.set_owner(r, Owner::Device(NodeId(d)));
                }
            }
        }
        let groups: Vec<String> = scenario.groups.iter().map(|g| g.name.clone()).collect();
        let device_groups: Vec<usize> = scenario
            .groups
            .iter()
            .enumerate()
            .flat_map(|(i, g)| std::iter::repeat_n(i, g.devices as usize))
            .collect();
        let columns: Vec<u32> = scenario.workload.tables.iter().map(|t| t.columns).collect();
        let ctx = NodeContext {
            world: &world,
            sync: &scenario.sync,
            tables: &tables,
            columns: &columns,
            groups: &groups,
            device_groups: &device_groups,
        };
        let mut setup_rng = sub_rng(seed, "setup", 0);
        let mut hosts = Vec::with_capacity(devices as usize + 1);
        hosts.push(Host {
            node: factory.hub(&ctx)?,
            alive: true,
            skew: 0,
            timer_at: None,
            timer_gen: 0,
            group: usize::MAX,
        });
        let mut links = Vec::with_capacity(devices as usize);
        let mut dev = Vec::with_capacity(devices as usize);
        let mut id = 1u32;
        for (gi, g) in scenario.groups.iter().enumerate() {
            for _ in 0..g.devices {
                let skew = if g.clock_skew.0 > 0 {
                    let s = g.clock_skew.0 as i64;
                    setup_rng.gen_range(-s..=s)
                } else {
                    0
                };
                hosts.push(Host {
                    node: factory.device(NodeId(id), &ctx)?,
                    alive: true,
                    skew,
                    timer_at: None,
                    timer_gen: 0,
                    group: gi,
                });
                links.push(Link {
                    model: Some(ConnectivityModel::new(
                        &g.connectivity,
                        sub_rng(seed, "connectivity", u64::from(id)),
                    )),
                    net_up: false,
                    partitioned: false,
                    connected: false,
                    epoch: 0,
                    held: false,
                    held_msgs: Vec::new(),
                    params: LinkParams::from(&g.link),
                    busy: [0; 2],
                    last_arrival: [0; 2],
                    avail_since: None,
                    up_ms: 0,
                    rng: sub_rng(seed, "net", u64::from(id)),
                });
                dev.push(DeviceMetrics {
                    device: id,
                    group: g.name.clone(),
                    ..DeviceMetrics::default()
                });
                id += 1;
            }
        }
        let n = hosts.len();
        let heal_at = scenario.duration.0;
        let mut sim = Sim {
            scenario: scenario.clone(),
            seed,
            opts,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            hosts,
            links,
            rng: sub_rng(seed, "workload", 0),
            digest: Fnv64::new(),
            recent: VecDeque::with_capacity(RECENT_STEPS),
            steps: 0,
            checker: Checker::new(n),
            oracle: world,
            deleted: BTreeSet::new(),
            hot_by_table,
            initial_rows_end: next_row,
            next_row,
            ops: Vec::new(),
            pending_admin: Vec::new(),
            healed: false,
            heal_at,
            end_at: heal_at + scenario.settle.0,
            converged_at: None,
            dirty_since_check: true,
            behind_at_check: None,
            stopped: false,
            m: Metrics {
                devices,
                ..Metrics::default()
            },
            dev,
            stale_all: Histogram::new(),
            stale_dev: vec![Histogram::new(); devices as usize],
            series: Series {
                sample_interval_ms: scenario.sample_interval.0,
                device_pending: vec![Vec::new(); devices as usize],
                device_link: vec![Vec::new(); devices as usize],
                ..Series::default()
            },
            bytes_up_acc: 0,
            bytes_down_acc: 0,
            delivering_sent: None,
            delivering_from: None,
        };
        sim.digest.write_u64(seed);
        sim.schedule_initial(&mut setup_rng);
        Ok(sim)
    }

    fn push(&mut self, at: u64, ev: Ev<N::Msg>) {
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn device_ids(&self) -> impl Iterator<Item = NodeId> {
        (1..self.hosts.len() as u32).map(NodeId)
    }

    fn targets(&self, group: Option<&str>, device: Option<u32>) -> Vec<NodeId> {
        if let Some(d) = device {
            return vec![NodeId(d)];
        }
        match group {
            Some(g) => match self.scenario.group_index(g) {
                Ok(gi) => self
                    .device_ids()
                    .filter(|d| self.hosts[d.index()].group == gi)
                    .collect(),
                Err(_) => Vec::new(),
            },
            None => self.device_ids().collect(),
        }
    }

    fn table_mask(&self, names: &[String]) -> u64 {
        names
            .iter()
            .filter_map(|n| self.scenario.table_index(n).ok())
            .fold(0, |m, t| m | bit(t))
    }

    fn schedule_initial(&mut self, rng: &mut ChaCha8Rng) {
        // Scenario events (queued first: a partition at time 0 holds before any link comes up).
        let events = self.scenario.events.clone();
        for e in &events {
            let at = e.at().0;
            let spread_at = |rng: &mut ChaCha8Rng, spread: u64| {
                if spread > 0 {
                    at + rng.gen_range(0..=spread)
                } else {
                    at
                }
            };
            match e {
                Event::Partition {
                    group,
                    device,
                    spread,
                    ..
                } => {
                    for d in self.targets(group.as_deref(), *device) {
                        let t = spread_at(rng, spread.0);
                        self.push(t, Ev::Fault(Fault::Partition(d)));
                    }
                }
                Event::Heal {
                    group,
                    device,
                    spread,
                    ..
                } => {
                    for d in self.targets(group.as_deref(), *device) {
                        let t = spread_at(rng, spread.0);
                        self.push(t, Ev::Fault(Fault::Repair(d)));
                    }
                }
                Event::Hold { group, device, .. } => {
                    for d in self.targets(group.as_deref(), *device) {
                        self.push(at, Ev::Fault(Fault::Hold(d)));
                    }
                }
                Event::Release { group, device, .. } => {
                    for d in self.targets(group.as_deref(), *device) {
                        self.push(at, Ev::Fault(Fault::Release(d)));
                    }
                }
                Event::DeviceCrash { group, device, .. } => {
                    for d in self.targets(group.as_deref(), *device) {
                        self.push(at, Ev::Fault(Fault::Crash(d)));
                    }
                }
                Event::DeviceRestart { group, device, .. } => {
                    for d in self.targets(group.as_deref(), *device) {
                        self.push(at, Ev::Fault(Fault::Restart(d)));
                    }
                }
                Event::HubCrash { .. } => self.push(at, Ev::Fault(Fault::Crash(HUB))),
                Event::HubRestart { .. } => self.push(at, Ev::Fault(Fault::Restart(HUB))),
                Event::Reassign {
                    table,
                    rows,
                    from_group,
                    to_group,
                    ..
                } => {
                    let table = table
                        .as_deref()
                        .and_then(|t| self.scenario.table_index(t).ok())
                        .unwrap_or(0);
                    let from = from_group
                        .as_deref()
                        .and_then(|g| self.scenario.group_index(g).ok());
                    let to = to_group
                        .as_deref()
                        .and_then(|g| self.scenario.group_index(g).ok());
                    self.push(
                        at,
                        Ev::Fault(Fault::Reassign {
                            table,
                            rows: *rows,
                            from,
                            to,
                        }),
                    );
                }
                Event::ProfileChange {
                    group,
                    device,
                    tables,
                    ..
                } => {
                    let mask = self.table_mask(tables);
                    for d in self.targets(group.as_deref(), *device) {
                        self.push(
                            at,
                            Ev::Fault(Fault::Profile {
                                device: d,
                                tables: mask,
                            }),
                        );
                    }
                }
                Event::RoleChange {
                    group,
                    device,
                    revoke,
                    grant,
                    ..
                } => {
                    let (r, g) = (self.table_mask(revoke), self.table_mask(grant));
                    for d in self.targets(group.as_deref(), *device) {
                        self.push(
                            at,
                            Ev::Fault(Fault::Role {
                                device: d,
                                revoke: r,
                                grant: g,
                            }),
                        );
                    }
                }
            }
        }
        // Connectivity: the first change of every device.
        for d in 1..self.hosts.len() {
            self.schedule_next_link_change(NodeId(d as u32));
        }
        // Workload.
        for d in 1..self.hosts.len() {
            self.schedule_next_edit(NodeId(d as u32));
        }
        self.schedule_next_office();
        self.push(0, Ev::Sample);
        self.push(self.heal_at, Ev::Heal);
    }

    fn schedule_next_link_change(&mut self, d: NodeId) {
        let Some(link) = self.links.get_mut(d.index() - 1) else {
            return;
        };
        let Some(model) = link.model.as_mut() else {
            return;
        };
        if let Some(c) = model.next() {
            if c.at_ms <= self.heal_at {
                self.push(
                    c.at_ms.max(self.now),
                    Ev::Link {
                        device: d,
                        up: c.up,
                        quality: c.quality,
                    },
                );
            }
        }
    }

    fn device_rate_per_hour(&self, d: NodeId) -> f64 {
        let g = &self.scenario.groups[self.hosts[d.index()].group];
        let per: f64 = self
            .scenario
            .workload
            .tables
            .iter()
            .enumerate()
            .filter(|(i, _)| self.oracle.table_visible(d, *i as u32))
            .map(|(_, t)| {
                t.edits_per_device_hour + t.creates_per_device_hour + t.deletes_per_device_hour
            })
            .sum();
        per * g.edit_factor
    }

    fn schedule_next_edit(&mut self, d: NodeId) {
        let rate = self.device_rate_per_hour(d);
        if rate <= 0.0 {
            return;
        }
        let mean = ((3_600_000.0 / rate).round() as u64).max(1);
        let at = self.now + exp_ms(&mut self.rng, mean);
        if at < self.heal_at {
            self.push(at, Ev::Edit { device: d });
        }
    }

    fn schedule_next_office(&mut self) {
        let rate = self.scenario.workload.office_edits_per_hour;
        if rate <= 0.0 {
            return;
        }
        let mean = ((3_600_000.0 / rate).round() as u64).max(1);
        let at = self.now + exp_ms(&mut self.rng, mean);
        if at < self.heal_at {
            self.push(at, Ev::Office);
        }
    }

    fn local_time(&self, n: NodeId) -> u64 {
        let skew = self.hosts.get(n.index()).map(|h| h.skew).unwrap_or(0);
        (SIM_EPOCH_MS + self.now).saturating_add_signed(skew)
    }

    fn sim_time(&self, n: NodeId, local: u64) -> u64 {
        let skew = self.hosts.get(n.index()).map(|h| h.skew).unwrap_or(0);
        local
            .saturating_add_signed(-skew)
            .saturating_sub(SIM_EPOCH_MS)
    }

    fn record(&mut self, node: NodeId, peer: Option<NodeId>, kind: StepKind, payload: u64) {
        self.steps += 1;
        let code: u8 = match kind {
            StepKind::Delivered(..) => 1,
            StepKind::Dropped(..) => 2,
            StepKind::Connected => 3,
            StepKind::Disconnected => 4,
            StepKind::NetUp => 5,
            StepKind::NetDown => 6,
            StepKind::Partition => 7,
            StepKind::Repair => 8,
            StepKind::Crash => 9,
            StepKind::Restart => 10,
            StepKind::Edit(..) => 11,
            StepKind::Admin(..) => 12,
            StepKind::Node(..) => 13,
        };
        let h = &mut self.digest;
        h.write_u64(self.now);
        h.write_u8(code);
        h.write_u32(node.0);
        h.write_u32(peer.map(|p| p.0).unwrap_or(u32::MAX));
        h.write_u64(payload);
        if self.recent.len() == RECENT_STEPS {
            self.recent.pop_front();
        }
        self.recent.push_back(Step {
            t: self.now,
            node,
            peer,
            kind,
        });
    }

    fn steps_for(&self, node: Option<NodeId>) -> Vec<String> {
        let mut v: Vec<String> = self
            .recent
            .iter()
            .rev()
            .filter(|s| node.is_none_or(|n| s.node == n || s.peer == Some(n)))
            .take(self.opts.steps_per_violation)
            .map(Step::render)
            .collect();
        v.reverse();
        v
    }

    fn report(&mut self, f: Finding) {
        self.checker.count += 1;
        tracing::warn!(invariant = %f.invariant, time_ms = self.now, detail = %f.detail, "invariant violated");
        let same = self
            .checker
            .violations
            .iter()
            .filter(|v| v.invariant == f.invariant)
            .count();
        if same < self.opts.max_violations {
            let steps = self.steps_for(f.node);
            self.checker.violations.push(Violation {
                invariant: f.invariant,
                time_ms: self.now,
                node: f.node.map(|n| n.0),
                row: f.row.map(|r| r.to_string()),
                op: f.op.map(|o| o.0),
                detail: f.detail,
                steps,
            });
        }
        if self.opts.stop_on_violation {
            self.stopped = true;
        }
    }

    // ---- driving nodes ------------------------------------------------------------------

    fn after_input(&mut self, id: NodeId, fired: bool) {
        let i = id.index();
        while let Some(tx) = self.hosts[i].node.poll_transmit() {
            self.route(id, tx);
        }
        while let Some(ev) = self.hosts[i].node.poll_event() {
            self.on_node_event(id, ev);
        }
        if !id.is_hub() {
            if let Some(f) = self.checker.check_cursor(id, &self.hosts[i].node) {
                self.report(f);
            }
        }
        self.update_timer(id, fired);
    }

    fn update_timer(&mut self, id: NodeId, fired: bool) {
        let i = id.index();
        let t = self.hosts[i].node.poll_timeout().map(|l| {
            let t = self.sim_time(id, l).max(self.now);
            if fired && t <= self.now {
                self.now + 1
            } else {
                t
            }
        });
        let h = &mut self.hosts[i];
        if t != h.timer_at || fired {
            h.timer_gen += 1;
            h.timer_at = t;
            let gen = h.timer_gen;
            if let Some(t) = t {
                self.push(t, Ev::Timer { node: id, gen });
            }
        }
    }

    fn on_node_event(&mut self, id: NodeId, ev: NodeEvent) {
        self.record(id, None, StepKind::Node(ev), event_digest(&ev));
        let di = id.index().wrapping_sub(1);
        match ev {
            NodeEvent::Applied { op, row } => {
                if let Some(f) = self.checker.on_applied(id, op, row) {
                    self.report(f);
                }
                if !id.is_hub() {
                    self.m.ops_delivered += 1;
                    if let Some(meta) = self.ops.get(op.0 as usize).copied() {
                        if self.oracle.entitled(id, row)
                            && self.checker.granted_at(id, row) <= meta.issued
                        {
                            let s = self.now.saturating_sub(meta.issued);
                            self.stale_all.record(s);
                            if let Some(h) = self.stale_dev.get_mut(di) {
                                h.record(s);
                            }
                        }
                    }
                }
            }
            NodeEvent::Acked { op } => {
                self.m.ops_acked += 1;
                self.checker.acked.insert(op);
            }
            NodeEvent::Rejected { op, row } => {
                // Rolled back to the hub's copy: what it holds of the row arrives anew.
                self.checker.on_row_gone(id, row);
                self.m.ops_rejected += 1;
                self.checker.rejected.insert(op);
                if let Some(d) = self.dev.get_mut(di) {
                    d.ops_rejected += 1;
                }
            }
            NodeEvent::Conflict { .. } => {
                self.m.conflicts += 1;
                // Detected where it happens; counted for the device whose message caused it.
                let device = if id.is_hub() {
                    self.delivering_from
                } else {
                    Some(id)
                };
                if let Some(d) = device.and_then(|d| self.dev.get_mut(d.index().wrapping_sub(1))) {
                    d.conflicts += 1;
                }
            }
            NodeEvent::Evicted { row } => {
                self.checker.on_row_gone(id, row);
                self.m.evictions += 1;
                if let Some(d) = self.dev.get_mut(di) {
                    d.evictions += 1;
                }
            }
            NodeEvent::SyncCompleted {
                table,
                started_local_ms,
            } => {
                self.m.syncs_completed += 1;
                if let Some(d) = self.dev.get_mut(di) {
                    d.syncs_completed += 1;
                }
                // The sync saw the hub's state as of when the pull was sent, or at the latest
                // when the hub sent the message that completed it.
                let asked = started_local_ms.map(|s| self.sim_time(id, s));
                let started = match (asked, self.delivering_sent) {
                    (Some(a), Some(s)) => Some(a.min(s)),
                    (a, s) => a.or(s),
                };
                if let Some(started) = started {
                    self.check_leaks(id, started, table);
                }
            }
        }
    }

    /// No leak: after a sync of `table` (`None`: every table) that started after a
    /// revocation, the row must be gone.
    fn check_leaks(&mut self, d: NodeId, started: u64, table: Option<u32>) {
        if d.is_hub() {
            return;
        }
        let mut leaked = Vec::new();
        {
            let node = &self.hosts[d.index()].node;
            let oracle = &self.oracle;
            let checker = &self.checker;
            let mut look = |row: RowKey| {
                if oracle.entitled(d, row) || node.has_pending_on(row) {
                    return;
                }
                // Never entitled (None) or revoked before this sync started: a leak.
                match checker.revoked_at(d, row) {
                    Some(t) if t >= started => {}
                    _ => leaked.push(row),
                }
            };
            match table {
                Some(t) => node.for_each_row_key_of(t, &mut look),
                None => node.for_each_row_key(&mut look),
            }
        }
        leaked.retain(|row| self.checker.first_leak(d, *row));
        for row in leaked.into_iter().take(5) {
            self.report(Finding {
                invariant: Invariant::NoLeak,
                node: Some(d),
                row: Some(row),
                op: None,
                detail: format!(
                    "{d} completed a sync (started at {started} ms) and still holds {row}, \
                     which is outside its set"
                ),
            });
        }
    }

    fn route(&mut self, from: NodeId, tx: Transmit<N::Msg>) {
        let to = tx.to;
        let size = tx.msg.wire_len();
        let kind = tx.msg.kind();
        self.m.messages_sent += 1;
        let device = if from.is_hub() { to } else { from };
        let valid = from.is_hub() != to.is_hub() && device.index() < self.hosts.len();
        if !valid || device.is_hub() {
            self.drop_msg(from, to, &tx.msg, kind, "misaddressed");
            return;
        }
        let dir = usize::from(from.is_hub()); // 0 up, 1 down
        if !self.links[device.index() - 1].connected {
            // Never sent: no connection to send it on.
            self.drop_msg(from, to, &tx.msg, kind, "no connection");
            return;
        }
        if dir == 0 {
            self.m.bytes_up += size as u64;
            self.bytes_up_acc += size as u64;
            self.dev[device.index() - 1].bytes_up += size as u64;
        } else {
            self.m.bytes_down += size as u64;
            self.bytes_down_acc += size as u64;
            self.dev[device.index() - 1].bytes_down += size as u64;
        }
        let now = self.now;
        let link = &mut self.links[device.index() - 1];
        if link.params.loss > 0.0 && link.rng.gen::<f64>() < link.params.loss {
            self.drop_msg(from, to, &tx.msg, kind, "lost");
            return;
        }
        let copies = if link.params.duplicate > 0.0 && link.rng.gen::<f64>() < link.params.duplicate
        {
            2
        } else {
            1
        };
        let epoch = link.epoch;
        let ser = link.params.serialization_ms(size);
        let start = link.busy[dir].max(now);
        link.busy[dir] = start + ser;
        let mut arrivals = Vec::with_capacity(copies);
        for _ in 0..copies {
            let jitter = if link.params.jitter_ms > 0 {
                link.rng.gen_range(0..=link.params.jitter_ms)
            } else {
                0
            };
            let mut at = start + ser + link.params.latency_ms + jitter;
            if link.params.reorder > 0.0 && link.rng.gen::<f64>() < link.params.reorder {
                at += link.rng.gen_range(0..=2 * link.params.latency_ms + 1);
            } else {
                at = at.max(link.last_arrival[dir]);
                link.last_arrival[dir] = at;
            }
            arrivals.push(at);
        }
        if copies == 2 {
            self.m.messages_duplicated += 1;
        }
        for (k, at) in arrivals.into_iter().enumerate() {
            let msg = if k + 1 == copies {
                // the last copy takes the message
                None
            } else {
                Some(tx.msg.clone())
            };
            let msg = match msg {
                Some(m) => m,
                None => tx.msg.clone(),
            };
            self.push(
                at,
                Ev::Deliver {
                    from,
                    to,
                    epoch,
                    sent: now,
                    msg,
                },
            );
        }
    }

    fn msg_digest(msg: &N::Msg) -> u64 {
        let mut h = Fnv64::new();
        msg.digest(&mut h);
        h.finish()
    }

    fn drop_msg(
        &mut self,
        from: NodeId,
        to: NodeId,
        msg: &N::Msg,
        kind: &'static str,
        why: &'static str,
    ) {
        self.m.messages_dropped += 1;
        let d = Self::msg_digest(msg);
        self.record(from, Some(to), StepKind::Dropped(kind, why), d);
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, epoch: u64, sent: u64, msg: N::Msg) {
        let device = if from.is_hub() { to } else { from };
        let kind = msg.kind();
        let (connected, cur_epoch, held) = {
            let l = &self.links[device.index() - 1];
            (l.connected, l.epoch, l.held)
        };
        if !connected || cur_epoch != epoch {
            self.drop_msg(from, to, &msg, kind, "connection closed");
            return;
        }
        if !self.hosts[to.index()].alive {
            self.drop_msg(from, to, &msg, kind, "receiver down");
            return;
        }
        if held {
            self.links[device.index() - 1]
                .held_msgs
                .push((from, to, epoch, sent, msg));
            return;
        }
        self.m.messages_delivered += 1;
        let size = msg.wire_len();
        let d = Self::msg_digest(&msg);
        self.record(to, Some(from), StepKind::Delivered(kind, size), d);
        let now = self.local_time(to);
        self.hosts[to.index()].node.handle_message(now, from, msg);
        self.delivering_sent = Some(sent);
        self.delivering_from = Some(from);
        self.after_input(to, false);
        self.delivering_sent = None;
        self.delivering_from = None;
        self.reconcile(device);
    }

    /// Open or close the device's connection to match its network, both ends' health and
    /// whether the device wants one.
    fn reconcile(&mut self, d: NodeId) {
        for _ in 0..4 {
            let i = d.index();
            let Some(link) = self.links.get(i - 1) else {
                return;
            };
            let ok = link.available() && self.hosts[0].alive && self.hosts[i].alive;
            let desired = ok && self.hosts[i].node.wants_connection();
            if desired == link.connected {
                return;
            }
            let link = &mut self.links[i - 1];
            link.connected = desired;
            link.epoch += 1;
            if desired {
                self.dev[i - 1].connections_opened += 1;
                self.m.connections_opened += 1;
                self.record(d, Some(HUB), StepKind::Connected, 0);
                let (ld, lh) = (self.local_time(d), self.local_time(HUB));
                self.hosts[i].node.handle_connected(ld, HUB);
                self.hosts[0].node.handle_connected(lh, d);
            } else {
                link.held_msgs.clear();
                // A new connection starts with an empty queue: what the old one was still
                // sending is lost with it, and nothing orders the new one behind it.
                link.busy = [0; 2];
                link.last_arrival = [0; 2];
                self.record(d, Some(HUB), StepKind::Disconnected, 0);
                let (ld, lh) = (self.local_time(d), self.local_time(HUB));
                if self.hosts[i].alive {
                    self.hosts[i].node.handle_disconnected(ld, HUB);
                }
                if self.hosts[0].alive {
                    self.hosts[0].node.handle_disconnected(lh, d);
                }
            }
            if self.hosts[i].alive {
                self.after_input(d, false);
            }
            if self.hosts[0].alive {
                self.after_input(HUB, false);
            }
        }
    }

    fn set_availability(&mut self, d: NodeId, f: impl FnOnce(&mut Link<N::Msg>)) {
        let now = self.now;
        let link = &mut self.links[d.index() - 1];
        let before = link.available();
        f(link);
        let after = link.available();
        if before != after {
            if after {
                link.avail_since = Some(now);
            } else if let Some(s) = link.avail_since.take() {
                link.up_ms += now - s;
            }
        }
        self.reconcile(d);
    }

    // ---- fault controls ------------------------------------------------------------------

    /// Force a device's link down until [`Sim::repair`].
    pub fn partition(&mut self, d: NodeId) {
        if d.is_hub() || d.index() >= self.hosts.len() {
            return;
        }
        self.record(d, None, StepKind::Partition, 0);
        self.set_availability(d, |l| l.partitioned = true);
    }

    /// Release a partition.
    pub fn repair(&mut self, d: NodeId) {
        if d.is_hub() || d.index() >= self.hosts.len() {
            return;
        }
        self.record(d, None, StepKind::Repair, 0);
        self.set_availability(d, |l| l.partitioned = false);
    }

    /// Keep the device's connection up but deliver nothing until [`Sim::release`].
    pub fn hold(&mut self, d: NodeId) {
        if let Some(l) = self.links.get_mut(d.index().wrapping_sub(1)) {
            l.held = true;
        }
    }

    /// Deliver what was held, in order, now.
    pub fn release(&mut self, d: NodeId) {
        let Some(l) = self.links.get_mut(d.index().wrapping_sub(1)) else {
            return;
        };
        l.held = false;
        let msgs = std::mem::take(&mut l.held_msgs);
        let now = self.now;
        for (from, to, epoch, sent, msg) in msgs {
            self.push(
                now,
                Ev::Deliver {
                    from,
                    to,
                    epoch,
                    sent,
                    msg,
                },
            );
        }
    }

    /// Crash a node: it loses what was not durable, and its connections.
    pub fn crash(&mut self, n: NodeId) {
        let i = n.index();
        if i >= self.hosts.len() || !self.hosts[i].alive {
            return;
        }
        self.record(n, None, StepKind::Crash, 0);
        let h = &mut self.hosts[i];
        h.alive = false;
        h.node.crash();
        h.timer_gen += 1;
        h.timer_at = None;
        self.checker.on_crash(n, &self.hosts[i].node);
        if n.is_hub() {
            let ds: Vec<NodeId> = self.device_ids().collect();
            for d in ds {
                self.reconcile(d);
            }
        } else {
            self.reconcile(n);
        }
    }

    /// Restart a crashed node from its durable state.
    pub fn restart(&mut self, n: NodeId) {
        let i = n.index();
        if i >= self.hosts.len() || self.hosts[i].alive {
            return;
        }
        self.record(n, None, StepKind::Restart, 0);
        self.hosts[i].alive = true;
        let now = self.local_time(n);
        self.hosts[i].node.restart(now);
        self.checker.on_restart(n, &self.hosts[i].node);
        if n.is_hub() {
            // What the hub acknowledged must be in what it reopened.
            let findings = self.checker.check_acked_on_hub(&self.hosts[0].node, 5);
            for f in findings {
                self.report(f);
            }
            let admin = std::mem::take(&mut self.pending_admin);
            for ev in admin {
                self.hosts[0].node.handle_admin(now, &ev);
            }
        }
        self.after_input(n, false);
        if n.is_hub() {
            let ds: Vec<NodeId> = self.device_ids().collect();
            for d in ds {
                self.reconcile(d);
            }
        } else {
            self.reconcile(n);
        }
    }

    /// Crash and restart at once.
    pub fn bounce(&mut self, n: NodeId) {
        self.crash(n);
        self.restart(n);
    }

    // ---- workload and admin --------------------------------------------------------------

    fn new_op(&mut self) -> OpId {
        let id = OpId(self.ops.len() as u64);
        self.ops.push(OpMeta { issued: self.now });
        self.m.ops_issued += 1;
        id
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.gen_range(0..v.len() as u64) as usize])
        }
    }

    fn do_edit(&mut self, d: NodeId) {
        self.schedule_next_edit(d);
        if !self.hosts[d.index()].alive {
            return;
        }
        let g_factor = self.scenario.groups[self.hosts[d.index()].group].edit_factor;
        let tables = self.scenario.workload.tables.clone();
        let mut choices: Vec<(u32, u8, f64)> = Vec::new();
        for (ti, t) in tables.iter().enumerate() {
            if !self.oracle.table_visible(d, ti as u32) {
                continue;
            }
            choices.push((ti as u32, 0, t.edits_per_device_hour * g_factor));
            choices.push((ti as u32, 1, t.creates_per_device_hour * g_factor));
            choices.push((ti as u32, 2, t.deletes_per_device_hour * g_factor));
        }
        let total: f64 = choices.iter().map(|c| c.2).sum();
        if total <= 0.0 {
            return;
        }
        let mut x = self.rng.gen::<f64>() * total;
        let mut chosen = choices[0];
        for c in &choices {
            if x < c.2 {
                chosen = *c;
                break;
            }
            x -= c.2;
        }
        let (table, action, _) = chosen;
        let tl = &tables[table as usize];
        let owned: Vec<RowKey> = self
            .oracle
            .owned_rows(d)
            .filter(|r| r.table == table && !self.deleted.contains(r))
            .collect();
        let (row, kind) = match action {
            0 => {
                let hot = tl.hot_rows > 0 && self.rng.gen::<f64>() < tl.hot_fraction;
                let row = if hot {
                    let hv = self.hot_by_table[table as usize].clone();
                    self.pick(&hv)
                } else {
                    self.pick(&owned)
                };
                let Some(row) = row else { return };
                if self.deleted.contains(&row) {
                    return;
                }
                let column = self.rng.gen_range(0..u64::from(tl.columns)) as u32;
                let value = self.rng.gen::<u64>();
                (row, EditKind::Update { column, value })
            }
            1 => {
                let row = RowKey {
                    table,
                    id: self.next_row,
                };
                self.next_row += 1;
                (row, EditKind::Create)
            }
            _ => {
                let Some(row) = self.pick(&owned) else { return };
                (row, EditKind::Delete)
            }
        };
        let op = self.new_op();
        let edit = Edit { op, row, kind };
        let local = self.local_time(d);
        let result = self.hosts[d.index()].node.local_edit(local, &edit);
        self.record(d, None, StepKind::Edit(op, row, result), op.0);
        match result {
            EditResult::Refused => self.m.edits_refused += 1,
            EditResult::Committed | EditResult::Volatile => {
                self.m.ops_committed += 1;
                self.dev[d.index() - 1].ops_committed += 1;
                if result == EditResult::Committed {
                    self.checker.committed.insert(op, d);
                }
                match kind {
                    EditKind::Create => self.oracle.set_owner(row, Owner::Device(d)),
                    EditKind::Delete => {
                        self.deleted.insert(row);
                    }
                    EditKind::Update { .. } => {}
                }
                self.dirty_since_check = true;
            }
        }
        self.after_input(d, false);
        self.reconcile(d);
    }

    fn do_office(&mut self) {
        self.schedule_next_office();
        if !self.hosts[0].alive {
            return;
        }
        let tables = self.scenario.workload.tables.len() as u64;
        let table = self.rng.gen_range(0..tables) as u32;
        let rows: Vec<RowKey> = self
            .oracle
            .all_rows()
            .map(|(r, _)| r)
            .filter(|r| r.table == table && !self.deleted.contains(r))
            .collect();
        let Some(row) = self.pick(&rows) else { return };
        let columns = self.scenario.workload.tables[table as usize].columns;
        let column = self.rng.gen_range(0..u64::from(columns)) as u32;
        let value = self.rng.gen::<u64>();
        let op = self.new_op();
        let edit = Edit {
            op,
            row,
            kind: EditKind::Update { column, value },
        };
        let local = self.local_time(HUB);
        let result = self.hosts[0].node.local_edit(local, &edit);
        self.record(HUB, None, StepKind::Edit(op, row, result), op.0);
        if result == EditResult::Refused {
            self.m.edits_refused += 1;
        } else {
            self.m.ops_committed += 1;
            self.m.office_ops += 1;
            self.dirty_since_check = true;
        }
        self.after_input(HUB, false);
    }

    fn admin(&mut self, ev: AdminEvent, what: &'static str) {
        self.oracle.apply(&ev);
        self.record(HUB, None, StepKind::Admin(what), 0);
        self.dirty_since_check = true;
        if self.hosts[0].alive {
            let now = self.local_time(HUB);
            self.hosts[0].node.handle_admin(now, &ev);
            self.after_input(HUB, false);
        } else {
            self.pending_admin.push(ev);
        }
    }

    fn do_fault(&mut self, f: Fault) {
        match f {
            Fault::Partition(d) => self.partition(d),
            Fault::Repair(d) => self.repair(d),
            Fault::Hold(d) => self.hold(d),
            Fault::Release(d) => self.release(d),
            Fault::Crash(n) => self.crash(n),
            Fault::Restart(n) => self.restart(n),
            Fault::Reassign {
                table,
                rows,
                from,
                to,
            } => {
                let in_group = |s: &Self, d: NodeId, g: Option<usize>| {
                    g.is_none_or(|g| s.hosts.get(d.index()).is_some_and(|h| h.group == g))
                };
                let candidates: Vec<(RowKey, NodeId)> = self
                    .oracle
                    .all_rows()
                    .filter_map(|(r, o)| match o {
                        Owner::Device(d)
                            if r.table == table
                                && r.id < self.initial_rows_end
                                && in_group(self, d, from) =>
                        {
                            Some((r, d))
                        }
                        _ => None,
                    })
                    .collect();
                let receivers: Vec<NodeId> = self
                    .device_ids()
                    .filter(|d| in_group(self, *d, to))
                    .collect();
                for _ in 0..rows {
                    let Some((row, old)) = self.pick(&candidates) else {
                        return;
                    };
                    let Some(new) = self.pick(&receivers) else {
                        return;
                    };
                    if self.oracle.owner(row) != Some(Owner::Device(old)) || new == old {
                        continue;
                    }
                    self.checker.revoke_row(old, row, self.now);
                    self.checker.grant_row(new, row, self.now);
                    self.admin(AdminEvent::Reassign { row, to: new }, "reassign");
                }
            }
            Fault::Profile { device, tables } => {
                let before = self.oracle.profile(device);
                self.mask_change(device, before, tables);
                self.admin(AdminEvent::SetProfile { device, tables }, "profile change");
            }
            Fault::Role {
                device,
                revoke,
                grant,
            } => {
                let before = self.oracle.denied(device);
                let denied = (before | revoke) & !grant;
                // visible = !denied
                self.mask_change(device, !before, !denied);
                self.admin(AdminEvent::SetRole { device, denied }, "role change");
            }
        }
    }

    /// Record table-level grants and revocations between two "visible" masks.
    fn mask_change(&mut self, d: NodeId, before: u64, after: u64) {
        for t in 0..self.scenario.workload.tables.len() as u32 {
            let (b, a) = (before & bit(t) != 0, after & bit(t) != 0);
            if b && !a {
                self.checker.revoke_table(d, t, self.now);
            } else if !b && a {
                self.checker.grant_table(d, t, self.now);
            }
        }
    }

    // ---- sampling, heal, convergence -----------------------------------------------------

    fn sample(&mut self) {
        let mut total = 0u64;
        let mut up = 0u32;
        for d in 1..self.hosts.len() {
            let p = self.hosts[d].node.pending_ops() as u64;
            total += p;
            let dm = &mut self.dev[d - 1];
            dm.pending_ops_max = dm.pending_ops_max.max(p);
            let l = &self.links[d - 1];
            let state = if l.connected {
                2
            } else {
                u8::from(l.available())
            };
            if l.available() {
                up += 1;
            }
            self.series.device_pending[d - 1].push(p.min(u64::from(u32::MAX)) as u32);
            self.series.device_link[d - 1].push(state);
        }
        self.m.pending_ops_max = self.m.pending_ops_max.max(total);
        self.series.times_ms.push(self.now);
        self.series.pending_ops.push(total);
        self.series.devices_up.push(up);
        self.series
            .bytes_up
            .push(std::mem::take(&mut self.bytes_up_acc));
        self.series
            .bytes_down
            .push(std::mem::take(&mut self.bytes_down_acc));
        let next = self.now + self.scenario.sample_interval.0;
        if next <= self.end_at {
            self.push(next, Ev::Sample);
        }
    }

    /// The final heal: workload stops (it is scheduled only before), every fault ends.
    fn heal(&mut self) {
        let _span = tracing::info_span!("final_heal", t = self.now).entered();
        self.healed = true;
        if !self.hosts[0].alive {
            self.restart(HUB);
        }
        let ds: Vec<NodeId> = self.device_ids().collect();
        for d in &ds {
            let d = *d;
            let link = &mut self.links[d.index() - 1];
            link.model = None;
            if let Some(l) = &self.scenario.groups.get(self.hosts[d.index()].group) {
                link.params = LinkParams::from(&l.link);
            }
            self.release(d);
            if !self.hosts[d.index()].alive {
                self.restart(d);
            }
            self.set_availability(d, |l| {
                l.partitioned = false;
                l.net_up = true;
            });
        }
        self.push(self.now + self.opts.converge_check_ms, Ev::ConvergeCheck);
    }

    /// Whether every device holds exactly its set with the hub's content and nothing is pending:
    /// `Err` names a device that does not (`None`: a node is down).
    fn converged_or_behind(&self) -> Result<(), Option<NodeId>> {
        if !self.hosts.iter().all(|h| h.alive) {
            return Err(None);
        }
        // Pending ops first: they are counted, not scanned, and until the last settles no
        // row needs reading. Then each device's rows against the hub's, a row at a time, so
        // a device that is not there yet ends the check without the hub's whole table being
        // digested (this runs every `converge_check_ms` while the run settles). The device
        // found behind last time goes first.
        if let Some(d) = self
            .device_ids()
            .find(|d| self.hosts[d.index()].node.pending_ops() > 0)
        {
            return Err(Some(d));
        }
        let hub = &self.hosts[0].node;
        let mut hub_rows: BTreeMap<RowKey, Option<u64>> = BTreeMap::new();
        let mut hub_digest = |r: RowKey| *hub_rows.entry(r).or_insert_with(|| hub.row_digest(r));
        let first = self
            .behind_at_check
            .filter(|d| !d.is_hub() && d.index() < self.hosts.len());
        for d in first
            .into_iter()
            .chain(self.device_ids().filter(|d| Some(*d) != first))
        {
            let node = &self.hosts[d.index()].node;
            let mut ok = true;
            let mut count = 0usize;
            node.for_each_row(&mut |r, dg| {
                count += 1;
                if ok && (!self.oracle.entitled(d, r) || hub_digest(r) != Some(dg)) {
                    ok = false;
                }
            });
            if !ok {
                return Err(Some(d));
            }
            let expected = self
                .oracle
                .entitled_rows(d)
                .into_iter()
                .filter(|r| hub_digest(*r).is_some())
                .count();
            if count != expected {
                return Err(Some(d));
            }
        }
        Ok(())
    }

    fn converge_check(&mut self) {
        if self.converged_at.is_some() {
            return;
        }
        if self.dirty_since_check || self.now >= self.end_at {
            self.dirty_since_check = false;
            let check = self.converged_or_behind();
            self.behind_at_check = check.err().flatten();
            if check.is_ok() {
                self.converged_at = Some(self.now);
                tracing::info!(t = self.now, "converged");
                return;
            }
        }
        let next = self.now + self.opts.converge_check_ms;
        if next <= self.end_at {
            self.push(next, Ev::ConvergeCheck);
        }
    }

    /// Final checks: convergence details, acknowledged and committed ops on the hub, evictions.
    fn final_checks(&mut self) {
        let mut findings = self.checker.check_acked_on_hub(&self.hosts[0].node, 10);
        let hub = &self.hosts[0].node;
        // Committed device ops must be on the hub unless rejected.
        for (op, d) in self
            .checker
            .committed
            .iter()
            .filter(|(op, _)| !hub.has_op(**op) && !self.checker.rejected.contains(op))
            .take(10)
        {
            findings.push(Finding {
                invariant: Invariant::Convergence,
                node: Some(*d),
                row: None,
                op: Some(*op),
                detail: format!("{op} committed on {d} never reached the hub"),
            });
        }
        if self.converged_at.is_none() {
            let mut hub_rows: BTreeMap<RowKey, u64> = BTreeMap::new();
            hub.for_each_row(&mut |r, dg| {
                hub_rows.insert(r, dg);
            });
            let mut listed = 0;
            'devices: for d in self.device_ids() {
                let node = &self.hosts[d.index()].node;
                if node.pending_ops() > 0 {
                    findings.push(Finding {
                        invariant: Invariant::Convergence,
                        node: Some(d),
                        row: None,
                        op: None,
                        detail: format!("{d} still has {} pending ops", node.pending_ops()),
                    });
                    listed += 1;
                }
                for r in self.oracle.entitled_rows(d) {
                    let Some(want) = hub_rows.get(&r) else {
                        continue;
                    };
                    let have = node.row_digest(r);
                    if have != Some(*want) {
                        let detail = match have {
                            None => format!("{d} is missing {r}"),
                            Some(_) => format!("{d}'s copy of {r} differs from the hub's"),
                        };
                        findings.push(Finding {
                            invariant: Invariant::Convergence,
                            node: Some(d),
                            row: Some(r),
                            op: None,
                            detail,
                        });
                        listed += 1;
                        if listed >= 20 {
                            break 'devices;
                        }
                    }
                }
            }
            if listed == 0 && findings.is_empty() {
                findings.push(Finding {
                    invariant: Invariant::Convergence,
                    node: None,
                    row: None,
                    op: None,
                    detail: "replicas did not converge before the end of the settle period".into(),
                });
            }
        }
        // Evictions happen: revoked rows are gone by the end (unless pending ops hold them).
        for d in self.device_ids() {
            let node = &self.hosts[d.index()].node;
            let mut kept = Vec::new();
            node.for_each_row_key(&mut |r| {
                if !self.oracle.entitled(d, r)
                    && !node.has_pending_on(r)
                    && self.checker.revoked_at(d, r).is_some()
                {
                    kept.push(r);
                }
            });
            for r in kept.into_iter().take(3) {
                findings.push(Finding {
                    invariant: Invariant::EvictionsHappen,
                    node: Some(d),
                    row: Some(r),
                    op: None,
                    detail: format!("{r} left {d}'s set but was never evicted there"),
                });
            }
        }
        for f in findings {
            self.report(f);
        }
    }

    // ---- running -------------------------------------------------------------------------

    /// Virtual time now (ms).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Process one event; false when there is nothing left to do.
    pub fn step(&mut self) -> bool {
        if self.stopped || self.converged_at.is_some() {
            return false;
        }
        let Some(q) = self.queue.pop() else {
            return false;
        };
        if q.at > self.end_at {
            self.queue.push(q);
            return false;
        }
        self.now = q.at;
        match q.ev {
            Ev::Deliver {
                from,
                to,
                epoch,
                sent,
                msg,
            } => {
                self.dirty_since_check = true;
                self.deliver(from, to, epoch, sent, msg);
            }
            Ev::Timer { node, gen } => {
                let h = &mut self.hosts[node.index()];
                if h.alive && h.timer_gen == gen {
                    h.timer_at = None;
                    let now = self.local_time(node);
                    self.hosts[node.index()].node.handle_timeout(now);
                    self.after_input(node, true);
                    if !node.is_hub() {
                        self.reconcile(node);
                    }
                }
            }
            Ev::Link {
                device,
                up,
                quality,
            } => {
                if !self.healed {
                    self.record(
                        device,
                        None,
                        if up {
                            StepKind::NetUp
                        } else {
                            StepKind::NetDown
                        },
                        quality.map(|q| q.0 ^ (q.1 << 20)).unwrap_or(0),
                    );
                    if let Some((lat, bw, loss)) = quality {
                        let p = &mut self.links[device.index() - 1].params;
                        p.latency_ms = lat;
                        p.bandwidth_kbps = bw;
                        p.loss = loss;
                    }
                    self.set_availability(device, |l| l.net_up = up);
                    self.schedule_next_link_change(device);
                }
            }
            Ev::Fault(f) => {
                if !self.healed {
                    self.do_fault(f);
                }
            }
            Ev::Edit { device } => self.do_edit(device),
            Ev::Office => self.do_office(),
            Ev::Sample => self.sample(),
            Ev::Heal => self.heal(),
            Ev::ConvergeCheck => self.converge_check(),
        }
        true
    }

    /// Run until virtual time `t` (or the end of the run).
    pub fn run_until(&mut self, t: u64) {
        while self.queue.peek().is_some_and(|q| q.at <= t) {
            if !self.step() {
                break;
            }
        }
        if !self.stopped && self.converged_at.is_none() {
            self.now = self.now.max(t.min(self.end_at));
        }
    }

    /// Run to the end (convergence after the final heal, or the settle deadline) and report.
    pub fn finish(self) -> SimReport {
        self.finish_with_progress(&mut |_, _| {})
    }

    /// A node, to inspect (benchmarks and tests): 0 is the hub, devices from 1.
    pub fn node(&self, id: NodeId) -> Option<&N> {
        self.hosts.get(id.index()).map(|h| &h.node)
    }

    /// Run every remaining step (as [`Sim::finish`] does before it reports), leaving the
    /// nodes to inspect; then call `finish` for the report.
    pub fn run_to_end(&mut self) {
        while self.step() {}
    }

    /// As [`Sim::finish`], calling `progress(now_ms, end_ms)` about every simulated minute.
    pub fn finish_with_progress(mut self, progress: &mut dyn FnMut(u64, u64)) -> SimReport {
        let _span =
            tracing::info_span!("sim_run", scenario = %self.scenario.name, seed = self.seed)
                .entered();
        let mut last = 0u64;
        while self.step() {
            if self.now >= last + 60_000 {
                last = self.now;
                progress(self.now, self.end_at);
            }
        }
        progress(self.end_at, self.end_at);
        if !self.stopped {
            if !self.healed {
                self.heal();
            }
            self.final_checks();
        }
        // account link-up time
        let now = self.now;
        for (i, l) in self.links.iter_mut().enumerate() {
            if let Some(s) = l.avail_since.take() {
                l.up_ms += now - s;
            }
            self.dev[i].link_up_ms = l.up_ms;
        }
        for (i, h) in self.stale_dev.iter().enumerate() {
            self.dev[i].staleness = h.percentiles();
        }
        let mut metrics = std::mem::take(&mut self.m);
        metrics.staleness = self.stale_all.percentiles();
        metrics.per_device = std::mem::take(&mut self.dev);
        let converged = self.converged_at.is_some()
            && !self
                .checker
                .violations
                .iter()
                .any(|v| v.invariant == Invariant::Convergence);
        SimReport {
            scenario: self.scenario.name.clone(),
            seed: self.seed,
            devices: metrics.devices,
            heal_ms: self.heal_at,
            end_ms: self.now,
            converged,
            time_to_converge_ms: self.converged_at.map(|t| t - self.heal_at),
            violations: std::mem::take(&mut self.checker.violations),
            violation_count: self.checker.count,
            trace_digest: format!("{:016x}", self.digest.finish()),
            steps: self.steps,
            metrics,
            series: std::mem::take(&mut self.series),
            staleness_histogram: std::mem::take(&mut self.stale_all),
        }
    }
}

/// A canonical digest of a node event (what the trace digest hashes for it).
fn event_digest(ev: &NodeEvent) -> u64 {
    let mut h = Fnv64::new();
    let row = |h: &mut Fnv64, r: &RowKey| {
        h.write_u32(r.table);
        h.write_u64(r.id);
    };
    match ev {
        NodeEvent::Applied { op, row: r } => {
            h.write_u8(1);
            h.write_u64(op.0);
            row(&mut h, r);
        }
        NodeEvent::Acked { op } => {
            h.write_u8(2);
            h.write_u64(op.0);
        }
        NodeEvent::Rejected { op, row: r } => {
            h.write_u8(3);
            h.write_u64(op.0);
            row(&mut h, r);
        }
        NodeEvent::Conflict { row: r } => {
            h.write_u8(4);
            row(&mut h, r);
        }
        NodeEvent::Evicted { row: r } => {
            h.write_u8(5);
            row(&mut h, r);
        }
        NodeEvent::SyncCompleted {
            table,
            started_local_ms,
        } => {
            h.write_u8(6);
            h.write_u32(table.unwrap_or(u32::MAX));
            h.write_u64(started_local_ms.unwrap_or(u64::MAX));
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simple::SimpleFactory;

    /// A message with no connection to go on is dropped, and its bytes were never sent.
    #[test]
    fn a_message_without_a_connection_costs_no_bytes() {
        let scenario = Scenario::from_toml_str(
            "name='off'\nduration='10m'\n[[groups]]\nname='a'\ndevices=1\n",
            std::path::Path::new("."),
        )
        .unwrap();
        let mut sim = SimBuilder::new(&scenario)
            .build(SimpleFactory::default())
            .unwrap();
        sim.partition(NodeId(1));
        let (up, down, dropped) = (sim.m.bytes_up, sim.m.bytes_down, sim.m.messages_dropped);
        let msg = crate::simple::SimpleMsg::Ack {
            acked: vec![OpId(1)],
            rejected: Vec::new(),
        };
        sim.route(HUB, Transmit { to: NodeId(1), msg });
        assert_eq!(sim.m.messages_dropped, dropped + 1);
        assert_eq!((sim.m.bytes_up, sim.m.bytes_down), (up, down));
        assert_eq!(sim.dev[0].bytes_down, down);
    }

    /// A reconnection does not wait behind the bytes the closed connection was still sending.
    #[test]
    fn a_new_connection_does_not_queue_behind_the_old_one() {
        let scenario = Scenario::from_toml_str(
            "name='slow'\nduration='1h'\n[sync]\nbatch=10000\n\
             [[groups]]\nname='a'\ndevices=1\nlink={latency='10ms',jitter='0ms',bandwidth_kbps=8}\n\
             [[workload.tables]]\nname='wo'\nrows_per_device=4\nedits_per_device_hour=600\n",
            std::path::Path::new("."),
        )
        .unwrap();
        let mut sim = SimBuilder::new(&scenario)
            .rng_seed(3)
            .build(SimpleFactory::default())
            .unwrap();
        let d = NodeId(1);
        sim.partition(d);
        sim.run_until(1_800_000);
        // Reconnect with ~300 pending ops: one push of many kB, tens of seconds at 8 kbit/s.
        sim.repair(d);
        sim.run_until(1_801_000);
        sim.partition(d);
        sim.run_until(1_802_000);
        sim.repair(d);
        sim.run_until(1_900_000);
        // The first message the new connection delivers takes its own serialization time
        // (1 ms per byte at 8 kbit/s) and the latency, not the old connection's backlog too.
        let (at, bytes) = sim
            .recent
            .iter()
            .find_map(|s| match s.kind {
                StepKind::Delivered(_, bytes) if s.t >= 1_802_000 => Some((s.t, bytes as u64)),
                _ => None,
            })
            .unwrap();
        assert!(bytes > 5_000, "a backlog of many kB: {bytes}");
        assert!(
            at <= 1_802_000 + bytes + 1_000,
            "delivered at {at} ms, {bytes} B sent from 1802000 ms"
        );
    }
}
