//! Per-table sync intervals, as in Power Apps offline profiles.
//!
//! Each table of a device's profile is pulled every 5 minutes to 1 day (default 10 minutes). A
//! table related to a table that syncs more often is pulled with it, so related rows stay
//! consistent: the tables of one connected group of relationships share the shortest interval
//! and are pulled together.

use std::collections::BTreeMap;

use super::time::Millis;

/// Shortest sync interval, in minutes.
pub const MIN_INTERVAL_MINUTES: u32 = 5;
/// Longest sync interval, in minutes (one day).
pub const MAX_INTERVAL_MINUTES: u32 = 1440;
/// Sync interval of a table whose profile names none, in minutes.
pub const DEFAULT_INTERVAL_MINUTES: u32 = 10;

/// The effective sync interval and pull group of every table a device syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncSchedule {
    tables: BTreeMap<String, (Millis, usize)>,
    groups: Vec<Vec<String>>,
}

impl SyncSchedule {
    /// The schedule of a device syncing `profile`: each table's interval, and the tables
    /// related in `schema` (both in the profile) pulled together.
    pub fn for_profile(schema: &fieldsync_store::Schema, profile: &crate::Profile) -> SyncSchedule {
        let intervals = profile
            .items
            .iter()
            .map(|(t, item)| (t.clone(), Some(item.sync_interval_minutes)));
        let related: Vec<(String, String)> = schema
            .relationships()
            .iter()
            .filter(|r| {
                profile.items.contains_key(&r.table) && profile.items.contains_key(&r.target)
            })
            .map(|r| (r.table.clone(), r.target.clone()))
            .collect();
        SyncSchedule::new(intervals, &related)
    }

    /// Builds the schedule from each table's configured interval (minutes, clamped to 5–1440,
    /// `None` for the default) and the pairs of related tables.
    ///
    /// Relationships naming a table that is not in `intervals` are ignored.
    pub fn new<I, S>(intervals: I, related: &[(String, String)]) -> SyncSchedule
    where
        I: IntoIterator<Item = (S, Option<u32>)>,
        S: Into<String>,
    {
        let mut names: Vec<String> = Vec::new();
        let mut minutes: Vec<u32> = Vec::new();
        for (name, m) in intervals {
            let name = name.into();
            let m = m
                .unwrap_or(DEFAULT_INTERVAL_MINUTES)
                .clamp(MIN_INTERVAL_MINUTES, MAX_INTERVAL_MINUTES);
            if let Some(i) = names.iter().position(|n| *n == name) {
                minutes[i] = minutes[i].min(m);
            } else {
                names.push(name);
                minutes.push(m);
            }
        }
        // Union-find over the relationships.
        let mut parent: Vec<usize> = (0..names.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for (a, b) in related {
            let (Some(ia), Some(ib)) = (
                names.iter().position(|n| n == a),
                names.iter().position(|n| n == b),
            ) else {
                continue;
            };
            let (ra, rb) = (root(&mut parent, ia), root(&mut parent, ib));
            if ra != rb {
                parent[ra.max(rb)] = ra.min(rb);
            }
        }
        let mut group_of_root: BTreeMap<usize, usize> = BTreeMap::new();
        let mut groups: Vec<Vec<String>> = Vec::new();
        let mut group_minutes: Vec<u32> = Vec::new();
        let mut table_group = Vec::with_capacity(names.len());
        for i in 0..names.len() {
            let r = root(&mut parent, i);
            let g = *group_of_root.entry(r).or_insert_with(|| {
                groups.push(Vec::new());
                group_minutes.push(u32::MAX);
                groups.len() - 1
            });
            groups[g].push(names[i].clone());
            group_minutes[g] = group_minutes[g].min(minutes[i]);
            table_group.push(g);
        }
        let tables = names
            .into_iter()
            .zip(table_group)
            .map(|(n, g)| {
                let m = Millis::from_minutes(u64::from(group_minutes[g]));
                (n, (m, g))
            })
            .collect();
        SyncSchedule { tables, groups }
    }

    /// Every table, by name.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// Whether the schedule has this table.
    pub fn contains(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// The effective interval of a table.
    pub fn interval(&self, table: &str) -> Option<Millis> {
        self.tables.get(table).map(|(m, _)| *m)
    }

    /// The tables pulled together with `table` (itself included).
    pub fn group(&self, table: &str) -> &[String] {
        match self.tables.get(table) {
            Some((_, g)) => &self.groups[*g],
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn related_tables_share_the_shortest_interval() {
        let s = SyncSchedule::new(
            [
                ("account", Some(60)),
                ("contact", Some(5)),
                ("product", None),
                ("case", Some(1)),
                ("booking", Some(5000)),
            ],
            &[
                ("account".into(), "contact".into()),
                ("contact".into(), "case".into()),
                ("nope".into(), "product".into()),
            ],
        );
        assert_eq!(s.interval("account"), Some(Millis::from_minutes(5)));
        assert_eq!(s.interval("case"), Some(Millis::from_minutes(5)));
        assert_eq!(s.interval("product"), Some(Millis::from_minutes(10)));
        assert_eq!(s.interval("booking"), Some(Millis::from_minutes(1440)));
        assert_eq!(s.group("case"), ["account", "contact", "case"]);
        assert_eq!(s.group("product"), ["product"]);
    }
}
