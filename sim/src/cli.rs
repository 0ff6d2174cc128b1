//! The `fieldsync sim ...` commands (feature `cli`): parsing with clap, a progress bar, the
//! summary table, JSON and HTML output, and the exact command that reproduces a failing seed.
//!
//! The `node` binary embeds [`SimCommand`] as a subcommand and calls [`execute`]; the process
//! exits with [`std::process::ExitCode::FAILURE`] when an invariant is violated.

use crate::metrics::Invariant;
use crate::scenario::{Connectivity, Scenario, ScenarioError};
use crate::simple::PlantedBug;
use crate::sweep::SweepParam;
use crate::{report, run_scenario_progress, shrink, sweep, Engine, RunOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `fieldsync sim ...`
#[derive(Debug, clap::Subcommand)]
#[non_exhaustive]
pub enum SimCommand {
    /// Run a scenario: print a summary table; optionally write JSON and an HTML report.
    Run(RunArgs),
    /// Run a scenario over a parameter's values and tabulate the metrics.
    Sweep(SweepArgs),
}

/// Arguments of `fieldsync sim run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The scenario file (TOML).
    pub scenario: PathBuf,
    /// Seed of the run's random source.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run this many seeds from `--seed` on, stopping at the first that violates an invariant.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Write metrics, "converged", "violations" and "trace_digest" as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with SVG plots here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// When an invariant is violated, reduce the scenario and print it as TOML.
    #[arg(long)]
    pub shrink: bool,
    /// Most runs the shrinker makes.
    #[arg(long, default_value_t = 300)]
    pub shrink_runs: usize,
    /// Plant a bug in the built-in nodes (hub-forgets-eviction, ack-before-persist,
    /// device-rewinds-cursor): a test
    /// switch to see the checker and the shrinker at work.
    #[arg(long, hide = true)]
    pub plant_bug: Option<PlantedBug>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// The nodes: `real` (fieldsync's store and protocol sessions) or `reference` (the
    /// built-in protocol, fast). Default: the scenario's `engine`, else real.
    #[arg(long)]
    pub engine: Option<Engine>,
}

/// The engine of a run: the flag, else the scenario's, else the real one.
fn engine_of(flag: Option<Engine>, scenario: &Scenario) -> Engine {
    flag.or(scenario.engine).unwrap_or(Engine::Real)
}

/// Arguments of `fieldsync sim sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// The scenario file (TOML).
    pub scenario: PathBuf,
    /// The parameter and its values: `devices=10,100,1000` (also duration, edits, loss,
    /// latency, bandwidth_kbps, sync_interval, batch, hot_fraction, office_edits).
    #[arg(long)]
    pub param: SweepParam,
    /// Seed of every run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the table as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// The nodes: `real` or `reference` (default: the scenario's `engine`, else real).
    #[arg(long)]
    pub engine: Option<Engine>,
}

/// Why a `sim` command failed (an invariant violation is not an error: see the exit code).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimCliError {
    /// The scenario (or a trace file, or a parameter) is invalid.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// An output file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn write(path: &Path, text: &str) -> Result<(), SimCliError> {
    std::fs::write(path, text).map_err(|source| SimCliError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style);
    }
    pb
}

/// Run a `sim` command; returns the process exit code (failure when an invariant is violated).
pub fn execute(cmd: SimCommand) -> Result<ExitCode, SimCliError> {
    match cmd {
        SimCommand::Run(a) => run(a),
        SimCommand::Sweep(a) => run_sweep(a),
    }
}

fn reproduce(a: &RunArgs, seed: u64) -> String {
    let mut s = format!("fieldsync sim run {} --seed {seed}", a.scenario.display());
    if let Some(e) = a.engine {
        s.push_str(&format!(" --engine {e}"));
    }
    if let Some(b) = a.plant_bug {
        s.push_str(&format!(" --plant-bug {b}"));
    }
    s
}

/// The reduced scenario as a file that reproduces wherever it is saved: it names the engine
/// it failed on, and its trace files by absolute path (they were relative to the original
/// scenario's directory).
fn reproducible(reduced: &Scenario, engine: Engine, original: &Path) -> Scenario {
    let mut s = reduced.clone();
    s.engine = Some(engine);
    let base = original.parent().unwrap_or_else(|| Path::new("."));
    for g in &mut s.groups {
        if let Connectivity::Trace { file, .. } = &mut g.connectivity {
            if file.is_relative() {
                let joined = base.join(&*file);
                *file = std::path::absolute(&joined).unwrap_or(joined);
            }
        }
    }
    s
}

