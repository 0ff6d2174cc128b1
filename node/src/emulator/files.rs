//! File and image columns (`file-column-data.md`, `image-column-data.md`).
//!
//! - `PATCH /<set>(<id>)/<col>` with the bytes and `x-ms-file-name` → 204 (single request).
//! - `PATCH .../<col>?x-ms-file-name=<name>` with `x-ms-transfer-mode: chunked` → 200 with
//!   `Location: ...?sessiontoken=<token>` and `x-ms-chunk-size`; then each chunk `PATCH`ed to
//!   `Location` with `Content-Range: bytes a-b/total` → 206, the last → 204. Chunks must arrive
//!   in order (the emulator keeps one growing buffer per session).
//! - `GET .../<col>/$value` → the bytes with `x-ms-file-size`, `x-ms-file-name`, `mimetype`;
//!   `Range: bytes=a-b` → 206 with that slice.
//! - `DELETE .../<col>` → 204.
//!
//! Images: Dataverse answers `$value` with a 144×144 thumbnail and `?size=full` with the full
//! image. **The emulator does not resize**: the "thumbnail" is the stored image itself, marked
//! with the response header `x-fieldsync-emulator-thumbnail: full-image`.

use fieldsync_store::{BlobRef, Column, ColumnType, Table, Value};
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::errors::{self, ApiError};
use super::odata;
use super::routes::{self, Ctx, EmuRequest, EmuResponse};
use super::store::{self, Upload};

/// A file or image column's `MaxSizeInKB` in this Dataverse: the schema's `max_size_kb`, else
/// Dataverse's default for a new column of the type (32 MiB for a file, 10 MiB for an image;
/// the hub's schema then allows up to Dataverse's limit, as it cannot know). `None` for other
/// columns.
pub fn max_size_kb(column: &Column) -> Option<u64> {
    let default = match column.ty {
        ColumnType::File => 32 * 1024,
        ColumnType::Image => 10 * 1024,
        _ => return None,
    };
    Some(column.max_size_kb.unwrap_or(default))
}

fn too_big() -> ApiError {
    // file-column-data.md, "Check maximum file size".
    ApiError::new(
        400,
        errors::FILE_TOO_BIG,
        "Attachment file size is too big.",
    )
}

fn mime_for(name: &str) -> &'static str {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// Route a request on a file or image column.
pub fn handle(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    id: Uuid,
    column: &str,
    tail: &[&str],
) -> Result<EmuResponse, ApiError> {
    let col = table.column(column);
    let is_image = col.is_some_and(|c| c.ty == ColumnType::Image);
    let max_bytes = col.and_then(max_size_kb).unwrap_or(0).saturating_mul(1024);
    let query = odata::parse_query(&req.query);
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match (req.method.as_str(), tail) {
        ("PATCH", []) | ("PUT", []) => {
            if let Some(token) = param("sessiontoken") {
                return upload_chunk(ctx, conn, req, table, &token, max_bytes);
            }
            let name = req
                .header("x-ms-file-name")
                .map(str::to_string)
                .or_else(|| param("x-ms-file-name"))
                .unwrap_or_else(|| "file".to_string());
            let row = routes::writable_row(ctx, conn, table, id)?;
            if req
                .header("x-ms-transfer-mode")
                .is_some_and(|m| m.eq_ignore_ascii_case("chunked"))
            {
                let token = Uuid::new_v4().simple().to_string();
                store::create_upload(
                    conn,
                    &Upload {
                        token: token.clone(),
                        table: table.name.clone(),
                        id: row.id,
                        column: column.to_string(),
                        file_name: name,
                        data: Vec::new(),
                    },
                )?;
                let location = format!(
                    "{}{}({})/{}?sessiontoken={}",
                    ctx.base, table.entity_set, id, column, token
                );
                // file-column-data.md, "Upload the file in chunks using Web API".
                return Ok(EmuResponse::empty(200)
                    .with("Accept-Ranges", "bytes")
                    .with("Location", location)
                    .with(
                        "x-ms-chunk-size",
                        ctx.state.config.chunk_size_bytes.to_string(),
                    )
                    .with("Access-Control-Expose-Headers", "x-ms-chunk-size"));
            }
            if req.body.len() as u64 > max_bytes {
                return Err(too_big());
            }
            let mut row = row;
            commit_file(conn, table, &mut row, column, &name, &req.body, is_image)?;
            Ok(EmuResponse::empty(204))
        }
        ("DELETE", []) => {
            let mut row = routes::writable_row(ctx, conn, table, id)?;
            store::delete_file(conn, &table.name, id, column)?;
            row.values.remove(column);
            routes::touch_row(conn, table, &mut row)?;
            Ok(EmuResponse::empty(204))
        }
        ("GET", ["$value"]) => download(ctx, conn, req, table, id, column, is_image, param("size")),
        ("GET", []) => {
            let row = routes::visible_row(ctx, conn, table, id)?;
            let m = routes::wire_row(table, &row, false);
            let v = m.get(column).cloned().unwrap_or(serde_json::Value::Null);
            if v.is_null() {
                return Ok(EmuResponse::empty(204));
            }
            Ok(EmuResponse::json(
                200,
                &serde_json::json!({
                    "@odata.context": format!("{}$metadata#{}({})/{}", ctx.base, table.entity_set, id, column),
                    "value": v
                }),
            ))
        }
        _ => Err(ApiError::new(
            405,
            errors::NOT_SUPPORTED,
            format!(
                "The HTTP method '{}' is not supported on a file column.",
                req.method
            ),
        )),
    }
}

