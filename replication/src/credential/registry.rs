//! Which token ids the hub issued and which it revoked.

use std::collections::HashSet;

use uuid::Uuid;

/// What the hub knows about a token id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenStatus {
    /// Issued by this hub and not revoked.
    Active,
    /// Issued by this hub, then revoked.
    Revoked,
    /// Never issued by this hub (or forgotten).
    Unknown,
    /// The record could not be read (storage failed): neither accepted nor refused for good.
    Unavailable,
}

/// The hub's record of issued and revoked tokens.
///
/// The hub's durable storage implements this later; [`MemoryTokenRegistry`] is the in-memory
/// version for tests, the simulator and as a cache.
pub trait TokenRegistry {
    /// The status of `token_id`.
    fn status(&self, token_id: &Uuid) -> TokenStatus;
}

/// An in-memory [`TokenRegistry`]: a set of issued ids and a set of revoked ids.
#[derive(Debug, Clone, Default)]
pub struct MemoryTokenRegistry {
    issued: HashSet<Uuid>,
    revoked: HashSet<Uuid>,
}

impl MemoryTokenRegistry {
    /// An empty registry: every token is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `token_id` as issued.
    pub fn insert_issued(&mut self, token_id: Uuid) {
        self.issued.insert(token_id);
    }

    /// Revokes `token_id`; returns false if it was never issued (it is still refused).
    pub fn revoke(&mut self, token_id: Uuid) -> bool {
        self.revoked.insert(token_id);
        self.issued.contains(&token_id)
    }

    /// The revoked ids, for persisting.
    pub fn revoked(&self) -> impl Iterator<Item = &Uuid> {
        self.revoked.iter()
    }

    /// The issued ids, for persisting.
    pub fn issued(&self) -> impl Iterator<Item = &Uuid> {
        self.issued.iter()
    }
}

impl TokenRegistry for MemoryTokenRegistry {
    fn status(&self, token_id: &Uuid) -> TokenStatus {
        if self.revoked.contains(token_id) {
            TokenStatus::Revoked
        } else if self.issued.contains(token_id) {
            TokenStatus::Active
        } else {
            TokenStatus::Unknown
        }
    }
}

impl<T: TokenRegistry + ?Sized> TokenRegistry for &T {
    fn status(&self, token_id: &Uuid) -> TokenStatus {
        (**self).status(token_id)
    }
}

impl<T: TokenRegistry + ?Sized> TokenRegistry for std::sync::Arc<T> {
    fn status(&self, token_id: &Uuid) -> TokenStatus {
        (**self).status(token_id)
    }
}

impl<T: TokenRegistry + ?Sized> TokenRegistry for std::sync::RwLock<T> {
    fn status(&self, token_id: &Uuid) -> TokenStatus {
        match self.read() {
            Ok(guard) => guard.status(token_id),
            // A writer panicked mid-update: refuse rather than trust a half-written set.
            Err(_) => TokenStatus::Unavailable,
        }
    }
}
