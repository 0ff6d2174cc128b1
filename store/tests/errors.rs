//! Every bad input gets a typed error, nothing is written, and a damaged data directory is a
//! clear error, never a panic.

mod common;

use std::fs;

use common::*;
use fieldsync_store::{
    Durability, OpenError, RemoteOp, RowExport, SchemaError, Store, StoreError, Value, WriteError,
    FORMAT_VERSION, MAX_CHANGE_BYTES,
};
use uuid::Uuid;

#[test]
fn schema_violations_are_refused_and_nothing_is_written() {
    let s = temp_store(1);
    let mut tx = s.begin();
    assert!(matches!(
        tx.insert("nope", &[]),
        Err(WriteError::Schema(SchemaError::UnknownTable(_)))
    ));
    assert!(matches!(
        tx.insert("account", &[("nope", text("x"))]),
        Err(WriteError::Schema(SchemaError::UnknownColumn { .. }))
    ));
    assert!(matches!(
        tx.insert("account", &[("name", Value::Integer(3))]),
        Err(WriteError::Schema(SchemaError::WrongType { .. }))
    ));
    assert!(matches!(
        tx.insert("account", &[("industrycode", Value::Choice(9))]),
        Err(WriteError::Schema(SchemaError::InvalidChoice { .. }))
    ));
    assert!(matches!(
        tx.insert("account", &[("statecode", Value::Choice(7))]),
        Err(WriteError::Schema(SchemaError::InvalidChoice { .. }))
    ));
    assert!(matches!(
        tx.insert("account", &[("__deleted", Value::Boolean(true))]),
        Err(WriteError::Schema(SchemaError::UnknownColumn { .. }))
    ));
    assert!(matches!(
        tx.insert(
            "msdyn_workorder",
            &[("msdyn_latitude", Value::Float(f64::NAN))]
        ),
        Err(WriteError::InvalidValue { .. })
    ));
    assert!(matches!(
        tx.update("account", Uuid::new_v4(), &[("name", text("x"))]),
        Err(WriteError::RowNotFound { .. })
    ));
    assert!(matches!(
        tx.delete("account", Uuid::new_v4()),
        Err(WriteError::RowNotFound { .. })
    ));
    let info = tx.commit().unwrap();
    assert_eq!(info.last_seq, 0, "nothing was written");
    assert_eq!(s.last_seq(), 0);

    // A malformed id never reaches the store: ids are parsed as UUIDs first.
    assert!(Value::parse(fieldsync_store::ColumnType::Lookup, "not-a-uuid").is_err());
    assert!(Uuid::parse_str("12345").is_err());

    // Inserting an id twice.
    let mut tx = s.begin();
    let id = tx.insert("account", &[("name", text("a"))]).unwrap();
    assert!(matches!(
        tx.insert_with_id("account", id, &[]),
        Err(WriteError::RowExists { .. })
    ));
    tx.commit().unwrap();
    let mut tx = s.begin();
    assert!(matches!(
        tx.insert_with_id("account", id, &[]),
        Err(WriteError::RowExists { .. })
    ));
    // Reads of unknown tables and columns.
    assert!(matches!(
        s.get("nope", id),
        Err(StoreError::Schema(SchemaError::UnknownTable(_)))
    ));
    assert!(matches!(
        s.query(&fieldsync_store::Query::table("account").eq("nope", Value::Null)),
        Err(StoreError::Schema(SchemaError::UnknownColumn { .. }))
    ));
    assert!(matches!(
        s.query(&fieldsync_store::Query::table("account").eq("ownerid", text("x"))),
        Err(StoreError::Schema(SchemaError::WrongType { .. }))
    ));
}

#[test]
fn a_row_changed_under_a_transaction_is_refused_at_commit() {
    let s = temp_store(1);
    let mut tx = s.begin();
    let id = tx.insert("account", &[("name", text("a"))]).unwrap();
    tx.commit().unwrap();
    let mut t1 = s.begin();
    t1.update("account", id, &[("name", text("b"))]).unwrap();
    let mut t2 = s.begin();
    t2.delete("account", id).unwrap();
    t2.commit().unwrap();
    assert!(matches!(t1.commit(), Err(WriteError::RowDeleted { .. })));
    assert_eq!(s.last_seq(), 2);
}

