//! `fieldsync hub ...`: set up, run and administer a hub.
//!
//! A hub's data directory:
//!
//! ```text
//! DIR/hub.toml          commented config (listen and metrics addresses, limits, conflict policy,
//!                       and the upstream Dataverse environment if any)
//! DIR/environment.toml  business units, users, teams, roles (copied at init)
//! DIR/apps.toml         apps (copied at init)
//! DIR/schema.toml       schema (copied at init)
//! DIR/profile.toml      offline profile(s) (copied at init, or generated from the apps)
//! DIR/tls/hub.crt, hub.key   the hub's TLS identity (its pin goes into every credential)
//! DIR/signing.key       the ed25519 key that signs device tokens
//! DIR/store/            the hub's store (rows, log, token registry, per-device bookkeeping)
//! DIR/admin.sock        while `hub serve` runs: where `enroll`, `revoke`, `devices` and `put` go
//!                       (`hub_admin`)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use fieldsync_replication::credential::{Credential, HubSigningKey};
use fieldsync_replication::proto::{ConflictPolicies, ConflictPolicy, HubConfig, Millis};
use fieldsync_replication::replica::{FeedChanges, HubReplica};
use fieldsync_replication::transport::{ConnectionLimits, HubIdentity};
use fieldsync_replication::{apps_from_toml, generate_profile, Environment, Profile};
use fieldsync_store::{Durability, RowId, Schema, Store, StoreOptions, Value};
use serde::Deserialize;
use uuid::Uuid;

use fieldsync_node::upstream::{AuthConfig, Bridge, SecretSource, UpstreamConfig};

use crate::hub_admin::{self, AdminReply, AdminRequest, RevokeTarget};
use crate::sync::hub::{
    render_metrics, serve_metrics, start_hub, ChangeBus, HubRuntime, Metrics, RunningHub,
    RunningHubView,
};
use crate::sync::{unix_ms, Bootstrap};

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Create a hub: store, environment, apps, profile, TLS identity, signing key, hub.toml.
    Init {
        /// The hub's data directory (created).
        #[arg(long)]
        data: PathBuf,
        /// Environment TOML (business units, users, teams, roles).
        #[arg(long)]
        env: PathBuf,
        /// Apps TOML.
        #[arg(long)]
        apps: PathBuf,
        /// Schema TOML (default: schema.toml next to the environment file).
        #[arg(long)]
        schema: Option<PathBuf>,
        /// Offline profile TOML (default: profile.toml next to the apps file, else generated).
        #[arg(long)]
        profile: Option<PathBuf>,
        #[command(flatten)]
        upstream: UpstreamArgs,
    },
    /// Serve devices over QUIC + TLS until SIGTERM or SIGINT.
    Serve {
        #[arg(long)]
        data: PathBuf,
        /// UDP address to listen on (port 0: any free port; the chosen one is printed).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Local HTTP address for /healthz and /metrics.
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
    /// Enroll a device of USER for APP: writes a credential file (through the running hub's admin
    /// socket if it serves DIR).
    Enroll {
        #[arg(long)]
        data: PathBuf,
        /// User name (e.g. ana@contoso.com) or id.
        #[arg(long)]
        user: String,
        /// App name (its offline profile decides what the device holds).
        #[arg(long)]
        app: String,
        /// Where to write the credential (keep it secret).
        #[arg(long)]
        out: PathBuf,
        /// The hub address written into the credential (default: hub.toml's public_address).
        #[arg(long)]
        address: Option<String>,
    },
    /// Revoke a token, or every token of a device or a user: their sessions are refused from
    /// then on, and live ones are ended (through the running hub's admin socket if it serves
    /// DIR).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["token", "device", "user"])))]
    Revoke {
        #[arg(long)]
        data: PathBuf,
        /// The token id (printed by `hub enroll`, listed by `hub devices`).
        #[arg(long)]
        token: Option<Uuid>,
        /// Every active token of this device (a lost or stolen phone).
        #[arg(long)]
        device: Option<Uuid>,
        /// Every active token of this user, a name or an id (someone who left).
        #[arg(long)]
        user: Option<String>,
    },
    /// List the devices enrolled: token, device, user, app, when, and whether revoked.
    Devices {
        #[arg(long)]
        data: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Write a row on the hub itself (an operator's edit), routed to devices like a pushed op
    /// (through the running hub's admin socket if it serves DIR). Owner values may name a
    /// user: `ownerid=user:ana@contoso.com`.
    Put {
        #[arg(long)]
        data: PathBuf,
        table: String,
        #[arg(long)]
        id: Option<Uuid>,
        #[arg(value_name = "COL=VALUE")]
        values: Vec<String>,
    },
}

pub fn run(cmd: HubCommand) -> Result<()> {
    match cmd {
        HubCommand::Init {
            data,
            env,
            apps,
            schema,
            profile,
            upstream,
        } => {
            init(&data, &env, &apps, schema.as_deref(), profile.as_deref())?;
            if let Some(config) = upstream.config()? {
                set_upstream(&data, &config)?;
                println!("relaying to Dataverse at {}", config.url);
            }
            Ok(())
        }
        HubCommand::Serve {
            data,
            listen,
            metrics,
        } => serve(&data, listen, metrics),
        HubCommand::Enroll {
            data,
            user,
            app,
            out,
            address,
        } => enroll(&data, &user, &app, &out, address.as_deref()),
        HubCommand::Revoke {
            data,
            token,
            device,
            user,
        } => {
            let target = match (token, device, user) {
                (Some(t), _, _) => RevokeTarget::Token(t),
                (_, Some(d), _) => RevokeTarget::Device(d),
                (_, _, Some(u)) => RevokeTarget::User(u),
                (None, None, None) => bail!("--token, --device or --user"),
            };
            revoke(&data, target)
        }
        HubCommand::Devices { data, json } => devices(&data, json),
        HubCommand::Put {
            data,
            table,
            id,
            values,
        } => put(&data, &table, id, &values),
    }
}

/// The parsed `hub.toml`. Unknown keys are refused: a misspelt setting would otherwise be
/// silently left at its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    pub hub_id: Uuid,
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub public_address: Option<String>,
    #[serde(default)]
    pub metrics: Option<String>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub conflicts: ConflictsFile,
    /// The Dataverse environment the hub relays to; none: the hub is the system of record.
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
}

/// `hub init --upstream URL ...`: where Dataverse is and how to authenticate. Secrets are
/// named (an environment variable or a file), never written into hub.toml.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Relay to this Dataverse environment (or emulator) URL, e.g.
    /// https://contoso.crm4.dynamics.com or http://127.0.0.1:8080.
    #[arg(long)]
    upstream: Option<String>,
    /// A static bearer token is in this environment variable (the emulator's users).
    #[arg(long, requires = "upstream")]
    upstream_token_env: Option<String>,
    /// Entra ID: the directory (tenant) id; with --upstream-client-id and a secret source.
    #[arg(long, requires = "upstream")]
    upstream_tenant: Option<String>,
    /// Entra ID: the app registration's application (client) id.
    #[arg(long, requires = "upstream_tenant")]
    upstream_client_id: Option<String>,
    /// Entra ID: the client secret is in this environment variable.
    #[arg(long, requires = "upstream_tenant")]
    upstream_secret_env: Option<String>,
    /// Entra ID: the client secret is in this file.
    #[arg(
        long,
        requires = "upstream_tenant",
        conflicts_with = "upstream_secret_env"
    )]
    upstream_secret_file: Option<PathBuf>,
    /// Entra ID: the token endpoint (default: login.microsoftonline.com for the tenant).
    #[arg(long, requires = "upstream_tenant")]
    upstream_token_endpoint: Option<String>,
}

