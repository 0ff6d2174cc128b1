//! Views: filters on indexed columns (equality, range), sort, limit.

use std::cmp::Ordering;
use std::ops::Bound;

use tracing::debug_span;

use crate::api::Row;
use crate::codec::{cmp_values, index_value, keys};
use crate::error::{corrupt, StoreError};
use crate::row::MatRow;
use crate::schema::{SchemaError, Table};
use crate::store::{
    on_every_core, owner_state_prefix, worker_threads, Store, COMPOSITE_OWNER_STATE, OWNER_COLUMN,
    STATE_COLUMN,
};
use crate::value::{RowId, Value};

/// Sort direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Smallest first (nulls first).
    #[default]
    Asc,
    /// Largest first (nulls last).
    Desc,
}

/// One condition of a [`Query`].
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// The column equals the value (`Value::Null`: the column is empty).
    Eq(String, Value),
    /// The column lies within the bounds (nulls never match).
    Range(String, Bound<Value>, Bound<Value>),
}

/// A view over one table, built with a builder:
///
/// ```
/// # use fieldsync_store::{Query, Order, Value};
/// let me = fieldsync_store::OwnerRef { kind: fieldsync_store::OwnerKind::User, id: uuid::Uuid::nil() };
/// let q = Query::table("msdyn_workorder")
///     .eq("ownerid", Value::Owner(me))
///     .eq("statecode", Value::Choice(0))
///     .order_by("modifiedon", Order::Desc)
///     .limit(50);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The table's logical name.
    pub table: String,
    /// Every condition (all must hold).
    pub filters: Vec<Filter>,
    /// Sort column and direction (default: by row id).
    pub order: Option<(String, Order)>,
    /// At most this many rows.
    pub limit: Option<usize>,
}

/// How a query finds its candidate rows (see [`Store::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryPlan {
    /// A prefix scan of the (ownerid, statecode) index for one owner and one statecode.
    OwnerStateIndex,
    /// A prefix scan of the (ownerid, statecode) index for one owner, any statecode.
    OwnerStateIndexOwnerOnly,
    /// A prefix scan of one column's index for an equality.
    IndexEq {
        /// The indexed column.
        column: String,
    },
    /// A range scan of one column's index (for `ownerid`, of the owner part of the
    /// (ownerid, statecode) index).
    IndexRange {
        /// The indexed column.
        column: String,
    },
    /// A scan of every row of the table (no filter on an indexed column).
    TableScan,
}

impl Query {
    /// A query over every row of `table`.
    pub fn table(table: &str) -> Query {
        Query {
            table: table.to_string(),
            filters: Vec::new(),
            order: None,
            limit: None,
        }
    }

    /// Keep rows whose `column` equals `value`.
    pub fn eq(mut self, column: &str, value: Value) -> Query {
        self.filters.push(Filter::Eq(column.to_string(), value));
        self
    }

    /// Keep rows whose `column` lies between the bounds.
    pub fn range(mut self, column: &str, lower: Bound<Value>, upper: Bound<Value>) -> Query {
        self.filters
            .push(Filter::Range(column.to_string(), lower, upper));
        self
    }

    /// Sort by `column`.
    pub fn order_by(mut self, column: &str, order: Order) -> Query {
        self.order = Some((column.to_string(), order));
        self
    }

    /// Return at most `n` rows.
    pub fn limit(mut self, n: usize) -> Query {
        self.limit = Some(n);
        self
    }
}

fn col(table: &Table, name: &str) -> Result<u16, SchemaError> {
    table
        .column_index(name)
        .and_then(|i| u16::try_from(i).ok())
        .ok_or_else(|| SchemaError::UnknownColumn {
            table: table.name.clone(),
            column: name.to_string(),
        })
}

fn indexed(table: &Table, c: u16) -> bool {
    table
        .columns
        .get(usize::from(c))
        .is_some_and(|c| c.ty.is_indexed())
}

