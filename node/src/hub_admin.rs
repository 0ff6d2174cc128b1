//! Operator commands (`hub enroll`, `hub revoke`, `hub devices`, `hub put`) on a hub, running
//! or not.
//!
//! A stopped hub's store is opened by the command itself. A running hub holds its store's
//! lock, so `hub serve` listens on a Unix socket in its directory, `DIR/admin.sock`, and the
//! commands send their request there: one JSON [`AdminRequest`] (the client then shuts its
//! writing half), one JSON [`AdminReply`]. Both paths run the same [`execute`], so an operator
//! gets the same result either way, and a revocation on a running hub also ends the revoked
//! device's live session at once.
//!
//! Who may send requests is decided by the file system, as for `docker.sock`: the socket is
//! made `0600` and a peer whose user id is not the socket owner's is refused, since an
//! enrollment hands out credentials.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fieldsync_replication::credential::{CertPin, Credential, Token};
use fieldsync_replication::replica::HubReplica;
use fieldsync_store::Value;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, info_span, warn, Instrument};
use uuid::Uuid;

use crate::hub_cmd::hub_values;
use crate::sync::hub::{with_replica, HubRuntime};
use crate::sync::unix_ms;

/// The socket's name in the hub's directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// The largest request, in bytes (a `put` of many columns is a few KiB).
const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// The largest reply a client reads: `hub devices` lists every token ever issued.
const MAX_REPLY_BYTES: u64 = 256 << 20;

/// How long a request may take to arrive, and its reply to be taken: a client that connects
/// and sends nothing must not hold a task for good.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request waits for the sessions' storage turn before it is refused, undone:
/// well under the client's patience, so a client never gives up on a command that then runs.
const TURN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a client waits for the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);

/// An operator's command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Issue a credential for a new device of `user` in `app`, naming the hub at `address`.
    Enroll {
        user: String,
        app: String,
        address: String,
    },
    /// Revoke tokens: their sessions are refused from now on, live ones ended.
    Revoke(RevokeTarget),
    /// List the tokens the hub issued.
    Devices,
    /// Write a row on the hub (`COL=VALUE`s as `hub put` takes them), routed to devices.
    Put {
        table: String,
        id: Option<Uuid>,
        values: Vec<String>,
    },
}

/// Which tokens a revocation is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RevokeTarget {
    /// This token (it must be one the hub issued).
    Token(Uuid),
    /// Every active token of this device.
    Device(Uuid),
    /// Every active token of this user (a name or an id): someone who left.
    User(String),
}

/// A token the hub issued, as `hub devices` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceEntry {
    pub token_id: Uuid,
    pub revoked: bool,
    /// The rest is unknown for tokens issued before the hub kept it.
    pub device: Option<Uuid>,
    pub user_id: Option<String>,
    /// The user's name, if the environment still has the user.
    pub user: Option<String>,
    pub app: Option<String>,
    pub issued_at_ms: Option<u64>,
}

/// What a command did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminReply {
    /// A device was enrolled; `credential` is the credential file's text.
    Enrolled {
        device: Uuid,
        token_id: Uuid,
        credential: String,
    },
    /// These tokens were revoked.
    Revoked { tokens: Vec<Uuid> },
    /// The tokens the hub issued.
    Devices { tokens: Vec<DeviceEntry> },
    /// The row was written.
    Written { id: Uuid },
    /// The command failed; nothing was done.
    Failed { message: String },
}

/// The path of `data`'s admin socket.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join(SOCKET_NAME)
}

