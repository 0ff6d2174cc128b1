//! The key-value engine under the store: sled for a store on disk, an ordered map in memory
//! for a temporary store (no files, no background threads: a simulator runs thousands).
//!
//! Both offer the handful of sled calls the store makes, with sled's types, so the code above
//! does not know which one it runs on.
//!
//! A batch whose write-ahead record is already on disk ([`Engine::apply_logged`]) goes into sled
//! key by key under the engine's batch lock, not as a `sled::Batch`: sled 0.34 writes out its
//! log buffer twice for every atomic batch (`PageCache::pin_log`, each write with a
//! `sync_file_range`), which nearly doubled a durable commit, and the durable record already
//! makes the batch atomic across any crash. Readers take the lock shared for each read and each
//! step of a scan, so none of those sees half a batch, as with sled's own batches (a scan is
//! not a snapshot either way).

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};

use sled::IVec;

use crate::wal::WriteBatch;

/// One key-value pair as an iterator yields it.
pub(crate) type KvResult = sled::Result<(IVec, IVec)>;

/// A double-ended iterator over key-value pairs in key order.
pub(crate) type KvIter = Box<dyn DoubleEndedIterator<Item = KvResult> + Send>;

type Map = Arc<RwLock<BTreeMap<IVec, IVec>>>;

/// Held exclusively while a logged batch goes into sled, shared for each read.
type BatchLock = Arc<RwLock<()>>;

pub(crate) enum Engine {
    Sled(sled::Db, BatchLock),
    Memory(Map),
}

/// Every sled write replaces the tree node it lands in with a new copy and retires the old one
/// into a per-thread bag (of 64) that crossbeam's epoch collector frees only in a collection
/// pass (8 bags per pass, one pass per 128 pins), once no thread is pinned in an older epoch.
/// Left to that pace, a 100,000-row import still held ~20 MiB of copies when it returned.
/// Flushing after each batch hands over the partial bag and runs a pass. sled 0.34 uses the
/// global collector of the one crossbeam-epoch 0.9 in the build (Cargo.lock).
fn release_retired_nodes() {
    crossbeam_epoch::pin().flush();
}

fn poisoned() -> sled::Error {
    sled::Error::ReportableBug("a thread panicked while writing the store".into())
}

/// Holds the batch lock shared: no logged batch is half applied while it lives.
fn read_guard(lock: &RwLock<()>) -> sled::Result<std::sync::RwLockReadGuard<'_, ()>> {
    lock.read().map_err(|_| poisoned())
}

impl Engine {
    pub(crate) fn memory() -> Engine {
        Engine::Memory(Map::default())
    }

