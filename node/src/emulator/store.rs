//! The emulator's persistence: one SQLite file, `emulator.sqlite3`, in the data directory.
//!
//! Tables: `meta` (the organization-wide version counter, like Dataverse's `versionnumber`),
//! `rows` (one JSON document of typed values per row), `tombstones` (deleted rows, for delta
//! reads), `files` (file and image column content), `uploads` (chunked-upload sessions),
//! `config` (the schema TOML and the security directory). Every request runs in one SQLite
//! transaction (a `$batch` change set in one for all of its requests), committed with
//! `synchronous=FULL`: what a `2xx` answered survives a crash or a restart.

use std::collections::BTreeMap;
use std::path::Path;

use fieldsync_store::Value;
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::errors::ApiError;

/// One stored row: id, version (its `versionnumber`) and typed column values, system columns
/// included.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The primary id.
    pub id: Uuid,
    /// The version stamp of the last write (`@odata.etag` is `W/"<version>"`).
    pub version: i64,
    /// Column values by logical name (absent means null).
    pub values: BTreeMap<String, Value>,
}

/// A deleted row, as delta reads report it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tombstone {
    /// The deleted row's id.
    pub id: Uuid,
    /// The version stamp of the delete.
    pub version: i64,
    /// Owner and owning business unit at the time of the delete (for visibility).
    pub values: BTreeMap<String, Value>,
}

/// A chunked-upload session.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The session token.
    pub token: String,
    /// Table logical name.
    pub table: String,
    /// Row id.
    pub id: Uuid,
    /// Column.
    pub column: String,
    /// File name.
    pub file_name: String,
    /// Bytes received so far.
    pub data: Vec<u8>,
}

/// A stored file: name and bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    /// File name (`x-ms-file-name`).
    pub name: String,
    /// Content.
    pub data: Vec<u8>,
}

const SCHEMA_SQL: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 1000);
CREATE TABLE IF NOT EXISTS rows (
    entity TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (entity, id));
CREATE INDEX IF NOT EXISTS rows_by_version ON rows (entity, version);
CREATE TABLE IF NOT EXISTS tombstones (
    entity TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (entity, version));
CREATE TABLE IF NOT EXISTS files (
    entity TEXT NOT NULL, id TEXT NOT NULL, col TEXT NOT NULL, name TEXT NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (entity, id, col));
CREATE TABLE IF NOT EXISTS uploads (
    token TEXT PRIMARY KEY, entity TEXT NOT NULL, id TEXT NOT NULL, col TEXT NOT NULL,
    name TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

/// Open (creating if needed) the emulator database in `dir`.
pub fn open(dir: &Path) -> anyhow::Result<Connection> {
    std::fs::create_dir_all(dir)?;
    let conn = Connection::open(dir.join("emulator.sqlite3"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF;",
    )?;
    conn.execute_batch(SCHEMA_SQL)?;
    Ok(conn)
}

/// Take the next organization-wide version stamp.
pub fn next_version(conn: &Connection) -> Result<i64, ApiError> {
    Ok(conn.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value",
        [],
        |r| r.get(0),
    )?)
}

/// The latest version stamp handed out.
pub fn current_version(conn: &Connection) -> Result<i64, ApiError> {
    Ok(
        conn.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
            r.get(0)
        })?,
    )
}

fn decode_values(table: &str, text: &str) -> Result<BTreeMap<String, Value>, ApiError> {
    serde_json::from_str(text)
        .map_err(|e| ApiError::internal(format!("stored row of {table} is corrupt: {e}")))
}

fn encode_values(values: &BTreeMap<String, Value>) -> Result<String, ApiError> {
    serde_json::to_string(values).map_err(|e| ApiError::internal(e.to_string()))
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|e| ApiError::internal(format!("stored id is corrupt: {e}")))
}

