//! Offline profiles, security roles and the sync protocol of fieldsync.
#![warn(missing_docs)]
#[cfg(feature = "credential")]
pub mod credential;
#[cfg(feature = "quic")]
pub mod transport;
