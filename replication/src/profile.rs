//! Offline profiles: which rows of which tables a device downloads.
//!
//! A profile has one item per table. An item has a row filter ([`RowFilter`]), the
//! relationships to follow, the columns to download (all by default), the image columns to
//! download (one by one), whether files are downloaded (all or nothing) and the table's sync
//! interval (5 to 1,440 minutes, 10 by default). Only offline-enabled tables may be added.
//!
//! # Following relationships
//!
//! A relationship selected on the item of table `T` pulls rows of `T` that are related to rows
//! already in the device's set:
//!
//! - `T` is the relationship's target (`other.lookup → T`): the `T` rows that set rows of
//!   `other` point at (a work order's service account);
//! - `T` holds the lookup (`T.lookup → other`): the `T` rows whose lookup points at a set row of
//!   `other` (an account's contacts);
//! - a self reference (`T.lookup → T`, e.g. account → parent account): the rows that set rows
//!   point at, transitively (the whole chain of parents).
//!
//! Pulling is transitive and stops at rows already in the set, so cycles are harmless. A pulled
//! row is still subject to the user's read privilege; a row the user cannot read does not pull
//! anything either. Unlike Power Apps, there is no cap of 15 relationships and circular and
//! self references are allowed.
//!
//! # Profile file
//!
//! ```toml
//! name = "Field Service Mobile"
//! description = "What a technician needs in the field"
//! # id = "…uuid…"                      # optional; derived from the name by default
//!
//! [tables.msdyn_workorder]
//! rows = "organization"                # organization | all | related | custom
//! owned_by = ["me", "my_teams"]        # organization rows: any of me, my_teams, my_business_unit
//! relationships = []                   # relationship names to follow (see above)
//! columns = ["msdyn_name", "msdyn_serviceaccount"]   # optional: all columns by default
//! images = ["msdyn_signature"]         # image columns to download
//! files = true                         # file columns: all or nothing
//! sync_interval_minutes = 10           # 5..=1440, default 10
//!
//! [tables.account]
//! rows = "related"
//! relationships = ["msdyn_account_msdyn_workorder_ServiceAccount", "account_parent_account"]
//!
//! [tables.incident]
//! rows = "custom"
//! filter = "statecode eq 0 and (ownerid eq-useroruserteams or prioritycode in (1, 2))"
//! ```
//!
//! The custom filter language is described in [`expr`].

pub mod expr;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use fieldsync_store::{ColumnType, Schema, Table, Value};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use expr::{Condition, Expr, Op, UserContext};

use crate::security::derived_id;

/// The shortest sync interval Dataverse allows, in minutes.
pub const SYNC_INTERVAL_MIN_MINUTES: u32 = 5;
/// The longest sync interval Dataverse allows, in minutes.
pub const SYNC_INTERVAL_MAX_MINUTES: u32 = 1440;
/// The sync interval the maker portal proposes, in minutes.
pub const SYNC_INTERVAL_DEFAULT_MINUTES: u32 = 10;

/// Which rows of a table a profile item selects by itself (before relationships add more).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RowFilter {
    /// The user's organization rows: owned by the user, the user's teams, the user's business
    /// unit (any combination; none selected selects nothing).
    Organization {
        /// Rows owned by the user.
        owned_by_me: bool,
        /// Rows owned by one of the user's teams.
        owned_by_my_teams: bool,
        /// Rows whose owning business unit is the user's.
        owned_by_my_business_unit: bool,
    },
    /// Every row (the user can read).
    All,
    /// No row by itself: only rows pulled in through relationships.
    RelatedOnly,
    /// Rows matching an expression.
    Custom(Expr),
}

impl RowFilter {
    /// The name used in profile files.
    pub fn kind_name(&self) -> &'static str {
        match self {
            RowFilter::Organization { .. } => "organization",
            RowFilter::All => "all",
            RowFilter::RelatedOnly => "related",
            RowFilter::Custom(_) => "custom",
        }
    }
}

/// One table of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileItem {
    /// The table's logical name.
    pub table: String,
    /// Which rows the item selects by itself.
    pub filter: RowFilter,
    /// Names of the relationships to follow (see the module docs).
    pub relationships: Vec<String>,
    /// The columns to download; `None` for all of them.
    pub columns: Option<Vec<String>>,
    /// The image columns to download.
    pub images: Vec<String>,
    /// Whether file columns are downloaded (all of them, or none).
    pub files: bool,
    /// How often the device syncs the table, in minutes.
    pub sync_interval_minutes: u32,
}

