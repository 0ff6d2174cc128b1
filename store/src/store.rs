//! The store: opening, the shared helpers every operation uses, and reads.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use sled::IVec;
use tracing::{debug, error, info_span, warn};

use crate::api::{ColumnConflict, Row};
use crate::codec::{index_value, keys};
use crate::engine::Engine;
use crate::error::{corrupt, OpenError, StoreError};
use crate::log::StoredEntry;
use crate::options::{ActorId, Durability, StoreOptions};
use crate::row::{CrdtState, MatRow};
use crate::schema::{Schema, SchemaError, Table};
use crate::value::{BlobRef, RowId, Value};
use crate::wal::{Wal, WriteBatch};

/// The on-disk format version, in the `0format` meta key.
///
/// 2: `ownerid` and `statecode` are indexed only together, in the composite index.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format `open` upgrades in place (format 1 had separate `ownerid` and
/// `statecode` indexes: only the indexes differ, and they are rebuilt from the rows).
const OLDEST_UPGRADABLE_FORMAT: u32 = 1;

/// Column number of the composite (ownerid, statecode) index.
pub(crate) const COMPOSITE_OWNER_STATE: u16 = u16::MAX - 1;

/// The columns of the composite index. Neither has an index of its own: the composite orders
/// by owner first, so it serves owner-only queries too, and `statecode` alone (two values)
/// is better served by a scan.
pub(crate) const OWNER_COLUMN: &str = "ownerid";
pub(crate) const STATE_COLUMN: &str = "statecode";

/// The start of the composite index keys of one owner (and one statecode, if given).
/// A row without a statecode has the owner part only, directly followed by its id.
pub(crate) fn owner_state_prefix(t: u16, owner: &[u8], state: Option<&[u8]>) -> Vec<u8> {
    let mut p = keys::index_prefix(t, COMPOSITE_OWNER_STATE);
    p.extend_from_slice(owner);
    p.extend_from_slice(state.unwrap_or_default());
    p
}

/// The directory inside the data directory that holds the sled database.
const DB_DIR: &str = "db";

/// An embedded fieldsync store: rows as automerge documents over a sled event log.
///
/// `Store` is cheap to clone (an `Arc` inside) and can be shared between threads. Writes are
/// serialized by a writer lock; reads never take it.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("actor", &self.inner.actor)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub db: Engine,
    pub dir: Option<PathBuf>,
    /// sled's files, to make them durable at a checkpoint (`None` for a temporary store).
    pub sled_files: Option<SledFiles>,
    pub schema: Schema,
    pub tables: Vec<String>,
    pub table_ids: HashMap<String, u16>,
    pub actor: ActorId,
    pub options: StoreOptions,
    pub writer: Mutex<Writer>,
    pub id_epoch: u64,
    pub id_counter: AtomicU64,
    /// The last log seq, published after each write so readers need not lock.
    pub last_seq: AtomicU64,
    /// The write-ahead file every batch goes through (`None` for a temporary store).
    pub wal: Option<Mutex<Wal>>,
    /// A second handle on the write-ahead file, to `fdatasync` it.
    pub wal_sync: Option<std::fs::File>,
    /// A batch was appended to the write-ahead file and then not fully applied (its sync or
    /// its apply failed): sled and the file disagree until the store is reopened (which
    /// replays the file), so every later write is refused.
    pub write_failed: std::sync::atomic::AtomicBool,
}

/// State only the writer touches.
#[derive(Debug)]
pub(crate) struct Writer {
    /// The sequence number of the next log entry.
    pub next_seq: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A clean shutdown: everything flushed, marker set. A crash leaves the marker at 0
        // and the next open checks the tail of the log. Dropping a temporary store is how the
        // simulator crashes one (`reopen_temporary`), and another handle may already be open
        // on its data: it stays unmarked.
        if matches!(self.db, Engine::Memory(_)) {
            return;
        }
        let _ = self.db.flush();
        let _ = self.db.insert(keys::meta("clean"), &[1u8][..]);
        let _ = self.db.flush();
    }
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail.
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap_or_default()
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| corrupt(format!("{what} does not decode: {e}")))
}

fn u64_meta(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(format!("meta key {what} is not 8 bytes")))
}

/// sled's files, opened by the store to make them durable before a checkpoint: sled 0.34
/// never makes its data file durable against power loss, nor the files it writes each log
/// item over ~128 KiB to (`blobs/<lsn>`, which blob chunks of 256 KiB always are), nor the
/// directory that lists them.
pub(crate) struct SledFiles {
    /// The data file, opened separately to `fdatasync` it.
    db_file: std::fs::File,
    /// sled's directory (holding `blobs/`).
    dir: PathBuf,
    /// Blob files synced at an earlier checkpoint, with their length then: sled writes each
    /// once (`create_new`) and later only deletes it, so each is synced once — again only if
    /// it was still being written when synced (its length moved since).
    synced_blobs: Mutex<HashMap<std::ffi::OsString, u64>>,
}

