//! Error responses: `{"error":{"code":"0x...","message":"..."}}` with an HTTP status.
//!
//! Codes and messages marked *documented* come from Microsoft's docs (file named); the others
//! are the emulator's choice where the docs show no code (their examples often leave `code`
//! empty), picked from codes Dataverse is known to use for the same condition.

use std::fmt;

/// `412`, optimistic concurrency: the row's version is not the one in `If-Match`.
/// Message documented in `webapi/perform-conditional-operations-using-web-api.md` (code empty
/// there; `0x80060882` is what Dataverse sends, per the reference notes).
pub const CONCURRENCY_VERSION_MISMATCH: &str = "0x80060882";
/// `412`, `If-None-Match: *` on an existing row (message documented in
/// `perform-conditional-operations-using-web-api.md`; code: emulator's choice, Dataverse's
/// duplicate-record code).
pub const DUPLICATE_RECORD: &str = "0x80040237";
/// `404`: a row that does not exist (message documented; code: emulator's choice,
/// Dataverse's `ObjectDoesNotExist`).
pub const OBJECT_DOES_NOT_EXIST: &str = "0x80040217";
/// Change tracking: the delta token is older than the retention (documented in
/// `use-change-tracking-synchronize-data-external-systems.md` via the SDK; the Web API's HTTP
/// status is not documented, the emulator uses `400`).
pub const CHANGE_TRACKING_EXPIRED: &str = "0x80044352";
/// `429`: too many requests in the window (documented, `api-limits.md`).
pub const RATE_LIMIT_REQUESTS: &str = "0x80072322";
/// `429`: too many concurrent requests (documented, `api-limits.md`).
pub const RATE_LIMIT_CONCURRENCY: &str = "0x80072326";
/// File larger than the column's `MaxSizeInKB` (documented, `file-column-data.md`).
pub const FILE_TOO_BIG: &str = "0x80044a02";
/// Query or URL syntax error, unknown property (emulator's choice).
pub const QUERY_SYNTAX: &str = "0x80060888";
/// A path segment that names no resource (emulator's choice).
pub const RESOURCE_NOT_FOUND: &str = "0x8006088a";
/// A request body that does not fit the entity (emulator's choice).
pub const BAD_PAYLOAD: &str = "0x80048d19";
/// The caller lacks a privilege on the row (emulator's choice, Dataverse's SecLib code).
pub const PRIVILEGE_DENIED: &str = "0x80040220";
/// No or unknown bearer token (emulator's choice).
pub const UNAUTHORIZED: &str = "0x80072560";
/// A `$batch` request that breaks the batch rules (emulator's choice).
pub const BATCH_INVALID: &str = "0x8006088b";
/// Something the emulator does not implement (emulator's choice).
pub const NOT_SUPPORTED: &str = "0x80040203";
/// The emulator's own storage failed.
pub const INTERNAL: &str = "0x80040216";

/// An error answered to the caller: status, Dataverse error code, message, extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// The `error.code` value.
    pub code: &'static str,
    /// The `error.message` value.
    pub message: String,
    /// Headers to add (e.g. `Retry-After`).
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    /// An error with no extra headers.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// `400` with a query syntax code.
    pub fn query(message: impl Into<String>) -> ApiError {
        ApiError::new(400, QUERY_SYNTAX, message)
    }

    /// `400` with a payload code.
    pub fn payload(message: impl Into<String>) -> ApiError {
        ApiError::new(400, BAD_PAYLOAD, message)
    }

    /// `404 <table> With Id = <id> Does Not Exist` (documented in
    /// `perform-conditional-operations-using-web-api.md`).
    pub fn row_not_found(table: &str, id: uuid::Uuid) -> ApiError {
        ApiError::new(
            404,
            OBJECT_DOES_NOT_EXIST,
            format!("{table} With Id = {id} Does Not Exist"),
        )
    }

    /// `404` for a path segment that names nothing.
    pub fn no_segment(segment: &str) -> ApiError {
        ApiError::new(
            404,
            RESOURCE_NOT_FOUND,
            format!("Resource not found for the segment '{segment}'."),
        )
    }

    /// `500` for a storage failure.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, INTERNAL, message)
    }

    /// Add a header to the response.
    pub fn with_header(mut self, name: &str, value: String) -> ApiError {
        self.headers.push((name.to_string(), value));
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> ApiError {
        tracing::error!(error = %e, "emulator storage error");
        ApiError::internal(format!("emulator storage error: {e}"))
    }
}
