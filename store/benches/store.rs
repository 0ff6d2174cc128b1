//! The store against SQLite (rusqlite, bundled, WAL mode) doing the same work on the same
//! realistic 12-column rows, measured in the same run.
//!
//! `cargo bench -p fieldsync-store` prints one line per comparison:
//! `BENCH name=<id> ours=<n> base=<n> unit=<unit> ratio=<ours/base>` (lower is better).
//!
//! Each workload runs in a child process of this binary, so that its peak memory (VmHWM) is
//! its own. `FIELDSYNC_BENCH_ROWS` scales the row count (default 100,000);
//! `FIELDSYNC_BENCH_CACHE_BYTES` sets the store's sled cache (default: the store's default).

// A benchmark's setup failing is a failed run, not input to handle.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fieldsync_store::{Durability, OwnerKind, OwnerRef, Query, Schema, Store, StoreOptions, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const SCHEMA: &str = r#"
[tables.account]
offline = true
[tables.account.columns]
name = "text"

[tables.contact]
offline = true
[tables.contact.columns]
fullname = "text"

[tables.workorder]
offline = true
[tables.workorder.columns]
name = "text"
summary = "memo"
priority = { choice = [1, 2, 3] }
amount = "decimal"
duration = "integer"
latitude = "float"
longitude = "float"
windowstart = "datetime"
account = { lookup = "account", relationship = "account_workorders" }
contact = { lookup = "contact", relationship = "contact_workorders" }
"#;
// With ownerid and statecode (system columns) a row has 12 columns.

const OWNERS: usize = 20;
const UPDATES: usize = 100_000;
const UPDATE_TX: usize = 1_000;
const DURABLE_COMMITS: usize = 2_000;
const QUERY_REPEAT: usize = 20;
const IMPORT_BATCH: usize = 10_000;

fn row_count() -> usize {
    std::env::var("FIELDSYNC_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn owner(i: usize) -> Uuid {
    Uuid::from_u128(0x9a1f_3c52_0000_4000_8000_0000_0000_0000 + (i % OWNERS) as u128)
}

/// One realistic row, deterministic in `i`.
struct BenchRow {
    id: Uuid,
    name: String,
    summary: String,
    priority: i32,
    amount: String,
    duration: i64,
    latitude: f64,
    longitude: f64,
    windowstart: i64,
    account: Uuid,
    contact: Uuid,
    owner: Uuid,
    statecode: i32,
}

fn bench_row(i: usize) -> BenchRow {
    let mut rng = StdRng::seed_from_u64(i as u64);
    BenchRow {
        id: Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 + i as u128),
        name: format!("WO-{i:07}"),
        summary: format!(
            "Replace filter unit {} at site {}",
            rng.gen_range(1..500),
            rng.gen_range(1..90)
        ),
        priority: rng.gen_range(1..=3),
        amount: format!("{}.{:02}", rng.gen_range(10..5000), rng.gen_range(0..100)),
        duration: rng.gen_range(15..480),
        latitude: rng.gen_range(-60.0..60.0),
        longitude: rng.gen_range(-180.0..180.0),
        windowstart: 1_790_000_000_000 + rng.gen_range(0..30 * 86_400_000),
        account: Uuid::from_u128(rng.gen_range(0..5_000u128)),
        contact: Uuid::from_u128(rng.gen_range(0..20_000u128)),
        owner: owner(i),
        statecode: if rng.gen_bool(0.8) { 0 } else { 1 },
    }
}

