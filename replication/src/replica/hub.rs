//! [`HubReplica`]: the hub's side of sync over its [`Store`], environment, apps and profiles.
//!
//! - **Authentication**: hub-signed tokens ([`TokenVerifier`]) and a token registry persisted
//!   in the aux space (issued and revoked ids).
//! - **Authority**: each pushed op is decoded (`Store::inspect_change`) to see what it does
//!   (create, write, delete, assign, append) and checked against the user's privileges, then
//!   applied durably. The decision is remembered per change hash so a re-sent op gets the same
//!   answer.
//! - **Feed**: the cursor of every table is the hub's log sequence number. Every log entry is
//!   indexed per profile, user and table for the users who hold its row after the write (and
//!   for the writer) — once per profile and table for a row held by many users — and every
//!   membership change per profile and user; a pull walks those two
//!   indexes after the cursor — never the whole log, so a pull costs what the device's own
//!   rows changed, not what every device changed. Per row touched it compares whether the
//!   device held the row at the cursor (a small per-device history in aux) with whether the
//!   row is in its set now: ops for rows it keeps, whole rows for rows entering, ids for rows
//!   leaving, nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use fieldsync_store::{
    ActorId, AuxWrite, BlobRef, Durability, ImageFormat, LogEntry, OwnerKind, OwnerRef,
    ReferenceProblem, RemoteOp, RowId, Store, StoreError, Table, Value, WriteError, DELETED_KEY,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, error, info, info_span, warn};
use uuid::Uuid;

use super::{dec, enc, row_key, sha_key, storage_err};
use crate::app::App;
use crate::credential::{
    HubSigningKey, SignedToken, Token, TokenError, TokenRegistry, TokenStatus, TokenVerifier,
};
use crate::profile::Profile;
use crate::proto::messages::{BLOB_UPLOAD_MAX, MAX_CHANGE_LEN};
use crate::proto::{
    BatchLimits, BlobSlice, CloseCode, ConflictPolicy, Cursor, DeviceId, HubStorage, Millis,
    Operation, Principal, PullChunk, PushOp, PushOutcome, Refusal, RejectionKind, RowChange,
    RowDoc, StorageError, UploadOutcome,
};
use crate::routing::{Router, RoutingError, RowRef, UserDelta};
use crate::security::{Depth, Environment, Privilege, UserId};

/// The actor of every change that came from Dataverse ("Dataverse" in ASCII, zero padded): the
/// upstream bridge writes with it, and no device may.
pub const UPSTREAM_ACTOR: ActorId = ActorId(*b"Dataverse\0\0\0\0\0\0\0");
/// The system column Dataverse derives from the owner; devices never set it.
const OWNING_BUSINESS_UNIT: &str = "owningbusinessunit";
/// The aux space of the hub's replication metadata.
const SPACE: &str = "hub";
const P_DECISION: &[u8] = b"dec/";
const P_TOKEN: &[u8] = b"tok/";
const P_ACTOR: &[u8] = b"act/";
/// Which device an automerge actor belongs to: `aa/` + actor → device id. The first device to
/// push with an actor owns it; another device's change claiming it is refused.
const P_ACTOR_OWNER: &[u8] = b"aa/";
fn actor_owner_key(actor: &[u8]) -> Vec<u8> {
    let mut k = P_ACTOR_OWNER.to_vec();
    k.extend_from_slice(actor);
    k
}
/// Automerge actors one device may push with (a store has one; a device set up again from its
/// credential gets another). More are refused: each is looked at by every pull.
pub const ACTORS_PER_DEVICE: usize = 16;
const P_HISTORY: &[u8] = b"hh/";
const P_MEMBERSHIP: &[u8] = b"m/";
const P_BLOB: &[u8] = b"bl/";
/// A device's unfinished upload: `up/` + device + sha256 → [`PendingUpload`].
const P_UPLOAD: &[u8] = b"up/";
/// Its pieces: `uc/` + device + sha256 + offset → bytes.
const P_UPLOAD_CHUNK: &[u8] = b"uc/";
/// Content a device attached in an op the hub accepted: `ba/` + sha256 + device → the table
/// and the [`BlobRef`] (the device may upload it even once the row has left its set).
const P_ATTACHED: &[u8] = b"ba/";
/// Unfinished uploads one device may have; starting one more drops its oldest.
pub const PENDING_UPLOADS_PER_DEVICE: usize = 4;
/// An unfinished upload untouched for this long is dropped when the hub opens.
pub const UPLOAD_MAX_AGE_MS: u64 = 7 * 24 * 3_600_000;
const P_OVERRIDE: &[u8] = b"ho/";
/// Log entries per profile, user and table: `f/` profile 0 user table 0 seq row.
const P_FEED: &[u8] = b"f/";
/// Log entries of widely held rows per profile and table, read by every pull of the profile:
/// `fs/` profile 0 table 0 seq row.
const P_SHARED_FEED: &[u8] = b"fs/";
/// A row held by more users than this goes to the profile's shared feed instead of one entry
/// per user: a catalog row every device holds would otherwise cost an entry per device per
/// write (a million-row hub with a thousand technicians ran out of memory building them).
/// Pulls read both feeds, so changing it never loses an entry.
pub const SHARED_FEED_HOLDERS: usize = 32;
/// Rows being written and not routed yet: `rr/` table 0 row. Put (unflushed: the write's own
/// flush makes it durable) before a row is written, removed once it is routed. A crash in
/// between leaves it: at open such a row is re-evaluated for every user (the routers, built
/// from the rows as they are, cannot say whose set the write moved it out of).
const P_UNROUTED: &[u8] = b"rr/";
/// `rv/` + device id → nothing: a device whose records a revocation dropped; it may not be
/// enrolled again.
const P_REVOKED_DEVICE: &[u8] = b"rv/";
/// The environment the routers were last built with (JSON), and per profile `cfg/profile/`
/// name → the profile (JSON): what devices' sets follow until the hub moves to new ones.
const K_CONFIG_ENV: &[u8] = b"cfg/env";
/// Set once the actors of an older hub (`act/` without `aa/`) were given owners.
const K_ACTORS_CLAIMED: &[u8] = b"cfg/actors-claimed";
/// The time (ms) time-dependent filters were last evaluated at.
const K_CONFIG_TIME: &[u8] = b"cfg/time";
const P_CONFIG_PROFILE: &[u8] = b"cfg/profile/";

fn profile_config_key(name: &str) -> Vec<u8> {
    let mut k = P_CONFIG_PROFILE.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// A configuration the hub stored, `None` if none (a new hub) or if it no longer decodes (an
/// older format: the hub then starts from the new configuration, as before it kept one).
fn stored_config<T: serde::de::DeserializeOwned>(
    store: &Store,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    Ok(store.aux_get(SPACE, key)?.and_then(|v| {
        serde_json::from_slice(&v)
            .inspect_err(|e| warn!(error = %e, "a stored hub configuration does not decode"))
            .ok()
    }))
}

fn store_config<T: Serialize>(store: &Store, key: &[u8], value: &T) -> Result<(), StoreError> {
    let json = serde_json::to_vec(value)
        .map_err(|e| StoreError::Corrupt(format!("the hub configuration does not encode: {e}")))?;
    store.aux_put(SPACE, key, &json, Durability::Group)
}

/// The last log seq whose entry is in the feed index.
const K_FED: &[u8] = b"fed";
/// Log entries indexed per aux batch when the feed index catches up.
const FEED_BATCH: usize = 4096;
/// Log entries a pull looks at per requested item (other tables' entries are skipped).
const SCAN_FACTOR: usize = 4;
/// Most log windows of `SCAN_FACTOR` × the batch size one pull reads.
const MAX_SCAN_WINDOWS: usize = 64;

/// What a pull sends a device for a row it touched: its ops (the device keeps holding it), the
/// whole row (it entered the set), its id (it left), or nothing.
#[derive(Clone, Copy, PartialEq)]
enum Fate {
    Ops,
    Entered,
    Left,
    Skip,
}

/// A row touched in the feed: (seq, row, whether the log entry at that seq is the touch —
/// `false` for a membership change at that seq). The entry itself is read only when its
/// change is sent or its actor matters ([`HubReplica::fed_entry`]): most touches of an
/// initial sync go to rows sent whole.
type Touch = (u64, RowId, bool);

/// Why the hub replica could not be set up or could not do what an operator asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubReplicaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A write the store refused (unknown column, wrong type, not an image ...).
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A profile does not fit the schema.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// Signing a token failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Protocol storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The hub has no signing key (it can verify tokens but not issue them).
    #[error("this hub replica was opened without a signing key")]
    NoSigningKey,
    /// No such user in the environment.
    #[error("unknown user `{0}`")]
    UnknownUser(String),
    /// No such app, or the app has no offline profile.
    #[error("unknown app `{0}` or it has no offline profile")]
    UnknownApp(String),
    /// Every token of this device was revoked (and what the hub kept for it dropped): it may
    /// not come back with its old store.
    #[error("device {0} was revoked; enroll it as a new device")]
    DeviceRevoked(Uuid),
}

/// A token the hub issued, as [`HubReplica::issued_tokens`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token's id.
    pub token_id: Uuid,
    /// Whether it was revoked.
    pub revoked: bool,
    /// The token (device, user, app, when issued); `None` for tokens issued before the hub
    /// kept these.
    pub token: Option<Token>,
}

/// How far behind the feed a device is, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLag {
    /// The device.
    pub device: DeviceId,
    /// The table.
    pub table: String,
    /// The cursor the device last pulled from.
    pub cursor: Cursor,
    /// Hub log entries after that cursor (all tables).
    pub behind: u64,
}

/// A decision remembered per change hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Decision {
    Accepted,
    Rejected {
        operation: Operation,
        kind: RejectionKind,
        message: String,
    },
}

/// The hub's token registry as its store's aux space records it: `tok/` + token id → `[1]`
/// issued, `[0]` revoked (then the token's unsigned fields, `Token::to_record`). Read through on every check, so tokens enrolled or revoked by
/// another handle on the same store count at once; the transport checks tokens with it
/// before any session (or the replica's lock) is involved.
#[derive(Debug, Clone)]
pub struct StoreTokenRegistry(pub Store);

impl TokenRegistry for StoreTokenRegistry {
    fn status(&self, token_id: &Uuid) -> TokenStatus {
        let mut k = P_TOKEN.to_vec();
        k.extend_from_slice(token_id.as_bytes());
        match self.0.aux_get(SPACE, &k) {
            Ok(Some(v)) if v.first() == Some(&1) => TokenStatus::Active,
            Ok(Some(_)) => TokenStatus::Revoked,
            Ok(None) => TokenStatus::Unknown,
            Err(e) => {
                warn!(error = %e, "cannot read token records");
                TokenStatus::Unavailable
            }
        }
    }
}

/// What a batch of writes changed on the hub: every table written, and per user the tables
/// whose feed (rows held, entering or leaving) moved. Only those users' sessions need to pull.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedChanges {
    tables: BTreeSet<String>,
    feeds: BTreeSet<(UserId, String)>,
}

impl FeedChanges {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.feeds.is_empty()
    }

    /// Every table written (for listeners that want all changes, like the upstream bridge).
    pub fn tables(&self) -> Vec<String> {
        self.tables.iter().cloned().collect()
    }

    /// The tables whose feed moved for `user`.
    pub fn tables_for(&self, user: UserId) -> Vec<String> {
        self.feeds
            .range((user, String::new())..)
            .take_while(|(u, _)| *u == user)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// `table` was written.
    pub fn record_table(&mut self, table: &str) {
        if !self.tables.contains(table) {
            self.tables.insert(table.to_string());
        }
    }

    /// `user`'s feed of `table` moved (the table was written too).
    pub fn record_feed(&mut self, user: UserId, table: &str) {
        self.record_table(table);
        self.feeds.insert((user, table.to_string()));
    }

    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: FeedChanges) {
        self.tables.extend(other.tables);
        self.feeds.extend(other.feeds);
    }
}

