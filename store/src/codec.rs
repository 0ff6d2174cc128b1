//! Byte encodings: values in automerge documents, sled keys, and order-preserving index keys.

use std::cmp::Ordering;

use automerge::ScalarValue;
use uuid::Uuid;

use crate::schema::ColumnType;
use crate::value::{BlobRef, OwnerKind, OwnerRef, Value};

/// Tags of the typed byte encodings (first byte of a `ScalarValue::Bytes`).
const TAG_LOOKUP: u8 = 1;
const TAG_OWNER: u8 = 2;
const TAG_BLOB: u8 = 3;

/// A value as it is stored in a row document. `Null` is not stored: it is a delete of the key.
///
/// text, memo → `Str`; integer → `Int`; decimal → `Str` (its exact decimal text); float → `F64`;
/// boolean → `Boolean`; datetime → `Timestamp` (ms); choice → `Int`; lookup → `Bytes`
/// `[1, uuid(16)]`; owner → `Bytes` `[2, kind(0 user, 1 team), uuid(16)]`; file, image →
/// `Bytes` `[3, sha256(32), size(8, big-endian), name(utf-8)]`.
pub(crate) fn to_scalar(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => return None,
        Value::Text(s) | Value::Memo(s) => ScalarValue::Str(s.as_str().into()),
        Value::Integer(i) => ScalarValue::Int(*i),
        Value::Decimal(d) => ScalarValue::Str(d.to_string().as_str().into()),
        Value::Float(f) => ScalarValue::F64(*f),
        Value::Boolean(b) => ScalarValue::Boolean(*b),
        Value::DateTime(ms) => ScalarValue::Timestamp(*ms),
        Value::Choice(c) => ScalarValue::Int(i64::from(*c)),
        Value::Lookup(id) => {
            let mut b = Vec::with_capacity(17);
            b.push(TAG_LOOKUP);
            b.extend_from_slice(id.as_bytes());
            ScalarValue::Bytes(b)
        }
        Value::Owner(o) => {
            let mut b = Vec::with_capacity(18);
            b.push(TAG_OWNER);
            b.push(match o.kind {
                OwnerKind::User => 0,
                OwnerKind::Team => 1,
            });
            b.extend_from_slice(o.id.as_bytes());
            ScalarValue::Bytes(b)
        }
        Value::File(r) | Value::Image(r) => {
            let mut b = Vec::with_capacity(41 + r.name.len());
            b.push(TAG_BLOB);
            b.extend_from_slice(&r.sha256);
            b.extend_from_slice(&r.size.to_be_bytes());
            b.extend_from_slice(r.name.as_bytes());
            ScalarValue::Bytes(b)
        }
    })
}

/// Read a stored value back for a column of type `ty`; `None` if it does not fit the type.
pub(crate) fn from_scalar(ty: ColumnType, scalar: &ScalarValue) -> Option<Value> {
    Some(match (ty, scalar) {
        (_, ScalarValue::Null) => Value::Null,
        (ColumnType::Text, ScalarValue::Str(s)) => Value::Text(s.to_string()),
        (ColumnType::Memo, ScalarValue::Str(s)) => Value::Memo(s.to_string()),
        (ColumnType::Integer, ScalarValue::Int(i)) => Value::Integer(*i),
        (ColumnType::Decimal, ScalarValue::Str(s)) => Value::Decimal(s.parse().ok()?),
        (ColumnType::Float, ScalarValue::F64(f)) if f.is_finite() => Value::Float(*f),
        (ColumnType::Boolean, ScalarValue::Boolean(b)) => Value::Boolean(*b),
        (ColumnType::DateTime, ScalarValue::Timestamp(ms)) => Value::DateTime(*ms),
        (ColumnType::Choice, ScalarValue::Int(i)) => Value::Choice(i32::try_from(*i).ok()?),
        (ColumnType::Lookup, ScalarValue::Bytes(b)) if b.len() == 17 && b[0] == TAG_LOOKUP => {
            Value::Lookup(Uuid::from_slice(&b[1..]).ok()?)
        }
        (ColumnType::Owner, ScalarValue::Bytes(b)) if b.len() == 18 && b[0] == TAG_OWNER => {
            let kind = match b[1] {
                0 => OwnerKind::User,
                1 => OwnerKind::Team,
                _ => return None,
            };
            Value::Owner(OwnerRef {
                kind,
                id: Uuid::from_slice(&b[2..]).ok()?,
            })
        }
        (ColumnType::File | ColumnType::Image, ScalarValue::Bytes(b))
            if b.len() >= 41 && b[0] == TAG_BLOB =>
        {
            let sha256: [u8; 32] = b[1..33].try_into().ok()?;
            let size = u64::from_be_bytes(b[33..41].try_into().ok()?);
            let name = String::from_utf8(b[41..].to_vec()).ok()?;
            let r = BlobRef { sha256, size, name };
            if ty == ColumnType::File {
                Value::File(r)
            } else {
                Value::Image(r)
            }
        }
        _ => return None,
    })
}