fn store_values(r: &BenchRow) -> Vec<(String, Value)> {
    vec![
        ("name".into(), Value::Text(r.name.clone())),
        ("summary".into(), Value::Memo(r.summary.clone())),
        ("priority".into(), Value::Choice(r.priority)),
        (
            "amount".into(),
            Value::Decimal(r.amount.parse().unwrap_or_default()),
        ),
        ("duration".into(), Value::Integer(r.duration)),
        ("latitude".into(), Value::Float(r.latitude)),
        ("longitude".into(), Value::Float(r.longitude)),
        ("windowstart".into(), Value::DateTime(r.windowstart)),
        ("account".into(), Value::Lookup(r.account)),
        ("contact".into(), Value::Lookup(r.contact)),
        (
            "ownerid".into(),
            Value::Owner(OwnerRef {
                kind: OwnerKind::User,
                id: r.owner,
            }),
        ),
        ("statecode".into(), Value::Choice(r.statecode)),
    ]
}

// ---------------------------------------------------------------- ours

fn ours_open(dir: &Path) -> Store {
    let schema = Schema::from_toml(SCHEMA).expect("bench schema");
    let mut options = StoreOptions::default();
    if let Some(bytes) = std::env::var("FIELDSYNC_BENCH_CACHE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options = options.with_cache_capacity(bytes);
    }
    Store::create(dir, schema, options).expect("create store")
}

fn ours_import(store: &Store, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + IMPORT_BATCH).min(n);
        let batch: Vec<_> = (start..end).map(|i| store_values(&bench_row(i))).collect();
        ids.extend(
            store
                .bulk_insert("workorder", batch, &mut |_| {})
                .expect("bulk insert"),
        );
        start = end;
    }
    store.sync().expect("sync");
    ids
}

fn ours(workload: &str, dir: &Path) -> BTreeMap<String, f64> {
    let n = row_count();
    let mut out = BTreeMap::new();
    let store = ours_open(dir);
    match workload {
        "import" => {
            let t = Instant::now();
            ours_import(&store, n);
            out.insert("us_per_row".into(), per(t.elapsed(), n));
            drop(store);
            out.insert("bytes_per_row".into(), dir_bytes(dir) as f64 / n as f64);
        }
        "update" => {
            let ids = ours_import(&store, n);
            let mut rng = StdRng::seed_from_u64(7);
            let t = Instant::now();
            for chunk in 0..UPDATES / UPDATE_TX {
                let mut tx = store.begin();
                for k in 0..UPDATE_TX {
                    let id = ids[rng.gen_range(0..ids.len())];
                    let v = (chunk * UPDATE_TX + k) as i64;
                    tx.update("workorder", id, &[("duration", Value::Integer(v))])
                        .expect("update");
                }
                tx.commit_with(Durability::Immediate).expect("commit");
            }
            out.insert("us_per_update".into(), per(t.elapsed(), UPDATES));
        }
        "durable" => {
            let mut lat = Vec::with_capacity(DURABLE_COMMITS);
            for i in 0..DURABLE_COMMITS {
                let vals = store_values(&bench_row(i));
                let refs: Vec<(&str, Value)> =
                    vals.iter().map(|(c, v)| (c.as_str(), v.clone())).collect();
                let t = Instant::now();
                let mut tx = store.begin();
                tx.insert("workorder", &refs).expect("insert");
                tx.commit_with(Durability::Immediate).expect("commit");
                lat.push(t.elapsed());
            }
            percentiles(&mut lat, &mut out);
        }
        "query" => {
            ours_import(&store, n);
            let me = Value::Owner(OwnerRef {
                kind: OwnerKind::User,
                id: owner(3),
            });
            let q = Query::table("workorder")
                .eq("ownerid", me)
                .eq("statecode", Value::Choice(0));
            let mut found = 0;
            let t = Instant::now();
            for _ in 0..QUERY_REPEAT {
                found = store.query(&q).expect("query").len();
            }
            out.insert("us_per_query".into(), per(t.elapsed(), QUERY_REPEAT));
            out.insert("rows_found".into(), found as f64);
        }
        other => panic!("unknown workload {other}"),
    }
    out
}

// ---------------------------------------------------------------- sled alone