/// Runs `request` on `replica`. `pin` is the hub certificate's, for credentials.
pub fn execute(
    replica: &mut HubReplica,
    pin: CertPin,
    request: &AdminRequest,
) -> Result<AdminReply> {
    match request {
        AdminRequest::Enroll { user, app, address } => {
            let device = Uuid::new_v4();
            let token = replica
                .enroll(user, app, device, unix_ms())
                .context("cannot enroll the device")?;
            let token_id = token.token().token_id;
            let credential = Credential::new(address.clone(), pin, token)
                .to_toml()
                .context("cannot write the credential")?;
            Ok(AdminReply::Enrolled {
                device,
                token_id,
                credential,
            })
        }
        AdminRequest::Revoke(target) => {
            let chosen = match target {
                RevokeTarget::Token(token) => vec![*token],
                RevokeTarget::Device(device) => active_tokens(replica, |t| t.device_id == *device)?,
                RevokeTarget::User(user) => {
                    // An id is taken as is: the user may have left the environment already.
                    let id = match Uuid::parse_str(user) {
                        Ok(id) => id,
                        Err(_) => {
                            replica
                                .environment()
                                .user_by_name(user)
                                .ok_or_else(|| anyhow!("unknown user `{user}`"))?
                                .id
                        }
                    }
                    .to_string();
                    active_tokens(replica, |t| t.user_id == id)?
                }
            };
            if chosen.is_empty() {
                bail!(
                    "no active token of {target}; nothing was revoked (`hub devices` lists them)"
                );
            }
            let issued = replica
                .revoke_all(&chosen)
                .context("cannot revoke; nothing was revoked")?;
            if issued.contains(&false) {
                // Most likely a mistyped id: the device meant to be cut off is still enrolled.
                bail!("{target} was not issued by this hub; nothing was revoked (check the id)");
            }
            Ok(AdminReply::Revoked { tokens: chosen })
        }
        AdminRequest::Devices => {
            let env = replica.environment();
            let tokens = replica
                .issued_tokens()
                .context("cannot read the token records")?
                .into_iter()
                .map(|t| {
                    let user = t
                        .token
                        .as_ref()
                        .and_then(|t| Uuid::parse_str(&t.user_id).ok())
                        .and_then(|id| env.user(id))
                        .map(|u| u.name.clone());
                    DeviceEntry {
                        token_id: t.token_id,
                        revoked: t.revoked,
                        device: t.token.as_ref().map(|t| t.device_id),
                        user_id: t.token.as_ref().map(|t| t.user_id.clone()),
                        user,
                        app: t.token.as_ref().map(|t| t.app.clone()),
                        issued_at_ms: t.token.as_ref().map(|t| t.issued_at_ms),
                    }
                })
                .collect();
            Ok(AdminReply::Devices { tokens })
        }
        AdminRequest::Put { table, id, values } => {
            let parsed = hub_values(replica, table, values)?;
            let id = id.unwrap_or_else(Uuid::new_v4);
            let refs: Vec<(&str, Value)> = parsed
                .iter()
                .map(|(c, v)| (c.as_str(), v.clone()))
                .collect();
            replica
                .local_write(table, id, &refs)
                .with_context(|| format!("cannot write {table} {id}"))?;
            Ok(AdminReply::Written { id })
        }
    }
}

/// The ids of the tokens not revoked whose details `matches`.
fn active_tokens(replica: &HubReplica, matches: impl Fn(&Token) -> bool) -> Result<Vec<Uuid>> {
    Ok(replica
        .issued_tokens()
        .context("cannot read the token records")?
        .into_iter()
        .filter(|t| !t.revoked && t.token.as_ref().is_some_and(&matches))
        .map(|t| t.token_id)
        .collect())
}

impl std::fmt::Display for RevokeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevokeTarget::Token(t) => write!(f, "token {t}"),
            RevokeTarget::Device(d) => write!(f, "device {d}"),
            RevokeTarget::User(u) => write!(f, "user `{u}`"),
        }
    }
}

/// Sends `request` to the hub serving `data`, if one is: `None` when no hub listens there
/// (no socket, or one a stopped hub left behind), so the caller opens the store itself.
pub fn send(data: &Path, request: &AdminRequest) -> Result<Option<AdminReply>> {
    let path = socket_path(data);
    let mut conn = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(c) => c,
        // Absent, left by a hub that stopped, or a path too long for a socket (which no hub
        // could have bound either).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::InvalidInput
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot reach the running hub's admin socket {}",
                    path.display()
                )
            })
        }
    };
    let io = |e| anyhow!("the running hub's admin socket {}: {e}", path.display());
    conn.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    let body = serde_json::to_vec(request).context("cannot encode the request")?;
    conn.write_all(&body).map_err(io)?;
    conn.shutdown(std::net::Shutdown::Write).map_err(io)?;
    let mut reply = Vec::new();
    conn.take(MAX_REPLY_BYTES)
        .read_to_end(&mut reply)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow!(
                "the running hub did not answer within {CLIENT_TIMEOUT:?}; it may still have done it (`hub devices` lists tokens)"
            ),
            _ => io(e),
        })?;
    if reply.is_empty() {
        bail!(
            "the running hub closed its admin socket {} without answering (is this user the hub's?)",
            path.display()
        );
    }
    let reply: AdminReply =
        serde_json::from_slice(&reply).context("the running hub's answer does not decode")?;
    Ok(Some(reply))
}