/// One row, if it exists.
pub fn get_row(conn: &Connection, table: &str, id: Uuid) -> Result<Option<Row>, ApiError> {
    let found: Option<(i64, String)> = conn
        .query_row(
            "SELECT version, data FROM rows WHERE entity = ?1 AND id = ?2",
            params![table, id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match found {
        None => Ok(None),
        Some((version, data)) => Ok(Some(Row {
            id,
            version,
            values: decode_values(table, &data)?,
        })),
    }
}

/// Every row of a table, by id.
pub fn all_rows(conn: &Connection, table: &str) -> Result<Vec<Row>, ApiError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, version, data FROM rows WHERE entity = ?1 ORDER BY id")?;
    let raw: Vec<(String, i64, String)> = stmt
        .query_map(params![table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    raw.into_iter()
        .map(|(id, version, data)| {
            Ok(Row {
                id: parse_id(&id)?,
                version,
                values: decode_values(table, &data)?,
            })
        })
        .collect()
}

/// Insert or replace a row.
pub fn put_row(conn: &Connection, table: &str, row: &Row) -> Result<(), ApiError> {
    conn.execute(
        "INSERT INTO rows (entity, id, version, data) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (entity, id) DO UPDATE SET version = ?3, data = ?4",
        params![
            table,
            row.id.to_string(),
            row.version,
            encode_values(&row.values)?
        ],
    )?;
    Ok(())
}

/// Delete a row and its files, leaving a tombstone at `version`.
pub fn delete_row(conn: &Connection, table: &str, row: &Row, version: i64) -> Result<(), ApiError> {
    let id = row.id.to_string();
    conn.execute(
        "DELETE FROM rows WHERE entity = ?1 AND id = ?2",
        params![table, id],
    )?;
    conn.execute(
        "DELETE FROM files WHERE entity = ?1 AND id = ?2",
        params![table, id],
    )?;
    let kept: BTreeMap<String, Value> = row
        .values
        .iter()
        .filter(|(k, _)| *k == "ownerid" || *k == "owningbusinessunit")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    conn.execute(
        "INSERT INTO tombstones (entity, id, version, data) VALUES (?1, ?2, ?3, ?4)",
        params![table, id, version, encode_values(&kept)?],
    )?;
    Ok(())
}

/// Rows written and rows deleted with `since < version <= upto`, each ordered by version.
pub fn changes(
    conn: &Connection,
    table: &str,
    since: i64,
    upto: i64,
) -> Result<(Vec<Row>, Vec<Tombstone>), ApiError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, version, data FROM rows WHERE entity = ?1 AND version > ?2 AND version <= ?3
         ORDER BY version",
    )?;
    let raw: Vec<(String, i64, String)> = stmt
        .query_map(params![table, since, upto], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let rows = raw
        .into_iter()
        .map(|(id, version, data)| {
            Ok(Row {
                id: parse_id(&id)?,
                version,
                values: decode_values(table, &data)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, version, data FROM tombstones
         WHERE entity = ?1 AND version > ?2 AND version <= ?3 ORDER BY version",
    )?;
    let raw: Vec<(String, i64, String)> = stmt
        .query_map(params![table, since, upto], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let deleted = raw
        .into_iter()
        .map(|(id, version, data)| {
            Ok(Tombstone {
                id: parse_id(&id)?,
                version,
                values: decode_values(table, &data)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok((rows, deleted))
}

/// Store a file column's content.
pub fn put_file(
    conn: &Connection,
    table: &str,
    id: Uuid,
    column: &str,
    name: &str,
    data: &[u8],
) -> Result<(), ApiError> {
    conn.execute(
        "INSERT INTO files (entity, id, col, name, data) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (entity, id, col) DO UPDATE SET name = ?4, data = ?5",
        params![table, id.to_string(), column, name, data],
    )?;
    Ok(())
}

/// A file column's content.
pub fn get_file(
    conn: &Connection,
    table: &str,
    id: Uuid,
    column: &str,
) -> Result<Option<StoredFile>, ApiError> {
    Ok(conn
        .query_row(
            "SELECT name, data FROM files WHERE entity = ?1 AND id = ?2 AND col = ?3",
            params![table, id.to_string(), column],
            |r| {
                Ok(StoredFile {
                    name: r.get(0)?,
                    data: r.get(1)?,
                })
            },
        )
        .optional()?)
}

/// Remove a file column's content.
pub fn delete_file(conn: &Connection, table: &str, id: Uuid, column: &str) -> Result<(), ApiError> {
    conn.execute(
        "DELETE FROM files WHERE entity = ?1 AND id = ?2 AND col = ?3",
        params![table, id.to_string(), column],
    )?;
    Ok(())
}

/// Start a chunked-upload session.
pub fn create_upload(conn: &Connection, upload: &Upload) -> Result<(), ApiError> {
    conn.execute(
        "INSERT INTO uploads (token, entity, id, col, name, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            upload.token,
            upload.table,
            upload.id.to_string(),
            upload.column,
            upload.file_name,
            upload.data
        ],
    )?;
    Ok(())
}

/// A chunked-upload session by token.
pub fn get_upload(conn: &Connection, token: &str) -> Result<Option<Upload>, ApiError> {
    let raw: Option<(String, String, String, String, Vec<u8>)> = conn
        .query_row(
            "SELECT entity, id, col, name, data FROM uploads WHERE token = ?1",
            params![token],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    match raw {
        None => Ok(None),
        Some((table, id, column, file_name, data)) => Ok(Some(Upload {
            token: token.to_string(),
            table,
            id: parse_id(&id)?,
            column,
            file_name,
            data,
        })),
    }
}

/// Replace a session's received bytes.
pub fn update_upload(conn: &Connection, token: &str, data: &[u8]) -> Result<(), ApiError> {
    conn.execute(
        "UPDATE uploads SET data = ?2 WHERE token = ?1",
        params![token, data],
    )?;
    Ok(())
}

/// End a chunked-upload session.
pub fn delete_upload(conn: &Connection, token: &str) -> Result<(), ApiError> {
    conn.execute("DELETE FROM uploads WHERE token = ?1", params![token])?;
    Ok(())
}

/// A stored configuration value (`schema`, `directory`).
pub fn get_config(conn: &Connection, key: &str) -> Result<Option<String>, ApiError> {
    Ok(conn
        .query_row(
            "SELECT value FROM config WHERE key = ?1",
            params![key],
            |r| r.get(0),
        )
        .optional()?)
}

/// Store a configuration value.
pub fn set_config(conn: &Connection, key: &str, value: &str) -> Result<(), ApiError> {
    conn.execute(
        "INSERT INTO config (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = ?2",
        params![key, value],
    )?;
    Ok(())
}
