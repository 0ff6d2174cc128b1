//! One row as a CRDT: the automerge map semantics of a row document, kept as compact state.
//!
//! A row document is an automerge document whose root map holds one scalar per column (and
//! `__deleted` once the row is deleted). Writing and merging rows does not load automerge
//! documents: [`CrdtState`] keeps, per key, the set of visible ops (op id + value) exactly as
//! automerge does for a map key — a put or delete removes the ops named in its `pred` and a put
//! adds itself; the visible op with the highest op id (counter, then actor bytes) wins. Local
//! changes are encoded with automerge's own change encoder ([`automerge::Change`] from an
//! [`automerge::ExpandedChange`]), so every log entry is a genuine automerge change, and
//! `Store::check` compares this state against real automerge documents built from the log.

use std::num::NonZeroU64;

use automerge::{legacy, ExpandedChange};
use serde::{Deserialize, Serialize};

use crate::codec::{from_scalar, to_scalar};
use crate::options::ActorId;
use crate::schema::{ColumnType, Table};
use crate::value::Value;

/// The document key that marks a deleted row (a tombstone that replicates like any edit).
pub const DELETED_KEY: &str = "__deleted";
/// The column number used for [`DELETED_KEY`] in [`CrdtState`].
pub(crate) const DELETED_COL: u16 = u16::MAX;
/// Columns that every local write sets, so concurrent values in them are not reported as
/// conflicts.
pub(crate) const UNREPORTED_CONFLICT_COLUMNS: [&str; 1] = ["modifiedon"];

/// What queries read: the winning value of every non-null column.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub(crate) struct MatRow {
    /// The row has a `__deleted` tombstone.
    pub deleted: bool,
    /// Some column (other than `modifiedon`) holds concurrent values.
    pub has_conflicts: bool,
    /// (column number, winning value), by column number; nulls are absent.
    pub values: Vec<(u16, Value)>,
}

/// A visible op on one key: its id and value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LiveOp {
    /// The op counter.
    pub counter: u64,
    /// Index into [`CrdtState::actors`].
    pub actor: u16,
    /// The value it put.
    pub value: Value,
}

/// The visible ops of one key, in op id order (the winner last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct KeyOps {
    /// Column number, or [`DELETED_COL`].
    pub col: u16,
    /// Visible ops, ascending op id.
    pub ops: Vec<LiveOp>,
}

/// Everything needed to write and merge a row without loading its automerge document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub(crate) struct CrdtState {
    /// The row has a `__deleted` tombstone. First, so that [`peek_deleted`] can read it from
    /// the encoded bytes without decoding the rest.
    pub deleted: bool,
    /// Actors that appear in the row's history.
    #[serde(with = "flat")]
    pub actors: Vec<[u8; 16]>,
    /// Per actor (same index): the seq of its last change to this row.
    pub clock: Vec<u64>,
    /// The document's heads (deps of the next local change), sorted.
    #[serde(with = "flat")]
    pub heads: Vec<[u8; 32]>,
    /// Every change applied to the row, sorted (duplicate and dependency checks).
    #[serde(with = "flat")]
    pub hashes: Vec<[u8; 32]>,
    /// The highest op counter in the document.
    pub max_op: u64,
    /// Log sequence numbers of this row's changes that are not folded into its compacted
    /// document yet, ascending.
    pub pending: Vec<u64>,
    /// Whether a compacted document (`D` key) exists for the row.
    pub has_base: bool,
    /// Visible ops per key, by column number.
    pub keys: Vec<KeyOps>,
}

/// One op of a change, validated against the table.
#[derive(Debug, Clone)]
pub(crate) struct RowOp {
    pub col: u16,
    /// (counter, actor bytes) of the ops this one overwrites.
    pub pred: Vec<(u64, [u8; 16])>,
    /// `Some` for a put, `None` for a delete of the key.
    pub value: Option<Value>,
}

/// A change reduced to what the row CRDT needs.
#[derive(Debug, Clone)]
pub(crate) struct RowChange {
    pub actor: ActorId,
    pub seq: u64,
    pub start_op: u64,
    pub deps: Vec<[u8; 32]>,
    pub hash: [u8; 32],
    pub ops: Vec<RowOp>,
}

