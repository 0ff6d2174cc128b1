//! End-to-end tests of the simulator with the built-in nodes.
// Helpers outside #[test] fns unwrap too: a panic here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_sim::connectivity::{sub_rng, ConnectivityModel};
use fieldsync_sim::scenario::Connectivity;
use fieldsync_sim::{
    report, run_scenario, shrink, sweep, Dur, Invariant, PlantedBug, RunOptions, Scenario,
    SweepParam,
};
use std::path::{Path, PathBuf};

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

/// Small enough for debug builds.
fn small(s: &Scenario) -> Scenario {
    s.downscaled(8, Dur::hours(2))
}

#[test]
fn every_shipped_scenario_parses_and_ships() {
    let names: Vec<String> = shipped().into_iter().map(|(n, _)| n).collect();
    for want in [
        "field-day.toml",
        "rural-outage.toml",
        "morning-storm.toml",
        "reassignment-wave.toml",
        "hub-crash.toml",
        "hot-row-storm.toml",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}: {names:?}");
    }
    let by_name = |n: &str| shipped().into_iter().find(|(f, _)| f == n).unwrap().1;
    assert_eq!(by_name("field-day.toml").device_count(), 40);
    assert_eq!(by_name("morning-storm.toml").device_count(), 500);
}

#[test]
fn same_seed_same_digest_for_every_shipped_scenario() {
    for (name, s) in shipped() {
        let s = small(&s);
        let a = run_scenario(&s, 7, &RunOptions::default()).unwrap();
        let b = run_scenario(&s, 7, &RunOptions::default()).unwrap();
        assert_eq!(a.trace_digest, b.trace_digest, "{name}");
        assert_eq!(a.steps, b.steps, "{name}");
        assert!(a.violations.is_empty(), "{name}: {:#?}", a.violations);
        assert!(a.converged, "{name} did not converge");
        assert!(a.metrics.messages_delivered > 0, "{name}");
    }
}

#[test]
fn different_seeds_different_digests() {
    let (_, s) = shipped()
        .into_iter()
        .find(|(n, _)| n == "field-day.toml")
        .unwrap();
    let s = small(&s);
    let a = run_scenario(&s, 1, &RunOptions::default()).unwrap();
    let b = run_scenario(&s, 2, &RunOptions::default()).unwrap();
    assert_ne!(a.trace_digest, b.trace_digest);
}

#[test]
fn shipped_scenarios_pass_over_several_seeds() {
    // CI-sized: the full count runs with FIELDSYNC_SIM_SEEDS=200.
    let seeds: u64 = std::env::var("FIELDSYNC_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for (name, s) in shipped() {
        let s = small(&s);
        for seed in 100..100 + seeds {
            let r = run_scenario(&s, seed, &RunOptions::default()).unwrap();
            assert!(
                !r.failed() && r.converged,
                "{name} seed {seed}: reproduce with `fieldsync sim run scenarios/{name} --seed {seed}`\n{:#?}",
                r.violations
            );
        }
    }
}

#[test]
fn gilbert_elliott_up_fraction_matches_the_means() {
    let cfg = Connectivity::GilbertElliott {
        mean_up: Dur::mins(20),
        mean_down: Dur::mins(10),
    };
    let horizon = 2_000 * 3_600_000u64; // 2000 hours
    let mut up_ms = 0u64;
    let mut downs = 0u64;
    let mut last: Option<(u64, bool)> = None;
    for c in ConnectivityModel::new(&cfg, sub_rng(99, "test", 0)) {
        if c.at_ms >= horizon {
            break;
        }
        if let Some((t, up)) = last {
            if up {
                up_ms += c.at_ms - t;
            }
        }
        if !c.up {
            downs += 1;
        }
        last = Some((c.at_ms, c.up));
    }
    let frac = up_ms as f64 / horizon as f64;
    assert!((frac - 2.0 / 3.0).abs() < 0.02, "up fraction {frac}");
    // mean cycle 30 min → about 2 outages per hour
    let per_hour = downs as f64 / 2000.0;
    assert!((per_hour - 2.0).abs() < 0.1, "outages per hour {per_hour}");
}

#[test]
fn gilbert_elliott_in_a_run_matches_the_means() {
    let s = Scenario::from_toml_str(
        "name='ge'\nduration='24h'\nsettle='1m'\nsample_interval='10m'\n[sync]\ninterval='1h'\n\
         [[groups]]\nname='a'\ndevices=20\nconnectivity={model='gilbert-elliott',mean_up='30m',mean_down='30m'}\n\
         [[workload.tables]]\nname='t'\nrows_per_device=1\nedits_per_device_hour=0",
        Path::new("."),
    )
    .unwrap();
    let r = run_scenario(&s, 5, &RunOptions::default()).unwrap();
    let up: u64 = r.metrics.per_device.iter().map(|d| d.link_up_ms).sum();
    let total = 20.0 * 24.0 * 3_600_000.0;
    let frac = up as f64 / total;
    assert!((frac - 0.5).abs() < 0.05, "up fraction {frac}");
    assert!(r.metrics.connections_opened > 20 * 10);
}

