//! The embedded fieldsync device store.
//!
//! Every edit becomes an automerge change appended to an event log kept in sled; rows are
//! materialized from the log for queries. See `docs/storage.md` for the layout and for what
//! survives a crash.
//!
//! ```
//! use fieldsync_store::{Schema, Store, StoreOptions, Value};
//! let schema = Schema::from_toml("[tables.account.columns]\nname = \"text\"").unwrap();
//! let store = Store::temporary(schema, StoreOptions::default()).unwrap();
//! let mut tx = store.begin();
//! let id = tx.insert("account", &[("name", Value::Text("Contoso".into()))]).unwrap();
//! tx.commit().unwrap();
//! assert_eq!(store.get("account", id).unwrap().unwrap().get("name"), &Value::Text("Contoso".into()));
//! ```
#![warn(missing_docs)]

mod api;
mod aux;
mod blob;
mod check;
mod codec;
mod engine;
mod error;
mod log;
mod options;
mod query;
mod replicate;
mod row;
mod schema;
mod store;
mod txn;
mod value;
mod wal;

pub use api::{
    ApplyOutcome, CheckProblem, CheckReport, ColumnConflict, CommitInfo, CompactReport, LogEntry,
    RemoteOp, Row, RowExport, StoreStatus,
};
pub use aux::{AuxEntry, AuxWrite, ChangeInspection, AUX_SPACE_MAX};
pub use blob::{ImageFormat, NotAnImage, ReferenceProblem, BLOB_CHUNK_BYTES, IMAGE_MAX_BYTES};
pub use error::{OpenError, StoreError, WriteError};
pub use options::{ActorId, ActorIdParseError, Clock, Durability, StoreOptions};
pub use query::{Filter, Order, Query, QueryPlan};
pub use row::DELETED_KEY;
pub use schema::{
    Column, ColumnType, Ownership, Relationship, Schema, SchemaError, Table, LIMIT_FILE_MAX_KB,
    LIMIT_IMAGE_MAX_KB, STATE_ACTIVE, STATE_INACTIVE, SYSTEM_COLUMNS,
};
pub use store::{Store, FORMAT_VERSION};
pub use txn::{BulkRow, Transaction, MAX_CHANGE_BYTES};
pub use value::{
    format_datetime, parse_datetime, BlobRef, OwnerKind, OwnerRef, RowId, Value, ValueParseError,
};
