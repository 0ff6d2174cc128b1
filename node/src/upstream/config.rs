//! The `[upstream]` section of `hub.toml`: where Dataverse is and how the hub authenticates.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The upstream Dataverse environment (or the emulator) the hub relays to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The environment URL, e.g. `https://contoso.crm4.dynamics.com` or
    /// `http://127.0.0.1:8080` (the Web API lives under `/api/data/v9.2/`).
    pub url: String,
    /// How the hub authenticates.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Rows per page when pulling (`Prefer: odata.maxpagesize`, at most 5000).
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Writes per `$batch` (at most 1000).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Seconds between pull rounds when nothing is pending.
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
    /// First retry delay after a failed round, in milliseconds (doubles up to `backoff_max_ms`).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` the bridge waits in place before giving the round up.
    #[serde(default = "default_retry_after_max_secs")]
    pub retry_after_max_secs: u64,
    /// Files larger than this are uploaded in chunks (and downloaded in ranges of this size);
    /// Dataverse's chunk size is 4 MiB.
    #[serde(default = "default_file_chunk_bytes")]
    pub file_chunk_bytes: u64,
    /// The longest response body the bridge reads into memory: a page of `page_size` rows or a
    /// `$batch` reply (a file range is bounded by `file_chunk_bytes` and goes to disk). A
    /// longer one fails the request with a clear error instead of exhausting memory.
    #[serde(default = "default_response_bytes_max")]
    pub response_bytes_max: u64,
    /// First wait before a file download that failed is tried again, in milliseconds (doubles
    /// with each failure up to `file_retry_max_ms`); the file's row is applied meanwhile.
    #[serde(default = "default_file_retry_ms")]
    pub file_retry_ms: u64,
    /// Longest wait between tries of a failing file download, in milliseconds: it is tried
    /// again at least this often for as long as it fails, never dropped.
    #[serde(default = "default_file_retry_max_ms")]
    pub file_retry_max_ms: u64,
}

fn default_file_retry_ms() -> u64 {
    30_000
}
fn default_file_retry_max_ms() -> u64 {
    3_600_000
}

/// 64 MiB: a page of 1000 rows of 64 KiB each, with room.
fn default_response_bytes_max() -> u64 {
    64 * 1024 * 1024
}

fn default_file_chunk_bytes() -> u64 {
    4 * 1024 * 1024
}

fn default_page_size() -> usize {
    1000
}
fn default_batch_size() -> usize {
    200
}
fn default_poll_secs() -> u64 {
    10
}
fn default_backoff_ms() -> u64 {
    1000
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_retry_after_max_secs() -> u64 {
    300
}

impl UpstreamConfig {
    /// Defaults for `url` with no authentication (the emulator accepts a static token too).
    pub fn new(url: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            auth: AuthConfig::None {},
            page_size: default_page_size(),
            batch_size: default_batch_size(),
            poll_secs: default_poll_secs(),
            backoff_ms: default_backoff_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            retry_after_max_secs: default_retry_after_max_secs(),
            file_chunk_bytes: default_file_chunk_bytes(),
            response_bytes_max: default_response_bytes_max(),
            file_retry_ms: default_file_retry_ms(),
            file_retry_max_ms: default_file_retry_max_ms(),
        }
    }

    /// The Web API base, ending in `/api/data/v9.2/`.
    pub fn api_base(&self) -> String {
        let url = self.url.trim_end_matches('/');
        if url.ends_with("/api/data/v9.2") {
            format!("{url}/")
        } else {
            format!("{url}/api/data/v9.2/")
        }
    }

    /// Refuses values the bridge cannot run with (a zero delay would hammer Dataverse in a
    /// tight loop; Dataverse takes at most 5,000 rows a page and 1,000 writes a batch).
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(bool, &str); 9] = [
            (self.poll_secs >= 1, "poll_secs must be at least 1"),
            (self.backoff_ms >= 1, "backoff_ms must be at least 1"),
            (
                self.backoff_max_ms >= self.backoff_ms,
                "backoff_max_ms must be at least backoff_ms",
            ),
            (
                (1..=5000).contains(&self.page_size),
                "page_size must be 1 to 5000",
            ),
            (
                (1..=1000).contains(&self.batch_size),
                "batch_size must be 1 to 1000",
            ),
            (
                (1..=128 << 20).contains(&self.file_chunk_bytes),
                "file_chunk_bytes must be 1 to 128 MiB",
            ),
            (
                self.response_bytes_max >= 1 << 20,
                "response_bytes_max must be at least 1 MiB",
            ),
            (self.file_retry_ms >= 1, "file_retry_ms must be at least 1"),
            (
                self.file_retry_max_ms >= self.file_retry_ms,
                "file_retry_max_ms must be at least file_retry_ms",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err((*why).to_string()),
            None => Ok(()),
        }
    }

    /// How long to wait before trying a file download again after its `attempts`-th failure.
    pub fn file_retry_delay(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(32);
        let ms = self
            .file_retry_ms
            .saturating_mul(1u64 << doublings)
            .min(self.file_retry_max_ms);
        Duration::from_millis(ms)
    }

    /// The delay between pull rounds.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.poll_secs)
    }
}

