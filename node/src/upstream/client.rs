//! HTTP to the Web API: the documented headers, bearer tokens, `429` with `Retry-After`, error
//! bodies, and `$batch` change sets (`execute-batch-operations-using-web-api.md`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value as J;
use tracing::{debug, info_span, warn, Instrument};
use uuid::Uuid;

use super::auth::TokenSource;
use super::config::UpstreamConfig;
use super::UpstreamError;
use crate::multipart::{self, header_lines, split_head};

/// Most requests in one `$batch` (documented limit).
pub const BATCH_REQUESTS_MAX: usize = 1000;

/// Error code of an expired change-tracking token
/// (`use-change-tracking-synchronize-data-external-systems.md`).
pub const CHANGE_TRACKING_EXPIRED: &str = "0x80044352";

/// Counters for tests, benches and `/metrics`.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// HTTP requests sent (a `$batch` counts once).
    pub requests: AtomicU64,
    /// `429` answers received.
    pub throttled: AtomicU64,
}

/// One request, on its own or inside a `$batch`.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    /// Relative to the API base (`accounts(<id>)`) or absolute (a next or delta link).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<J>,
}

impl ApiRequest {
    pub fn new(method: Method, path: impl Into<String>) -> ApiRequest {
        ApiRequest {
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> ApiRequest {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn json(mut self, body: J) -> ApiRequest {
        self.body = Some(body);
        self
    }
}

/// A response (top-level or one part of a `$batch` response).
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

fn is_success_status(status: u16) -> bool {
    (200..300).contains(&status)
}

/// A header by name, in a map whose names are lower case.
fn header_in<'a>(headers: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    headers.get(&name.to_ascii_lowercase()).map(String::as_str)
}

impl ApiResponse {
    pub fn is_success(&self) -> bool {
        is_success_status(self.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    pub fn json(&self) -> Result<J, UpstreamError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| UpstreamError::BadReply(format!("a JSON body was expected: {e}")))
    }

    /// The `{"error":{"code","message"}}` body as an error.
    pub fn error(&self) -> UpstreamError {
        let parsed: Option<J> = serde_json::from_slice(&self.body).ok();
        let field = |k: &str| {
            parsed
                .as_ref()
                .and_then(|j| j.get("error"))
                .and_then(|e| e.get(k))
                .and_then(J::as_str)
                .unwrap_or_default()
                .to_string()
        };
        UpstreamError::Api {
            status: self.status,
            code: field("code"),
            message: field("message"),
        }
    }
}

/// A response whose headers are here and whose body is still on the wire: read with a cap,
/// into memory ([`StreamingResponse::read_to_end`]) or to a writer
/// ([`StreamingResponse::copy_to`]), a piece at a time, so a server that sends more than it
/// should costs no more memory than the cap.
#[derive(Debug)]
pub struct StreamingResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    inner: reqwest::Response,
}

impl StreamingResponse {
    pub fn is_success(&self) -> bool {
        is_success_status(self.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    /// The next piece of the body (`None` at its end).
    async fn next_piece(
        &mut self,
    ) -> Result<Option<impl std::ops::Deref<Target = [u8]>>, UpstreamError> {
        self.inner
            .chunk()
            .await
            .map_err(|e| UpstreamError::Unreachable(e.to_string()))
    }

    /// Refuses a body whose declared length is already past `limit`, before reading it.
    fn check_declared_length(&self, limit: u64) -> Result<(), UpstreamError> {
        match self.inner.content_length() {
            Some(n) if n > limit => Err(UpstreamError::ResponseTooLarge { limit }),
            _ => Ok(()),
        }
    }

    /// The whole body, refused with [`UpstreamError::ResponseTooLarge`] as soon as it passes
    /// `limit` bytes.
    pub async fn read_to_end(mut self, limit: u64) -> Result<ApiResponse, UpstreamError> {
        self.check_declared_length(limit)?;
        let mut body = Vec::new();
        while let Some(piece) = self.next_piece().await? {
            if (body.len() as u64).saturating_add(piece.len() as u64) > limit {
                return Err(UpstreamError::ResponseTooLarge { limit });
            }
            body.extend_from_slice(&piece);
        }
        debug!(status = self.status, bytes = body.len(), "response body");
        Ok(ApiResponse {
            status: self.status,
            headers: self.headers,
            body,
        })
    }

    /// Writes the body to `sink` (asynchronously: a file's writes go to tokio's blocking
    /// threads, not the runtime's workers) and returns its length; refused with
    /// [`UpstreamError::ResponseTooLarge`] as soon as it passes `limit` bytes (what was written
    /// by then stays in `sink`).
    pub async fn copy_to(
        mut self,
        sink: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
        limit: u64,
    ) -> Result<u64, UpstreamError> {
        use tokio::io::AsyncWriteExt;
        self.check_declared_length(limit)?;
        let mut written = 0u64;
        while let Some(piece) = self.next_piece().await? {
            written = written.saturating_add(piece.len() as u64);
            if written > limit {
                return Err(UpstreamError::ResponseTooLarge { limit });
            }
            sink.write_all(&piece)
                .await
                .map_err(|e| UpstreamError::Io(format!("cannot write a download: {e}")))?;
        }
        Ok(written)
    }
}

/// A Web API client for one environment.
#[derive(Debug, Clone)]
pub struct DataverseClient {
    http: reqwest::Client,
    base: String,
    tokens: Arc<TokenSource>,
    retry_after_max: Duration,
    response_bytes_max: u64,
    pub stats: Arc<ClientStats>,
}

/// Installs ring as the process's rustls provider (reqwest is built without one); call before
/// building any `reqwest::Client`.
pub fn install_crypto_provider() {
    // reqwest is built without a default provider; the workspace's rustls uses ring. Installing
    // twice is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl DataverseClient {
    pub fn new(config: &UpstreamConfig) -> Result<DataverseClient, UpstreamError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| {
                UpstreamError::Unreachable(format!("cannot build the HTTP client: {e}"))
            })?;
        Ok(DataverseClient {
            http,
            base: config.api_base(),
            tokens: Arc::new(TokenSource::new(config.auth.clone(), &config.url)),
            retry_after_max: Duration::from_secs(config.retry_after_max_secs),
            response_bytes_max: config.response_bytes_max,
            stats: Arc::new(ClientStats::default()),
        })
    }

