//! A hub replica over the field-service example and a `fieldsync dataverse-emulator` child
//! process on loopback, for the upstream bridge's tests and bench.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use fieldsync_node::upstream::{AuthConfig, Bridge, SecretSource, UpstreamConfig};
use fieldsync_replication::credential::HubSigningKey;
use fieldsync_replication::replica::HubReplica;
use fieldsync_replication::{apps_from_toml, Environment, Profile};
use fieldsync_store::{Schema, Store, StoreOptions};
use reqwest::Method;
use serde_json::Value as J;

pub const ADMIN_TOKEN: &str = "admin-token";

pub fn example(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/field-service")
        .join(name);
    std::fs::read_to_string(&p).unwrap()
}

/// The emulator as a child process; `restart` brings it back on the same port and data.
pub struct Emulator {
    child: Option<Child>,
    pub dir: PathBuf,
    pub addr: String,
    extra: Vec<String>,
    http: reqwest::Client,
}

impl Emulator {
    pub fn start(dir: &Path, extra: &[&str]) -> Emulator {
        let mut e = Emulator {
            child: None,
            dir: dir.to_path_buf(),
            addr: "127.0.0.1:0".into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            http: {
                fieldsync_node::upstream::client::install_crypto_provider();
                reqwest::Client::new()
            },
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(["dataverse-emulator", "--listen", &self.addr, "--data"])
            .arg(&self.dir)
            .args(["--example", "field-service"])
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().rsplit(' ').next().unwrap();
        self.addr = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A request as an office user would make it (curl-like), as the administrator.
    pub async fn call(&self, method: Method, path: &str, body: Option<J>) -> (u16, J) {
        let mut req = self
            .http
            .request(method, format!("{}/api/data/v9.2/{path}", self.url()))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(J::Null))
    }

    /// Every row of an entity set (a plain query, no tracking).
    pub async fn rows(&self, set: &str) -> Vec<J> {
        let (status, page) = self.call(Method::GET, set, None).await;
        assert_eq!(status, 200, "{page}");
        page["value"].as_array().unwrap().clone()
    }

    /// The next `n` writes the emulator applies lose their replies (it must have been started
    /// with `--test-faults`).
    pub async fn drop_write_replies(&self, n: u32) {
        self.set_fault("drop_write_replies", n).await;
    }

    /// The next `n` file downloads fail with `503` (started with `--test-faults`).
    pub async fn fail_file_downloads(&self, n: u32) {
        self.set_fault("fail_file_downloads", n).await;
    }

    /// Reads of row `id` by id answer `500` (`None` clears it; started with `--test-faults`).
    pub async fn fail_reads_of(&self, id: Option<uuid::Uuid>) {
        let id = id.map(|i| i.to_string()).unwrap_or_default();
        self.set_fault("fail_reads_of", id).await;
    }

    /// The next `n` single write requests (not a `$batch`) answer `503` with nothing applied
    /// (started with `--test-faults`).
    pub async fn fail_writes(&self, n: u32) {
        self.set_fault("fail_writes", n).await;
    }

    /// Queries of entity set `set` (a table's pages and changes) answer `500` (`None` clears
    /// it; started with `--test-faults`).
    pub async fn fail_queries_of(&self, set: Option<&str>) {
        self.set_fault("fail_queries_of", set.unwrap_or_default())
            .await;
    }

    async fn set_fault(&self, name: &str, value: impl std::fmt::Display) {
        let resp = self
            .http
            .post(format!("{}/_test/faults?{name}={value}", self.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            204,
            "is the emulator started with --test-faults?"
        );
    }

    /// An account's `contract` file as Dataverse serves it (`None`: no file).
    pub async fn office_gets_file(&self, id: uuid::Uuid) -> Option<Vec<u8>> {
        let resp = self
            .http
            .get(format!(
                "{}/api/data/v9.2/accounts({id})/contract/$value",
                self.url()
            ))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        (resp.status() == 200).then_some(())?;
        Some(resp.bytes().await.unwrap().to_vec())
    }

    /// An office user replaces an account's `contract` file in Dataverse.
    pub async fn office_puts_file(&self, id: uuid::Uuid, name: &str, bytes: &[u8]) {
        let put = self
            .http
            .patch(format!(
                "{}/api/data/v9.2/accounts({id})/contract",
                self.url()
            ))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("Content-Type", "application/octet-stream")
            .header("x-ms-file-name", name)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 204);
    }

    pub async fn row(&self, set: &str, id: uuid::Uuid) -> Option<J> {
        let (status, row) = self.call(Method::GET, &format!("{set}({id})"), None).await;
        (status == 200).then_some(row)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What most bridge tests start from: a temporary directory (`dir`) holding an emulator started
/// with the given flags (`emu/`) and a hub replica (`hub/`). Tests destructure it
/// (`let EmulatorAndHub { dir, emu, replica } = EmulatorAndHub::start(&[]);`); the fields are
/// dropped emulator first, directory last.
pub struct EmulatorAndHub {
    pub emu: Emulator,
    pub replica: Arc<Mutex<HubReplica>>,
    pub dir: tempfile::TempDir,
}

impl EmulatorAndHub {
    /// The emulator with `emulator_flags` and a hub with the field-service schema.
    pub fn start(emulator_flags: &[&str]) -> EmulatorAndHub {
        EmulatorAndHub::with_schema(emulator_flags, &example("schema.toml"))
    }

    /// [`EmulatorAndHub::start`] with the hub on another schema (one Dataverse's has drifted
    /// from, say).
    pub fn with_schema(emulator_flags: &[&str], hub_schema_toml: &str) -> EmulatorAndHub {
        let dir = tempfile::tempdir().unwrap();
        let emu = Emulator::start(&dir.path().join("emu"), emulator_flags);
        let replica = hub_replica_with_schema(&dir.path().join("hub"), hub_schema_toml);
        EmulatorAndHub { emu, replica, dir }
    }
}

/// A hub replica on disk with the field-service schema, environment, apps and profile.
pub fn hub_replica(dir: &Path) -> Arc<Mutex<HubReplica>> {
    hub_replica_with_schema(dir, &example("schema.toml"))
}

/// [`hub_replica`] with another schema (one Dataverse's has drifted from, say).
pub fn hub_replica_with_schema(dir: &Path, schema_toml: &str) -> Arc<Mutex<HubReplica>> {
    let schema = Schema::from_toml(schema_toml).unwrap();
    let store = Store::create(&dir.join("store"), schema.clone(), StoreOptions::default()).unwrap();
    let env = Environment::from_toml(&example("environment.toml")).unwrap();
    let apps = apps_from_toml(&example("apps.toml"), &schema).unwrap();
    let profile = Profile::from_toml(&example("profile.toml"), &schema).unwrap();
    let key = HubSigningKey::generate().unwrap();
    let replica = HubReplica::open(store, env, apps, vec![profile], key.verifier(), 0).unwrap();
    Arc::new(Mutex::new(replica))
}

/// The bridge's config for the emulator, authenticated as its administrator (token in a file).
pub fn config(emu: &Emulator, dir: &Path) -> UpstreamConfig {
    let token_file = dir.join("token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let mut c = UpstreamConfig::new(emu.url());
    c.auth = AuthConfig::Bearer {
        token: SecretSource::File(token_file),
    };
    c.backoff_ms = 50;
    c.backoff_max_ms = 200;
    c.poll_secs = 1;
    c
}

/// A bridge that relays only `tables` (all offline tables if empty).
pub fn bridge(config: UpstreamConfig, replica: &Arc<Mutex<HubReplica>>) -> Bridge {
    Bridge::new(config, replica.clone(), Box::new(|_| {})).unwrap()
}