/// Where a secret comes from: never stored in `hub.toml` itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// An environment variable's name.
    Env(String),
    /// A file whose content (trimmed) is the secret.
    File(PathBuf),
}

/// How the hub gets its bearer token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// No `Authorization` header (an emulator without tokens). Written `kind = "none"`; a
    /// struct variant so that stray keys beside it are refused too (serde skips them for a
    /// unit variant).
    None {},
    /// A fixed bearer token (the emulator's users have known tokens).
    Bearer {
        /// Where the token is.
        token: SecretSource,
    },
    /// Microsoft Entra ID client credentials (an app registration with a client secret).
    Entra {
        /// The directory (tenant) id.
        tenant_id: String,
        /// The application (client) id.
        client_id: String,
        /// Where the client secret is.
        secret: SecretSource,
        /// The token endpoint (default
        /// `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`).
        #[serde(default)]
        token_endpoint: Option<String>,
        /// The scope (default `<url>/.default`).
        #[serde(default)]
        scope: Option<String>,
    },
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig::None {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct HubToml {
        upstream: UpstreamConfig,
    }

    /// A misspelt key under `[upstream.auth]` is refused, not silently replaced by a default
    /// (a `token_endpoint` typo would send the secret to Microsoft's endpoint).
    #[test]
    fn unknown_auth_keys_are_refused() {
        let text = r#"
[upstream]
url = "https://contoso.crm4.dynamics.com"
[upstream.auth]
kind = "entra"
tenant_id = "t"
client_id = "c"
secret = { env = "FIELDSYNC_DATAVERSE_SECRET" }
token_endpiont = "https://login.example/token"
"#;
        let err = toml::from_str::<HubToml>(text).unwrap_err().to_string();
        assert!(err.contains("token_endpiont"), "{err}");
        let good = text.replace("token_endpiont", "token_endpoint");
        let parsed: HubToml = toml::from_str(&good).unwrap();
        assert!(matches!(
            parsed.upstream.auth,
            AuthConfig::Entra {
                token_endpoint: Some(_),
                ..
            }
        ));
        let bearer = "[upstream]\nurl = \"http://127.0.0.1:8080\"\n[upstream.auth]\nkind = \"bearer\"\ntoken = { env = \"DV_TOKEN\" }\n";
        let typo = format!("{bearer}tokn = 1\n");
        let err = toml::from_str::<HubToml>(&typo).unwrap_err().to_string();
        assert!(err.contains("tokn"), "{err}");
        let parsed: HubToml = toml::from_str(bearer).unwrap();
        assert!(matches!(parsed.upstream.auth, AuthConfig::Bearer { .. }));
        let none =
            "[upstream]\nurl = \"http://127.0.0.1:8080\"\n[upstream.auth]\nkind = \"none\"\n";
        let parsed: HubToml = toml::from_str(none).unwrap();
        assert_eq!(parsed.upstream.auth, AuthConfig::None {});
        let typo = format!("{none}token = {{ env = \"DV_TOKEN\" }}\n");
        let err = toml::from_str::<HubToml>(&typo).unwrap_err().to_string();
        assert!(err.contains("token"), "{err}");
        // What `hub init` writes for no authentication reads back.
        let written = toml::to_string(&HubToml {
            upstream: UpstreamConfig::new("http://127.0.0.1:8080"),
        })
        .unwrap();
        assert_eq!(
            toml::from_str::<HubToml>(&written).unwrap().upstream.auth,
            AuthConfig::None {}
        );
    }

    #[test]
    fn entra_config_round_trips_through_hub_toml_without_a_secret() {
        let mut c = UpstreamConfig::new("https://contoso.crm4.dynamics.com");
        c.auth = AuthConfig::Entra {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: SecretSource::Env("FIELDSYNC_DATAVERSE_SECRET".into()),
            token_endpoint: None,
            scope: None,
        };
        let text = toml::to_string(&HubToml {
            upstream: c.clone(),
        })
        .unwrap();
        let back: HubToml = toml::from_str(&text).unwrap();
        assert_eq!(back.upstream, c);
        assert_eq!(
            c.api_base(),
            "https://contoso.crm4.dynamics.com/api/data/v9.2/"
        );
        // A minimal section takes the defaults.
        let min: HubToml = toml::from_str("[upstream]\nurl = \"http://127.0.0.1:8080/\"").unwrap();
        assert_eq!(min.upstream.auth, AuthConfig::None {});
        assert_eq!(
            min.upstream.api_base(),
            "http://127.0.0.1:8080/api/data/v9.2/"
        );
    }

    #[test]
    fn a_failed_downloads_wait_doubles_up_to_its_bound() {
        let mut c = UpstreamConfig::new("http://127.0.0.1:1");
        c.file_retry_ms = 1_000;
        c.file_retry_max_ms = 5_000;
        let waits: Vec<u64> = (1..=5)
            .map(|n| c.file_retry_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(c.file_retry_delay(u32::MAX).as_millis(), 5_000);
        c.file_retry_max_ms = 999;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_config_with_an_unknown_auth_kind_is_refused() {
        let r: Result<HubToml, _> =
            toml::from_str("[upstream]\nurl = \"x\"\n[upstream.auth]\nkind = \"password\"");
        assert!(r.is_err());
    }
}
