//! `hub init --upstream` and `hub serve` relaying to the emulator, as processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod upstream_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldsync_node::upstream::{AuthConfig, SecretSource, UpstreamConfig};
use fieldsync_store::{Store, StoreOptions, Value};
use reqwest::Method;
use serde_json::json;
use upstream_support::Emulator;
use uuid::Uuid;

fn fieldsync(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fieldsync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn hub_serve_relays_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(&dir.path().join("emu"), &[]);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/field-service");
    let hub = dir.path().join("hub");
    let hub_s = hub.to_str().unwrap();
    let p = |f: &str| example.join(f).to_str().unwrap().to_string();
    fieldsync(&[
        "hub",
        "init",
        "--data",
        hub_s,
        "--env",
        &p("environment.toml"),
        "--apps",
        &p("apps.toml"),
        "--schema",
        &p("schema.toml"),
        "--profile",
        &p("profile.toml"),
        "--upstream",
        &emu.url(),
        "--upstream-token-env",
        "FS_TEST_DV_TOKEN",
    ]);
    // hub.toml names the variable, holds no token; make the bridge poll every second.
    let text = std::fs::read_to_string(hub.join("hub.toml")).unwrap();
    assert!(!text.contains("admin-token"));
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    let up: UpstreamConfig = doc["upstream"].clone().try_into().unwrap();
    assert_eq!(up.url, emu.url());
    assert_eq!(
        up.auth,
        AuthConfig::Bearer {
            token: SecretSource::Env("FS_TEST_DV_TOKEN".into())
        }
    );
    doc["upstream"]
        .as_table_mut()
        .unwrap()
        .insert("poll_secs".into(), toml::Value::Integer(1));
    std::fs::write(hub.join("hub.toml"), toml::to_string(&doc).unwrap()).unwrap();

    // An operator's edit made while the hub is down is pushed once it serves.
    let id = fieldsync(&[
        "hub",
        "put",
        "--data",
        hub_s,
        "account",
        "name=From the hub",
    ])
    .trim()
    .parse::<Uuid>()
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args([
            "hub",
            "serve",
            "--data",
            hub_s,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .env("FS_TEST_DV_TOKEN", "admin-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut metrics = None;
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("metrics on http://") {
            metrics = rest.split('/').next().map(str::to_string);
        }
        if line.starts_with("relaying to Dataverse at") {
            break;
        }
    }
    let metrics = metrics.expect("a metrics address");
    std::thread::spawn(move || for _ in lines {});
    let deadline = Instant::now() + Duration::from_secs(15);
    let row = loop {
        if let Some(r) = emu.row("accounts", id).await {
            break r;
        }
        assert!(Instant::now() < deadline, "the hub's row reached Dataverse");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(row["name"], "From the hub");
    // The row is visible upstream a moment before the bridge has read the answer.
    let text = loop {
        let text = reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("fieldsync_upstream_rows_pushed_total 1") {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(text.contains("fieldsync_upstream_queue_entries "), "{text}");

    // An office edit reaches the hub's store.
    let (s, _) = emu
        .call(
            Method::PATCH,
            &format!("accounts({id})"),
            Some(json!({"telephone1": "555-0142"})),
        )
        .await;
    assert_eq!(s, 204);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let store = Store::open(&hub.join("store"), StoreOptions::default()).unwrap();
    let here = store.get("account", id).unwrap().unwrap();
    assert_eq!(here.get("telephone1"), &Value::Text("555-0142".into()));
}

#[test]
fn demo_with_the_emulator_upstream_relays_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let out = fieldsync(&[
        "demo",
        "--upstream-emulator",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.contains("the hub wrote its 6 rows there"), "{out}");
    assert!(
        out.contains("Dataverse WO-101 msdyn_systemstatus = 690970002"),
        "{out}"
    );
    assert!(
        out.contains("Dataverse WO-102 owner is lena: true"),
        "{out}"
    );
    // The conflict's winner depends on the devices' random actors: Dataverse has the same.
    let winner = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("ana   summary = "))
        .and_then(|rest| rest.split(';').next())
        .unwrap();
    assert!(
        out.contains(&format!("Dataverse WO-103 summary = {winner} ")),
        "{out}"
    );
    assert!(
        out.contains("ana   WO-101 summary = \"Customer called: gate code 4711\""),
        "{out}"
    );
    assert!(out.contains("ines  holds WO-101: false"), "{out}");
}
