//! `fieldsync demo --upstream-emulator`: the demo's hub relays to an in-process Dataverse Web API
//! emulator whose users, teams and business units are the example environment's (same ids), so
//! owners written on devices bind in Dataverse and rows owned there route back to devices.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use fieldsync_node::upstream::{AuthConfig, Bridge, SecretSource, UpstreamConfig};
use fieldsync_replication::replica::FeedChanges;
use fieldsync_replication::security::Depth;
use fieldsync_replication::{Environment, Privilege};
use serde_json::{json, Value as J};

use crate::emulator::{EmulatorConfig, API_PREFIX};
use crate::sync::hub::HubRuntime;

/// The emulator administrator's token (the bridge authenticates as it).
const ADMIN_TOKEN: &str = "admin-token";

/// A running emulator and the hub's bridge to it.
pub struct Upstream {
    pub bridge: Bridge,
    pub api: String,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

/// The emulator's security directory (JSON) for an environment: its units, users (token
/// `<name before @>-token`), teams and roles (read depth from the work order table).
fn directory_of(env: &Environment, schema_root_table: &str) -> J {
    let depth = |d: Depth| match d {
        Depth::None => "none",
        Depth::User => "user",
        Depth::BusinessUnit => "business_unit",
        Depth::ParentChild => "parent_child",
        Depth::Organization => "organization",
    };
    let mut units: Vec<_> = env.business_units().collect();
    units.sort_by_key(|b| b.parent.is_some()); // the root first
    let root = units.first().map(|b| b.id).unwrap_or_default();
    let roles: Vec<J> = env
        .roles()
        .map(|r| {
            json!({"id": r.id, "name": r.name, "business_unit": root,
                   "read": depth(r.depth(schema_root_table, Privilege::Read))})
        })
        .collect();
    let admin_role = env
        .role_by_name("System Administrator")
        .map(|r| r.id)
        .unwrap_or_default();
    let mut users: Vec<J> = env
        .users()
        .map(|u| {
            let local = u.name.split('@').next().unwrap_or(&u.name);
            json!({"id": u.id, "domain_name": u.name, "full_name": u.name,
                   "business_unit": u.business_unit, "roles": u.roles,
                   "token": format!("{local}-token")})
        })
        .collect();
    users.push(
        json!({"id": uuid::Uuid::new_v4(), "domain_name": "admin@fieldsync.local",
        "full_name": "System Administrator", "business_unit": root, "roles": [admin_role],
        "token": ADMIN_TOKEN}),
    );
    json!({
        "business_units": units.iter().map(|b| json!({"id": b.id, "name": b.name, "parent": b.parent})).collect::<Vec<_>>(),
        "users": users,
        "teams": env.teams().map(|t| json!({"id": t.id, "name": t.name, "business_unit": t.business_unit,
            "members": t.members, "roles": t.roles})).collect::<Vec<_>>(),
        "roles": roles,
    })
}

/// Starts the emulator on loopback with `schema` and the environment's directory, and a
/// bridge from the hub to it.
pub async fn start(root: &Path, runtime: &Arc<HubRuntime>, schema: &str) -> Result<Upstream> {
    let env = runtime
        .replica
        .lock()
        .map_err(|_| anyhow!("hub lock poisoned"))?
        .environment()
        .clone();
    let mut config = EmulatorConfig::new(root.join("dataverse"));
    config.schema_toml = Some(schema.to_string());
    config.directory_json = Some(directory_of(&env, "msdyn_workorder").to_string());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen for the emulator")?;
    let addr = listener.local_addr().context("emulator address")?;
    let server = tokio::spawn(async move {
        if let Err(e) = crate::emulator::serve(config, listener).await {
            tracing::warn!(error = %e, "the demo's emulator stopped");
        }
    });
    let token_file = root.join("dataverse-token");
    std::fs::write(&token_file, ADMIN_TOKEN).context("cannot write the emulator token")?;
    let mut up = UpstreamConfig::new(format!("http://{addr}"));
    up.auth = AuthConfig::Bearer {
        token: SecretSource::File(token_file),
    };
    let bus = runtime.bus.clone();
    let bridge = Bridge::new(
        up,
        runtime.replica.clone(),
        Box::new(move |c: &FeedChanges| bus.publish(c)),
    )?;
    Ok(Upstream {
        bridge,
        api: format!("http://{addr}{API_PREFIX}"),
        http: reqwest::Client::new(),
        server,
    })
}

impl Upstream {
    /// An office user's request to the Web API (as curl would send it).
    pub async fn office(&self, method: reqwest::Method, path: &str, body: Option<J>) -> Result<J> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.api))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.context("the emulator did not answer")?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(anyhow!("the emulator answered {status}: {text}"));
        }
        Ok(serde_json::from_str(&text).unwrap_or(J::Null))
    }

    pub fn stop(self) {
        self.server.abort();
    }
}