fn commit_file(
    conn: &Connection,
    table: &Table,
    row: &mut store::Row,
    column: &str,
    name: &str,
    data: &[u8],
    is_image: bool,
) -> Result<(), ApiError> {
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&Sha256::digest(data));
    let blob = BlobRef {
        sha256,
        size: data.len() as u64,
        name: name.to_string(),
    };
    store::put_file(conn, &table.name, row.id, column, name, data)?;
    row.values.insert(
        column.to_string(),
        if is_image {
            Value::Image(blob)
        } else {
            Value::File(blob)
        },
    );
    routes::touch_row(conn, table, row)
}

/// Parse `bytes a-b/total`.
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes")?.trim();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b, total) = (
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (a <= b && b < total).then_some((a, b, total))
}

fn upload_chunk(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    token: &str,
    max_bytes: u64,
) -> Result<EmuResponse, ApiError> {
    let mut upload = store::get_upload(conn, token)?.ok_or_else(|| {
        ApiError::new(
            404,
            errors::OBJECT_DOES_NOT_EXIST,
            "The upload session does not exist or has ended.",
        )
    })?;
    let range = req
        .header("content-range")
        .and_then(parse_content_range)
        .ok_or_else(|| {
            ApiError::payload("A chunk needs `Content-Range: bytes <start>-<end>/<size>`.")
        })?;
    let (start, end, total) = range;
    if total > max_bytes {
        return Err(too_big());
    }
    if end - start + 1 != req.body.len() as u64 {
        return Err(ApiError::payload(format!(
            "Content-Range covers {} bytes but the body has {}.",
            end - start + 1,
            req.body.len()
        )));
    }
    if start != upload.data.len() as u64 {
        return Err(ApiError::payload(format!(
            "Chunks must be sent in order: expected the chunk starting at byte {}.",
            upload.data.len()
        )));
    }
    upload.data.extend_from_slice(&req.body);
    if end + 1 < total {
        store::update_upload(conn, token, &upload.data)?;
        // file-column-data.md: 206 for each chunk but the last.
        return Ok(EmuResponse::empty(206));
    }
    let name = req
        .header("x-ms-file-name")
        .map(str::to_string)
        .unwrap_or_else(|| upload.file_name.clone());
    let mut row = routes::writable_row(ctx, conn, table, upload.id)?;
    let is_image = table
        .column(&upload.column)
        .is_some_and(|c| c.ty == ColumnType::Image);
    commit_file(
        conn,
        table,
        &mut row,
        &upload.column,
        &name,
        &upload.data,
        is_image,
    )?;
    store::delete_upload(conn, token)?;
    Ok(EmuResponse::empty(204))
}

/// Parse `Range: bytes=a-b` (also `a-` and `-n`) against a size.
fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && end < size).then_some((start, end))
}

#[allow(clippy::too_many_arguments)]
fn download(
    ctx: &Ctx<'_>,
    conn: &Connection,
    req: &EmuRequest,
    table: &Table,
    id: Uuid,
    column: &str,
    is_image: bool,
    size: Option<String>,
) -> Result<EmuResponse, ApiError> {
    routes::visible_row(ctx, conn, table, id)?;
    let Some(file) = store::get_file(conn, &table.name, id, column)? else {
        if is_image {
            // image-column-data.md: no image → 204.
            return Ok(EmuResponse::empty(204));
        }
        return Err(ApiError::new(
            404,
            errors::OBJECT_DOES_NOT_EXIST,
            format!("No file attachment found for attribute: {column} EntityId: {id}."),
        ));
    };
    let total = file.data.len() as u64;
    let mut resp = EmuResponse::empty(200)
        .with("Content-Type", "application/octet-stream")
        .with("x-ms-file-size", total.to_string())
        .with("x-ms-file-name", file.name.clone())
        .with("mimetype", mime_for(&file.name))
        .with(
            "Access-Control-Expose-Headers",
            "x-ms-file-size; x-ms-file-name; x-ms-chunk-size; mimetype",
        );
    if is_image && size.as_deref() != Some("full") {
        resp = resp.with("x-fieldsync-emulator-thumbnail", "full-image");
    }
    match req.header("range") {
        Some(r) => {
            let (start, end) = parse_range(r, total).ok_or_else(|| {
                ApiError::new(
                    416,
                    errors::BAD_PAYLOAD,
                    format!("The range '{r}' is not satisfiable."),
                )
                .with_header("Content-Range", format!("bytes */{total}"))
            })?;
            resp.status = 206;
            resp.body = file.data[start as usize..=end as usize].to_vec();
            Ok(resp
                .with("Content-Range", format!("bytes {start}-{end}/{total}"))
                .with(
                    "x-ms-chunk-size",
                    ctx.state.config.chunk_size_bytes.to_string(),
                ))
        }
        None => {
            resp.body = file.data;
            Ok(resp)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-4194303/25870370"),
            Some((0, 4194303, 25870370))
        );
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
    }
}
