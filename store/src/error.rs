//! Errors, one enum per kind of operation.

use std::path::PathBuf;

use crate::schema::SchemaError;
use crate::value::RowId;

/// Why a store could not be created or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// There is no fieldsync store in the directory.
    #[error("no fieldsync store in {0}")]
    NotFound(PathBuf),
    /// `create` was asked to create a store where one already exists.
    #[error("a fieldsync store already exists in {0}")]
    AlreadyExists(PathBuf),
    /// The data directory is damaged: a file is missing, truncated or holds garbage.
    #[error("the store in {path} is damaged: {reason}")]
    Corrupt {
        /// The data directory.
        path: PathBuf,
        /// What was found wrong.
        reason: String,
    },
    /// The store was written by an incompatible version of fieldsync.
    #[error("the store format version is {found}, this fieldsync reads version {expected}")]
    VersionMismatch {
        /// The version in the store.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// `StoreOptions::actor` names a different actor than the one the store was created with.
    #[error("the store belongs to actor {stored}, not {requested}")]
    ActorMismatch {
        /// The persisted actor.
        stored: crate::ActorId,
        /// The actor in the options.
        requested: crate::ActorId,
    },
    /// The store is open elsewhere (another process holds its lock).
    #[error("the store in {0} is in use by another process")]
    Locked(PathBuf),
    /// An operating system I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The store opened but its contents failed the open-time check and could not be rebuilt.
    #[error("the store failed its open check: {0}")]
    Store(#[from] StoreError),
}

/// Why a read, a replication step or a maintenance operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A table, column or value that the schema refuses.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Data under the store's keys that does not decode (a damaged data directory).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// An operating system I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A remote change that is not a valid fieldsync row change (bad bytes, unknown column,
    /// wrong value type, nested objects ...). Nothing of the batch was applied.
    #[error("invalid change for {table}/{row}: {reason}")]
    InvalidChange {
        /// The table the change was sent for.
        table: String,
        /// The row the change was sent for.
        row: RowId,
        /// What is wrong with it.
        reason: String,
    },
    /// An exported row document that does not load.
    #[error("invalid row export for {table}/{row}: {reason}")]
    InvalidExport {
        /// The table.
        table: String,
        /// The row.
        row: RowId,
        /// What is wrong with it.
        reason: String,
    },
    /// `evict_row` was refused: the row has log entries the hub has not acknowledged.
    #[error("row {table}/{row} has unacknowledged changes (last at seq {seq}); not evicted")]
    UnacknowledgedChanges {
        /// The table.
        table: String,
        /// The row.
        row: RowId,
        /// The newest unacknowledged log sequence number of the row.
        seq: u64,
    },
    /// `acknowledge` was given a sequence number beyond the end of the log.
    #[error("cannot acknowledge seq {requested}: the log ends at {last}")]
    AckBeyondLog {
        /// The requested sequence number.
        requested: u64,
        /// The last sequence number in the log.
        last: u64,
    },
    /// A blob that is not in the store (or only partly).
    #[error("blob {0} is not in the store")]
    BlobNotFound(String),
    /// A blob whose content does not match its reference.
    #[error("blob {0} is damaged: content does not match its hash")]
    BlobCorrupt(String),
}

/// Why a write was refused. Nothing of the transaction was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Unknown table or column, wrong type, invalid choice.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// `update` or `delete` of a row that does not exist.
    #[error("row {table}/{id} does not exist")]
    RowNotFound {
        /// The table.
        table: String,
        /// The row.
        id: RowId,
    },
    /// A write to a row that has been deleted (deletes win; a deleted row cannot be revived).
    #[error("row {table}/{id} has been deleted")]
    RowDeleted {
        /// The table.
        table: String,
        /// The row.
        id: RowId,
    },
    /// `insert_with_id` of an id that is already taken.
    #[error("row {table}/{id} already exists")]
    RowExists {
        /// The table.
        table: String,
        /// The row.
        id: RowId,
    },
    /// A value the store cannot write (e.g. a float that is NaN or infinite).
    #[error("invalid value for {table}.{column}: {reason}")]
    InvalidValue {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Why.
        reason: String,
    },
    /// The write's automerge change is over [`crate::MAX_CHANGE_BYTES`]: it could never be
    /// sent to the hub. Split the value or attach it as a file instead.
    #[error("the change to {table}/{row} is {bytes} bytes, over the {max}-byte limit of one change (store large content as a file column)")]
    ChangeTooLarge {
        /// The table.
        table: String,
        /// The row.
        row: RowId,
        /// The change's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The storage below failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => StoreError::Io(io),
            other => StoreError::Corrupt(other.to_string()),
        }
    }
}

impl From<sled::Error> for WriteError {
    fn from(e: sled::Error) -> Self {
        WriteError::Store(e.into())
    }
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}