/// Order two values of one column: nulls first, then by the type's natural order
/// (floats by `total_cmp`).
pub(crate) fn cmp_values(a: &Value, b: &Value) -> Ordering {
    use Value as V;
    match (a, b) {
        (V::Null, V::Null) => Ordering::Equal,
        (V::Null, _) => Ordering::Less,
        (_, V::Null) => Ordering::Greater,
        (V::Text(x) | V::Memo(x), V::Text(y) | V::Memo(y)) => x.cmp(y),
        (V::Integer(x), V::Integer(y)) => x.cmp(y),
        (V::Decimal(x), V::Decimal(y)) => x.cmp(y),
        (V::Float(x), V::Float(y)) => x.total_cmp(y),
        (V::Boolean(x), V::Boolean(y)) => x.cmp(y),
        (V::DateTime(x), V::DateTime(y)) => x.cmp(y),
        (V::Choice(x), V::Choice(y)) => x.cmp(y),
        (V::Lookup(x), V::Lookup(y)) => x.cmp(y),
        (V::Owner(x), V::Owner(y)) => x.cmp(y),
        (V::File(x) | V::Image(x), V::File(y) | V::Image(y)) => x.cmp(y),
        _ => a.type_name().cmp(b.type_name()),
    }
}

/// The order-preserving byte encoding of an indexed value (choice, lookup, owner, and the
/// other fixed-width types should more columns be indexed). `None` for values that are not
/// indexed (null, text, ...).
pub(crate) fn index_value(value: &Value) -> Option<Vec<u8>> {
    Some(match value {
        Value::Choice(c) => ((*c as u32) ^ 0x8000_0000).to_be_bytes().to_vec(),
        Value::Integer(i) | Value::DateTime(i) => ((*i as u64) ^ (1 << 63)).to_be_bytes().to_vec(),
        Value::Boolean(b) => vec![u8::from(*b)],
        Value::Lookup(id) => id.as_bytes().to_vec(),
        Value::Owner(o) => {
            let mut v = Vec::with_capacity(17);
            v.push(match o.kind {
                OwnerKind::User => 0,
                OwnerKind::Team => 1,
            });
            v.extend_from_slice(o.id.as_bytes());
            v
        }
        _ => return None,
    })
}

/// Key-space prefixes of the single sled tree. See `docs/storage.md` for the layout.
pub(crate) mod keys {
    use uuid::Uuid;

    /// Meta keys: `0` + name.
    pub const META: u8 = b'0';
    /// Log: `L` + seq (u64 BE) → [`crate::log::StoredEntry`].
    pub const LOG: u8 = b'L';
    /// Rows: `R` + table (u16 BE) + row id → [`crate::row::CrdtState`] (the materialized
    /// row is its visible winners).
    pub const ROW: u8 = b'R';
    /// Compacted automerge document of a row: `D` + table + row id → `save()` bytes.
    pub const DOC: u8 = b'D';
    /// Secondary index: `I` + table + column (u16 BE) + value encoding + row id → empty.
    pub const INDEX: u8 = b'I';
    /// Held remote changes waiting for their deps: `H` + table + row id + hash → change.
    pub const HELD: u8 = b'H';
    /// Blob headers: `b` + sha256 → [`crate::blob::BlobHeader`].
    pub const BLOB: u8 = b'b';
    /// Blob chunks: `c` + sha256 of the chunk → bytes.
    pub const CHUNK: u8 = b'c';

    pub fn meta(name: &str) -> Vec<u8> {
        let mut k = vec![META];
        k.extend_from_slice(name.as_bytes());
        k
    }