impl UpstreamArgs {
    fn config(&self) -> Result<Option<UpstreamConfig>> {
        let Some(url) = &self.upstream else {
            return Ok(None);
        };
        let mut config = UpstreamConfig::new(url.clone());
        config.auth = match (&self.upstream_tenant, &self.upstream_token_env) {
            (Some(tenant), _) => {
                let secret = match (&self.upstream_secret_env, &self.upstream_secret_file) {
                    (Some(var), _) => SecretSource::Env(var.clone()),
                    (None, Some(file)) => SecretSource::File(file.clone()),
                    (None, None) => bail!(
                        "--upstream-tenant needs --upstream-secret-env VAR or --upstream-secret-file PATH"
                    ),
                };
                AuthConfig::Entra {
                    tenant_id: tenant.clone(),
                    client_id: self
                        .upstream_client_id
                        .clone()
                        .ok_or_else(|| anyhow!("--upstream-tenant needs --upstream-client-id"))?,
                    secret,
                    token_endpoint: self.upstream_token_endpoint.clone(),
                    scope: None,
                }
            }
            (None, Some(var)) => AuthConfig::Bearer {
                token: SecretSource::Env(var.clone()),
            },
            (None, None) => AuthConfig::None {},
        };
        Ok(Some(config))
    }
}