impl ProfileItem {
    /// An item with the given filter and the defaults: no relationships, all columns, no
    /// images, no files, a 10 minute interval.
    pub fn new(table: &str, filter: RowFilter) -> ProfileItem {
        ProfileItem {
            table: table.to_string(),
            filter,
            relationships: Vec::new(),
            columns: None,
            images: Vec::new(),
            files: false,
            sync_interval_minutes: SYNC_INTERVAL_DEFAULT_MINUTES,
        }
    }

    /// Whether a column's value is downloaded (selected columns, images, files, system columns).
    pub fn downloads_column(&self, table: &Table, column: &str) -> bool {
        let Some(col) = table.column(column) else {
            return false;
        };
        match col.ty {
            ColumnType::Image => self.images.iter().any(|c| c == column),
            ColumnType::File => self.files,
            _ => {
                col.system
                    || self
                        .columns
                        .as_ref()
                        .is_none_or(|cs| cs.iter().any(|c| c == column))
            }
        }
    }
}

/// A mobile offline profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Its id (`mobileofflineprofileid`).
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// One item per table, by table name.
    pub items: BTreeMap<String, ProfileItem>,
}

/// Why a profile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The file is not valid TOML of the expected shape.
    #[error("profile file is not valid: {0}")]
    Parse(String),
    /// A table that is not in the schema.
    #[error("table `{0}` is not in the schema")]
    UnknownTable(String),
    /// A table that is not enabled for offline use.
    #[error("table `{0}` is not enabled for offline use, so it cannot be added to a profile (set `offline = true` on the table)")]
    NotOfflineEnabled(String),
    /// A column that is not in the table.
    #[error("column `{column}` is not in table `{table}`")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A relationship that is not in the schema.
    #[error("relationship `{relationship}` (on the `{table}` item) is not in the schema")]
    UnknownRelationship {
        /// The item's table.
        table: String,
        /// The relationship name.
        relationship: String,
    },
    /// A relationship that does not connect the item's table with another table of the profile.
    #[error(
        "relationship `{relationship}` does not connect `{table}` with a table of the profile"
    )]
    UnrelatedRelationship {
        /// The item's table.
        table: String,
        /// The relationship name.
        relationship: String,
    },
    /// A column listed as an image that is not an image column.
    #[error("`{table}.{column}` is not an image column")]
    NotAnImage {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A sync interval outside 5..=1440 minutes.
    #[error("sync interval of `{table}` is {minutes} minutes; it must be between 5 and 1440")]
    SyncInterval {
        /// The table.
        table: String,
        /// The refused interval.
        minutes: u32,
    },
    /// An unknown kind of row filter.
    #[error("unknown row filter `{0}` (expected organization, all, related or custom)")]
    UnknownRowFilter(String),
    /// An unknown owner kind in an organization filter.
    #[error("unknown owner `{0}` in owned_by (expected me, my_teams or my_business_unit)")]
    UnknownOwnedBy(String),
    /// A custom filter without an expression, or an expression on another kind of filter.
    #[error(
        "table `{0}`: a custom filter needs `filter = \"...\"`, and only a custom filter takes one"
    )]
    MissingFilter(String),
    /// A custom filter expression that does not parse.
    #[error("filter does not parse: {reason} (near {text})")]
    FilterSyntax {
        /// The text near the error.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// A condition that does not fit its column.
    #[error("filter on `{table}` is not valid: {reason}")]
    InvalidFilter {
        /// The table.
        table: String,
        /// What is wrong.
        reason: String,
    },
    /// An operator fieldsync does not support.
    #[error("operator `{operator}` is not supported (supported: eq, ne, lt, le, gt, ge, in, like, null, not-null, eq-userid, eq-userteams, eq-useroruserteams, eq-businessid, last-x-days, next-x-days)")]
    UnsupportedOperator {
        /// The operator as written.
        operator: String,
    },
    /// An id that is not a UUID.
    #[error("`{0}` is not a valid id (UUID)")]
    InvalidId(String),
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tables: BTreeMap<String, ItemFile>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ItemFile {
    rows: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    owned_by: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    relationships: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    columns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    images: Vec<String>,
    #[serde(default)]
    files: bool,
    #[serde(default = "default_interval")]
    sync_interval_minutes: u32,
}

fn default_interval() -> u32 {
    SYNC_INTERVAL_DEFAULT_MINUTES
}

/// How a selected relationship pulls rows into its item's table (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FollowRule {
    /// The relationship's name.
    pub relationship: String,
    /// The table whose set rows do the pulling.
    pub from_table: String,
    /// The table rows are pulled into (the item's table).
    pub to_table: String,
    /// The table that holds the lookup column.
    pub lookup_table: String,
    /// The lookup column.
    pub column: String,
    /// `true`: a `from_table` row pulls the row its lookup points at; `false`: a `from_table`
    /// row pulls the `to_table` rows whose lookup points at it.
    pub forward: bool,
}

