//! `fieldsync dataverse-emulator`: a local stand-in for the part of Microsoft Dataverse's Web API
//! (OData v4) that fieldsync's hub uses, with Dataverse's documented request and response shapes.
//!
//! What it serves, under `/api/data/v9.2/`:
//! - entity sets of the loaded schema: `GET` with `$select`, `$filter`, `$orderby`, `$top`,
//!   paging (`Prefer: odata.maxpagesize`), change tracking (`Prefer: odata.track-changes`,
//!   `$deltatoken`); `GET`/`PATCH`/`DELETE` by id, `POST`; `If-Match`/`If-None-Match`;
//! - `$batch` with change sets; file and image columns (single and chunked upload, ranged
//!   download);
//! - `EntityDefinitions`, and the security entity sets `businessunits`, `systemusers`, `teams`,
//!   `roles`, `teammemberships`, `systemuserrolescollection` (read only);
//! - bearer-token callers, per-caller row visibility, and service-protection `429`s.
//!
//! Module map: [`odata`] parses query options and evaluates filters (no I/O), [`store`] keeps
//! rows, tombstones, files and upload sessions in SQLite under `--data`, [`security`] maps tokens
//! to users and decides visibility, [`metadata`] renders `EntityDefinitions`, [`batch`] parses
//! and writes `multipart/mixed`, [`files`] handles file columns, [`routes`] is the dispatcher
//! (the same code path serves top-level requests and requests inside a `$batch`).
//!
//! Where Microsoft's documentation gives a status, header, error code or message, the emulator
//! uses it (each use names its source file in `MicrosoftDocs/powerapps-docs`). Where the docs are
//! silent the emulator picks a value and says so next to the constant in [`errors`].
//!
//! Not emulated (answered with an error, or simplified as noted): `$expand` (except on
//! `EntityDefinitions`), `$count`, `$apply`, FetchXML, `$metadata` CSDL; impersonation
//! (`CallerObjectId`); the `mobileofflineprofile*` tables and `roleprivileges`; per-table and
//! per-privilege depths, sharing and the manager hierarchy ([`security`] has the rule used);
//! cascade behaviour of relationships on delete (lookups may dangle); alternate keys are not
//! declared, any text or number column works as one; the execution-time limit (20 minutes per
//! 5 minutes) is not measured, the request-count and concurrency limits are, and a `$batch`
//! counts as one request; images are not resized for thumbnails ([`files`]).
//!
//! For tests only, `--test-faults` (hidden, off by default) serves `POST
//! /_test/faults?drop_write_replies=N&fail_file_downloads=M&fail_reads_of=ID` (each may be left
//! out): the next N requests that apply a write are applied and their connection closed with no
//! reply, as a reset connection would leave a client; the next M file downloads answer `503`;
//! reads of row ID by id answer `500` until an empty ID clears it; with `fail_writes=K`, the
//! next K single write requests (not a `$batch`) answer `503` with nothing applied; with
//! `fail_queries_of=SET`, queries of that entity set (its pages and changes) answer `500` until
//! an empty SET clears it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

mod batch;
mod errors;
mod files;
mod metadata;
mod odata;
mod routes;
mod security;
mod store;

/// The path prefix every Web API request starts with.
pub const API_PREFIX: &str = "/api/data/v9.2/";

/// `fieldsync dataverse-emulator`: serve a local Dataverse Web API emulator.
#[derive(Debug, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port; the bound address
    /// is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Directory holding the emulator's data (created if missing; survives restarts).
    #[arg(long)]
    pub data: PathBuf,
    /// Load a bundled example: `field-service` (schema, users with known tokens, seed rows).
    #[arg(long, value_name = "NAME")]
    pub example: Option<String>,
    /// Schema TOML to serve (replaces the stored schema; rows of removed tables stay stored).
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// Bearer token of the built-in administrator (System Administrator role).
    #[arg(long, default_value = "admin-token")]
    pub admin_token: String,
    /// Business units, users (with their bearer tokens), teams and roles as JSON, replacing
    /// the stored ones: `{"business_units":[{"id","name","parent"}], "users":[{"id",
    /// "domain_name","full_name","business_unit","roles":[..],"token"}], "teams":[{"id","name",
    /// "business_unit","members":[..],"roles":[..]}], "roles":[{"id","name","business_unit",
    /// "read":"user|business_unit|parent_child|organization"}]}`.
    #[arg(long)]
    pub directory: Option<PathBuf>,
    /// Requests each user may make per window before `429` (Dataverse: 6000 per 300 s).
    #[arg(long, default_value_t = 6000)]
    pub rate_limit_requests: u32,
    /// Length of the service-protection window in seconds.
    #[arg(long, default_value_t = 300)]
    pub rate_limit_window_secs: u64,
    /// Concurrent requests per user before `429` (Dataverse: 52).
    #[arg(long, default_value_t = 52)]
    pub max_concurrent_requests: u32,
    /// How long a change-tracking token stays valid, in seconds (Dataverse's
    /// `ExpireChangeTrackingInDays`, 7 days by default).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub change_tracking_retention_secs: u64,
    /// Base URL used in `@odata.context`, links and `OData-EntityId` (default: from `Host`).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Tests only: serve `POST /_test/faults?drop_write_replies=N&fail_file_downloads=M`,
    /// after which the next N requests that apply a write (`POST`, `PATCH`, `PUT`, `DELETE`
    /// that succeed; a `$batch` that applied one) have their replies lost: the connection
    /// closes before the reply is whole; and the next M file
    /// downloads (`.../$value`) answer `503`; with `fail_reads_of=ID`, reads of that row by id
    /// answer `500` (an empty ID clears it); with `fail_writes=K`, the next K single write
    /// requests answer `503` unapplied; with `fail_queries_of=SET`, queries of that entity set
    /// answer `500` (an empty SET clears it). Off by default; Dataverse has no such thing.
    #[arg(long, hide = true)]
    pub test_faults: bool,
}