/// Rows per batch of the sled floor, each batch flushed: with a 4 MiB cache, the leanest
/// setting tried (batches of 10,000 rows flushed once peaked at 2–3x the memory).
const FLOOR_BATCH: usize = 256;

/// The floor under any layout of the store on sled: one sled key per row holding nothing but
/// the row's values — no log, no CRDT state, no index — in small flushed batches with a small
/// cache. What this costs in bytes and memory, the store cannot go below.
fn sled_floor(dir: &Path) -> BTreeMap<String, f64> {
    let n = row_count();
    let mut out = BTreeMap::new();
    let db = sled::Config::new()
        .path(dir.join("db"))
        .cache_capacity(4 << 20)
        .open()
        .expect("open sled");
    let t = Instant::now();
    let now = now_ms();
    let mut start = 0;
    while start < n {
        let end = (start + FLOOR_BATCH).min(n);
        let mut batch = sled::Batch::default();
        for i in start..end {
            let r = bench_row(i);
            batch.insert(r.id.as_bytes().as_slice(), row_bytes(&r, now));
        }
        db.apply_batch(batch).expect("apply batch");
        db.flush().expect("flush");
        start = end;
    }
    out.insert("us_per_row".into(), per(t.elapsed(), n));
    drop(db);
    out.insert("bytes_per_row".into(), dir_bytes(dir) as f64 / n as f64);
    out
}

/// The row's 15 values (SQLite's columns) as plain bytes: numbers fixed-width, text
/// length-prefixed.
fn row_bytes(r: &BenchRow, now: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(160);
    for text in [&r.name, &r.summary, &r.amount] {
        v.extend_from_slice(&(text.len() as u16).to_le_bytes());
        v.extend_from_slice(text.as_bytes());
    }
    v.extend_from_slice(&r.priority.to_le_bytes());
    v.extend_from_slice(&r.statecode.to_le_bytes());
    for x in [r.duration, r.windowstart, now, now] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&r.latitude.to_le_bytes());
    v.extend_from_slice(&r.longitude.to_le_bytes());
    for id in [r.account, r.contact, r.owner] {
        v.extend_from_slice(id.as_bytes());
    }
    v
}

// ---------------------------------------------------------------- SQLite

fn sqlite_open(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("bench.sqlite")).expect("open sqlite");
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=FULL;
         CREATE TABLE workorder (
            id BLOB PRIMARY KEY, name TEXT, summary TEXT, priority INTEGER, amount TEXT,
            duration INTEGER, latitude REAL, longitude REAL, windowstart INTEGER,
            account BLOB, contact BLOB, ownerid BLOB, statecode INTEGER,
            createdon INTEGER, modifiedon INTEGER) WITHOUT ROWID;
         CREATE INDEX wo_owner ON workorder(ownerid);
         CREATE INDEX wo_state ON workorder(statecode);
         CREATE INDEX wo_priority ON workorder(priority);
         CREATE INDEX wo_account ON workorder(account);
         CREATE INDEX wo_contact ON workorder(contact);",
    )
    .expect("sqlite schema");
    conn
}

const SQLITE_INSERT: &str =
    "INSERT INTO workorder VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)";

fn sqlite_insert(stmt: &mut rusqlite::Statement<'_>, r: &BenchRow, now: i64) {
    stmt.execute(rusqlite::params![
        r.id.as_bytes().as_slice(),
        r.name,
        r.summary,
        r.priority,
        r.amount,
        r.duration,
        r.latitude,
        r.longitude,
        r.windowstart,
        r.account.as_bytes().as_slice(),
        r.contact.as_bytes().as_slice(),
        r.owner.as_bytes().as_slice(),
        r.statecode,
        now,
        now,
    ])
    .expect("sqlite insert");
}

