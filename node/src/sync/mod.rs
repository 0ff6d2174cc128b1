//! The sans-IO sync sessions over QUIC: [`FrameSession`] adapters for the hub and the device,
//! the hub's change bus (live mode), its metrics, and the bootstrap exchange that gives a new
//! device its schema and profile.
//!
//! # Bootstrap (`device init`)
//!
//! The protocol messages carry ops and rows, not schemas. A new device therefore connects once
//! with its credential (pinned TLS, token checked by the transport), and opens a second
//! bidirectional stream next to the session's control stream. It writes one length-prefixed
//! frame `b"bootstrap/1"`; the hub answers with one frame: the JSON [`Bootstrap`] (schema and
//! offline profile TOML of the token's app). Nothing else is served on that stream, and only to
//! an authenticated device, so the bundle is what the enrollment already entitles it to.

pub mod device;
pub mod hub;

use serde::{Deserialize, Serialize};

/// The request frame on a bootstrap stream.
pub const BOOTSTRAP_REQUEST: &[u8] = b"bootstrap/1";
/// Largest bootstrap answer accepted by a device.
pub const BOOTSTRAP_MAX_BYTES: usize = 8 << 20;

/// What a hub tells a new device: the schema and the offline profile of its app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bootstrap {
    /// The hub's id.
    pub hub: uuid::Uuid,
    /// The app the token is for.
    pub app: String,
    /// The user the device acts for (id).
    pub user: String,
    /// The offline profile's name.
    pub profile_name: String,
    /// The schema TOML.
    pub schema_toml: String,
    /// The profile TOML.
    pub profile_toml: String,
}

pub use fieldsync_node::unix_ms;