/// Appends the `[upstream]` section to the hub.toml `hub init` just wrote (init refuses a
/// directory that already has one).
fn set_upstream(data: &Path, config: &UpstreamConfig) -> Result<()> {
    let path = HubPaths::new(data).file("hub.toml");
    let text = read(&path, "hub config")?;
    #[derive(serde::Serialize)]
    struct Section<'a> {
        upstream: &'a UpstreamConfig,
    }
    let section = toml::to_string(&Section { upstream: config })
        .context("cannot write the upstream section")?;
    let out = format!(
        "{}\n# The Dataverse environment this hub relays to (README, \"Relaying to Dataverse\").\n# Secrets are named here (env = \"VAR\" or file = \"PATH\"), never stored.\n# Memory per request is bounded: file_chunk_bytes per file range or upload chunk (ranges go to a\n# temporary file), response_bytes_max for a page of page_size rows or a $batch reply.\n{section}",
        text.trim_end()
    );
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn default_listen() -> String {
    "0.0.0.0:4433".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_connections: Option<usize>,
    pub max_pending_handshakes: Option<usize>,
    pub idle_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictsFile {
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
}

fn policy(text: &str) -> Result<ConflictPolicy> {
    match text {
        "merge" | "merge-per-column" => Ok(ConflictPolicy::MergePerColumn),
        "server-wins" => Ok(ConflictPolicy::ServerWins),
        "client-wins" => Ok(ConflictPolicy::ClientWins),
        other => bail!("unknown conflict policy `{other}` (merge, server-wins or client-wins)"),
    }
}

fn hub_toml(hub_id: Uuid) -> String {
    format!(
        r#"# fieldsync hub configuration, written by `fieldsync hub init`.

# The hub's id (sent to devices in Welcome). Do not change it once devices are enrolled.
hub_id = "{hub_id}"

# UDP address the hub listens on for devices (QUIC + TLS 1.3, no 0-RTT).
# `fieldsync hub serve --listen ADDR` overrides it.
listen = "0.0.0.0:4433"

# The address written into credentials by `hub enroll` (what devices dial).
# `fieldsync hub enroll --address HOST:PORT` overrides it.
public_address = "127.0.0.1:4433"

# Local HTTP address for /healthz and Prometheus /metrics (keep it off the internet).
# Leave out or `hub serve --metrics ADDR` to choose.
metrics = "127.0.0.1:9464"

[limits]
# Open connections the hub holds at most; more are refused.
max_connections = 10000
# QUIC handshakes in progress at most; past half of this, clients must validate their address.
max_pending_handshakes = 256
# A session that sends nothing (not even a keep-alive) for this long is closed.
idle_timeout_secs = 90

[conflicts]
# How concurrent writes to one row are resolved, as Dataverse's conflict detection setting:
#   "merge"        merge per column (default); a column written on both sides keeps a winner
#                  and shows the losing value on the device
#   "server-wins"  the hub's row wins over a device's concurrent write, whole row
#   "client-wins"  the device's write wins, whole row
default = "merge"

[conflicts.tables]
# Per-table policy, e.g.:
# msdyn_workorder = "server-wins"
"#
    )
}

struct HubPaths {
    dir: PathBuf,
}

impl HubPaths {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("tls").join("hub.crt")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("tls").join("hub.key")
    }
    fn signing(&self) -> PathBuf {
        self.dir.join("signing.key")
    }
}

fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn init(
    data: &Path,
    env: &Path,
    apps: &Path,
    schema: Option<&Path>,
    profile: Option<&Path>,
) -> Result<()> {
    let (hub_id, pin) = init_hub(data, env, apps, schema, profile)?;
    println!(
        "initialized hub {hub_id} in {}\ncertificate pin {pin}\nedit {} to set addresses, limits and conflict policies",
        data.display(),
        data.join("hub.toml").display()
    );
    Ok(())
}

/// Creates a hub directory; returns the hub's id and its certificate pin.
pub fn init_hub(
    data: &Path,
    env: &Path,
    apps: &Path,
    schema: Option<&Path>,
    profile: Option<&Path>,
) -> Result<(Uuid, String)> {
    let paths = HubPaths::new(data);
    if paths.file("hub.toml").exists() {
        bail!("{} already holds a hub", data.display());
    }
    let schema_path = schema.map(Path::to_path_buf).unwrap_or_else(|| {
        env.parent()
            .unwrap_or_else(|| Path::new("."))
            .join("schema.toml")
    });
    let schema_text = read(&schema_path, "schema file")?;
    let schema_parsed = Schema::from_toml(&schema_text)
        .with_context(|| format!("schema file {}", schema_path.display()))?;
    let env_text = read(env, "environment file")?;
    Environment::from_toml(&env_text)
        .with_context(|| format!("environment file {}", env.display()))?;
    let apps_text = read(apps, "apps file")?;
    let app_list = apps_from_toml(&apps_text, &schema_parsed)
        .with_context(|| format!("apps file {}", apps.display()))?;
    let profile_path = profile.map(Path::to_path_buf).or_else(|| {
        let p = apps
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("profile.toml");
        p.exists().then_some(p)
    });
    let profile_text = match &profile_path {
        Some(p) => {
            let text = read(p, "profile file")?;
            Profile::from_toml(&text, &schema_parsed)
                .with_context(|| format!("profile file {}", p.display()))?;
            text
        }
        None => {
            let app = app_list
                .iter()
                .find(|a| a.offline)
                .ok_or_else(|| anyhow!("no offline app in {} and no --profile", apps.display()))?;
            generate_profile(app, &schema_parsed).0.to_toml()
        }
    };
    std::fs::create_dir_all(data.join("tls"))
        .with_context(|| format!("cannot create {}", data.display()))?;
    for (name, text) in [
        ("schema.toml", &schema_text),
        ("environment.toml", &env_text),
        ("apps.toml", &apps_text),
        ("profile.toml", &profile_text),
    ] {
        std::fs::write(paths.file(name), text)
            .with_context(|| format!("cannot write {}", paths.file(name).display()))?;
    }
    let hub_id = Uuid::new_v4();
    let identity = HubIdentity::generate(&format!("fieldsync-hub-{hub_id}"))
        .context("cannot generate the hub's TLS identity")?;
    identity
        .save(&paths.cert(), &paths.key())
        .context("cannot save the hub's TLS identity")?;
    HubSigningKey::generate()
        .context("cannot generate the signing key")?
        .save(&paths.signing())
        .context("cannot save the signing key")?;
    Store::create(&paths.store(), schema_parsed, StoreOptions::default())
        .with_context(|| format!("cannot create the hub store in {}", paths.store().display()))?;
    std::fs::write(paths.file("hub.toml"), hub_toml(hub_id))
        .with_context(|| format!("cannot write {}", paths.file("hub.toml").display()))?;
    Ok((hub_id, identity.pin().to_string()))
}

