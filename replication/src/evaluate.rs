//! Full evaluation: the exact set of rows a user's device gets under a profile.
//!
//! The set is `(rows matching their item's filter ∩ rows the user may read) ∪ rows pulled in
//! through the selected relationships from rows already in the set`, transitively; a pulled row
//! must be readable too (see [`crate::profile`] for how relationships pull).
//!
//! This is the reference the incremental [`crate::routing::Router`] is checked against: simple,
//! a scan over every row, no state kept between calls.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use fieldsync_store::{OwnerKind, OwnerRef, RowId, Schema, Value};

use crate::profile::{column_value, Profile, ProfileItem, RowFilter, UserContext};
use crate::security::{row_owner, Environment, ReadScope, UserId};

/// A row as evaluation sees it: its table, id and values (a store `Row` gives all three).
#[derive(Debug, Clone, Copy)]
pub struct RowView<'a> {
    /// The table's logical name.
    pub table: &'a str,
    /// The row's id.
    pub id: RowId,
    /// Every non-null column value by logical name.
    pub values: &'a BTreeMap<String, Value>,
}

/// A row's identity: table and id.
pub type RowKey = (String, RowId);

/// The rows one device gets.
pub type DeviceSet = BTreeSet<RowKey>;

impl UserContext {
    /// The context of an environment's user at an instant (`None` for an unknown user).
    pub fn for_user(env: &Environment, user: UserId, now_ms: i64) -> Option<UserContext> {
        let u = env.user(user)?;
        Some(UserContext {
            user,
            teams: env.teams_of(user).map(|t| t.id).collect(),
            business_unit: u.business_unit,
            now_ms,
        })
    }
}

/// Whether an item's own filter selects a row for a user (read privilege not included).
pub fn filter_matches(
    env: &Environment,
    item: &ProfileItem,
    values: &BTreeMap<String, Value>,
    ctx: &UserContext,
) -> bool {
    match &item.filter {
        RowFilter::All => true,
        RowFilter::RelatedOnly => false,
        RowFilter::Custom(e) => e.matches(values, ctx),
        RowFilter::Organization {
            owned_by_me,
            owned_by_my_teams,
            owned_by_my_business_unit,
        } => {
            let owner = row_owner(values);
            (*owned_by_me
                && owner
                    == Some(OwnerRef {
                        kind: OwnerKind::User,
                        id: ctx.user,
                    }))
                || (*owned_by_my_teams
                    && owner
                        .is_some_and(|o| o.kind == OwnerKind::Team && ctx.teams.contains(&o.id)))
                || (*owned_by_my_business_unit
                    && env.row_business_unit(values) == Some(ctx.business_unit))
        }
    }
}

/// Evaluate the device set of one user over every row, from scratch.
pub fn evaluate<'a>(
    schema: &Schema,
    env: &Environment,
    profile: &Profile,
    user: UserId,
    now_ms: i64,
    rows: impl IntoIterator<Item = RowView<'a>>,
) -> DeviceSet {
    let rows: Vec<RowView<'a>> = rows
        .into_iter()
        .filter(|r| profile.items.contains_key(r.table))
        .collect();
    evaluate_rows(schema, env, profile, user, now_ms, &rows)
}

/// [`evaluate`] for every user of the environment, sharing the row scan.
pub fn evaluate_all<'a>(
    schema: &Schema,
    env: &Environment,
    profile: &Profile,
    now_ms: i64,
    rows: impl IntoIterator<Item = RowView<'a>>,
) -> BTreeMap<UserId, DeviceSet> {
    let rows: Vec<RowView<'a>> = rows
        .into_iter()
        .filter(|r| profile.items.contains_key(r.table))
        .collect();
    env.users()
        .map(|u| {
            (
                u.id,
                evaluate_rows(schema, env, profile, u.id, now_ms, &rows),
            )
        })
        .collect()
}

fn evaluate_rows(
    schema: &Schema,
    env: &Environment,
    profile: &Profile,
    user: UserId,
    now_ms: i64,
    rows: &[RowView<'_>],
) -> DeviceSet {
    let mut set = DeviceSet::new();
    let Some(ctx) = UserContext::for_user(env, user, now_ms) else {
        return set;
    };
    let scopes: HashMap<&str, ReadScope> = profile
        .items
        .keys()
        .filter_map(|t| {
            schema
                .table(t)
                .ok()
                .map(|table| (t.as_str(), env.read_scope(user, table)))
        })
        .collect();
    let readable = |r: &RowView<'_>| {
        scopes
            .get(r.table)
            .is_some_and(|s| s.allows(row_owner(r.values), env.row_business_unit(r.values)))
    };
    let by_key: HashMap<(&str, RowId), usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| ((r.table, r.id), i))
        .collect();
    let mut in_set = vec![false; rows.len()];
    let mut queue = VecDeque::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(item) = profile.items.get(r.table) else {
            continue;
        };
        if filter_matches(env, item, r.values, &ctx) && readable(r) {
            in_set[i] = true;
            queue.push_back(i);
        }
    }
    let rules = profile.follow_rules(schema);
    // Backward rules: (to_table, column) → lookup target id → rows holding that lookup.
    let mut referrers: HashMap<(&str, &str), HashMap<RowId, Vec<usize>>> = HashMap::new();
    for rule in rules.iter().filter(|r| !r.forward) {
        let m = referrers
            .entry((rule.to_table.as_str(), rule.column.as_str()))
            .or_default();
        if !m.is_empty() {
            continue;
        }
        for (i, r) in rows.iter().enumerate() {
            if r.table == rule.to_table {
                if let Value::Lookup(t) = column_value(r.values, &rule.column) {
                    m.entry(*t).or_default().push(i);
                }
            }
        }
    }
    while let Some(i) = queue.pop_front() {
        let r = rows[i];
        for rule in rules.iter().filter(|x| x.from_table == r.table) {
            let pulled: Vec<usize> = if rule.forward {
                match column_value(r.values, &rule.column) {
                    Value::Lookup(t) => by_key
                        .get(&(rule.to_table.as_str(), *t))
                        .copied()
                        .into_iter()
                        .collect(),
                    _ => Vec::new(),
                }
            } else {
                referrers
                    .get(&(rule.to_table.as_str(), rule.column.as_str()))
                    .and_then(|m| m.get(&r.id))
                    .cloned()
                    .unwrap_or_default()
            };
            for j in pulled {
                if !in_set[j] && readable(&rows[j]) {
                    in_set[j] = true;
                    queue.push_back(j);
                }
            }
        }
    }
    for (i, r) in rows.iter().enumerate() {
        if in_set[i] {
            set.insert((r.table.to_string(), r.id));
        }
    }
    set
}
