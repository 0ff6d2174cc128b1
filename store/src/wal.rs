//! The write-ahead file: every sled batch is appended here before sled sees it.
//!
//! Why: a durable commit through sled alone costs two device syncs (`Db::flush` ends in
//! `sync_file_range`, then `fdatasync` for power loss). Appending the batch to a preallocated
//! file that is overwritten in place and `fdatasync`ing only that file costs one, and a
//! commit survives a process crash as soon as its `pwrite` returned, `Group` commits included.
//!
//! Format: records from offset 0, each `len u32 LE | crc32 u32 LE | generation u64 LE |
//! payload (len bytes)`, the CRC over generation and payload. A payload is a sequence of
//! operations, `1 | key len u32 | key | value len u32 | value` (insert) or
//! `0 | key len u32 | key` (remove). The current generation lives in sled (`0walgen`): a
//! checkpoint makes sled durable, bumps the generation there (durably too) and starts again at
//! offset 0, so older records left further on in the file can never be replayed. Replay applies
//! the records of the current generation in order and stops at the first that is torn, has a
//! bad CRC or an older generation.
//!
//! Every record's batch also writes a position marker (its generation and where the record
//! ends, [`Wal::append_marked`]) as its last key, so sled says which record it holds last, and
//! replay starts after that one. Replaying a batch sled already holds is harmless after a
//! process crash, but not after a power loss: sled's background writes may have kept a later
//! group commit whose record was lost, and replaying an earlier record would write older
//! values over it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sled::IVec;

use crate::error::{corrupt, StoreError};

/// The write-ahead file's name inside the data directory.
pub(crate) const WAL_FILE: &str = "wal";

const HEADER_BYTES: usize = 16;
const OP_REMOVE: u8 = 0;
const OP_INSERT: u8 = 1;

/// One atomic write: inserts (`Some(value)`) and removals (`None`), in order.
#[derive(Default)]
pub(crate) struct WriteBatch {
    ops: Vec<(IVec, Option<IVec>)>,
}

impl WriteBatch {
    /// Set `key` to `value`.
    pub(crate) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((IVec::from(key.as_ref()), Some(IVec::from(value.as_ref()))));
    }

    /// Remove `key`.
    pub(crate) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((IVec::from(key.as_ref()), None));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub(crate) fn ops(&self) -> &[(IVec, Option<IVec>)] {
        &self.ops
    }

    fn payload_len(&self) -> usize {
        self.ops
            .iter()
            .map(|(k, v)| 5 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum()
    }

    /// The WAL record of this batch in `generation`, payload encoded in place.
    fn record(&self, generation: u64) -> Vec<u8> {
        let mut r = Vec::with_capacity(HEADER_BYTES + self.payload_len());
        r.extend_from_slice(&[0; 8]); // length and CRC, filled in below
        r.extend_from_slice(&generation.to_le_bytes());
        for (k, v) in &self.ops {
            match v {
                Some(v) => {
                    r.push(OP_INSERT);
                    push_bytes(&mut r, k);
                    push_bytes(&mut r, v);
                }
                None => {
                    r.push(OP_REMOVE);
                    push_bytes(&mut r, k);
                }
            }
        }
        let (header, payload) = r.split_at_mut(HEADER_BYTES);
        let len = (payload.len() as u32).to_le_bytes();
        let crc = record_crc(generation, payload).to_le_bytes();
        header[..4].copy_from_slice(&len);
        header[4..8].copy_from_slice(&crc);
        r
    }
}

fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn record_crc(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Where a record ends: what a position marker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordEnd {
    pub generation: u64,
    pub offset: u64,
}

impl RecordEnd {
    const BYTES: usize = 16;

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.generation.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    /// `None` for bytes that are not a marker.
    pub(crate) fn decode(bytes: &[u8]) -> Option<RecordEnd> {
        let generation = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let offset = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        (bytes.len() == Self::BYTES).then_some(RecordEnd { generation, offset })
    }
}

/// The open write-ahead file and where the next record goes.
pub(crate) struct Wal {
    file: File,
    /// Where the next record is written.
    offset: u64,
    /// The generation records are written in (the one sled holds in `0walgen`).
    pub(crate) generation: u64,
    /// Past this many bytes the store checkpoints before appending.
    capacity: u64,
}

impl Wal {
    /// Open (creating, and preallocating `capacity` bytes of zeros if asked) the file in `dir`.
    pub(crate) fn open(
        dir: &Path,
        generation: u64,
        capacity: u64,
        preallocate: bool,
    ) -> io::Result<Wal> {
        let path = dir.join(WAL_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        if preallocate && len < capacity {
            // Real zero blocks, not a sparse hole: later overwrites then change no file
            // metadata, so their `fdatasync` is one device flush.
            let zeros = vec![0u8; 1 << 20];
            let mut at = len;
            while at < capacity {
                let n = (capacity - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_all()?;
        }
        Ok(Wal {
            file,
            offset: 0,
            generation,
            capacity,
        })
    }

    /// Whether appending `batch` would pass the capacity (and something is already written).
    /// (`extra`: bytes the batch will gain, as a position marker, before it is appended.)
    pub(crate) fn needs_checkpoint(&self, batch: &WriteBatch, extra: usize) -> bool {
        self.offset > 0
            && self.offset + (HEADER_BYTES + batch.payload_len() + extra) as u64 > self.capacity
    }

    /// Add to `batch`, as its last write, the marker `marker_key` = this record's position
    /// ([`RecordEnd`]), then append it.
    pub(crate) fn append_marked(
        &mut self,
        batch: &mut WriteBatch,
        marker_key: &[u8],
    ) -> io::Result<()> {
        batch.insert(marker_key, [0u8; RecordEnd::BYTES]);
        let end = RecordEnd {
            generation: self.generation,
            offset: self.offset + (HEADER_BYTES + batch.payload_len()) as u64,
        };
        if let Some((_, Some(v))) = batch.ops.last_mut() {
            *v = IVec::from(&end.encode()[..]);
        }
        self.append(batch)
    }

    /// The space [`Wal::append_marked`] adds to a batch with this marker key.
    pub(crate) fn marker_len(marker_key: &[u8]) -> usize {
        5 + marker_key.len() + 4 + RecordEnd::BYTES
    }

    /// Append `batch` as a record of the current generation (in the OS page cache on return).
    pub(crate) fn append(&mut self, batch: &WriteBatch) -> io::Result<()> {
        let record = batch.record(self.generation);
        self.file.write_all_at(&record, self.offset)?;
        self.offset += record.len() as u64;
        Ok(())
    }

    /// Where the next record goes.
    #[cfg(test)]
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Start over at offset 0 in `generation` (after sled durably holds everything written).
    pub(crate) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.offset = 0;
    }

    /// A second handle on the file, to `fdatasync` it (`Store::sync`).
    pub(crate) fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// The batches of the current generation, in order, up to the first record that is torn,
    /// fails its CRC or belongs to another generation — or none, when `held` (the last record
    /// sled holds) lies past the last of them: sled is then ahead of the file (a power loss
    /// took records sled's own writes had kept), and replaying older records would write over
    /// newer values. Otherwise every record is replayed, as a crash may have left sled behind
    /// anywhere in them (sled's log is not always a clean prefix after a power loss).
    pub(crate) fn replay(&self, held: Option<RecordEnd>) -> Result<Vec<WriteBatch>, StoreError> {
        let len = self.file.metadata()?.len();
        let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| corrupt("wal too large"))?];
        self.file.read_exact_at(&mut bytes, 0)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while let Some(header) = bytes.get(at..at + HEADER_BYTES) {
            let le32 = |r: std::ops::Range<usize>| {
                header
                    .get(r)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_le_bytes)
                    .unwrap_or(0)
            };
            let len = le32(0..4) as usize;
            let crc = le32(4..8);
            let generation = header
                .get(8..16)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            if len == 0 || generation != self.generation {
                break;
            }
            let Some(payload) = bytes.get(at + HEADER_BYTES..at + HEADER_BYTES + len) else {
                break; // torn at the end of the file
            };
            if record_crc(generation, payload) != crc {
                break;
            }
            out.push(decode_payload(payload)?);
            at += HEADER_BYTES + len;
        }
        // A marker past the end of the file itself is not one this file's records wrote.
        let sled_ahead = held.is_some_and(|h| {
            h.generation == self.generation && h.offset > at as u64 && h.offset <= len
        });
        if sled_ahead {
            tracing::warn!(
                records = out.len(),
                "sled holds batches the write-ahead file lost (a power loss?); not replaying it"
            );
            out.clear();
        }
        Ok(out)
    }
}