/// A hub opened from its directory.
pub struct OpenHub {
    pub file: HubFile,
    pub replica: HubReplica,
    pub identity: HubIdentity,
    pub verifier: fieldsync_replication::credential::TokenVerifier,
    pub bootstraps: HashMap<String, Bootstrap>,
    pub policies: ConflictPolicies,
}

/// `data`'s `hub.toml`, parsed and checked.
fn read_hub_file(data: &Path) -> Result<HubFile> {
    let path = HubPaths::new(data).file("hub.toml");
    let text = read(&path, "hub config")
        .with_context(|| format!("is {} a hub directory (`hub init`)?", data.display()))?;
    let file: HubFile =
        toml::from_str(&text).with_context(|| format!("hub config {}", path.display()))?;
    check_hub_file(&file).with_context(|| format!("hub config {}", path.display()))?;
    Ok(file)
}

/// Opens the hub in `data` (its store is locked while this lives).
pub fn open_hub(data: &Path) -> Result<OpenHub> {
    let paths = HubPaths::new(data);
    let file = read_hub_file(data)?;
    let store = Store::open(&paths.store(), StoreOptions::default())
        .with_context(|| format!("cannot open the hub store in {}", paths.store().display()))?;
    let schema = store.schema().clone();
    let schema_text = read(&paths.file("schema.toml"), "schema")?;
    // Devices get schema.toml at init; it must be the schema the store was created with.
    if Schema::from_toml(&schema_text).ok().as_ref() != Some(&schema) {
        bail!(
            "{} is not the schema the hub's store was created with; a hub's schema cannot be changed after `hub init`",
            paths.file("schema.toml").display()
        );
    }
    let env = Environment::from_toml(&read(&paths.file("environment.toml"), "environment")?)
        .context("environment.toml")?;
    let apps =
        apps_from_toml(&read(&paths.file("apps.toml"), "apps")?, &schema).context("apps.toml")?;
    let profile_text = read(&paths.file("profile.toml"), "profile")?;
    let profile = Profile::from_toml(&profile_text, &schema).context("profile.toml")?;
    let identity =
        HubIdentity::load(&paths.cert(), &paths.key()).context("cannot load the TLS identity")?;
    let key = HubSigningKey::load(&paths.signing()).context("cannot load the signing key")?;
    check_store_owner(&store, file.hub_id, key.public_key()).with_context(|| {
        format!(
            "the store in {} was not made with this hub.toml and signing.key",
            paths.store().display()
        )
    })?;
    let verifier = key.verifier();
    let mut bootstraps = HashMap::new();
    for app in &apps {
        if app.profile.as_deref() == Some(profile.name.as_str()) {
            bootstraps.insert(
                app.name.clone(),
                Bootstrap {
                    hub: file.hub_id,
                    app: app.name.clone(),
                    user: String::new(),
                    profile_name: profile.name.clone(),
                    schema_toml: schema_text.clone(),
                    profile_toml: profile_text.clone(),
                },
            );
        }
    }
    let mut policies = ConflictPolicies::default();
    if let Some(d) = &file.conflicts.default {
        policies.default = policy(d)?;
    }
    for (t, p) in &file.conflicts.tables {
        schema
            .table(t)
            .with_context(|| format!("hub.toml [conflicts.tables] names table `{t}`"))?;
        policies.tables.insert(t.clone(), policy(p)?);
    }
    let replica = HubReplica::open(
        store,
        env,
        apps,
        vec![profile],
        verifier.clone(),
        i64::try_from(unix_ms()).unwrap_or(i64::MAX),
    )
    .context("cannot open the hub replica")?
    .with_signing_key(key);
    Ok(OpenHub {
        file,
        replica,
        identity,
        verifier,
        bootstraps,
        policies,
    })
}