#[test]
fn garbage_remote_changes_are_refused_whole() {
    let a = temp_store(1);
    let b = temp_store(2);
    let mut tx = a.begin();
    let id = tx.insert("account", &[("name", text("a"))]).unwrap();
    tx.commit().unwrap();
    let good = a.ops_since(0, 10).unwrap()[0].to_remote();
    let cases = [
        vec![],
        vec![0u8; 40],
        b"\x85\x6f\x4a\x83garbage".to_vec(),
        good.change[..good.change.len() / 2].to_vec(),
        {
            let mut c = good.change.clone();
            let n = c.len();
            c[n - 3] ^= 0xff;
            c
        },
    ];
    for bytes in cases {
        let bad = RemoteOp {
            table: "account".into(),
            row: id,
            change: bytes,
        };
        let r = b.apply_remote(&[good.clone(), bad], Durability::Group);
        assert!(matches!(r, Err(StoreError::InvalidChange { .. })), "{r:?}");
        assert_eq!(b.last_seq(), 0, "nothing of the batch was applied");
    }
    // Unknown table.
    let r = b.apply_remote(
        &[RemoteOp {
            table: "nope".into(),
            ..good.clone()
        }],
        Durability::Group,
    );
    assert!(matches!(r, Err(StoreError::Schema(_))));
    // A valid change for a table whose columns it does not fit.
    let r = b.apply_remote(
        &[RemoteOp {
            table: "contact".into(),
            ..good.clone()
        }],
        Durability::Group,
    );
    assert!(matches!(r, Err(StoreError::InvalidChange { .. })), "{r:?}");
    // A real automerge change that writes a nested object or a wrongly typed value.
    {
        use automerge::transaction::Transactable;
        let mut doc = automerge::AutoCommit::new().with_actor(automerge::ActorId::from([5u8; 16]));
        doc.put_object(automerge::ROOT, "name", automerge::ObjType::Map)
            .unwrap();
        let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        let r = b.apply_remote(
            &[RemoteOp {
                table: "account".into(),
                row: id,
                change,
            }],
            Durability::Group,
        );
        assert!(matches!(r, Err(StoreError::InvalidChange { .. })), "{r:?}");
        let mut doc = automerge::AutoCommit::new().with_actor(automerge::ActorId::from([5u8; 16]));
        doc.put(automerge::ROOT, "numberofemployees", "many")
            .unwrap();
        let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        let r = b.apply_remote(
            &[RemoteOp {
                table: "account".into(),
                row: id,
                change,
            }],
            Durability::Group,
        );
        assert!(matches!(r, Err(StoreError::InvalidChange { .. })), "{r:?}");
    }
    let r = b.import_row(
        &RowExport {
            table: "account".into(),
            id,
            doc: vec![1, 2, 3],
        },
        Durability::Group,
    );
    assert!(matches!(r, Err(StoreError::InvalidExport { .. })), "{r:?}");
    b.apply_remote(&[good], Durability::Group).unwrap();
    assert!(b.get("account", id).unwrap().is_some());
}

