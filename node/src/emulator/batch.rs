//! `$batch` (`webapi/execute-batch-operations-using-web-api.md`): `multipart/mixed` bodies of
//! `application/http` requests, with change sets (`multipart/mixed; boundary=changeset_...`)
//! that succeed or fail as a whole.
//!
//! - Requests run in order; each outside a change set in its own transaction, each change set in
//!   one. A failing change set is rolled back and answered with one part: the failing request's
//!   response (OData 4.0, 11.7.4).
//! - Without `Prefer: odata.continue-on-error` processing stops at the first failure and the
//!   batch's status is that failure's (the documented example answers `400` and one part);
//!   with it, the batch answers `200` and every part has its own status.
//! - `Content-ID: n` in a change set lets later parts use `$n` as a URL or an `@odata.bind`.
//! - At most [`BATCH_REQUESTS_MAX`] requests; change sets may not contain `GET`s or change sets.

use std::collections::HashMap;

use axum::http::StatusCode;
use fieldsync_node::multipart::{boundary, header_lines, split_head};
use uuid::Uuid;

use super::errors::{self, ApiError};
use super::routes::{self, Ctx, EmuRequest, EmuResponse};
use super::API_PREFIX;

/// Most requests in one batch (documented limit).
pub const BATCH_REQUESTS_MAX: usize = 1000;

/// One request inside a batch.
#[derive(Debug, Clone)]
struct Part {
    content_id: Option<String>,
    request: EmuRequest,
}

/// A top-level batch item.
#[derive(Debug, Clone)]
enum Item {
    Single(Part),
    ChangeSet(Vec<Part>),
}

fn batch_error(message: impl Into<String>) -> ApiError {
    ApiError::new(400, errors::BATCH_INVALID, message)
}

/// Split a multipart body into the parts' raw text.
fn split_parts<'a>(text: &'a str, boundary: &str) -> Result<Vec<&'a str>, ApiError> {
    let delim = format!("--{boundary}");
    let mut pos = if text.starts_with(&delim) {
        0
    } else {
        text.find(&format!("\n{delim}"))
            .map(|p| p + 1)
            .ok_or_else(|| batch_error(format!("The body has no '{delim}' delimiter.")))?
    };
    let mut parts = Vec::new();
    loop {
        let after = pos + delim.len();
        if text[after..].starts_with("--") {
            return Ok(parts);
        }
        let start = match text[after..].find('\n') {
            Some(n) => after + n + 1,
            None => return Err(batch_error("A multipart part is cut short.")),
        };
        let next = text[start.saturating_sub(1)..]
            .find(&format!("\n{delim}"))
            .map(|n| start.saturating_sub(1) + n)
            .ok_or_else(|| batch_error(format!("The body does not end with '{delim}--'.")))?;
        let content = if next >= start {
            &text[start..next]
        } else {
            ""
        };
        parts.push(content.strip_suffix('\r').unwrap_or(content));
        pos = next + 1;
    }
}

fn headers_of(head: &str) -> Vec<(String, String)> {
    header_lines(head).collect()
}

/// Parse one `application/http` part into a request.
fn parse_http(part_headers: &[(String, String)], content: &str) -> Result<Part, ApiError> {
    let content_id = part_headers
        .iter()
        .find(|(k, _)| k == "content-id")
        .map(|(_, v)| v.clone());
    let content = content.trim_start_matches(['\r', '\n']);
    let (head, body) = split_head(content);
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("").trim();
    // `METHOD <url> HTTP/1.1`; the URL may contain spaces only in the docs' placeholder
    // (`[Organization URI]/api/data/v9.2/...`), so take everything between the two.
    let (method, rest) = request_line
        .split_once(char::is_whitespace)
        .ok_or_else(|| batch_error(format!("The request line '{request_line}' has no URL.")))?;
    let method = method.to_ascii_uppercase();
    let rest = rest.trim();
    let url = match rest.rsplit_once(char::is_whitespace) {
        Some((u, version)) if version.starts_with("HTTP/") => u.trim(),
        _ => rest,
    };
    if url.is_empty() {
        return Err(batch_error(format!(
            "The request line '{request_line}' has no URL."
        )));
    }
    let path_and_query = match url.find(API_PREFIX) {
        Some(i) => &url[i + API_PREFIX.len()..],
        None => url.trim_start_matches('/'),
    };
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let headers = headers_of(&lines.collect::<Vec<_>>().join("\n"));
    let body = body.trim_end_matches(['\r', '\n']);
    Ok(Part {
        content_id,
        request: EmuRequest {
            method,
            path: super::odata::percent_decode(&path.replace('+', "%2B")),
            query: query.to_string(),
            headers,
            body: body.as_bytes().to_vec(),
        },
    })
}