impl SledFiles {
    fn open(sled_dir: &Path) -> std::io::Result<SledFiles> {
        Ok(SledFiles {
            db_file: std::fs::File::open(sled_dir.join("db"))?,
            dir: sled_dir.to_path_buf(),
            synced_blobs: Mutex::new(HashMap::new()),
        })
    }

    /// `fdatasync` the data file, then every blob file not synced yet and (if there were
    /// any) the directories listing them. Call after sled's own flush.
    fn sync(&self) -> Result<(), StoreError> {
        self.db_file.sync_data()?;
        let blobs = self.dir.join("blobs");
        let listing = match std::fs::read_dir(&blobs) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .map_err(|_| corrupt("a checkpoint panicked while syncing blob files"))?;
        let mut present = HashMap::new();
        let mut new_files = 0usize;
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name();
            // Removed by sled's garbage collection meanwhile: nothing to keep.
            let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            if synced.get(&name) != Some(&len) {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e.into()),
                }
                new_files += 1;
            }
            present.insert(name, len);
        }
        if new_files > 0 {
            std::fs::File::open(&blobs)?.sync_all()?;
            std::fs::File::open(&self.dir)?.sync_all()?;
            debug!(new_files, "synced sled's blob files");
        }
        // Forget the files sled deleted.
        *synced = present;
        Ok(())
    }

    #[cfg(test)]
    fn synced_blob_count(&self) -> usize {
        self.synced_blobs.lock().map_or(0, |s| s.len())
    }
}

/// The meta key of the write-ahead position marker: the end of the last record sled holds.
const WAL_POSITION: &str = "walpos";

/// Open the write-ahead file of the store in `dir`, replay what sled may not hold yet, and
/// checkpoint, so the file starts empty in a new generation.
fn recover_wal(
    dir: &Path,
    db: &Engine,
    sled_files: Option<&SledFiles>,
    options: &StoreOptions,
) -> Result<Wal, OpenError> {
    let generation = match db.get(keys::meta("walgen")).map_err(StoreError::from)? {
        Some(g) => u64_meta(&g, "walgen")?,
        None => 0,
    };
    let mut wal = Wal::open(
        dir,
        generation,
        options.wal_capacity_bytes,
        options.wal_preallocate,
    )
    .map_err(|e| OpenError::Corrupt {
        path: dir.to_path_buf(),
        reason: format!(
            "the write-ahead file {}: {e}",
            dir.join(crate::wal::WAL_FILE).display()
        ),
    })?;
    // Where sled's copy ends: the records up to there are already in it.
    let held = db
        .get(keys::meta(WAL_POSITION))
        .map_err(StoreError::from)?
        .and_then(|v| crate::wal::RecordEnd::decode(&v));
    let batches = wal.replay(held)?;
    if !batches.is_empty() {
        debug!(
            batches = batches.len(),
            generation, "replaying the write-ahead file"
        );
    }
    for b in batches {
        db.apply_batch(&b).map_err(StoreError::from)?;
    }
    checkpoint(db, sled_files, options, &mut wal)?;
    Ok(wal)
}

/// Make sled hold everything the write-ahead file holds, durably, then start the file over in
/// the next generation (recorded durably in sled before any record of it is written).
fn checkpoint(
    db: &Engine,
    sled_files: Option<&SledFiles>,
    options: &StoreOptions,
    wal: &mut Wal,
) -> Result<(), StoreError> {
    let _span = tracing::debug_span!("checkpoint", generation = wal.generation).entered();
    let sync_db = || -> Result<(), StoreError> {
        db.flush()?;
        if let (true, Some(files)) = (options.fsync, sled_files) {
            files.sync()?;
        }
        Ok(())
    };
    sync_db()?;
    let next = wal.generation + 1;
    db.insert(keys::meta("walgen"), &next.to_be_bytes()[..])?;
    sync_db()?;
    wal.restart(next);
    Ok(())
}

enum SledOpenError {
    /// Another handle holds the database's file lock.
    Locked,
    /// Anything else: the files are damaged.
    Damaged(String),
}

/// How long `open` waits for the file lock of a handle being dropped in this process (sled
/// releases it when its background flusher lets go of the database).
const LOCK_WAIT_MS: u64 = 2_000;

fn open_sled(path: &Path, options: &StoreOptions) -> Result<sled::Db, SledOpenError> {
    let config = sled::Config::new()
        .cache_capacity(options.cache_capacity_bytes)
        .flush_every_ms(Some(options.group_flush_ms.max(1)))
        .mode(sled::Mode::HighThroughput)
        .path(path);
    let started = std::time::Instant::now();
    loop {
        let attempt = config.clone();
        // sled 0.34 may panic on some damaged files; a damaged directory must be an error.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || attempt.open())) {
            Ok(Ok(db)) => return Ok(db),
            // sled reports a held file lock as an I/O error whose text says so.
            Ok(Err(sled::Error::Io(e)))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                if started.elapsed().as_millis() as u64 >= LOCK_WAIT_MS {
                    return Err(SledOpenError::Locked);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(Err(e)) => return Err(SledOpenError::Damaged(e.to_string())),
            Err(_) => {
                return Err(SledOpenError::Damaged(
                    "the database files could not be read (sled panicked)".into(),
                ))
            }
        }
    }
}

