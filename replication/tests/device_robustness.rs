//! The device replica under concurrency and odd histories: no own op is ever lost or wrongly
//! acknowledged, and a bad retry or a bad download is a clear outcome, not a stuck sync.

// Test helpers may unwrap: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fieldsync_replication::proto::{
    BatchLimits, DeviceStorage, Millis, Operation, Rejection, RejectionKind, RowChange,
    StorageError,
};
use fieldsync_replication::replica::{DeviceReplica, ReplicaError};
use fieldsync_replication::Profile;
use fieldsync_store::{ActorId, Durability, Schema, Store, StoreOptions, Value};

const SCHEMA: &str = "[tables.task]\noffline = true\n[tables.task.columns]\nname = \"text\"\n";

const ALL: BatchLimits = BatchLimits {
    max_items: usize::MAX,
    max_bytes: usize::MAX,
};

fn device() -> DeviceReplica {
    let schema = Schema::from_toml(SCHEMA).unwrap();
    let store =
        Store::temporary(schema, StoreOptions::default().with_actor(ActorId([7; 16]))).unwrap();
    DeviceReplica::new(store)
}

/// The app on its own thread: `commits` one-row inserts, each committed on its own, pausing
/// `pause_us` after every `pause_every`-th; the flag turns true once the last is committed.
fn app_writer(
    store: &Store,
    commits: usize,
    pause_every: usize,
    pause_us: u64,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..commits {
                let mut tx = store.begin();
                tx.insert("task", &[("name", Value::Text(format!("t{i}")))])
                    .unwrap();
                tx.commit_with(Durability::Group).unwrap();
                if i % pause_every == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(pause_us));
                }
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    (stop, writer)
}

/// While the app commits edits on one thread, the sync thread keeps acknowledging what it
/// pushed and advancing the store's acknowledged prefix (each pulled batch does): an edit
/// committed in between must stay pending, never be taken for acknowledged.
#[test]
fn own_ops_committed_during_an_ack_advance_stay_pending() {
    let mut replica = device();
    let store = replica.store().clone();
    // Pausing now and then lets the sync thread catch up, so that commits also land while
    // nothing is pending (where the ack advance used to read the log's end).
    let (stop, writer) = app_writer(&store, 3000, 2, 50);
    let mut now = 0;
    while !stop.load(Ordering::SeqCst) {
        // The hub acknowledges everything pushed so far ...
        let acked = replica.acked_seq().unwrap();
        if let Some(last) = replica.pending_ops(acked, ALL).unwrap().last() {
            now += 1;
            replica.record_ack(Millis(now), last.seq, &[]).unwrap();
        }
        // ... and empty pulled batches advance the store's acknowledged prefix.
        for _ in 0..2 {
            replica.apply_ops("task", &[]).unwrap();
            // The store's prefix never covers an own op the hub has not acknowledged.
            let acked = replica.acked_seq().unwrap();
            let store_acked = store.acked_seq().unwrap();
            let swallowed: Vec<u64> = store
                .ops_since(acked, usize::MAX)
                .unwrap()
                .iter()
                .filter(|e| e.actor == store.actor() && e.seq <= store_acked)
                .map(|e| e.seq)
                .collect();
            assert!(
                swallowed.is_empty(),
                "own ops {swallowed:?} taken for acknowledged (hub acked {acked}, store {store_acked})"
            );
        }
    }
    writer.join().unwrap();
    let acked = replica.acked_seq().unwrap();
    let pending: Vec<u64> = replica
        .pending_ops(acked, ALL)
        .unwrap()
        .iter()
        .map(|op| op.seq)
        .collect();
    let own_after_ack: Vec<u64> = store
        .ops_since(acked, usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.actor == store.actor())
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        pending, own_after_ack,
        "every own op after the hub's ack ({acked}) is pending"
    );
    assert!(store.acked_seq().unwrap() <= acked);
}