/// A payload whose CRC matched but that does not parse is damage (or a bug), not a torn write.
fn decode_payload(mut p: &[u8]) -> Result<WriteBatch, StoreError> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
        if p.len() < n {
            return Err(corrupt("a write-ahead record is cut short"));
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Ok(head)
    }
    fn take_bytes<'a>(p: &mut &'a [u8]) -> Result<&'a [u8], StoreError> {
        let len = take(p, 4)?;
        let len = <[u8; 4]>::try_from(len)
            .map(u32::from_le_bytes)
            .unwrap_or(0) as usize;
        take(p, len)
    }
    let mut batch = WriteBatch::default();
    while !p.is_empty() {
        let op = take(&mut p, 1)?;
        match op.first() {
            Some(&OP_INSERT) => {
                let key = take_bytes(&mut p)?;
                let value = take_bytes(&mut p)?;
                batch.insert(key, value);
            }
            Some(&OP_REMOVE) => {
                let key = take_bytes(&mut p)?;
                batch.remove(key);
            }
            _ => return Err(corrupt("a write-ahead record holds an unknown operation")),
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u8) -> WriteBatch {
        let mut b = WriteBatch::default();
        b.insert([n], [n, n]);
        b.remove([n + 100]);
        b
    }

    #[test]
    fn replays_the_current_generation_up_to_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 7, 4096, true).unwrap();
        for n in 0..3 {
            wal.append(&batch(n)).unwrap();
        }
        assert_eq!(wal.replay(None).unwrap().len(), 3);
        // Tear the third record: the replay keeps the first two.
        let third = wal.offset - 1;
        wal.file.write_all_at(&[0xff], third).unwrap();
        assert_eq!(wal.replay(None).unwrap().len(), 2);
        // A new generation from offset 0 hides every older record behind its last one.
        wal.restart(8);
        wal.append(&batch(9)).unwrap();
        assert_eq!(wal.replay(None).unwrap().len(), 1);
        // Another generation sees nothing of generation 8.
        let other = Wal::open(dir.path(), 9, 4096, true).unwrap();
        assert!(other.replay(None).unwrap().is_empty());
    }

    /// sled's position marker stops the replay only when sled is ahead of the file.
    #[test]
    fn a_marker_past_the_last_record_means_sled_is_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 3, 4096, true).unwrap();
        let mut ends = Vec::new();
        for n in 0..2 {
            let mut b = batch(n);
            wal.append_marked(&mut b, b"0walpos").unwrap();
            ends.push(wal.offset);
        }
        let at = |generation, offset| Some(RecordEnd { generation, offset });
        // sled holds the first record, or both: replay both (it may lack parts of either).
        assert_eq!(wal.replay(at(3, ends[0])).unwrap().len(), 2);
        assert_eq!(wal.replay(at(3, ends[1])).unwrap().len(), 2);
        // sled holds a record past the file's last: replay nothing.
        assert!(wal.replay(at(3, ends[1] + 40)).unwrap().is_empty());
        // Not a marker of this file: another generation, or past the file's end.
        assert_eq!(wal.replay(at(2, ends[1] + 40)).unwrap().len(), 2);
        assert_eq!(wal.replay(at(3, 1 << 40)).unwrap().len(), 2);
    }

    #[test]
    fn a_valid_crc_over_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1, 4096, false).unwrap();
        let payload = [9u8, 1, 2];
        let mut r = Vec::new();
        r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        r.extend_from_slice(&record_crc(1, &payload).to_le_bytes());
        r.extend_from_slice(&1u64.to_le_bytes());
        r.extend_from_slice(&payload);
        wal.file.write_all_at(&r, 0).unwrap();
        wal.offset = r.len() as u64;
        assert!(matches!(wal.replay(None), Err(StoreError::Corrupt(_))));
    }
}