/// The hub's [`HubStorage`] over its store, environment, apps and profiles.
#[derive(Debug)]
pub struct HubReplica {
    store: Store,
    env: Environment,
    apps: BTreeMap<String, App>,
    profiles: BTreeMap<String, Profile>,
    routers: BTreeMap<String, Router>,
    verifier: TokenVerifier,
    signing: Option<HubSigningKey>,
    changed: FeedChanges,
    lag: HashMap<(DeviceId, String), Cursor>,
    /// The (device, table)s whose cursor this log does not hold, reported once each.
    cursors_unknown: HashSet<(DeviceId, String)>,
    /// Devices whose records `revoke_all` dropped since this replica opened: a session of
    /// theirs still running (a frame read before the revocation) gets a storage error, so it
    /// writes nothing back. (After a restart their tokens are refused at the door.)
    revoked_devices: HashSet<Uuid>,
    /// The last log seq in the feed index (`K_FED`).
    fed: u64,
    shared_feed_holders: usize,
    now_ms: i64,
    #[cfg(feature = "planted-bugs")]
    planted: Option<PlantedHubBug>,
}

/// A bug planted on purpose, to prove the simulator finds such bugs (feature `planted-bugs`,
/// enabled only by the simulator's tests; never in a product build).
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlantedHubBug {
    /// A pull forgets to tell the device that a row left its set while the row still exists
    /// (its owner changed, or the user lost access): the device keeps a row it may not see.
    ForgetsEviction,
}

fn rejected(operation: Operation, kind: RejectionKind, message: &str) -> Decision {
    Decision::Rejected {
        operation,
        kind,
        message: message.to_string(),
    }
}

/// What a device holds after a rejected op was rolled back, from log position `seq` on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Override {
    seq: u64,
    held: bool,
}

fn override_key(device: DeviceId, table: &str, row: RowId) -> Vec<u8> {
    let mut p = P_OVERRIDE.to_vec();
    p.extend_from_slice(device.0.as_bytes());
    row_key(&p, table, row)
}

/// The mark of a device whose tokens were all revoked.
fn revoked_device_key(device: Uuid) -> Vec<u8> {
    let mut k = P_REVOKED_DEVICE.to_vec();
    k.extend_from_slice(device.as_bytes());
    k
}

fn history_key(device: DeviceId, table: &str, row: RowId) -> Vec<u8> {
    let mut p = P_HISTORY.to_vec();
    p.extend_from_slice(device.0.as_bytes());
    row_key(&p, table, row)
}

fn membership_prefix(profile: &str, user: UserId) -> Vec<u8> {
    let mut k = P_MEMBERSHIP.to_vec();
    k.extend_from_slice(profile.as_bytes());
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k
}

fn feed_prefix(profile: &str, user: UserId, table: &str) -> Vec<u8> {
    let mut k = P_FEED.to_vec();
    k.extend_from_slice(profile.as_bytes());
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k
}

/// Feed entries `(seq, row)` in seq order, each once, and the last seq the window covers (the
/// log's last when every feed was read to its end; a whole seq otherwise).
struct FeedWindow {
    entries: Vec<(u64, RowId)>,
    tail: u64,
}

fn shared_feed_prefix(profile: &str, table: &str) -> Vec<u8> {
    let mut k = P_SHARED_FEED.to_vec();
    k.extend_from_slice(profile.as_bytes());
    k.push(0);
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k
}

fn seq_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The (seq, row) of a feed key without its prefix.
fn parse_feed_key(rest: &[u8]) -> Option<(u64, RowId)> {
    let seq = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let row = Uuid::from_slice(rest.get(8..24)?).ok()?;
    Some((seq, row))
}

/// Records which rows refer to which blobs (`bl/` + sha256 + row key), so a blob request
/// checks a few rows instead of the device's whole set. Entries are never removed: a request
/// re-checks that the row still refers to the blob.
fn index_blobs(
    store: &Store,
    table: &str,
    row: RowId,
    values: &BTreeMap<String, Value>,
) -> Result<(), StoreError> {
    let mut writes = Vec::new();
    for v in values.values() {
        if let Value::File(b) | Value::Image(b) = v {
            let p = sha_key(P_BLOB, &b.sha256);
            writes.push(AuxWrite::Put(row_key(&p, table, row), Vec::new()));
        }
    }
    if !writes.is_empty() {
        store.aux_apply(SPACE, &writes, Durability::Group)?;
    }
    Ok(())
}

/// A device's unfinished upload, as stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct PendingUpload {
    /// Bytes held (the pieces under `uc/`).
    progress: u64,
    /// When a piece last arrived.
    touched_ms: u64,
}

/// The pieces of one finished upload in order, read one at a time (as a [`std::io::Read`] for
/// the blob store).
struct UploadPieces<'a> {
    store: &'a Store,
    prefix: Vec<u8>,
    total: u64,
    offset: u64,
    /// The keys read so far.
    keys: Vec<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl<'a> UploadPieces<'a> {
    fn new(store: &'a Store, prefix: Vec<u8>, total: u64) -> Self {
        UploadPieces {
            store,
            prefix,
            total,
            offset: 0,
            keys: Vec::new(),
            piece: Vec::new(),
            at: 0,
        }
    }

    /// The next piece (`None` after the last byte of `total`).
    fn next_piece(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        if self.offset >= self.total {
            return Ok(None);
        }
        let mut k = self.prefix.clone();
        k.extend_from_slice(&self.offset.to_be_bytes());
        let piece = self
            .store
            .aux_get(SPACE, &k)
            .map_err(storage_err)?
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                StorageError::Corrupt(format!("an upload's piece at {} is missing", self.offset))
            })?;
        self.offset += piece.len() as u64;
        self.keys.push(k);
        Ok(Some(piece))
    }
}

impl std::io::Read for UploadPieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.piece.len() {
            match self.next_piece().map_err(std::io::Error::other)? {
                Some(p) => {
                    self.piece = p;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The record that `device` attached content `sha256` in an op the hub accepted.
fn attached_key(device: DeviceId, sha256: &[u8; 32]) -> Vec<u8> {
    let mut k = sha_key(P_ATTACHED, sha256);
    k.extend_from_slice(device.0.as_bytes());
    k
}

/// `prefix` · device (16 bytes) · sha256: one device's upload of one blob.
fn upload_key(prefix: &[u8], device: DeviceId, sha256: &[u8; 32]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(device.0.as_bytes());
    k.extend_from_slice(sha256);
    k
}

/// Low bits of a [`Cursor`] that check the log entry at its position. A cursor is the seq of
/// the last log entry it covers, shifted left by this many bits, with the low bits holding the
/// first bytes of that entry's change hash. A hub whose log is not the one a cursor came from
/// (its store restored from a backup, then written again) finds the check differs, however far
/// its log has grown since, and restarts that device's feed (`docs/operations.md`).
const CURSOR_CHECK_BITS: u32 = 16;

/// The log seq a cursor names (whatever its check says).
fn cursor_seq(cursor: Cursor) -> u64 {
    cursor.0 >> CURSOR_CHECK_BITS
}

/// Whether the device held a row at feed position `at`, from its transitions.
fn held_at(history: &[(u64, bool)], at: u64) -> bool {
    history
        .iter()
        .rev()
        .find(|(c, _)| *c <= at)
        .is_some_and(|(_, h)| *h)
}

/// Whether `user`'s roles grant `privilege` on a row of `table` with these values.
fn privileged(
    env: &Environment,
    user: UserId,
    table: &Table,
    privilege: Privilege,
    values: &BTreeMap<String, Value>,
) -> bool {
    let Some(u) = env.user(user) else {
        return false;
    };
    let owner = match values.get("ownerid") {
        Some(Value::Owner(o)) => Some(*o),
        _ => None,
    };
    let row_bu = env.row_business_unit(values);
    let org_owned = table.ownership == fieldsync_store::Ownership::Organization;
    let me = OwnerRef {
        kind: OwnerKind::User,
        id: user,
    };
    let grants = |depth: Depth, owners: &[OwnerRef], bu: Uuid| -> bool {
        match depth {
            Depth::None => false,
            _ if org_owned => true,
            Depth::Organization => true,
            // A row without an owner yet (a create that sets none) is the creator's.
            Depth::User => owner.is_none_or(|o| owners.contains(&o)),
            Depth::BusinessUnit => row_bu.is_none_or(|b| b == bu),
            Depth::ParentChild => row_bu.is_none_or(|b| env.subtree(bu).contains(&b)),
        }
    };
    let teams: Vec<_> = env.teams_of(user).collect();
    let mut own = vec![me];
    own.extend(teams.iter().map(|t| OwnerRef {
        kind: OwnerKind::Team,
        id: t.id,
    }));
    for r in u.roles.iter().filter_map(|r| env.role(*r)) {
        if grants(r.depth(&table.name, privilege), &own, u.business_unit) {
            return true;
        }
    }
    for t in &teams {
        let owners = [
            me,
            OwnerRef {
                kind: OwnerKind::Team,
                id: t.id,
            },
        ];
        for r in t.roles.iter().filter_map(|r| env.role(*r)) {
            if grants(r.depth(&table.name, privilege), &owners, t.business_unit) {
                return true;
            }
        }
    }
    false
}

impl HubReplica {
    /// Opens the hub's replica: loads every row of `store` into one router per profile and
    /// the token registry from the aux space. `now_ms` is the time for time-dependent
    /// filters.
    pub fn open(
        store: Store,
        env: Environment,
        apps: Vec<App>,
        profiles: Vec<Profile>,
        verifier: TokenVerifier,
        now_ms: i64,
    ) -> Result<HubReplica, HubReplicaError> {
        let _span = info_span!("hub_replica_open").entered();
        let schema = store.schema().clone();
        // The sets devices were last given follow the environment and profiles the hub last
        // ran with: route with those, then move to the new ones as a running hub would, so
        // that a role taken away or a filter narrowed while it was down evicts rows too.
        let last_env = stored_config::<Environment>(&store, K_CONFIG_ENV)?;
        let routed_env = last_env.clone().unwrap_or_else(|| env.clone());
        let mut stored_profiles = Vec::new();
        for p in &profiles {
            stored_profiles.push(stored_config::<Profile>(
                &store,
                &profile_config_key(&p.name),
            )?);
        }
        let last_profiles: Vec<Profile> = profiles
            .iter()
            .zip(&stored_profiles)
            .map(|(p, last)| last.clone().unwrap_or_else(|| p.clone()))
            .collect();
        // Time-dependent filters too: rows crossed their boundaries while it was down.
        let last_time = stored_config::<i64>(&store, K_CONFIG_TIME)?;
        let routed_time = last_time.unwrap_or(now_ms);
        let mut routers = BTreeMap::new();
        for p in &last_profiles {
            let mut r = Router::new(&schema, &routed_env, p, routed_time)?;
            for t in schema.tables() {
                for row in store.scan(&t.name)? {
                    let row = row?;
                    r.load_row(&t.name, row.id, Some(&row.values));
                    index_blobs(&store, &t.name, row.id, &row.values)?;
                }
            }
            r.rebuild();
            routers.insert(p.name.clone(), r);
        }
        let tokens = store.aux_scan(SPACE, P_TOKEN)?.len();
        let fed =
            match store.aux_get(SPACE, K_FED)? {
                Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                    StoreError::Corrupt("the hub's feed position is malformed".into())
                })?),
                None => 0,
            };
        info!(profiles = routers.len(), tokens, fed, "hub replica open");
        let mut hub = HubReplica {
            store,
            env: routed_env,
            apps: apps.into_iter().map(|a| (a.name.clone(), a)).collect(),
            profiles: last_profiles
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
            routers,
            verifier,
            signing: None,
            changed: FeedChanges::default(),
            lag: HashMap::new(),
            cursors_unknown: HashSet::new(),
            revoked_devices: HashSet::new(),
            fed,
            shared_feed_holders: SHARED_FEED_HOLDERS,
            now_ms: routed_time,
            #[cfg(feature = "planted-bugs")]
            planted: None,
        };
        // Entries written before a crash (or by an older hub) that never reached the index.
        hub.feed_log(None)?;
        hub.route_leftovers()?;
        hub.claim_known_actors()?;
        match last_time {
            None => store_config(&hub.store, K_CONFIG_TIME, &now_ms)?,
            Some(t) if t != now_ms => hub.handle_time(now_ms)?,
            Some(_) => {}
        }
        match last_env {
            None => store_config(&hub.store, K_CONFIG_ENV, &env)?,
            Some(last) if last != env => hub.handle_environment(env)?,
            Some(_) => {}
        }
        for (p, last) in profiles.into_iter().zip(stored_profiles) {
            match last {
                None => store_config(&hub.store, &profile_config_key(&p.name), &p)?,
                Some(last) if last != p => hub.handle_profile(p)?,
                Some(_) => {}
            }
        }
        hub.drop_stale_uploads(u64::try_from(now_ms).unwrap_or(0))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(hub)
    }