fn sled_open_error(dir: &Path, e: SledOpenError) -> OpenError {
    match e {
        SledOpenError::Locked => OpenError::Locked(dir.to_path_buf()),
        SledOpenError::Damaged(reason) => OpenError::Corrupt {
            path: dir.to_path_buf(),
            reason,
        },
    }
}

/// The most threads work is spread over (the devices have 2–4 cores).
const MAX_WORKERS: usize = 4;

/// How many threads to spread work over: one per core, at most [`MAX_WORKERS`].
pub(crate) fn worker_threads() -> usize {
    // Asked once: `available_parallelism` reads the cgroup files on every call (tens of µs,
    // more than a small `apply_remote` costs).
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_WORKERS)
    })
}

/// `work` applied to consecutive parts of `items`, one part per worker thread, the results in
/// the parts' order; one call on the calling thread when there are fewer than `parallel_min`
/// items or one core.
pub(crate) fn on_every_core<T: Sync, R: Send>(
    items: &[T],
    parallel_min: usize,
    work: impl Fn(&[T]) -> R + Sync,
) -> Result<Vec<R>, StoreError> {
    if items.len() < parallel_min {
        return Ok(vec![work(items)]);
    }
    let threads = worker_threads();
    if threads == 1 {
        return Ok(vec![work(items)]);
    }
    let per = items.len().div_ceil(threads);
    let work = &work;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(move || work(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| corrupt("a worker thread panicked")))
            .collect()
    })
}

impl Store {
    /// Create a new store in `dir` (created if missing) with `schema`.
    ///
    /// Fails with [`OpenError::AlreadyExists`] if `dir` already holds a store.
    pub fn create(dir: &Path, schema: Schema, options: StoreOptions) -> Result<Store, OpenError> {
        let _span = info_span!("store_create", dir = %dir.display()).entered();
        let db_path = dir.join(DB_DIR);
        if db_path.exists() {
            return Err(OpenError::AlreadyExists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir)?;
        let db = open_sled(&db_path, &options).map_err(|e| sled_open_error(dir, e))?;
        let engine = Engine::sled(db);
        Self::initialize(&engine, &schema, &options).map_err(OpenError::Store)?;
        drop(engine);
        Self::open(dir, options)
    }

    /// A store in memory only (tests, the simulator's replicas): an ordered map instead of
    /// sled, no files, no background threads; gone when dropped.
    pub fn temporary(schema: Schema, options: StoreOptions) -> Result<Store, OpenError> {
        let engine = Engine::memory();
        Self::initialize(&engine, &schema, &options).map_err(OpenError::Store)?;
        Self::from_db(engine, None, options)
    }

    /// A new handle on a temporary store's data, opened as [`Store::open`] opens a directory
    /// after a process crash: every commit that returned is there, and the handle's own state
    /// (writer position, row-id epoch) is rebuilt from the data. The simulator restarts a
    /// crashed device with it, without files. Drop the old handle first, or at least never
    /// write through it again. A store on disk answers [`OpenError::NotFound`]: drop it and
    /// [`Store::open`] its directory.
    pub fn reopen_temporary(&self) -> Result<Store, OpenError> {
        match &self.inner.db {
            Engine::Memory(map) => Self::from_db(
                Engine::Memory(map.clone()),
                None,
                self.inner.options.clone(),
            ),
            Engine::Sled(..) => Err(OpenError::NotFound(
                self.inner.dir.clone().unwrap_or_default(),
            )),
        }
    }

    fn initialize(db: &Engine, schema: &Schema, options: &StoreOptions) -> Result<(), StoreError> {
        let actor = options.actor.unwrap_or_else(ActorId::random);
        let schema_json = serde_json::to_vec(schema)
            .map_err(|e| corrupt(format!("schema does not serialize: {e}")))?;
        let mut b = WriteBatch::default();
        b.insert(keys::meta("format"), &FORMAT_VERSION.to_be_bytes()[..]);
        b.insert(keys::meta("actor"), &actor.0[..]);
        b.insert(keys::meta("schema"), schema_json);
        b.insert(keys::meta("seq"), &0u64.to_be_bytes()[..]);
        b.insert(keys::meta("acked"), &0u64.to_be_bytes()[..]);
        b.insert(keys::meta("idgen"), &0u64.to_be_bytes()[..]);
        b.insert(keys::meta("clean"), &[1u8][..]);
        db.apply_batch(&b)?;
        db.flush()?;
        Ok(())
    }

    /// Open the store in `dir` (its schema is stored inside).
    ///
    /// Checks the tail of the log against the materialized rows (all of it after an unclean
    /// shutdown is not needed: see `docs/storage.md`) and rebuilds them if they disagree.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, OpenError> {
        let _span = info_span!("store_open", dir = %dir.display()).entered();
        let db_path = dir.join(DB_DIR);
        if !db_path.is_dir() {
            return Err(OpenError::NotFound(dir.to_path_buf()));
        }
        let bad = |reason: String| OpenError::Corrupt {
            path: dir.to_path_buf(),
            reason,
        };
        for f in ["conf", "db"] {
            let p = db_path.join(f);
            if !p.is_file() {
                return Err(bad(format!("{} is missing", p.display())));
            }
        }
        let db = open_sled(&db_path, &options).map_err(|e| sled_open_error(dir, e))?;
        let store = Self::from_db(Engine::sled(db), Some(dir.to_path_buf()), options)?;
        Ok(store)
    }