/// The type of a document key of a table.
fn key_type(table: &Table, col: u16) -> Option<ColumnType> {
    if col == DELETED_COL {
        Some(ColumnType::Boolean)
    } else {
        table.columns.get(usize::from(col)).map(|c| c.ty)
    }
}

/// The column number of a document key.
pub(crate) fn key_col(table: &Table, key: &str) -> Option<u16> {
    if key == DELETED_KEY {
        return Some(DELETED_COL);
    }
    table
        .column_index(key)
        .and_then(|i| u16::try_from(i).ok())
        .filter(|&i| i != DELETED_COL)
}

fn key_name(table: &Table, col: u16) -> &str {
    if col == DELETED_COL {
        DELETED_KEY
    } else {
        table
            .columns
            .get(usize::from(col))
            .map_or("?", |c| c.name.as_str())
    }
}

/// Reduce a decoded automerge change to a [`RowChange`], refusing anything a fieldsync row
/// document may not contain.
pub(crate) fn row_change(
    table: &Table,
    change: &ExpandedChange,
    hash: [u8; 32],
) -> Result<RowChange, String> {
    let actor = ActorId::from_automerge(&change.actor_id)
        .ok_or_else(|| "the change's actor id is not 16 bytes".to_string())?;
    let mut ops = Vec::with_capacity(change.operations.len());
    for op in &change.operations {
        if op.obj != legacy::ObjectId::Root || op.insert {
            return Err("only root map keys may be written".into());
        }
        let legacy::Key::Map(key) = &op.key else {
            return Err("only root map keys may be written".into());
        };
        let col = key_col(table, key)
            .ok_or_else(|| format!("unknown column `{key}` in table `{}`", table.name))?;
        let mut pred = Vec::with_capacity(op.pred.len());
        for p in op.pred.iter() {
            let a = ActorId::from_automerge(p.actor())
                .ok_or_else(|| "a pred's actor id is not 16 bytes".to_string())?;
            pred.push((p.counter(), a.0));
        }
        let value = match &op.action {
            legacy::OpType::Put(s) => {
                let ty = key_type(table, col).ok_or("unknown column")?;
                let v = from_scalar(ty, s)
                    .ok_or_else(|| format!("`{key}` holds {s:?}, not a {ty} value"))?;
                if col == DELETED_COL && v != Value::Boolean(true) {
                    return Err("`__deleted` may only be set to true".into());
                }
                if let (Value::Choice(c), Some(column)) = (&v, table.columns.get(usize::from(col)))
                {
                    if !column.options.is_empty() && !column.options.contains(c) {
                        return Err(format!("{c} is not an option of `{key}`"));
                    }
                }
                Some(v)
            }
            legacy::OpType::Delete if !op.pred.is_empty() => None,
            legacy::OpType::Delete => return Err("a delete that overwrites nothing".into()),
            other => return Err(format!("op {other:?} is not allowed in a row document")),
        };
        ops.push(RowOp { col, pred, value });
    }
    Ok(RowChange {
        actor,
        seq: change.seq,
        start_op: change.start_op.get(),
        deps: change.deps.iter().map(|d| d.0).collect(),
        hash,
        ops,
    })
}

impl CrdtState {
    /// Whether the change with this hash has been applied.
    pub fn has_change(&self, hash: &[u8; 32]) -> bool {
        self.hashes.binary_search(hash).is_ok()
    }

    /// The seq of `actor`'s last change to this row (0: none).
    pub fn actor_seq(&self, actor: &ActorId) -> u64 {
        self.actors
            .iter()
            .position(|a| *a == actor.0)
            .and_then(|i| self.clock.get(i).copied())
            .unwrap_or(0)
    }

    /// Whether a change can be applied now: its deps are all applied and it is its actor's
    /// next change.
    pub fn ready(&self, change: &RowChange) -> bool {
        change.deps.iter().all(|d| self.has_change(d))
            && self.actor_seq(&change.actor) + 1 == change.seq
    }

    fn actor_index(&mut self, actor: [u8; 16]) -> u16 {
        if let Some(i) = self.actors.iter().position(|a| *a == actor) {
            return i as u16;
        }
        self.actors.push(actor);
        self.clock.push(0);
        (self.actors.len() - 1) as u16
    }