    /// Rows held by more than `holders` users of a profile are filed once in the profile's
    /// shared feed rather than in each user's ([`SHARED_FEED_HOLDERS`] by default; tests use 0
    /// to send every row through the shared feed).
    pub fn with_shared_feed_holders(mut self, holders: usize) -> HubReplica {
        self.shared_feed_holders = holders;
        self
    }

    /// Switches a planted bug on (tests of the simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn plant_bug(&mut self, bug: Option<PlantedHubBug>) {
        self.planted = bug;
    }

    /// Whether the planted eviction bug hides that this row left a set.
    #[cfg(feature = "planted-bugs")]
    fn forgets_eviction(&self, table: &str, row: RowId) -> bool {
        self.planted == Some(PlantedHubBug::ForgetsEviction)
            && self.store.get(table, row).ok().flatten().is_some()
    }

    #[cfg(not(feature = "planted-bugs"))]
    fn forgets_eviction(&self, _table: &str, _row: RowId) -> bool {
        false
    }

    /// Gives the replica the hub's signing key, so it can [`enroll`](HubReplica::enroll).
    pub fn with_signing_key(mut self, key: HubSigningKey) -> HubReplica {
        self.signing = Some(key);
        self
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The environment.
    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// Issues a token for a device of `user` (a name or an id) and `app`, and records it.
    pub fn enroll(
        &mut self,
        user: &str,
        app: &str,
        device: Uuid,
        now_ms: u64,
    ) -> Result<SignedToken, HubReplicaError> {
        self.enroll_with_token_id(user, app, device, Uuid::new_v4(), now_ms)
    }

    /// [`enroll`](HubReplica::enroll) with the token's id chosen by the caller, for callers
    /// that must be reproducible (the simulator); ids must be unique.
    pub fn enroll_with_token_id(
        &mut self,
        user: &str,
        app: &str,
        device: Uuid,
        token_id: Uuid,
        now_ms: u64,
    ) -> Result<SignedToken, HubReplicaError> {
        let key = self.signing.as_ref().ok_or(HubReplicaError::NoSigningKey)?;
        let user_id = self
            .resolve_user(user)
            .ok_or_else(|| HubReplicaError::UnknownUser(user.to_string()))?;
        if self.profile_of(app).is_none() {
            return Err(HubReplicaError::UnknownApp(app.to_string()));
        }
        self.refuse_revoked_device(device)?;
        let token = Token {
            device_id: device,
            user_id: user_id.to_string(),
            app: app.to_string(),
            issued_at_ms: now_ms,
            token_id,
        };
        let signed = key.sign(&token)?;
        let mut k = P_TOKEN.to_vec();
        k.extend_from_slice(token.token_id.as_bytes());
        // The status byte, then the token's fields (unsigned: not a credential), so that
        // `issued_tokens` can say whose it is.
        let mut record = vec![1];
        record.extend_from_slice(&token.to_record()?);
        self.store
            .aux_put(SPACE, &k, &record, Durability::Immediate)?;
        info!(%device, user = %user_id, app, "device enrolled");
        Ok(signed)
    }

    /// Revokes a token: sessions presenting it are refused from now on. Returns whether the
    /// hub had issued it (a token it did not issue is left alone: its signature fails anyway).
    pub fn revoke(&mut self, token_id: Uuid) -> Result<bool, HubReplicaError> {
        Ok(self.revoke_all(&[token_id])? == [true])
    }

    /// Revokes these tokens in one durable write: all or none. Says for each whether the hub
    /// had issued it (a token it did not issue is left alone: its signature fails anyway).
    ///
    /// A device left with no active token never syncs again, so what the hub kept for its
    /// sessions goes in the same write: which rows it held, its rollback overrides, its
    /// unfinished uploads (a hub with many devices come and gone does not keep them all).
    /// Its actor claims stay: no other device may write as it.
    pub fn revoke_all(&mut self, token_ids: &[Uuid]) -> Result<Vec<bool>, HubReplicaError> {
        let mut writes = Vec::new();
        let mut issued = Vec::with_capacity(token_ids.len());
        let mut devices = BTreeSet::new();
        for token_id in token_ids {
            let mut k = P_TOKEN.to_vec();
            k.extend_from_slice(token_id.as_bytes());
            let Some(mut record) = self.store.aux_get(SPACE, &k)? else {
                issued.push(false);
                continue;
            };
            if let Some(token) = record
                .get(1..)
                .filter(|details| !details.is_empty())
                .and_then(|details| Token::from_record(details).ok())
            {
                devices.insert(token.device_id);
            }
            // The token's details stay on record after the status byte.
            match record.first_mut() {
                Some(status) => *status = 0,
                None => record.push(0),
            }
            writes.push(AuxWrite::Put(k, record));
            issued.push(true);
        }
        let gone = self.devices_left_without_tokens(token_ids, &devices);
        for device in &gone {
            writes.push(AuxWrite::Put(revoked_device_key(*device), Vec::new()));
            for prefix in [P_HISTORY, P_OVERRIDE, P_UPLOAD, P_UPLOAD_CHUNK] {
                let mut p = prefix.to_vec();
                p.extend_from_slice(device.as_bytes());
                for (k, _) in self.store.aux_scan(SPACE, &p)? {
                    writes.push(AuxWrite::Remove(k));
                }
            }
        }
        if !gone.is_empty() {
            // Attachment records are keyed by content first.
            for (k, _) in self.store.aux_scan(SPACE, P_ATTACHED)? {
                let device = k
                    .len()
                    .checked_sub(16)
                    .and_then(|at| Uuid::from_slice(&k[at..]).ok());
                if device.is_some_and(|d| gone.contains(&d)) {
                    writes.push(AuxWrite::Remove(k));
                }
            }
        }
        if !writes.is_empty() {
            self.store
                .aux_apply(SPACE, &writes, Durability::Immediate)?;
        }
        self.lag.retain(|(d, _), _| !gone.contains(&d.0));
        self.cursors_unknown.retain(|(d, _)| !gone.contains(&d.0));
        self.revoked_devices.extend(gone);
        Ok(issued)
    }

    /// Of `devices` (those of the tokens being revoked), the ones left with no active token.
    /// None when that cannot be told for sure: an active token issued before tokens kept
    /// their details (whose device is unknown), or token records that do not read — a
    /// revocation must not fail for them, and keeping records is the safe side.
    fn devices_left_without_tokens(
        &self,
        revoking: &[Uuid],
        devices: &BTreeSet<Uuid>,
    ) -> Vec<Uuid> {
        let tokens = match self.issued_tokens() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "token records do not read: a revoked device's records are kept");
                return Vec::new();
            }
        };
        let mut still_active = BTreeSet::new();
        for t in tokens {
            if t.revoked || revoking.contains(&t.token_id) {
                continue;
            }
            match t.token {
                Some(token) => {
                    still_active.insert(token.device_id);
                }
                None => return Vec::new(),
            }
        }
        devices.difference(&still_active).copied().collect()
    }

    /// Refuses storage work for a device whose records a revocation dropped.
    fn check_not_revoked(&self, who: &Principal) -> Result<(), StorageError> {
        if self.revoked_devices.contains(&who.device.0) {
            return Err(StorageError::Unavailable(format!(
                "device {} was revoked",
                who.device
            )));
        }
        Ok(())
    }

    /// Every token this hub issued, in token-id order, with whose it is and whether it was
    /// revoked (`hub devices`).
    pub fn issued_tokens(&self) -> Result<Vec<IssuedToken>, HubReplicaError> {
        let mut out = Vec::new();
        for (key, record) in self.store.aux_scan(SPACE, P_TOKEN)? {
            let token_id = key
                .get(P_TOKEN.len()..)
                .and_then(|b| Uuid::from_slice(b).ok())
                .ok_or_else(|| StoreError::Corrupt("a token record's key is malformed".into()))?;
            // A record that does not decode is listed without details (and counts as revoked,
            // as the transport's check does): the listing is needed most when things are odd.
            let (status, details) = record.split_first().map_or((0, &[][..]), |(s, d)| (*s, d));
            // Tokens issued before their details were kept have none.
            let token = if details.is_empty() {
                None
            } else {
                Token::from_record(details)
                    .inspect_err(|e| warn!(%token_id, error = %e, "a token record does not decode"))
                    .ok()
            };
            out.push(IssuedToken {
                token_id,
                revoked: status != 1,
                token,
            });
        }
        Ok(out)
    }

    /// What changed since the last call (applied pushes, resolutions, membership changes):
    /// hand each live `HubSession::handle_changes` the tables of its user
    /// ([`FeedChanges::tables_for`]).
    pub fn take_changes(&mut self) -> FeedChanges {
        std::mem::take(&mut self.changed)
    }

    /// How many (device, table)s pulled with a cursor this hub's log does not hold (past its
    /// end, or naming an entry that is not there) since it opened: forged cursors, or devices
    /// that were fed from a log this store lost part of (a restore from a backup).
    pub fn cursors_not_in_log(&self) -> usize {
        self.cursors_unknown.len()
    }

    /// The cursor of this hub's log at `seq` (0: the start): what a device provisioned out of
    /// band from a snapshot at `seq` pulls from ([`HubReplica::provision`]).
    pub fn cursor_at(&self, seq: u64) -> Result<Cursor, HubReplicaError> {
        Ok(self.log_cursor(seq)?)
    }

    fn log_cursor(&self, seq: u64) -> Result<Cursor, StorageError> {
        if seq == 0 {
            return Ok(Cursor(0));
        }
        let check = self
            .store
            .log_entry(seq)
            .map_err(storage_err)?
            .map_or(0, |e| u64::from(u16::from_be_bytes([e.hash[0], e.hash[1]])));
        seq.checked_mul(1 << CURSOR_CHECK_BITS)
            .map(|s| Cursor(s | check))
            .ok_or_else(|| {
                StorageError::Corrupt(format!("log seq {seq} is beyond what a cursor can name"))
            })
    }

    /// Per device and table, the cursor it last pulled from and how far the feed is ahead.
    pub fn device_lags(&self) -> Vec<DeviceLag> {
        let last = self.store.last_seq();
        let mut out: Vec<DeviceLag> = self
            .lag
            .iter()
            .map(|((d, t), c)| DeviceLag {
                device: *d,
                table: t.clone(),
                cursor: *c,
                behind: last.saturating_sub(cursor_seq(*c)),
            })
            .collect();
        out.sort_by(|a, b| (a.device, &a.table).cmp(&(b.device, &b.table)));
        out
    }

    /// A change made on the hub itself (an admin, a flow, a test): written through a store
    /// transaction by `edit`, then routed like a pushed op.
    pub fn local_write(
        &mut self,
        table: &str,
        row: RowId,
        values: &[(&str, Value)],
    ) -> Result<(), HubReplicaError> {
        let mut tx = self.store.begin();
        if self.store.get(table, row)?.is_some() {
            tx.update(table, row, values)?;
        } else {
            tx.insert_with_id(table, row, values)?;
        }
        self.mark_unrouted(&[(table, row)])?;
        tx.commit_with(Durability::Immediate)?;
        self.route(table, row)?;
        self.feed_log(None)?;
        self.routed(&[(table, row)])?;
        self.store.sync()?;
        Ok(())
    }

    /// Changes from the system of record (the Dataverse bridge): applied durably without a
    /// device's authorization (they come from upstream, which already decided), then routed
    /// like a pushed op. Idempotent, as [`Store::apply_remote`].
    pub fn apply_upstream(
        &mut self,
        ops: &[RemoteOp],
    ) -> Result<fieldsync_store::ApplyOutcome, HubReplicaError> {
        let _span = info_span!("hub_apply_upstream", ops = ops.len()).entered();
        let rows: BTreeSet<(&str, RowId)> = ops.iter().map(|o| (o.table.as_str(), o.row)).collect();
        let rows: Vec<(&str, RowId)> = rows.into_iter().collect();
        self.mark_unrouted(&rows)?;
        let outcome = self.store.apply_remote(ops, Durability::Immediate)?;
        for (table, row) in &rows {
            self.route(table, *row)?;
        }
        self.feed_log(None)?;
        self.routed(&rows)?;
        self.store.sync()?;
        Ok(outcome)
    }

    /// The environment changed (users, teams, roles): re-route every set.
    pub fn handle_environment(&mut self, env: Environment) -> Result<(), HubReplicaError> {
        let mut all = Vec::new();
        for (name, r) in self.routers.iter_mut() {
            all.push((name.clone(), r.handle_environment(&env)));
        }
        let next = self.store.last_seq() + 1;
        for (profile, deltas) in all {
            self.record_deltas(&profile, &deltas, next)?;
        }
        store_config(&self.store, K_CONFIG_ENV, &env)?;
        self.env = env;
        self.store.sync()?;
        Ok(())
    }

    /// A profile changed (or is new): re-route every user of its apps. Rows entering and
    /// leaving a set go out with the next pulls, like any other membership change.
    pub fn handle_profile(&mut self, profile: Profile) -> Result<(), HubReplicaError> {
        let _span = info_span!("hub_profile", profile = %profile.name).entered();
        let schema = self.store.schema().clone();
        let mut rows = Vec::new();
        for t in schema.tables() {
            for row in self.store.scan(&t.name)? {
                rows.push(row?);
            }
        }
        let views = rows.iter().map(|r| crate::evaluate::RowView {
            table: &r.table,
            id: r.id,
            values: &r.values,
        });
        let deltas = match self.routers.get_mut(&profile.name) {
            Some(router) => router.handle_profile(&profile, views)?,
            None => {
                let router = Router::with_rows(&schema, &self.env, &profile, self.now_ms, views)?;
                self.routers.insert(profile.name.clone(), router);
                Vec::new()
            }
        };
        let name = profile.name.clone();
        let next = self.store.last_seq() + 1;
        self.record_deltas(&name, &deltas, next)?;
        store_config(&self.store, &profile_config_key(&name), &profile)?;
        self.profiles.insert(name, profile);
        self.store.sync()?;
        Ok(())
    }

    /// Records that `device` holds these rows as of feed position `at`, for a device
    /// provisioned out of band (loaded from a snapshot of the hub's rows at `at`) rather than
    /// by pulling from the start: its pulls from `at` on treat the rows as already held.
    /// Refused for a device whose tokens were all revoked (its records were dropped then).
    pub fn provision(
        &mut self,
        device: DeviceId,
        rows: &[(String, RowId)],
        at: Cursor,
    ) -> Result<(), HubReplicaError> {
        self.refuse_revoked_device(device.0)?;
        let writes: Vec<AuxWrite> = rows
            .iter()
            .map(|(table, row)| {
                AuxWrite::Put(
                    history_key(device, table, *row),
                    enc(&vec![(cursor_seq(at), true)]),
                )
            })
            .collect();
        if !writes.is_empty() {
            self.store
                .aux_apply(SPACE, &writes, Durability::Immediate)?;
        }
        Ok(())
    }

    /// [`HubReplicaError::DeviceRevoked`] if every token of `device` was revoked and its
    /// records dropped (`revoke_all`): the device id is not taken again.
    fn refuse_revoked_device(&self, device: Uuid) -> Result<(), HubReplicaError> {
        if self
            .store
            .aux_get(SPACE, &revoked_device_key(device))?
            .is_some()
        {
            return Err(HubReplicaError::DeviceRevoked(device));
        }
        Ok(())
    }

    /// The time moved (time-dependent filters).
    pub fn handle_time(&mut self, now_ms: i64) -> Result<(), HubReplicaError> {
        self.now_ms = now_ms;
        let mut all = Vec::new();
        for (name, r) in self.routers.iter_mut() {
            all.push((name.clone(), r.handle_time(now_ms)));
        }
        let next = self.store.last_seq() + 1;
        let moved = all.iter().any(|(_, d)| !d.is_empty());
        for (profile, deltas) in all {
            self.record_deltas(&profile, &deltas, next)?;
        }
        store_config(&self.store, K_CONFIG_TIME, &now_ms)?;
        if moved {
            self.store.sync()?;
        }
        Ok(())
    }

    /// The rows of `user`'s set under `app`'s profile.
    pub fn device_set(&self, user: UserId, app: &str) -> BTreeSet<(String, RowId)> {
        self.profile_of(app)
            .and_then(|p| self.routers.get(p))
            .map(|r| r.device_set(user))
            .unwrap_or_default()
    }

    fn resolve_user(&self, user: &str) -> Option<UserId> {
        match Uuid::parse_str(user) {
            Ok(id) => self.env.user(id).map(|u| u.id),
            Err(_) => self.env.user_by_name(user).map(|u| u.id),
        }
    }

    fn profile_of(&self, app: &str) -> Option<&str> {
        let p = self.apps.get(app)?.profile.as_deref()?;
        self.profiles.contains_key(p).then_some(p)
    }

    fn router_for(&self, who: &Principal) -> Option<(&str, &Router)> {
        let p = self.profile_of(&who.app)?;
        Some((p, self.routers.get(p)?))
    }

    fn in_set(&self, who: &Principal, table: &str, row: RowId) -> bool {
        self.router_for(who)
            .is_some_and(|(_, r)| r.holders(table, row).contains(&who.user))
    }

    /// Records, per profile and user, the rows entering and leaving at `seq`: the seq of the
    /// write that moved them, or — for a change with no log entry of its own (environment,
    /// time, profile) — the next seq (`last_seq + 1`), which no device has pulled past yet.
    fn record_deltas(
        &mut self,
        profile: &str,
        deltas: &[UserDelta],
        seq: u64,
    ) -> Result<(), StoreError> {
        let mut writes = Vec::new();
        for d in deltas {
            let mut p = membership_prefix(profile, d.user);
            p.extend_from_slice(&seq.to_be_bytes());
            for r in d.enter.iter().chain(d.leave.iter()) {
                writes.push(AuxWrite::Put(row_key(&p, &r.table, r.id), Vec::new()));
                self.changed.record_feed(d.user, &r.table);
            }
        }
        if !writes.is_empty() {
            self.store.aux_apply(SPACE, &writes, Durability::Group)?;
        }
        Ok(())
    }

    fn mark_unrouted(&self, rows: &[(&str, RowId)]) -> Result<(), StoreError> {
        let writes: Vec<AuxWrite> = rows
            .iter()
            .map(|(t, r)| AuxWrite::Put(row_key(P_UNROUTED, t, *r), Vec::new()))
            .collect();
        self.store.aux_apply(SPACE, &writes, Durability::Group)
    }

    fn routed(&self, rows: &[(&str, RowId)]) -> Result<(), StoreError> {
        let writes: Vec<AuxWrite> = rows
            .iter()
            .map(|(t, r)| AuxWrite::Remove(row_key(P_UNROUTED, t, *r)))
            .collect();
        self.store.aux_apply(SPACE, &writes, Durability::Group)
    }

    /// Rows a crash left written and not routed: every user of every profile re-evaluates
    /// them at its next pull (a membership change for a row whose membership did not change
    /// only makes a pull look at it again).
    fn route_leftovers(&mut self) -> Result<(), StoreError> {
        let left = self.store.aux_scan(SPACE, P_UNROUTED)?;
        if left.is_empty() {
            return Ok(());
        }
        let rows: Vec<RowRef> = left
            .iter()
            .filter_map(|(k, _)| k.get(P_UNROUTED.len()..).and_then(super::parse_row_key))
            .map(|(table, id)| RowRef {
                table: table.as_str().into(),
                id,
            })
            .collect();
        warn!(
            rows = rows.len(),
            "rows written before a crash were not routed; every device looks at them again"
        );
        let deltas: Vec<UserDelta> = self
            .env
            .users()
            .map(|u| UserDelta {
                user: u.id,
                enter: rows.clone(),
                leave: Vec::new(),
            })
            .collect();
        let next = self.store.last_seq() + 1;
        let profiles: Vec<String> = self.routers.keys().cloned().collect();
        for profile in profiles {
            self.record_deltas(&profile, &deltas, next)?;
        }
        let clear: Vec<AuxWrite> = left.into_iter().map(|(k, _)| AuxWrite::Remove(k)).collect();
        self.store.aux_apply(SPACE, &clear, Durability::Immediate)
    }

    /// Routes the current version of a row through every profile's router.
    fn route(&mut self, table: &str, row: RowId) -> Result<(), StoreError> {
        let current = self.store.get(table, row)?;
        let values = current.as_ref().map(|r| &r.values);
        if let Some(v) = values {
            index_blobs(&self.store, table, row, v)?;
        }
        let mut all = Vec::new();
        for (name, r) in self.routers.iter_mut() {
            let route = r.handle_write(table, row, values);
            all.push((name.clone(), route.deltas));
        }
        self.changed.record_table(table);
        let seq = self.store.last_seq();
        for (profile, deltas) in all {
            self.record_deltas(&profile, &deltas, seq)?;
        }
        Ok(())
    }

    /// Indexes every log entry after `self.fed` under the users who hold its row now, in every
    /// profile, and under `writer` (a device holds what it wrote until the feed tells it
    /// otherwise). Called after every write is routed, so "now" is just after the write.
    fn feed_log(&mut self, writer: Option<&Principal>) -> Result<(), StoreError> {
        let last = self.store.last_seq();
        if self.fed >= last {
            return Ok(());
        }
        let _span = info_span!("feed_log", from = self.fed, to = last).entered();
        let writer = writer.and_then(|w| Some((self.profile_of(&w.app)?.to_string(), w.user)));
        while self.fed < last {
            let entries = self.store.ops_since(self.fed, FEED_BATCH)?;
            let Some(end) = entries.last().map(|e| e.seq) else {
                break;
            };
            let mut writes = Vec::new();
            for e in &entries {
                for (profile, router) in &self.routers {
                    let holders = router.holders(&e.table, e.row);
                    let mut users = Vec::new();
                    for user in &holders {
                        self.changed.record_feed(*user, &e.table);
                    }
                    if holders.len() > self.shared_feed_holders {
                        let mut k = seq_key(&shared_feed_prefix(profile, &e.table), e.seq);
                        k.extend_from_slice(e.row.as_bytes());
                        writes.push(AuxWrite::Put(k, Vec::new()));
                    } else {
                        users.extend_from_slice(&holders);
                    }
                    if let Some((p, u)) = &writer {
                        if p == profile && !holders.contains(u) {
                            users.push(*u);
                            self.changed.record_feed(*u, &e.table);
                        }
                    }
                    for user in users {
                        let mut k = seq_key(&feed_prefix(profile, user, &e.table), e.seq);
                        k.extend_from_slice(e.row.as_bytes());
                        writes.push(AuxWrite::Put(k, Vec::new()));
                    }
                }
            }
            writes.push(AuxWrite::Put(K_FED.to_vec(), end.to_be_bytes().to_vec()));
            self.store.aux_apply(SPACE, &writes, Durability::Group)?;
            self.fed = end;
        }
        Ok(())
    }

    /// Up to about `limit` entries of one feed with `after < seq <= last`, in order, whole
    /// seqs only (a seq is never split between windows), and whether the feed ended.
    fn feed_window(
        &self,
        prefix: &[u8],
        after: u64,
        last: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, RowId)>, bool), StoreError> {
        let to = seq_key(prefix, last.saturating_add(1));
        let parse = |entries: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<(u64, RowId)> {
            entries
                .iter()
                .filter_map(|(k, _)| parse_feed_key(k.get(prefix.len()..)?))
                .collect()
        };
        let limit = limit.max(1);
        let mut window = parse(self.store.aux_range(
            SPACE,
            &seq_key(prefix, after.saturating_add(1)),
            &to,
            limit,
        )?);
        if window.len() < limit {
            return Ok((window, true));
        }
        // The window may end inside a seq: take that seq whole.
        let Some(&(tail, _)) = window.last() else {
            return Ok((window, true));
        };
        window.retain(|(s, _)| *s < tail);
        window.extend(parse(self.store.aux_range(
            SPACE,
            &seq_key(prefix, tail),
            &seq_key(prefix, tail.saturating_add(1)),
            usize::MAX,
        )?));
        Ok((window, tail >= last))
    }

    /// [`feed_window`](Self::feed_window) over several feeds merged, up to the first place
    /// one feed's window was cut.
    fn feeds_window(
        &self,
        prefixes: &[Vec<u8>],
        after: u64,
        last: u64,
        limit: usize,
    ) -> Result<FeedWindow, StoreError> {
        let mut all = Vec::new();
        let mut cut: Option<u64> = None;
        for prefix in prefixes {
            let (window, ended) = self.feed_window(prefix, after, last, limit)?;
            if !ended {
                let tail = window.last().map_or(after, |(s, _)| *s);
                cut = Some(cut.map_or(tail, |c| c.min(tail)));
            }
            all.extend(window);
        }
        if let Some(c) = cut {
            all.retain(|(s, _)| *s <= c);
        }
        all.sort_unstable();
        all.dedup();
        Ok(FeedWindow {
            entries: all,
            tail: cut.unwrap_or(last),
        })
    }

    /// One window of the feeds after `scanned`: the rows touched in seq order — log entries of
    /// `table` (marked logged; [`Self::fed_entry`] reads one when needed) and the user's
    /// membership changes of `table` (under `mp`) — and the last seq it covers (whole seqs
    /// only).
    fn touches(
        &self,
        feeds: &[Vec<u8>],
        mp: &[u8],
        table: &str,
        scanned: u64,
        last: u64,
        limit: usize,
    ) -> Result<(Vec<Touch>, u64), StorageError> {
        let FeedWindow {
            entries: fed,
            tail: scan_end,
        } = self
            .feeds_window(feeds, scanned, last, limit)
            .map_err(storage_err)?;
        // Membership changes of this user in this table in the window, by seq. At the end of
        // the log, those with no log entry of their own (recorded at `last + 1`) are due too.
        let membership_end = if scan_end >= last { last + 1 } else { scan_end };
        let from = seq_key(mp, scanned + 1);
        let to = seq_key(mp, membership_end.saturating_add(1));
        let mut moved: BTreeMap<u64, Vec<RowId>> = BTreeMap::new();
        for (k, _) in self
            .store
            .aux_range(SPACE, &from, &to, usize::MAX)
            .map_err(storage_err)?
        {
            let Some(rest) = k.get(mp.len()..) else {
                continue;
            };
            let Some(seq) = rest
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            if let Some((t, row)) = rest.get(8..).and_then(super::parse_row_key) {
                if t == table {
                    moved.entry(seq).or_default().push(row);
                }
            }
        }
        let mut touch: Vec<Touch> = Vec::new();
        let mut moved_iter = moved.into_iter().peekable();
        for (seq, row) in fed {
            while let Some((s, rows)) = moved_iter.next_if(|(s, _)| *s <= seq) {
                touch.extend(rows.into_iter().map(|r| (s, r, false)));
            }
            touch.push((seq, row, true));
        }
        for (s, rows) in moved_iter {
            touch.extend(rows.into_iter().map(|r| (s, r, false)));
        }
        Ok((touch, scan_end))
    }

    /// The log entry a feed names for `row` of `table` at `seq`. Read only when its change or
    /// actor is used, so a feed entry the log does not hold is reported when it matters to
    /// the batch, not for a row sent whole.
    fn fed_entry(&self, seq: u64, row: RowId, table: &str) -> Result<LogEntry, StorageError> {
        // The hub's log is never compacted: an entry the feed names is always there.
        match self.store.log_entry(seq).map_err(storage_err)? {
            Some(e) if e.row == row && e.table == table => Ok(e),
            _ => Err(StorageError::Corrupt(format!(
                "the feed of `{table}` names log entry {seq} for row {row}, which the log does \
                 not hold"
            ))),
        }
    }

    /// What the device gets for `row`, first touched in a pull from `after` — by a membership
    /// change (`membership`), possibly one with no log entry of its own (`unlogged`: recorded
    /// at `last + 1`) — and the row's holding history.
    fn first_fate(
        &self,
        who: &Principal,
        table: &str,
        row: RowId,
        after: u64,
        membership: bool,
        unlogged: bool,
    ) -> Result<(Fate, Vec<(u64, bool)>), StorageError> {
        let hk = history_key(who.device, table, row);
        let hist = self.load_history(&hk)?;
        let mut before = held_at(&hist, after);
        // A rollback changed what the device holds after the feed last told it.
        let ok = override_key(who.device, table, row);
        if let Some(v) = self.store.aux_get(SPACE, &ok).map_err(storage_err)? {
            let o: Override = dec(&v, "a holding override")?;
            let last_told = hist.iter().rev().find(|(c, _)| *c <= after);
            if last_told.is_none_or(|(c, _)| *c < o.seq) {
                before = o.held;
            }
        }
        let now = self.in_set(who, table, row);
        if unlogged || hist.iter().any(|(c, _)| *c > after) {
            // Whether the device applied a batch sent after `after` is
            // unknown: a membership change with no log entry of its own
            // (recorded at `last + 1`, the cursor cannot pass `last`), or a
            // batch lost or unacknowledged. Send the truth; importing a held
            // row and evicting an absent one change nothing.
            before = !now;
        }
        let f = match (before, now) {
            // Held at the cursor and now, but its membership changed in
            // between: it left and came back, and the feed holds none of the
            // ops written while it was away. Send it whole.
            (true, true) if membership => Fate::Entered,
            (true, true) => Fate::Ops,
            (false, true) => Fate::Entered,
            (true, false) if self.forgets_eviction(table, row) => Fate::Skip,
            (true, false) => Fate::Left,
            (false, false) => Fate::Skip,
        };
        Ok((f, hist))
    }

    /// Whether `table` is in the offline profile of `who`'s app.
    fn table_in_profile(&self, who: &Principal, table: &str) -> bool {
        self.router_for(who)
            .is_some_and(|(_, r)| r.profile().items.contains_key(table))
    }

    /// A row as a device receives it whole: its change chunks, or its saved document when
    /// they would not fit in a batch (a long history). `None` (logged) if even that is too
    /// large: one row must not stop a device's sync of its table for good.
    fn whole_row(&self, table: &str, row: RowId) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(x) = self.store.export_row(table, row).map_err(storage_err)? else {
            return Ok(None);
        };
        if x.doc.len() <= MAX_CHANGE_LEN {
            return Ok(Some(x.doc));
        }
        let saved = self
            .store
            .export_row_saved(table, row)
            .map_err(storage_err)?
            .map(|x| x.doc);
        match saved {
            Some(doc) if doc.len() > MAX_CHANGE_LEN => {
                warn!(%table, %row, bytes = doc.len(), max = MAX_CHANGE_LEN, "a row too large to send to devices is skipped");
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// The hub's copy of a row a rejected op touched, for the device to roll back to — only
    /// a row of its set: a device is never sent any other (it drops its own copy instead).
    fn authoritative(&self, who: &Principal, table: &str, row: RowId) -> Option<Vec<u8>> {
        if !self.in_set(who, table, row) {
            return None;
        }
        self.whole_row(table, row).ok()?
    }

    fn outcome(
        &mut self,
        who: &Principal,
        op: &PushOp,
        d: Decision,
    ) -> Result<PushOutcome, StorageError> {
        Ok(match d {
            Decision::Accepted => PushOutcome::Accepted,
            Decision::Rejected {
                operation,
                kind,
                message,
            } => {
                let authoritative = self.authoritative(who, &op.table, op.row);
                // A device holds no row of a table outside its profile: nothing to roll back
                // to, nothing to record (junk pushes leave no record).
                if !self.table_in_profile(who, &op.table) {
                    return Ok(PushOutcome::Rejected {
                        operation,
                        kind,
                        message,
                        authoritative,
                    });
                }
                // The device rolls back: it holds the hub's row if one is sent, else nothing,
                // whatever the feed told it before. Pulls go on from there.
                let o = Override {
                    seq: self.store.last_seq(),
                    held: authoritative.is_some(),
                };
                self.store
                    .aux_put(
                        SPACE,
                        &override_key(who.device, &op.table, op.row),
                        &enc(&o),
                        Durability::Group,
                    )
                    .map_err(storage_err)?;
                PushOutcome::Rejected {
                    operation,
                    kind,
                    message,
                    authoritative,
                }
            }
        })
    }

    /// The authority: what the op does, whether the user may, then apply.
    fn judge(
        &mut self,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
        insp: &fieldsync_store::ChangeInspection,
    ) -> Result<Decision, StorageError> {
        // A handle (an `Arc`), not a copy of the schema: `self` is borrowed mutably below.
        let store = self.store.clone();
        let schema = store.schema();
        let Ok(tab) = schema.table(&op.table) else {
            return Ok(rejected(
                Operation::Write,
                RejectionKind::Permission,
                "no such table",
            ));
        };
        let lookups: Vec<(&str, &str)> = tab
            .columns
            .iter()
            .filter_map(|c| c.target.as_deref().map(|t| (c.name.as_str(), t)))
            .collect();
        let sets = |c: &str| insp.columns.contains_key(c);
        let operation = if !insp.row_exists {
            Operation::Create
        } else if sets(DELETED_KEY) {
            Operation::Delete
        } else if sets("ownerid") {
            Operation::Assign
        } else if lookups.iter().any(|(c, _)| sets(c)) {
            Operation::Append
        } else {
            Operation::Write
        };
        if !self.table_in_profile(who, &op.table) {
            return Ok(rejected(
                operation,
                RejectionKind::Permission,
                "the table is not in the device's profile",
            ));
        }
        if insp.row_deleted {
            return Ok(rejected(
                operation,
                RejectionKind::RowNotFound,
                "the row is deleted",
            ));
        }
        // The owning business unit follows the owner, as Dataverse sets it: a device that set
        // it could move a row into another unit's read and write scopes.
        if sets(OWNING_BUSINESS_UNIT) {
            return Ok(rejected(
                operation,
                RejectionKind::Permission,
                "owningbusinessunit is set by the server from the owner",
            ));
        }
        if let Some(reason) = self.foreign_actor(who, insp.actor)? {
            return Ok(rejected(operation, RejectionKind::Permission, reason));
        }
        let current = self.store.get(&op.table, op.row).map_err(storage_err)?;
        let before: BTreeMap<String, Value> = current.map(|r| r.values).unwrap_or_default();
        let mut after = before.clone();
        for (c, v) in &insp.columns {
            if v.is_null() {
                after.remove(c);
            } else {
                after.insert(c.clone(), v.clone());
            }
        }
        let user = who.user;
        if !insp.row_exists {
            if !privileged(&self.env, user, tab, Privilege::Create, &after) {
                return Ok(rejected(
                    operation,
                    RejectionKind::Permission,
                    "no create privilege for this owner",
                ));
            }
        } else {
            let mine = self.in_set(who, &op.table, op.row) || self.env.can_read(user, tab, &before);
            if !mine {
                return Ok(rejected(
                    operation,
                    RejectionKind::Permission,
                    "the row is not in the device's set",
                ));
            }
            let plain = insp.columns.keys().any(|c| {
                c != DELETED_KEY
                    && c != "ownerid"
                    && c != "modifiedon"
                    && !lookups.iter().any(|(l, _)| l == c)
            });
            let mut needed = Vec::new();
            if sets(DELETED_KEY) {
                needed.push((Privilege::Delete, "no delete privilege on the row"));
            }
            if sets("ownerid") {
                needed.push((Privilege::Assign, "no assign privilege on the row"));
            }
            let relinks = lookups.iter().any(|(c, _)| sets(c));
            if relinks {
                needed.push((Privilege::Append, "no append privilege on the row"));
            }
            // Setting a lookup is an update of the row too, as in Dataverse.
            if plain || relinks {
                needed.push((Privilege::Write, "no write privilege on the row"));
            }
            for (p, msg) in needed {
                if !privileged(&self.env, user, tab, p, &before) {
                    return Ok(rejected(operation, RejectionKind::Permission, msg));
                }
            }
        }
        // A lookup only to a row the user may append to.
        for (c, target) in &lookups {
            let Some(Value::Lookup(to)) = insp.columns.get(*c) else {
                continue;
            };
            let Ok(ttab) = schema.table(target) else {
                continue;
            };
            let Some(trow) = self.store.get(target, *to).map_err(storage_err)? else {
                return Ok(rejected(
                    operation,
                    RejectionKind::RowNotFound,
                    "the row the lookup points at does not exist",
                ));
            };
            if !privileged(&self.env, user, ttab, Privilege::AppendTo, &trow.values) {
                return Ok(rejected(
                    operation,
                    RejectionKind::Permission,
                    "no append-to privilege on the row the lookup points at",
                ));
            }
            // Creating a row that points at another needs Append on it as well.
            if !privileged(&self.env, user, tab, Privilege::Append, &after) {
                return Ok(rejected(
                    operation,
                    RejectionKind::Permission,
                    "no append privilege on the row",
                ));
            }
        }
        // A new file or image reference is checked as the store checks a local write
        // (`Store::reference_problem`: the column's maximum, the size of content held, an image
        // column's content; content still to come is checked when it is uploaded), and one to
        // content a device would have to upload is held to one upload's size, whatever the
        // column allows (larger files come from Dataverse only).
        for (c, v) in &insp.columns {
            let (Value::File(blob) | Value::Image(blob)) = v else {
                continue;
            };
            if before.get(c) == Some(v) {
                continue;
            }
            let problem = self
                .store
                .reference_problem(tab, c, v)
                .map_err(storage_err)?;
            let message = match problem {
                Some(ReferenceProblem::TooLarge(e)) => Some(e.to_string()),
                Some(ReferenceProblem::NotAnImage(p)) => Some(format!("image column `{c}`: {p}")),
                Some(other) => Some(format!("`{c}`: {other}")),
                None if blob.size > BLOB_UPLOAD_MAX
                    && !self.store.has_blob(blob).map_err(storage_err)? =>
                {
                    Some(format!(
                        "`{c}` names {} bytes the hub does not hold; a device uploads at most {BLOB_UPLOAD_MAX}",
                        blob.size
                    ))
                }
                None => None,
            };
            if let Some(message) = message {
                return Ok(rejected(operation, RejectionKind::Validation, &message));
            }
        }
        if !insp.ready {
            return Ok(rejected(
                operation,
                RejectionKind::Conflict,
                "the op depends on a change the hub does not hold (an earlier op was rejected)",
            ));
        }
        if policy == ConflictPolicy::ServerWins && !insp.concurrent.is_empty() {
            return Ok(rejected(
                operation,
                RejectionKind::Conflict,
                &format!(
                    "server wins: the hub changed {} concurrently",
                    insp.concurrent.join(", ")
                ),
            ));
        }
        let remote = RemoteOp {
            table: op.table.clone(),
            row: op.row,
            change: op.change.clone(),
        };
        self.mark_unrouted(&[(&op.table, op.row)])
            .map_err(storage_err)?;
        // Made durable by the decision record written after it (`apply_push`), before the
        // op is acknowledged: one flush per op, not two. A crash in between loses both, and
        // the device pushes the op again.
        match self.store.apply_remote(&[remote], Durability::Group) {
            Ok(o) if o.applied + o.duplicates >= 1 => {}
            Ok(o) => {
                warn!(?o, "a ready op was held");
            }
            Err(StoreError::InvalidChange { reason, .. }) => {
                self.routed(&[(&op.table, op.row)]).map_err(storage_err)?;
                return Ok(rejected(operation, RejectionKind::Validation, &reason));
            }
            Err(e) => return Err(storage_err(e)),
        }
        let mut k = P_ACTOR.to_vec();
        k.extend_from_slice(who.device.0.as_bytes());
        k.extend_from_slice(&insp.actor.0);
        let owner = actor_owner_key(&insp.actor.0);
        let mut writes = vec![
            AuxWrite::Put(k, Vec::new()),
            AuxWrite::Put(owner, who.device.0.as_bytes().to_vec()),
        ];
        for v in insp.columns.values() {
            if let Value::File(b) | Value::Image(b) = v {
                writes.push(AuxWrite::Put(
                    attached_key(who.device, &b.sha256),
                    enc(&(&op.table, b)),
                ));
            }
        }
        self.store
            .aux_apply(SPACE, &writes, Durability::Group)
            .map_err(storage_err)?;
        if policy == ConflictPolicy::ClientWins && !insp.concurrent.is_empty() {
            self.resolve_client_wins(op, insp)?;
        }
        if insp.columns.contains_key("ownerid") {
            self.follow_owner_business_unit(op)?;
        }
        self.route(&op.table, op.row).map_err(storage_err)?;
        self.feed_log(Some(who)).map_err(storage_err)?;
        self.routed(&[(&op.table, op.row)]).map_err(storage_err)?;
        Ok(Decision::Accepted)
    }

    /// Client wins: the hub writes the client's values again, as its own op, so every replica
    /// converges to them.
    fn resolve_client_wins(
        &mut self,
        op: &PushOp,
        insp: &fieldsync_store::ChangeInspection,
    ) -> Result<(), StorageError> {
        let values: Vec<(&str, Value)> = insp
            .concurrent
            .iter()
            .filter_map(|c| insp.columns.get(c).map(|v| (c.as_str(), v.clone())))
            .collect();
        if values.is_empty()
            || self
                .store
                .get(&op.table, op.row)
                .map_err(storage_err)?
                .is_none()
        {
            return Ok(());
        }
        let mut tx = self.store.begin();
        tx.update(&op.table, op.row, &values)
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        tx.commit_with(Durability::Immediate)
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        debug!(table = %op.table, row = %op.row, "client wins: resolution written");
        Ok(())
    }

    /// An owner change takes the row's explicit owning business unit (one Dataverse set) with
    /// it, as Dataverse does: the row would stay in the old unit's scopes otherwise (with no
    /// bridge to bring Dataverse's back, for good).
    fn follow_owner_business_unit(&mut self, op: &PushOp) -> Result<(), StorageError> {
        let Some(row) = self.store.get(&op.table, op.row).map_err(storage_err)? else {
            return Ok(());
        };
        let (Some(Value::Lookup(explicit)), Some(Value::Owner(owner))) = (
            row.values.get(OWNING_BUSINESS_UNIT),
            row.values.get("ownerid"),
        ) else {
            return Ok(());
        };
        let Some(unit) = self.env.owner_business_unit(*owner) else {
            return Ok(());
        };
        if *explicit == unit {
            return Ok(());
        }
        let mut tx = self.store.begin();
        tx.update(
            &op.table,
            op.row,
            &[(OWNING_BUSINESS_UNIT, Value::Lookup(unit))],
        )
        .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        // Made durable with the op's decision record, as the op itself.
        tx.commit_with(Durability::Group)
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        debug!(table = %op.table, row = %op.row, "owning business unit follows the new owner");
        Ok(())
    }

    /// Gives every actor a device pushed with before actors had owners (`act/` without `aa/`)
    /// to that device, so another cannot claim it first.
    fn claim_known_actors(&self) -> Result<(), StoreError> {
        // Once is enough: from then on every actor gets its owner when first pushed with.
        if stored_config::<bool>(&self.store, K_ACTORS_CLAIMED)? == Some(true) {
            return Ok(());
        }
        // An actor two devices pushed with (a cloned install, a forgery) is nobody's: each
        // is refused, and the operator hears of it.
        let mut claims: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for (k, _) in self.store.aux_scan(SPACE, P_ACTOR)? {
            let Some((device, actor)) = k
                .get(P_ACTOR.len()..)
                .filter(|rest| rest.len() == 32)
                .map(|rest| rest.split_at(16))
            else {
                continue;
            };
            let owner = actor_owner_key(actor);
            if let Some(claim) = claims.get_mut(&owner) {
                if claim.as_deref() != Some(device) {
                    *claim = None;
                }
            } else if self.store.aux_get(SPACE, &owner)?.is_none() {
                claims.insert(owner, Some(device.to_vec()));
            }
        }
        let writes: Vec<AuxWrite> = claims
            .into_iter()
            .map(|(k, v)| match v {
                Some(device) => AuxWrite::Put(k, device),
                None => {
                    warn!(actor = %hex::encode(k.get(P_ACTOR_OWNER.len()..).unwrap_or_default()), "two devices pushed with one actor; it is nobody's now");
                    AuxWrite::Put(k, Vec::new())
                }
            })
            .collect();
        self.store.aux_apply(SPACE, &writes, Durability::Group)?;
        store_config(&self.store, K_ACTORS_CLAIMED, &true)
    }

    /// Why a change by `actor` may not come from `who`'s device, if it may not: the actor is
    /// the hub's or the upstream bridge's, another device's, or one more than a device may
    /// have. A forged actor would pass for another writer (the bridge skips Dataverse's own
    /// changes; pulls send a device the rows it wrote).
    fn foreign_actor(
        &self,
        who: &Principal,
        actor: ActorId,
    ) -> Result<Option<&'static str>, StorageError> {
        if actor == self.store.actor() || actor == UPSTREAM_ACTOR {
            return Ok(Some("the change claims the hub's own actor"));
        }
        let owner = actor_owner_key(&actor.0);
        match self.store.aux_get(SPACE, &owner).map_err(storage_err)? {
            Some(device) if device.as_slice() == who.device.0.as_bytes() => Ok(None),
            Some(device) if device.is_empty() => Ok(Some(
                "this actor was used by more than one device; set the device up again",
            )),
            Some(_) => Ok(Some("the change claims another device's actor")),
            None if self.device_actors(who.device)?.len() >= ACTORS_PER_DEVICE => {
                Ok(Some("this device has pushed with too many actors"))
            }
            None => Ok(None),
        }
    }

    fn device_actors(&self, device: DeviceId) -> Result<Vec<[u8; 16]>, StorageError> {
        let mut p = P_ACTOR.to_vec();
        p.extend_from_slice(device.0.as_bytes());
        Ok(self
            .store
            .aux_scan(SPACE, &p)
            .map_err(storage_err)?
            .into_iter()
            .filter_map(|(k, _)| k.get(p.len()..).and_then(|a| <[u8; 16]>::try_from(a).ok()))
            .collect())
    }

    fn load_history(&self, key: &[u8]) -> Result<Vec<(u64, bool)>, StorageError> {
        match self.store.aux_get(SPACE, key).map_err(storage_err)? {
            Some(v) => dec(&v, "a row history"),
            None => Ok(Vec::new()),
        }
    }
}

