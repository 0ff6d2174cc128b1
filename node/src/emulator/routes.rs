//! The dispatcher: HTTP in, Dataverse-shaped answers out.
//!
//! Every request — top level or inside a `$batch` — becomes an [`EmuRequest`] and goes through
//! [`dispatch`] on a SQLite transaction, so a batch part behaves exactly like the same request
//! sent alone. Authentication and service protection happen once per HTTP request, before.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use fieldsync_store::{
    format_datetime, parse_datetime, ColumnType, OwnerKind, OwnerRef, Ownership, Schema, Table,
    Value,
};
use rusqlite::Connection;
use serde_json::{json, Map, Value as J};
use uuid::Uuid;

use super::errors::{self, ApiError};
use super::odata::{self, CallerIds, Filter, Lit, OrderBy, Prefer};
use super::security::{derived_id, Caller, Directory};
use super::store::{self, Row};
use super::{batch, files, metadata, EmulatorConfig, API_PREFIX};

/// Most rows in one page, whatever `odata.maxpagesize` asks (Dataverse: 5000).
pub const PAGE_SIZE_MAX: usize = 5000;
/// Largest request body accepted (a single-request file upload is limited to 128 MB).
const BODY_BYTES_MAX: usize = 130 * 1024 * 1024;

/// The field-service example schema, bundled into the binary.
const FIELD_SERVICE_SCHEMA: &str = include_str!("../../../examples/field-service/schema.toml");

/// Shared state of a running emulator.
#[derive(Debug)]
pub struct AppState {
    pub(super) config: EmulatorConfig,
    db: Mutex<Connection>,
    pub(super) schema: Schema,
    pub(super) directory: Directory,
    requests: Mutex<HashMap<Uuid, VecDeque<Instant>>>,
    in_flight: Arc<Mutex<HashMap<Uuid, u32>>>,
    /// Tests only (`--test-faults`): successful writes whose replies are still to be lost.
    drop_write_replies: std::sync::atomic::AtomicU32,
    /// Tests only (`--test-faults`): file downloads still to be answered `503`.
    fail_file_downloads: std::sync::atomic::AtomicU32,
    /// Tests only (`--test-faults`): the row id whose reads by id answer `500` (a plugin that
    /// fails on read), until cleared.
    fail_reads_of: Mutex<Option<Uuid>>,
    /// Tests only (`--test-faults`): single write requests (not a `$batch`) still to be
    /// answered `503` without applying anything.
    fail_writes: std::sync::atomic::AtomicU32,
    /// Tests only (`--test-faults`): the entity set whose queries (pages, changes) answer
    /// `500`, until cleared.
    fail_queries_of: Mutex<Option<String>>,
}

/// One request, as the dispatcher sees it.
#[derive(Debug, Clone, Default)]
pub struct EmuRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path after `/api/data/v9.2/`, percent-decoded.
    pub path: String,
    /// The raw query string (without `?`).
    pub query: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl EmuRequest {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header.
    pub fn headers_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The parsed `Prefer` header.
    pub fn prefer(&self) -> Prefer {
        Prefer::parse(self.headers_all("prefer"))
    }
}

/// One response.
#[derive(Debug, Clone, Default)]
pub struct EmuResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers (besides `OData-Version`, always added).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl EmuResponse {
    /// A status with no body.
    pub fn empty(status: u16) -> EmuResponse {
        EmuResponse {
            status,
            ..EmuResponse::default()
        }
    }

    /// A JSON body.
    pub fn json(status: u16, body: &J) -> EmuResponse {
        EmuResponse {
            status,
            headers: vec![(
                "Content-Type".into(),
                "application/json; odata.metadata=minimal".into(),
            )],
            body: body.to_string().into_bytes(),
        }
    }

    /// Add a header.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> EmuResponse {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// The value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl From<ApiError> for EmuResponse {
    fn from(e: ApiError) -> EmuResponse {
        let mut r = EmuResponse::json(e.status, &e.body());
        r.headers.extend(e.headers);
        r
    }
}

/// Per-request context: who calls, the base URL for links, `$batch` content ids.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The emulator.
    pub state: &'a AppState,
    /// The authenticated caller.
    pub caller: Caller,
    /// `http://host/api/data/v9.2/`.
    pub base: String,
    /// `$batch` `Content-ID` → the entity path created by that part (`accounts(<id>)`).
    pub content_ids: HashMap<String, String>,
}

impl Ctx<'_> {
    fn caller_ids(&self) -> CallerIds {
        CallerIds {
            user: self.caller.user,
            teams: self.caller.teams.clone(),
            business_unit: self.caller.business_unit,
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl AppState {
    /// Open the data directory, load or seed the schema and the directory.
    pub fn open(config: EmulatorConfig) -> anyhow::Result<AppState> {
        let conn = store::open(&config.data_dir)?;
        let stored_schema = store::get_config(&conn, "schema")?;
        let schema_text = match (
            &config.schema_toml,
            config.example.as_deref(),
            stored_schema,
        ) {
            (Some(text), _, _) => text.clone(),
            (None, Some("field-service"), None) => FIELD_SERVICE_SCHEMA.to_string(),
            (None, Some(other), _) if other != "field-service" => {
                anyhow::bail!("unknown example `{other}` (known: field-service)")
            }
            (None, _, Some(text)) => text,
            (None, _, None) => String::new(),
        };
        let schema = Schema::from_toml(&schema_text)?;
        store::set_config(&conn, "schema", &schema_text)?;
        let stored_directory = match &config.directory_json {
            Some(text) => Some(text.clone()),
            None => store::get_config(&conn, "directory")?,
        };
        let mut directory: Directory = match stored_directory {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("the security directory is not valid JSON: {e}"))?,
            None if config.example.as_deref() == Some("field-service") => {
                field_service_directory(&config.admin_token)
            }
            None => Directory::with_root("fieldsync", &config.admin_token),
        };
        directory.set_admin_token(&config.admin_token);
        store::set_config(&conn, "directory", &serde_json::to_string(&directory)?)?;
        let state = AppState {
            config,
            db: Mutex::new(conn),
            schema,
            directory,
            requests: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            drop_write_replies: std::sync::atomic::AtomicU32::new(0),
            fail_file_downloads: std::sync::atomic::AtomicU32::new(0),
            fail_reads_of: Mutex::new(None),
            fail_writes: std::sync::atomic::AtomicU32::new(0),
            fail_queries_of: Mutex::new(None),
        };
        if state.config.example.as_deref() == Some("field-service") {
            let conn = state.db();
            if store::get_config(&conn, "seeded:field-service")?.is_none() {
                seed_field_service(&state, &conn)?;
                store::set_config(&conn, "seeded:field-service", "1")?;
            }
        }
        Ok(state)
    }

    /// The database connection (a poisoned lock is recovered: SQLite keeps its own consistency).
    pub fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this reply is to be lost (`--test-faults`), counting it.
    fn take_dropped_reply(&self) -> bool {
        take_one(&self.drop_write_replies)
    }

    /// Whether this file download is to fail (`--test-faults`), counting it.
    fn take_failed_download(&self) -> bool {
        take_one(&self.fail_file_downloads)
    }

    /// Whether this write is to fail unapplied (`--test-faults`), counting it.
    fn take_failed_write(&self, method: &str, path: &str) -> bool {
        is_write(method) && path != "$batch" && take_one(&self.fail_writes)
    }

    /// Whether this request queries the entity set whose queries are to fail (`--test-faults`).
    fn fails_query(&self, method: &str, path: &str) -> bool {
        let failing = self
            .fail_queries_of
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        method == "GET" && failing.as_deref() == Some(path)
    }

    /// Whether this request reads the row whose reads are to fail (`--test-faults`).
    fn fails_read(&self, method: &str, path: &str) -> bool {
        let failing = *self.fail_reads_of.lock().unwrap_or_else(|e| e.into_inner());
        failing.is_some_and(|id| {
            method == "GET" && path.ends_with(&format!("({id})")) && !path.contains('/')
        })
    }

    fn check_rate(&self, user: Uuid) -> Result<(), ApiError> {
        let window = self.config.rate_limit_window;
        let limit = self.config.rate_limit_requests as usize;
        let now = Instant::now();
        let mut all = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let q = all.entry(user).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
            q.pop_front();
        }
        if q.len() >= limit {
            let oldest = q.front().copied().unwrap_or(now);
            let wait = window.saturating_sub(now.duration_since(oldest));
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            // api-limits.md: 429, `Retry-After`, 0x80072322 and this message.
            return Err(ApiError::new(
                429,
                errors::RATE_LIMIT_REQUESTS,
                format!(
                    "Number of requests exceeded the limit of {} over time window of {} seconds.",
                    limit,
                    window.as_secs()
                ),
            )
            .with_header("Retry-After", secs.max(1).to_string()));
        }
        q.push_back(now);
        Ok(())
    }

    fn enter(&self, user: Uuid) -> Result<InFlight, ApiError> {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user).or_default();
        if *n >= self.config.max_concurrent_requests {
            return Err(ApiError::new(
                429,
                errors::RATE_LIMIT_CONCURRENCY,
                format!(
                    "Number of concurrent requests exceeded the limit of {}.",
                    self.config.max_concurrent_requests
                ),
            )
            .with_header("Retry-After", "1".into()));
        }
        *n += 1;
        Ok(InFlight {
            map: Arc::clone(&self.in_flight),
            user,
        })
    }
}

/// Counts a request as in flight until dropped.
struct InFlight {
    map: Arc<Mutex<HashMap<Uuid, u32>>>,
    user: Uuid,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The axum router: everything goes through one handler.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(handle_http).with_state(state)
}

fn to_axum(resp: EmuResponse) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    let mut has_version = false;
    for (name, value) in &resp.headers {
        has_version |= name.eq_ignore_ascii_case("odata-version");
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            builder = builder.header(n, v);
        }
    }
    if !has_version {
        builder = builder.header("OData-Version", "4.0");
    }
    builder
        .body(Body::from(resp.body))
        .unwrap_or_else(|_| Response::new(Body::from("response build failed")))
}