    /// The API base URL, ending in `/api/data/v9.2/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path.trim_start_matches('/'))
        }
    }

    /// Sends one request; waits out `429`s (up to `retry_after_max_secs` each) and retries once
    /// after a `401` with a fresh token. Transport failures are [`UpstreamError::NoConnection`]
    /// (no connection made) or [`UpstreamError::Unreachable`] (no whole reply).
    pub async fn send(&self, req: &ApiRequest) -> Result<ApiResponse, UpstreamError> {
        let content_type = req.body.as_ref().map(|_| "application/json");
        let body = req
            .body
            .as_ref()
            .map(|b| b.to_string().into_bytes())
            .unwrap_or_default();
        self.send_raw(&req.method, &req.path, &req.headers, content_type, body)
            .await
    }

    /// Sends raw bytes (file uploads) with `content_type` and extra headers.
    pub async fn send_bytes(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<ApiResponse, UpstreamError> {
        self.send_raw(&method, path, headers, Some(content_type), body)
            .await
    }

    async fn send_raw(
        &self,
        method: &Method,
        path: &str,
        headers: &[(String, String)],
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<ApiResponse, UpstreamError> {
        let resp = self
            .send_streaming(method, path, headers, content_type, body)
            .await?;
        resp.read_to_end(self.response_bytes_max).await
    }

    /// Sends a `GET` whose body the caller reads in pieces ([`StreamingResponse`]): a file's
    /// range goes to disk, never whole into memory.
    pub async fn get_streaming(
        &self,
        path: &str,
        headers: &[(String, String)],
    ) -> Result<StreamingResponse, UpstreamError> {
        self.send_streaming(&Method::GET, path, headers, None, Vec::new())
            .await
    }

    /// The longest response body read into memory (`response_bytes_max`).
    pub fn response_bytes_max(&self) -> u64 {
        self.response_bytes_max
    }

    /// Sends a request up to its response's headers: waits out `429`s and retries a `401`
    /// with a fresh token (their bodies are dropped unread).
    async fn send_streaming(
        &self,
        method: &Method,
        path: &str,
        headers: &[(String, String)],
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<StreamingResponse, UpstreamError> {
        let url = self.url(path);
        let span = info_span!("dataverse_request", %method, %url);
        async {
            let mut reauthorized = false;
            let mut throttled = 0;
            loop {
                let mut rb = self
                    .http
                    .request(method.clone(), &url)
                    .header("Accept", "application/json")
                    .header("OData-MaxVersion", "4.0")
                    .header("OData-Version", "4.0");
                if let Some(auth) = self.tokens.header(&self.http).await? {
                    rb = rb.header("Authorization", auth);
                }
                if let Some(ct) = content_type {
                    rb = rb.header("Content-Type", ct);
                }
                for (k, v) in headers {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                if !body.is_empty() {
                    rb = rb.body(body.clone());
                }
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let resp = rb.send().await.map_err(|e| {
                    // No connection at all (the request never left) is told apart from one
                    // that failed once made: a file download takes only the first for
                    // Dataverse's absence.
                    if e.is_connect() {
                        UpstreamError::NoConnection(e.to_string())
                    } else {
                        UpstreamError::Unreachable(e.to_string())
                    }
                })?;
                let status = resp.status();
                let headers: BTreeMap<String, String> = resp
                    .headers()
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            k.as_str().to_ascii_lowercase(),
                            v.to_str().ok()?.to_string(),
                        ))
                    })
                    .collect();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    let wait = retry_after(headers.get("retry-after").map(String::as_str))
                        .max(THROTTLE_WAIT_MIN);
                    throttled += 1;
                    if wait > self.retry_after_max || throttled > THROTTLED_RETRIES {
                        return Err(UpstreamError::Throttled { retry_after: wait });
                    }
                    warn!(
                        wait_ms = wait.as_millis() as u64,
                        "throttled (429): waiting Retry-After"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                if status == StatusCode::UNAUTHORIZED && !reauthorized {
                    reauthorized = true;
                    self.tokens.invalidate().await;
                    continue;
                }
                debug!(status = status.as_u16(), "response");
                return Ok(StreamingResponse {
                    status: status.as_u16(),
                    headers,
                    inner: resp,
                });
            }
        }
        .instrument(span)
        .await
    }

    /// Sends `requests` as one `$batch` holding one change set (atomic: all or nothing).
    /// Returns one response per request when the change set succeeded, or
    /// [`BatchOutcome::Failed`] with the failing request's response.
    pub async fn change_set(&self, requests: &[ApiRequest]) -> Result<BatchOutcome, UpstreamError> {
        if requests.len() > BATCH_REQUESTS_MAX {
            return Err(UpstreamError::BadRequest(format!(
                "a $batch holds at most {BATCH_REQUESTS_MAX} requests, not {}",
                requests.len()
            )));
        }
        let batch = format!("batch_{}", Uuid::new_v4());
        let body = self.batch_body(&batch, requests);
        let resp = self
            .send_raw(
                &Method::POST,
                "$batch",
                &[],
                Some(&format!("multipart/mixed; boundary=\"{batch}\"")),
                body.into_bytes(),
            )
            .await?;
        let parts = match resp
            .header("content-type")
            .and_then(multipart::boundary)
            .map(|b| parse_multipart(&resp.body, &b))
        {
            Some(parts) => parts?,
            None if !resp.is_success() => return Ok(BatchOutcome::Failed(resp)),
            None => {
                return Err(UpstreamError::BadReply(
                    "a $batch response without a multipart body".into(),
                ))
            }
        };
        if parts.len() == requests.len() && parts.iter().all(ApiResponse::is_success) {
            return Ok(BatchOutcome::Applied(parts));
        }
        let failing = parts.into_iter().find(|p| !p.is_success()).unwrap_or(resp);
        Ok(BatchOutcome::Failed(failing))
    }

    fn batch_body(&self, batch: &str, requests: &[ApiRequest]) -> String {
        let changeset = format!("changeset_{}", Uuid::new_v4());
        let mut out =
            format!("--{batch}\r\nContent-Type: multipart/mixed; boundary=\"{changeset}\"\r\n\r\n");
        for (i, r) in requests.iter().enumerate() {
            out.push_str(&format!(
                "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {}\r\n\r\n",
                i + 1
            ));
            out.push_str(&format!("{} {} HTTP/1.1\r\n", r.method, self.url(&r.path)));
            if r.body.is_some() {
                out.push_str("Content-Type: application/json\r\n");
            }
            for (k, v) in &r.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            if let Some(b) = &r.body {
                out.push_str(&b.to_string());
                out.push_str("\r\n");
            }
        }
        out.push_str(&format!("--{changeset}--\r\n--{batch}--\r\n"));
        out
    }
}