/// The pushes remember which spans of the log hold only pulled entries: while the app commits
/// on one thread and the sync thread applies pulled changes, pushes and acknowledges, no own
/// op may fall into such a span unpushed (an ack covers every op up to its seq, so a skipped
/// op would be taken as acknowledged and never reach the hub).
#[test]
fn own_ops_between_pulled_entries_are_all_pushed() {
    own_ops_between_pulled_entries_are_all_pushed_in(device());
    // On disk too: sled's scans are not snapshots.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(
        dir.path(),
        Schema::from_toml(SCHEMA).unwrap(),
        StoreOptions::default().with_actor(ActorId([7; 16])),
    )
    .unwrap();
    own_ops_between_pulled_entries_are_all_pushed_in(DeviceReplica::new(store));
}

fn own_ops_between_pulled_entries_are_all_pushed_in(mut replica: DeviceReplica) {
    let store = replica.store().clone();
    // What the hub sends: another store's changes, one new row each.
    let other = Store::temporary(
        Schema::from_toml(SCHEMA).unwrap(),
        StoreOptions::default().with_actor(ActorId([8; 16])),
    )
    .unwrap();
    let mut tx = other.begin();
    for i in 0..2000 {
        tx.insert("task", &[("name", Value::Text(format!("r{i}")))])
            .unwrap();
    }
    tx.commit().unwrap();
    let pulled: Vec<RowChange> = other
        .ops_since(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| RowChange {
            row: e.row,
            change: e.change,
        })
        .collect();
    let (stop, writer) = app_writer(&store, 1500, 3, 30);
    let mut pushed = std::collections::BTreeSet::new();
    let mut batches = pulled.chunks(3);
    let mut now = 0;
    loop {
        let done = stop.load(Ordering::SeqCst);
        if let Some(batch) = batches.next() {
            replica.apply_ops("task", batch).unwrap();
        }
        let acked = replica.acked_seq().unwrap();
        let published = store.last_seq();
        let ops = replica.pending_ops(acked, ALL).unwrap();
        // Each push on its own holds every own op committed before it: one left out here
        // would be covered by an ack of a later one (a re-push after a lost one included).
        let through = ops.last().map_or(published, |op| op.seq.max(published));
        let own_through: Vec<u64> = store
            .ops_since(acked, usize::MAX)
            .unwrap()
            .iter()
            .filter(|e| e.actor == store.actor() && e.seq <= through)
            .map(|e| e.seq)
            .collect();
        let got: Vec<u64> = ops.iter().map(|op| op.seq).collect();
        assert_eq!(got, own_through, "a push after {acked} left out own ops");
        pushed.extend(got);
        // Acknowledge every other push, so that scans start both below and above the spans.
        now += 1;
        if now % 2 == 0 {
            if let Some(last) = ops.last() {
                replica.record_ack(Millis(now), last.seq, &[]).unwrap();
            }
        }
        if done && batches.len() == 0 {
            break;
        }
    }
    writer.join().unwrap();
    let acked = replica.acked_seq().unwrap();
    pushed.extend(
        replica
            .pending_ops(acked, ALL)
            .unwrap()
            .iter()
            .map(|op| op.seq),
    );
    let own: Vec<u64> = store
        .ops_since(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.actor == store.actor())
        .map(|e| e.seq)
        .collect();
    assert_eq!(own.len(), 1500);
    let never_pushed: Vec<u64> = own
        .iter()
        .filter(|s| !pushed.contains(s))
        .copied()
        .collect();
    assert!(
        never_pushed.is_empty(),
        "own ops never pushed: {never_pushed:?}"
    );
}

