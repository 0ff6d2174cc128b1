//! Size estimate before publishing: for a profile and one user or every user, the rows and
//! bytes per table a device would download, and the largest contributors.
//!
//! Bytes count what the device stores for the downloaded columns (the profile's selected
//! columns, system columns, the chosen image columns, file columns when files are on): text
//! and memo at their UTF-8 length, numbers and datetimes at 8 bytes, decimals at 16, lookups
//! at 16, owners at 17, choices at 4, booleans at 1, plus 16 bytes of row id and 4 bytes per
//! stored column. Image and file content is counted apart, at the blob's size. The store's
//! change history and indexes come on top; this is the floor a maker can act on.

use std::collections::{BTreeMap, HashMap};

use fieldsync_store::{ColumnType, Schema, Value};

use crate::evaluate::RowView;
use crate::profile::Profile;
use crate::routing::{Router, RoutingError};
use crate::security::{Environment, UserId};

/// Rows and bytes of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableEstimate {
    /// Rows downloaded.
    pub rows: u64,
    /// Bytes of column values.
    pub bytes: u64,
    /// Bytes of image and file content.
    pub blob_bytes: u64,
}

impl TableEstimate {
    fn add(&mut self, o: &TableEstimate) {
        self.rows += o.rows;
        self.bytes += o.bytes;
        self.blob_bytes += o.blob_bytes;
    }

    /// Column and blob bytes together.
    pub fn total_bytes(&self) -> u64 {
        self.bytes + self.blob_bytes
    }
}

/// What one user's device would download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEstimate {
    /// The user.
    pub user: UserId,
    /// The user's name.
    pub name: String,
    /// Per table.
    pub tables: BTreeMap<String, TableEstimate>,
    /// All tables together.
    pub total: TableEstimate,
}

/// The estimate for a profile over some users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// Per user, largest download first.
    pub users: Vec<UserEstimate>,
    /// Per table, summed over the users.
    pub tables: BTreeMap<String, TableEstimate>,
    /// Tables by bytes downloaded over all users, largest first.
    pub largest_tables: Vec<(String, u64)>,
}

/// The bytes a value takes on a device (see the module docs).
pub fn value_bytes(v: &Value) -> u64 {
    4 + match v {
        Value::Null => 0,
        Value::Text(s) | Value::Memo(s) => s.len() as u64,
        Value::Integer(_) | Value::Float(_) | Value::DateTime(_) => 8,
        Value::Decimal(_) | Value::Lookup(_) => 16,
        Value::Owner(_) => 17,
        Value::Choice(_) => 4,
        Value::Boolean(_) => 1,
        Value::File(b) | Value::Image(b) => 32 + 8 + b.name.len() as u64,
    }
}

/// Estimate the downloads of `users` (every user of the environment when empty).
pub fn estimate<'a>(
    schema: &Schema,
    env: &Environment,
    profile: &Profile,
    users: &[UserId],
    now_ms: i64,
    rows: &[RowView<'a>],
) -> Result<Estimate, RoutingError> {
    let router = Router::with_rows(schema, env, profile, now_ms, rows.iter().copied())?;
    let by_key: HashMap<(&str, uuid::Uuid), &RowView<'a>> =
        rows.iter().map(|r| ((r.table, r.id), r)).collect();
    // Per row, its size once (rows are shared by many users).
    let mut row_size: HashMap<(&str, uuid::Uuid), TableEstimate> = HashMap::new();
    let wanted: Vec<UserId> = if users.is_empty() {
        env.users().map(|u| u.id).collect()
    } else {
        users.to_vec()
    };
    let memberships = router.memberships();
    let mut out = Estimate {
        users: Vec::new(),
        tables: BTreeMap::new(),
        largest_tables: Vec::new(),
    };
    for u in wanted {
        let mut ue = UserEstimate {
            user: u,
            name: env.user(u).map(|x| x.name.clone()).unwrap_or_default(),
            tables: BTreeMap::new(),
            total: TableEstimate::default(),
        };
        for (t, id) in memberships.get(&u).into_iter().flatten() {
            let Some(row) = by_key.get(&(t.as_str(), *id)) else {
                continue;
            };
            let size = *row_size.entry((row.table, row.id)).or_insert_with(|| {
                let mut e = TableEstimate {
                    rows: 1,
                    bytes: 16,
                    blob_bytes: 0,
                };
                let (Some(item), Ok(table)) =
                    (profile.items.get(row.table), schema.table(row.table))
                else {
                    return e;
                };
                for (c, v) in row.values {
                    if !item.downloads_column(table, c) {
                        continue;
                    }
                    e.bytes += value_bytes(v);
                    if let (Some(col), Value::File(b) | Value::Image(b)) = (table.column(c), v) {
                        if matches!(col.ty, ColumnType::File | ColumnType::Image) {
                            e.blob_bytes += b.size;
                        }
                    }
                }
                e
            });
            ue.tables.entry(t.clone()).or_default().add(&size);
            ue.total.add(&size);
        }
        for (t, e) in &ue.tables {
            out.tables.entry(t.clone()).or_default().add(e);
        }
        out.users.push(ue);
    }
    out.users.sort_by(|a, b| {
        b.total
            .total_bytes()
            .cmp(&a.total.total_bytes())
            .then(a.name.cmp(&b.name))
    });
    let mut lt: Vec<(String, u64)> = out
        .tables
        .iter()
        .map(|(t, e)| (t.clone(), e.total_bytes()))
        .collect();
    lt.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out.largest_tables = lt;
    Ok(out)
}
