//! How a store is opened: its actor, clock, durability and cache size.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The identity of one store in the automerge sense: every change it makes carries it.
///
/// 16 random bytes, persisted when the store is created; `Display` is 32 lower-case hex chars.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ActorId(pub [u8; 16]);

impl ActorId {
    /// A fresh random actor id.
    pub fn random() -> ActorId {
        ActorId(*uuid::Uuid::new_v4().as_bytes())
    }

    /// The automerge form of this actor id.
    pub(crate) fn to_automerge(self) -> automerge::ActorId {
        automerge::ActorId::from(self.0)
    }

    /// The actor of an automerge change, if it is 16 bytes long (every fieldsync actor is).
    pub(crate) fn from_automerge(actor: &automerge::ActorId) -> Option<ActorId> {
        <[u8; 16]>::try_from(actor.to_bytes()).ok().map(ActorId)
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorId({self})")
    }
}

/// Text that is not 32 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an actor id (32 hex characters)")]
pub struct ActorIdParseError(pub String);

impl FromStr for ActorId {
    type Err = ActorIdParseError;
    fn from_str(s: &str) -> Result<ActorId, ActorIdParseError> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ActorIdParseError(s.to_string()))?;
        Ok(ActorId(bytes))
    }
}

/// When a commit is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Durability {
    /// The commit is on disk (written to the write-ahead file and `fdatasync`ed) before
    /// `commit` returns: it survives a process crash and power loss.
    #[default]
    Immediate,
    /// The commit is written to the write-ahead file but not synced when `commit` returns: it
    /// survives a process crash, and power loss once the next
    /// [`Store::sync`](crate::Store::sync) returned. For bulk work.
    Group,
}

/// Where a store reads the time for `createdon`, `modifiedon` and automerge change times.
///
/// The store never reads the wall clock directly: the simulator passes a manual clock.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock (milliseconds since the Unix epoch).
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that reads milliseconds since the epoch from `now`, set by its owner.
    pub fn manual(now: Arc<AtomicI64>) -> Clock {
        Clock { manual: Some(now) }
    }

    /// The current time in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(now) => now.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            Some(now) => write!(f, "Clock::manual({})", now.load(Ordering::SeqCst)),
            None => f.write_str("Clock::system()"),
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Bytes of sled page cache (default 64 MiB). Rows are never all held in memory.
    pub cache_capacity_bytes: u64,
    /// The durability of [`Transaction::commit`](crate::Transaction::commit) (default
    /// [`Durability::Immediate`]).
    pub durability: Durability,
    /// A fixed actor id (the simulator uses this for determinism); `None` = random at create,
    /// then the persisted one.
    pub actor: Option<ActorId>,
    /// The clock (default the system clock).
    pub clock: Clock,
    /// How often sled writes its buffers in the background, in milliseconds (default 200); it
    /// bounds the work left for a write-ahead checkpoint.
    pub group_flush_ms: u64,
    /// Whether an [`Durability::Immediate`] commit `fdatasync`s the write-ahead file, so it
    /// survives power loss and not only a process crash (default true). See `docs/storage.md`.
    pub fsync: bool,
    /// Size of the write-ahead file (default 4 MiB): the store checkpoints (makes sled durable
    /// and starts the file over) when it is full.
    pub wal_capacity_bytes: u64,
    /// Whether to write the write-ahead file's bytes once at open (default true), so that
    /// a durable commit's `fdatasync` changes no file metadata. Many short-lived stores (the
    /// simulator's) may turn it off.
    pub wal_preallocate: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_capacity_bytes: 64 << 20,
            durability: Durability::Immediate,
            actor: None,
            clock: Clock::system(),
            group_flush_ms: 200,
            fsync: true,
            wal_capacity_bytes: 4 << 20,
            wal_preallocate: true,
        }
    }
}

impl StoreOptions {
    /// Set the durability of `commit` (builder).
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Fix the actor id (builder).
    pub fn with_actor(mut self, actor: ActorId) -> Self {
        self.actor = Some(actor);
        self
    }

    /// Set the clock (builder).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Set the sled cache size in bytes (builder).
    pub fn with_cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity_bytes = bytes;
        self
    }
}