#[test]
fn a_trace_file_replays_exactly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.csv"),
        "t_ms,state,latency_ms,bandwidth_kbps,loss\n0,down,10,100,0\n60000,up,25,800,0.0\n120000,down,0,0,0\n180000,up,40,100,0\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("s.toml"),
        "name='trace'\nduration='5m'\nsample_interval='30s'\n[[groups]]\nname='a'\ndevices=2\n\
         connectivity={model='trace',file='t.csv'}\n",
    )
    .unwrap();
    let s = Scenario::from_file(&dir.path().join("s.toml")).unwrap();
    let Connectivity::Trace { rows, .. } = &s.groups[0].connectivity else {
        panic!()
    };
    type Change = (u64, bool, Option<(u64, u64, f64)>);
    let model: Vec<Change> = ConnectivityModel::new(&s.groups[0].connectivity, sub_rng(1, "x", 1))
        .map(|c| (c.at_ms, c.up, c.quality))
        .collect();
    let want: Vec<Change> = rows
        .iter()
        .map(|r| (r.t_ms, r.up, Some((r.latency_ms, r.bandwidth_kbps, r.loss))))
        .collect();
    assert_eq!(model, want);
    // In a run: the link state series follows the trace at every sample.
    let r = run_scenario(&s, 3, &RunOptions::default()).unwrap();
    for (k, t) in r.series.times_ms.iter().enumerate() {
        if *t >= 300_000 {
            break; // after the final heal every link is up
        }
        let want_up = (60_000..120_000).contains(t) || *t >= 180_000;
        for d in 0..2 {
            let st = r.series.device_link[d][k];
            assert_eq!(st != 0, want_up, "t={t} device {d} state {st}");
        }
    }
    assert_eq!(
        r.metrics.per_device[0].link_up_ms,
        60_000 + 120_000 + (r.end_ms - 300_000)
    );
}

fn leak_scenario() -> Scenario {
    Scenario::from_toml_str(
        "name='leaky'\nduration='2h'\nsettle='30m'\n\
         [[groups]]\nname='a'\ndevices=6\nconnectivity={model='gilbert-elliott',mean_up='20m',mean_down='5m'}\n\
         [[groups]]\nname='b'\ndevices=6\n\
         [[workload.tables]]\nname='wo'\nrows_per_device=6\nedits_per_device_hour=6\n\
         [[events]]\nat='20m'\nkind='reassign'\nrows=5\nfrom_group='a'\nto_group='b'\n\
         [[events]]\nat='40m'\nkind='hub-crash'\n[[events]]\nat='45m'\nkind='hub-restart'\n\
         [[events]]\nat='1h'\nkind='partition'\ngroup='b'\n[[events]]\nat='1h10m'\nkind='heal'\ngroup='b'\n",
        Path::new("."),
    )
    .unwrap()
}

#[test]
fn the_planted_eviction_bug_is_found_named_and_shrunk() {
    let s = leak_scenario();
    let clean = run_scenario(&s, 1, &RunOptions::default()).unwrap();
    assert!(!clean.failed(), "{:#?}", clean.violations);
    let opts = RunOptions {
        planted_bug: Some(PlantedBug::HubForgetsEviction),
        ..RunOptions::default()
    };
    let seed = (0..100)
        .find(|seed| {
            run_scenario(&s, *seed, &opts)
                .unwrap()
                .violates(Invariant::NoLeak)
        })
        .expect("found within 100 seeds");
    let r = run_scenario(&s, seed, &opts).unwrap();
    let v = r
        .violations
        .iter()
        .find(|v| v.invariant == Invariant::NoLeak)
        .unwrap();
    assert!(
        v.row.is_some() && v.node.is_some() && !v.steps.is_empty(),
        "{v:#?}"
    );
    assert!(r.violates(Invariant::EvictionsHappen));
    let json = r.to_json();
    assert!(json.contains("\"no-leak\"") && json.contains("\"trace_digest\""));

    let out = shrink(&s, seed, &opts, Some(Invariant::NoLeak), 200).unwrap();
    assert_eq!(out.invariant, Some(Invariant::NoLeak));
    assert!(out.devices.1 < out.devices.0, "{:?}", out.devices);
    assert!(out.events.1 < out.events.0, "{:?}", out.events);
    let toml = out.scenario.to_toml().unwrap();
    let back = Scenario::from_toml_str(&toml, Path::new(".")).unwrap();
    assert!(run_scenario(&back, seed, &opts)
        .unwrap()
        .violates(Invariant::NoLeak));
}