fn matches(mat: &MatRow, filters: &[(u16, &Filter)]) -> bool {
    filters.iter().all(|(c, f)| {
        let v = Store::mat_value(mat, *c);
        match f {
            Filter::Eq(_, want) => cmp_values(v, want) == Ordering::Equal,
            Filter::Range(_, lo, hi) => {
                if v.is_null() {
                    return false;
                }
                let above = match lo {
                    Bound::Included(b) => cmp_values(v, b) != Ordering::Less,
                    Bound::Excluded(b) => cmp_values(v, b) == Ordering::Greater,
                    Bound::Unbounded => true,
                };
                let below = match hi {
                    Bound::Included(b) => cmp_values(v, b) != Ordering::Greater,
                    Bound::Excluded(b) => cmp_values(v, b) == Ordering::Less,
                    Bound::Unbounded => true,
                };
                above && below
            }
        }
    })
}

enum Candidates {
    /// The index keys that start with the prefix and end right after it with a row id.
    Prefix(Vec<u8>),
    /// The composite (ownerid, statecode) keys of one owner (the prefix ends with the owner),
    /// with or without a statecode after it: its rows are read in row id order.
    OwnerPrefix(Vec<u8>),
    /// The index keys under the prefix whose value, cut to `value_len` bytes if given,
    /// lies within the bounds.
    Range {
        prefix: Vec<u8>,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        value_len: Option<usize>,
    },
    Table,
}

/// The bytes of an owner in index keys (kind + UUID), the first part of a composite key.
const OWNER_INDEX_BYTES: usize = 17;

impl Store {
    fn choose(
        &self,
        t: u16,
        table: &Table,
        query: &Query,
    ) -> Result<(QueryPlan, Candidates), StoreError> {
        let mut owner = None;
        let mut state = None;
        // The last equality on a column with an index of its own, or on the owner.
        let mut eq = None;
        let mut range = None;
        for f in &query.filters {
            match f {
                Filter::Eq(name, v) => {
                    let c = col(table, name)?;
                    table.check_value(name, v)?;
                    if !indexed(table, c) {
                        continue;
                    }
                    let Some(enc) = index_value(v) else { continue };
                    match name.as_str() {
                        OWNER_COLUMN => {
                            owner = Some(enc.clone());
                            eq = Some((name.clone(), c, enc));
                        }
                        STATE_COLUMN => state = Some(enc),
                        _ => eq = Some((name.clone(), c, enc)),
                    }
                }
                Filter::Range(name, lo, hi) => {
                    let c = col(table, name)?;
                    for b in [lo, hi] {
                        if let Bound::Included(v) | Bound::Excluded(v) = b {
                            table.check_value(name, v)?;
                        }
                    }
                    if range.is_none() && indexed(table, c) && name != STATE_COLUMN {
                        let enc = |b: &Bound<Value>| -> Option<Bound<Vec<u8>>> {
                            Some(match b {
                                Bound::Included(v) => Bound::Included(index_value(v)?),
                                Bound::Excluded(v) => Bound::Excluded(index_value(v)?),
                                Bound::Unbounded => Bound::Unbounded,
                            })
                        };
                        if let (Some(l), Some(h)) = (enc(lo), enc(hi)) {
                            range = Some((name.clone(), c, l, h));
                        }
                    }
                }
            }
        }
        if let (Some(o), Some(s)) = (&owner, &state) {
            return Ok((
                QueryPlan::OwnerStateIndex,
                Candidates::Prefix(owner_state_prefix(t, o, Some(s))),
            ));
        }
        if let Some((name, c, enc)) = eq {
            if name == OWNER_COLUMN {
                return Ok((
                    QueryPlan::OwnerStateIndexOwnerOnly,
                    Candidates::OwnerPrefix(owner_state_prefix(t, &enc, None)),
                ));
            }
            let mut p = keys::index_prefix(t, c);
            p.extend_from_slice(&enc);
            return Ok((QueryPlan::IndexEq { column: name }, Candidates::Prefix(p)));
        }
        if let Some((name, c, lo, hi)) = range {
            // The owner's range is the composite index's, on its owner part.
            let (index_column, value_len) = if name == OWNER_COLUMN {
                (COMPOSITE_OWNER_STATE, Some(OWNER_INDEX_BYTES))
            } else {
                (c, None)
            };
            return Ok((
                QueryPlan::IndexRange { column: name },
                Candidates::Range {
                    prefix: keys::index_prefix(t, index_column),
                    lo,
                    hi,
                    value_len,
                },
            ));
        }
        Ok((QueryPlan::TableScan, Candidates::Table))
    }

