//! The embedded fieldsync device store.
//!
//! Every edit becomes an automerge change appended to an event log kept in sled; rows are
//! materialized from the log for queries. See `docs/storage.md` for what survives a crash.
#![warn(missing_docs)]

mod schema;
mod value;

pub use schema::{
    Column, ColumnType, Ownership, Relationship, Schema, SchemaError, Table, STATE_ACTIVE,
    STATE_INACTIVE, SYSTEM_COLUMNS,
};
pub use value::{
    format_datetime, parse_datetime, BlobRef, OwnerKind, OwnerRef, RowId, Value, ValueParseError,
};