    pub fn log(seq: u64) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = LOG;
        k[1..].copy_from_slice(&seq.to_be_bytes());
        k
    }

    pub fn log_seq(key: &[u8]) -> Option<u64> {
        if key.len() == 9 && key[0] == LOG {
            Some(u64::from_be_bytes(key[1..9].try_into().ok()?))
        } else {
            None
        }
    }

    pub fn row_key(prefix: u8, table: u16, id: Uuid) -> [u8; 19] {
        let mut k = [0u8; 19];
        k[0] = prefix;
        k[1..3].copy_from_slice(&table.to_be_bytes());
        k[3..19].copy_from_slice(id.as_bytes());
        k
    }

    pub fn table_prefix(prefix: u8, table: u16) -> [u8; 3] {
        let t = table.to_be_bytes();
        [prefix, t[0], t[1]]
    }

    /// (table, row id) of a 19-byte row key.
    pub fn parse_row_key(key: &[u8]) -> Option<(u16, Uuid)> {
        if key.len() < 19 {
            return None;
        }
        let t = u16::from_be_bytes([key[1], key[2]]);
        Some((t, Uuid::from_slice(&key[3..19]).ok()?))
    }

    pub fn index_prefix(table: u16, column: u16) -> Vec<u8> {
        let mut k = Vec::with_capacity(48);
        k.push(INDEX);
        k.extend_from_slice(&table.to_be_bytes());
        k.extend_from_slice(&column.to_be_bytes());
        k
    }

    pub fn index(table: u16, column: u16, value: &[u8], id: Uuid) -> Vec<u8> {
        let mut k = index_prefix(table, column);
        k.extend_from_slice(value);
        k.extend_from_slice(id.as_bytes());
        k
    }

    /// The row id at the end of an index key.
    pub fn index_row(key: &[u8]) -> Option<Uuid> {
        if key.len() < 21 {
            return None;
        }
        Uuid::from_slice(&key[key.len() - 16..]).ok()
    }

    pub fn held(table: u16, id: Uuid, hash: &[u8; 32]) -> Vec<u8> {
        let mut k = row_key(HELD, table, id).to_vec();
        k.extend_from_slice(hash);
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_automerge() {
        let id = Uuid::new_v4();
        let blob = BlobRef {
            sha256: [7; 32],
            size: 1234,
            name: "photo é.jpg".into(),
        };
        let cases = [
            (ColumnType::Text, Value::Text("héllo".into())),
            (ColumnType::Memo, Value::Memo("line1\nline2".into())),
            (ColumnType::Integer, Value::Integer(i64::MIN)),
            (
                ColumnType::Decimal,
                Value::Decimal("-12.5000".parse().unwrap()),
            ),
            (ColumnType::Float, Value::Float(-0.125)),
            (ColumnType::Boolean, Value::Boolean(true)),
            (ColumnType::DateTime, Value::DateTime(1_790_000_000_123)),
            (ColumnType::Choice, Value::Choice(690_970_003)),
            (ColumnType::Lookup, Value::Lookup(id)),
            (
                ColumnType::Owner,
                Value::Owner(OwnerRef {
                    kind: OwnerKind::Team,
                    id,
                }),
            ),
            (ColumnType::File, Value::File(blob.clone())),
            (ColumnType::Image, Value::Image(blob)),
        ];
        for (ty, v) in cases {
            // Through a real automerge document, saved and loaded.
            use automerge::transaction::Transactable;
            use automerge::ReadDoc;
            let mut doc = automerge::AutoCommit::new();
            doc.put(automerge::ROOT, "c", to_scalar(&v).unwrap())
                .unwrap();
            let saved = doc.save();
            let loaded = automerge::AutoCommit::load(&saved).unwrap();
            let (got, _) = loaded.get(automerge::ROOT, "c").unwrap().unwrap();
            let scalar = got.as_scalar().unwrap().clone();
            let back = from_scalar(ty, &scalar).unwrap();
            assert_eq!(back, v, "{ty}");
            if let Value::Decimal(d) = (&back, &v).0 {
                assert_eq!(d.to_string(), "-12.5000", "decimal scale is kept");
            }
        }
        assert_eq!(to_scalar(&Value::Null), None);
        assert_eq!(
            from_scalar(ColumnType::Integer, &ScalarValue::Str("x".into())),
            None
        );
        assert_eq!(
            from_scalar(ColumnType::Lookup, &ScalarValue::Bytes(vec![9; 17])),
            None
        );
    }

    #[test]
    fn index_encoding_preserves_order() {
        let choices = [-5, -1, 0, 1, 690_970_000];
        for w in choices.windows(2) {
            assert!(index_value(&Value::Choice(w[0])) < index_value(&Value::Choice(w[1])));
        }
        let ints = [i64::MIN, -1, 0, 1, i64::MAX];
        for w in ints.windows(2) {
            assert!(index_value(&Value::Integer(w[0])) < index_value(&Value::Integer(w[1])));
        }
    }
}
