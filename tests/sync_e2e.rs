//! End-to-end sync: a real `fieldsync hub serve` process and real `fieldsync device ...`
//! processes over QUIC on loopback, with the field-service example.
// A failed unwrap here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fieldsync_e2e::{field_service, fieldsync, fieldsync_ok, free_udp_port, HubProcess};

const APP: &str = "Field Service Mobile";
const WO: &str = "msdyn_workorder";
/// ana@contoso.com's id in the field-service environment (derived from her name).
const ANA_ID: &str = "b237bab1-137b-5641-91ea-e78c80541bdd";

/// These tests start real hubs and devices that each want both cores; run side by side on a
/// two-core machine their QUIC handshakes time out. One at a time keeps them meaningful.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Hub {
    dir: tempfile::TempDir,
    port: u16,
}

impl Hub {
    fn data(&self) -> PathBuf {
        self.dir.path().join("hub")
    }
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn init() -> Hub {
        Hub::init_with_apps(&field_service("apps.toml"))
    }
    fn init_with_apps(apps: &Path) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub {
            dir,
            port: free_udp_port(),
        };
        let data = hub.data();
        fieldsync_ok([
            "hub".as_ref(),
            "init".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            "--env".as_ref(),
            field_service("environment.toml").as_os_str(),
            "--apps".as_ref(),
            apps.as_os_str(),
            "--schema".as_ref(),
            field_service("schema.toml").as_os_str(),
            "--profile".as_ref(),
            field_service("profile.toml").as_os_str(),
        ]);
        hub
    }
    /// An active work order (`statecode=0`) with this name, owner and system status, plus
    /// `extra` `COL=VALUE`s; returns its id.
    fn work_order(&self, name: &str, owner: &str, status: u32, extra: &[&str]) -> String {
        let mut values = vec![
            format!("msdyn_name={name}"),
            format!("ownerid={owner}"),
            "statecode=0".to_string(),
            format!("msdyn_systemstatus={status}"),
        ];
        values.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        self.put(WO, None, &refs)
    }

    fn put(&self, table: &str, id: Option<&str>, values: &[&str]) -> String {
        let data = self.data();
        let mut args = vec![
            "hub".to_string(),
            "put".into(),
            "--data".into(),
            data.to_string_lossy().into_owned(),
            table.into(),
        ];
        if let Some(id) = id {
            args.push("--id".into());
            args.push(id.into());
        }
        args.extend(values.iter().map(|s| s.to_string()));
        fieldsync_ok(args).trim().to_string()
    }
    /// Enrolls USER for the app (credential `NAME.cred`); returns the device dir.
    fn device(&self, user: &str, name: &str) -> PathBuf {
        self.device_for_app(user, name, APP)
    }
    /// Enrolls USER for APP (credential `NAME.cred`); returns the device dir `NAME`.
    fn device_for_app(&self, user: &str, name: &str, app: &str) -> PathBuf {
        let cred = self.path(&format!("{name}.cred"));
        let dev = self.path(name);
        fieldsync_ok([
            "hub".as_ref(),
            "enroll".as_ref(),
            "--data".as_ref(),
            self.data().as_os_str(),
            "--user".as_ref(),
            user.as_ref(),
            "--app".as_ref(),
            app.as_ref(),
            "--out".as_ref(),
            cred.as_os_str(),
            "--address".as_ref(),
            self.addr().as_ref(),
        ]);
        dev
    }
    /// Enrolls USER for the app into credential file CRED; returns the token id.
    fn enroll_token(&self, user: &str, cred: &str) -> String {
        let out = fieldsync_ok([
            "hub",
            "enroll",
            "--data",
            &s(&self.data()),
            "--user",
            user,
            "--app",
            APP,
            "--out",
            &s(&self.path(cred)),
            "--address",
            &self.addr(),
        ]);
        out.split("token ")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .expect("enroll prints the token id")
            .to_string()
    }
    /// Revokes token id TOKEN (the hub running or not).
    fn revoke(&self, token: &str) {
        fieldsync_ok([
            "hub",
            "revoke",
            "--data",
            &s(&self.data()),
            "--token",
            token,
        ]);
    }
    fn serve(&self) -> HubProcess {
        HubProcess::spawn(&self.data(), &self.addr(), None)
    }
}