#[test]
fn the_planted_ack_bug_loses_acknowledged_ops_on_a_hub_crash() {
    let s = leak_scenario();
    let opts = RunOptions {
        planted_bug: Some(PlantedBug::AckBeforePersist),
        ..RunOptions::default()
    };
    let found = (0..100).any(|seed| {
        run_scenario(&s, seed, &opts)
            .unwrap()
            .violates(Invariant::NoAckedOpLost)
    });
    assert!(found);
}

#[test]
fn html_report_is_self_contained_with_svg() {
    let (_, s) = shipped()
        .into_iter()
        .find(|(n, _)| n == "field-day.toml")
        .unwrap();
    let r = run_scenario(&small(&s), 3, &RunOptions::default()).unwrap();
    let html = report::html(&r);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.trim_end().ends_with("</html>"));
    assert!(html.matches("<svg").count() >= 4);
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert!(!html.contains("<script") && !html.contains("http://") || !html.contains("src="));
    assert!(!html.contains("https://"));
    // crude well-formedness: tags balance for the elements we emit
    for tag in [
        "html", "body", "table", "h1", "h2", "svg", "title", "style", "head",
    ] {
        let open =
            html.matches(&format!("<{tag}>")).count() + html.matches(&format!("<{tag} ")).count();
        let close = html.matches(&format!("</{tag}>")).count();
        assert_eq!(open, close, "<{tag}>");
    }
    let text = report::summary_table(&r);
    assert!(text.contains("staleness p50/p95/p99/max") && text.contains(&r.trace_digest));
}

#[test]
fn sweep_tabulates_a_parameter() {
    let (_, s) = shipped()
        .into_iter()
        .find(|(n, _)| n == "hot-row-storm.toml")
        .unwrap();
    let s = s.downscaled(10, Dur::mins(30));
    let p: SweepParam = "devices=2,4,8".parse().unwrap();
    let rows = sweep(&s, 1, &p, &RunOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.devices).collect::<Vec<_>>(),
        vec![2, 4, 8]
    );
    assert!(rows[2].bytes_up > rows[0].bytes_up);
    assert!("bogus=1".parse::<SweepParam>().is_err());
    assert!("devices".parse::<SweepParam>().is_err());
}

#[test]
#[ignore = "prints full-size runs; cargo test -p fieldsync-sim -- --ignored --nocapture"]
fn print_full_size_runs() {
    for (name, s) in shipped() {
        let t = std::time::Instant::now();
        let r = run_scenario(&s, 1, &RunOptions::default()).unwrap();
        println!(
            "== {name} ({:?})\n{}",
            t.elapsed(),
            report::summary_table(&r)
        );
    }
}

#[test]
fn the_planted_cursor_bug_breaks_cursors_and_double_applies() {
    let s = Scenario::from_toml_str(
        "name='rewind'\nduration='1h'\n[[groups]]\nname='a'\ndevices=4\n\
         connectivity={model='gilbert-elliott',mean_up='10m',mean_down='5m'}\n\
         [workload]\noffice_edits_per_hour=60\n\
         [[workload.tables]]\nname='wo'\nrows_per_device=5\nedits_per_device_hour=6\nhot_rows=2\nhot_fraction=0.5\n",
        Path::new("."),
    )
    .unwrap();
    assert!(!run_scenario(&s, 4, &RunOptions::default())
        .unwrap()
        .failed());
    let opts = RunOptions {
        planted_bug: Some(PlantedBug::DeviceRewindsCursor),
        ..RunOptions::default()
    };
    let r = run_scenario(&s, 4, &opts).unwrap();
    assert!(r.violates(Invariant::CursorsForward), "{:#?}", r.violations);
    assert!(
        r.violates(Invariant::NoOpAppliedTwice),
        "{:#?}",
        r.violations
    );
    let v = r
        .violations
        .iter()
        .find(|v| v.invariant == Invariant::NoOpAppliedTwice)
        .unwrap();
    assert!(v.op.is_some() && v.row.is_some() && !v.steps.is_empty());
}

#[test]
fn report_opens_in_headless_chromium() {
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        eprintln!("SKIPPED report_opens_in_headless_chromium: no chromium on PATH (apt-get install chromium)");
        return;
    };
    let (_, s) = shipped()
        .into_iter()
        .find(|(n, _)| n == "rural-outage.toml")
        .unwrap();
    let r = run_scenario(&small(&s), 2, &RunOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("r.html");
    std::fs::write(&page, report::html(&r)).unwrap();
    let out = std::process::Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    for id in ["staleness", "strip", "pending", "bytes"] {
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "plot {id} missing from the rendered DOM"
        );
    }
    assert!(dom.matches("<polyline").count() >= 3);
}

