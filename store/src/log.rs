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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::CrdtState;
    use crate::value::{OwnerKind, OwnerRef, Value};

    /// The log format is frozen by a golden file: a change here needs a format version bump
    /// (`FORMAT_VERSION`) and a new golden file. Regenerate with `GOLDEN_WRITE=1`.
    #[test]
    fn log_entry_format_is_frozen() {
        let schema = crate::Schema::from_toml(
            "[tables.account.columns]\nname = \"text\"\nnumberofemployees = \"integer\"",
        )
        .unwrap();
        let table = schema.table("account").unwrap();
        let col = |n: &str| table.column_index(n).unwrap() as u16;
        let puts = [
            (col("name"), Value::Text("Contoso".into())),
            (col("numberofemployees"), Value::Integer(42)),
            (
                col("ownerid"),
                Value::Owner(OwnerRef {
                    kind: OwnerKind::Team,
                    id: Uuid::from_u128(7),
                }),
            ),
        ];
        let actor = ActorId([0xab; 16]);
        let (bytes, change) =
            CrdtState::default().local_change(table, actor, 1_790_000_000_000, &puts);
        let entry = StoredEntry {
            table: 0,
            row: Uuid::from_u128(0x1234),
            actor,
            hash: change.hash,
            change: bytes,
        };
        let encoded = hex::encode(entry.encode());
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/log_entry_v1.hex");
        if std::env::var("GOLDEN_WRITE").is_ok() {
            std::fs::write(path, &encoded).unwrap();
        }
        let golden = std::fs::read_to_string(path).unwrap();
        assert_eq!(encoded, golden.trim(), "the log entry format changed");
        assert_eq!(StoredEntry::decode(&entry.encode()), Some(entry));
        assert_eq!(StoredEntry::decode(&[1, 2, 3]), None);
    }
}