/// Everything [`serve`] needs.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The data directory (`emulator.sqlite3` lives there).
    pub data_dir: PathBuf,
    /// A bundled example to load on first start (`field-service`), or none.
    pub example: Option<String>,
    /// Schema TOML text replacing the stored schema, if any.
    pub schema_toml: Option<String>,
    /// The built-in administrator's bearer token.
    pub admin_token: String,
    /// A security directory (JSON) replacing the stored one, if any.
    pub directory_json: Option<String>,
    /// Service protection: requests per user per window.
    pub rate_limit_requests: u32,
    /// Service protection: the sliding window.
    pub rate_limit_window: Duration,
    /// Service protection: concurrent requests per user.
    pub max_concurrent_requests: u32,
    /// How long a delta token stays valid.
    pub change_tracking_retention: Duration,
    /// Base URL for links, e.g. `http://127.0.0.1:8080` (default: taken from `Host`).
    pub public_url: Option<String>,
    /// Recommended chunk size for chunked file transfers (`x-ms-chunk-size`; Dataverse 4 MiB).
    pub chunk_size_bytes: u64,
    /// Tests only: serve the fault switch `/_test/faults` (see `--test-faults`).
    pub test_faults: bool,
}

impl EmulatorConfig {
    /// A configuration with Dataverse's default limits, keeping data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> EmulatorConfig {
        EmulatorConfig {
            data_dir: data_dir.into(),
            example: None,
            schema_toml: None,
            admin_token: "admin-token".to_string(),
            directory_json: None,
            rate_limit_requests: 6000,
            rate_limit_window: Duration::from_secs(300),
            max_concurrent_requests: 52,
            change_tracking_retention: Duration::from_secs(7 * 24 * 3600),
            public_url: None,
            chunk_size_bytes: 4 * 1024 * 1024,
            test_faults: false,
        }
    }
}

/// Serve the emulator on `listener` until the task is dropped or the listener fails.
pub async fn serve(config: EmulatorConfig, listener: tokio::net::TcpListener) -> Result<()> {
    let state = Arc::new(routes::AppState::open(config)?);
    let app = routes::router(state);
    axum::serve(listener, app)
        .await
        .context("emulator HTTP server failed")
}

/// Run `fieldsync dataverse-emulator` until Ctrl-C.
pub fn run(args: EmulatorArgs) -> Result<()> {
    let schema_toml = match &args.schema {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading schema {}", path.display()))?,
        ),
        None => None,
    };
    let directory_json = match &args.directory {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading directory {}", path.display()))?,
        ),
        None => None,
    };
    let config = EmulatorConfig {
        data_dir: args.data,
        example: args.example,
        schema_toml,
        admin_token: args.admin_token,
        directory_json,
        rate_limit_requests: args.rate_limit_requests,
        rate_limit_window: Duration::from_secs(args.rate_limit_window_secs),
        max_concurrent_requests: args.max_concurrent_requests,
        change_tracking_retention: Duration::from_secs(args.change_tracking_retention_secs),
        public_url: args.public_url,
        chunk_size_bytes: 4 * 1024 * 1024,
        test_faults: args.test_faults,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!("dataverse emulator listening on http://{addr}{API_PREFIX}");
        tokio::select! {
            result = serve(config, listener) => result,
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; stopping the emulator");
                Ok(())
            }
        }
    })
}