/// Listens on `data`'s admin socket for a running hub. A socket file left by a hub that
/// stopped is replaced: this process holds the store's lock, so no other hub serves `data`.
pub fn start(
    data: &Path,
    runtime: Arc<HubRuntime>,
    pin: CertPin,
) -> Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(data);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    let owner = std::fs::metadata(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .uid();
    Ok(tokio::spawn(async move {
        loop {
            let conn = match listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let runtime = runtime.clone();
            tokio::spawn(
                async move {
                    if let Err(e) = answer(conn, owner, &runtime, pin).await {
                        warn!(error = %format!("{e:#}"), "admin request failed");
                    }
                }
                .instrument(info_span!("admin")),
            );
        }
    }))
}

/// Reads one request from `conn`, runs it, writes the reply.
async fn answer(
    mut conn: tokio::net::UnixStream,
    owner: u32,
    runtime: &HubRuntime,
    pin: CertPin,
) -> Result<()> {
    let peer = conn
        .peer_cred()
        .context("cannot read the peer's credentials")?;
    if peer.uid() != owner {
        // The socket is 0600 already; this holds even if its mode is changed.
        bail!("refused a request from user id {}", peer.uid());
    }
    let mut body = Vec::new();
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut conn)
            .take(MAX_REQUEST_BYTES + 1)
            .read_to_end(&mut body),
    )
    .await
    .map_err(|_| anyhow!("no request within {REQUEST_TIMEOUT:?}"))?
    .context("cannot read the request")?;
    let reply = match decode(&body) {
        Ok(request) => run(runtime, pin, &request).await,
        Err(e) => AdminReply::Failed {
            message: format!("{e:#}"),
        },
    };
    let out = serde_json::to_vec(&reply).context("cannot encode the reply")?;
    tokio::time::timeout(REQUEST_TIMEOUT, conn.write_all(&out))
        .await
        .map_err(|_| anyhow!("the reply was not read within {REQUEST_TIMEOUT:?}"))?
        .context("cannot write the reply")?;
    let _ = conn.shutdown().await;
    Ok(())
}

fn decode(body: &[u8]) -> Result<AdminRequest> {
    if body.len() as u64 > MAX_REQUEST_BYTES {
        bail!("the request is over {MAX_REQUEST_BYTES} bytes");
    }
    serde_json::from_slice(body).context("the request is not an admin request")
}

/// Runs `request` in the sessions' storage turn, then tells the sessions what changed.
async fn run(runtime: &HubRuntime, pin: CertPin, request: &AdminRequest) -> AdminReply {
    let Ok(turn) = tokio::time::timeout(TURN_TIMEOUT, runtime.storage_turn.lock()).await else {
        return AdminReply::Failed {
            message: format!(
                "the hub is busy (no turn at its store within {TURN_TIMEOUT:?}); nothing was done, try again"
            ),
        };
    };
    let done = with_replica(&runtime.replica, |r| {
        execute(r, pin, request).map(|reply| (reply, r.take_changes()))
    });
    let reply = match done {
        Ok((reply, changes)) => {
            runtime.bus.publish(&changes);
            match &reply {
                // Before the turn is handed on: a revoked session gets no further turn.
                AdminReply::Revoked { tokens } => {
                    for token in tokens {
                        let ended = runtime.sessions.end_revoked(*token);
                        info!(%token, live_sessions_ended = ended, "token revoked");
                    }
                }
                AdminReply::Enrolled {
                    device, token_id, ..
                } => info!(%device, token = %token_id, "device enrolled"),
                AdminReply::Written { id } => info!(%id, "row written by the operator"),
                AdminReply::Devices { .. } | AdminReply::Failed { .. } => {}
            }
            reply
        }
        Err(e) => AdminReply::Failed {
            message: format!("{e:#}"),
        },
    };
    drop(turn);
    reply
}