    /// The row of an index entry (a missing one is corruption: they are written together).
    fn indexed_row(&self, t: u16, id: RowId) -> Result<MatRow, StoreError> {
        self.load_mat(t, id)?
            .ok_or_else(|| corrupt(format!("index entry for missing row {id}")))
    }

    /// The row ids of the index keys under `prefix`: exactly a row id after it, or, with
    /// `any_rest`, a row id at the end of whatever follows it.
    fn index_ids(&self, prefix: &[u8], any_rest: bool) -> Result<Vec<RowId>, StoreError> {
        let mut ids = Vec::new();
        for r in self.db().scan_prefix(prefix) {
            let (k, _) = r?;
            let fits = if any_rest {
                k.len() >= prefix.len() + 16
            } else {
                k.len() == prefix.len() + 16
            };
            if fits {
                ids.push(keys::index_row(&k).ok_or_else(|| corrupt("index key malformed"))?);
            }
        }
        Ok(ids)
    }

    /// Read the rows named by an index, in order; in parallel when there are many.
    fn fetch_rows(&self, t: u16, ids: &[RowId]) -> Result<Vec<(RowId, MatRow)>, StoreError> {
        const PARALLEL_MIN: usize = 512;
        let fetch = |part: &[RowId]| -> Result<Vec<(RowId, MatRow)>, StoreError> {
            part.iter()
                .map(|id| Ok((*id, self.indexed_row(t, *id)?)))
                .collect()
        };
        let mut out = Vec::with_capacity(ids.len());
        for part in on_every_core(ids, PARALLEL_MIN, fetch)? {
            out.extend(part?);
        }
        Ok(out)
    }

    /// How `query` would find its rows (an index scan or a table scan).
    pub fn plan(&self, query: &Query) -> Result<QueryPlan, StoreError> {
        let (t, table) = self.table(&query.table)?;
        Ok(self.choose(t, table, query)?.0)
    }