/// The command that runs a reduced scenario saved as `file`.
fn reproduce_reduced(a: &RunArgs, file: &str, seed: u64) -> String {
    let mut s = format!("fieldsync sim run {file} --seed {seed}");
    if let Some(b) = a.plant_bug {
        s.push_str(&format!(" --plant-bug {b}"));
    }
    s
}

fn run(a: RunArgs) -> Result<ExitCode, SimCliError> {
    let scenario = Scenario::from_file(&a.scenario)?;
    let opts = RunOptions {
        planted_bug: a.plant_bug,
        engine: engine_of(a.engine, &scenario),
        ..RunOptions::default()
    };
    let mut last = None;
    for seed in a.seed..a.seed.saturating_add(a.seeds.max(1)) {
        let pb = bar(
            scenario.duration.0 + scenario.settle.0,
            a.quiet,
            "{prefix} [{bar:40}] {msg}",
        );
        pb.set_prefix(format!("{} seed {seed}", scenario.name));
        let report = run_scenario_progress(&scenario, seed, &opts, &mut |now, end| {
            pb.set_length(end);
            pb.set_position(now);
            pb.set_message(report::human_ms(now));
        })?;
        pb.finish_and_clear();
        let failed = report.failed() || !report.converged;
        if failed || seed + 1 == a.seed.saturating_add(a.seeds.max(1)) {
            last = Some((seed, report));
            if failed {
                break;
            }
        } else if a.seeds > 1 {
            println!(
                "seed {seed}: ok, digest {}, converged {}",
                report.trace_digest,
                report
                    .time_to_converge_ms
                    .map(report::human_ms)
                    .unwrap_or_default()
            );
        }
    }
    let Some((seed, report)) = last else {
        return Ok(ExitCode::SUCCESS);
    };
    println!("{}", report::summary_table(&report));
    if let Some(p) = &a.json {
        write(p, &report.to_json())?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.report {
        write(p, &report::html(&report))?;
        println!("wrote {}", p.display());
    }
    if !report.failed() && report.converged {
        return Ok(ExitCode::SUCCESS);
    }
    println!("FAILED: reproduce with `{}`", reproduce(&a, seed));
    if a.shrink {
        let target = report.violations.first().map(|v| v.invariant);
        println!(
            "shrinking (keeping `{}` failing, at most {} runs)...",
            target.map(Invariant::name).unwrap_or("-"),
            a.shrink_runs
        );
        let out = shrink(&scenario, seed, &opts, target, a.shrink_runs)?;
        println!(
            "shrunk in {} runs: devices {} -> {}, events {} -> {}, duration {} -> {}",
            out.runs,
            out.devices.0,
            out.devices.1,
            out.events.0,
            out.events.1,
            out.duration.0,
            out.duration.1
        );
        if let Some(r) = &out.report {
            if let Some(v) = r.violations.iter().find(|v| Some(v.invariant) == target) {
                println!(
                    "  {} at {}: {}",
                    v.invariant,
                    report::human_ms(v.time_ms),
                    v.detail
                );
                for s in &v.steps {
                    println!("      {s}");
                }
            }
        }
        let reduced = reproducible(&out.scenario, opts.engine, &a.scenario);
        println!(
            "# reduced scenario: save it as reduced.toml and run `{}`\n{}",
            reproduce_reduced(&a, "reduced.toml", seed),
            reduced.to_toml_minimal()?
        );
    }
    Ok(ExitCode::FAILURE)
}

fn run_sweep(a: SweepArgs) -> Result<ExitCode, SimCliError> {
    let scenario = Scenario::from_file(&a.scenario)?;
    let pb = bar(
        a.param.values.len() as u64,
        a.quiet,
        "{prefix} [{bar:40}] {pos}/{len}",
    );
    pb.set_prefix(format!("sweep {}", a.param.name));
    let rows = sweep(
        &scenario,
        a.seed,
        &a.param,
        &RunOptions {
            engine: engine_of(a.engine, &scenario),
            ..RunOptions::default()
        },
        &mut |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    println!(
        "{:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7} {:>9} {:>8} {:>10} {:>5}",
        a.param.name,
        "devices",
        "stale p50",
        "p95",
        "p99",
        "max",
        "bytes up",
        "bytes down",
        "conns",
        "conflicts",
        "rejected",
        "converge",
        "viol"
    );
    let mut failed = false;
    for r in &rows {
        failed |= r.violations > 0 || !r.converged;
        println!(
            "{:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7} {:>9} {:>8} {:>10} {:>5}",
            r.value,
            r.devices,
            report::human_ms(r.staleness.p50_ms),
            report::human_ms(r.staleness.p95_ms),
            report::human_ms(r.staleness.p99_ms),
            report::human_ms(r.staleness.max_ms),
            report::human_bytes(r.bytes_up),
            report::human_bytes(r.bytes_down),
            r.connections_opened,
            r.conflicts,
            r.ops_rejected,
            r.time_to_converge_ms
                .filter(|_| r.converged)
                .map(report::human_ms)
                .unwrap_or_else(|| "NO".into()),
            r.violations
        );
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "scenario": scenario.name,
            "seed": a.seed,
            "param": a.param.name,
            "rows": rows,
        });
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        write(p, &text)?;
        println!("wrote {}", p.display());
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: SimCommand,
    }

    #[test]
    fn parses_run_and_sweep() {
        let t = Top::try_parse_from([
            "sim", "run", "s.toml", "--seed", "9", "--json", "o.json", "--report", "o.html",
            "--shrink",
        ])
        .unwrap();
        let SimCommand::Run(a) = t.cmd else { panic!() };
        assert_eq!(a.seed, 9);
        assert!(a.shrink && a.json.is_some() && a.report.is_some());
        let t = Top::try_parse_from(["sim", "sweep", "s.toml", "--param", "devices=10,100,1000"])
            .unwrap();
        let SimCommand::Sweep(a) = t.cmd else {
            panic!()
        };
        assert_eq!(a.param.values, vec!["10", "100", "1000"]);
        assert!(Top::try_parse_from(["sim", "sweep", "s.toml", "--param", "nope=1"]).is_err());
    }

    /// The scenario `--shrink` prints runs as it failed from any directory: same engine,
    /// same trace files.
    #[test]
    fn the_reduced_scenario_reproduces_from_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("traces")).unwrap();
        std::fs::write(dir.path().join("traces/van.csv"), "0,up,50,1000,0\n").unwrap();
        let path = dir.path().join("s.toml");
        let text = "name='t'\nduration='10m'\n[[groups]]\nname='a'\ndevices=2\n\
                    connectivity={model='trace',file='traces/van.csv'}\n";
        let original = Scenario::from_toml_str(text, dir.path()).unwrap();
        let args = RunArgs {
            scenario: path.clone(),
            seed: 4,
            seeds: 1,
            json: None,
            report: None,
            shrink: true,
            shrink_runs: 10,
            plant_bug: Some(PlantedBug::HubForgetsEviction),
            quiet: true,
            engine: Some(Engine::Reference),
        };
        let reduced = reproducible(&original, Engine::Reference, &path);
        let elsewhere = tempfile::tempdir().unwrap();
        let back =
            Scenario::from_toml_str(&reduced.to_toml_minimal().unwrap(), elsewhere.path()).unwrap();
        assert_eq!(back.engine, Some(Engine::Reference));
        let opts = RunOptions {
            engine: Engine::Reference,
            ..RunOptions::default()
        };
        assert_eq!(
            crate::run_scenario(&back, 4, &opts).unwrap().trace_digest,
            crate::run_scenario(&original, 4, &opts)
                .unwrap()
                .trace_digest
        );
        assert_eq!(
            reproduce_reduced(&args, "reduced.toml", 4),
            "fieldsync sim run reduced.toml --seed 4 --plant-bug hub-forgets-eviction"
        );
    }

    #[test]
    fn run_writes_outputs_and_fails_on_a_planted_bug() {
        let dir = tempfile::tempdir().unwrap();
        let scen = dir.path().join("s.toml");
        std::fs::write(
            &scen,
            "name='cli'\nduration='1h'\n[[groups]]\nname='a'\ndevices=3\n[[groups]]\nname='b'\ndevices=3\n\
             [[events]]\nat='10m'\nkind='reassign'\nrows=4\nfrom_group='a'\nto_group='b'\n",
        )
        .unwrap();
        let json = dir.path().join("o.json");
        let html = dir.path().join("o.html");
        let code = execute(SimCommand::Run(RunArgs {
            scenario: scen.clone(),
            seed: 1,
            seeds: 1,
            json: Some(json.clone()),
            report: Some(html.clone()),
            shrink: false,
            shrink_runs: 10,
            plant_bug: None,
            quiet: true,
            engine: None,
        }))
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["converged"], serde_json::Value::Bool(true));
        assert!(v["violations"].as_array().unwrap().is_empty());
        assert_eq!(v["trace_digest"].as_str().unwrap().len(), 16);
        assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
        let code = execute(SimCommand::Run(RunArgs {
            scenario: scen,
            seed: 1,
            seeds: 20,
            json: None,
            report: None,
            shrink: true,
            shrink_runs: 30,
            plant_bug: Some(PlantedBug::HubForgetsEviction),
            quiet: true,
            engine: None,
        }))
        .unwrap();
        assert_eq!(code, ExitCode::FAILURE);
    }
}