/// What a change set did.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Every request succeeded: their responses, in order.
    Applied(Vec<ApiResponse>),
    /// The change set was rolled back: the failing request's response.
    Failed(ApiResponse),
}

fn header_map(head: &str) -> BTreeMap<String, String> {
    header_lines(head).collect()
}

/// How long a `429`'s `Retry-After` asks to wait: seconds (Dataverse's form, fractions
/// accepted), else one second — a negative, huge or unreadable value (an HTTP date included)
/// must not stop the bridge.
fn retry_after(header: Option<&str>) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(1);
    header
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .unwrap_or(DEFAULT)
}

/// The shortest wait after a `429` (`Retry-After: 0` must not make a busy loop).
const THROTTLE_WAIT_MIN: Duration = Duration::from_millis(100);
/// `429`s one request waits out before the round gives up (and backs off).
const THROTTLED_RETRIES: usize = 8;

/// `$batch` responses nest a change set's responses once; deeper nesting is refused.
const MULTIPART_DEPTH_MAX: usize = 2;

/// Flattens a multipart response (with nested change-set responses) into its HTTP responses.
fn parse_multipart(body: &[u8], boundary: &str) -> Result<Vec<ApiResponse>, UpstreamError> {
    parse_multipart_at(body, boundary, 1)
}