impl HubStorage for HubReplica {
    fn authenticate(
        &mut self,
        device: DeviceId,
        token: &[u8],
        app: &str,
    ) -> Result<Result<Principal, Refusal>, StorageError> {
        let _span = info_span!("authenticate", %device, app).entered();
        let refuse = |code: CloseCode, message: String| Ok(Err(Refusal { code, message }));
        let t = match self
            .verifier
            .verify(token, &StoreTokenRegistry(self.store.clone()))
        {
            Ok(t) => t,
            Err(TokenError::Revoked(_)) => {
                return refuse(CloseCode::REVOKED, "the token was revoked".into())
            }
            Err(e @ TokenError::Unavailable(_)) => {
                return Err(StorageError::Unavailable(e.to_string()))
            }
            Err(e) => return refuse(CloseCode::UNAUTHORIZED, e.to_string()),
        };
        if t.device_id != device.0 {
            return refuse(
                CloseCode::UNAUTHORIZED,
                "the token was issued to another device".into(),
            );
        }
        if t.app != app {
            return refuse(
                CloseCode::UNAUTHORIZED,
                "the token was issued for another app".into(),
            );
        }
        let Some(user) = self.resolve_user(&t.user_id) else {
            return refuse(
                CloseCode::UNAUTHORIZED,
                "the token's user is unknown".into(),
            );
        };
        if self.profile_of(app).is_none() {
            return refuse(
                CloseCode::UNAUTHORIZED,
                "the app has no offline profile on this hub".into(),
            );
        }
        Ok(Ok(Principal {
            device,
            user,
            app: app.to_string(),
        }))
    }

