//! A quick look at the store's costs on realistic 12-column rows (the real comparison with
//! SQLite lives in `store/benches/`). Run: `cargo run --release -p fieldsync-store --example
//! perf -- [ROWS]`.

use std::time::Instant;

use fieldsync_store::{Durability, OwnerKind, OwnerRef, Query, Schema, Store, StoreOptions, Value};
use uuid::Uuid;

const SCHEMA: &str = include_str!("../../examples/field-service/schema.toml");

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// User + system CPU seconds of this process (less sensitive to a busy machine than wall
/// time; counts every thread).
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / 100.0)
        })
        .unwrap_or(0.0)
}

fn owner(i: usize) -> Value {
    Value::Owner(OwnerRef {
        kind: OwnerKind::User,
        id: Uuid::from_u128(1 + (i % 10) as u128),
    })
}

fn row(i: usize) -> Vec<(String, Value)> {
    let s = |k: &str, v: Value| (k.to_string(), v);
    vec![
        s("msdyn_name", Value::Text(format!("WO-{i:07}"))),
        s(
            "msdyn_workordersummary",
            Value::Memo(format!("Replace filter on unit {i}")),
        ),
        s(
            "msdyn_systemstatus",
            Value::Choice(690_970_000 + (i % 6) as i32),
        ),
        s("msdyn_priority", Value::Choice(1 + (i % 3) as i32)),
        s(
            "msdyn_serviceaccount",
            Value::Lookup(Uuid::from_u128(0xACC0_0000 + (i % 500) as u128)),
        ),
        s(
            "msdyn_primaryincidenttype",
            Value::Text("Maintenance".into()),
        ),
        s(
            "msdyn_estimatedduration",
            Value::Integer(30 + (i % 90) as i64),
        ),
        s(
            "msdyn_totalamount",
            Value::Decimal(rust_decimal::Decimal::new(12_345 + i as i64, 2)),
        ),
        s(
            "msdyn_datewindowstart",
            Value::DateTime(1_790_000_000_000 + i as i64 * 60_000),
        ),
        s(
            "msdyn_latitude",
            Value::Float(47.6 + (i % 100) as f64 / 1000.0),
        ),
        s(
            "msdyn_longitude",
            Value::Float(-122.3 - (i % 100) as f64 / 1000.0),
        ),
        s("ownerid", owner(i)),
        s("statecode", Value::Choice((i % 2) as i32)),
    ]
}

