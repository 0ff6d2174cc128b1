//! Routing one row write to the affected users, against full re-evaluation.
//!
//! The field-service schema and profile (`examples/field-service/`) over 1,000,000 rows with
//! 1,000 and then 10,000 field technicians in 3 business units (teams of 10 share work
//! orders). Writes are a realistic mix: work orders re-assigned, re-scheduled, closed, moved to
//! another account; bookings re-assigned and re-linked; accounts re-parented; contacts
//! edited; inserts and deletes; a few product catalog changes.
//!
//! `ours` is [`Router::handle_write`]. `base` is full re-evaluation of the same write: every
//! user's device set recomputed (with the same indexes, not a row scan — the scan-based
//! `evaluate` is slower still). Re-evaluating 10,000 users per write is too slow to run for
//! every write, so it is sampled: the per-user recomputation time is measured on a sample of
//! users after a sample of the writes, and multiplied by the number of users.
//!
//! Run: `cargo bench -p fieldsync-replication --bench routing`. `ROUTING_BENCH_ROWS` and
//! `ROUTING_BENCH_WRITES` shrink it for a quick look.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "common/field_service.rs"]
mod field_service;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use field_service::{counts, environment, example, id_of, owner_user, row_values, Data, DAY, NOW};
use fieldsync_replication::{Profile, Router};
use fieldsync_store::{Schema, Value};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