    fn op_key(&self, op: &LiveOp) -> (u64, [u8; 16]) {
        (
            op.counter,
            self.actors
                .get(usize::from(op.actor))
                .copied()
                .unwrap_or_default(),
        )
    }

    /// Apply a ready change (see [`CrdtState::ready`]).
    pub fn apply(&mut self, change: &RowChange) {
        let actor = self.actor_index(change.actor.0);
        for (i, op) in change.ops.iter().enumerate() {
            let counter = change.start_op + i as u64;
            let pos = match self.keys.binary_search_by_key(&op.col, |k| k.col) {
                Ok(p) => p,
                Err(p) => {
                    self.keys.insert(
                        p,
                        KeyOps {
                            col: op.col,
                            ops: Vec::new(),
                        },
                    );
                    p
                }
            };
            let actors = &self.actors;
            let key = &mut self.keys[pos];
            key.ops.retain(|live| {
                let id = (
                    live.counter,
                    actors
                        .get(usize::from(live.actor))
                        .copied()
                        .unwrap_or_default(),
                );
                !op.pred.contains(&id)
            });
            if let Some(v) = &op.value {
                key.ops.push(LiveOp {
                    counter,
                    actor,
                    value: v.clone(),
                });
            }
            let mut ops = std::mem::take(&mut self.keys[pos].ops);
            ops.sort_by_key(|o| self.op_key(o));
            if ops.is_empty() {
                self.keys.remove(pos);
            } else {
                self.keys[pos].ops = ops;
            }
        }
        self.deleted = self.keys.iter().any(|k| k.col == DELETED_COL);
        let n = change.ops.len() as u64;
        if n > 0 {
            self.max_op = self.max_op.max(change.start_op + n - 1);
        }
        if let Some(c) = self.clock.get_mut(usize::from(actor)) {
            *c = (*c).max(change.seq);
        }
        self.heads.retain(|h| !change.deps.contains(h));
        if let Err(p) = self.heads.binary_search(&change.hash) {
            self.heads.insert(p, change.hash);
        }
        if let Err(p) = self.hashes.binary_search(&change.hash) {
            self.hashes.insert(p, change.hash);
        }
    }

    /// The materialized row: the winner of every column.
    pub fn materialize(&self, table: &Table) -> MatRow {
        let mut values = Vec::with_capacity(self.keys.len());
        let mut has_conflicts = false;
        let mut deleted = false;
        for k in &self.keys {
            if k.col == DELETED_COL {
                deleted = true;
                continue;
            }
            if k.ops.len() > 1 && !UNREPORTED_CONFLICT_COLUMNS.contains(&key_name(table, k.col)) {
                has_conflicts = true;
            }
            if let Some(w) = k.ops.last() {
                if !w.value.is_null() {
                    values.push((k.col, w.value.clone()));
                }
            }
        }
        MatRow {
            deleted,
            has_conflicts,
            values,
        }
    }

    /// Every column holding concurrent values: (column, winner, [(value, actor)]).
    pub fn conflicts(&self, table: &Table) -> Vec<crate::ColumnConflict> {
        let mut out = Vec::new();
        for k in &self.keys {
            if k.col == DELETED_COL || k.ops.len() < 2 {
                continue;
            }
            let name = key_name(table, k.col);
            if UNREPORTED_CONFLICT_COLUMNS.contains(&name) {
                continue;
            }
            let values = k
                .ops
                .iter()
                .map(|o| {
                    let actor = self
                        .actors
                        .get(usize::from(o.actor))
                        .copied()
                        .unwrap_or_default();
                    (o.value.clone(), ActorId(actor))
                })
                .collect();
            out.push(crate::ColumnConflict {
                column: name.to_string(),
                winner: k.ops.last().map_or(Value::Null, |o| o.value.clone()),
                values,
            });
        }
        out
    }