#[test]
fn hold_release_crash_and_skew_still_converge() {
    let s = Scenario::from_toml_str(
        "name='faults'\nduration='1h'\n[sync]\nlive=false\ninterval='2m'\n\
         [[groups]]\nname='a'\ndevices=4\nclock_skew='5m'\nlink={latency='100ms',loss=0.05,duplicate=0.05,reorder=0.1}\n\
         [workload]\noffice_edits_per_hour=30\n\
         [[workload.tables]]\nname='wo'\nrows_per_device=4\nedits_per_device_hour=20\ncreates_per_device_hour=2\ndeletes_per_device_hour=1\nhot_rows=1\nhot_fraction=0.3\n\
         [[events]]\nat='5m'\nkind='hold'\ndevice=1\n[[events]]\nat='15m'\nkind='release'\ndevice=1\n\
         [[events]]\nat='20m'\nkind='device-crash'\ngroup='a'\n[[events]]\nat='22m'\nkind='device-restart'\ngroup='a'\n\
         [[events]]\nat='30m'\nkind='hub-crash'\n[[events]]\nat='31m'\nkind='hub-restart'\n",
        Path::new("."),
    )
    .unwrap();
    for seed in 0..5 {
        let r = run_scenario(&s, seed, &RunOptions::default()).unwrap();
        assert!(
            r.converged && !r.failed(),
            "seed {seed}: {:#?}",
            r.violations
        );
        // not live: devices connect to sync and hang up, so many connections per device
        assert!(
            r.metrics.connections_opened > 4 * 10,
            "{}",
            r.metrics.connections_opened
        );
        assert!(r.metrics.messages_duplicated > 0 && r.metrics.messages_dropped > 0);
    }
}

/// The digest of one fixed run, frozen: the same on every machine. If a deliberate change to the
/// simulator or the built-in nodes changes it, update the constant in the same commit and say why.
#[test]
fn golden_trace_digest() {
    let s = Scenario::from_toml_str(
        "name='golden'\nduration='30m'\n\
         [[groups]]\nname='a'\ndevices=3\nclock_skew='10s'\n\
         connectivity={model='gilbert-elliott',mean_up='5m',mean_down='2m'}\n\
         link={latency='80ms',jitter='40ms',bandwidth_kbps=500,loss=0.05,duplicate=0.02,reorder=0.05}\n\
         [workload]\noffice_edits_per_hour=20\n\
         [[workload.tables]]\nname='wo'\nrows_per_device=3\nedits_per_device_hour=20\ncreates_per_device_hour=2\nhot_rows=1\nhot_fraction=0.3\n\
         [[events]]\nat='10m'\nkind='reassign'\nrows=2\n\
         [[events]]\nat='15m'\nkind='hub-crash'\n[[events]]\nat='16m'\nkind='hub-restart'\n",
        Path::new("."),
    )
    .unwrap();
    let r = run_scenario(&s, 2026, &RunOptions::default()).unwrap();
    assert!(r.converged && !r.failed(), "{:#?}", r.violations);
    assert_eq!(r.trace_digest, GOLDEN, "steps {}", r.steps);
}

const GOLDEN: &str = "cb05f6875e4dddb2";

#[test]
fn fault_controls_drive_a_sim_by_hand() {
    use fieldsync_sim::{NodeId, SimBuilder, SimpleFactory, HUB};
    let s = Scenario::from_toml_str(
        "name='hand'\nduration='20m'\n[[groups]]\nname='a'\ndevices=3\n\
         [[workload.tables]]\nname='wo'\nrows_per_device=3\nedits_per_device_hour=30\nhot_rows=1\nhot_fraction=0.5\n",
        Path::new("."),
    )
    .unwrap();
    let mut sim = SimBuilder::new(&s)
        .rng_seed(9)
        .build(SimpleFactory::default())
        .unwrap();
    sim.run_until(60_000);
    sim.partition(NodeId(1));
    sim.hold(NodeId(2));
    sim.run_until(5 * 60_000);
    sim.bounce(HUB);
    sim.crash(NodeId(3));
    sim.run_until(8 * 60_000);
    sim.release(NodeId(2));
    sim.repair(NodeId(1));
    sim.restart(NodeId(3));
    assert_eq!(sim.now(), 8 * 60_000);
    let r = sim.finish();
    assert!(r.converged && !r.failed(), "{:#?}", r.violations);
}
