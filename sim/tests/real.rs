//! The simulator running fieldsync's real store and protocol sessions (`Engine::Real`).
// Helpers outside #[test] fns unwrap too: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_sim::{
    run_scenario, shrink, Dur, Engine, Invariant, PlantedBug, RunOptions, Scenario,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn shipped() -> Vec<(String, Scenario)> {
    let mut v: Vec<(String, Scenario)> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let s = Scenario::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), s)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn real() -> RunOptions {
    RunOptions {
        engine: Engine::Real,
        ..RunOptions::default()
    }
}

/// Small enough for debug builds on two cores.
fn small(s: &Scenario) -> Scenario {
    s.downscaled(4, Dur::hours(1))
}

/// CI seeds per shipped scenario (`FIELDSYNC_SIM_SEEDS` for more).
fn ci_seeds() -> u64 {
    std::env::var("FIELDSYNC_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

#[test]
fn real_engine_same_seed_same_digest_for_every_shipped_scenario() {
    for (name, s) in shipped() {
        let s = small(&s);
        let t = Instant::now();
        let a = run_scenario(&s, 7, &real()).unwrap();
        let b = run_scenario(&s, 7, &real()).unwrap();
        eprintln!(
            "{name}: digest {} steps {} delivered {} in {:?}",
            a.trace_digest,
            a.steps,
            a.metrics.ops_delivered,
            t.elapsed() / 2
        );
        assert_eq!(a.trace_digest, b.trace_digest, "{name}");
        assert_eq!(a.steps, b.steps, "{name}");
        assert!(a.violations.is_empty(), "{name}: {:#?}", a.violations);
        assert!(a.converged, "{name} did not converge");
        assert!(a.metrics.messages_delivered > 0, "{name}");
    }
}