fn sqlite_import(conn: &mut rusqlite::Connection, n: usize) -> Vec<Uuid> {
    let tx = conn.transaction().expect("tx");
    let mut ids = Vec::with_capacity(n);
    {
        let mut stmt = tx.prepare(SQLITE_INSERT).expect("prepare");
        for i in 0..n {
            let r = bench_row(i);
            sqlite_insert(&mut stmt, &r, now_ms());
            ids.push(r.id);
        }
    }
    tx.commit().expect("commit");
    ids
}

fn sqlite(workload: &str, dir: &Path) -> BTreeMap<String, f64> {
    let n = row_count();
    let mut out = BTreeMap::new();
    let mut conn = sqlite_open(dir);
    match workload {
        "import" => {
            let t = Instant::now();
            sqlite_import(&mut conn, n);
            out.insert("us_per_row".into(), per(t.elapsed(), n));
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .expect("checkpoint");
            drop(conn);
            out.insert("bytes_per_row".into(), dir_bytes(dir) as f64 / n as f64);
        }
        "update" => {
            let ids = sqlite_import(&mut conn, n);
            let mut rng = StdRng::seed_from_u64(7);
            let t = Instant::now();
            for chunk in 0..UPDATES / UPDATE_TX {
                let tx = conn.transaction().expect("tx");
                {
                    let mut stmt = tx
                        .prepare_cached(
                            "UPDATE workorder SET duration=?1, modifiedon=?2 WHERE id=?3",
                        )
                        .expect("prepare");
                    for k in 0..UPDATE_TX {
                        let id = ids[rng.gen_range(0..ids.len())];
                        let v = (chunk * UPDATE_TX + k) as i64;
                        stmt.execute(rusqlite::params![v, now_ms(), id.as_bytes().as_slice()])
                            .expect("update");
                    }
                }
                tx.commit().expect("commit");
            }
            out.insert("us_per_update".into(), per(t.elapsed(), UPDATES));
        }
        "durable" => {
            let mut lat = Vec::with_capacity(DURABLE_COMMITS);
            for i in 0..DURABLE_COMMITS {
                let r = bench_row(i);
                let t = Instant::now();
                let tx = conn.transaction().expect("tx");
                {
                    let mut stmt = tx.prepare_cached(SQLITE_INSERT).expect("prepare");
                    sqlite_insert(&mut stmt, &r, now_ms());
                }
                tx.commit().expect("commit");
                lat.push(t.elapsed());
            }
            percentiles(&mut lat, &mut out);
        }
        "query" => {
            sqlite_import(&mut conn, n);
            let me = owner(3);
            let mut found = 0;
            let t = Instant::now();
            for _ in 0..QUERY_REPEAT {
                let mut stmt = conn
                    .prepare_cached("SELECT * FROM workorder WHERE ownerid=?1 AND statecode=0")
                    .expect("prepare");
                // Decode every column into owned values, as the store's rows are.
                let rows: Vec<Vec<rusqlite::types::Value>> = stmt
                    .query_map([me.as_bytes().as_slice()], |row| {
                        (0..15)
                            .map(|c| row.get::<_, rusqlite::types::Value>(c))
                            .collect()
                    })
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("rows");
                found = rows.len();
            }
            out.insert("us_per_query".into(), per(t.elapsed(), QUERY_REPEAT));
            out.insert("rows_found".into(), found as f64);
        }
        other => panic!("unknown workload {other}"),
    }
    out
}

// ---------------------------------------------------------------- harness

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn per(elapsed: Duration, n: usize) -> f64 {
    elapsed.as_secs_f64() * 1e6 / n as f64
}

fn percentiles(lat: &mut [Duration], out: &mut BTreeMap<String, f64>) {
    lat.sort();
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    out.insert("p50_us".into(), at(0.50).as_secs_f64() * 1e6);
    out.insert("p99_us".into(), at(0.99).as_secs_f64() * 1e6);
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_bytes(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

fn peak_rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0.0)
}