#[test]
fn a_big_remote_batch_with_bad_ops_writes_nothing_and_names_the_first() {
    // Big enough to be parsed on every core.
    let a = temp_store(1);
    let mut tx = a.begin();
    for i in 0..300 {
        tx.insert("account", &[("name", text(&format!("a{i}")))])
            .unwrap();
    }
    tx.commit().unwrap();
    let ops = all_ops(&a);
    assert_eq!(ops.len(), 300);
    let spoil = |ops: &mut [RemoteOp], at: usize| {
        let c = &mut ops[at].change;
        let n = c.len();
        c[n - 3] ^= 0xff;
    };
    let b = temp_store(2);
    // One bad op in the middle; then two, in either half: the first in op order is named.
    for bad in [vec![150], vec![40, 260], vec![200, 280]] {
        let mut batch = ops.clone();
        for at in &bad {
            spoil(&mut batch, *at);
        }
        match b.apply_remote(&batch, Durability::Group) {
            Err(StoreError::InvalidChange { table, row, .. }) => {
                assert_eq!(table, "account");
                assert_eq!(row, ops[bad[0]].row, "{bad:?}");
            }
            other => panic!("{bad:?}: {other:?}"),
        }
        assert_eq!(b.last_seq(), 0, "nothing of the batch was written");
        assert_eq!(b.scan("account").unwrap().count(), 0);
        // The same through import_rows: the bad export is named.
        let exports: Vec<RowExport> = batch
            .iter()
            .map(|op| RowExport {
                table: op.table.clone(),
                id: op.row,
                doc: op.change.clone(),
            })
            .collect();
        match b.import_rows(&exports, Durability::Group) {
            Err(StoreError::InvalidExport { row, .. }) => assert_eq!(row, ops[bad[0]].row),
            other => panic!("{bad:?}: {other:?}"),
        }
        assert_eq!(b.last_seq(), 0, "nothing of the import was written");
    }
    // An unknown table in the second half is reported as before (not as a bad change).
    let mut batch = ops.clone();
    batch[250].table = "nope".into();
    assert!(matches!(
        b.apply_remote(&batch, Durability::Group),
        Err(StoreError::Schema(_))
    ));
    // The good batch applies whole, in order.
    let outcome = b.apply_remote(&ops, Durability::Group).unwrap();
    assert_eq!(outcome.applied, 300);
    assert_eq!(
        b.ops_since(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.row)
            .collect::<Vec<_>>(),
        ops.iter().map(|op| op.row).collect::<Vec<_>>()
    );
    assert!(b.check().unwrap().is_ok());
}

#[test]
fn open_and_create_report_missing_and_existing_stores() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    assert!(matches!(
        Store::open(&p, options(1)),
        Err(OpenError::NotFound(_))
    ));
    make_store(&p);
    assert!(matches!(
        Store::create(&p, schema(), options(1)),
        Err(OpenError::AlreadyExists(_))
    ));
    assert!(matches!(
        Store::open(&p, options(2)),
        Err(OpenError::ActorMismatch { .. })
    ));
    let s = Store::open(&p, options(1)).unwrap();
    assert_eq!(s.scan("account").unwrap().count(), 1);
    // A second handle on the same directory: locked.
    let r = Store::open(&p, options(1));
    assert!(matches!(r, Err(OpenError::Locked(_))), "{r:?}");
}

#[test]
fn damaged_data_directories_are_clear_errors() {
    // Each case damages a fresh store and expects an error (or, where sled recovers a
    // consistent prefix, a store that passes `check`) — never a panic.
    type Damage = fn(&std::path::Path);
    let cases: Vec<(&str, Damage)> = vec![
        ("db file missing", |p| {
            fs::remove_file(p.join("db/db")).unwrap()
        }),
        ("conf missing", |p| {
            fs::remove_file(p.join("db/conf")).unwrap()
        }),
        ("db file truncated to zero", |p| {
            fs::write(p.join("db/db"), b"").unwrap()
        }),
        ("db file garbage", |p| {
            fs::write(p.join("db/db"), vec![0xa5u8; 4096 * 4]).unwrap()
        }),
        ("conf garbage", |p| {
            fs::write(p.join("db/conf"), b"garbage garbage").unwrap()
        }),
        ("db file truncated in the middle", |p| {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(p.join("db/db"))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 2).unwrap();
        }),
        ("write-ahead file garbage", |p| {
            fs::write(p.join("wal"), vec![0x5au8; 64 << 10]).unwrap()
        }),
        ("write-ahead file truncated to zero", |p| {
            fs::write(p.join("wal"), b"").unwrap()
        }),
        ("write-ahead file missing", |p| {
            fs::remove_file(p.join("wal")).unwrap()
        }),
        ("write-ahead file is a directory", |p| {
            fs::remove_file(p.join("wal")).unwrap();
            fs::create_dir(p.join("wal")).unwrap();
        }),
        ("db is a directory of garbage", |p| {
            fs::remove_dir_all(p.join("db")).unwrap();
            fs::create_dir(p.join("db")).unwrap();
            fs::write(p.join("db/db"), b"x").unwrap();
            fs::write(p.join("db/conf"), b"y").unwrap();
        }),
    ];
    for (name, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        make_store(&p);
        damage(&p);
        match Store::open(&p, options(1)) {
            Err(OpenError::Corrupt { .. })
            | Err(OpenError::NotFound(_))
            | Err(OpenError::Io(_)) => {}
            Err(other) => panic!("{name}: unexpected error {other}"),
            Ok(s) => {
                // sled recovered a consistent prefix: it must check out.
                let report = s.check().unwrap();
                assert!(report.is_ok(), "{name}: {report:?}");
            }
        }
    }
}