    /// Build the next local change of `me` that sets `puts` (null = delete the key).
    ///
    /// Returns the change bytes and the reduced change (not yet applied).
    pub fn local_change(
        &self,
        table: &Table,
        me: ActorId,
        time_ms: i64,
        puts: &[(u16, Value)],
    ) -> (Vec<u8>, RowChange) {
        let actor_am = me.to_automerge();
        let start_op = self.max_op + 1;
        let mut operations = Vec::with_capacity(puts.len());
        let mut ops = Vec::with_capacity(puts.len());
        for (col, value) in puts {
            let (pred_am, pred): (Vec<legacy::OpId>, Vec<(u64, [u8; 16])>) = self
                .keys
                .binary_search_by_key(col, |k| k.col)
                .ok()
                .and_then(|p| self.keys.get(p))
                .map(|k| {
                    k.ops
                        .iter()
                        .map(|o| {
                            let (c, a) = self.op_key(o);
                            (legacy::OpId(c, automerge::ActorId::from(a)), (c, a))
                        })
                        .unzip()
                })
                .unwrap_or_default();
            let action = match to_scalar(value) {
                Some(s) => legacy::OpType::Put(s),
                // Clearing a column that holds nothing is no op at all (automerge drops a
                // delete without preds from saved documents).
                None if pred.is_empty() => continue,
                None => legacy::OpType::Delete,
            };
            operations.push(legacy::Op {
                action,
                obj: legacy::ObjectId::Root,
                key: legacy::Key::Map(key_name(table, *col).into()),
                pred: pred_am.into(),
                insert: false,
            });
            ops.push(RowOp {
                col: *col,
                pred,
                value: if value.is_null() {
                    None
                } else {
                    Some(value.clone())
                },
            });
        }
        let seq = self.actor_seq(&me) + 1;
        let expanded = ExpandedChange {
            operations,
            actor_id: actor_am,
            hash: None,
            seq,
            start_op: NonZeroU64::new(start_op).unwrap_or(NonZeroU64::MIN),
            time: time_ms,
            message: None,
            deps: self
                .heads
                .iter()
                .map(|h| automerge::ChangeHash(*h))
                .collect(),
            extra_bytes: Vec::new(),
            author: None,
        };
        let change = automerge::Change::from(expanded);
        let hash = change.hash().0;
        let bytes = change.raw_bytes().to_vec();
        (
            bytes,
            RowChange {
                actor: me,
                seq,
                start_op,
                deps: self.heads.clone(),
                hash,
                ops,
            },
        )
    }
}

/// Decode change bytes received from elsewhere. Never panics on garbage.
pub(crate) fn parse_change(bytes: &[u8]) -> Result<(ExpandedChange, [u8; 32]), String> {
    let result = std::panic::catch_unwind(|| {
        automerge::Change::try_from(bytes)
            .map(|c| (c.decode(), c.hash().0))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(r) => r,
        Err(_) => Err("the change bytes could not be decoded".into()),
    }
}

/// Whether an encoded [`CrdtState`] is a deleted row, reading only its first byte.
pub(crate) fn peek_deleted(encoded: &[u8]) -> Option<bool> {
    match encoded.first() {
        Some(0) => Some(false),
        Some(1) => Some(true),
        _ => None,
    }
}

/// Serde for `Vec<[u8; N]>` as one byte string (bincode encodes arrays element by element,
/// which is slow to decode for the hash lists of a row).
mod flat {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        v: &[[u8; N]],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let flat: Vec<u8> = v.iter().flat_map(|a| a.iter().copied()).collect();
        s.serialize_bytes(&flat)
    }

    struct Flat<const N: usize>;

    impl<const N: usize> Visitor<'_> for Flat<N> {
        type Value = Vec<[u8; N]>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a byte string of {N}-byte items")
        }
        fn visit_bytes<E: Error>(self, b: &[u8]) -> Result<Self::Value, E> {
            if !b.len().is_multiple_of(N) {
                return Err(E::custom("length is not a multiple of the item size"));
            }
            Ok(b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    a
                })
                .collect())
        }
        fn visit_byte_buf<E: Error>(self, b: Vec<u8>) -> Result<Self::Value, E> {
            self.visit_bytes(&b)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Vec<[u8; N]>, D::Error> {
        // `deserialize_bytes` borrows from the input: no intermediate buffer.
        d.deserialize_bytes(Flat::<N>)
    }
}

/// Decoding only what a [`MatRow`] needs from an encoded [`CrdtState`], without building the
/// state: the actor, head and hash lists are skipped in place, and of each key's visible ops
/// only the winner's value is kept. Same wire format as [`CrdtState`] (field order matters).
pub(crate) mod mat_view {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