/// Child mode: run one workload on one engine and print its figures as JSON.
fn child(engine: &str, workload: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = match engine {
        "ours" => ours(workload, dir.path()),
        "sqlite" => sqlite(workload, dir.path()),
        "sled" => sled_floor(dir.path()),
        other => panic!("unknown engine {other}"),
    };
    out.insert("peak_rss_kib".into(), peak_rss_kib());
    println!("{}", serde_json::to_string(&out).expect("json"));
}

fn run_child(engine: &str, workload: &str) -> BTreeMap<String, f64> {
    let exe = std::env::current_exe().expect("current exe");
    let output = Command::new(exe)
        .args(["--child", engine, workload])
        .output()
        .expect("spawn child");
    assert!(
        output.status.success(),
        "{engine} {workload} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or("{}");
    serde_json::from_str(line).expect("child figures")
}

fn bench_line(name: &str, ours: f64, base: f64, unit: &str) {
    let ratio = if base > 0.0 { ours / base } else { f64::NAN };
    println!("BENCH name={name} ours={ours:.2} base={base:.2} unit={unit} ratio={ratio:.2}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        child(&args[pos + 1], &args[pos + 2]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery: nothing to list.
    }
    let n = row_count();
    eprintln!("store vs SQLite on {n} rows of 12 columns (each run in its own process)");
    let mut peaks = Vec::new();
    for workload in ["import", "update", "durable", "query"] {
        let o = run_child("ours", workload);
        let b = run_child("sqlite", workload);
        let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        match workload {
            "import" => {
                bench_line(
                    "import",
                    get(&o, "us_per_row"),
                    get(&b, "us_per_row"),
                    "us_per_row",
                );
                bench_line(
                    "disk",
                    get(&o, "bytes_per_row"),
                    get(&b, "bytes_per_row"),
                    "bytes_per_row",
                );
            }
            "update" => bench_line(
                "update",
                get(&o, "us_per_update"),
                get(&b, "us_per_update"),
                "us_per_update",
            ),
            "durable" => {
                bench_line(
                    "durable",
                    get(&o, "p50_us"),
                    get(&b, "p50_us"),
                    "us_per_commit_p50",
                );
                bench_line(
                    "durable_p99",
                    get(&o, "p99_us"),
                    get(&b, "p99_us"),
                    "us_per_commit_p99",
                );
            }
            "query" => {
                assert_eq!(
                    get(&o, "rows_found"),
                    get(&b, "rows_found"),
                    "both engines find the same rows"
                );
                bench_line(
                    "query",
                    get(&o, "us_per_query"),
                    get(&b, "us_per_query"),
                    "us_per_query",
                );
            }
            _ => {}
        }
        let (om, bm) = (
            get(&o, "peak_rss_kib") / 1024.0,
            get(&b, "peak_rss_kib") / 1024.0,
        );
        bench_line(&format!("memory_{workload}"), om, bm, "MiB_peak_rss");
        peaks.push((om, bm));
    }
    // Where sled itself stands on the import's disk and memory figures.
    let floor = run_child("sled", "import");
    let sqlite_import = run_child("sqlite", "import");
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    let (fb, sb) = (
        get(&floor, "bytes_per_row"),
        get(&sqlite_import, "bytes_per_row"),
    );
    let (fm, sm) = (
        get(&floor, "peak_rss_kib") / 1024.0,
        get(&sqlite_import, "peak_rss_kib") / 1024.0,
    );
    println!(
        "# sled floor (one sled key per row holding only its values, no log, CRDT state or index): \
         {fb:.0} bytes_per_row on disk ({:.2}x SQLite's {sb:.0}), peak {fm:.1} MiB ({:.2}x SQLite's {sm:.1}), {:.2} us_per_row",
        fb / sb,
        fm / sm,
        get(&floor, "us_per_row"),
    );
    let om = peaks.iter().map(|p| p.0).fold(0.0, f64::max);
    let bm = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
    bench_line("memory", om, bm, "MiB_peak_rss");
}