fn parse_batch(content_type: &str, body: &[u8]) -> Result<Vec<Item>, ApiError> {
    let b = boundary(content_type).ok_or_else(|| {
        batch_error("A $batch needs `Content-Type: multipart/mixed; boundary=batch_<id>`.")
    })?;
    let text =
        std::str::from_utf8(body).map_err(|_| batch_error("The $batch body is not UTF-8."))?;
    let mut items = Vec::new();
    let mut count = 0usize;
    for raw in split_parts(text, &b)? {
        let (head, content) = split_head(raw);
        let headers = headers_of(head);
        let ct = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if let Some(cb) = boundary(ct) {
            let mut parts = Vec::new();
            for inner in split_parts(content, &cb)? {
                let (ihead, icontent) = split_head(inner);
                let iheaders = headers_of(ihead);
                if iheaders.iter().any(|(k, v)| {
                    k == "content-type" && v.to_ascii_lowercase().starts_with("multipart/")
                }) {
                    return Err(batch_error("Change sets cannot be nested."));
                }
                let part = parse_http(&iheaders, icontent)?;
                if part.request.method == "GET" {
                    return Err(batch_error(
                        "GET requests are not allowed inside a change set.",
                    ));
                }
                parts.push(part);
            }
            count += parts.len();
            items.push(Item::ChangeSet(parts));
        } else {
            count += 1;
            items.push(Item::Single(parse_http(&headers, content)?));
        }
        if count > BATCH_REQUESTS_MAX {
            return Err(batch_error(format!(
                "The number of requests in a batch cannot exceed {BATCH_REQUESTS_MAX}."
            )));
        }
    }
    Ok(items)
}

fn write_response(out: &mut String, content_id: Option<&str>, resp: &EmuResponse) {
    out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(id) = content_id {
        out.push_str(&format!("Content-ID: {id}\r\n"));
    }
    out.push_str("\r\n");
    let reason = StatusCode::from_u16(resp.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.push_str(&format!("HTTP/1.1 {} {}\r\n", resp.status, reason));
    out.push_str("OData-Version: 4.0\r\n");
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&String::from_utf8_lossy(&resp.body));
    out.push_str("\r\n");
}

/// The entity path (`accounts(<id>)`) a response's `OData-EntityId` names.
fn entity_path(resp: &EmuResponse) -> Option<String> {
    let url = resp.header("OData-EntityId")?;
    let i = url.find(API_PREFIX)?;
    Some(url[i + API_PREFIX.len()..].to_string())
}

