//! The stored form of a log entry.
//!
//! Layout (all big-endian): table number (2) | row id (16) | actor (16) | change hash (32) |
//! automerge change bytes (rest). The sequence number is the key.

use uuid::Uuid;

use crate::options::ActorId;

/// A log entry as stored under `L` + seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredEntry {
    pub table: u16,
    pub row: Uuid,
    pub actor: ActorId,
    pub hash: [u8; 32],
    pub change: Vec<u8>,
}

const HEADER: usize = 2 + 16 + 16 + 32;

impl StoredEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.change.len());
        v.extend_from_slice(&self.table.to_be_bytes());
        v.extend_from_slice(self.row.as_bytes());
        v.extend_from_slice(&self.actor.0);
        v.extend_from_slice(&self.hash);
        v.extend_from_slice(&self.change);
        v
    }

    pub fn decode(bytes: &[u8]) -> Option<StoredEntry> {
        if bytes.len() < HEADER {
            return None;
        }
        Some(StoredEntry {
            table: u16::from_be_bytes([bytes[0], bytes[1]]),
            row: Uuid::from_slice(&bytes[2..18]).ok()?,
            actor: ActorId(bytes[18..34].try_into().ok()?),
            hash: bytes[34..66].try_into().ok()?,
            change: bytes[66..].to_vec(),
        })
    }
}