/// Ties the hub's store to its `hub_id` and token-signing key: recorded at the first open,
/// compared at every later one, so a store, `hub.toml` or key copied in from another hub is
/// refused rather than served under this hub's id (its devices' tokens would all fail).
fn check_store_owner(store: &Store, hub_id: Uuid, signing_key: [u8; 32]) -> Result<()> {
    const SPACE: &str = "hubdir";
    const KEY: &[u8] = b"owner";
    let mut owner = hub_id.as_bytes().to_vec();
    owner.extend_from_slice(&signing_key);
    match store.aux_get(SPACE, KEY)? {
        None => store.aux_put(SPACE, KEY, &owner, Durability::Immediate)?,
        Some(stored) if stored == owner => {}
        Some(stored) => {
            let other = stored
                .get(..16)
                .and_then(|b| Uuid::from_slice(b).ok())
                .map_or_else(|| "?".to_string(), |u| u.to_string());
            bail!(
                "it belongs to hub {other} (or with another signing key); hub.toml says {hub_id}"
            );
        }
    }
    Ok(())
}

/// Values `hub.toml` may parse but the hub cannot run with.
fn check_hub_file(file: &HubFile) -> Result<()> {
    if let Some(s) = file.limits.idle_timeout_secs {
        if s < MIN_IDLE_TIMEOUT_SECS {
            bail!(
                "[limits] idle_timeout_secs = {s}: at least {MIN_IDLE_TIMEOUT_SECS} (devices ping every min(25 s, idle_timeout_secs / 3))"
            );
        }
    }
    if let Some(a) = &file.public_address {
        check_address(a).context("public_address")?;
    }
    if let Some(u) = &file.upstream {
        u.validate().map_err(|e| anyhow!("[upstream] {e}"))?;
    }
    Ok(())
}

/// The shortest session idle timeout `hub.toml` may set (devices ping every third of it, at
/// most every 25 s).
const MIN_IDLE_TIMEOUT_SECS: u64 = 20;

/// An address devices can dial: `HOST:PORT`.
fn check_address(address: &str) -> Result<()> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        bail!("`{address}` is not HOST:PORT");
    }
    Ok(())
}

/// The runtime state for serving an opened hub.
pub fn runtime_of(hub: OpenHub) -> (Arc<HubRuntime>, HubIdentity, HubFile) {
    let mut config = HubConfig::new(hub.file.hub_id);
    config.conflicts = hub.policies;
    if let Some(s) = hub.file.limits.idle_timeout_secs {
        config.idle_timeout = Millis::from_secs(s);
    }
    let mut limits = ConnectionLimits::hub();
    if let Some(n) = hub.file.limits.max_connections {
        limits.max_connections = n;
    }
    if let Some(n) = hub.file.limits.max_pending_handshakes {
        limits.max_pending_handshakes = n;
    }
    let store = hub.replica.store().clone();
    let runtime = Arc::new(HubRuntime {
        replica: Arc::new(Mutex::new(hub.replica)),
        store,
        config,
        verifier: hub.verifier,
        bootstraps: hub.bootstraps,
        bus: Arc::new(ChangeBus::default()),
        metrics: Arc::new(Metrics::default()),
        limits,
        upstream: std::sync::OnceLock::new(),
        sessions: Default::default(),
        storage_turn: Default::default(),
    });
    (runtime, hub.identity, hub.file)
}

/// Starts the metrics responder for a running hub.
pub async fn start_metrics(hub: &RunningHub, addr: SocketAddr) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let local = listener.local_addr().context("metrics address")?;
    let endpoint = hub.endpoint.clone();
    let runtime = hub.runtime.clone();
    let view = Arc::new(RunningHubView {
        render: Box::new(move || render_metrics(&endpoint, &runtime)),
    });
    tokio::spawn(serve_metrics(listener, view));
    Ok(local)
}