    /// Run a view: candidates from an index when a filter is on an indexed column (else a
    /// scan of the table's rows, never of the log), the remaining filters, sort, limit.
    pub fn query(&self, query: &Query) -> Result<Vec<Row>, StoreError> {
        let _span = debug_span!("query", table = %query.table).entered();
        let (t, table) = self.table(&query.table)?;
        let (_, candidates) = self.choose(t, table, query)?;
        let mut filters = Vec::with_capacity(query.filters.len());
        for f in &query.filters {
            let (Filter::Eq(name, _) | Filter::Range(name, _, _)) = f;
            filters.push((col(table, name)?, f));
        }
        let order = match &query.order {
            Some((name, o)) => Some((col(table, name)?, *o)),
            None => None,
        };
        // Without a sort the limit can stop the scan early.
        let early = if order.is_none() { query.limit } else { None };
        let mut out: Vec<(RowId, MatRow)> = Vec::new();
        let mut take = |id: RowId, mat: MatRow| -> bool {
            if !mat.deleted && matches(&mat, &filters) {
                out.push((id, mat));
            }
            early.is_none_or(|n| out.len() < n)
        };
        // Candidates read from the index first (ids only), then as rows below.
        let indexed_ids = match candidates {
            Candidates::Table => {
                for r in self.db().scan_prefix(keys::table_prefix(keys::ROW, t)) {
                    let (k, v) = r?;
                    let (_, id) =
                        keys::parse_row_key(&k).ok_or_else(|| corrupt("a row key is malformed"))?;
                    if !take(id, self.decode_mat(t, &v)?) {
                        break;
                    }
                }
                None
            }
            Candidates::Prefix(p) if early.is_some() => {
                // A limit without a sort: read rows only until it is reached.
                for r in self.db().scan_prefix(&p) {
                    let (k, _) = r?;
                    if k.len() != p.len() + 16 {
                        continue;
                    }
                    let id = keys::index_row(&k).ok_or_else(|| corrupt("index key malformed"))?;
                    if !take(id, self.indexed_row(t, id)?) {
                        break;
                    }
                }
                None
            }
            Candidates::Prefix(p) => Some(self.index_ids(&p, false)?),
            Candidates::OwnerPrefix(p) => {
                // The owner's rows are ordered by statecode first: put them in id order, the
                // order every other plan without a sort returns.
                let mut ids = self.index_ids(&p, true)?;
                ids.sort_unstable();
                Some(ids)
            }
            Candidates::Range {
                prefix: p,
                lo,
                hi,
                value_len,
            } => {
                let start = match &lo {
                    Bound::Included(v) | Bound::Excluded(v) => {
                        let mut k = p.clone();
                        k.extend_from_slice(v);
                        k
                    }
                    Bound::Unbounded => p.clone(),
                };
                for r in self.db().range(start..) {
                    let (k, _) = r?;
                    if !k.starts_with(&p) {
                        break;
                    }
                    let val = &k[p.len()..k.len().saturating_sub(16)];
                    let val = match value_len {
                        Some(n) => val.get(..n).unwrap_or(val),
                        None => val,
                    };
                    if matches!(&lo, Bound::Excluded(l) if val == l.as_slice()) {
                        continue;
                    }
                    let past = match &hi {
                        Bound::Included(h) => val > h.as_slice(),
                        Bound::Excluded(h) => val >= h.as_slice(),
                        Bound::Unbounded => false,
                    };
                    if past {
                        break;
                    }
                    let id = keys::index_row(&k).ok_or_else(|| corrupt("index key malformed"))?;
                    if !take(id, self.indexed_row(t, id)?) {
                        break;
                    }
                }
                None
            }
        };
        if let Some(ids) = indexed_ids {
            if early.is_none() {
                // Every candidate is needed: read the rows on every core.
                for (id, mat) in self.fetch_rows(t, &ids)? {
                    take(id, mat);
                }
            } else {
                for id in ids {
                    if !take(id, self.indexed_row(t, id)?) {
                        break;
                    }
                }
            }
        }
        if let Some((c, o)) = order {
            out.sort_by(|(ia, a), (ib, b)| {
                let ord = cmp_values(Store::mat_value(a, c), Store::mat_value(b, c));
                let ord = if o == Order::Desc { ord.reverse() } else { ord };
                ord.then(ia.cmp(ib))
            });
        }
        if let Some(n) = query.limit {
            out.truncate(n);
        }
        // Building the rows (a map of column names per row) costs as much as reading them:
        // spread it over the cores too when there are many.
        const PARALLEL_MIN: usize = 512;
        let threads = worker_threads();
        if out.len() < PARALLEL_MIN || threads == 1 {
            return Ok(out
                .into_iter()
                .map(|(id, mat)| self.to_row(table, id, mat))
                .collect());
        }
        let per = out.len().div_ceil(threads);
        let mut parts: Vec<Vec<(RowId, MatRow)>> = Vec::with_capacity(threads);
        while !out.is_empty() {
            let rest = out.split_off(per.min(out.len()));
            parts.push(std::mem::replace(&mut out, rest));
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    s.spawn(move || {
                        part.into_iter()
                            .map(|(id, mat)| self.to_row(table, id, mat))
                            .collect::<Vec<Row>>()
                    })
                })
                .collect();
            let mut rows = Vec::new();
            for h in handles {
                rows.extend(h.join().map_err(|_| corrupt("a query worker panicked"))?);
            }
            Ok(rows)
        })
    }
}
