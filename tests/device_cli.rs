//! End-to-end tests of the device commands, each a real `fieldsync` process.

// Test setup that fails is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;

use fieldsync_e2e::{field_service, fieldsync_err, fieldsync_ok};

const ME: &str = "9a1f3c52-0000-4000-8000-000000000001";
const OTHER: &str = "9a1f3c52-0000-4000-8000-000000000002";

fn init_device() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("device");
    let schema = field_service("schema.toml");
    fieldsync_ok([
        "device".as_ref(),
        "init".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--schema".as_ref(),
        schema.as_os_str(),
    ]);
    dir
}

fn data_arg(dir: &tempfile::TempDir) -> String {
    dir.path().join("device").to_string_lossy().into_owned()
}

#[test]
fn put_get_query_delete_round_trip() {
    let dir = init_device();
    let data = data_arg(&dir);
    let id = fieldsync_ok([
        "device",
        "put",
        "--data",
        &data,
        "msdyn_workorder",
        "msdyn_name=WO-0001",
        &format!("ownerid=user:{ME}"),
        "msdyn_priority=2",
        "msdyn_totalamount=120.50",
        "msdyn_datewindowstart=2026-11-26T08:30:00Z",
    ]);
    let id = id.trim().to_string();
    uuid_like(&id);
    fieldsync_ok([
        "device",
        "put",
        "--data",
        &data,
        "msdyn_workorder",
        "msdyn_name=WO-0002",
        &format!("ownerid=user:{OTHER}"),
    ]);

    let row: serde_json::Value = serde_json::from_str(&fieldsync_ok([
        "device",
        "get",
        "--data",
        &data,
        "msdyn_workorder",
        &id,
        "--json",
    ]))
    .unwrap();
    assert_eq!(row["msdyn_name"], "WO-0001");
    assert_eq!(row["msdyn_priority"], 2);
    assert_eq!(row["msdyn_totalamount"], "120.50");
    assert_eq!(row["msdyn_datewindowstart"], "2026-11-26T08:30:00Z");
    assert_eq!(row["statecode"], 0, "new rows are active");
    assert!(row["createdon"].is_string());

    // Update one column by id; the others stay.
    fieldsync_ok([
        "device",
        "put",
        "--data",
        &data,
        "msdyn_workorder",
        "--id",
        &id,
        "msdyn_priority=3",
    ]);
    let mine = fieldsync_ok([
        "device",
        "query",
        "--data",
        &data,
        "msdyn_workorder",
        "--where",
        &format!("ownerid=user:{ME}"),
        "--where",
        "statecode=0",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = mine
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{mine}");
    assert_eq!(rows[0]["msdyn_priority"], 3);
    assert_eq!(rows[0]["msdyn_name"], "WO-0001");

    fieldsync_ok(["device", "delete", "--data", &data, "msdyn_workorder", &id]);
    let err = fieldsync_err(["device", "get", "--data", &data, "msdyn_workorder", &id]);
    assert!(err.contains("no row"), "{err}");

    let log = fieldsync_ok(["device", "log", "--data", &data, "--json"]);
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        entries.len(),
        4,
        "two creates, an update and a delete: {log}"
    );
    let since = fieldsync_ok(["device", "log", "--data", &data, "--since", "2", "--json"]);
    assert_eq!(since.lines().count(), 2);

    let status = fieldsync_ok(["device", "status", "--data", &data]);
    assert!(status.contains("msdyn_workorder"), "{status}");
}

fn uuid_like(s: &str) {
    assert_eq!(s.len(), 36, "not a row id: {s:?}");
    assert_eq!(s.matches('-').count(), 4, "not a row id: {s:?}");
}

#[test]
fn bad_input_is_one_clear_error_and_writes_nothing() {
    let dir = init_device();
    let data = data_arg(&dir);
    let text_file = dir.path().join("logo.png");
    std::fs::write(&text_file, "a text file named like an image").unwrap();
    let not_an_image = format!("logo=@{}", text_file.display());
    // One byte over `contract`'s maximum (16 MiB in the example schema); sparse, so cheap.
    let big_file = dir.path().join("big.pdf");
    std::fs::File::create(&big_file)
        .unwrap()
        .set_len(16 * 1024 * 1024 + 1)
        .unwrap();
    let too_big = format!("contract=@{}", big_file.display());
    let too_big_ref = format!("contract={}:16777217:x.pdf", "ab".repeat(32));
    let cases: &[(&[&str], &str)] = &[
        (&["nosuchtable", "name=x"], "unknown table"),
        (&["account", "nosuchcolumn=x"], "unknown column"),
        (
            &["account", "numberofemployees=many"],
            "not a valid integer",
        ),
        (&["account", "industrycode=99"], "not an option"),
        (
            &["account", "primarycontactid=not-a-uuid"],
            "not a valid lookup",
        ),
        (&["account", "--id", "123", "name=x"], "not a valid row id"),
        (&["account", "name"], "COL=VALUE"),
        // A file column takes a file: not a made-up reference to content nobody has...
        (
            &[
                "account",
                "contract=0000000000000000000000000000000000000000000000000000000000000000:99999:x.pdf",
            ],
            "does not hold",
        ),
        // ...nor a stream with no end or size.
        (&["account", "contract=@/dev/zero"], "not a regular file"),
        // An image column takes GIF, JPEG, TIFF, BMP or PNG content only.
        (&["account", &not_an_image], "not a GIF, JPEG, TIFF, BMP or PNG"),
        // A file column takes files up to its maximum.
        (
            &["account", &too_big],
            "column `contract` takes files of at most 16777216 bytes",
        ),
        (&["account", &too_big_ref], "takes files of at most 16777216 bytes"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["device", "put", "--data", &data];
        full.extend_from_slice(args);
        let err = fieldsync_err(&full);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let log = fieldsync_ok(["device", "log", "--data", &data]);
    assert!(log.is_empty(), "a refused write left a log entry: {log}");

    // Commands on a directory that holds no store.
    let empty = dir.path().join("nothing-here");
    let err = fieldsync_err([
        "device".as_ref(),
        "status".as_ref(),
        "--data".as_ref(),
        empty.as_os_str(),
    ]);
    assert!(err.contains("cannot open"), "{err}");

    // init refuses to overwrite an existing store.
    let schema = field_service("schema.toml");
    let err = fieldsync_err([
        "device".as_ref(),
        "init".as_ref(),
        "--data".as_ref(),
        dir.path().join("device").as_os_str(),
        "--schema".as_ref(),
        schema.as_os_str(),
    ]);
    assert!(err.contains("cannot create"), "{err}");
}

#[test]
fn import_checks_the_whole_file_before_writing() {
    let dir = init_device();
    let data = data_arg(&dir);
    let good = dir.path().join("contacts.jsonl");
    let mut f = std::fs::File::create(&good).unwrap();
    for i in 0..250 {
        writeln!(
            f,
            r#"{{"firstname":"Ada{i}","lastname":"Field","donotphone":{},"ownerid":"user:{ME}"}}"#,
            i % 2 == 0
        )
        .unwrap();
    }
    drop(f);
    let out = fieldsync_ok([
        "device".as_ref(),
        "import".as_ref(),
        "--data".as_ref(),
        data.as_ref(),
        "contact".as_ref(),
        good.as_os_str(),
    ]);
    assert!(out.contains("imported 250 rows"), "{out}");
    let rows = fieldsync_ok(["device", "query", "--data", &data, "contact", "--json"]);
    assert_eq!(rows.lines().count(), 250);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"firstname\":\"ok\"}\n{\"firstname\":\"ok2\"}\n{\"donotphone\":\"maybe\"}\n",
    )
    .unwrap();
    let err = fieldsync_err([
        "device".as_ref(),
        "import".as_ref(),
        "--data".as_ref(),
        data.as_ref(),
        "contact".as_ref(),
        bad.as_os_str(),
    ]);
    assert!(err.contains(":3"), "names the line: {err}");
    let rows = fieldsync_ok(["device", "query", "--data", &data, "contact", "--json"]);
    assert_eq!(
        rows.lines().count(),
        250,
        "nothing from the bad file was written"
    );
}

#[test]
fn a_damaged_store_is_a_clear_error() {
    let dir = init_device();
    let data = dir.path().join("device");
    // Overwrite every file of the store, at any depth, with garbage.
    fn damage(dir: &std::path::Path) -> usize {
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                n += damage(&path);
            } else {
                std::fs::write(&path, b"\x00garbage\xffnot a database").unwrap();
                n += 1;
            }
        }
        n
    }
    assert!(damage(&data) > 0, "the store wrote no files");
    for cmd in ["status", "log"] {
        let err = fieldsync_err([
            "device".as_ref(),
            cmd.as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
        ]);
        assert!(
            err.starts_with("error:") && err.contains("damaged"),
            "{cmd}: {err}"
        );
    }
}

