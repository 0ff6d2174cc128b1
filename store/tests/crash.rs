//! Crash test with real processes, after sled's `tests/test_crash_recovery.rs`.
//!
//! The test re-runs its own binary as a child (switched by an environment variable). The
//! child opens the store and commits transactions in a loop, alternately `Immediate` and
//! `Group`, with a small write-ahead file so that checkpoints happen all the time: each
//! writes one counter into several columns of three existing rows and inserts one new row,
//! and prints `ACK <counter>` once `commit` has returned. The parent kills the child with
//! SIGKILL at a random moment (every fourth time soon after it starts, maybe while it opens and
//! recovers), reopens the store and checks that every acknowledged commit
//! is there and that no transaction is torn (all rows and columns hold the same counter, and
//! every inserted row up to it exists), then runs the full `check`. Repeated 24 times.

// Helpers below run in the test and its child process: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fieldsync_store::{Durability, Store, Value};
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const CHILD_ENV: &str = "FIELDSYNC_STORE_CRASH_CHILD";
const TEST_NAME: &str = "acknowledged_commits_survive_sigkill";
const KILLS: usize = 24;
const ROWS: [u128; 3] = [1, 2, 3];

fn fixed_row(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn inserted_row(counter: i64) -> Uuid {
    Uuid::from_u128(1_000_000 + counter as u128)
}

/// The counter the store holds, after checking the rows agree.
fn verify(store: &Store) -> i64 {
    let mut counter = None;
    for n in ROWS {
        let row = store.get("account", fixed_row(n)).unwrap().unwrap();
        let c = match row.get("numberofemployees") {
            Value::Integer(c) => *c,
            Value::Null => 0,
            other => panic!("unexpected {other:?}"),
        };
        let name = match row.get("name") {
            Value::Text(t) => t.parse::<i64>().unwrap(),
            _ => 0,
        };
        let rev = match row.get("revenue") {
            Value::Decimal(d) => d.to_string().parse::<i64>().unwrap(),
            _ => 0,
        };
        assert_eq!((c, c), (name, rev), "torn row {n}: columns disagree");
        if let Some(prev) = counter {
            assert_eq!(prev, c, "torn transaction: rows disagree");
        }
        counter = Some(c);
    }
    let counter = counter.unwrap_or(0);
    // Every inserted row up to the counter exists, and none after it.
    for c in 1..=counter {
        assert!(
            store.get("contact", inserted_row(c)).unwrap().is_some(),
            "row inserted by commit {c} is missing"
        );
    }
    assert!(store
        .get("contact", inserted_row(counter + 1))
        .unwrap()
        .is_none());
    counter
}

fn child(dir: &str) {
    // A small write-ahead file: checkpoints every few dozen commits, so kills land in them too.
    let mut opts = options(1);
    opts.wal_capacity_bytes = 64 << 10;
    let store = Store::open(std::path::Path::new(dir), opts).unwrap();
    let mut counter = verify(&store);
    let out = std::io::stdout();
    loop {
        counter += 1;
        let mut tx = store.begin();
        for n in ROWS {
            tx.update(
                "account",
                fixed_row(n),
                &[
                    ("numberofemployees", Value::Integer(counter)),
                    ("name", Value::Text(counter.to_string())),
                    ("revenue", Value::Decimal(counter.into())),
                ],
            )
            .unwrap();
        }
        tx.insert_with_id(
            "contact",
            inserted_row(counter),
            &[("fullname", Value::Text(format!("contact {counter}")))],
        )
        .unwrap();
        // Every other commit is a group commit: it too survives a process crash once it returned
        // (it is in the write-ahead file's pages; only power loss needs `sync`).
        let durability = if counter % 2 == 0 {
            Durability::Immediate
        } else {
            Durability::Group
        };
        tx.commit_with(durability).unwrap();
        let mut lock = out.lock();
        writeln!(lock, "ACK {counter}").unwrap();
        lock.flush().unwrap();
    }
}

#[test]
fn acknowledged_commits_survive_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    {
        let store = Store::create(&dir, schema(), options(1)).unwrap();
        let mut tx = store.begin();
        for n in ROWS {
            tx.insert_with_id("account", fixed_row(n), &[]).unwrap();
        }
        tx.commit().unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let exe = std::env::current_exe().unwrap();
    let mut acked_max = 0i64;
    let mut total_acks = 0usize;
    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let acks = Arc::clone(&acks);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // libtest prints `test NAME ... ` without a newline before the test
                    // runs, so the first ack shares its line.
                    if let Some(pos) = line.find("ACK ") {
                        let n = line[pos + 4..].trim();
                        acks.lock().unwrap().push(n.parse::<i64>().unwrap());
                    }
                }
            })
        };
        // Every fourth round kills the child early, possibly while it opens and recovers;
        // the others wait until it commits, then kill it at a random moment.
        let early = round % 4 == 3;
        if early {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        } else {
            let deadline = Instant::now() + Duration::from_secs(20);
            while acks.lock().unwrap().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        }
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();
        reader.join().unwrap();
        let acks = acks.lock().unwrap().clone();
        assert!(
            early || !acks.is_empty(),
            "round {round}: the child never committed"
        );
        total_acks += acks.len();
        if let Some(&last_ack) = acks.last() {
            assert!(last_ack > acked_max);
            acked_max = last_ack;
        }

        let store = Store::open(&dir, options(1)).unwrap();
        let counter = verify(&store);
        assert!(
            counter >= acked_max,
            "round {round}: commit {acked_max} was acknowledged but the store holds {counter}"
        );
        // At most the one commit in flight when killed is there unacknowledged.
        assert!(
            counter <= acked_max + 1,
            "round {round}: {counter} > {acked_max} + 1"
        );
        acked_max = counter;
        if round % 6 == 5 || round == KILLS - 1 {
            let report = store.check().unwrap();
            assert!(report.is_ok(), "round {round}: {report}");
        }
    }
    eprintln!(
        "{KILLS} kills, {total_acks} acknowledged commits, {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// A rebuild killed after dropping the materialized rows and before rewriting them all must
/// not leave a store that opens with rows missing (the tail check would take a missing row
/// whose entries are acknowledged for an evicted one): its marker makes the next open finish it.
#[test]
fn an_interrupted_rebuild_is_finished_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    let ids: Vec<Uuid> = {
        let s = Store::create(&p, schema(), options(1)).unwrap();
        let mut tx = s.begin();
        let ids = (0..50)
            .map(|i| {
                tx.insert("account", &[("name", text(&format!("a{i}")))])
                    .unwrap()
            })
            .collect();
        tx.commit().unwrap();
        s.acknowledge(s.last_seq()).unwrap();
        ids
    };
    // Opened once more so that the write-ahead file holds nothing to replay over the damage.
    drop(Store::open(&p, options(1)).unwrap());
    {
        // What the killed rebuild left: its marker set, the rows and indexes dropped.
        let db = raw_sled(&p);
        db.insert(b"0rebuilding", &[1u8][..]).unwrap();
        for prefix in [b"R", b"I"] {
            for r in db.scan_prefix(prefix) {
                db.remove(r.unwrap().0).unwrap();
            }
        }
        db.flush().unwrap();
    }
    let s = Store::open(&p, options(1)).unwrap();
    for id in &ids {
        assert!(s.get("account", *id).unwrap().is_some(), "row {id} is back");
    }
    assert!(s.check().unwrap().is_ok());
    drop(s);
    // The marker is gone: a plain open finds everything in place.
    let s = Store::open(&p, options(1)).unwrap();
    assert_eq!(s.scan("account").unwrap().count(), ids.len());
}
