//! Offline profiles, security roles and the sync protocol of fieldsync.
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod dataverse_records;
pub mod estimate;
pub mod evaluate;
pub mod profile;
pub mod routing;
pub mod security;

pub use admin::{authorize, AdminError, AdminOperation, AuthorizationError, Catalog};
pub use app::{apps_from_toml, generate_profile, App, GenerateReport, PublishError, View};
pub use dataverse_records::{export_records, import_records, RecordsError};
pub use estimate::{estimate, Estimate, TableEstimate, UserEstimate};
pub use evaluate::{evaluate, evaluate_all, DeviceSet, RowKey, RowView};
pub use profile::{Profile, ProfileError, ProfileItem, RowFilter};
pub use routing::{Route, Router, RowRef, UserDelta};
pub use security::{Depth, Environment, EnvironmentError, Privilege, ReadScope, Role};
#[cfg(feature = "credential")]
pub mod credential;
pub mod proto;
pub mod replica;
#[cfg(feature = "quic")]
pub mod transport;
pub mod wire;