/// A delete the hub refused, on a row the device may not read: the rollback removes the row,
/// and a retry is refused with a clear error rather than re-inserting a row holding nothing
/// but `modifiedon`.
#[test]
fn retrying_a_rejected_delete_of_a_row_the_rollback_removed_is_refused() {
    let mut replica = device();
    let store = replica.store().clone();
    let mut tx = store.begin();
    let row = tx
        .insert("task", &[("name", Value::Text("gone".into()))])
        .unwrap();
    tx.commit().unwrap();
    replica.record_ack(Millis(1), 1, &[]).unwrap();
    let mut tx = store.begin();
    tx.delete("task", row).unwrap();
    let delete_seq = tx.commit().unwrap().last_seq;
    let rejection = Rejection {
        seq: delete_seq,
        table: "task".into(),
        row,
        operation: Operation::Delete,
        kind: RejectionKind::Permission,
        message: "no delete privilege".into(),
        authoritative: None,
    };
    replica
        .record_ack(Millis(2), delete_seq, &[rejection])
        .unwrap();
    assert!(store.get("task", row).unwrap().is_none(), "rolled back");
    let before = store.last_seq();
    match replica.retry_error(delete_seq) {
        Err(ReplicaError::RowGone { table, row: gone }) => {
            assert_eq!((table.as_str(), gone), ("task", row));
        }
        other => panic!("expected RowGone, got {other:?}"),
    }
    assert!(
        store.get("task", row).unwrap().is_none(),
        "no row re-created"
    );
    assert_eq!(store.last_seq(), before, "nothing written");
    assert_eq!(
        replica.sync_errors().unwrap().len(),
        1,
        "the error stays listed"
    );
    assert!(replica.discard_error(delete_seq).unwrap());
}

/// A download whose content does not match its hash: the replica drops it (progress back to
/// 0), keeps the blob wanted for a later connection, and says so with a typed error the
/// session handles, rather than a `Corrupt` that would end every session.
#[test]
fn a_downloaded_blob_that_does_not_match_its_hash_is_dropped_and_still_wanted() {
    let schema = Schema::from_toml(
        "[tables.task]\noffline = true\n[tables.task.columns]\nname = \"text\"\ndoc = \"file\"\n",
    )
    .unwrap();
    let profile = Profile::from_toml(
        "name = \"P\"\n[tables.task]\nrows = \"all\"\nfiles = true\n",
        &schema,
    )
    .unwrap();
    let good: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    // The hub's row, referring to the good content.
    let hub = Store::temporary(
        schema.clone(),
        StoreOptions::default().with_actor(ActorId([1; 16])),
    )
    .unwrap();
    let blob = hub.put_blob("doc.bin", &mut good.as_slice()).unwrap();
    let mut tx = hub.begin();
    let row = tx
        .insert("task", &[("doc", Value::File(blob.clone()))])
        .unwrap();
    tx.commit().unwrap();
    let change = hub.ops_since(0, 1).unwrap().remove(0).change;
    let store =
        Store::temporary(schema, StoreOptions::default().with_actor(ActorId([2; 16]))).unwrap();
    let mut replica = DeviceReplica::new(store.clone()).with_profile(&profile);
    replica
        .apply_ops("task", &[RowChange { row, change }])
        .unwrap();
    assert_eq!(replica.blobs_to_fetch().unwrap(), vec![blob.sha256]);

    // A damaged copy, in two chunks.
    let mut bad = good.clone();
    bad[77_777] ^= 0xff;
    let total = good.len() as u64;
    replica
        .write_blob_chunk(&blob.sha256, 0, &bad[..60_000], total)
        .unwrap();
    assert_eq!(
        replica.write_blob_chunk(&blob.sha256, 60_000, &bad[60_000..], total),
        Err(StorageError::BlobMismatch)
    );
    assert_eq!(replica.blob_progress(&blob.sha256).unwrap(), 0);
    assert!(!store.has_blob(&blob).unwrap());
    assert_eq!(
        replica.blobs_to_fetch().unwrap(),
        vec![blob.sha256],
        "still wanted"
    );

    // The next download (a good copy) completes.
    replica
        .write_blob_chunk(&blob.sha256, 0, &good, total)
        .unwrap();
    assert_eq!(store.read_blob(&blob).unwrap(), good);
    assert!(replica.blobs_to_fetch().unwrap().is_empty());
}