fn import_file(data: &str, table: &str, file: &std::path::Path) -> std::process::Output {
    fieldsync_e2e::fieldsync([
        "device".as_ref(),
        "import".as_ref(),
        "--data".as_ref(),
        data.as_ref(),
        table.as_ref(),
        file.as_os_str(),
    ])
}

#[test]
fn a_file_for_a_deleted_row_is_not_stored_and_imports_name_no_phantom_files() {
    let dir = init_device();
    let data = data_arg(&dir);
    let id = fieldsync_ok(["device", "put", "--data", &data, "account", "name=x"]);
    let id = id.trim();
    fieldsync_ok(["device", "delete", "--data", &data, "account", id]);
    let big = dir.path().join("big.pdf");
    std::fs::write(&big, vec![7u8; 4 << 20]).unwrap();
    let size = |d: &std::path::Path| -> u64 {
        fn walk(d: &std::path::Path) -> u64 {
            std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        }
        walk(d)
    };
    let store_dir = dir.path().join("device");
    let before = size(&store_dir);
    let err = fieldsync_err([
        "device",
        "put",
        "--data",
        &data,
        "account",
        "--id",
        id,
        &format!("contract=@{}", big.display()),
    ]);
    assert!(err.contains("deleted"), "{err}");
    assert!(
        size(&store_dir) < before + (1 << 20),
        "the file of a refused write was stored"
    );
    let lines = dir.path().join("phantom.jsonl");
    std::fs::write(
        &lines,
        format!(
            "{{\"name\":\"ok\"}}\n{{\"name\":\"y\",\"contract\":\"{}:12:y.pdf\"}}\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let out = import_file(&data, "account", &lines);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2:") && err.contains("does not hold"),
        "{err}"
    );
}