impl Profile {
    /// An empty profile with an id derived from its name.
    pub fn new(name: &str) -> Profile {
        Profile {
            id: derived_id("profile", name),
            name: name.to_string(),
            description: String::new(),
            items: BTreeMap::new(),
        }
    }

    /// Parse a profile from TOML text and validate it against a schema.
    pub fn from_toml(text: &str, schema: &Schema) -> Result<Profile, ProfileError> {
        let file: ProfileFile =
            toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        let id = match &file.id {
            Some(s) => Uuid::parse_str(s).map_err(|_| ProfileError::InvalidId(s.clone()))?,
            None => derived_id("profile", &file.name),
        };
        let mut profile = Profile {
            id,
            name: file.name,
            description: file.description,
            items: BTreeMap::new(),
        };
        for (table_name, f) in file.tables {
            let table = schema
                .table(&table_name)
                .map_err(|_| ProfileError::UnknownTable(table_name.clone()))?;
            if f.filter.is_some() != (f.rows == "custom") {
                return Err(ProfileError::MissingFilter(table_name));
            }
            let filter = match f.rows.as_str() {
                "organization" => {
                    let mut org = (false, false, false);
                    for o in &f.owned_by {
                        match o.as_str() {
                            "me" => org.0 = true,
                            "my_teams" => org.1 = true,
                            "my_business_unit" => org.2 = true,
                            other => return Err(ProfileError::UnknownOwnedBy(other.to_string())),
                        }
                    }
                    RowFilter::Organization {
                        owned_by_me: org.0,
                        owned_by_my_teams: org.1,
                        owned_by_my_business_unit: org.2,
                    }
                }
                "all" => RowFilter::All,
                "related" => RowFilter::RelatedOnly,
                "custom" => {
                    RowFilter::Custom(Expr::parse(f.filter.as_deref().unwrap_or(""), table)?)
                }
                other => return Err(ProfileError::UnknownRowFilter(other.to_string())),
            };
            profile.items.insert(
                table_name.clone(),
                ProfileItem {
                    table: table_name,
                    filter,
                    relationships: f.relationships,
                    columns: f.columns,
                    images: f.images,
                    files: f.files,
                    sync_interval_minutes: f.sync_interval_minutes,
                },
            );
        }
        profile.validate(schema)?;
        Ok(profile)
    }

    /// The TOML form (what [`Profile::from_toml`] reads).
    pub fn to_toml(&self) -> String {
        let file = ProfileFile {
            name: self.name.clone(),
            id: Some(self.id.to_string()),
            description: self.description.clone(),
            tables: self
                .items
                .iter()
                .map(|(t, item)| {
                    let (owned_by, filter) = match &item.filter {
                        RowFilter::Organization {
                            owned_by_me,
                            owned_by_my_teams,
                            owned_by_my_business_unit,
                        } => {
                            let mut v = Vec::new();
                            if *owned_by_me {
                                v.push("me".to_string());
                            }
                            if *owned_by_my_teams {
                                v.push("my_teams".to_string());
                            }
                            if *owned_by_my_business_unit {
                                v.push("my_business_unit".to_string());
                            }
                            (v, None)
                        }
                        RowFilter::Custom(e) => (Vec::new(), Some(e.to_string())),
                        _ => (Vec::new(), None),
                    };
                    (
                        t.clone(),
                        ItemFile {
                            rows: item.filter.kind_name().to_string(),
                            owned_by,
                            filter,
                            relationships: item.relationships.clone(),
                            columns: item.columns.clone(),
                            images: item.images.clone(),
                            files: item.files,
                            sync_interval_minutes: item.sync_interval_minutes,
                        },
                    )
                })
                .collect(),
        };
        toml::to_string_pretty(&file).unwrap_or_default()
    }