    fn apply_push(
        &mut self,
        _now: Millis,
        who: &Principal,
        policy: ConflictPolicy,
        op: &PushOp,
    ) -> Result<PushOutcome, StorageError> {
        let _span =
            info_span!("apply_push", table = %op.table, row = %op.row, seq = op.seq).entered();
        self.check_not_revoked(who)?;
        let insp = match self.store.inspect_change(&op.table, op.row, &op.change) {
            Ok(i) => i,
            Err(StoreError::Schema(e)) => {
                return self.outcome(
                    who,
                    op,
                    rejected(Operation::Write, RejectionKind::Permission, &e.to_string()),
                )
            }
            Err(StoreError::InvalidChange { reason, .. }) => {
                return self.outcome(
                    who,
                    op,
                    rejected(Operation::Write, RejectionKind::Validation, &reason),
                )
            }
            Err(e) => return Err(storage_err(e)),
        };
        // Keyed by row too: two rows may receive byte-identical changes (same actor, same
        // values, same instant), and a change hash is only unique within one row document.
        let mut dk = row_key(P_DECISION, &op.table, op.row);
        dk.extend_from_slice(&insp.hash);
        if let Some(v) = self.store.aux_get(SPACE, &dk).map_err(storage_err)? {
            let d: Decision = dec(&v, "a decision")?;
            return self.outcome(who, op, d);
        }
        if insp.applied {
            return Ok(PushOutcome::Accepted);
        }
        let d = self.judge(who, policy, op, &insp)?;
        // Durable with everything `judge` wrote before it (the applied op included). An op on
        // a table outside the device's profile wrote nothing and gets the same answer again:
        // junk pushes leave no record (and cost no flush).
        if self.table_in_profile(who, &op.table) {
            self.store
                .aux_put(SPACE, &dk, &enc(&d), Durability::Immediate)
                .map_err(storage_err)?;
        }
        if let Decision::Rejected { kind, message, .. } = &d {
            debug!(?kind, %message, "op rejected");
        }
        self.outcome(who, op, d)
    }