fn serve(data: &Path, listen: Option<SocketAddr>, metrics: Option<SocketAddr>) -> Result<()> {
    let hub = open_hub(data)?;
    let (runtime, identity, file) = runtime_of(hub);
    let listen = match listen {
        Some(l) => l,
        None => file
            .listen
            .parse()
            .with_context(|| format!("hub.toml listen `{}` is not an address", file.listen))?,
    };
    let metrics = match metrics {
        Some(m) => Some(m),
        None => file
            .metrics
            .as_deref()
            .map(|m| {
                m.parse()
                    .with_context(|| format!("hub.toml metrics `{m}` is not an address"))
            })
            .transpose()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let running = start_hub(runtime, &identity, listen)?;
        // Before "listening": a script that waits for that line may enroll at once. Without
        // the socket the operator's commands wait for the hub to stop: not fatal.
        let admin = match hub_admin::start(data, running.runtime.clone(), identity.pin()) {
            Ok(task) => Some(task),
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "no admin socket (a Unix socket path is at most 107 bytes: is the data directory's path longer than ~95?): `hub enroll`, `revoke`, `devices` and `put` need the hub stopped"
                );
                None
            }
        };
        println!("hub {} listening on {} (QUIC)", file.hub_id, running.addr);
        if let Some(m) = metrics {
            let local = start_metrics(&running, m).await?;
            println!("metrics on http://{local}/metrics and /healthz");
        }
        let bridge = match &file.upstream {
            Some(config) => {
                let task = start_bridge(&running.runtime, config.clone())?;
                println!("relaying to Dataverse at {}", config.url);
                Some(task)
            }
            None => None,
        };
        use std::io::Write;
        let _ = std::io::stdout().flush();
        wait_for_signal().await?;
        if let Some(task) = bridge {
            // The bridge's state is durable per step: stopping it mid-round loses nothing.
            task.abort();
        }
        if let Some(task) = admin {
            task.abort();
            let _ = std::fs::remove_file(hub_admin::socket_path(data));
        }
        running.shut_down().await?;
        println!("hub stopped");
        Ok(())
    })
}

/// Starts the upstream bridge as a background task of a running hub: pulled rows wake the
/// device sessions through the change bus, and device writes wake the bridge.
pub fn start_bridge(
    runtime: &Arc<HubRuntime>,
    config: UpstreamConfig,
) -> Result<tokio::task::JoinHandle<()>> {
    let bus = runtime.bus.clone();
    let (me, wake) = bus.register_listener();
    let on_change = Box::new(move |changes: &FeedChanges| bus.publish_except(changes, Some(me)));
    let bridge = Bridge::new(config, runtime.replica.clone(), on_change)
        .context("cannot start the upstream bridge")?;
    let _ = runtime.upstream.set(bridge.stats.clone());
    Ok(tokio::spawn(Arc::new(bridge).run(wake)))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}

fn enroll(data: &Path, user: &str, app: &str, out: &Path, address: Option<&str>) -> Result<()> {
    let address = match address {
        Some(a) => a.to_string(),
        None => read_hub_file(data)?
            .public_address
            .ok_or_else(|| anyhow!("no --address and no public_address in hub.toml"))?,
    };
    check_address(&address).context("--address")?;
    // The credential's file must be writable before a token is issued for it; a file already
    // there (an earlier credential) is not emptied by an enrollment that then fails.
    let existed = out.exists();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("cannot write the credential {}", out.display()))?;
    let request = AdminRequest::Enroll {
        user: user.to_string(),
        app: app.to_string(),
        address: address.clone(),
    };
    let reply = administer(data, &request).inspect_err(|_| {
        if !existed {
            let _ = std::fs::remove_file(out);
        }
    })?;
    let AdminReply::Enrolled {
        device,
        token_id,
        credential,
    } = reply
    else {
        bail!("the hub answered an enrollment with something else");
    };
    Credential::from_toml(&credential)
        .context("the hub's credential does not parse")?
        .save(out)
        .with_context(|| format!("cannot write the credential {}", out.display()))?;
    println!(
        "enrolled device {device} for {user} in app `{app}`: token {token_id}, hub {address}, credential {}",
        out.display()
    );
    Ok(())
}

fn revoke(data: &Path, target: RevokeTarget) -> Result<()> {
    let AdminReply::Revoked { tokens } = administer(data, &AdminRequest::Revoke(target))? else {
        bail!("the hub answered a revocation with something else");
    };
    for token in tokens {
        println!("revoked token {token}");
    }
    Ok(())
}

fn devices(data: &Path, json: bool) -> Result<()> {
    let AdminReply::Devices { tokens } = administer(data, &AdminRequest::Devices)? else {
        bail!("the hub answered a listing with something else");
    };
    let unknown = || "?".to_string();
    for t in tokens {
        let status = if t.revoked { "revoked" } else { "active" };
        let issued = t
            .issued_at_ms
            .and_then(|ms| i64::try_from(ms).ok())
            .map(fieldsync_store::format_datetime);
        if json {
            let line = serde_json::json!({
                "token": t.token_id.to_string(),
                "device": t.device.map(|d| d.to_string()),
                "user": t.user,
                "user_id": t.user_id,
                "app": t.app,
                "issued": issued,
                "status": status,
            });
            println!("{line}");
        } else {
            println!(
                "token {}  device {}  user {}  app `{}`  issued {}  {status}",
                t.token_id,
                t.device.map_or_else(unknown, |d| d.to_string()),
                t.user.or(t.user_id).unwrap_or_else(unknown),
                t.app.unwrap_or_else(unknown),
                issued.unwrap_or_else(unknown),
            );
        }
    }
    Ok(())
}