    /// Add (or replace) an item, checking it against the schema and the profile.
    pub fn put_item(&mut self, schema: &Schema, item: ProfileItem) -> Result<(), ProfileError> {
        let previous = self.items.insert(item.table.clone(), item.clone());
        if let Err(e) = self.validate(schema) {
            match previous {
                Some(p) => self.items.insert(item.table, p),
                None => self.items.remove(&item.table),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Check every item against the schema: offline-enabled tables, known columns, images,
    /// intervals, filters, and relationships that connect the item's table with the profile.
    pub fn validate(&self, schema: &Schema) -> Result<(), ProfileError> {
        for (name, item) in &self.items {
            let table = schema
                .table(name)
                .map_err(|_| ProfileError::UnknownTable(name.clone()))?;
            if !table.offline {
                return Err(ProfileError::NotOfflineEnabled(name.clone()));
            }
            if !(SYNC_INTERVAL_MIN_MINUTES..=SYNC_INTERVAL_MAX_MINUTES)
                .contains(&item.sync_interval_minutes)
            {
                return Err(ProfileError::SyncInterval {
                    table: name.clone(),
                    minutes: item.sync_interval_minutes,
                });
            }
            for c in item.columns.iter().flatten() {
                if table.column(c).is_none() && *c != table.primary_id_column() {
                    return Err(ProfileError::UnknownColumn {
                        table: name.clone(),
                        column: c.clone(),
                    });
                }
            }
            for c in &item.images {
                match table.column(c) {
                    None => {
                        return Err(ProfileError::UnknownColumn {
                            table: name.clone(),
                            column: c.clone(),
                        })
                    }
                    Some(col) if col.ty != ColumnType::Image => {
                        return Err(ProfileError::NotAnImage {
                            table: name.clone(),
                            column: c.clone(),
                        })
                    }
                    Some(_) => {}
                }
            }
            if let RowFilter::Custom(e) = &item.filter {
                e.check(table)?;
            }
            for r in &item.relationships {
                let rel =
                    schema
                        .relationship(r)
                        .ok_or_else(|| ProfileError::UnknownRelationship {
                            table: name.clone(),
                            relationship: r.clone(),
                        })?;
                let other = if rel.target == *name {
                    &rel.table
                } else if rel.table == *name {
                    &rel.target
                } else {
                    return Err(ProfileError::UnrelatedRelationship {
                        table: name.clone(),
                        relationship: r.clone(),
                    });
                };
                if !self.items.contains_key(other) {
                    return Err(ProfileError::UnrelatedRelationship {
                        table: name.clone(),
                        relationship: r.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The pulling rules of every selected relationship (see the module docs).
    pub fn follow_rules(&self, schema: &Schema) -> Vec<FollowRule> {
        let mut out = BTreeSet::new();
        for (name, item) in &self.items {
            for r in &item.relationships {
                let Some(rel) = schema.relationship(r) else {
                    continue;
                };
                if rel.target == *name {
                    // Rows of the lookup's table pull the row they point at (also self references).
                    out.insert(FollowRule {
                        relationship: rel.name.clone(),
                        from_table: rel.table.clone(),
                        to_table: name.clone(),
                        lookup_table: rel.table.clone(),
                        column: rel.column.clone(),
                        forward: true,
                    });
                } else if rel.table == *name {
                    out.insert(FollowRule {
                        relationship: rel.name.clone(),
                        from_table: rel.target.clone(),
                        to_table: name.clone(),
                        lookup_table: rel.table.clone(),
                        column: rel.column.clone(),
                        forward: false,
                    });
                }
            }
        }
        out.into_iter()
            .filter(|r| self.items.contains_key(&r.from_table))
            .collect()
    }

    /// Whether any item's filter depends on the current time.
    pub fn is_time_dependent(&self) -> bool {
        self.items
            .values()
            .any(|i| matches!(&i.filter, RowFilter::Custom(e) if e.is_time_dependent()))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "profile `{}` ({})", self.name, self.id)?;
        if !self.description.is_empty() {
            writeln!(f, "  {}", self.description)?;
        }
        for (t, item) in &self.items {
            let rows = match &item.filter {
                RowFilter::Organization {
                    owned_by_me,
                    owned_by_my_teams,
                    owned_by_my_business_unit,
                } => {
                    let mut v = Vec::new();
                    if *owned_by_me {
                        v.push("me");
                    }
                    if *owned_by_my_teams {
                        v.push("my teams");
                    }
                    if *owned_by_my_business_unit {
                        v.push("my business unit");
                    }
                    format!("organization rows owned by {}", v.join(", "))
                }
                RowFilter::All => "all rows".to_string(),
                RowFilter::RelatedOnly => "related rows only".to_string(),
                RowFilter::Custom(e) => format!("custom: {e}"),
            };
            writeln!(f, "  {t}: {rows}")?;
            if !item.relationships.is_empty() {
                writeln!(f, "    follows: {}", item.relationships.join(", "))?;
            }
            match &item.columns {
                Some(c) => writeln!(f, "    columns: {}", c.join(", "))?,
                None => writeln!(f, "    columns: all")?,
            }
            if !item.images.is_empty() {
                writeln!(f, "    images: {}", item.images.join(", "))?;
            }
            writeln!(
                f,
                "    files: {}; sync every {} min",
                if item.files { "yes" } else { "no" },
                item.sync_interval_minutes
            )?;
        }
        Ok(())
    }
}

/// A value of a row's column, `Null` when absent.
pub(crate) fn column_value<'a>(values: &'a BTreeMap<String, Value>, column: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    values.get(column).unwrap_or(&NULL)
}