#[test]
fn plain_output_escapes_control_characters() {
    let dir = init_device();
    let data = data_arg(&dir);
    let id = fieldsync_ok([
        "device",
        "put",
        "--data",
        &data,
        "contact",
        "firstname=Ana\nstatecode: 1",
        "lastname=x\tfake=1\u{1b}[2J",
    ]);
    let id = id.trim();
    let got = fieldsync_ok(["device", "get", "--data", &data, "contact", id]);
    assert!(!got.contains("\nstatecode: 1"), "{got}");
    assert!(got.contains("Ana\\nstatecode: 1"), "{got}");
    assert!(!got.contains('\u{1b}'), "{got}");
    let rows = fieldsync_ok(["device", "query", "--data", &data, "contact"]);
    assert_eq!(rows.lines().count(), 1, "{rows}");
    let json = fieldsync_ok(["device", "get", "--data", &data, "contact", id, "--json"]);
    assert!(
        json.contains("Ana\\nstatecode: 1"),
        "--json stays exact: {json}"
    );
}

fn contact_count(data: &str) -> usize {
    fieldsync_ok(["device", "query", "--data", data, "contact", "--json"])
        .lines()
        .count()
}

#[test]
fn import_refuses_repeated_and_existing_ids_and_oversized_rows_whole() {
    let dir = init_device();
    let data = data_arg(&dir);
    let id = |i: usize| format!("7c000000-0000-4000-8000-{i:012}");
    // An id on line 5,001 that repeats line 1: past the first 5,000 rows.
    let repeated = dir.path().join("repeated.jsonl");
    let mut f = std::fs::File::create(&repeated).unwrap();
    for i in 0..5_000 {
        writeln!(f, r#"{{"contactid":"{}","firstname":"c{i}"}}"#, id(i)).unwrap();
    }
    writeln!(f, r#"{{"contactid":"{}","firstname":"again"}}"#, id(0)).unwrap();
    drop(f);
    let out = import_file(&data, "contact", &repeated);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(":5001") && err.contains("line 1"), "{err}");
    assert_eq!(contact_count(&data), 0, "nothing of the file was written");

    // An id the store already holds.
    let existing = fieldsync_ok([
        "device",
        "put",
        "--data",
        &data,
        "contact",
        "--id",
        &id(3),
        "firstname=here",
    ]);
    assert_eq!(existing.trim(), id(3));
    let out = import_file(&data, "contact", &repeated);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(":4:") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(contact_count(&data), 1);

    // A row whose change would be over the 1 MiB limit of one change, after 5,000 good rows.
    let big = dir.path().join("big.jsonl");
    let mut f = std::fs::File::create(&big).unwrap();
    for i in 0..5_000 {
        writeln!(f, r#"{{"name":"p{i}"}}"#).unwrap();
    }
    writeln!(
        f,
        r#"{{"productid":"{}","description":"{}"}}"#,
        id(9),
        "x".repeat(1_100_000)
    )
    .unwrap();
    drop(f);
    let out = import_file(&data, "product", &big);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(":5001") && err.contains("over the 1048576-byte limit"),
        "{err}"
    );
    // The same without an id: the error still names its line, not an id made up for it.
    let mut f = std::fs::File::create(&big).unwrap();
    writeln!(f, r#"{{"name":"p0"}}"#).unwrap();
    writeln!(f, r#"{{"description":"{}"}}"#, "x".repeat(1_100_000)).unwrap();
    drop(f);
    let out = import_file(&data, "product", &big);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("big.jsonl:2:") && err.contains("over the 1048576-byte limit"),
        "{err}"
    );
    let products = fieldsync_ok(["device", "query", "--data", &data, "product", "--json"]);
    assert_eq!(
        products.lines().count(),
        0,
        "nothing of the file was written"
    );
}

/// `device status` counts the device's own edits the hub has not acknowledged, not the
/// changes pulled from the hub that share the log.
#[test]
fn status_counts_own_pending_edits_only() {
    let dir = init_device();
    let data = data_arg(&dir);
    fieldsync_ok(["device", "put", "--data", &data, "account", "name=mine"]);
    // Two changes from another actor, as a pull would apply them.
    let schema_text = std::fs::read_to_string(field_service("schema.toml")).unwrap();
    let schema = fieldsync_store::Schema::from_toml(&schema_text).unwrap();
    let other = fieldsync_store::Store::temporary(
        schema,
        fieldsync_store::StoreOptions::default().with_actor(fieldsync_store::ActorId([9; 16])),
    )
    .unwrap();
    let mut tx = other.begin();
    tx.insert(
        "account",
        &[("name", fieldsync_store::Value::Text("a".into()))],
    )
    .unwrap();
    tx.insert(
        "account",
        &[("name", fieldsync_store::Value::Text("b".into()))],
    )
    .unwrap();
    tx.commit().unwrap();
    let ops: Vec<_> = other
        .ops_since(0, 10)
        .unwrap()
        .iter()
        .map(|e| e.to_remote())
        .collect();
    {
        let device = fieldsync_store::Store::open(
            &dir.path().join("device"),
            fieldsync_store::StoreOptions::default(),
        )
        .unwrap();
        device
            .apply_remote(&ops, fieldsync_store::Durability::Immediate)
            .unwrap();
        assert_eq!(device.last_seq(), 3);
    }
    let status = fieldsync_ok(["device", "status", "--data", &data]);
    assert!(status.contains("pending ops   1\n"), "{status}");
}
