//! Bearer tokens for the Web API: none, a static token, or Entra ID client credentials
//! (refreshed a few minutes before they expire). Secrets are read at use and never logged.

use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{debug, info_span, Instrument};

use super::config::{AuthConfig, SecretSource};
use super::UpstreamError;

/// Refresh this long before the token's stated expiry.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Reads a secret from its source (the value is never logged; errors name only the source).
pub fn read_secret(source: &SecretSource) -> Result<String, UpstreamError> {
    match source {
        SecretSource::Env(name) => std::env::var(name)
            .map_err(|_| UpstreamError::Auth(format!("environment variable {name} is not set"))),
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| UpstreamError::Auth(format!("cannot read {}: {e}", path.display()))),
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

/// Hands out the current bearer token.
pub struct TokenSource {
    config: AuthConfig,
    resource: String,
    cached: Mutex<Option<Cached>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token itself stays out of logs.
        f.debug_struct("TokenSource")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// `resource` is the environment URL (the default scope is `<resource>/.default`).
    pub fn new(config: AuthConfig, resource: &str) -> TokenSource {
        TokenSource {
            config,
            resource: resource.trim_end_matches('/').to_string(),
            cached: Mutex::new(None),
        }
    }

    /// Drops a cached token (after a `401`).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// The `Authorization` header value, if any.
    pub async fn header(&self, http: &reqwest::Client) -> Result<Option<String>, UpstreamError> {
        match &self.config {
            AuthConfig::None {} => Ok(None),
            AuthConfig::Bearer { token } => Ok(Some(format!("Bearer {}", read_secret(token)?))),
            AuthConfig::Entra {
                tenant_id,
                client_id,
                secret,
                token_endpoint,
                scope,
            } => {
                let mut cached = self.cached.lock().await;
                if let Some(c) = cached.as_ref() {
                    if Instant::now() < c.refresh_at {
                        return Ok(Some(format!("Bearer {}", c.token)));
                    }
                }
                let endpoint = token_endpoint.clone().unwrap_or_else(|| {
                    format!("https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token")
                });
                let scope = scope
                    .clone()
                    .unwrap_or_else(|| format!("{}/.default", self.resource));
                let secret = read_secret(secret)?;
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.as_str()),
                    ("scope", scope.as_str()),
                ];
                let resp = http
                    .post(&endpoint)
                    .form(&form)
                    .send()
                    .instrument(info_span!("entra_token", %endpoint, client_id = %client_id))
                    .await
                    .map_err(|e| UpstreamError::Auth(format!("token endpoint {endpoint}: {e}")))?;
                let status = resp.status();
                if !status.is_success() {
                    // The error body names the problem (AADSTS codes); it holds no secret.
                    let body = resp.text().await.unwrap_or_default();
                    return Err(UpstreamError::Auth(format!(
                        "token endpoint {endpoint} answered {status}: {body}"
                    )));
                }
                let parsed: TokenResponse = resp.json().await.map_err(|e| {
                    UpstreamError::Auth(format!("token endpoint {endpoint}: bad reply: {e}"))
                })?;
                let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600));
                debug!(lifetime_secs = lifetime.as_secs(), "got an Entra ID token");
                let header = format!("Bearer {}", parsed.access_token);
                *cached = Some(Cached {
                    token: parsed.access_token,
                    refresh_at: Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN),
                });
                Ok(Some(header))
            }
        }
    }
}