/// The body of `GET PATH` from a local HTTP server (the hub's metrics port).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(reply)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn init_device(dev: &Path, cred: &Path) {
    fieldsync_ok([
        "device",
        "init",
        "--data",
        &s(dev),
        "--credential",
        &s(cred),
    ]);
}

fn sync(dev: &Path) -> String {
    fieldsync_ok(["device", "sync", "--data", &s(dev), "--once"])
}

fn rows(dev: &Path, table: &str) -> Vec<serde_json::Value> {
    fieldsync_ok(["device", "query", "--data", &s(dev), table, "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn names(dev: &Path) -> Vec<String> {
    let mut v: Vec<String> = rows(dev, WO)
        .iter()
        .filter_map(|r| r["msdyn_name"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

fn field(dev: &Path, table: &str, id: &str, col: &str) -> Option<String> {
    rows(dev, table)
        .into_iter()
        .find(|r| r[format!("{table}id")].as_str() == Some(id))
        .and_then(|r| r[col].as_str().map(str::to_string))
}

/// Three devices: offline edits, a conflicting edit, an unauthorized write (rejected, rolled
/// back, listed by `device errors`), convergence; then an owner change (hub drained with
/// SIGTERM, edited, restarted) moves a row from one device to another.
#[test]
fn three_devices_converge_conflict_rejection_and_owner_change() {
    let _serial = serial();
    let hub = Hub::init();
    let wo_ana = hub.work_order("WO-101", "user:ana@contoso.com", 690970000, &[]);
    let wo_move = hub.work_order("WO-102", "user:ana@contoso.com", 690970001, &[]);
    let wo_team = hub.work_order(
        "WO-103",
        "team:Emergency Crew",
        690970000,
        &["msdyn_workordersummary=flooded"],
    );
    hub.work_order("WO-201", "user:ines@contoso.com", 690970000, &[]);
    hub.work_order("WO-301", "user:lena@contoso.com", 690970002, &[]);
    let ana = hub.device("ana@contoso.com", "ana");
    let ines = hub.device("ines@contoso.com", "ines");
    let lena = hub.device("lena@contoso.com", "lena");

    let proc = hub.serve();
    for d in [&ana, &ines, &lena] {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        init_device(d, &hub.path(&format!("{name}.cred")));
        sync(d);
    }
    assert_eq!(names(&ana), ["WO-101", "WO-102", "WO-103"]);
    assert_eq!(names(&ines), ["WO-103", "WO-201"]);
    assert_eq!(names(&lena), ["WO-301"]);

    // Offline edits.
    fieldsync_ok([
        "device",
        "put",
        "--data",
        &s(&ana),
        WO,
        "--id",
        &wo_team,
        "msdyn_workordersummary=pump restarted",
    ]);
    fieldsync_ok([
        "device",
        "put",
        "--data",
        &s(&ana),
        WO,
        "--id",
        &wo_ana,
        "msdyn_priority=1",
    ]);
    fieldsync_ok([
        "device",
        "put",
        "--data",
        &s(&ines),
        WO,
        "--id",
        &wo_team,
        "msdyn_workordersummary=basement dry",
    ]);
    let product = fieldsync_ok([
        "device",
        "put",
        "--data",
        &s(&ines),
        "product",
        "name=gasket",
    ])
    .trim()
    .to_string();
    let status = fieldsync_ok(["device", "status", "--data", &s(&ines)]);
    assert!(status.contains("pending ops   2"), "{status}");

    // Reconnect, twice round so every device has every other's edits.
    for d in [&ana, &ines, &lena, &ana, &ines] {
        sync(d);
    }
    let a = field(&ana, WO, &wo_team, "msdyn_workordersummary");
    let i = field(&ines, WO, &wo_team, "msdyn_workordersummary");
    assert_eq!(a, i, "devices converge on the conflicting column");
    assert!(a.as_deref() == Some("pump restarted") || a.as_deref() == Some("basement dry"));
    let status = fieldsync_ok(["device", "status", "--data", &s(&ana)]);
    assert!(status.contains("conflicts     1"), "{status}");
    assert!(status.contains("pending ops   0"), "{status}");
    assert_eq!(
        field(&ines, WO, &wo_ana, "msdyn_priority"),
        None,
        "ines may not see ana's row"
    );

    // The unauthorized create: rejected, rolled back, listed.
    assert!(
        field(&ines, "product", &product, "name").is_none(),
        "rolled back"
    );
    let errors = fieldsync_ok(["device", "errors", "--data", &s(&ines)]);
    assert!(
        errors.contains(&product) && errors.contains("Permission"),
        "{errors}"
    );
    let id = errors.split_whitespace().next().unwrap().to_string();
    fieldsync_ok(["device", "errors", "--data", &s(&ines), "--discard", &id]);
    assert!(fieldsync_ok(["device", "errors", "--data", &s(&ines)]).contains("no sync errors"));

    // Owner change on the hub: drain (SIGTERM), edit, restart on the same port.
    assert!(proc.terminate(), "the hub exits 0 on SIGTERM");
    hub.put(WO, Some(&wo_move), &["ownerid=user:lena@contoso.com"]);
    let _proc = hub.serve();
    sync(&ana);
    sync(&lena);
    assert_eq!(names(&ana), ["WO-101", "WO-103"], "evicted from ana");
    assert_eq!(names(&lena), ["WO-102", "WO-301"], "arrived on lena");
}

fn import_work_orders(dev: &Path, dir: &Path, n: usize) {
    let file = dir.join("wo.jsonl");
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "{{\"msdyn_name\":\"IMP-{i:05}\",\"ownerid\":\"user:{ANA_ID}\",\"statecode\":0,\"msdyn_systemstatus\":690970000}}\n"
        ));
    }
    std::fs::write(&file, text).unwrap();
    fieldsync_ok(["device", "import", "--data", &s(dev), WO, &s(&file)]);
}

/// A device killed with SIGKILL mid-sync, again and again, loses nothing and duplicates
/// nothing; a hub killed with SIGKILL loses no op it acknowledged.
#[test]
fn sigkill_device_and_hub_lose_nothing() {
    let _serial = serial();
    const N: usize = 1500;
    let hub = Hub::init();
    let ana = hub.device("ana@contoso.com", "ana");
    let ana2 = hub.device("ana@contoso.com", "ana2");
    let proc = hub.serve();
    init_device(&ana, &hub.path("ana.cred"));
    init_device(&ana2, &hub.path("ana2.cred"));
    import_work_orders(&ana, hub.dir.path(), N);

    // Kill the device's sync at growing delays until one run completes.
    let bin = fieldsync_e2e::fieldsync_bin();
    let mut kills = 0;
    for delay_ms in [150u64, 300, 450, 600, 900] {
        let mut child = std::process::Command::new(bin)
            .args(["device", "sync", "--data", &s(&ana), "--once"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        let _ = child.wait();
    }
    sync(&ana);
    let status = fieldsync_ok(["device", "status", "--data", &s(&ana)]);
    assert!(status.contains("pending ops   0"), "{status}");
    assert!(status.contains("integrity     ok"), "{status}");
    let mine = names(&ana);
    assert_eq!(
        mine.len(),
        N,
        "killed {kills} times: nothing lost or duplicated on the device"
    );

    // The acknowledged ops are on the hub: kill it without a drain, restart, read them back.
    proc.kill();
    let _proc = hub.serve();
    sync(&ana2);
    let theirs = names(&ana2);
    assert_eq!(
        theirs, mine,
        "every acknowledged op survived the hub's SIGKILL"
    );
}

/// A second app with the same profile shares the device's one copy; a revoked token is
/// refused; sync-only-on-Wi-Fi is honoured with a clear message.
#[test]
fn second_app_revocation_and_wifi_only() {
    let _serial = serial();
    let hub = Hub::init();
    hub.work_order("WO-1", "user:ana@contoso.com", 690970000, &[]);
    let ana = hub.device("ana@contoso.com", "ana");
    let bad = hub.device("ines@contoso.com", "ines");
    let token = hub.enroll_token("ines@contoso.com", "revoked.cred");
    hub.revoke(&token);
    let _proc = hub.serve();
    init_device(&ana, &hub.path("ana.cred"));
    sync(&ana);
    assert_eq!(names(&ana), ["WO-1"]);
    let _ = bad;

    // Revoked: one clear error line.
    let out = fieldsync([
        "device",
        "init",
        "--data",
        &s(&hub.path("rev")),
        "--credential",
        &s(&hub.path("revoked.cred")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked"), "{err}");

    // Wi-Fi only.
    fieldsync_ok([
        "device",
        "config",
        "--data",
        &s(&ana),
        "--wifi-only",
        "true",
    ]);
    let out = std::process::Command::new(fieldsync_e2e::fieldsync_bin())
        .args(["device", "sync", "--data", &s(&ana), "--once"])
        .env("FIELDSYNC_FAKE_LINK", "cellular")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Wi-Fi only"));
    let out = std::process::Command::new(fieldsync_e2e::fieldsync_bin())
        .args(["device", "sync", "--data", &s(&ana), "--once"])
        .env("FIELDSYNC_FAKE_LINK", "wifi")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // With the hub running, the operator's commands go through its admin socket: a device
    // enrolled now syncs a row written now, and revoking its token ends its live session, so
    // `--watch` (which retries lost connections for good) stops with a clear error.
    drop(_proc);
    let dora = hub.path("dora");
    // An init killed after it created the store (left empty) is taken up by the next init.
    fieldsync_ok([
        "device",
        "init",
        "--data",
        &s(&dora),
        "--schema",
        &s(&field_service("schema.toml")),
    ]);
    let proc = HubProcess::spawn(&hub.data(), &hub.addr(), Some("127.0.0.1:0"));
    let metrics = proc.metrics.clone().unwrap();
    let dora_token = hub.enroll_token("ana@contoso.com", "dora.cred");
    init_device(&dora, &hub.path("dora.cred"));
    hub.work_order("WO-LIVE", "user:ana@contoso.com", 690970000, &[]);
    sync(&dora);
    assert!(names(&dora).contains(&"WO-LIVE".to_string()));
    let mut watch = std::process::Command::new(fieldsync_e2e::fieldsync_bin())
        .args(["device", "sync", "--data", &s(&dora), "--watch"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Revoked only once the device holds a live session, so it is that session that ends.
    let started = std::time::Instant::now();
    while !http_get(&metrics, "/metrics").contains("fieldsync_hub_connected_devices 1") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the device did not connect"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    hub.revoke(&dora_token);
    let revoked_at = std::time::Instant::now();
    let status = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if revoked_at.elapsed() > std::time::Duration::from_secs(30) {
            let _ = watch.kill();
            panic!("device sync --watch kept its session or retried a revoked credential");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("refuses this device's credential"), "{err}");
    let listed = fieldsync_ok(["hub", "devices", "--data", &s(&hub.data())]);
    assert!(
        listed.lines().any(|l| l.contains(&dora_token)
            && l.contains("ana@contoso.com")
            && l.ends_with("revoked")),
        "{listed}"
    );

    // A request that is not one gets an error back, and the socket keeps serving.
    let socket = hub.data().join("admin.sock");
    let mut conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(&mut conn, b"{\"Revoke\":").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).unwrap();
    assert!(reply.contains("not an admin request"), "{reply}");
    hub.work_order("WO-SOCKET", "user:ana@contoso.com", 690970000, &[]);
    // A killed hub leaves its socket behind; the commands then open the store themselves.
    proc.kill();
    assert!(socket.exists());
    hub.work_order("WO-STOPPED", "user:ana@contoso.com", 690970000, &[]);
}

/// A device enrolled for a second app whose offline profile is the same keeps its one store
/// and downloads nothing again.
#[test]
fn second_app_with_the_same_profile_downloads_once() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let apps = work.path().join("apps.toml");
    let mut text = std::fs::read_to_string(field_service("apps.toml")).unwrap();
    text.push_str(
        "\n[[apps]]\nname = \"Field Service Lite\"\noffline = true\nprofile = \"Field Service Mobile\"\n",
    );
    std::fs::write(&apps, text).unwrap();
    let hub = Hub::init_with_apps(&apps);
    for n in 1..=3 {
        hub.put(
            WO,
            None,
            &[
                &format!("msdyn_name=WO-{n}"),
                "ownerid=user:ana@contoso.com",
                "statecode=0",
                "msdyn_systemstatus=690970000",
            ],
        );
    }
    let ana = hub.device("ana@contoso.com", "ana");
    hub.device_for_app("ana@contoso.com", "ana-lite", "Field Service Lite");
    let _proc = hub.serve();
    init_device(&ana, &hub.path("ana.cred"));
    let first = sync(&ana);
    assert!(first.contains("3 rows in"), "{first}");
    let out = fieldsync_ok([
        "device",
        "init",
        "--data",
        &s(&ana),
        "--credential",
        &s(&hub.path("ana-lite.cred")),
    ]);
    assert!(out.contains("keeping the one copy of the data"), "{out}");
    let second = sync(&ana);
    assert!(
        second.contains("pulled 0 changes, 0 rows in"),
        "the second app downloaded again: {second}"
    );
    assert_eq!(names(&ana), ["WO-1", "WO-2", "WO-3"]);
}

/// `device sync --watch` stays connected in live mode: another device's edit reaches it within
/// seconds, although the profile's tables sync every 5 minutes or more.
#[test]
fn watch_sees_another_devices_edit_within_seconds() {
    use std::io::BufRead;
    let _serial = serial();
    let hub = Hub::init();
    let wo = hub.work_order("WO-1", "team:Emergency Crew", 690970000, &[]);
    let ana = hub.device("ana@contoso.com", "ana");
    let ines = hub.device("ines@contoso.com", "ines");
    let _proc = hub.serve();
    init_device(&ana, &hub.path("ana.cred"));
    init_device(&ines, &hub.path("ines.cred"));
    sync(&ana);
    sync(&ines);
    assert_eq!(names(&ines), ["WO-1"]);

    let mut watch = fieldsync_e2e::KillOnDrop(
        std::process::Command::new(fieldsync_e2e::fieldsync_bin())
            .args(["device", "sync", "--data", &s(&ines), "--watch"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = watch.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("connected to the hub") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the watching device did not connect");

    fieldsync_ok([
        "device",
        "put",
        "--data",
        &s(&ana),
        WO,
        "--id",
        &wo,
        "msdyn_name=WO-1 pump replaced",
    ]);
    sync(&ana);
    // Live mode pushes the edit at once; the table's own interval is 5 minutes.
    std::thread::sleep(Duration::from_secs(3));
    let status = watch.terminate().unwrap();
    assert!(status.success(), "watch exited with {status}");
    assert_eq!(names(&ines), ["WO-1 pump replaced"]);
}

/// Copies directory `from` to `to`, as an operator's backup of a stopped hub does.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A hub restored from a backup taken before a device's last sync: the device's cursor is past
/// the hub's log, so the hub restarts the device's feed and the device gets what the restored
/// hub holds and writes next, instead of nothing.
#[test]
fn a_hub_restored_from_a_backup_restarts_its_devices_feeds() {
    let _serial = serial();
    let hub = Hub::init();
    hub.work_order("BEFORE", "user:ana@contoso.com", 690970000, &[]);
    let ana = hub.device("ana@contoso.com", "ana");
    let backup = hub.path("backup");
    copy_dir(&hub.data(), &backup);

    let proc = hub.serve();
    init_device(&ana, &hub.path("ana.cred"));
    hub.work_order("LOST-1", "user:ana@contoso.com", 690970000, &[]);
    hub.work_order("LOST-2", "user:ana@contoso.com", 690970000, &[]);
    let out = sync(&ana);
    assert!(!out.contains("restored"), "{out}");
    assert_eq!(names(&ana), ["BEFORE", "LOST-1", "LOST-2"]);
    assert!(proc.terminate());

    // The disaster: the hub's directory goes back to the backup. More rows are written after
    // it than it lost, so its log grows past the device's cursor before the device pulls: the
    // entry the cursor names is another one now.
    std::fs::remove_dir_all(hub.data()).unwrap();
    copy_dir(&backup, &hub.data());
    let after = ["AFTER-1", "AFTER-2", "AFTER-3", "AFTER-4", "AFTER-5"];
    for name in after {
        hub.work_order(name, "user:ana@contoso.com", 690970000, &[]);
    }
    let _proc = hub.serve();
    let out = sync(&ana);
    assert!(
        out.contains("restored from a backup?") && out.contains(WO),
        "the device says its feed restarted: {out}"
    );
    // What the restored hub lost stays on the device; what it wrote since comes down, all of
    // it (reading on from the old cursor would have skipped the rows up to it).
    let mut want = after.to_vec();
    want.extend(["BEFORE", "LOST-1", "LOST-2"]);
    assert_eq!(names(&ana), want);
    // The next sync reads on from the new cursor.
    let out = sync(&ana);
    assert!(!out.contains("restored"), "{out}");
}

/// A client with a valid credential that asks for other tables, forged cursors, sends oversize
/// and garbage frames: it gets nothing outside its set and the hub keeps serving others.
#[test]
fn hostile_client_gets_nothing_outside_its_set() {
    let _serial = serial();
    use fieldsync_replication::credential::Credential;
    use fieldsync_replication::proto::{Cursor, DeviceId, Hello, Message, Pull, TableCursor};
    use fieldsync_replication::transport::{
        codes, connect_with_credential, ConnectionLimits, FrameFormat,
    };
    use fieldsync_replication::wire;

    let hub = Hub::init();
    let secret = hub.work_order("SECRET", "user:ines@contoso.com", 690970000, &[]);
    let mine = hub.work_order("MINE", "user:ana@contoso.com", 690970000, &[]);
    let _mal = hub.device("ana@contoso.com", "mallory");
    let ines = hub.device("ines@contoso.com", "ines");
    let _proc = hub.serve();
    let cred = Credential::load(&hub.path("mallory.cred")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let seen: Vec<u8> = rt.block_on(async {
        let mut seen = Vec::new();
        // 1: valid Hello, then pulls of other tables and forged cursors.
        let link = connect_with_credential(&cred, ConnectionLimits::device())
            .await
            .unwrap();
        let mut w = link.writer.with_format(FrameFormat::WIRE_V1);
        let mut r = link.reader.with_format(FrameFormat::WIRE_V1);
        let token = cred.token.token();
        let hello = Message::Hello(Hello {
            protocol_versions: vec![fieldsync_replication::proto::messages::PROTOCOL_VERSION],
            device: DeviceId(token.device_id),
            token: cred.token.as_bytes().to_vec(),
            app: token.app.clone(),
            client: "mallory".into(),
        });
        w.write_frame(&wire::encode(&hello).unwrap()).await.unwrap();
        let mut tables = Vec::new();
        for t in ["systemaudit", "msdyn_workorder", "account", "no_such_table"] {
            for c in [0u64, 1, 3, 7, u64::MAX / 2, u64::MAX] {
                tables.push(TableCursor {
                    table: t.into(),
                    cursor: Cursor(c),
                });
            }
        }
        let pull = Message::Pull(Pull { tables });
        w.write_frame(&wire::encode(&pull).unwrap()).await.unwrap();
        // Read whatever comes for a while.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Ok(Some(frame))) = tokio::time::timeout_at(deadline, r.read_frame()).await {
            seen.extend_from_slice(&frame);
        }
        link.conn.close(0u32.into(), b"");
        // 2: garbage frame with a valid header length, and an oversize header.
        let link = connect_with_credential(&cred, ConnectionLimits::device())
            .await
            .unwrap();
        let mut w = link.writer.with_format(FrameFormat::WIRE_V1);
        let mut garbage = b"FSYN".to_vec();
        garbage.extend_from_slice(&[9, 9, 9, 9, 0, 0, 0, 8]);
        garbage.extend_from_slice(b"garbage!");
        let _ = w.write_raw(&garbage).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), link.conn.closed())
            .await
            .expect("the hub closes a connection that sends garbage");
        // ...with the session's code for an unsupported version (a wire error), not "done".
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code.into_inner() > u64::from(codes::SESSION_BASE)),
            "{closed:?}"
        );
        let link = connect_with_credential(&cred, ConnectionLimits::device())
            .await
            .unwrap();
        let mut w = link.writer.with_format(FrameFormat::WIRE_V1);
        let mut oversize = b"FSYN".to_vec();
        oversize.extend_from_slice(&[1, 1, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
        let _ = w.write_raw(&oversize).await;
        let closed = tokio::time::timeout(Duration::from_secs(5), link.conn.closed()).await;
        assert!(
            closed.is_ok(),
            "the hub closes a connection that announces an oversize frame"
        );
        // 3: one credential holds one session: a second connection replaces the first...
        let first = connect_with_credential(&cred, ConnectionLimits::device())
            .await
            .unwrap();
        let second = connect_with_credential(&cred, ConnectionLimits::device())
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), first.conn.closed())
            .await
            .expect("the replaced connection is closed");
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code.into_inner() == u64::from(codes::SUPERSEDED)),
            "{closed:?}"
        );
        // ...and a session the client ends takes its connection with it.
        let mut w = second.writer;
        w.finish().unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), second.conn.closed()).await;
        assert!(closed.is_ok(), "a connection outlived its session");
        seen
    });
    let secret_bytes = uuid::Uuid::parse_str(&secret).unwrap();
    assert!(
        !seen.windows(16).any(|w| w == secret_bytes.as_bytes()),
        "another user's row id never reaches the hostile client"
    );
    assert!(!String::from_utf8_lossy(&seen).contains("SECRET"));
    let _ = mine;
    // The hub still serves another device.
    init_device(&ines, &hub.path("ines.cred"));
    sync(&ines);
    assert_eq!(names(&ines), ["SECRET"]);
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// A report and a signature attached offline on one of ana's devices go up with its next
/// sync and come down, unasked, to her other device; `device file` writes them out.
#[test]
fn attachments_go_up_from_one_device_and_down_to_another() {
    let _serial = serial();
    let hub = Hub::init();
    let wo = hub.work_order("WO-501", "user:ana@contoso.com", 690970000, &[]);
    let phone = hub.device("ana@contoso.com", "ana-phone");
    let laptop = hub.device("ana@contoso.com", "ana-laptop");
    let proc = HubProcess::spawn(&hub.data(), &hub.addr(), Some("127.0.0.1:0"));
    init_device(&phone, &hub.path("ana-phone.cred"));
    init_device(&laptop, &hub.path("ana-laptop.cred"));
    sync(&phone);
    sync(&laptop);

    // 300 KB: several protocol chunks and two store chunks.
    let report: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let signature = b"\x89PNG\r\n\x1a\n a signature".to_vec();
    let report_path = hub.path("report.pdf");
    let signature_path = hub.path("signature.png");
    std::fs::write(&report_path, &report).unwrap();
    std::fs::write(&signature_path, &signature).unwrap();
    fieldsync_ok([
        "device",
        "put",
        "--data",
        &s(&phone),
        WO,
        "--id",
        &wo,
        &format!("msdyn_report=@{}", s(&report_path)),
        &format!("msdyn_signature=@{}", s(&signature_path)),
    ]);
    let up = sync(&phone);
    assert!(up.contains("2 files up, 0 down"), "{up}");
    let metrics = http_get(proc.metrics.as_deref().unwrap(), "/metrics");
    assert!(
        metrics.contains("fieldsync_hub_files_uploaded_total 2"),
        "{metrics}"
    );
    // A client trickling its request a byte at a time is cut off after the request's 5 s.
    let started = Instant::now();
    let mut slow = std::net::TcpStream::connect(proc.metrics.as_deref().unwrap()).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let cut_off = loop {
        use std::io::{Read, Write};
        if started.elapsed() > Duration::from_secs(15) {
            break false;
        }
        if slow.write_all(b"G").is_err() {
            break true;
        }
        match slow.read(&mut [0u8; 64]) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
        std::thread::sleep(Duration::from_millis(800));
    };
    assert!(cut_off, "a trickling client held the metrics port");
    assert!(
        http_get(proc.metrics.as_deref().unwrap(), "/healthz").contains("ok"),
        "the port still answers"
    );
    let down = sync(&laptop);
    assert!(down.contains("0 files up, 2 down"), "{down}");
    for (col, want) in [("msdyn_report", &report), ("msdyn_signature", &signature)] {
        let out = hub.path(&format!("{col}.out"));
        fieldsync_ok([
            "device",
            "file",
            "--data",
            &s(&laptop),
            WO,
            &wo,
            col,
            "--out",
            &s(&out),
        ]);
        assert_eq!(&std::fs::read(&out).unwrap(), want, "{col}");
    }
    // Nothing left to move: the next syncs carry no file.
    let again = sync(&phone);
    assert!(again.contains("0 files up, 0 down"), "{again}");
    let again = sync(&laptop);
    assert!(again.contains("0 files up, 0 down"), "{again}");
    for d in [&phone, &laptop] {
        let status = fieldsync_ok(["device", "status", "--data", &s(d)]);
        assert!(
            status.contains("files         0 to upload, 0 to download"),
            "{status}"
        );
    }
}