/// One write of the mix: (table, row index, new values or delete).
type Write = (&'static str, usize, Option<BTreeMap<String, Value>>);

fn next_write(
    rng: &mut ChaCha8Rng,
    d: &mut Data,
    current: &mut HashMap<(&'static str, usize), Option<BTreeMap<String, Value>>>,
    version: u64,
) -> Write {
    let p = rng.gen_range(0..100);
    let table: &'static str = match p {
        0..=39 => "msdyn_workorder",
        40..=64 => "bookableresourcebooking",
        65..=79 => "account",
        80..=89 => "contact",
        90..=98 => "incident",
        _ => "product",
    };
    let n = d.counts[table];
    let kind = rng.gen_range(0..100);
    if kind < 5 && table != "product" {
        // Insert a new row.
        d.counts.insert(table, n + 1);
        let v = row_values(d, table, n, version);
        current.insert((table, n), Some(v.clone()));
        return (table, n, Some(v));
    }
    let i = rng.gen_range(0..n);
    if kind < 9 && matches!(table, "msdyn_workorder" | "bookableresourcebooking") {
        current.insert((table, i), None);
        return (table, i, None);
    }
    let mut v = match current.get(&(table, i)) {
        Some(Some(v)) => v.clone(),
        Some(None) => row_values(d, table, i, 0),
        None => row_values(d, table, i, 0),
    };
    let user = *d.users.choose(rng).unwrap();
    match table {
        "msdyn_workorder" => match rng.gen_range(0..5) {
            0 => {
                v.insert("ownerid".into(), owner_user(user));
            }
            1 => {
                v.insert(
                    "msdyn_systemstatus".into(),
                    Value::Choice(690_970_000 + rng.gen_range(0..6)),
                );
            }
            2 => {
                v.insert("statecode".into(), Value::Choice(rng.gen_range(0..2)));
            }
            3 => {
                let a = id_of("account", rng.gen_range(0..d.counts["account"]));
                v.insert("msdyn_serviceaccount".into(), Value::Lookup(a));
            }
            _ => {
                v.insert(
                    "msdyn_datewindowstart".into(),
                    Value::DateTime(NOW + rng.gen_range(-5..10) * DAY),
                );
            }
        },
        "bookableresourcebooking" => match rng.gen_range(0..3) {
            0 => {
                v.insert("ownerid".into(), owner_user(user));
            }
            1 => {
                let w = id_of(
                    "msdyn_workorder",
                    rng.gen_range(0..d.counts["msdyn_workorder"]),
                );
                v.insert("msdyn_workorder".into(), Value::Lookup(w));
            }
            _ => {
                v.insert("bookingstatus".into(), Value::Choice(rng.gen_range(1..=5)));
            }
        },
        "account" => {
            if rng.gen_bool(0.5) {
                let a = id_of("account", rng.gen_range(0..d.counts["account"]));
                v.insert("parentaccountid".into(), Value::Lookup(a));
            } else {
                v.insert(
                    "telephone1".into(),
                    Value::Text(format!("+1 555 {version}")),
                );
            }
        }
        "product" => {
            v.insert(
                "quantityonhand".into(),
                Value::Integer(rng.gen_range(0..100)),
            );
        }
        _ => {
            v.insert("lastname".into(), Value::Text(format!("Edited {version}")));
        }
    }
    current.insert((table, i), Some(v.clone()));
    (table, i, Some(v))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e6
}

struct Result_ {
    median_us: f64,
    p99_us: f64,
    base_us: f64,
    base_p99_us: f64,
    affected_avg: f64,
}

fn run(n_users: usize, total_rows: usize, n_writes: usize) -> Result_ {
    let schema = Schema::from_toml(&example("schema.toml")).unwrap();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let (env, mut d) = environment(n_users);
    for (t, c) in counts(total_rows) {
        d.counts.insert(t, c);
    }
    let t0 = Instant::now();
    let mut router = Router::new(&schema, &env, &profile, NOW).unwrap();
    for (t, c) in counts(total_rows) {
        for i in 0..c {
            let v = row_values(&d, t, i, 0);
            router.load_row(t, id_of(t, i), Some(&v));
        }
    }
    let loaded = t0.elapsed();
    router.rebuild();
    let built = t0.elapsed();
    let memberships: usize = d
        .users
        .iter()
        .take(20)
        .map(|u| router.reevaluate_user(*u))
        .sum::<usize>()
        / 20;
    println!(
        "# {n_users} users, {} rows: loaded in {:.1}s, sets computed in {:.1}s, ~{memberships} rows per device",
        router.row_count(),
        loaded.as_secs_f64(),
        (built - loaded).as_secs_f64()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut current = HashMap::new();
    let mut times = Vec::with_capacity(n_writes);
    let mut base_samples = Vec::new();
    let mut affected = 0usize;
    let sample_every = (n_writes / 10).max(1);
    let sample_users = 100.min(n_users);
    for k in 0..n_writes {
        let (table, i, values) = next_write(&mut rng, &mut d, &mut current, k as u64 + 1);
        let id = id_of(table, i);
        let t = Instant::now();
        let route = router.handle_write(table, id, values.as_ref());
        times.push(t.elapsed());
        affected += route.deltas.len() + route.updated.len();
        std::hint::black_box(&route);
        if k % sample_every == 0 {
            // Full re-evaluation of this write: every user's set, sampled and scaled.
            let users: Vec<Uuid> = d
                .users
                .choose_multiple(&mut rng, sample_users)
                .copied()
                .collect();
            let t = Instant::now();
            for u in &users {
                std::hint::black_box(router.reevaluate_user(*u));
            }
            let per_user = t.elapsed().as_secs_f64() / users.len() as f64;
            base_samples.push(Duration::from_secs_f64(per_user * n_users as f64));
        }
    }
    // Environment changes (not part of the write figures): one user joins a team; a role
    // loses a privilege for everyone who holds it.
    let mut env2 = env.clone();
    let crew = env2.team_by_name("crew0").unwrap().id;
    env2.add_team_member(crew, d.users[n_users - 1]).unwrap();
    let t = Instant::now();
    let deltas = router.handle_environment(&env2);
    println!(
        "# {n_users} users: a team membership change took {:.1} ms ({} user(s) changed)",
        t.elapsed().as_secs_f64() * 1e3,
        deltas.len()
    );
    let mut role = env2.role_by_name("Field Technician").unwrap().clone();
    role.grant(
        "product",
        fieldsync_replication::Privilege::Read,
        fieldsync_replication::Depth::None,
    );
    env2.put_role(role);
    let t = Instant::now();
    let deltas = router.handle_environment(&env2);
    println!(
        "# {n_users} users: a role change took {:.1} ms ({} user(s) evict the product catalog)",
        t.elapsed().as_secs_f64() * 1e3,
        deltas.len()
    );
    times.sort();
    base_samples.sort();
    Result_ {
        median_us: percentile(&times, 0.5),
        p99_us: percentile(&times, 0.99),
        base_us: percentile(&base_samples, 0.5),
        base_p99_us: percentile(&base_samples, 0.99),
        affected_avg: affected as f64 / n_writes as f64,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is ignored.
    let rows: usize = std::env::var("ROUTING_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let writes: usize = std::env::var("ROUTING_BENCH_WRITES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000);
    println!("# routing one row write vs full re-evaluation; {rows} rows, {writes} writes per run");
    println!("# base = every user's set recomputed with the same indexes (sampled: 100 users after each of 10 of the writes, scaled to all users)");
    let r1 = run(1_000, rows, writes);
    let r10 = run(10_000, rows, writes);
    for (name, r) in [("route_1k", &r1), ("route_10k", &r10)] {
        println!(
            "# {name}: median {:.1} us, p99 {:.1} us, {:.1} users reached per write on average",
            r.median_us, r.p99_us, r.affected_avg
        );
        println!(
            "BENCH name={name} ours={:.2} base={:.0} unit=us ratio={:.6}",
            r.median_us,
            r.base_us,
            r.median_us / r.base_us
        );
        println!(
            "BENCH name={name}_p99 ours={:.2} base={:.0} unit=us ratio={:.6}",
            r.p99_us,
            r.base_p99_us,
            r.p99_us / r.base_p99_us
        );
    }
    println!(
        "BENCH name=route_growth ours={:.2} base={:.2} unit=us ratio={:.3}",
        r10.median_us,
        r1.median_us,
        r10.median_us / r1.median_us
    );
}