/// The same work on SQLite (bundled, WAL), for ratios measured under the same load.
fn sqlite(n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("s.db");
    let mut db = rusqlite::Connection::open(&path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.execute_batch(
        "CREATE TABLE wo (id BLOB PRIMARY KEY, name TEXT, summary TEXT, status INT, prio INT,
           account BLOB, incident TEXT, duration INT, amount TEXT, start INT, lat REAL, lon REAL,
           owner BLOB, statecode INT, createdon INT, modifiedon INT);
         CREATE INDEX wo_owner_state ON wo(owner, statecode);
         CREATE INDEX wo_account ON wo(account); CREATE INDEX wo_status ON wo(status);
         CREATE INDEX wo_prio ON wo(prio);",
    )?;
    let ids: Vec<Uuid> = (0..n)
        .map(|i| Uuid::from_u128(i as u128 * 7919 + 17))
        .collect();
    let t = Instant::now();
    let tx = db.transaction()?;
    {
        let mut st = tx.prepare(
            "INSERT INTO wo VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
        )?;
        for (i, id) in ids.iter().enumerate() {
            st.execute(rusqlite::params![
                id.as_bytes().to_vec(),
                format!("WO-{i:07}"),
                format!("Replace filter on unit {i}"),
                690_970_000 + (i % 6) as i64,
                1 + (i % 3) as i64,
                Uuid::from_u128(0xACC0_0000 + (i % 500) as u128)
                    .as_bytes()
                    .to_vec(),
                "Maintenance",
                30 + (i % 90) as i64,
                format!("{}.{:02}", 123 + i / 100, i % 100),
                1_790_000_000_000i64 + i as i64 * 60_000,
                47.6,
                -122.3,
                Uuid::from_u128(1 + (i % 10) as u128).as_bytes().to_vec(),
                (i % 2) as i64,
                1_790_000_000_000i64,
                1_790_000_000_000i64,
            ])?;
        }
    }
    tx.commit()?;
    let import = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    for chunk in ids.chunks(1000) {
        let tx = db.transaction()?;
        {
            let mut st =
                tx.prepare("UPDATE wo SET duration = ?1, modifiedon = ?2 WHERE id = ?3")?;
            for (k, id) in chunk.iter().enumerate() {
                st.execute(rusqlite::params![k as i64, 1i64, id.as_bytes().to_vec()])?;
            }
        }
        tx.commit()?;
    }
    let update = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    db.pragma_update(None, "synchronous", "FULL")?;
    let mut lat = Vec::new();
    for (k, id) in ids.iter().take(2000).enumerate() {
        let t = Instant::now();
        db.execute(
            "UPDATE wo SET name = ?1 WHERE id = ?2",
            rusqlite::params![format!("durable {k}"), id.as_bytes().to_vec()],
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let t = Instant::now();
    let mut found = 0;
    for _ in 0..10 {
        let mut st = db.prepare_cached(
            "SELECT * FROM wo WHERE owner = ?1 AND statecode = 0 ORDER BY modifiedon DESC",
        )?;
        let rows = st.query_map([Uuid::from_u128(3).as_bytes().to_vec()], |r| {
            r.get::<_, String>(1)
        })?;
        found = rows.count();
    }
    let query = t.elapsed().as_secs_f64() * 1e3 / 10.0;
    drop(db);
    let bytes: u64 = std::fs::read_dir(dir.path())?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "sqlite   import {import:.1} µs/row, update {update:.1} µs, durable median {:.0} µs, query {query:.2} ms ({found} rows), disk {} B/row",
        lat[lat.len() / 2],
        bytes / n as u64
    );
    Ok(())
}

/// What a device's initial sync does: every row of `from` exported, then imported into a
/// fresh store with `import_rows`, 500 rows per call.
fn import_rows(from: &Store, table: &str, ids: &[Uuid]) -> Result<(), Box<dyn std::error::Error>> {
    const PAGE: usize = 500;
    let mut exports = Vec::with_capacity(ids.len());
    for id in ids {
        exports.extend(from.export_row(table, *id)?);
    }
    let dir = tempfile::tempdir()?;
    let to = Store::create(
        dir.path(),
        from.schema().clone(),
        StoreOptions::default().with_durability(Durability::Group),
    )?;
    let t = Instant::now();
    let cpu = cpu_secs();
    for page in exports.chunks(PAGE) {
        to.import_rows(page, Durability::Group)?;
    }
    to.sync()?;
    let el = t.elapsed();
    let n = exports.len();
    println!(
        "import_rows {n} exported rows into a fresh store, {PAGE} per call: {:.1} µs/row (CPU {:.1} µs/row)",
        el.as_secs_f64() * 1e6 / n as f64,
        (cpu_secs() - cpu) * 1e6 / n as f64
    );
    println!("         disk {} B/row", to.status()?.disk_bytes / n as u64);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    if std::env::var("SQLITE").is_ok() {
        sqlite(n)?;
    }
    let dir = tempfile::tempdir()?;
    let schema = Schema::from_toml(SCHEMA)?;
    let table = "msdyn_workorder";
    let store = Store::create(
        dir.path(),
        schema,
        StoreOptions::default().with_durability(Durability::Group),
    )?;

    let rows: Vec<_> = (0..n).map(row).collect();
    let t = Instant::now();
    let cpu = cpu_secs();
    let ids = store.bulk_insert(table, rows, &mut |_| {})?;
    store.sync()?;
    let el = t.elapsed();
    println!(
        "import   {n} rows: {:.2?} = {:.1} µs/row (CPU {:.1} µs/row)",
        el,
        el.as_secs_f64() * 1e6 / n as f64,
        (cpu_secs() - cpu) * 1e6 / n as f64
    );
    println!(
        "         RSS {:.0} MB, disk {} B/row",
        rss_mb(),
        store.status()?.disk_bytes / n as u64
    );

    import_rows(&store, table, &ids)?;

    let t = Instant::now();
    let cpu = cpu_secs();
    let mut in_commit = std::time::Duration::ZERO;
    for chunk in ids.chunks(1000) {
        let mut tx = store.begin();
        for (k, id) in chunk.iter().enumerate() {
            tx.update(
                table,
                *id,
                &[("msdyn_estimatedduration", Value::Integer(k as i64))],
            )?;
        }
        let c = Instant::now();
        tx.commit_with(Durability::Group)?;
        in_commit += c.elapsed();
    }
    store.sync()?;
    let el = t.elapsed();
    println!(
        "         of which commit {:.1} µs/update",
        in_commit.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "update   {n} single-column updates in txns of 1000: {:.1} µs/update (CPU {:.1})",
        el.as_secs_f64() * 1e6 / n as f64,
        (cpu_secs() - cpu) * 1e6 / n as f64
    );
    println!(
        "         RSS {:.0} MB, disk {} B/row",
        rss_mb(),
        store.status()?.disk_bytes / n as u64
    );

    let mut lat = Vec::new();
    for (k, id) in ids.iter().take(2000).enumerate() {
        let t = Instant::now();
        let mut tx = store.begin();
        tx.update(
            table,
            *id,
            &[("msdyn_name", Value::Text(format!("durable {k}")))],
        )?;
        tx.commit_with(Durability::Immediate)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "durable  2000 single-row commits: median {:.0} µs, p99 {:.0} µs",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    let q = Query::table(table)
        .eq("ownerid", owner(2))
        .eq("statecode", Value::Choice(0))
        .order_by("modifiedon", fieldsync_store::Order::Desc);
    let t = Instant::now();
    let mut found = 0;
    for _ in 0..10 {
        found = store.query(&q)?.len();
    }
    println!(
        "query    my active rows ({found} rows): {:.2} ms, plan {:?}",
        t.elapsed().as_secs_f64() * 1e3 / 10.0,
        store.plan(&q)?
    );
    let t = Instant::now();
    for id in ids.iter().take(10_000) {
        store.get(table, *id)?;
    }
    println!(
        "get      point read: {:.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / 10_000.0
    );

    store.sync()?;
    let st = store.status()?;
    println!(
        "disk     {} bytes = {:.0} B/row (log {} entries)",
        st.disk_bytes,
        st.disk_bytes as f64 / n as f64,
        st.log_entries
    );
    store.acknowledge(store.last_seq())?;
    let t = Instant::now();
    let report = store.compact()?;
    println!("compact  {report:?} in {:.2?}", t.elapsed());
    let st = store.status()?;
    println!(
        "disk     after compaction {} bytes = {:.0} B/row",
        st.disk_bytes,
        st.disk_bytes as f64 / n as f64
    );
    println!("memory   peak RSS {:.0} MB", peak_rss_mb());
    Ok(())
}