async fn handle_http(State(state): State<Arc<AppState>>, req: axum::extract::Request) -> Response {
    let method = req.method().as_str().to_string();
    let uri = req.uri().clone();
    let span = tracing::info_span!("dataverse_request", %method, path = uri.path());
    let _enter = span.enter();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if uri.path() == TEST_FAULTS_PATH && state.config.test_faults {
        if method != "POST" {
            let refused = ApiError::new(405, errors::NOT_SUPPORTED, "Set faults with a POST.");
            return to_axum(refused.into());
        }
        return set_test_faults(&state, uri.query().unwrap_or(""));
    }
    let Some(rest) = uri.path().strip_prefix(API_PREFIX) else {
        return to_axum(ApiError::no_segment(uri.path()).into());
    };
    let path = odata::percent_decode(&rest.replace('+', "%2B"));
    let query = uri.query().unwrap_or("").to_string();
    let body = match axum::body::to_bytes(req.into_body(), BODY_BYTES_MAX).await {
        Ok(b) => b.to_vec(),
        Err(_) => {
            return to_axum(
                ApiError::new(413, errors::BAD_PAYLOAD, "The request body is too large.").into(),
            )
        }
    };
    let file_download = method == "GET" && path.ends_with("/$value");
    if file_download && state.take_failed_download() {
        tracing::info!("test fault: a file download fails");
        let failed = ApiError::new(503, errors::INTERNAL, "Test fault: the download failed.");
        return to_axum(failed.into());
    }
    if state.take_failed_write(&method, &path) {
        tracing::info!("test fault: a write fails unapplied");
        let failed = ApiError::new(503, errors::INTERNAL, "Test fault: the write failed.");
        return to_axum(failed.into());
    }
    if state.fails_query(&method, &path) {
        tracing::info!("test fault: a query fails");
        let failed = ApiError::new(500, errors::INTERNAL, "Test fault: the query failed.");
        return to_axum(failed.into());
    }
    if state.fails_read(&method, &path) {
        tracing::info!("test fault: a row's read fails");
        let failed = ApiError::new(500, errors::INTERNAL, "Test fault: the row cannot be read.");
        return to_axum(failed.into());
    }
    let emu = EmuRequest {
        method,
        path,
        query,
        headers,
        body,
    };
    let host = emu.header("host").unwrap_or("localhost").to_string();
    let base = match &state.config.public_url {
        Some(url) => format!("{}{}", url.trim_end_matches('/'), API_PREFIX),
        None => format!("http://{host}{API_PREFIX}"),
    };
    // Authentication: `Authorization: Bearer <token>` maps to a user.
    let token = emu
        .header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("")
        .trim()
        .to_string();
    let Some(user) = state.directory.user_by_token(&token).cloned() else {
        let err = ApiError::new(
            401,
            errors::UNAUTHORIZED,
            "The user is not authenticated: send `Authorization: Bearer <token>` with a token the emulator knows.",
        )
        .with_header(
            "WWW-Authenticate",
            "Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/authorize".into(),
        );
        return to_axum(err.into());
    };
    if let Err(e) = state.check_rate(user.id) {
        tracing::info!(user = %user.domain_name, "throttled");
        return to_axum(e.into());
    }
    let guard = match state.enter(user.id) {
        Ok(g) => g,
        Err(e) => return to_axum(e.into()),
    };
    let caller = state.directory.caller(&user);
    let st = Arc::clone(&state);
    let result = tokio::task::spawn_blocking(move || {
        let ctx = Ctx {
            state: &st,
            caller,
            base,
            content_ids: HashMap::new(),
        };
        if emu.path == "$batch" {
            batch::handle(&ctx, &emu)
        } else {
            let mut conn = st.db();
            let resp = run_one(&ctx, &mut conn, &emu);
            let wrote = is_write(&emu.method) && resp.status < 400;
            (resp, wrote)
        }
    })
    .await;
    drop(guard);
    let (resp, wrote) = match result {
        Ok(r) => r,
        Err(e) => (
            ApiError::internal(format!("request task failed: {e}")).into(),
            false,
        ),
    };
    tracing::debug!(status = resp.status, "answered");
    if wrote && (200..300).contains(&resp.status) && state.take_dropped_reply() {
        tracing::info!("test fault: the write is applied, its reply lost");
        return lost_reply();
    }
    to_axum(resp)
}

/// Whether a request's method changes data (a `$batch` says for itself).
pub(super) fn is_write(method: &str) -> bool {
    matches!(method, "POST" | "PATCH" | "PUT" | "DELETE")
}

/// Takes one from a fault counter, if it is not 0.
fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
    counter
        .fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        )
        .is_ok()
}

/// The fault switch's path (served only with `--test-faults`).
const TEST_FAULTS_PATH: &str = "/_test/faults";

/// `POST /_test/faults?drop_write_replies=N&fail_file_downloads=M&fail_reads_of=ID&fail_writes=K`:
/// the next N writes that apply something lose their replies; the next M file downloads answer
/// `503`; reads of row ID by id answer `500` (an empty ID clears it); the next K single write
/// requests answer `503` unapplied; queries of entity set SET (`fail_queries_of=SET`: its pages
/// and changes) answer `500` (an empty SET clears it). Each is optional (an absent one is left as it was); at
/// least one is expected.
fn set_test_faults(state: &AppState, query: &str) -> Response {
    let count = |name: &str| -> Result<Option<u32>, ()> {
        let prefix = format!("{name}=");
        match query
            .split('&')
            .find_map(|kv| kv.strip_prefix(prefix.as_str()))
        {
            None => Ok(None),
            Some(v) => v.parse::<u32>().map(Some).map_err(|_| ()),
        }
    };
    let reads = match query
        .split('&')
        .find_map(|kv| kv.strip_prefix("fail_reads_of="))
    {
        None => Ok(None),
        Some("") => Ok(Some(None)),
        Some(v) => Uuid::parse_str(v).map(|id| Some(Some(id))).map_err(|_| ()),
    };
    let queries = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("fail_queries_of="))
        .map(|set| (!set.is_empty()).then(|| set.to_string()));
    match (
        count("drop_write_replies"),
        count("fail_file_downloads"),
        reads,
        count("fail_writes"),
    ) {
        (Ok(drops), Ok(fails), Ok(reads), Ok(writes))
            if drops.is_some()
                || fails.is_some()
                || reads.is_some()
                || writes.is_some()
                || queries.is_some() =>
        {
            if let Some(set) = queries {
                *state
                    .fail_queries_of
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = set;
            }
            let at = std::sync::atomic::Ordering::SeqCst;
            if let Some(id) = reads {
                *state.fail_reads_of.lock().unwrap_or_else(|e| e.into_inner()) = id;
            }
            if let Some(n) = drops {
                state.drop_write_replies.store(n, at);
            }
            if let Some(n) = fails {
                state.fail_file_downloads.store(n, at);
            }
            if let Some(n) = writes {
                state.fail_writes.store(n, at);
            }
            to_axum(EmuResponse {
                status: 204,
                ..EmuResponse::default()
            })
        }
        _ => to_axum(
            ApiError::new(
                400,
                errors::BAD_PAYLOAD,
                "Expected ?drop_write_replies=<count>, ?fail_file_downloads=<count>, ?fail_reads_of=<row id>, ?fail_writes=<count> and/or ?fail_queries_of=<entity set>.",
            )
            .into(),
        ),
    }
}

/// A reply that never arrives whole, so the client cannot tell whether the write was applied
/// (it was): its body is a stream that fails after its first byte, and the server drops the
/// connection before the reply is complete (a body shorter than a fixed `Content-Length` would
/// instead leave the client waiting for the rest).
fn lost_reply() -> Response {
    let cut = futures_util::stream::iter([
        Ok(axum::body::Bytes::from_static(b"{")),
        Err(std::io::Error::other("test fault: the reply is lost")),
    ]);
    Response::builder()
        .status(StatusCode::OK)
        .header("Content-Type", "application/json")
        .header("Content-Length", "64")
        .body(Body::from_stream(cut))
        .unwrap_or_else(|_| Response::new(Body::from("response build failed")))
}

/// Run one request in its own transaction: committed on success, rolled back on an error.
pub fn run_one(ctx: &Ctx<'_>, conn: &mut Connection, req: &EmuRequest) -> EmuResponse {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return ApiError::from(e).into(),
    };
    let resp = match dispatch(ctx, &tx, req) {
        Ok(r) => r,
        Err(e) => e.into(),
    };
    if resp.status < 400 {
        if let Err(e) = tx.commit() {
            return ApiError::from(e).into();
        }
    }
    resp
}

/// A path's first segment: `accounts`, `accounts(<guid>)`, `EntityDefinitions(LogicalName='x')`.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// No key.
    None,
    /// `(<guid>)`.
    Id(Uuid),
    /// `(name='value',...)`.
    Named(Vec<(String, String)>),
}

/// Split `name(key)` into the name and the key.
pub fn parse_segment(seg: &str) -> Result<(String, Key), ApiError> {
    let Some(open) = seg.find('(') else {
        return Ok((seg.to_string(), Key::None));
    };
    let name = seg[..open].to_string();
    let inner = seg[open + 1..]
        .strip_suffix(')')
        .ok_or_else(|| ApiError::query(format!("Bad key segment '{seg}'.")))?;
    if let Ok(id) = Uuid::parse_str(inner.trim()) {
        return Ok((name, Key::Id(id)));
    }
    let mut pairs = Vec::new();
    for part in inner.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| ApiError::query(format!("Bad key segment '{seg}'.")))?;
        let v = v.trim();
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or(v)
            .replace("''", "'");
        pairs.push((k.trim().to_string(), v));
    }
    Ok((name, Key::Named(pairs)))
}

