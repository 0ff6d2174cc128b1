//! Offline profiles, security roles and the sync protocol of fieldsync.
#![warn(missing_docs)]

pub mod proto;
pub mod wire;