    fn pull(
        &mut self,
        who: &Principal,
        table: &str,
        after: Cursor,
        limits: BatchLimits,
    ) -> Result<PullChunk, StorageError> {
        let _span =
            info_span!("pull", device = %who.device, table, after = cursor_seq(after)).entered();
        self.check_not_revoked(who)?;
        let mut chunk = PullChunk {
            cursor: after,
            ..PullChunk::default()
        };
        // A table the schema does not have holds nothing: answered before any feed is read
        // (a device may name hundreds per request).
        if self.store.schema().table(table).is_err() {
            return Ok(chunk);
        }
        let Some((profile, _)) = self.router_for(who) else {
            return Ok(chunk);
        };
        let profile = profile.to_string();
        let in_profile = self
            .profiles
            .get(&profile)
            .is_some_and(|p| p.items.contains_key(table));
        // A table that left the profile is still pulled: the device hears that the rows it
        // holds left its set (nothing else of the table is in the set any more).
        if in_profile {
            self.lag.insert((who.device, table.to_string()), after);
        }
        let last = self.store.last_seq();
        let after_seq = cursor_seq(after);
        // `after_seq == last` still looks at membership changes recorded at `last + 1`.
        if after_seq > last || self.log_cursor(after_seq)? != after {
            // A forged cursor, or a device fed from a log this store does not hold (past its
            // end, or with other entries where the device's cursor points): the hub's store is
            // older than its devices (restored from a backup), maybe written again since.
            // Reading on from the cursor would skip or mix up entries; the device starts the
            // table over instead (docs/operations.md).
            if self.cursors_unknown.insert((who.device, table.to_string())) {
                error!(
                    device = %who.device,
                    table,
                    cursor_seq = after_seq,
                    log_end = last,
                    "a device's cursor is not a position of the hub's log (past its end, or another entry is there): was the hub's store restored from a backup? the device starts the table over"
                );
            }
            chunk.restart = true;
            return Ok(chunk);
        }
        let max_items = limits.max_items.max(1);
        // The device's own actors, read when a row outside its set shows up (rarely).
        let mut actors: Option<Vec<[u8; 16]>> = None;
        let mp = membership_prefix(&profile, who.user);
        // Entries written around `route` (directly to the store) are indexed before reading.
        self.feed_log(None).map_err(storage_err)?;
        let feeds = [
            feed_prefix(&profile, who.user, table),
            shared_feed_prefix(&profile, table),
        ];
        let mut fates: BTreeMap<RowId, (Fate, Vec<(u64, bool)>)> = BTreeMap::new();
        let mut items = 0usize;
        let mut bytes = 0usize;
        let mut end = after_seq;
        let mut full = false;
        // Scan the user's feed of this table window after window until the batch is full or
        // the feed ends (a bounded number per pull), so rows that are skipped (their fate
        // unchanged) do not cost the device a round trip and a durable write per window.
        let mut scanned = after_seq;
        for _ in 0..MAX_SCAN_WINDOWS {
            let (touch, scan_end) = self.touches(
                &feeds,
                &mp,
                table,
                scanned,
                last,
                max_items.saturating_mul(SCAN_FACTOR),
            )?;
            let mut i = 0;
            while i < touch.len() {
                let seq = touch[i].0;
                // Process every item at this seq together, so the cursor never splits a seq.
                let mut j = i;
                let mut group_items = 0usize;
                let mut group = Vec::new();
                while j < touch.len() && touch[j].0 == seq {
                    group.push(j);
                    j += 1;
                }
                let mut planned: Vec<(RowId, Fate, Option<Vec<u8>>)> = Vec::new();
                let mut fresh: Vec<RowId> = Vec::new();
                let mut upgraded: Vec<RowId> = Vec::new();
                for &g in &group {
                    let (_, row, logged) = &touch[g];
                    let state = if let Some((f, _)) = fates.get(row) {
                        *f
                    } else {
                        Fate::Skip
                    };
                    let known = fates.contains_key(row);
                    let fate = if known {
                        state
                    } else {
                        let (f, hist) =
                            self.first_fate(who, table, *row, after_seq, !logged, seq > last)?;
                        fates.insert(*row, (f, hist));
                        fresh.push(*row);
                        if f == Fate::Entered || f == Fate::Left {
                            planned.push((*row, f, None));
                            group_items += 1;
                        }
                        f
                    };
                    if known && !logged && fate == Fate::Ops {
                        // A membership change after ops already planned (see above).
                        if let Some(x) = fates.get_mut(row) {
                            x.0 = Fate::Entered;
                        }
                        planned.push((*row, Fate::Entered, None));
                        upgraded.push(*row);
                        group_items += 1;
                    }
                    if *logged {
                        match fate {
                            Fate::Ops => {
                                let c = self.fed_entry(seq, *row, table)?.change;
                                bytes += c.len();
                                group_items += 1;
                                planned.push((*row, Fate::Ops, Some(c)));
                            }
                            Fate::Skip => {
                                let actor = self.fed_entry(seq, *row, table)?.actor.0;
                                if actors.is_none() {
                                    actors = Some(self.device_actors(who.device)?);
                                }
                                if actors.as_ref().is_some_and(|a| a.contains(&actor)) {
                                    // The device holds what it wrote, even outside its set.
                                    if let Some(x) = fates.get_mut(row) {
                                        x.0 = Fate::Left;
                                    }
                                    planned.push((*row, Fate::Left, None));
                                    group_items += 1;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                if items > 0 && (items + group_items > max_items || bytes > limits.max_bytes) {
                    full = true;
                    // Undo the decisions first made in this group.
                    for row in &fresh {
                        fates.remove(row);
                    }
                    for row in &upgraded {
                        if let Some(x) = fates.get_mut(row) {
                            x.0 = Fate::Ops;
                        }
                    }
                    for (row, f, _) in &planned {
                        if *f == Fate::Left {
                            if let Some(x) = fates.get_mut(row) {
                                x.0 = Fate::Skip;
                            }
                        }
                    }
                    break;
                }
                for (row, f, c) in planned {
                    match f {
                        // A change too large for a batch (one from Dataverse can be) goes as
                        // the whole row, in its saved form.
                        Fate::Ops => match c {
                            Some(change) if change.len() <= MAX_CHANGE_LEN => {
                                chunk.ops.push(RowChange { row, change });
                            }
                            Some(_) if !chunk.entering.iter().any(|r| r.row == row) => {
                                match self.whole_row(table, row)? {
                                    Some(doc) => {
                                        bytes += doc.len();
                                        chunk.entering.push(RowDoc { row, doc });
                                    }
                                    // It cannot be kept current on the device: it leaves.
                                    None => {
                                        chunk.leaving.push(row);
                                        if let Some(x) = fates.get_mut(&row) {
                                            x.0 = Fate::Left;
                                        }
                                    }
                                }
                            }
                            _ => {}
                        },
                        Fate::Entered => match self.whole_row(table, row)? {
                            Some(doc) => {
                                bytes += doc.len();
                                chunk.entering.push(RowDoc { row, doc });
                            }
                            // Not sent, so not held: a later change tries again.
                            None => {
                                if let Some(x) = fates.get_mut(&row) {
                                    x.0 = Fate::Skip;
                                }
                            }
                        },
                        Fate::Left => chunk.leaving.push(row),
                        Fate::Skip => {}
                    }
                }
                items += group_items;
                end = seq;
                i = j;
            }
            if full {
                break;
            }
            end = end.max(scan_end);
            if scan_end >= last || items >= max_items || bytes >= limits.max_bytes {
                break;
            }
            scanned = scan_end;
        }

        // Remember what the device holds at `end`.
        let mut writes = Vec::new();
        for (row, (fate, mut hist)) in fates {
            let held = match fate {
                Fate::Entered => true,
                Fate::Left => false,
                _ => continue,
            };
            // Transitions after `after` were computed for batches the device never applied
            // (it pulls from `after` again); of those before, only the last one matters.
            hist.retain(|(c, _)| *c <= after_seq);
            let keep_from = hist.len().saturating_sub(1);
            hist.drain(..keep_from);
            hist.push((end, held));
            writes.push(AuxWrite::Put(
                history_key(who.device, table, row),
                enc(&hist),
            ));
        }
        if !writes.is_empty() {
            self.store
                .aux_apply(SPACE, &writes, Durability::Immediate)
                .map_err(storage_err)?;
        }
        // Membership changes recorded at `last + 1` leave the cursor at `last`: the next
        // write takes that seq. Until it does, pulls from `last` send those rows again.
        let cursor_seq = end.min(last).max(after_seq);
        chunk.cursor = self.log_cursor(cursor_seq)?;
        chunk.more = cursor_seq < last;
        Ok(chunk)
    }

    fn row_copy_withheld(
        &mut self,
        who: &Principal,
        table: &str,
        row: RowId,
    ) -> Result<(), StorageError> {
        self.check_not_revoked(who)?;
        let o = Override {
            seq: self.store.last_seq(),
            held: false,
        };
        self.store
            .aux_put(
                SPACE,
                &override_key(who.device, table, row),
                &enc(&o),
                Durability::Group,
            )
            .map_err(storage_err)?;
        // A row of the set the device no longer holds: its next pull sends it whole.
        if let Some(profile) = self.profile_of(&who.app).map(str::to_string) {
            let again = UserDelta {
                user: who.user,
                enter: vec![RowRef {
                    table: table.into(),
                    id: row,
                }],
                leave: Vec::new(),
            };
            let next = self.store.last_seq() + 1;
            self.record_deltas(&profile, &[again], next)
                .map_err(storage_err)?;
        }
        Ok(())
    }

    fn blob_chunk(
        &mut self,
        who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<BlobSlice>, StorageError> {
        self.check_not_revoked(who)?;
        if self.blob_in_set(who, sha256, true)?.is_none() {
            return Ok(None);
        }
        Ok(self
            .store
            .read_blob_range(sha256, offset, max_len)
            .map_err(storage_err)?
            .map(|(total, data)| BlobSlice { total, data }))
    }

    fn put_blob_chunk(
        &mut self,
        now: Millis,
        who: &Principal,
        sha256: &[u8; 32],
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<UploadOutcome, StorageError> {
        let _span = info_span!("put_blob_chunk", offset, total, n = data.len()).entered();
        self.check_not_revoked(who)?;
        let Some((table, blob)) = self.uploadable(who, sha256)? else {
            return Ok(UploadOutcome::Refused(
                "this device attached no such content, and no row of its set refers to it".into(),
            ));
        };
        if self.store.has_blob(&blob).map_err(storage_err)? {
            self.store
                .aux_apply(
                    SPACE,
                    &[AuxWrite::Remove(attached_key(who.device, sha256))],
                    Durability::Group,
                )
                .map_err(storage_err)?;
            return Ok(UploadOutcome::Complete);
        }
        if total != blob.size {
            return Ok(UploadOutcome::Refused(format!(
                "the row gives {} bytes for this content, not {total}",
                blob.size
            )));
        }
        let key = upload_key(P_UPLOAD, who.device, sha256);
        let pending = self.pending_upload(&key)?;
        let progress = pending.map_or(0, |p| p.progress);
        let end = offset.saturating_add(data.len() as u64);
        if offset != progress || end > total {
            // Not the next piece (a resumed or repeated upload): say where to go on from.
            return Ok(UploadOutcome::Continue(progress));
        }
        let mut writes = Vec::new();
        if pending.is_none() {
            // A new upload: a good moment to forget abandoned ones (a hub may run for months).
            self.drop_stale_uploads(now.0)?;
            writes.extend(self.make_room_for_upload(who.device)?);
        }
        if !data.is_empty() {
            let mut piece = upload_key(P_UPLOAD_CHUNK, who.device, sha256);
            piece.extend_from_slice(&offset.to_be_bytes());
            writes.push(AuxWrite::Put(piece, data.to_vec()));
        }
        let record = PendingUpload {
            progress: end,
            touched_ms: now.0,
        };
        writes.push(AuxWrite::Put(key.clone(), enc(&record)));
        // Not flushed: an acknowledged piece lost in a crash is only sent again (the hub
        // answers the next piece with where its copy ends).
        self.store
            .aux_apply(SPACE, &writes, Durability::Group)
            .map_err(storage_err)?;
        if end < total {
            return Ok(UploadOutcome::Continue(end));
        }
        // The pieces are read twice, one at a time, never the whole file at once: to check
        // the hash before anything is stored as a blob (forged bytes leave nothing behind),
        // then into the blob store.
        let prefix = upload_key(P_UPLOAD_CHUNK, who.device, sha256);
        let mut cleanup = vec![
            AuxWrite::Remove(key),
            AuxWrite::Remove(attached_key(who.device, sha256)),
        ];
        let mut hash = Sha256::new();
        let mut head = Vec::with_capacity(ImageFormat::SNIFF_BYTES);
        let mut pieces = UploadPieces::new(&self.store, prefix.clone(), total);
        while let Some(piece) = pieces.next_piece()? {
            let wanted = ImageFormat::SNIFF_BYTES.saturating_sub(head.len());
            head.extend_from_slice(&piece[..wanted.min(piece.len())]);
            hash.update(&piece);
        }
        cleanup.extend(pieces.keys.into_iter().map(AuxWrite::Remove));
        let matches = <[u8; 32]>::from(hash.finalize()) == *sha256;
        // Dataverse takes only images in an image column: a device (any client of the
        // protocol, not only the CLI) must not get other bytes into one.
        let not_an_image = if matches && self.referenced_as_image(who, &table, sha256)? {
            ImageFormat::check(total, &head).err()
        } else {
            None
        };
        if matches && not_an_image.is_none() {
            let mut pieces = UploadPieces::new(&self.store, prefix, total);
            self.store
                .put_blob(&blob.name, &mut pieces)
                .map_err(storage_err)?;
        }
        // Flushes the blob with the pieces' removal: `Complete` is a promise.
        self.store
            .aux_apply(SPACE, &cleanup, Durability::Immediate)
            .map_err(storage_err)?;
        if !matches {
            return Ok(UploadOutcome::Refused(
                "the uploaded bytes do not match the content's hash".into(),
            ));
        }
        if let Some(problem) = not_an_image {
            info!(%table, %problem, "upload for an image column refused");
            return Ok(UploadOutcome::Refused(format!(
                "an image column refers to this content: {problem}"
            )));
        }
        info!(%table, bytes = total, "attachment uploaded");
        // The bridge sends files on to Dataverse: wake it.
        self.changed.record_table(&table);
        Ok(UploadOutcome::Complete)
    }
}

impl HubReplica {
    /// Bytes of `device`'s unfinished upload of blob `sha256` the hub holds (0: none).
    pub fn upload_progress(
        &self,
        device: DeviceId,
        sha256: &[u8; 32],
    ) -> Result<u64, StorageError> {
        Ok(self
            .pending_upload(&upload_key(P_UPLOAD, device, sha256))?
            .map_or(0, |p| p.progress))
    }

    fn pending_upload(&self, key: &[u8]) -> Result<Option<PendingUpload>, StorageError> {
        self.store
            .aux_get(SPACE, key)
            .map_err(storage_err)?
            .map(|v| dec(&v, "an upload's progress"))
            .transpose()
    }

    /// The writes that drop `device`'s oldest unfinished upload if it has
    /// [`PENDING_UPLOADS_PER_DEVICE`] already (a device uploads one at a time: more are
    /// abandoned, or hostile).
    fn make_room_for_upload(&self, device: DeviceId) -> Result<Vec<AuxWrite>, StorageError> {
        let mut prefix = P_UPLOAD.to_vec();
        prefix.extend_from_slice(device.0.as_bytes());
        let pending = self.store.aux_scan(SPACE, &prefix).map_err(storage_err)?;
        if pending.len() < PENDING_UPLOADS_PER_DEVICE {
            return Ok(Vec::new());
        }
        let mut oldest: Option<(u64, Vec<u8>)> = None;
        for (k, v) in pending {
            let p: PendingUpload = dec(&v, "an upload's progress")?;
            if oldest.as_ref().is_none_or(|(t, _)| p.touched_ms < *t) {
                oldest = Some((p.touched_ms, k));
            }
        }
        match oldest {
            Some((_, key)) => self.drop_upload_writes(&key),
            None => Ok(Vec::new()),
        }
    }

    /// The writes that remove an unfinished upload (its `up/` key) and its pieces.
    fn drop_upload_writes(&self, key: &[u8]) -> Result<Vec<AuxWrite>, StorageError> {
        let mut pieces = P_UPLOAD_CHUNK.to_vec();
        pieces.extend_from_slice(key.get(P_UPLOAD.len()..).unwrap_or_default());
        let mut writes = vec![AuxWrite::Remove(key.to_vec())];
        for (k, _) in self.store.aux_scan(SPACE, &pieces).map_err(storage_err)? {
            writes.push(AuxWrite::Remove(k));
        }
        Ok(writes)
    }

    /// Drops unfinished uploads untouched for [`UPLOAD_MAX_AGE_MS`] (at open, and when an
    /// upload starts).
    fn drop_stale_uploads(&self, now_ms: u64) -> Result<(), StorageError> {
        let mut writes = Vec::new();
        for (k, v) in self.store.aux_scan(SPACE, P_UPLOAD).map_err(storage_err)? {
            // A record that does not decode is an upload nobody can finish: dropped too,
            // rather than stopping the hub from opening.
            let stale = dec::<PendingUpload>(&v, "an upload's progress").map_or(true, |p| {
                now_ms.saturating_sub(p.touched_ms) > UPLOAD_MAX_AGE_MS
            });
            if stale {
                writes.extend(self.drop_upload_writes(&k)?);
            }
        }
        if !writes.is_empty() {
            info!(keys = writes.len(), "dropped stale unfinished uploads");
            self.store
                .aux_apply(SPACE, &writes, Durability::Immediate)
                .map_err(storage_err)?;
        }
        Ok(())
    }

    /// What `who`'s device may upload for `sha256`: content it attached in an accepted op,
    /// or content a row of its set refers to. The table (for the bridge's wake-up) and the
    /// reference, whose size the upload must have.
    fn uploadable(
        &self,
        who: &Principal,
        sha256: &[u8; 32],
    ) -> Result<Option<(String, BlobRef)>, StorageError> {
        // The device's own op first: another row naming the same hash (with a wrong size,
        // say) must not stand in the way of the device that attached it.
        if let Some(v) = self
            .store
            .aux_get(SPACE, &attached_key(who.device, sha256))
            .map_err(storage_err)?
        {
            return Ok(Some(dec(&v, "an attachment record")?));
        }
        self.blob_in_set(who, sha256, false)
    }

    /// A row of `who`'s set that refers to the blob `sha256` (in a column the profile
    /// downloads, if `downloaded_only`): its table and the reference.
    fn blob_in_set(
        &self,
        who: &Principal,
        sha256: &[u8; 32],
        downloaded_only: bool,
    ) -> Result<Option<(String, BlobRef)>, StorageError> {
        let Some((_, router)) = self.router_for(who) else {
            return Ok(None);
        };
        let profile = router.profile();
        let schema = self.store.schema();
        for (table, row) in self.blob_referrers(sha256)? {
            if !self.in_set(who, &table, row) {
                continue;
            }
            let (Some(item), Ok(tab)) = (profile.items.get(&table), schema.table(&table)) else {
                continue;
            };
            let found = self
                .store
                .blob_refs(&table, row)
                .map_err(storage_err)?
                .into_iter()
                .find_map(|(col, b)| {
                    (b.sha256 == *sha256 && (!downloaded_only || item.downloads_column(tab, &col)))
                        .then_some(b)
                });
            if let Some(b) = found {
                return Ok(Some((table, b)));
            }
        }
        Ok(None)
    }

    /// The rows that refer to the blob `sha256`, as (table, row).
    fn blob_referrers(&self, sha256: &[u8; 32]) -> Result<Vec<(String, RowId)>, StorageError> {
        let p = sha_key(P_BLOB, sha256);
        let referrers = self.store.aux_scan(SPACE, &p).map_err(storage_err)?;
        Ok(referrers
            .into_iter()
            .filter_map(|(k, _)| k.get(p.len()..).and_then(super::parse_row_key))
            .collect())
    }

    /// Whether a row the upload is for holds the blob `sha256` in an image column: a row of
    /// `who`'s set, or of `attached_to`, the table of the op that attached it (the row may have
    /// left the set since). Rows elsewhere do not decide what this device may upload.
    fn referenced_as_image(
        &self,
        who: &Principal,
        attached_to: &str,
        sha256: &[u8; 32],
    ) -> Result<bool, StorageError> {
        for (table, row) in self.blob_referrers(sha256)? {
            if table != attached_to && !self.in_set(who, &table, row) {
                continue;
            }
            if let Some(r) = self.store.get(&table, row).map_err(storage_err)? {
                if r.values
                    .iter()
                    .any(|(_, v)| matches!(v, Value::Image(b) if b.sha256 == *sha256))
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}
