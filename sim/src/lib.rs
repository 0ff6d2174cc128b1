//! Deterministic simulation of spotty connectivity over fieldsync's sync protocol.
//!
//! A run is a discrete-event simulation in virtual time (ms) with one seeded random source
//! (ChaCha8, portable): a hub and N devices, each a node behind the [`SimNode`] / [`FieldNode`] /
//! [`Observe`] traits, exchanging messages over simulated links whose availability follows a
//! [connectivity model](scenario::Connectivity) and whose quality has latency, jitter,
//! bandwidth, loss, duplication and reordering. A [`Scenario`] (TOML, see [`scenario`]) says
//! who is in the field, what they edit and what happens to them. Every delivered and dropped
//! message, link change, crash and edit feeds a 64-bit FNV-1a digest: the same scenario and seed
//! give the same `trace_digest` on any machine.
//!
//! While it runs, named [invariants](Invariant) are checked through the nodes' hooks; after the
//! scenario's duration every fault heals and the run continues until the replicas converge (or
//! the settle period ends). The [`SimReport`] holds the metrics (staleness percentiles, pending
//! ops over time, bytes, connections, conflicts, rejections, time to converge), the violations
//! with the steps that led to each, and the digest; [`report::html`] renders it as one
//! self-contained page with SVG plots. [`sweep()`] runs a scenario over a parameter's values and
//! [`shrink()`] reduces a failing scenario to a small reproduction.
//!
//! [`RunOptions::engine`] picks the nodes. [`Engine::Real`] runs fieldsync's real store and
//! protocol sessions ([`real`]); it is the `fieldsync sim` CLI's default. [`Engine::Reference`]
//! runs small built-in nodes ([`simple`], built by [`SimpleFactory`], with a planted-bug switch
//! for tests); it is `RunOptions::default()`'s, so the example below runs the reference nodes.
//! For the real ones, set `engine: Engine::Real` in the options.
//!
//! ```
//! use fieldsync_sim::{run_scenario, RunOptions, Scenario};
//! let s = Scenario::from_toml_str(
//!     "name = 'demo'\nduration = '30m'\n[[groups]]\nname = 'vans'\ndevices = 3\n\
//!      connectivity = { model = 'gilbert-elliott', mean_up = '5m', mean_down = '2m' }",
//!     std::path::Path::new("."),
//! ).unwrap();
//! let report = run_scenario(&s, 42, &RunOptions::default()).unwrap();
//! assert!(report.converged);
//! assert_eq!(report.trace_digest, run_scenario(&s, 42, &RunOptions::default()).unwrap().trace_digest);
//! ```
#![warn(missing_docs)]

pub mod connectivity;
pub mod digest;
mod engine;
pub mod histogram;
mod invariants;
mod metrics;
mod node;
pub mod real;
pub mod report;
pub mod scenario;
pub mod simple;
mod sweep;
pub mod world;

#[cfg(feature = "cli")]
pub mod cli;

pub use engine::{Engine, RunOptions, Sim, SimBuilder};
pub use metrics::{DeviceMetrics, Invariant, Metrics, Series, SimReport, Violation};
pub use node::{
    AdminEvent, Edit, EditKind, EditResult, FieldNode, NodeContext, NodeEvent, NodeFactory, NodeId,
    Observe, OpId, RowKey, SimMessage, SimNode, Transmit, HUB, SIM_EPOCH_MS,
};
pub use scenario::{Dur, Scenario, ScenarioError};
pub use simple::{PlantedBug, SimpleFactory};
pub use sweep::{shrink, sweep, ShrinkOutcome, SweepParam, SweepRow};

/// Run a scenario with the engine `opts.engine` selects (with `opts.planted_bug`).
pub fn run_scenario(
    scenario: &Scenario,
    seed: u64,
    opts: &RunOptions,
) -> Result<SimReport, ScenarioError> {
    run_scenario_progress(scenario, seed, opts, &mut |_, _| {})
}

/// Like [`run_scenario`], reporting progress as `(now_ms, end_ms)`.
pub fn run_scenario_progress(
    scenario: &Scenario,
    seed: u64,
    opts: &RunOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SimReport, ScenarioError> {
    let _span = tracing::info_span!("run_scenario", engine = %opts.engine, seed).entered();
    match opts.engine {
        Engine::Reference => run_scenario_with(
            scenario,
            seed,
            opts,
            SimpleFactory {
                bug: opts.planted_bug,
            },
            progress,
        ),
        Engine::Real => {
            real::check_scenario(scenario)?;
            run_scenario_with(
                scenario,
                seed,
                opts,
                real::RealFactory::new(seed, opts.planted_bug)
                    .with_device_replica(opts.device_replica),
                progress,
            )
        }
    }
}

/// Run a scenario with any node implementation, reporting progress as `(now_ms, end_ms)`.
pub fn run_scenario_with<F: NodeFactory>(
    scenario: &Scenario,
    seed: u64,
    opts: &RunOptions,
    factory: F,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SimReport, ScenarioError> {
    let sim = SimBuilder::new(scenario)
        .rng_seed(seed)
        .options(opts.clone())
        .build(factory)?;
    Ok(sim.finish_with_progress(progress))
}