/// Runs an operator's command: through the running hub's admin socket if a hub serves
/// `data`, else on the store opened here. A reply of failure is an error.
fn administer(data: &Path, request: &AdminRequest) -> Result<AdminReply> {
    let reply = match hub_admin::send(data, request)? {
        Some(reply) => reply,
        None => {
            let mut hub = open_hub(data)?;
            let reply = hub_admin::execute(&mut hub.replica, hub.identity.pin(), request)?;
            hub.replica.store().sync().context("cannot flush")?;
            reply
        }
    };
    if let AdminReply::Failed { message } = reply {
        return Err(anyhow!(message));
    }
    Ok(reply)
}

/// Parses `COL=VALUE` for the hub, resolving `user:NAME` and `team:NAME` owners.
pub fn hub_values(
    replica: &HubReplica,
    table: &str,
    args: &[String],
) -> Result<Vec<(String, Value)>> {
    let schema = replica.store().schema();
    let t = schema.table(table)?;
    args.iter()
        .map(|arg| {
            let (col, text) = arg
                .split_once('=')
                .ok_or_else(|| anyhow!("`{arg}` is not of the form COL=VALUE"))?;
            let column = t
                .column(col)
                .ok_or_else(|| anyhow!("unknown column `{col}` in table `{table}`"))?;
            let env = replica.environment();
            let text = match text.split_once(':') {
                Some(("user", name)) if Uuid::parse_str(name).is_err() => format!(
                    "user:{}",
                    env.user_by_name(name)
                        .ok_or_else(|| anyhow!("unknown user `{name}`"))?
                        .id
                ),
                Some(("team", name)) if Uuid::parse_str(name).is_err() => format!(
                    "team:{}",
                    env.team_by_name(name)
                        .ok_or_else(|| anyhow!("unknown team `{name}`"))?
                        .id
                ),
                _ => text.to_string(),
            };
            let value = Value::parse(column.ty, &text).map_err(|e| e.in_column(t, col))?;
            Ok((col.to_string(), value))
        })
        .collect()
}