    use super::{key_name, LiveOp, MatRow, DELETED_COL, UNREPORTED_CONFLICT_COLUMNS};
    use crate::schema::Table;
    use crate::value::Value;

    /// A byte string, skipped.
    struct SkipBytes;

    impl<'de> Deserialize<'de> for SkipBytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = SkipBytes;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: Error>(self, _: &[u8]) -> Result<SkipBytes, E> {
                    Ok(SkipBytes)
                }
            }
            d.deserialize_bytes(V)
        }
    }

    /// A sequence of `T`, read and dropped.
    struct SkipSeq<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for SkipSeq<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = SkipSeq<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a sequence")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<SkipSeq<T>, A::Error> {
                    while a.next_element::<T>()?.is_some() {}
                    Ok(SkipSeq(PhantomData))
                }
            }
            d.deserialize_seq(V(PhantomData))
        }
    }

    /// The visible ops of a key: how many, and the winner's value.
    struct Winner {
        count: usize,
        value: Option<Value>,
    }

    impl<'de> Deserialize<'de> for Winner {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Winner;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a sequence of ops")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Winner, A::Error> {
                    let mut w = Winner {
                        count: 0,
                        value: None,
                    };
                    while let Some(op) = a.next_element::<LiveOp>()? {
                        w.count += 1;
                        w.value = Some(op.value);
                    }
                    Ok(w)
                }
            }
            d.deserialize_seq(V)
        }
    }

    #[derive(serde::Deserialize)]
    struct KeyView {
        col: u16,
        ops: Winner,
    }

    /// Mirrors [`super::CrdtState`]'s fields, in order.
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct StateView {
        deleted: bool,
        actors: SkipBytes,
        clock: SkipSeq<u64>,
        heads: SkipBytes,
        hashes: SkipBytes,
        max_op: u64,
        pending: SkipSeq<u64>,
        has_base: bool,
        keys: Vec<KeyView>,
    }

    /// The [`MatRow`] of an encoded [`super::CrdtState`] (equal to decoding the state and
    /// calling [`super::CrdtState::materialize`]).
    pub(crate) fn decode(bytes: &[u8], table: &Table) -> Result<MatRow, String> {
        let (view, _): (StateView, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| e.to_string())?;
        let mut values = Vec::with_capacity(view.keys.len());
        let mut has_conflicts = false;
        let mut deleted = false;
        for k in view.keys {
            if k.col == DELETED_COL {
                deleted = true;
                continue;
            }
            if k.ops.count > 1 && !UNREPORTED_CONFLICT_COLUMNS.contains(&key_name(table, k.col)) {
                has_conflicts = true;
            }
            if let Some(v) = k.ops.value {
                if !v.is_null() {
                    values.push((k.col, v));
                }
            }
        }
        Ok(MatRow {
            deleted,
            has_conflicts,
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    #[test]
    fn mat_view_decodes_what_materialize_builds() {
        let schema =
            Schema::from_toml(include_str!("../../examples/field-service/schema.toml")).unwrap();
        let table = schema.table("msdyn_workorder").unwrap();
        let name = key_col(table, "msdyn_name").unwrap();
        let op = |counter, actor, value| LiveOp {
            counter,
            actor,
            value,
        };
        let mut state = CrdtState {
            actors: vec![[1; 16], [2; 16]],
            clock: vec![3, 1],
            heads: vec![[7; 32]],
            hashes: vec![[5; 32], [7; 32]],
            max_op: 4,
            pending: vec![1, 2, 9],
            has_base: true,
            keys: vec![KeyOps {
                col: name,
                ops: vec![
                    op(1, 0, Value::Text("a".into())),
                    op(2, 1, Value::Text("b".into())),
                ],
            }],
            ..CrdtState::default()
        };
        let check = |s: &CrdtState| {
            let got = mat_view::decode(&crate::store::encode(s), table).unwrap();
            assert_eq!(got, s.materialize(table));
        };
        check(&state);
        assert!(state.materialize(table).has_conflicts);
        state.keys[0].ops.remove(0);
        state.keys.push(KeyOps {
            col: DELETED_COL,
            ops: vec![op(4, 0, Value::Boolean(true))],
        });
        state.deleted = true;
        check(&state);
        check(&CrdtState::default());
        assert!(mat_view::decode(&[9, 9, 9], table).is_err());
    }
}