#[test]
fn garbage_under_our_keys_and_wrong_versions_are_clear_errors() {
    // Write garbage through sled directly, as a damaged disk would.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    make_store(&p);
    {
        let db = raw_sled(&p);
        db.insert(b"0format", &7u32.to_be_bytes()[..]).unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open(&p, options(1)),
        Err(OpenError::VersionMismatch {
            found: 7,
            expected: FORMAT_VERSION
        })
    ));
    {
        let db = raw_sled(&p);
        db.insert(b"0format", &b"xx"[..]).unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open(&p, options(1)),
        Err(OpenError::Corrupt { .. })
    ));
    {
        let db = raw_sled(&p);
        db.insert(b"0format", &FORMAT_VERSION.to_be_bytes()[..])
            .unwrap();
        db.insert(b"0schema", &b"{not json"[..]).unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open(&p, options(1)),
        Err(OpenError::Corrupt { .. })
    ));

    // Garbage in a row, its state and the log.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    make_store(&p);
    let (row_key, log_key) = {
        let db = raw_sled(&p);
        let row_key = db.scan_prefix(b"R").next().unwrap().unwrap().0;
        let log_key = db.scan_prefix(b"L").next().unwrap().unwrap().0;
        db.insert(&row_key, &b"\xff\xff\xff garbage"[..]).unwrap();
        db.flush().unwrap();
        (row_key, log_key)
    };
    // The open-time tail check finds the damaged row and rebuilds it from the log.
    let s = Store::open(&p, options(1)).unwrap();
    assert!(s.check().unwrap().is_ok());
    // A damaged row outside the tail: reads report it, check finds it, rebuild repairs it.
    let mut tx = s.begin();
    tx.insert("contact", &[]).unwrap();
    tx.commit().unwrap();
    drop(s);
    {
        let db = raw_sled(&p);
        db.insert(&row_key, &b"\xff\xff\xff garbage"[..]).unwrap();
        db.flush().unwrap();
    }
    let s = Store::open(&p, options(1)).unwrap();
    assert!(matches!(
        s.scan("account").unwrap().next(),
        Some(Err(StoreError::Corrupt(_)))
    ));
    assert!(!s.check().unwrap().is_ok());
    s.rebuild().unwrap();
    assert!(s.check().unwrap().is_ok());
    assert_eq!(s.scan("account").unwrap().count(), 1);
    drop(s);
    {
        let db = raw_sled(&p);
        db.insert(&log_key, &b"short"[..]).unwrap();
        let _ = row_key;
        db.flush().unwrap();
    }
    match Store::open(&p, options(1)) {
        Err(OpenError::Store(StoreError::Corrupt(_))) => {}
        Err(e) => panic!("unexpected {e}"),
        Ok(s) => {
            assert!(s.ops_since(0, 10).is_err());
            assert!(matches!(s.rebuild(), Err(StoreError::Corrupt(_))));
        }
    }
}

/// A schema with a memo column, for changes near the size limit.
#[allow(clippy::unwrap_used)] // test setup: a panic is a failed test
fn memo_store() -> Store {
    let schema = fieldsync_store::Schema::from_toml(
        "[tables.note]\noffline = true\n[tables.note.columns]\nbody = \"memo\"\ntitle = \"text\"",
    )
    .unwrap();
    Store::temporary(schema, options(1)).unwrap()
}