fn put(data: &Path, table: &str, id: Option<RowId>, args: &[String]) -> Result<()> {
    let request = AdminRequest::Put {
        table: table.to_string(),
        id,
        values: args.to_vec(),
    };
    let AdminReply::Written { id } = administer(data, &request)? else {
        bail!("the hub answered a write with something else");
    };
    println!("{id}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldsync_replication::credential::{TokenRegistry, TokenStatus};
    use fieldsync_replication::replica::StoreTokenRegistry;

    /// A hub initialised from the field-service example in a fresh temporary directory.
    fn example_hub() -> PathBuf {
        let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/field-service");
        let dir = std::env::temp_dir().join(format!("fieldsync-hubcmd-{}", Uuid::new_v4()));
        init_hub(
            &dir,
            &ex.join("environment.toml"),
            &ex.join("apps.toml"),
            Some(&ex.join("schema.toml")),
            Some(&ex.join("profile.toml")),
        )
        .unwrap();
        dir
    }

    fn open_err(dir: &Path) -> String {
        format!(
            "{:#}",
            open_hub(dir).err().expect("the hub should not open")
        )
    }

    #[test]
    fn tokens_are_listed_and_revoked_by_token_device_or_user() {
        let dir = example_hub();
        let mut hub = open_hub(&dir).unwrap();
        let pin = hub.identity.pin();
        let mut run = |request: AdminRequest| hub_admin::execute(&mut hub.replica, pin, &request);
        let enroll = |user: &str| AdminRequest::Enroll {
            user: user.into(),
            app: "Field Service Mobile".into(),
            address: "127.0.0.1:4433".into(),
        };
        let mut issued = Vec::new();
        for user in ["ana@contoso.com", "ana@contoso.com", "ben@contoso.com"] {
            let Ok(AdminReply::Enrolled {
                device, token_id, ..
            }) = run(enroll(user))
            else {
                panic!("enrolling {user} failed");
            };
            issued.push((device, token_id));
        }
        let listed = |reply: Result<AdminReply>| match reply {
            Ok(AdminReply::Devices { tokens }) => tokens,
            other => panic!("not a listing: {other:?}"),
        };
        let tokens = listed(run(AdminRequest::Devices));
        assert_eq!(tokens.len(), 3);
        for (device, token_id) in &issued {
            let t = tokens.iter().find(|t| t.token_id == *token_id).unwrap();
            assert_eq!(t.device, Some(*device));
            assert!(!t.revoked);
            assert!(t.issued_at_ms.is_some());
        }
        assert_eq!(
            tokens
                .iter()
                .filter(|t| t.user.as_deref() == Some("ana@contoso.com"))
                .count(),
            2
        );
        // Someone who left: every token of the user, and nobody else's.
        let Ok(AdminReply::Revoked { tokens: mut gone }) = run(AdminRequest::Revoke(
            RevokeTarget::User("ana@contoso.com".into()),
        )) else {
            panic!("revoking ana's tokens failed");
        };
        gone.sort();
        let mut anas = vec![issued[0].1, issued[1].1];
        anas.sort();
        assert_eq!(gone, anas);
        // Nothing left to revoke for ana; an unknown user or device is an error too.
        for target in [
            RevokeTarget::User("ana@contoso.com".into()),
            RevokeTarget::User("nobody@contoso.com".into()),
            RevokeTarget::Device(Uuid::new_v4()),
            RevokeTarget::Token(Uuid::new_v4()),
        ] {
            assert!(
                run(AdminRequest::Revoke(target.clone())).is_err(),
                "{target}"
            );
        }
        // A lost phone: its device's token.
        assert!(matches!(
            run(AdminRequest::Revoke(RevokeTarget::Device(issued[2].0))),
            Ok(AdminReply::Revoked { tokens }) if tokens == [issued[2].1]
        ));
        let tokens = listed(run(AdminRequest::Devices));
        assert!(tokens.iter().all(|t| t.revoked && t.device.is_some()));
        // The registry the transport checks agrees.
        let registry = StoreTokenRegistry(hub.replica.store().clone());
        for (_, token_id) in &issued {
            assert_eq!(registry.status(token_id), TokenStatus::Revoked);
        }
        drop(hub);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hub_toml_mistakes_and_an_edited_schema_are_refused_at_open() {
        let dir = example_hub();
        let toml_path = dir.join("hub.toml");
        let good = std::fs::read_to_string(&toml_path).unwrap();
        assert!(open_hub(&dir).is_ok());
        for (bad, expect) in [
            (
                good.replace("max_connections", "max_conections"),
                "max_conections",
            ),
            (good.replace("[limits]", "[limit]"), "limit"),
            (
                good.replace("idle_timeout_secs = 90", "idle_timeout_secs = 0"),
                "idle_timeout_secs",
            ),
            (
                good.replace("\"127.0.0.1:4433\"", "\"not an address\""),
                "HOST:PORT",
            ),
            (
                format!("{good}\n[upstream]\nurl = \"http://127.0.0.1:1\"\nbackoff_ms = 0\n"),
                "backoff_ms",
            ),
            (
                format!("{good}\n[upstream]\nurl = \"http://127.0.0.1:1\"\npage_sise = 10\n"),
                "page_sise",
            ),
        ] {
            std::fs::write(&toml_path, &bad).unwrap();
            let err = open_err(&dir);
            assert!(err.contains(expect), "{expect}: {err}");
        }
        std::fs::write(&toml_path, &good).unwrap();
        let schema_path = dir.join("schema.toml");
        let schema = std::fs::read_to_string(&schema_path).unwrap();
        std::fs::write(
            &schema_path,
            format!("{schema}\n[tables.extra]\noffline = true\n"),
        )
        .unwrap();
        assert!(open_err(&dir).contains("cannot be changed"));
        std::fs::write(&schema_path, schema).unwrap();
        // A mistyped token id revokes nothing and says so.
        assert!(revoke(&dir, RevokeTarget::Token(Uuid::new_v4())).is_err());
        // Enrolling refuses an address devices cannot dial, before issuing anything.
        let out = dir.join("c.cred");
        let enrolled = enroll(
            &dir,
            "ana@contoso.com",
            "Field Service Mobile",
            &out,
            Some("not an address"),
        );
        let err = format!("{:#}", enrolled.expect_err("an unusable address"));
        assert!(err.contains("HOST:PORT"), "{err}");
        assert!(!out.exists());
        // A failed enrollment leaves no file behind, and an earlier credential untouched.
        for earlier in [None, Some("an earlier credential")] {
            if let Some(text) = earlier {
                std::fs::write(&out, text).unwrap();
            }
            let failed = enroll(
                &dir,
                "nobody@contoso.com",
                "Field Service Mobile",
                &out,
                Some("127.0.0.1:4433"),
            );
            assert!(failed.is_err());
            assert_eq!(std::fs::read_to_string(&out).ok().as_deref(), earlier);
        }
        // Another hub's signing key, or its hub.toml, is not served with this store.
        let other = example_hub();
        let key = dir.join("signing.key");
        let own_key = std::fs::read(&key).unwrap();
        std::fs::copy(other.join("signing.key"), &key).unwrap();
        assert!(open_err(&dir).contains("was not made with this hub.toml"));
        std::fs::write(&key, own_key).unwrap();
        assert!(open_hub(&dir).is_ok());
        std::fs::copy(other.join("hub.toml"), &toml_path).unwrap();
        assert!(open_err(&dir).contains("was not made with this hub.toml"));
        let _ = std::fs::remove_dir_all(&other);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