    pub(crate) fn sled(db: sled::Db) -> Engine {
        Engine::Sled(db, BatchLock::default())
    }

    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        match self {
            Engine::Sled(db, lock) => {
                let _read = read_guard(lock)?;
                db.get(key)
            }
            Engine::Memory(m) => Ok(m.read().map_err(|_| poisoned())?.get(key.as_ref()).cloned()),
        }
    }

    pub(crate) fn contains_key(&self, key: impl AsRef<[u8]>) -> sled::Result<bool> {
        match self {
            Engine::Sled(db, lock) => {
                let _read = read_guard(lock)?;
                db.contains_key(key)
            }
            Engine::Memory(m) => Ok(m.read().map_err(|_| poisoned())?.contains_key(key.as_ref())),
        }
    }

    /// A single write outside any batch (meta keys at open and close only).
    pub(crate) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> sled::Result<()> {
        match self {
            Engine::Sled(db, _) => db.insert(key.as_ref(), value.as_ref()).map(drop),
            Engine::Memory(m) => {
                m.write()
                    .map_err(|_| poisoned())?
                    .insert(IVec::from(key.as_ref()), IVec::from(value.as_ref()));
                Ok(())
            }
        }
    }

    /// Apply `batch`, whose write-ahead record is already on disk: atomically for readers (under
    /// the batch lock); a crash part-way is made whole by replaying the record (module docs).
    pub(crate) fn apply_logged(&self, batch: &WriteBatch) -> sled::Result<()> {
        match self {
            Engine::Sled(db, lock) => {
                {
                    let _write = lock.write().map_err(|_| poisoned())?;
                    for (k, v) in batch.ops() {
                        match v {
                            Some(v) => db.insert(k.clone(), v.clone()).map(drop)?,
                            None => db.remove(k).map(drop)?,
                        }
                    }
                }
                release_retired_nodes();
                Ok(())
            }
            Engine::Memory(_) => self.apply_batch(batch),
        }
    }

    /// Apply `batch` atomically, for readers and across a crash.
    pub(crate) fn apply_batch(&self, batch: &WriteBatch) -> sled::Result<()> {
        match self {
            Engine::Sled(db, _) => {
                let mut b = sled::Batch::default();
                for (k, v) in batch.ops() {
                    match v {
                        Some(v) => b.insert(k.clone(), v.clone()),
                        None => b.remove(k.clone()),
                    }
                }
                db.apply_batch(b)?;
                release_retired_nodes();
                Ok(())
            }
            Engine::Memory(m) => {
                let mut m = m.write().map_err(|_| poisoned())?;
                for (k, v) in batch.ops() {
                    match v {
                        Some(v) => {
                            m.insert(k.clone(), v.clone());
                        }
                        None => {
                            m.remove(k);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    pub(crate) fn flush(&self) -> sled::Result<()> {
        match self {
            Engine::Sled(db, _) => db.flush().map(drop),
            Engine::Memory(_) => Ok(()),
        }
    }

    pub(crate) fn size_on_disk(&self) -> sled::Result<u64> {
        match self {
            Engine::Sled(db, _) => db.size_on_disk(),
            Engine::Memory(_) => Ok(0),
        }
    }

    pub(crate) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> KvIter {
        let prefix = prefix.as_ref();
        match self {
            Engine::Sled(db, lock) => Box::new(SledIter {
                inner: db.scan_prefix(prefix),
                lock: lock.clone(),
            }),
            Engine::Memory(m) => {
                // The smallest key above every key that starts with `prefix`, if there is one.
                let mut end = prefix.to_vec();
                while end.last() == Some(&0xff) {
                    end.pop();
                }
                let hi = match end.last_mut() {
                    Some(b) => {
                        *b += 1;
                        Bound::Excluded(IVec::from(end))
                    }
                    None => Bound::Unbounded,
                };
                Box::new(MemIter::new(m, Bound::Included(IVec::from(prefix)), hi))
            }
        }
    }

    pub(crate) fn range<R: RangeBounds<Vec<u8>>>(&self, range: R) -> KvIter {
        match self {
            Engine::Sled(db, lock) => Box::new(SledIter {
                inner: db.range::<Vec<u8>, R>(range),
                lock: lock.clone(),
            }),
            Engine::Memory(m) => {
                let own = |b: Bound<&Vec<u8>>| match b {
                    Bound::Included(k) => Bound::Included(IVec::from(k.as_slice())),
                    Bound::Excluded(k) => Bound::Excluded(IVec::from(k.as_slice())),
                    Bound::Unbounded => Bound::Unbounded,
                };
                Box::new(MemIter::new(
                    m,
                    own(range.start_bound()),
                    own(range.end_bound()),
                ))
            }
        }
    }
}

/// A sled scan whose every step holds the batch lock shared.
struct SledIter {
    inner: sled::Iter,
    lock: BatchLock,
}

impl SledIter {
    fn step(&mut self, back: bool) -> Option<KvResult> {
        let _read = match read_guard(&self.lock) {
            Ok(g) => g,
            Err(e) => return Some(Err(e)),
        };
        if back {
            self.inner.next_back()
        } else {
            self.inner.next()
        }
    }
}

impl Iterator for SledIter {
    type Item = KvResult;

    fn next(&mut self) -> Option<KvResult> {
        self.step(false)
    }
}

impl DoubleEndedIterator for SledIter {
    fn next_back(&mut self) -> Option<KvResult> {
        self.step(true)
    }
}

/// A lazy walk over the in-memory map between two bounds that narrow as it goes. It reads
/// ahead a few entries per lookup (4, doubling up to [`MEM_READ_AHEAD`]) under the read lock,
/// each read-ahead seeing every batch whole or not at all: like sled's iterator, which keeps
/// the leaf it is reading, a scan never copies the map and sees writes made while it runs,
/// except in the entries it has already read ahead. One lookup per entry made the scans the
/// simulator's devices run the largest part of their reads.
struct MemIter {
    map: Map,
    /// What is left between the two read-aheads.
    lo: Bound<IVec>,
    hi: Bound<IVec>,
    /// Read ahead from the front, in key order.
    front: VecDeque<(IVec, IVec)>,
    /// Read ahead from the back, in reverse key order.
    back: VecDeque<(IVec, IVec)>,
    /// No key is left between `lo` and `hi`.
    drained: bool,
    /// Entries the next read-ahead takes.
    chunk: usize,
}

/// The most entries one read-ahead of [`MemIter`] takes.
const MEM_READ_AHEAD: usize = 64;

impl MemIter {
    fn new(map: &Map, lo: Bound<IVec>, hi: Bound<IVec>) -> MemIter {
        let mut it = MemIter {
            map: map.clone(),
            lo,
            hi,
            front: VecDeque::new(),
            back: VecDeque::new(),
            drained: false,
            chunk: 4,
        };
        it.drained = it.bounds_cross();
        it
    }

    /// Whether no key can lie between the bounds (`BTreeMap::range` panics on such bounds).
    fn bounds_cross(&self) -> bool {
        match (&self.lo, &self.hi) {
            (Bound::Included(l), Bound::Included(h)) => l > h,
            (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(h))
            | (Bound::Excluded(l), Bound::Included(h)) => l >= h,
            _ => false,
        }
    }

    /// Read the next entries from one end of what is left.
    fn read_ahead(&mut self, back: bool) -> sled::Result<()> {
        if self.drained {
            return Ok(());
        }
        let map = self.map.read().map_err(|_| poisoned())?;
        let range = map.range::<IVec, _>((self.lo.clone(), self.hi.clone()));
        let (buf, taken) = if back {
            let before = self.back.len();
            self.back.extend(
                range
                    .rev()
                    .take(self.chunk)
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            (&self.back, self.back.len() - before)
        } else {
            let before = self.front.len();
            self.front
                .extend(range.take(self.chunk).map(|(k, v)| (k.clone(), v.clone())));
            (&self.front, self.front.len() - before)
        };
        let last = buf.back().map(|(k, _)| Bound::Excluded(k.clone()));
        drop(map);
        match last {
            Some(bound) if back => self.hi = bound,
            Some(bound) => self.lo = bound,
            None => {}
        }
        self.drained = taken < self.chunk || self.bounds_cross();
        self.chunk = (self.chunk * 2).min(MEM_READ_AHEAD);
        Ok(())
    }

    fn step(&mut self, back: bool) -> Option<KvResult> {
        let near_empty = if back {
            self.back.is_empty()
        } else {
            self.front.is_empty()
        };
        if near_empty {
            if let Err(e) = self.read_ahead(back) {
                // Once: a caller that skips errors must still reach the end.
                self.drained = true;
                return Some(Err(e));
            }
        }
        // Still empty: nothing is left between the read-aheads, and the other end's holds
        // the rest.
        let next = if back {
            self.back.pop_front().or_else(|| self.front.pop_back())
        } else {
            self.front.pop_front().or_else(|| self.back.pop_back())
        };
        next.map(Ok)
    }
}

impl Iterator for MemIter {
    type Item = KvResult;

    fn next(&mut self) -> Option<KvResult> {
        self.step(false)
    }
}

impl DoubleEndedIterator for MemIter {
    fn next_back(&mut self) -> Option<KvResult> {
        self.step(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine_with(keys: &[&[u8]]) -> Engine {
        let e = Engine::memory();
        let mut b = WriteBatch::default();
        for k in keys {
            b.insert(k, b"v");
        }
        e.apply_batch(&b).unwrap();
        e
    }

    fn keys(it: impl Iterator<Item = KvResult>) -> Vec<Vec<u8>> {
        it.map(|r| r.unwrap().0.to_vec()).collect()
    }

    /// The read-ahead: any interleaving of both ends, over scans long enough for several
    /// read-aheads, yields each key once, in order from each end.
    #[test]
    fn memory_scans_read_ahead_from_both_ends() {
        let all: Vec<Vec<u8>> = (0u16..300).map(|i| i.to_be_bytes().to_vec()).collect();
        let refs: Vec<&[u8]> = all.iter().map(Vec::as_slice).collect();
        let mem = engine_with(&refs);
        let mut state = 7u64;
        for pattern in 0..40 {
            let (lo, hi) = (pattern * 3, 300 - pattern * 2);
            let mut it = mem.range(all[lo].clone()..all[hi - 1].clone());
            let (mut front, mut back) = (lo, hi - 1);
            loop {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let from_back = pattern % 3 == 0 || (state >> 33).is_multiple_of(2);
                let got = if from_back { it.next_back() } else { it.next() };
                let Some(got) = got else { break };
                let k = got.unwrap().0.to_vec();
                if from_back {
                    back -= 1;
                    assert_eq!(k, all[back], "pattern {pattern}");
                } else {
                    assert_eq!(k, all[front], "pattern {pattern}");
                    front += 1;
                }
            }
            assert_eq!(front, back, "pattern {pattern}: every key once");
            assert!(it.next().is_none() && it.next_back().is_none());
        }
        // An open end, walked backwards over several read-aheads.
        let back: Vec<Vec<u8>> = keys(mem.range(all[10].clone()..).rev());
        let want: Vec<Vec<u8>> = all[10..].iter().rev().cloned().collect();
        assert_eq!(back, want);
        // Writes during a scan: past the read-ahead they are seen; inside it, not yet.
        let mut it = mem.scan_prefix(b"");
        let first = it.next().unwrap().unwrap().0.to_vec();
        assert_eq!(first, all[0]);
        let mut b = WriteBatch::default();
        b.remove(&all[1]);
        b.insert([0u8, 0, 0], b"between 0 and 1");
        b.insert([0xffu8, 0xff], b"past the end");
        mem.apply_batch(&b).unwrap();
        let rest = keys(it);
        assert_eq!(rest.first(), Some(&all[1]), "read ahead before the removal");
        assert!(!rest.contains(&vec![0u8, 0, 0]), "behind the scan");
        assert_eq!(rest.last(), Some(&vec![0xffu8, 0xff]), "ahead of the scan");
    }

    #[test]
    fn memory_scans_match_sled() {
        let all: &[&[u8]] = &[
            b"a",
            b"ab",
            b"ab\xff",
            b"ab\xff\x01",
            b"ac",
            b"b",
            b"\xff\xff",
        ];
        let mem = engine_with(all);
        let dir = tempfile::tempdir().unwrap();
        let sled_engine = Engine::sled(sled::open(dir.path()).unwrap());
        let mut b = WriteBatch::default();
        for k in all {
            b.insert(k, b"v");
        }
        sled_engine.apply_batch(&b).unwrap();
        for e in [&mem, &sled_engine] {
            assert_eq!(
                keys(e.scan_prefix(b"ab")),
                vec![b"ab".to_vec(), b"ab\xff".to_vec(), b"ab\xff\x01".to_vec()]
            );
            assert_eq!(keys(e.scan_prefix(b"ab\xff")).len(), 2);
            assert_eq!(keys(e.scan_prefix(b"\xff")), vec![b"\xff\xff".to_vec()]);
            assert_eq!(keys(e.scan_prefix(b"")).len(), all.len());
            assert_eq!(
                keys(e.scan_prefix(b"ab").rev()).first(),
                Some(&b"ab\xff\x01".to_vec())
            );
            assert_eq!(keys(e.range(b"ab".to_vec()..b"b".to_vec())).len(), 4);
            assert_eq!(keys(e.range(b"ab".to_vec()..=b"b".to_vec())).len(), 5);
            assert_eq!(keys(e.range(b"ac".to_vec()..)).len(), 3);
            // Both ends at once meet in the middle without repeating.
            let mut it = e.range(b"a".to_vec()..b"b".to_vec());
            let (f, l) = (it.next(), it.next_back());
            assert_ne!(f.unwrap().unwrap().0, l.unwrap().unwrap().0);
            assert_eq!(it.count(), 3);
        }
    }
}
