//! `cargo bench -p fieldsync-node --bench upstream`: the bridge against the emulator (a child
//! process on loopback), in one run: pushing rows in `$batch` change sets versus one request
//! per row, and pulling with change-tracking pages versus one `GET` per row. Both sides apply
//! to (or read from) a real hub store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/upstream_support/mod.rs"]
mod upstream_support;

use std::time::Instant;

use fieldsync_store::Value;
use upstream_support::{bridge, config, hub_replica, Emulator};
use uuid::Uuid;

const ROWS: usize = 400;

fn write_rows(
    replica: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>,
    label: &str,
) -> Vec<Uuid> {
    let r = replica.lock().unwrap();
    let mut tx = r.store().begin();
    let ids: Vec<Uuid> = (0..ROWS).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        tx.insert_with_id(
            "account",
            *id,
            &[
                ("name", Value::Text(format!("{label} {i}"))),
                ("telephone1", Value::Text("555-0100".into())),
                ("numberofemployees", Value::Integer(i as i64)),
            ],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    ids
}

fn line(name: &str, ours: f64, base: f64) {
    println!(
        "BENCH name={name} ours={ours:.1} base={base:.1} unit=us_per_row ratio={:.3}",
        ours / base
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let emu = Emulator::start(&dir.path().join("emu"), &[]);

        // Push: $batch change sets of 200 versus one PATCH per row.
        let hub_a = hub_replica(&dir.path().join("hub-a"));
        let batched = bridge(config(&emu, dir.path()), &hub_a);
        write_rows(&hub_a, "Batched");
        let t = Instant::now();
        batched.push().await.unwrap();
        let ours_push = t.elapsed().as_secs_f64() * 1e6 / ROWS as f64;

        let hub_b = hub_replica(&dir.path().join("hub-b"));
        let mut one_cfg = config(&emu, dir.path());
        one_cfg.batch_size = 1;
        let single = bridge(one_cfg, &hub_b);
        write_rows(&hub_b, "Single");
        let t = Instant::now();
        single.push().await.unwrap();
        let base_push = t.elapsed().as_secs_f64() * 1e6 / ROWS as f64;
        assert_eq!(
            batched
                .stats
                .rows_pushed
                .load(std::sync::atomic::Ordering::Relaxed) as usize,
            ROWS
        );
        assert_eq!(
            single
                .stats
                .rows_pushed
                .load(std::sync::atomic::Ordering::Relaxed) as usize,
            ROWS
        );
        line("upstream_push", ours_push, base_push);

        // Pull every account into a fresh hub: pages of 500 versus one GET per row.
        let ids: Vec<Uuid> = emu
            .rows("accounts")
            .await
            .iter()
            .map(|r| Uuid::parse_str(r["accountid"].as_str().unwrap()).unwrap())
            .collect();
        let hub_c = hub_replica(&dir.path().join("hub-c"));
        let mut page_cfg = config(&emu, dir.path());
        page_cfg.page_size = 500;
        let paged = bridge(page_cfg, &hub_c);
        let t = Instant::now();
        paged.pull_table("account").await.unwrap();
        let ours_pull = t.elapsed().as_secs_f64() * 1e6 / ids.len() as f64;

        let hub_d = hub_replica(&dir.path().join("hub-d"));
        let per_row = bridge(config(&emu, dir.path()), &hub_d);
        let t = Instant::now();
        for id in &ids {
            per_row.pull_row("account", *id).await.unwrap();
        }
        let base_pull = t.elapsed().as_secs_f64() * 1e6 / ids.len() as f64;
        let count = |h: &std::sync::Mutex<fieldsync_replication::replica::HubReplica>| {
            h.lock().unwrap().store().scan("account").unwrap().count()
        };
        assert_eq!(count(&hub_c), ids.len());
        assert_eq!(count(&hub_d), ids.len());
        line("upstream_pull", ours_pull, base_pull);
    });
}