#[test]
fn a_change_over_the_limit_is_refused_at_commit_and_nothing_is_written() {
    let s = memo_store();
    let big = Value::Memo("x".repeat(MAX_CHANGE_BYTES + MAX_CHANGE_BYTES / 10));
    let mut tx = s.begin();
    tx.insert("note", &[("body", big.clone())]).unwrap();
    match tx.commit() {
        Err(WriteError::ChangeTooLarge {
            table, bytes, max, ..
        }) => {
            assert_eq!(table, "note");
            assert!(bytes > max);
            assert_eq!(max, MAX_CHANGE_BYTES);
        }
        other => panic!("expected ChangeTooLarge, got {other:?}"),
    }
    assert_eq!(s.last_seq(), 0, "nothing was written");
    assert_eq!(s.scan("note").unwrap().count(), 0);

    // An update over the limit is refused too, and leaves the row as it was.
    let mut tx = s.begin();
    let id = tx.insert("note", &[("title", text("small"))]).unwrap();
    tx.commit().unwrap();
    let mut tx = s.begin();
    tx.update("note", id, &[("body", big.clone())]).unwrap();
    assert!(matches!(
        tx.commit(),
        Err(WriteError::ChangeTooLarge { row, .. }) if row == id
    ));
    assert_eq!(s.last_seq(), 1);
    assert_eq!(
        s.get("note", id).unwrap().unwrap().get("body"),
        &Value::Null
    );

    // In a bulk insert, a row over the limit anywhere refuses the whole insert, even after
    // many batches' worth of good rows.
    let mut rows: Vec<Vec<(String, Value)>> = (0..1000)
        .map(|i| vec![("title".to_string(), text(&format!("row {i}")))])
        .collect();
    rows.push(vec![("body".to_string(), big)]);
    assert!(matches!(
        s.bulk_insert("note", rows, &mut |_| {}),
        Err(WriteError::ChangeTooLarge { .. })
    ));
    assert_eq!(s.last_seq(), 1, "nothing of the bulk insert was written");
    assert!(s.check().unwrap().is_ok());
}

#[test]
fn a_change_just_under_the_limit_is_accepted() {
    let s = memo_store();
    let body = Value::Memo("y".repeat(MAX_CHANGE_BYTES - 4096));
    let mut tx = s.begin();
    let id = tx.insert("note", &[("body", body.clone())]).unwrap();
    tx.commit().unwrap();
    assert_eq!(s.get("note", id).unwrap().unwrap().get("body"), &body);
    let entries = s.ops_since(0, 10).unwrap();
    assert!(entries[0].change.len() <= MAX_CHANGE_BYTES);
    let ids = s
        .bulk_insert(
            "note",
            vec![vec![("body".to_string(), body.clone())]],
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(s.get("note", ids[0]).unwrap().unwrap().get("body"), &body);
}

#[test]
fn a_damaged_blob_header_or_index_key_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data");
    let blob = {
        let s = Store::create(&p, schema(), options(1)).unwrap();
        let blob = s.put_blob("a.bin", &mut &[7u8; 1000][..]).unwrap();
        let mut tx = s.begin();
        tx.insert("account", &[("name", text("a"))]).unwrap();
        tx.commit().unwrap();
        blob
    };
    // Opened once more: the open checkpoints, so the write-ahead file no longer holds the
    // header's batch and cannot repair the damage below.
    drop(Store::open(&p, options(1)).unwrap());
    {
        let db = raw_sled(&p);
        let header_key = db.scan_prefix(b"b").next().unwrap().unwrap().0;
        // A header claiming u64::MAX bytes in no chunks (bincode varint: 0xfd + 8 bytes).
        let mut header = vec![0xfd];
        header.extend_from_slice(&u64::MAX.to_le_bytes());
        header.push(0);
        db.insert(header_key, header).unwrap();
        // An index key too short to name its table.
        db.insert(b"I", &b""[..]).unwrap();
        db.flush().unwrap();
    }
    let s = Store::open(&p, options(1)).unwrap();
    let read = s.read_blob(&blob);
    assert!(matches!(read, Err(StoreError::BlobCorrupt(_))), "{read:?}");
    let report = s.check().unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|problem| problem.what.contains("index entry")),
        "{report:?}"
    );
    s.rebuild().unwrap();
    assert!(s.check().unwrap().is_ok());
}
