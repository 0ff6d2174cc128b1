//! The protocol's storage traits over the real store: [`DeviceReplica`] implements
//! [`DeviceStorage`](crate::proto::DeviceStorage) over a device's [`Store`], [`HubReplica`]
//! implements [`HubStorage`](crate::proto::HubStorage) over the hub's [`Store`], its
//! environment, apps and profiles, and one [`Router`](crate::Router) per profile.
//!
//! Replication metadata (cursors, sync errors, decisions, per-device bookkeeping) lives in the
//! store's auxiliary key space (`Store::aux_*`), so it is as durable as the rows.
//!
//! # Aux layout
//!
//! `row` below is `table · 0 · row id (16 bytes)`; integers are big-endian.
//!
//! Device, space `device`:
//!
//! | key | value |
//! |---|---|
//! | `acked` | the protocol's acknowledged seq (u64) |
//! | `cur/` table | cursor and last sync (bincode) |
//! | `err/` seq | a sync error (bincode); its id is the rejected op's seq |
//! | `ev/` row | an eviction waiting for own ops to be acknowledged |
//! | `rb/` row | a rollback waiting to run: the hub's row and the changes pulled since |
//! | `bp/` sha, `bc/` sha offset, `bd/` sha | blob download progress, chunks, completion |
//!
//! The device's own ops are the store's log entries by its actor. The store's acknowledged
//! prefix is kept just before the first unacknowledged own op, so pulled entries never block
//! `evict_row` or `compact`.
//!
//! Hub, space `hub`:
//!
//! | key | value |
//! |---|---|
//! | `tok/` token id | `[1]` issued, `[0]` revoked, then the token's unsigned fields (`Token::to_record`; none for tokens issued before they were kept) |
//! | `dec/` row hash | the decision on a pushed change (bincode) |
//! | `act/` device actor | the automerge actors a device pushed with |
//! | `aa/` actor | the device that owns the actor (the first to push with it) |
//! | `cfg/env`, `cfg/profile/` name, `cfg/time` | the environment, profiles and time devices' sets last followed (JSON) |
//! | `rr/` row | a row being written and not routed yet (looked at again at open) |
//! | `hh/` device row | the device's holding history: (feed position, held) transitions |
//! | `ho/` device row | what a rollback left on the device, from a feed position on |
//! | `m/` profile · 0 · user seq row | the row entered or left the user's set at `seq` |
//! | `bl/` sha row | the row refers to the blob |
//!
//! The feed cursor of every table is the hub's log seq; the hub never compacts its log.

use fieldsync_store::{RowId, StoreError, WriteError};
use serde::{de::DeserializeOwned, Serialize};

use crate::proto::StorageError;

mod device;
#[cfg(feature = "credential")]
mod hub;

pub use device::{DeviceReplica, TableSyncStatus, DEFAULT_COMPACT_BACKLOG};
#[cfg(all(feature = "credential", feature = "planted-bugs"))]
pub use hub::PlantedHubBug;
#[cfg(feature = "credential")]
pub use hub::{
    DeviceLag, FeedChanges, HubReplica, HubReplicaError, IssuedToken, StoreTokenRegistry,
    ACTORS_PER_DEVICE, SHARED_FEED_HOLDERS, UPSTREAM_ACTOR,
};

/// Why a replica operation the CLI calls directly failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The store refused a read or a replication step.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store refused a write.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The protocol storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No sync error with this id.
    #[error("no sync error with id {0}")]
    NoSuchError(u64),
    /// A rejected delete cannot be retried: the rollback removed the row from this device
    /// (its user may not read it), so there is nothing here to delete. Discard the error.
    #[error("cannot retry the delete of {table}/{row}: the row is no longer on this device (discard the error instead)")]
    RowGone {
        /// The table.
        table: String,
        /// The row.
        row: RowId,
    },
}

/// A store failure as the protocol sees it.
pub(crate) fn storage_err(e: StoreError) -> StorageError {
    match e {
        StoreError::Corrupt(m) => StorageError::Corrupt(m),
        StoreError::Io(e) => StorageError::Unavailable(e.to_string()),
        other => StorageError::Unavailable(other.to_string()),
    }
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

pub(crate) fn dec<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StorageError::Corrupt(format!("{what} does not decode: {e}")))
}

/// `prefix` · SHA-256 (32 bytes), for per-blob keys.
pub(crate) fn sha_key(prefix: &[u8], sha: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 32);
    k.extend_from_slice(prefix);
    k.extend_from_slice(sha);
    k
}

/// `prefix` · table · 0 · row id (16 bytes).
pub(crate) fn row_key(prefix: &[u8], table: &str, row: uuid::Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + table.len() + 17);
    k.extend_from_slice(prefix);
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(row.as_bytes());
    k
}

/// The (table, row) of a [`row_key`] without its prefix.
pub(crate) fn parse_row_key(rest: &[u8]) -> Option<(String, uuid::Uuid)> {
    if rest.len() < 17 {
        return None;
    }
    let (t, r) = rest.split_at(rest.len() - 17);
    let table = std::str::from_utf8(t).ok()?.to_string();
    let row = uuid::Uuid::from_slice(r.get(1..)?).ok()?;
    Some((table, row))
}