/// Route one request.
pub fn dispatch(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
) -> Result<EmuResponse, ApiError> {
    let mut path = req.path.trim_matches('/').to_string();
    // `$1/lastname` inside a change set: the entity created by part 1.
    if let Some(rest) = path.strip_prefix('$') {
        let (n, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let target = ctx.content_ids.get(n).ok_or_else(|| {
            ApiError::new(
                400,
                errors::BATCH_INVALID,
                format!("Content-ID Reference: '${n}' does not exist in the batch context."),
            )
        })?;
        path = if tail.is_empty() {
            target.clone()
        } else {
            format!("{target}/{tail}")
        };
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some(first) = segments.first() else {
        return Ok(service_document(ctx));
    };
    let (name, key) = parse_segment(first)?;
    let method = req.method.as_str();
    match name.as_str() {
        "WhoAmI" | "WhoAmI()" if method == "GET" => return Ok(who_am_i(ctx)),
        "EntityDefinitions" => {
            if method != "GET" {
                return Err(method_not_allowed(method, &name));
            }
            return entity_definitions(ctx, req, &key, &segments[1..]);
        }
        "businessunits"
        | "systemusers"
        | "teams"
        | "roles"
        | "teammemberships"
        | "systemuserrolescollection" => {
            if method != "GET" {
                return Err(ApiError::new(
                    405,
                    errors::NOT_SUPPORTED,
                    format!("The emulator serves `{name}` read-only (edit the directory instead)."),
                ));
            }
            return security_set(ctx, req, &name, &key);
        }
        _ => {}
    }
    let table = ctx
        .state
        .schema
        .table_by_entity_set(&name)
        .ok_or_else(|| ApiError::no_segment(&name))?;
    let id = match &key {
        Key::None => None,
        Key::Id(id) => Some(*id),
        Key::Named(pairs) => Some(resolve_alternate_key(ctx, conn, table, pairs, method)?),
    };
    let rest = &segments[1..];
    match (method, id, rest) {
        ("GET", None, []) => list(ctx, conn, req, table),
        ("POST", None, []) => create(ctx, conn, req, table),
        ("GET", Some(id), []) => retrieve(ctx, conn, req, table, id),
        ("PATCH", Some(id), []) => upsert(ctx, conn, req, table, id, &key),
        ("DELETE", Some(id), []) => delete(ctx, conn, req, table, id),
        (_, Some(id), [column, tail @ ..]) => {
            let col = table.column(column).ok_or_else(|| {
                ApiError::query(format!(
                    "Could not find a property named '{column}' on type 'Microsoft.Dynamics.CRM.{}'.",
                    table.name
                ))
            })?;
            if matches!(col.ty, ColumnType::File | ColumnType::Image) {
                return files::handle(ctx, conn, req, table, id, &col.name, tail);
            }
            property(ctx, conn, req, table, id, &col.name, tail)
        }
        _ => Err(method_not_allowed(method, &req.path)),
    }
}

fn method_not_allowed(method: &str, what: &str) -> ApiError {
    ApiError::new(
        405,
        errors::NOT_SUPPORTED,
        format!("The HTTP method '{method}' is not supported on '{what}'."),
    )
}

fn service_document(ctx: &Ctx<'_>) -> EmuResponse {
    let mut sets: Vec<J> = ctx
        .state
        .schema
        .tables()
        .map(|t| json!({"name": t.entity_set, "kind": "EntitySet", "url": t.entity_set}))
        .collect();
    for s in [
        "EntityDefinitions",
        "businessunits",
        "systemusers",
        "teams",
        "roles",
        "teammemberships",
        "systemuserrolescollection",
    ] {
        sets.push(json!({"name": s, "kind": "EntitySet", "url": s}));
    }
    EmuResponse::json(
        200,
        &json!({"@odata.context": format!("{}$metadata", ctx.base), "value": sets}),
    )
}

fn who_am_i(ctx: &Ctx<'_>) -> EmuResponse {
    let org = ctx.state.directory.root().unwrap_or_default();
    EmuResponse::json(
        200,
        &json!({
            "@odata.context": format!("{}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", ctx.base),
            "BusinessUnitId": ctx.caller.business_unit.to_string(),
            "UserId": ctx.caller.user.to_string(),
            "OrganizationId": derived_id("organization", &org.to_string()).to_string(),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Wire form of rows.

fn file_id(b: &fieldsync_store::BlobRef) -> String {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&b.sha256[..16]);
    Uuid::from_bytes(bytes).to_string()
}

/// A row in Dataverse's JSON form: `@odata.etag`, every column (lookups as `_<col>_value`),
/// the primary id and `versionnumber`.
pub fn wire_row(table: &Table, row: &Row, annotations: bool) -> Map<String, J> {
    let mut m = Map::new();
    m.insert(
        "@odata.etag".into(),
        json!(format!("W/\"{}\"", row.version)),
    );
    for col in &table.columns {
        let v = row.values.get(&col.name).unwrap_or(&Value::Null);
        match col.ty {
            ColumnType::Owner => {
                let (id, kind) = match v {
                    Value::Owner(o) => (json!(o.id.to_string()), Some(o.kind)),
                    _ => (J::Null, None),
                };
                m.insert("_ownerid_value".into(), id.clone());
                if annotations {
                    let logical = match kind {
                        Some(OwnerKind::Team) => json!("team"),
                        Some(OwnerKind::User) => json!("systemuser"),
                        None => J::Null,
                    };
                    m.insert(
                        "_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname".into(),
                        logical,
                    );
                }
                let (user, team) = match kind {
                    Some(OwnerKind::User) => (id, J::Null),
                    Some(OwnerKind::Team) => (J::Null, id),
                    None => (J::Null, J::Null),
                };
                m.insert("_owninguser_value".into(), user);
                m.insert("_owningteam_value".into(), team);
            }
            ColumnType::Lookup => {
                let key = format!("_{}_value", col.name);
                let id = match v {
                    Value::Lookup(id) => json!(id.to_string()),
                    _ => J::Null,
                };
                if annotations {
                    let target = if col.name == "owningbusinessunit" {
                        Some("businessunit".to_string())
                    } else {
                        col.target.clone()
                    };
                    m.insert(
                        format!("{key}@Microsoft.Dynamics.CRM.lookuplogicalname"),
                        json!(target),
                    );
                }
                m.insert(key, id);
            }
            ColumnType::File | ColumnType::Image => {
                let (id, name) = match v {
                    Value::File(b) | Value::Image(b) => (json!(file_id(b)), json!(b.name)),
                    _ => (J::Null, J::Null),
                };
                m.insert(col.name.clone(), id);
                m.insert(format!("{}_name", col.name), name);
            }
            ColumnType::Decimal => {
                let n = match v {
                    Value::Decimal(d) => d
                        .to_string()
                        .parse::<serde_json::Number>()
                        .map(J::Number)
                        .unwrap_or(J::Null),
                    _ => J::Null,
                };
                m.insert(col.name.clone(), n);
            }
            _ => {
                m.insert(col.name.clone(), v.to_json());
            }
        }
    }
    m.insert(table.primary_id_column(), json!(row.id.to_string()));
    m.insert("versionnumber".into(), json!(row.version));
    m
}

/// Map a property name from a query to its wire name (`ownerid` → `_ownerid_value`).
pub fn resolve_prop(table: &Table, name: &str) -> Result<String, ApiError> {
    if name == table.primary_id_column() || name == "versionnumber" {
        return Ok(name.to_string());
    }
    let bare = name
        .strip_prefix('_')
        .and_then(|n| n.strip_suffix("_value"))
        .unwrap_or(name);
    if matches!(bare, "owninguser" | "owningteam") && table.ownership == Ownership::UserOrTeam {
        return Ok(format!("_{bare}_value"));
    }
    if let Some(col) = table.column(bare) {
        return Ok(match col.ty {
            ColumnType::Lookup | ColumnType::Owner => format!("_{bare}_value"),
            _ if bare != name => {
                return Err(unknown_property(table, name));
            }
            _ => bare.to_string(),
        });
    }
    if let Some(base) = name.strip_suffix("_name") {
        if table
            .column(base)
            .is_some_and(|c| matches!(c.ty, ColumnType::File | ColumnType::Image))
        {
            return Ok(name.to_string());
        }
    }
    Err(unknown_property(table, name))
}

fn unknown_property(table: &Table, name: &str) -> ApiError {
    ApiError::query(format!(
        "Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{}'.",
        table.name
    ))
}

/// Keep only `$select`ed properties (plus the etag, the primary id and annotations of kept ones).
fn project(m: Map<String, J>, select: Option<&[String]>, id_key: &str) -> Map<String, J> {
    let Some(select) = select else {
        return m;
    };
    m.into_iter()
        .filter(|(k, _)| {
            let base = k.split('@').next().unwrap_or(k);
            k == "@odata.etag"
                || k == id_key
                || (!base.is_empty() && select.iter().any(|s| s == base))
        })
        .collect()
}

/// A JSON property as a filter value (datetimes become milliseconds, GUIDs GUIDs).
fn json_lit(m: &Map<String, J>, prop: &str) -> Lit {
    let mut cur: Option<&J> = None;
    for (i, part) in prop.split('/').enumerate() {
        cur = if i == 0 {
            m.get(part).or_else(|| m.get(&format!("_{part}_value")))
        } else {
            cur.and_then(|c| c.get(part))
        };
    }
    match cur {
        None | Some(J::Null) => Lit::Null,
        Some(J::Bool(b)) => Lit::Bool(*b),
        Some(J::Number(n)) => Lit::Num(n.as_f64().unwrap_or(0.0)),
        Some(J::String(s)) => {
            let b = s.as_bytes();
            if b.len() >= 20 && b[4] == b'-' && b[10] == b'T' && s.ends_with('Z') {
                if let Some(ms) = parse_datetime(s) {
                    return Lit::Num(ms as f64);
                }
            }
            if s.len() == 36 {
                if let Ok(g) = Uuid::parse_str(s) {
                    return Lit::Guid(g);
                }
            }
            Lit::Str(s.clone())
        }
        Some(other) => Lit::Str(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Query options and paging.

/// The system query options of a collection GET.
#[derive(Debug, Default)]
struct ListQuery {
    select: Option<Vec<String>>,
    filter: Option<Filter>,
    filter_text: Option<String>,
    orderby: Vec<OrderBy>,
    top: Option<usize>,
    skiptoken: Option<String>,
    deltatoken: Option<String>,
    /// Everything except `$skiptoken`, to build next links.
    pairs: Vec<(String, String)>,
}

fn parse_list_query(raw: &str) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery::default();
    for (k, v) in odata::parse_query(raw) {
        match k.as_str() {
            "$select" => q.select = Some(odata::parse_select(&v)),
            "$filter" => {
                q.filter = Some(odata::parse_filter(&v)?);
                q.filter_text = Some(v.clone());
            }
            "$orderby" => q.orderby = odata::parse_orderby(&v)?,
            "$top" => {
                q.top = Some(
                    v.parse()
                        .map_err(|_| ApiError::query(format!("Invalid $top value '{v}'.")))?,
                )
            }
            "$skiptoken" => {
                q.skiptoken = Some(v);
                continue;
            }
            "$deltatoken" => q.deltatoken = Some(v.clone()),
            "$expand" | "$count" | "$apply" | "$skip" | "$search" | "fetchXml" => {
                return Err(ApiError::new(
                    400,
                    errors::NOT_SUPPORTED,
                    format!("The query option '{k}' is not supported by the emulator."),
                ))
            }
            other if other.starts_with('$') => {
                return Err(ApiError::query(format!(
                    "The query parameter '{other}' is not supported."
                )))
            }
            _ => {}
        }
        q.pairs.push((k, v));
    }
    Ok(q)
}

/// The emulator's paging cookie, opaque to clients (`$skiptoken`), shaped like Dataverse's.
#[derive(Debug, Default, Clone, PartialEq)]
struct Cookie {
    page: u64,
    last_id: Option<Uuid>,
    offset: Option<usize>,
    after_version: Option<i64>,
    snapshot: Option<i64>,
}

impl Cookie {
    fn encode(&self) -> String {
        let mut s = format!("<cookie pagenumber=\"{}\"", self.page);
        if let Some(id) = self.last_id {
            s.push_str(&format!(" last=\"{id}\""));
        }
        if let Some(o) = self.offset {
            s.push_str(&format!(" offset=\"{o}\""));
        }
        if let Some(v) = self.after_version {
            s.push_str(&format!(" after=\"{v}\""));
        }
        if let Some(v) = self.snapshot {
            s.push_str(&format!(" snapshot=\"{v}\""));
        }
        s.push_str(" />");
        s
    }

    fn decode(text: &str) -> Result<Cookie, ApiError> {
        let attr = |name: &str| -> Option<String> {
            let pat = format!(" {name}=\"");
            let start = text.find(&pat)? + pat.len();
            let end = text[start..].find('"')? + start;
            Some(text[start..end].to_string())
        };
        let bad =
            || ApiError::query("The $skiptoken is not valid; use the @odata.nextLink as returned.");
        if !text.starts_with("<cookie") {
            return Err(bad());
        }
        Ok(Cookie {
            page: attr("pagenumber")
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
            last_id: match attr("last") {
                Some(s) => Some(Uuid::parse_str(&s).map_err(|_| bad())?),
                None => None,
            },
            offset: match attr("offset") {
                Some(s) => Some(s.parse().map_err(|_| bad())?),
                None => None,
            },
            after_version: match attr("after") {
                Some(s) => Some(s.parse().map_err(|_| bad())?),
                None => None,
            },
            snapshot: match attr("snapshot") {
                Some(s) => Some(s.parse().map_err(|_| bad())?),
                None => None,
            },
        })
    }
}

/// `<version>!<MM/dd/yyyy HH:mm:ss>`, the shape of the documented delta tokens
/// (`919042!08/22/2017 08:10:44`).
fn encode_delta_token(version: i64, at_ms: i64) -> String {
    let iso = format_datetime(at_ms - at_ms.rem_euclid(1000));
    // iso: YYYY-MM-DDTHH:MM:SSZ
    let (date, time) = iso.split_once('T').unwrap_or((&iso, "00:00:00Z"));
    let mut d = date.split('-');
    let (y, mo, day) = (
        d.next().unwrap_or("1970"),
        d.next().unwrap_or("01"),
        d.next().unwrap_or("01"),
    );
    format!("{version}!{mo}/{day}/{y} {}", time.trim_end_matches('Z'))
}

fn decode_delta_token(token: &str) -> Option<(i64, i64)> {
    let (v, when) = token.split_once('!')?;
    let version = v.parse().ok()?;
    let (date, time) = when.split_once(' ')?;
    let mut d = date.split('/');
    let (mo, day, y) = (d.next()?, d.next()?, d.next()?);
    let ms = parse_datetime(&format!("{y}-{mo}-{day}T{time}Z"))?;
    Some((version, ms))
}

fn collection_context(ctx: &Ctx<'_>, set: &str, select: Option<&[String]>) -> String {
    match select {
        Some(s) => format!("{}$metadata#{}({})", ctx.base, set, s.join(",")),
        None => format!("{}$metadata#{}", ctx.base, set),
    }
}

fn link(ctx: &Ctx<'_>, set: &str, pairs: &[(String, String)]) -> String {
    format!("{}{}?{}", ctx.base, set, odata::build_query(pairs))
}

fn page_size(prefer: &Prefer) -> usize {
    prefer
        .max_page_size
        .unwrap_or(PAGE_SIZE_MAX)
        .min(PAGE_SIZE_MAX)
}

fn preference_applied(prefer: &Prefer, tracking: bool) -> Option<String> {
    let mut applied = Vec::new();
    if tracking {
        applied.push("odata.track-changes".to_string());
    }
    if let Some(n) = prefer.max_page_size {
        applied.push(format!("odata.maxpagesize={}", n.min(PAGE_SIZE_MAX)));
    }
    if prefer.include_annotations {
        applied.push("odata.include-annotations=\"*\"".to_string());
    }
    (!applied.is_empty()).then(|| applied.join(","))
}

fn resolve_select(
    table: &Table,
    select: &Option<Vec<String>>,
) -> Result<Option<Vec<String>>, ApiError> {
    match select {
        None => Ok(None),
        Some(list) => list
            .iter()
            .map(|s| resolve_prop(table, s))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

fn check_filter_props(
    table: &Table,
    filter: &Option<Filter>,
    orderby: &[OrderBy],
) -> Result<(), ApiError> {
    let mut props = Vec::new();
    if let Some(f) = filter {
        f.props(&mut props);
    }
    props.extend(orderby.iter().map(|o| o.prop.clone()));
    for p in props {
        resolve_prop(table, &p)?;
    }
    Ok(())
}

/// `GET /<set>`: a query, a change-tracking first read, or a delta read.
fn list(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
) -> Result<EmuResponse, ApiError> {
    let q = parse_list_query(&req.query)?;
    let prefer = req.prefer();
    let cookie = q.skiptoken.as_deref().map(Cookie::decode).transpose()?;
    let select = resolve_select(table, &q.select)?;
    check_filter_props(table, &q.filter, &q.orderby)?;
    let id_key = table.primary_id_column();
    let size = page_size(&prefer);
    if let Some(token) = &q.deltatoken {
        return delta(ctx, conn, req, table, &q, token, cookie, select, &prefer);
    }
    let tracking = prefer.track_changes || cookie.as_ref().is_some_and(|c| c.snapshot.is_some());
    if tracking {
        // use-change-tracking-synchronize-data-external-systems.md: only $select is allowed.
        for (opt, present) in [
            ("filter", q.filter.is_some()),
            ("orderby", !q.orderby.is_empty()),
            ("top", q.top.is_some()),
        ] {
            if present {
                return Err(ApiError::query(format!(
                    "The \"${opt}\" query parameter isn't supported when Change Tracking is enabled."
                )));
            }
        }
    }
    let snapshot = match (&cookie, tracking) {
        (
            Some(Cookie {
                snapshot: Some(s), ..
            }),
            _,
        ) => Some(*s),
        (_, true) => Some(store::current_version(conn)?),
        _ => None,
    };
    let caller_ids = ctx.caller_ids();
    let rows = store::all_rows(conn, &table.name)?;
    let mut items: Vec<(Uuid, Map<String, J>)> = rows
        .iter()
        .filter(|r| ctx.caller.can_read(table.ownership, &r.values))
        .map(|r| (r.id, wire_row(table, r, prefer.include_annotations)))
        .filter(|(_, m)| {
            q.filter.as_ref().is_none_or(|f| {
                f.eval(
                    &|p| json_lit(m, &resolve_prop(table, p).unwrap_or_default()),
                    &caller_ids,
                )
            })
        })
        .collect();
    let offset_mode = !q.orderby.is_empty() || q.top.is_some();
    if !q.orderby.is_empty() {
        let keys: Vec<(String, bool)> = q
            .orderby
            .iter()
            .map(|o| {
                (
                    resolve_prop(table, &o.prop).unwrap_or_default(),
                    o.descending,
                )
            })
            .collect();
        items.sort_by(|(ia, a), (ib, b)| {
            for (k, desc) in &keys {
                let ord = json_lit(a, k).sort_cmp(&json_lit(b, k));
                let ord = if *desc { ord.reverse() } else { ord };
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
            }
            ia.cmp(ib)
        });
    }
    if let Some(top) = q.top {
        items.truncate(top);
    }
    let page_no = cookie.as_ref().map_or(1, |c| c.page);
    let start = if offset_mode {
        cookie.as_ref().and_then(|c| c.offset).unwrap_or(0)
    } else {
        match cookie.as_ref().and_then(|c| c.last_id) {
            Some(last) => items.partition_point(|(id, _)| *id <= last),
            None => 0,
        }
    };
    let start = start.min(items.len());
    let end = (start + size).min(items.len());
    let more = end < items.len();
    let last_id = end
        .checked_sub(1)
        .and_then(|i| items.get(i))
        .map(|(id, _)| *id);
    let page: Vec<J> = items
        .drain(start..end)
        .map(|(_, m)| J::Object(project(m, select.as_deref(), &id_key)))
        .collect();
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        json!(collection_context(
            ctx,
            &table.entity_set,
            q.select.as_deref()
        )),
    );
    body.insert("value".into(), J::Array(page));
    if more {
        let next = Cookie {
            page: page_no + 1,
            last_id: if offset_mode { None } else { last_id },
            offset: offset_mode.then_some(end),
            after_version: None,
            snapshot,
        };
        let mut pairs = q.pairs.clone();
        pairs.push(("$skiptoken".into(), next.encode()));
        body.insert(
            "@odata.nextLink".into(),
            json!(link(ctx, &table.entity_set, &pairs)),
        );
    } else if let Some(snap) = snapshot {
        let mut pairs: Vec<(String, String)> = q
            .pairs
            .iter()
            .filter(|(k, _)| k == "$select")
            .cloned()
            .collect();
        pairs.push(("$deltatoken".into(), encode_delta_token(snap, now_ms())));
        body.insert(
            "@odata.deltaLink".into(),
            json!(link(ctx, &table.entity_set, &pairs)),
        );
    }
    let mut resp = EmuResponse::json(200, &J::Object(body));
    if let Some(applied) = preference_applied(&prefer, tracking) {
        resp = resp.with("Preference-Applied", applied);
    }
    Ok(resp)
}

/// A delta read: rows changed and rows deleted since the token, in version order.
#[allow(clippy::too_many_arguments)]
fn delta(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    q: &ListQuery,
    token: &str,
    cookie: Option<Cookie>,
    select: Option<Vec<String>>,
    prefer: &Prefer,
) -> Result<EmuResponse, ApiError> {
    let _ = req;
    for (opt, present) in [
        ("filter", q.filter.is_some()),
        ("orderby", !q.orderby.is_empty()),
        ("top", q.top.is_some()),
    ] {
        if present {
            return Err(ApiError::query(format!(
                "The \"${opt}\" query parameter isn't supported when Change Tracking is enabled."
            )));
        }
    }
    let (since, issued_ms) = decode_delta_token(token).ok_or_else(|| {
        ApiError::query("The $deltatoken is not valid; use the @odata.deltaLink as returned.")
    })?;
    let retention_ms = ctx.state.config.change_tracking_retention.as_millis() as i64;
    if now_ms() - issued_ms > retention_ms {
        // use-change-tracking-synchronize-data-external-systems.md: changes older than
        // ExpireChangeTrackingInDays are gone; the client must do a full sync.
        return Err(ApiError::new(
            400,
            errors::CHANGE_TRACKING_EXPIRED,
            "Version stamp associated with the client has expired. Please perform a full sync.",
        ));
    }
    let upto = match cookie.as_ref().and_then(|c| c.snapshot) {
        Some(s) => s,
        None => store::current_version(conn)?,
    };
    let after = cookie
        .as_ref()
        .and_then(|c| c.after_version)
        .unwrap_or(since);
    let (rows, deleted) = store::changes(conn, &table.name, after, upto)?;
    let id_key = table.primary_id_column();
    let deleted_context = format!("{}$metadata#{}/$deletedEntity", ctx.base, table.entity_set);
    let mut changes: Vec<(i64, J)> = rows
        .iter()
        .filter(|r| ctx.caller.can_read(table.ownership, &r.values))
        .map(|r| {
            (
                r.version,
                J::Object(project(
                    wire_row(table, r, prefer.include_annotations),
                    select.as_deref(),
                    &id_key,
                )),
            )
        })
        .collect();
    changes.extend(
        deleted
            .iter()
            .filter(|t| ctx.caller.can_read(table.ownership, &t.values))
            .map(|t| {
                (
                    t.version,
                    json!({"@odata.context": deleted_context, "id": t.id.to_string(), "reason": "deleted"}),
                )
            }),
    );
    changes.sort_by_key(|(v, _)| *v);
    let size = page_size(prefer);
    let more = changes.len() > size;
    changes.truncate(size);
    let last_version = changes.last().map(|(v, _)| *v);
    let mut body = Map::new();
    let context = match &q.select {
        Some(s) => format!(
            "{}$metadata#{}({})/$delta",
            ctx.base,
            table.entity_set,
            s.join(",")
        ),
        None => format!("{}$metadata#{}/$delta", ctx.base, table.entity_set),
    };
    body.insert("@odata.context".into(), json!(context));
    body.insert(
        "value".into(),
        J::Array(changes.into_iter().map(|(_, j)| j).collect()),
    );
    if more {
        let next = Cookie {
            page: cookie.as_ref().map_or(1, |c| c.page) + 1,
            after_version: last_version,
            snapshot: Some(upto),
            ..Cookie::default()
        };
        let mut pairs = q.pairs.clone();
        pairs.push(("$skiptoken".into(), next.encode()));
        body.insert(
            "@odata.nextLink".into(),
            json!(link(ctx, &table.entity_set, &pairs)),
        );
    } else {
        let mut pairs: Vec<(String, String)> = q
            .pairs
            .iter()
            .filter(|(k, _)| k == "$select")
            .cloned()
            .collect();
        pairs.push(("$deltatoken".into(), encode_delta_token(upto, now_ms())));
        body.insert(
            "@odata.deltaLink".into(),
            json!(link(ctx, &table.entity_set, &pairs)),
        );
    }
    let mut resp = EmuResponse::json(200, &J::Object(body));
    if let Some(applied) = preference_applied(prefer, true) {
        resp = resp.with("Preference-Applied", applied);
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Single rows.

fn forbidden(ctx: &Ctx<'_>, privilege: &str, table: &Table) -> ApiError {
    ApiError::new(
        403,
        errors::PRIVILEGE_DENIED,
        format!(
            "Principal user (Id={}, type=8) is missing prv{privilege}{} privilege",
            ctx.caller.user, table.name
        ),
    )
}

/// A readable row, or the documented 404 / a privilege error.
fn readable_row(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    id: Uuid,
) -> Result<Row, ApiError> {
    let row = store::get_row(conn, &table.name, id)?
        .ok_or_else(|| ApiError::row_not_found(&table.name, id))?;
    if !ctx.caller.can_read(table.ownership, &row.values) {
        return Err(forbidden(ctx, "Read", table));
    }
    Ok(row)
}

fn entity_body(ctx: &Ctx<'_>, req: &EmuRequest, table: &Table, row: &Row) -> Result<J, ApiError> {
    let q = parse_list_query(&req.query)?;
    let select = resolve_select(table, &q.select)?;
    let mut m = project(
        wire_row(table, row, req.prefer().include_annotations),
        select.as_deref(),
        &table.primary_id_column(),
    );
    let context = match &q.select {
        Some(s) => format!(
            "{}$metadata#{}({})/$entity",
            ctx.base,
            table.entity_set,
            s.join(",")
        ),
        None => format!("{}$metadata#{}/$entity", ctx.base, table.entity_set),
    };
    m.insert("@odata.context".into(), json!(context));
    Ok(J::Object(m))
}

fn retrieve(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    id: Uuid,
) -> Result<EmuResponse, ApiError> {
    let row = readable_row(ctx, conn, table, id)?;
    let etag = format!("W/\"{}\"", row.version);
    // perform-conditional-operations-using-web-api.md: If-None-Match with the current etag → 304.
    if req.header("if-none-match") == Some(etag.as_str()) {
        return Ok(EmuResponse::empty(304));
    }
    Ok(EmuResponse::json(200, &entity_body(ctx, req, table, &row)?).with("ETag", etag))
}

fn resolve_alternate_key(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    pairs: &[(String, String)],
    method: &str,
) -> Result<Uuid, ApiError> {
    for (col, _) in pairs {
        let c = table
            .column(col)
            .ok_or_else(|| unknown_property(table, col))?;
        if !matches!(
            c.ty,
            ColumnType::Text | ColumnType::Integer | ColumnType::Choice
        ) {
            return Err(ApiError::query(format!(
                "The emulator accepts text and number columns as alternate keys, not '{col}'."
            )));
        }
    }
    let matches = |r: &Row| {
        pairs.iter().all(|(col, v)| match r.values.get(col) {
            Some(Value::Text(t)) => t.eq_ignore_ascii_case(v),
            Some(Value::Integer(i)) => i.to_string() == *v,
            Some(Value::Choice(i)) => i.to_string() == *v,
            _ => false,
        })
    };
    let found = store::all_rows(conn, &table.name)?
        .into_iter()
        .find(|r| matches(r));
    match found {
        Some(r) => Ok(r.id),
        // An upsert through an alternate key creates a row with a derived id.
        None if method == "PATCH" => Ok(derived_id(
            &table.name,
            &pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        )),
        None => {
            let _ = ctx;
            let desc = pairs
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(",");
            Err(ApiError::new(
                404,
                errors::OBJECT_DOES_NOT_EXIST,
                format!(
                    "A record with the specified key values does not exist in {} entity ({desc})",
                    table.name
                ),
            ))
        }
    }
}

/// Parse a bind value (`/contacts(<id>)`, `contacts(<id>)`, an absolute URL, or `$1`) into an
/// entity set and an id.
fn parse_bind(ctx: &Ctx<'_>, value: &str) -> Result<(String, Uuid), ApiError> {
    let mut v = value.trim().to_string();
    if let Some(n) = v.strip_prefix('$') {
        v = ctx.content_ids.get(n).cloned().ok_or_else(|| {
            ApiError::new(
                400,
                errors::BATCH_INVALID,
                format!("Content-ID Reference: '${n}' does not exist in the batch context."),
            )
        })?;
    }
    if let Some(pos) = v.find(API_PREFIX) {
        v = v[pos + API_PREFIX.len()..].to_string();
    }
    let v = v.trim_start_matches('/');
    match parse_segment(v)? {
        (set, Key::Id(id)) => Ok((set, id)),
        _ => Err(ApiError::payload(format!(
            "The @odata.bind value '{value}' is not a reference to a row, e.g. /contacts(<guid>)."
        ))),
    }
}

/// Apply a JSON body to a row's values (create or update).
fn apply_body(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    body: &Map<String, J>,
    values: &mut BTreeMap<String, Value>,
) -> Result<(), ApiError> {
    let id_key = table.primary_id_column();
    for (key, json) in body {
        if let Some(nav) = key.strip_suffix("@odata.bind") {
            bind(ctx, conn, table, nav, json, values)?;
            continue;
        }
        if key.contains('@') || *key == id_key {
            continue; // annotations; the id is handled by the caller
        }
        // System columns Dataverse computes are ignored when sent.
        if matches!(
            key.as_str(),
            "createdon" | "modifiedon" | "versionnumber" | "owningbusinessunit"
        ) {
            continue;
        }
        if key.starts_with('_') && key.ends_with("_value") {
            return Err(ApiError::payload(
                "CRM do not support direct update of Entity Reference properties, Use Navigation properties instead.",
            ));
        }
        let col = table.column(key).ok_or_else(|| {
            ApiError::payload(format!(
                "Invalid property '{key}' was found in entity 'Microsoft.Dynamics.CRM.{}'.",
                table.name
            ))
        })?;
        match col.ty {
            ColumnType::Lookup | ColumnType::Owner => {
                return Err(ApiError::payload(format!(
                    "Set the lookup '{key}' with '{key}@odata.bind'."
                )))
            }
            ColumnType::File | ColumnType::Image => {
                return Err(ApiError::payload(format!(
                    "The file or image column '{key}' is set with PATCH .../{key} (file-column-data.md), not in the row body."
                )))
            }
            _ => {}
        }
        let value = Value::from_json(col.ty, json).map_err(|e| {
            ApiError::payload(format!(
                "Error identified in Payload provided by the user for Entity :'{}': {}",
                table.entity_set,
                e.in_column(table, key)
            ))
        })?;
        table
            .check_value(key, &value)
            .map_err(|e| ApiError::payload(e.to_string()))?;
        if value.is_null() {
            values.remove(key);
        } else {
            values.insert(key.clone(), value);
        }
    }
    Ok(())
}

fn bind(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    nav: &str,
    json: &J,
    values: &mut BTreeMap<String, Value>,
) -> Result<(), ApiError> {
    let dir = &ctx.state.directory;
    if nav == "ownerid" {
        if table.ownership == Ownership::Organization {
            return Err(ApiError::payload(format!(
                "The table '{}' is organization-owned: it has no owner.",
                table.name
            )));
        }
        let value = json.as_str().ok_or_else(|| {
            ApiError::payload(
                "ownerid@odata.bind needs \"/systemusers(<id>)\" or \"/teams(<id>)\".",
            )
        })?;
        let (set, id) = parse_bind(ctx, value)?;
        let owner = match set.as_str() {
            "systemusers" if dir.user(id).is_some() => OwnerRef {
                kind: OwnerKind::User,
                id,
            },
            "teams" if dir.team(id).is_some() => OwnerRef {
                kind: OwnerKind::Team,
                id,
            },
            "systemusers" => return Err(ApiError::row_not_found("systemuser", id)),
            "teams" => return Err(ApiError::row_not_found("team", id)),
            _ => {
                return Err(ApiError::payload(
                    "ownerid@odata.bind needs \"/systemusers(<id>)\" or \"/teams(<id>)\".",
                ))
            }
        };
        values.insert("ownerid".into(), Value::Owner(owner));
        if let Some(bu) = dir.owner_business_unit(owner) {
            values.insert("owningbusinessunit".into(), Value::Lookup(bu));
        }
        return Ok(());
    }
    // The lookup's navigation property exactly (case-sensitive, as in Dataverse):
    // `primarycontactid`, a Customer lookup's typed `parentcustomerid_account`, a custom
    // lookup's SchemaName. The column's own name is no navigation property when it differs.
    let col = table
        .columns
        .iter()
        .filter(|c| c.ty == ColumnType::Lookup && c.target.is_some())
        .find(|c| nav == c.navigation_property())
        .ok_or_else(|| {
            ApiError::payload(format!(
                "An undeclared property '{nav}' which only has property annotations in the payload but no property value was found in the payload. In OData, only declared navigation properties and declared named streams can be represented as properties without values."
            ))
        })?;
    if json.is_null() {
        values.remove(&col.name);
        return Ok(());
    }
    let value = json.as_str().ok_or_else(|| {
        ApiError::payload(format!(
            "{nav}@odata.bind needs a string like \"/<set>(<id>)\"."
        ))
    })?;
    let (set, id) = parse_bind(ctx, value)?;
    let target_name = col.target.clone().unwrap_or_default();
    let target = ctx
        .state
        .schema
        .table(&target_name)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if set != target.entity_set {
        return Err(ApiError::payload(format!(
            "{nav}@odata.bind must reference '{}', not '{set}'.",
            target.entity_set
        )));
    }
    if store::get_row(conn, &target.name, id)?.is_none() {
        return Err(ApiError::row_not_found(&target.name, id));
    }
    values.insert(col.name.clone(), Value::Lookup(id));
    Ok(())
}

fn parse_json_body(req: &EmuRequest) -> Result<Map<String, J>, ApiError> {
    if req.body.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<J>(&req.body) {
        Ok(J::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::payload("The request body must be a JSON object.")),
        Err(e) => Err(ApiError::payload(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}

fn entity_id_url(ctx: &Ctx<'_>, table: &Table, id: Uuid) -> String {
    format!("{}{}({})", ctx.base, table.entity_set, id)
}

/// Create a row with `id` from a body; returns the stored row.
fn insert_row(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    id: Uuid,
    body: &Map<String, J>,
    extra: &BTreeMap<String, Value>,
) -> Result<Row, ApiError> {
    let mut values = extra.clone();
    if table.ownership == Ownership::UserOrTeam {
        let me = OwnerRef {
            kind: OwnerKind::User,
            id: ctx.caller.user,
        };
        values.insert("ownerid".into(), Value::Owner(me));
        values.insert(
            "owningbusinessunit".into(),
            Value::Lookup(ctx.caller.business_unit),
        );
    }
    values.insert(
        "statecode".into(),
        Value::Choice(fieldsync_store::STATE_ACTIVE),
    );
    apply_body(ctx, conn, table, body, &mut values)?;
    let now = now_ms();
    values.insert("createdon".into(), Value::DateTime(now));
    values.insert("modifiedon".into(), Value::DateTime(now));
    let row = Row {
        id,
        version: store::next_version(conn)?,
        values,
    };
    store::put_row(conn, &table.name, &row)?;
    Ok(row)
}

fn created_response(
    ctx: &Ctx<'_>,
    req: &EmuRequest,
    table: &Table,
    row: &Row,
    status_with_body: u16,
) -> Result<EmuResponse, ApiError> {
    let url = entity_id_url(ctx, table, row.id);
    let prefer = req.prefer();
    let resp = if prefer.return_representation {
        EmuResponse::json(status_with_body, &entity_body(ctx, req, table, row)?)
            .with("Preference-Applied", "return=representation")
    } else {
        EmuResponse::empty(204)
    };
    Ok(resp
        .with("OData-EntityId", url.clone())
        .with("Location", url)
        .with("ETag", format!("W/\"{}\"", row.version)))
}

/// `POST /<set>` (create-entity-web-api.md): 204 + `OData-EntityId`, or 201 with the row.
fn create(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
) -> Result<EmuResponse, ApiError> {
    let body = parse_json_body(req)?;
    let id = match body.get(&table.primary_id_column()) {
        Some(J::String(s)) => Uuid::parse_str(s)
            .map_err(|_| ApiError::payload(format!("'{s}' is not a valid GUID.")))?,
        Some(_) => return Err(ApiError::payload("The primary id must be a GUID string.")),
        None => Uuid::new_v4(),
    };
    if store::get_row(conn, &table.name, id)?.is_some() {
        return Err(ApiError::new(
            412,
            errors::DUPLICATE_RECORD,
            "A record with matching key values already exists.",
        ));
    }
    let row = insert_row(ctx, conn, table, id, &body, &BTreeMap::new())?;
    tracing::debug!(table = %table.name, %id, version = row.version, "created");
    created_response(ctx, req, table, &row, 201)
}

fn parse_etag(v: &str) -> Option<i64> {
    v.trim()
        .strip_prefix("W/")
        .unwrap_or(v.trim())
        .trim_matches('"')
        .parse()
        .ok()
}

/// Check `If-Match` against an existing row (optimistic-concurrency: 412 on mismatch).
fn check_if_match(req: &EmuRequest, row: &Row) -> Result<(), ApiError> {
    if let Some(m) = req.header("if-match") {
        if m.trim() != "*" && parse_etag(m) != Some(row.version) {
            // perform-conditional-operations-using-web-api.md, "Apply optimistic concurrency".
            return Err(ApiError::new(
                412,
                errors::CONCURRENCY_VERSION_MISMATCH,
                "The version of the existing record doesn't match the RowVersion property provided.",
            ));
        }
    }
    Ok(())
}

/// `PATCH /<set>(<id>)`: update, or create (upsert); `If-Match`/`If-None-Match` limit it.
fn upsert(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    id: Uuid,
    key: &Key,
) -> Result<EmuResponse, ApiError> {
    let body = parse_json_body(req)?;
    let existing = store::get_row(conn, &table.name, id)?;
    match existing {
        None => {
            if req.header("if-match").is_some() {
                // perform-conditional-operations-using-web-api.md, "Prevent create in upsert".
                return Err(ApiError::row_not_found(&table.name, id));
            }
            let mut extra = BTreeMap::new();
            if let Key::Named(pairs) = key {
                for (k, v) in pairs {
                    if let Some(c) = table.column(k) {
                        let value =
                            Value::parse(c.ty, v).map_err(|e| ApiError::payload(e.to_string()))?;
                        extra.insert(k.clone(), value);
                    }
                }
            }
            let row = insert_row(ctx, conn, table, id, &body, &extra)?;
            tracing::debug!(table = %table.name, %id, version = row.version, "upsert created");
            created_response(ctx, req, table, &row, 201)
        }
        Some(mut row) => {
            if req.header("if-none-match").map(str::trim) == Some("*") {
                // perform-conditional-operations-using-web-api.md, "Prevent update in upsert".
                return Err(ApiError::new(
                    412,
                    errors::DUPLICATE_RECORD,
                    "A record with matching key values already exists.",
                ));
            }
            check_if_match(req, &row)?;
            if !ctx.caller.can_read(table.ownership, &row.values) {
                return Err(forbidden(ctx, "Write", table));
            }
            apply_body(ctx, conn, table, &body, &mut row.values)?;
            row.values
                .insert("modifiedon".into(), Value::DateTime(now_ms()));
            row.version = store::next_version(conn)?;
            store::put_row(conn, &table.name, &row)?;
            tracing::debug!(table = %table.name, %id, version = row.version, "updated");
            created_response(ctx, req, table, &row, 200)
        }
    }
}

/// `DELETE /<set>(<id>)`: 204, or the documented 404.
fn delete(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    id: Uuid,
) -> Result<EmuResponse, ApiError> {
    let row = store::get_row(conn, &table.name, id)?
        .ok_or_else(|| ApiError::row_not_found(&table.name, id))?;
    check_if_match(req, &row)?;
    if !ctx.caller.can_read(table.ownership, &row.values) {
        return Err(forbidden(ctx, "Delete", table));
    }
    let version = store::next_version(conn)?;
    store::delete_row(conn, &table.name, &row, version)?;
    tracing::debug!(table = %table.name, %id, version, "deleted");
    Ok(EmuResponse::empty(204))
}

/// `GET|PUT|DELETE /<set>(<id>)/<column>`: one property (update-delete-entities-using-web-api.md).
fn property(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    id: Uuid,
    column: &str,
    tail: &[&str],
) -> Result<EmuResponse, ApiError> {
    let wire = resolve_prop(table, column)?;
    match (req.method.as_str(), tail) {
        ("GET", []) | ("GET", ["$value"]) => {
            let row = readable_row(ctx, conn, table, id)?;
            let m = wire_row(table, &row, false);
            let v = m.get(&wire).cloned().unwrap_or(J::Null);
            if v.is_null() {
                return Ok(EmuResponse::empty(204));
            }
            if tail == ["$value"] {
                let text = match &v {
                    J::String(s) => s.clone(),
                    other => other.to_string(),
                };
                return Ok(EmuResponse {
                    status: 200,
                    headers: vec![("Content-Type".into(), "text/plain".into())],
                    body: text.into_bytes(),
                });
            }
            Ok(EmuResponse::json(
                200,
                &json!({
                    "@odata.context": format!("{}$metadata#{}({})/{}", ctx.base, table.entity_set, id, wire),
                    "value": v
                }),
            ))
        }
        ("PUT", []) | ("DELETE", []) => {
            let mut row = store::get_row(conn, &table.name, id)?
                .ok_or_else(|| ApiError::row_not_found(&table.name, id))?;
            if !ctx.caller.can_read(table.ownership, &row.values) {
                return Err(forbidden(ctx, "Write", table));
            }
            let value = if req.method == "PUT" {
                parse_json_body(req)?.remove("value").unwrap_or(J::Null)
            } else {
                J::Null
            };
            let mut body = Map::new();
            body.insert(column.to_string(), value);
            apply_body(ctx, conn, table, &body, &mut row.values)?;
            row.values
                .insert("modifiedon".into(), Value::DateTime(now_ms()));
            row.version = store::next_version(conn)?;
            store::put_row(conn, &table.name, &row)?;
            Ok(EmuResponse::empty(204))
        }
        _ => Err(method_not_allowed(&req.method, &req.path)),
    }
}

/// Bump a row's version after one of its file columns changed.
pub fn touch_row(conn: &Connection, table: &Table, row: &mut Row) -> Result<(), ApiError> {
    row.values
        .insert("modifiedon".into(), Value::DateTime(now_ms()));
    row.version = store::next_version(conn)?;
    store::put_row(conn, &table.name, row)
}

/// A row the caller may write, for file operations.
pub fn writable_row(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    id: Uuid,
) -> Result<Row, ApiError> {
    let row = store::get_row(conn, &table.name, id)?
        .ok_or_else(|| ApiError::row_not_found(&table.name, id))?;
    if !ctx.caller.can_read(table.ownership, &row.values) {
        return Err(forbidden(ctx, "Write", table));
    }
    Ok(row)
}

/// A row the caller may read, for file operations.
pub fn visible_row(
    ctx: &Ctx<'_>,
    conn: &Connection,
    table: &Table,
    id: Uuid,
) -> Result<Row, ApiError> {
    readable_row(ctx, conn, table, id)
}

// ---------------------------------------------------------------------------------------------
// Metadata and security entity sets: JSON documents queried with the same engine.

fn query_json(
    ctx: &Ctx<'_>,
    req: &EmuRequest,
    context: String,
    id_key: &str,
    mut items: Vec<Map<String, J>>,
) -> Result<EmuResponse, ApiError> {
    let q = parse_list_query(&req.query)?;
    if q.deltatoken.is_some() || req.prefer().track_changes {
        return Err(ApiError::new(
            400,
            errors::NOT_SUPPORTED,
            "Change tracking is not enabled on this entity set in the emulator.",
        ));
    }
    let caller_ids = ctx.caller_ids();
    if let Some(f) = &q.filter {
        items.retain(|m| f.eval(&|p| json_lit(m, p), &caller_ids));
    }
    if !q.orderby.is_empty() {
        items.sort_by(|a, b| {
            for o in &q.orderby {
                let ord = json_lit(a, &o.prop).sort_cmp(&json_lit(b, &o.prop));
                let ord = if o.descending { ord.reverse() } else { ord };
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
            }
            std::cmp::Ordering::Equal
        });
    }
    if let Some(top) = q.top {
        items.truncate(top);
    }
    let value: Vec<J> = items
        .into_iter()
        .map(|m| J::Object(project(m, q.select.as_deref(), id_key)))
        .collect();
    let context = match &q.select {
        Some(s) => format!("{context}({})", s.join(",")),
        None => context,
    };
    Ok(EmuResponse::json(
        200,
        &json!({"@odata.context": context, "value": value}),
    ))
}

fn single_json(
    ctx: &Ctx<'_>,
    req: &EmuRequest,
    context: String,
    id_key: &str,
    m: Map<String, J>,
) -> Result<EmuResponse, ApiError> {
    let _ = ctx;
    let q = parse_list_query(&req.query)?;
    let mut m = project(m, q.select.as_deref(), id_key);
    let context = match &q.select {
        Some(s) => format!("{context}({})/$entity", s.join(",")),
        None => format!("{context}/$entity"),
    };
    m.insert("@odata.context".into(), json!(context));
    Ok(EmuResponse::json(200, &J::Object(m)))
}

/// `EntityDefinitions`, `EntityDefinitions(LogicalName='x')`, `.../Attributes`,
/// `.../ManyToOneRelationships`, `.../OneToManyRelationships` (query-metadata-web-api.md).
fn entity_definitions(
    ctx: &Ctx<'_>,
    req: &EmuRequest,
    key: &Key,
    rest: &[&str],
) -> Result<EmuResponse, ApiError> {
    let schema = &ctx.state.schema;
    let expand: Vec<String> = odata::parse_query(&req.query)
        .into_iter()
        .filter(|(k, _)| k == "$expand")
        .flat_map(|(_, v)| odata::parse_select(&v))
        .collect();
    let with_nav = |t: &Table, mut m: Map<String, J>| {
        for e in &expand {
            let name = e.split('(').next().unwrap_or(e);
            match name {
                "Attributes" => {
                    m.insert("Attributes".into(), J::Array(metadata::attributes(t)));
                }
                "ManyToOneRelationships" => {
                    m.insert(
                        "ManyToOneRelationships".into(),
                        J::Array(metadata::many_to_one(schema, t)),
                    );
                }
                "OneToManyRelationships" => {
                    m.insert(
                        "OneToManyRelationships".into(),
                        J::Array(metadata::one_to_many(schema, t)),
                    );
                }
                _ => {}
            }
        }
        m
    };
    // $expand is allowed here (and only here): strip it before the shared query parsing, and
    // keep the expanded collections when `$select` narrows the properties.
    let expanded: Vec<String> = expand
        .iter()
        .map(|e| e.split('(').next().unwrap_or(e).to_string())
        .collect();
    let stripped = EmuRequest {
        query: odata::build_query(
            &odata::parse_query(&req.query)
                .into_iter()
                .filter(|(k, _)| k != "$expand")
                .map(|(k, v)| {
                    if k == "$select" && !expanded.is_empty() {
                        (k, format!("{v},{}", expanded.join(",")))
                    } else {
                        (k, v)
                    }
                })
                .collect::<Vec<_>>(),
        ),
        ..req.clone()
    };
    let context = format!("{}$metadata#EntityDefinitions", ctx.base);
    let table = match key {
        Key::None => {
            if !rest.is_empty() {
                return Err(ApiError::no_segment(rest[0]));
            }
            let items = schema
                .tables()
                .map(|t| with_nav(t, metadata::entity(t)))
                .collect();
            return query_json(ctx, &stripped, context, "MetadataId", items);
        }
        Key::Named(pairs) => {
            let name = pairs
                .iter()
                .find(|(k, _)| k == "LogicalName")
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| {
                    ApiError::query(
                        "EntityDefinitions is keyed by LogicalName='<name>' or MetadataId.",
                    )
                })?;
            schema.tables().find(|t| t.name == name)
        }
        Key::Id(id) => schema
            .tables()
            .find(|t| derived_id("entity", &t.name) == *id),
    };
    let table = table.ok_or_else(|| {
        ApiError::new(
            404,
            errors::OBJECT_DOES_NOT_EXIST,
            "Could not find entity definition.",
        )
    })?;
    let quoted = format!("{}$metadata#EntityDefinitions('{}')", ctx.base, table.name);
    match rest {
        [] => single_json(
            ctx,
            &stripped,
            context,
            "MetadataId",
            with_nav(table, metadata::entity(table)),
        ),
        ["Attributes"] => {
            let items = metadata::attributes(table)
                .into_iter()
                .filter_map(|a| a.as_object().cloned())
                .collect();
            query_json(
                ctx,
                &stripped,
                format!("{quoted}/Attributes"),
                "MetadataId",
                items,
            )
        }
        ["ManyToOneRelationships"] => {
            let items = metadata::many_to_one(schema, table)
                .into_iter()
                .filter_map(|a| a.as_object().cloned())
                .collect();
            query_json(
                ctx,
                &stripped,
                format!("{quoted}/ManyToOneRelationships"),
                "MetadataId",
                items,
            )
        }
        ["OneToManyRelationships"] => {
            let items = metadata::one_to_many(schema, table)
                .into_iter()
                .filter_map(|a| a.as_object().cloned())
                .collect();
            query_json(
                ctx,
                &stripped,
                format!("{quoted}/OneToManyRelationships"),
                "MetadataId",
                items,
            )
        }
        [other, ..] => Err(ApiError::no_segment(other)),
    }
}

fn obj(v: J) -> Map<String, J> {
    match v {
        J::Object(m) => m,
        _ => Map::new(),
    }
}

/// `businessunits`, `systemusers`, `teams`, `roles`, `teammemberships`,
/// `systemuserrolescollection`: the directory as Dataverse's security tables.
fn security_set(
    ctx: &Ctx<'_>,
    req: &EmuRequest,
    set: &str,
    key: &Key,
) -> Result<EmuResponse, ApiError> {
    let d = &ctx.state.directory;
    let (id_key, items): (&str, Vec<Map<String, J>>) = match set {
        "businessunits" => (
            "businessunitid",
            d.business_units
                .iter()
                .map(|b| {
                    obj(json!({"businessunitid": b.id.to_string(), "name": b.name,
                        "_parentbusinessunitid_value": b.parent.map(|p| p.to_string())}))
                })
                .collect(),
        ),
        "systemusers" => (
            "systemuserid",
            d.users
                .iter()
                .map(|u| {
                    obj(json!({"systemuserid": u.id.to_string(), "domainname": u.domain_name,
                        "internalemailaddress": u.domain_name, "fullname": u.full_name,
                        "isdisabled": false, "accessmode": 0,
                        "_businessunitid_value": u.business_unit.to_string()}))
                })
                .collect(),
        ),
        "teams" => (
            "teamid",
            d.teams
                .iter()
                .map(|t| {
                    obj(json!({"teamid": t.id.to_string(), "name": t.name, "teamtype": 0,
                        "_businessunitid_value": t.business_unit.to_string()}))
                })
                .collect(),
        ),
        "roles" => (
            "roleid",
            d.roles
                .iter()
                .map(|r| {
                    obj(json!({"roleid": r.id.to_string(), "name": r.name,
                        "_businessunitid_value": r.business_unit.to_string(),
                        // Not a Dataverse column: the emulator's one read depth for every table.
                        "fieldsync_readdepth": r.read}))
                })
                .collect(),
        ),
        "teammemberships" => (
            "teammembershipid",
            d.teams
                .iter()
                .flat_map(|t| {
                    t.members.iter().map(move |u| {
                        obj(json!({"teammembershipid": derived_id("teammembership", &format!("{}:{u}", t.id)).to_string(),
                            "teamid": t.id.to_string(), "systemuserid": u.to_string()}))
                    })
                })
                .collect(),
        ),
        _ => (
            "systemuserroleid",
            d.users
                .iter()
                .flat_map(|u| {
                    u.roles.iter().map(move |r| {
                        obj(json!({"systemuserroleid": derived_id("systemuserrole", &format!("{}:{r}", u.id)).to_string(),
                            "systemuserid": u.id.to_string(), "roleid": r.to_string()}))
                    })
                })
                .collect(),
        ),
    };
    let context = format!("{}$metadata#{}", ctx.base, set);
    match key {
        Key::None => query_json(ctx, req, context, id_key, items),
        Key::Id(id) => {
            let found = items
                .into_iter()
                .find(|m| m.get(id_key).and_then(J::as_str) == Some(id.to_string().as_str()))
                .ok_or_else(|| ApiError::row_not_found(set.trim_end_matches('s'), *id))?;
            single_json(ctx, req, context, id_key, found)
        }
        Key::Named(_) => Err(ApiError::query(format!("'{set}' is keyed by id only."))),
    }
}

// ---------------------------------------------------------------------------------------------
// The field-service example.

fn field_service_directory(admin_token: &str) -> Directory {
    let mut d = Directory::with_root("Contoso", admin_token);
    let root = d.root().unwrap_or_default();
    let north = d.add_business_unit("Contoso North", root);
    let south = d.add_business_unit("Contoso South", root);
    let ana = d.add_user(
        "ana@contoso.com",
        "Ana Silva",
        north,
        &["Basic User", "Field Technician"],
        "ana-token",
    );
    d.add_user(
        "ben@contoso.com",
        "Ben Okafor",
        south,
        &["Basic User", "Field Technician"],
        "ben-token",
    );
    let maria = d.add_user(
        "maria@contoso.com",
        "Maria Garcia",
        north,
        &["Field Manager"],
        "maria-token",
    );
    d.add_user(
        "olivia@contoso.com",
        "Olivia Chen",
        root,
        &["Regional Manager"],
        "olivia-token",
    );
    d.add_team("North technicians", north, vec![ana, maria]);
    d
}

fn seed_field_service(state: &AppState, conn: &Connection) -> anyhow::Result<()> {
    let d = &state.directory;
    let user = |name: &str| OwnerRef {
        kind: OwnerKind::User,
        id: derived_id("systemuser", name),
    };
    let team = OwnerRef {
        kind: OwnerKind::Team,
        id: derived_id("team", "North technicians"),
    };
    let now = now_ms();
    let put = |table: &str,
               key: &str,
               owner: Option<OwnerRef>,
               cols: Vec<(&str, Value)>|
     -> anyhow::Result<Uuid> {
        let id = derived_id(table, key);
        let mut values: BTreeMap<String, Value> =
            cols.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Some(o) = owner {
            values.insert("ownerid".into(), Value::Owner(o));
            if let Some(bu) = d.owner_business_unit(o) {
                values.insert("owningbusinessunit".into(), Value::Lookup(bu));
            }
        }
        values.insert("statecode".into(), Value::Choice(0));
        values.insert("createdon".into(), Value::DateTime(now));
        values.insert("modifiedon".into(), Value::DateTime(now));
        let row = Row {
            id,
            version: store::next_version(conn)?,
            values,
        };
        store::put_row(conn, table, &row)?;
        Ok(id)
    };
    let text = |s: &str| Value::Text(s.to_string());
    let acme = put(
        "account",
        "Acme Coffee",
        Some(team),
        vec![
            ("name", text("Acme Coffee")),
            ("accountnumber", text("ACC-001")),
            ("address1_city", text("Oslo")),
            ("industrycode", Value::Choice(1)),
        ],
    )?;
    let fabrikam = put(
        "account",
        "Fabrikam Bakery",
        Some(user("ben@contoso.com")),
        vec![
            ("name", text("Fabrikam Bakery")),
            ("accountnumber", text("ACC-002")),
            ("address1_city", text("Bergen")),
            ("industrycode", Value::Choice(2)),
        ],
    )?;
    put(
        "account",
        "Northwind Traders",
        Some(user("maria@contoso.com")),
        vec![
            ("name", text("Northwind Traders")),
            ("accountnumber", text("ACC-003")),
            ("address1_city", text("Trondheim")),
            ("industrycode", Value::Choice(3)),
        ],
    )?;
    put(
        "contact",
        "Jo Berg",
        Some(user("ana@contoso.com")),
        vec![
            ("firstname", text("Jo")),
            ("lastname", text("Berg")),
            ("emailaddress1", text("jo@acme.example")),
            ("parentcustomerid", Value::Lookup(acme)),
        ],
    )?;
    put(
        "contact",
        "Kim Dahl",
        Some(user("ben@contoso.com")),
        vec![
            ("firstname", text("Kim")),
            ("lastname", text("Dahl")),
            ("emailaddress1", text("kim@fabrikam.example")),
            ("parentcustomerid", Value::Lookup(fabrikam)),
        ],
    )?;
    let grinder = put(
        "product",
        "Grinder G2",
        None,
        vec![
            ("name", text("Grinder G2")),
            ("productnumber", text("P-100")),
            (
                "price",
                Value::Decimal(rust_decimal::Decimal::new(129900, 2)),
            ),
            ("quantityonhand", Value::Integer(12)),
        ],
    )?;
    let case = put(
        "incident",
        "Grinder jammed",
        Some(team),
        vec![
            ("title", text("Grinder jammed")),
            ("ticketnumber", text("CAS-1001")),
            ("prioritycode", Value::Choice(1)),
            ("customerid", Value::Lookup(acme)),
            ("productid", Value::Lookup(grinder)),
        ],
    )?;
    put(
        "msdyn_workorder",
        "WO-0001",
        Some(user("ana@contoso.com")),
        vec![
            ("msdyn_name", text("WO-0001")),
            (
                "msdyn_workordersummary",
                Value::Memo("Replace burrs".into()),
            ),
            ("msdyn_systemstatus", Value::Choice(690970000)),
            ("msdyn_serviceaccount", Value::Lookup(acme)),
            ("msdyn_servicerequest", Value::Lookup(case)),
        ],
    )?;
    put(
        "msdyn_workorder",
        "WO-0002",
        Some(user("ben@contoso.com")),
        vec![
            ("msdyn_name", text("WO-0002")),
            ("msdyn_systemstatus", Value::Choice(690970001)),
            ("msdyn_serviceaccount", Value::Lookup(fabrikam)),
        ],
    )?;
    Ok(())
}