fn parse_multipart_at(
    body: &[u8],
    boundary: &str,
    depth: usize,
) -> Result<Vec<ApiResponse>, UpstreamError> {
    if depth > MULTIPART_DEPTH_MAX {
        return Err(UpstreamError::BadReply(
            "a $batch reply nests multipart bodies too deep".into(),
        ));
    }
    let text = String::from_utf8_lossy(body);
    let delim = format!("--{boundary}");
    let mut out = Vec::new();
    for chunk in text.split(delim.as_str()).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk.trim_start_matches(['\r', '\n']);
        let (head, content) = split_head(chunk);
        let headers = header_map(head);
        if let Some(inner) = headers
            .get("content-type")
            .and_then(|c| multipart::boundary(c))
        {
            out.extend(parse_multipart_at(content.as_bytes(), &inner, depth + 1)?);
            continue;
        }
        let content = content.trim_start_matches(['\r', '\n']);
        let (http_head, http_body) = split_head(content);
        let mut lines = http_head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| {
                UpstreamError::BadReply(format!(
                    "a $batch part without a status line: {status_line:?}"
                ))
            })?;
        let headers = header_map(&lines.collect::<Vec<_>>().join("\n"));
        out.push(ApiResponse {
            status,
            headers,
            body: http_body.trim_end_matches(['\r', '\n']).as_bytes().to_vec(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_never_panics() {
        assert_eq!(retry_after(Some("2.5")), Duration::from_millis(2_500));
        for bad in [
            "-1",
            "NaN",
            "1e30",
            "inf",
            "Wed, 21 Oct 2026 07:28:00 GMT",
            "",
        ] {
            assert_eq!(retry_after(Some(bad)), Duration::from_secs(1), "{bad}");
        }
        assert_eq!(retry_after(None), Duration::from_secs(1));
    }

    #[test]
    fn nested_multipart_replies_are_refused_past_a_change_set() {
        // A reply that nests a boundary in every part, a thousand times over.
        let mut body = String::new();
        for i in 0..1000 {
            body.push_str(&format!(
                "--b{i}\r\nContent-Type: multipart/mixed; boundary=b{}\r\n\r\n",
                i + 1
            ));
        }
        let r = parse_multipart(body.as_bytes(), "b0");
        assert!(matches!(r, Err(UpstreamError::BadReply(_))), "{r:?}");
        // A change set inside a batch is fine.
        let ok = "--batch\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n--cs\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\r\n--cs--\r\n--batch--\r\n";
        let parts = parse_multipart(ok.as_bytes(), "batch").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].status, 204);
    }
}