    fn from_db(
        db: Engine,
        dir: Option<PathBuf>,
        options: StoreOptions,
    ) -> Result<Store, OpenError> {
        let path = dir.clone().unwrap_or_default();
        let bad = |reason: String| OpenError::Corrupt {
            path: path.clone(),
            reason,
        };
        let sled_err = |e: sled::Error| bad(e.to_string());
        let format = db
            .get(keys::meta("format"))
            .map_err(sled_err)?
            .ok_or_else(|| bad("not a fieldsync store (no format version)".into()))?;
        let format = <[u8; 4]>::try_from(format.as_ref())
            .map(u32::from_be_bytes)
            .map_err(|_| bad("the format version is not 4 bytes".into()))?;
        if !(OLDEST_UPGRADABLE_FORMAT..=FORMAT_VERSION).contains(&format) {
            return Err(OpenError::VersionMismatch {
                found: format,
                expected: FORMAT_VERSION,
            });
        }
        let actor = db
            .get(keys::meta("actor"))
            .map_err(sled_err)?
            .and_then(|a| <[u8; 16]>::try_from(a.as_ref()).ok())
            .map(ActorId)
            .ok_or_else(|| bad("the actor id is missing or damaged".into()))?;
        if let Some(requested) = options.actor {
            if requested != actor {
                return Err(OpenError::ActorMismatch {
                    stored: actor,
                    requested,
                });
            }
        }
        let schema_json = db
            .get(keys::meta("schema"))
            .map_err(sled_err)?
            .ok_or_else(|| bad("the schema is missing".into()))?;
        let schema: Schema = serde_json::from_slice(&schema_json)
            .map_err(|e| bad(format!("the stored schema does not decode: {e}")))?;
        let idgen = db
            .get(keys::meta("idgen"))
            .map_err(sled_err)?
            .ok_or_else(|| bad("meta key idgen is missing".into()))?;
        let id_epoch = u64_meta(&idgen, "idgen").map_err(|e| bad(e.to_string()))?;
        // Each open takes a fresh id epoch, so generated row ids never repeat.
        db.insert(keys::meta("idgen"), &(id_epoch + 1).to_be_bytes()[..])
            .map_err(sled_err)?;
        let clean = db
            .get(keys::meta("clean"))
            .map_err(sled_err)?
            .is_some_and(|c| c.as_ref() == [1]);
        db.insert(keys::meta("clean"), &[0u8][..])
            .map_err(sled_err)?;
        db.flush().map_err(sled_err)?;

        let tables: Vec<String> = schema.tables().map(|t| t.name.clone()).collect();
        let table_ids = tables
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u16))
            .collect();
        let sled_files = match &dir {
            Some(d) => Some(SledFiles::open(&d.join(DB_DIR))?),
            None => None,
        };
        let (wal, wal_sync) = match &dir {
            Some(d) => {
                let wal = recover_wal(d, &db, sled_files.as_ref(), &options)?;
                let sync = wal.sync_handle()?;
                (Some(Mutex::new(wal)), Some(sync))
            }
            None => (None, None),
        };
        let inner = Inner {
            db,
            dir,
            sled_files,
            schema,
            tables,
            table_ids,
            actor,
            options,
            writer: Mutex::new(Writer { next_seq: 1 }),
            id_epoch,
            id_counter: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            write_failed: std::sync::atomic::AtomicBool::new(false),
            wal,
            wal_sync,
        };
        let store = Store {
            inner: Arc::new(inner),
        };
        let last = store.compute_last_seq().map_err(OpenError::Store)?;
        store.set_next_seq(&mut store.writer(), last + 1);
        let tail = if clean { 1 } else { 256 };
        if store.rebuild_interrupted().map_err(OpenError::Store)? {
            warn!("a rebuild of the materialized rows was interrupted; rebuilding");
            store.rebuild().map_err(OpenError::Store)?;
        } else if !store.tail_consistent(tail).map_err(OpenError::Store)? {
            warn!(
                clean,
                "materialized rows disagree with the log tail; rebuilding"
            );
            store.rebuild().map_err(OpenError::Store)?;
        }
        if format < FORMAT_VERSION {
            store.upgrade_format(format).map_err(OpenError::Store)?;
        }
        debug!(%actor, last_seq = last, clean, "store open");
        Ok(store)
    }

    /// The schema every write is checked against.
    pub fn schema(&self) -> &Schema {
        &self.inner.schema
    }

    /// This store's actor id.
    pub fn actor(&self) -> ActorId {
        self.inner.actor
    }

    /// The data directory (`None` for a temporary store).
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    pub(crate) fn db(&self) -> &Engine {
        &self.inner.db
    }

    pub(crate) fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves nothing half-written that a later write could
        // build on: a batch logged and not fully applied stops all writes (`Store::write`).
        self.inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new row id: a prefix of the actor's hash, the open epoch and a counter in the high
    /// bytes (so ids this store creates are increasing, and land next to each other in every
    /// key space), a hash of the actor, epoch and counter in the low bytes (so ids never
    /// repeat). A simulator
    /// with a fixed actor gets the same ids on every run. UUID version 8 (custom).
    ///
    /// Public for callers that must know a new row's id before they write it (an importer
    /// that names each row's line in its errors); an insert without an id takes one itself.
    pub fn new_row_id(&self) -> RowId {
        let n = self.inner.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(self.inner.actor.0);
        h.update(self.inner.id_epoch.to_be_bytes());
        h.update(n.to_be_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        // First 6 bytes: 16 bits of the actor's hash (ids of one store share a prefix, and do
        // not all start with zeros), 8 bits of epoch, 24 bits of counter. Byte 6 carries the
        // UUID version and byte 8 the variant; both land in the hash part, which makes ids
        // unique.
        let prefix = u16::from_be_bytes(
            Sha256::digest(self.inner.actor.0)[..2]
                .try_into()
                .unwrap_or([0, 0]),
        );
        let high =
            (u64::from(prefix) << 32) | ((self.inner.id_epoch & 0xff) << 24) | (n & 0xff_ffff);
        b[..6].copy_from_slice(&high.to_be_bytes()[2..]);
        b[6..].copy_from_slice(&d[..10]);
        uuid::Builder::from_custom_bytes(b).into_uuid()
    }

    pub(crate) fn table(&self, name: &str) -> Result<(u16, &Table), SchemaError> {
        let t = self.inner.schema.table(name)?;
        let id = self
            .inner
            .table_ids
            .get(name)
            .copied()
            .ok_or_else(|| SchemaError::UnknownTable(name.to_string()))?;
        Ok((id, t))
    }

    pub(crate) fn table_by_id(&self, t: u16) -> Result<&Table, StoreError> {
        let name = self
            .inner
            .tables
            .get(usize::from(t))
            .ok_or_else(|| corrupt(format!("table number {t} is not in the schema")))?;
        Ok(self.inner.schema.table(name)?)
    }

    pub(crate) fn table_name(&self, t: u16) -> String {
        self.inner
            .tables
            .get(usize::from(t))
            .cloned()
            .unwrap_or_else(|| format!("#{t}"))
    }

    pub(crate) fn load_state(&self, t: u16, id: RowId) -> Result<Option<CrdtState>, StoreError> {
        match self.db().get(keys::row_key(keys::ROW, t, id))? {
            Some(b) => Ok(Some(decode(&b, "a row")?)),
            None => Ok(None),
        }
    }

    pub(crate) fn load_mat(&self, t: u16, id: RowId) -> Result<Option<MatRow>, StoreError> {
        match self.db().get(keys::row_key(keys::ROW, t, id))? {
            Some(b) => Ok(Some(self.decode_mat(t, &b)?)),
            None => Ok(None),
        }
    }

    /// The materialized row of a stored row record.
    pub(crate) fn decode_mat(&self, t: u16, bytes: &[u8]) -> Result<MatRow, StoreError> {
        crate::row::mat_view::decode(bytes, self.table_by_id(t)?)
            .map_err(|e| corrupt(format!("a row does not decode: {e}")))
    }

    pub(crate) fn load_entry(&self, seq: u64) -> Result<Option<StoredEntry>, StoreError> {
        match self.db().get(keys::log(seq))? {
            Some(b) => {
                Ok(Some(StoredEntry::decode(&b).ok_or_else(|| {
                    corrupt(format!("log entry {seq} is too short"))
                })?))
            }
            None => Ok(None),
        }
    }

    pub(crate) fn meta_u64(&self, name: &str) -> Result<u64, StoreError> {
        match self.db().get(keys::meta(name))? {
            Some(b) => u64_meta(&b, name),
            None => Err(corrupt(format!("meta key {name} is missing"))),
        }
    }

    pub(crate) fn to_row(&self, table: &Table, id: RowId, mat: MatRow) -> Row {
        let values = mat
            .values
            .into_iter()
            .filter_map(|(c, v)| Some((column_name(table, c)?, v)))
            .collect::<BTreeMap<_, _>>();
        Row {
            table: table.name.clone(),
            id,
            values,
            has_conflicts: mat.has_conflicts,
        }
    }

    /// The index keys of a materialized row (none for a deleted row): one per indexed column
    /// with its own index, plus the composite (ownerid, statecode) key if it has an owner.
    pub(crate) fn index_keys(
        &self,
        t: u16,
        table: &Table,
        id: RowId,
        mat: &MatRow,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if mat.deleted {
            return out;
        }
        let mut owner = None;
        let mut state = None;
        for (c, v) in &mat.values {
            let Some(col) = table.columns.get(usize::from(*c)) else {
                continue;
            };
            if !col.ty.is_indexed() {
                continue;
            }
            let Some(enc) = index_value(v) else { continue };
            match col.name.as_str() {
                OWNER_COLUMN => owner = Some(enc),
                STATE_COLUMN => state = Some(enc),
                _ => out.push(keys::index(t, *c, &enc, id)),
            }
        }
        if let Some(o) = owner {
            let mut k = owner_state_prefix(t, &o, state.as_deref());
            k.extend_from_slice(id.as_bytes());
            out.push(k);
        }
        out
    }

    /// Stage the new materialized row, its state and its index changes into `batch`.
    pub(crate) fn stage_row(
        &self,
        batch: &mut WriteBatch,
        t: u16,
        table: &Table,
        id: RowId,
        old: Option<&MatRow>,
        state: &CrdtState,
    ) -> MatRow {
        let mat = state.materialize(table);
        let new_keys = self.index_keys(t, table, id, &mat);
        if let Some(old) = old {
            let old_keys = self.index_keys(t, table, id, old);
            for k in &old_keys {
                if !new_keys.contains(k) {
                    batch.remove(k.as_slice());
                }
            }
            for k in new_keys {
                if !old_keys.contains(&k) {
                    batch.insert(k, &[][..]);
                }
            }
        } else {
            for k in new_keys {
                batch.insert(k, &[][..]);
            }
        }
        batch.insert(&keys::row_key(keys::ROW, t, id)[..], encode(state));
        mat
    }

    /// Write `batch` atomically: appended to the write-ahead file, then applied to sled (in
    /// that order for every batch, under the WAL lock), durable as `durability` asks.
    ///
    /// An `Immediate` batch's record is `fdatasync`ed before sled sees the batch, which then goes
    /// in key by key ([`Engine::apply_logged`]: replaying the record completes it after any
    /// crash). Any other batch goes in as sled's atomic batch: sled's background writes may
    /// reach the disk before its record does, and a power loss must not leave half of it.
    pub(crate) fn write(
        &self,
        mut batch: WriteBatch,
        durability: Durability,
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let Some(wal) = &self.inner.wal else {
            self.db().apply_batch(&batch)?;
            return self.make_durable(durability);
        };
        {
            let mut wal = wal
                .lock()
                .map_err(|_| StoreError::Corrupt("a writer panicked while appending".into()))?;
            if self.inner.write_failed.load(Ordering::Acquire) {
                return Err(StoreError::Io(std::io::Error::other(
                    "an earlier write was logged but not applied; reopen the store to recover it",
                )));
            }
            let marker = keys::meta(WAL_POSITION);
            if wal.needs_checkpoint(&batch, Wal::marker_len(&marker)) {
                let done = checkpoint(
                    self.db(),
                    self.inner.sled_files.as_ref(),
                    &self.inner.options,
                    &mut wal,
                );
                if let Err(e) = done {
                    // sled may already hold the next generation while the file is still in
                    // this one: records written now could be ignored by the next replay.
                    self.inner.write_failed.store(true, Ordering::Release);
                    error!(error = %e, "a checkpoint failed; refusing writes until reopened");
                    return Err(e);
                }
            }
            wal.append_marked(&mut batch, &marker)?;
            let durable_first = durability == Durability::Immediate && self.inner.options.fsync;
            let applied = if durable_first {
                self.sync()
                    .and_then(|()| Ok(self.db().apply_logged(&batch)?))
            } else {
                self.db().apply_batch(&batch).map_err(StoreError::from)
            };
            if let Err(e) = applied {
                // The record may be replayed at the next open: its seqs must not be reused,
                // nor a half-applied batch checkpointed over.
                self.inner.write_failed.store(true, Ordering::Release);
                error!(error = %e, "a logged batch was not applied; refusing writes until reopened");
                return Err(e);
            }
            if durable_first {
                return Ok(());
            }
        }
        self.make_durable(durability)
    }

    /// Make what has been written durable, as `durability` asks.
    pub(crate) fn make_durable(&self, durability: Durability) -> Result<(), StoreError> {
        if durability == Durability::Immediate {
            self.sync()?;
        }
        Ok(())
    }

    /// Make every commit so far durable (group commits included): `fdatasync` of the
    /// write-ahead file when [`StoreOptions::fsync`] is on (without it, a commit survives a
    /// process crash as soon as it returns). A temporary store flushes sled.
    pub fn sync(&self) -> Result<(), StoreError> {
        let _span = tracing::trace_span!("sync").entered();
        match &self.inner.wal_sync {
            Some(f) => {
                if self.inner.options.fsync {
                    f.sync_data()?;
                }
            }
            None => {
                self.db().flush()?;
            }
        }
        Ok(())
    }

    /// The sequence number of the last log entry (0 if none yet).
    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq.load(Ordering::Acquire)
    }

    /// Advance the log (under the writer lock) and publish the new last seq to readers.
    pub(crate) fn set_next_seq(&self, writer: &mut Writer, next: u64) {
        writer.next_seq = next;
        self.inner
            .last_seq
            .store(next.saturating_sub(1), Ordering::Release);
    }

    fn compute_last_seq(&self) -> Result<u64, StoreError> {
        let floor = self.meta_u64("seq")?;
        let last = match self.db().scan_prefix([keys::LOG]).next_back() {
            Some(r) => {
                let (k, _) = r?;
                keys::log_seq(&k).ok_or_else(|| corrupt("a log key is malformed"))?
            }
            None => 0,
        };
        Ok(floor.max(last))
    }

    /// Whether the last `n` log entries are reflected in their rows' state.
    fn tail_consistent(&self, n: usize) -> Result<bool, StoreError> {
        let acked = self.meta_u64("acked")?;
        for r in self.db().scan_prefix([keys::LOG]).rev().take(n) {
            let (k, v) = r?;
            let seq = keys::log_seq(&k).ok_or_else(|| corrupt("a log key is malformed"))?;
            let e = StoredEntry::decode(&v)
                .ok_or_else(|| corrupt(format!("log entry {seq} is too short")))?;
            // A row that does not decode is inconsistent too: the caller rebuilds it.
            let Ok(state) = self.load_state(e.table, e.row) else {
                return Ok(false);
            };
            match state {
                Some(s) if s.pending.binary_search(&seq).is_ok() => {}
                None if seq <= acked => {} // an evicted row
                _ => return Ok(false),
            }
            if self
                .db()
                .get(keys::row_key(keys::ROW, e.table, e.row))?
                .is_none()
                && seq > acked
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    // ---- reads ----

    /// The row with this id (`None` if it does not exist or is deleted).
    pub fn get(&self, table: &str, id: RowId) -> Result<Option<Row>, StoreError> {
        let (t, tab) = self.table(table)?;
        match self.load_mat(t, id)? {
            Some(m) if !m.deleted => Ok(Some(self.to_row(tab, id, m))),
            _ => Ok(None),
        }
    }

    /// The file and image references of a live row, by column name (empty if the row does
    /// not exist or is deleted): what `get` would give of those columns, without building the
    /// whole row.
    pub fn blob_refs(&self, table: &str, id: RowId) -> Result<Vec<(String, BlobRef)>, StoreError> {
        let (t, tab) = self.table(table)?;
        let Some(m) = self.load_mat(t, id)?.filter(|m| !m.deleted) else {
            return Ok(Vec::new());
        };
        Ok(m.values
            .into_iter()
            .filter_map(|(c, v)| match v {
                Value::File(b) | Value::Image(b) => Some((column_name(tab, c)?, b)),
                _ => None,
            })
            .collect())
    }

    /// Whether the row exists with a delete tombstone.
    pub fn is_deleted(&self, table: &str, id: RowId) -> Result<bool, StoreError> {
        let (t, _) = self.table(table)?;
        Ok(self.load_mat(t, id)?.is_some_and(|m| m.deleted))
    }

    /// The row records of table number `t`, by id: each id with its encoded `R` record.
    fn row_records(&self, t: u16) -> impl Iterator<Item = Result<(RowId, IVec), StoreError>> {
        let prefix = keys::table_prefix(keys::ROW, t);
        self.db().scan_prefix(prefix).map(|r| {
            let (k, v) = r?;
            let (_, id) =
                keys::parse_row_key(&k).ok_or_else(|| corrupt("a row key is malformed"))?;
            Ok((id, v))
        })
    }

    /// Every live row of a table, by id.
    pub fn scan(
        &self,
        table: &str,
    ) -> Result<impl Iterator<Item = Result<Row, StoreError>> + '_, StoreError> {
        let (t, tab) = self.table(table)?;
        Ok(self.row_records(t).filter_map(move |r| {
            let item = r.and_then(|(id, v)| Ok((id, self.decode_mat(t, &v)?)));
            match item {
                Ok((_, m)) if m.deleted => None,
                Ok((id, m)) => Some(Ok(self.to_row(tab, id, m))),
                Err(e) => Some(Err(e)),
            }
        }))
    }

    /// The ids of every live row of a table, in id order, without reading the rows (only each
    /// record's first byte, its deleted flag): for listing what a store holds cheaply.
    pub fn row_ids(
        &self,
        table: &str,
    ) -> Result<impl Iterator<Item = Result<RowId, StoreError>> + '_, StoreError> {
        let (t, _) = self.table(table)?;
        Ok(self.row_records(t).filter_map(|r| {
            let item = r.and_then(|(id, v)| {
                let deleted = crate::row::peek_deleted(&v)
                    .ok_or_else(|| corrupt(format!("the record of row {id} is damaged")))?;
                Ok((id, deleted))
            });
            match item {
                Ok((_, true)) => None,
                Ok((id, false)) => Some(Ok(id)),
                Err(e) => Some(Err(e)),
            }
        }))
    }

    /// The columns of a row that hold concurrent values (empty: none, or no such row).
    ///
    /// `modifiedon` is set by every write and is never reported.
    pub fn conflicts(&self, table: &str, id: RowId) -> Result<Vec<ColumnConflict>, StoreError> {
        let (t, tab) = self.table(table)?;
        Ok(self
            .load_state(t, id)?
            .map(|s| s.conflicts(tab))
            .unwrap_or_default())
    }

    /// The seq of the acknowledged log prefix.
    pub fn acked_seq(&self) -> Result<u64, StoreError> {
        self.meta_u64("acked")
    }

    /// The value of a row's column in a materialized row.
    pub(crate) fn mat_value(mat: &MatRow, col: u16) -> &Value {
        const NULL: Value = Value::Null;
        mat.values
            .binary_search_by_key(&col, |(c, _)| *c)
            .ok()
            .and_then(|p| mat.values.get(p))
            .map_or(&NULL, |(_, v)| v)
    }
}