/// Answer a `POST /$batch`, and whether it applied a write (a request that changes data and
/// succeeded outside a change set, or a change set committed).
pub fn handle(ctx: &Ctx<'_>, req: &EmuRequest) -> (EmuResponse, bool) {
    let span = tracing::info_span!("batch");
    let _enter = span.enter();
    if req.method != "POST" {
        let refused = ApiError::new(405, errors::NOT_SUPPORTED, "A $batch must be POSTed.");
        return (refused.into(), false);
    }
    let items = match parse_batch(req.header("content-type").unwrap_or(""), &req.body) {
        Ok(items) => items,
        Err(e) => return (e.into(), false),
    };
    let mut wrote = false;
    let continue_on_error = req.prefer().continue_on_error;
    let mut inner = Ctx {
        state: ctx.state,
        caller: ctx.caller.clone(),
        base: ctx.base.clone(),
        content_ids: HashMap::new(),
    };
    let boundary = format!("batchresponse_{}", Uuid::new_v4());
    let mut out = String::new();
    let mut first_failure: Option<u16> = None;
    let mut conn = ctx.state.db();
    for item in items {
        out.push_str(&format!("--{boundary}\r\n"));
        match item {
            Item::Single(part) => {
                let resp = routes::run_one(&inner, &mut conn, &part.request);
                wrote |= routes::is_write(&part.request.method) && resp.status < 400;
                if let (Some(id), Some(path)) = (&part.content_id, entity_path(&resp)) {
                    inner.content_ids.insert(id.clone(), path);
                }
                write_response(&mut out, part.content_id.as_deref(), &resp);
                if resp.status >= 400 {
                    first_failure.get_or_insert(resp.status);
                    if !continue_on_error {
                        break;
                    }
                }
            }
            Item::ChangeSet(parts) => {
                let tx = match conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                {
                    Ok(tx) => tx,
                    Err(e) => {
                        write_response(&mut out, None, &ApiError::from(e).into());
                        first_failure.get_or_insert(500);
                        break;
                    }
                };
                let mut answered = Vec::new();
                let mut added = Vec::new();
                let mut failed: Option<(Option<String>, EmuResponse)> = None;
                for part in parts {
                    let resp = match routes::dispatch(&inner, &tx, &part.request) {
                        Ok(r) => r,
                        Err(e) => e.into(),
                    };
                    if resp.status >= 400 {
                        failed = Some((part.content_id.clone(), resp));
                        break;
                    }
                    if let (Some(id), Some(path)) = (&part.content_id, entity_path(&resp)) {
                        inner.content_ids.insert(id.clone(), path);
                        added.push(id.clone());
                    }
                    answered.push((part.content_id, resp));
                }
                let failed = match failed {
                    None => match tx.commit() {
                        Ok(()) => {
                            wrote |= !answered.is_empty();
                            None
                        }
                        Err(e) => Some((None, ApiError::from(e).into())),
                    },
                    Some(f) => {
                        drop(tx); // rolls the whole change set back
                        Some(f)
                    }
                };
                match failed {
                    None => {
                        let cs = format!("changesetresponse_{}", Uuid::new_v4());
                        out.push_str(&format!(
                            "Content-Type: multipart/mixed; boundary={cs}\r\n\r\n"
                        ));
                        for (id, resp) in &answered {
                            out.push_str(&format!("--{cs}\r\n"));
                            write_response(&mut out, id.as_deref(), resp);
                        }
                        out.push_str(&format!("--{cs}--\r\n"));
                    }
                    Some((id, resp)) => {
                        for id in added {
                            inner.content_ids.remove(&id);
                        }
                        tracing::debug!(status = resp.status, "change set rolled back");
                        write_response(&mut out, id.as_deref(), &resp);
                        first_failure.get_or_insert(resp.status);
                        if !continue_on_error {
                            break;
                        }
                    }
                }
            }
        }
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    let status = match (first_failure, continue_on_error) {
        (Some(s), false) => s,
        _ => 200,
    };
    let mut resp = EmuResponse {
        status,
        headers: vec![(
            "Content-Type".into(),
            format!("multipart/mixed; boundary={boundary}"),
        )],
        body: out.into_bytes(),
    };
    if continue_on_error {
        resp = resp.with("Preference-Applied", "odata.continue-on-error");
    }
    (resp, wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The change-set request of execute-batch-operations-using-web-api.md ("Change sets").
    const DOC_BATCH: &str = "--batch_22975cad\r\nContent-Type: multipart/mixed; boundary=\"changeset_246e6bfe\"\r\n\r\n--changeset_246e6bfe\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\nPOST /api/data/v9.2/tasks HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n{\r\n  \"subject\": \"Task 1 in batch\"\r\n}\r\n--changeset_246e6bfe--\r\n\r\n--batch_22975cad\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET /api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)/Account_Tasks?$select=subject HTTP/1.1\r\n\r\n\r\n--batch_22975cad--\r\n";

    #[test]
    fn parses_the_documented_change_set_request() {
        let items = parse_batch(
            "multipart/mixed; boundary=\"batch_22975cad\"",
            DOC_BATCH.as_bytes(),
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        match &items[0] {
            Item::ChangeSet(parts) => {
                assert_eq!(parts.len(), 1);
                assert_eq!(parts[0].content_id.as_deref(), Some("1"));
                assert_eq!(parts[0].request.method, "POST");
                assert_eq!(parts[0].request.path, "tasks");
                let body: serde_json::Value =
                    serde_json::from_slice(&parts[0].request.body).unwrap();
                assert_eq!(body["subject"], "Task 1 in batch");
            }
            other => panic!("expected a change set, got {other:?}"),
        }
        match &items[1] {
            Item::Single(p) => {
                assert_eq!(
                    p.request.path,
                    "accounts(00000000-0000-0000-0000-000000000001)/Account_Tasks"
                );
                assert_eq!(p.request.query, "$select=subject");
            }
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn refuses_get_in_change_set_and_missing_boundary() {
        let body = "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: application/http\r\n\r\nGET /api/data/v9.2/accounts HTTP/1.1\r\n\r\n\r\n--c--\r\n--b--\r\n";
        assert!(parse_batch("multipart/mixed; boundary=b", body.as_bytes()).is_err());
        assert!(parse_batch("application/json", b"{}").is_err());
    }
}