/// The name of column number `c` of a stored row (`None` for a number the schema no longer has).
fn column_name(table: &Table, c: u16) -> Option<String> {
    table
        .columns
        .get(usize::from(c))
        .map(|col| col.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blob chunks are over sled's inline limit, so sled writes each to a file of its own
    /// under `db/blobs/`: a checkpoint must sync every one of them, and the store must read
    /// them back after a reopen.
    #[test]
    fn checkpoints_sync_sleds_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let schema = Schema::from_toml("[tables.note.columns]\nbody = \"file\"").unwrap();
        let options = StoreOptions {
            // Small enough that the blob below makes the store checkpoint several times.
            wal_capacity_bytes: 256 << 10,
            ..StoreOptions::default()
        };
        let content: Vec<u8> = (0..(1u32 << 20) + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        let blob = {
            let store = Store::create(&path, schema.clone(), options.clone()).unwrap();
            let blob = store.put_blob("big.bin", &mut content.as_slice()).unwrap();
            let files = store.inner.sled_files.as_ref().unwrap();
            let on_disk = std::fs::read_dir(path.join(DB_DIR).join("blobs"))
                .unwrap()
                .count();
            assert!(on_disk > 0, "sled wrote no blob file");
            // One more checkpoint: every blob file sled holds now has been synced.
            let mut wal = store.inner.wal.as_ref().unwrap().lock().unwrap();
            checkpoint(store.db(), Some(files), &options, &mut wal).unwrap();
            drop(wal);
            let on_disk = std::fs::read_dir(path.join(DB_DIR).join("blobs"))
                .unwrap()
                .count();
            assert_eq!(files.synced_blob_count(), on_disk);
            blob
        };
        let store = Store::open(&path, options).unwrap();
        assert_eq!(store.read_blob(&blob).unwrap(), content);
    }

    /// A power loss after sled's background writes kept a group commit whose write-ahead
    /// record never reached the disk: the replay must not write the earlier (durable) record's
    /// values over it. Simulated on a copy of the directory: sled flushed with both batches, the
    /// second record zeroed in the write-ahead file.
    #[test]
    fn replay_starts_after_the_last_record_sled_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let schema = Schema::from_toml("[tables.note.columns]\nbody = \"text\"").unwrap();
        let store = Store::create(&path, schema, StoreOptions::default()).unwrap();
        store
            .aux_put("s", b"k", b"durable", Durability::Immediate)
            .unwrap();
        let lost_at = store.inner.wal.as_ref().unwrap().lock().unwrap().offset();
        store
            .aux_put("s", b"k", b"group", Durability::Group)
            .unwrap();
        let lost_end = store.inner.wal.as_ref().unwrap().lock().unwrap().offset();
        // sled's background flush kept the group commit.
        store.db().flush().unwrap();
        let copy = dir.path().join("copy");
        copy_dir(&path, &copy);
        drop(store);
        let wal_path = copy.join(crate::wal::WAL_FILE);
        let mut wal = std::fs::read(&wal_path).unwrap();
        let (from, to) = (
            usize::try_from(lost_at).unwrap(),
            usize::try_from(lost_end).unwrap(),
        );
        wal[from..to].fill(0);
        std::fs::write(&wal_path, wal).unwrap();
        let reopened = Store::open(&copy, StoreOptions::default()).unwrap();
        assert_eq!(
            reopened.aux_get("s", b"k").unwrap().as_deref(),
            Some(&b"group"[..])
        );
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), &target).unwrap();
            }
        }
    }
}
