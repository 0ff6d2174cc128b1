//! Model-driven apps: tables, views, the "can be used offline" switch and the linked profile;
//! publishing checks; and the default profile generated from an app.
//!
//! # Apps file
//!
//! ```toml
//! [[apps]]
//! name = "Field Service Mobile"
//! offline = true                      # "can be used offline"
//! profile = "Field Service Mobile"    # the linked offline profile's name (at most one)
//! tables = ["product"]                # tables the app shows besides those of its views
//!
//! [[apps.views]]
//! table = "msdyn_workorder"
//! name = "My active work orders"
//! filter = "ownerid eq-userid and statecode eq 0"   # the custom filter language; optional
//! columns = ["msdyn_name", "msdyn_serviceaccount", "msdyn_datewindowstart"]
//! sort = ["msdyn_datewindowstart desc"]             # `column [asc|desc]`, first key first
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use fieldsync_store::{ColumnType, Ownership, Schema};
use serde::Deserialize;
use uuid::Uuid;

use crate::profile::{Expr, Profile, ProfileError, ProfileItem, RowFilter};
use crate::security::derived_id;

/// One sort key of a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// The column.
    pub column: String,
    /// Descending order.
    pub descending: bool,
}

/// A view: a filter, the columns shown and a sort, over one table.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Its name, e.g. "My active accounts".
    pub name: String,
    /// The table it lists.
    pub table: String,
    /// Which rows it lists (`None`: every row).
    pub filter: Option<Expr>,
    /// The columns shown, in order.
    pub columns: Vec<String>,
    /// The sort, first key first.
    pub sort: Vec<SortKey>,
}

/// A model-driven app.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    /// Its id (`appmoduleid`).
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Tables the app shows besides those of its views.
    pub tables: BTreeSet<String>,
    /// Its views.
    pub views: Vec<View>,
    /// The "can be used offline" switch.
    pub offline: bool,
    /// The name of the one offline profile the app is linked to.
    pub profile: Option<String>,
}

/// Why an apps file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The file is not valid TOML of the expected shape.
    #[error("apps file is not valid: {0}")]
    Parse(String),
    /// A table that is not in the schema.
    #[error("app `{app}`: table `{table}` is not in the schema")]
    UnknownTable {
        /// The app.
        app: String,
        /// The table.
        table: String,
    },
    /// A column that is not in the view's table.
    #[error("app `{app}`, view `{view}`: column `{column}` is not in the table")]
    UnknownColumn {
        /// The app.
        app: String,
        /// The view.
        view: String,
        /// The column.
        column: String,
    },
    /// A view filter that does not parse or fit.
    #[error("app `{app}`, view `{view}`: {source}")]
    Filter {
        /// The app.
        app: String,
        /// The view.
        view: String,
        /// What is wrong.
        source: ProfileError,
    },
    /// A sort key that is not `column [asc|desc]`.
    #[error(
        "app `{app}`, view `{view}`: bad sort key `{key}` (expected `column asc` or `column desc`)"
    )]
    BadSort {
        /// The app.
        app: String,
        /// The view.
        view: String,
        /// The refused key.
        key: String,
    },
    /// Two apps with the same name.
    #[error("app `{0}` is defined twice")]
    Duplicate(String),
}

/// One thing an offline app lacks to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missing {
    /// The app can be used offline but is linked to no profile.
    NoProfile,
    /// The linked profile does not exist.
    UnknownProfile(String),
    /// The profile lacks a table a view lists.
    Table {
        /// The missing table.
        table: String,
        /// The view that needs it.
        view: String,
    },
    /// The profile lacks the table a view's lookup column points at.
    LookupTarget {
        /// The missing table.
        table: String,
        /// The view that shows the lookup.
        view: String,
        /// The lookup column.
        column: String,
    },
    /// The profile lacks a table the app lists.
    AppTable(String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::NoProfile => write!(f, "no offline profile is linked"),
            Missing::UnknownProfile(p) => write!(f, "the linked profile `{p}` does not exist"),
            Missing::Table { table, view } => {
                write!(f, "the profile lacks table `{table}` (view `{view}`)")
            }
            Missing::LookupTarget {
                table,
                view,
                column,
            } => write!(
                f,
                "the profile lacks table `{table}` (column `{column}` of view `{view}`)"
            ),
            Missing::AppTable(t) => write!(f, "the profile lacks table `{t}` (the app's tables)"),
        }
    }
}

/// Publishing an offline app failed: everything that is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("app `{app}` cannot be published for offline use: {}", .missing.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct PublishError {
    /// The app.
    pub app: String,
    /// What is missing.
    pub missing: Vec<Missing>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppsFile {
    #[serde(default)]
    apps: Vec<AppFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    name: String,
    id: Option<String>,
    #[serde(default)]
    offline: bool,
    profile: Option<String>,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    views: Vec<ViewFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewFile {
    table: String,
    name: String,
    filter: Option<String>,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    sort: Vec<String>,
}

/// Parse an apps file and check it against a schema.
pub fn apps_from_toml(text: &str, schema: &Schema) -> Result<Vec<App>, AppError> {
    let file: AppsFile = toml::from_str(text).map_err(|e| AppError::Parse(e.to_string()))?;
    let mut out: Vec<App> = Vec::new();
    for a in file.apps {
        if out.iter().any(|x| x.name == a.name) {
            return Err(AppError::Duplicate(a.name));
        }
        let unknown = |t: &str| AppError::UnknownTable {
            app: a.name.clone(),
            table: t.to_string(),
        };
        let mut views = Vec::new();
        for v in &a.views {
            let table = schema.table(&v.table).map_err(|_| unknown(&v.table))?;
            for c in v.columns.iter().chain(v.sort.iter()) {
                let c = c.split_whitespace().next().unwrap_or("");
                if table.column(c).is_none() && c != table.primary_id_column() {
                    return Err(AppError::UnknownColumn {
                        app: a.name.clone(),
                        view: v.name.clone(),
                        column: c.to_string(),
                    });
                }
            }
            let filter = v
                .filter
                .as_deref()
                .map(|f| Expr::parse(f, table))
                .transpose()
                .map_err(|source| AppError::Filter {
                    app: a.name.clone(),
                    view: v.name.clone(),
                    source,
                })?;
            let mut sort = Vec::new();
            for key in &v.sort {
                let parts: Vec<&str> = key.split_whitespace().collect();
                let descending = match parts.as_slice() {
                    [_] | [_, "asc"] => false,
                    [_, "desc"] => true,
                    _ => {
                        return Err(AppError::BadSort {
                            app: a.name.clone(),
                            view: v.name.clone(),
                            key: key.clone(),
                        })
                    }
                };
                sort.push(SortKey {
                    column: parts.first().copied().unwrap_or("").to_string(),
                    descending,
                });
            }
            views.push(View {
                name: v.name.clone(),
                table: v.table.clone(),
                filter,
                columns: v.columns.clone(),
                sort,
            });
        }
        for t in &a.tables {
            schema.table(t).map_err(|_| unknown(t))?;
        }
        let id = match &a.id {
            Some(s) => Uuid::parse_str(s).map_err(|_| AppError::Parse(format!("bad id `{s}`")))?,
            None => derived_id("app", &a.name),
        };
        out.push(App {
            id,
            name: a.name.clone(),
            tables: a.tables.iter().cloned().collect(),
            views,
            offline: a.offline,
            profile: a.profile.clone(),
        });
    }
    Ok(out)
}

impl App {
    /// Every table the app shows: its own list and its views' tables.
    pub fn all_tables(&self) -> BTreeSet<String> {
        let mut t = self.tables.clone();
        t.extend(self.views.iter().map(|v| v.table.clone()));
        t
    }

    /// Check an offline app can be published with the given profiles: it has a profile, and
    /// the profile has every table its views list and every table their lookups point at.
    /// An app that is not used offline always passes.
    pub fn check_publish(&self, schema: &Schema, profiles: &[Profile]) -> Result<(), PublishError> {
        if !self.offline {
            return Ok(());
        }
        let fail = |missing| PublishError {
            app: self.name.clone(),
            missing,
        };
        let Some(pname) = &self.profile else {
            return Err(fail(vec![Missing::NoProfile]));
        };
        let Some(profile) = profiles.iter().find(|p| p.name == *pname) else {
            return Err(fail(vec![Missing::UnknownProfile(pname.clone())]));
        };
        let mut missing = Vec::new();
        for t in &self.tables {
            if !profile.items.contains_key(t) {
                missing.push(Missing::AppTable(t.clone()));
            }
        }
        for v in &self.views {
            if !profile.items.contains_key(&v.table) {
                missing.push(Missing::Table {
                    table: v.table.clone(),
                    view: v.name.clone(),
                });
            }
            let Ok(table) = schema.table(&v.table) else {
                continue;
            };
            for c in &v.columns {
                if let Some(col) = table.column(c) {
                    if let (ColumnType::Lookup, Some(target)) = (col.ty, &col.target) {
                        if !profile.items.contains_key(target) {
                            missing.push(Missing::LookupTarget {
                                table: target.clone(),
                                view: v.name.clone(),
                                column: c.clone(),
                            });
                        }
                    }
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(fail(missing))
        }
    }
}

/// What [`generate_profile`] could not set up, and what deserves a maker's review.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerateReport {
    /// Things left out, with the reason.
    pub not_set_up: Vec<String>,
    /// Filters to review.
    pub review: Vec<String>,
}

/// A default profile for an app, like Power Apps' "+ New profile with current app data".
///
/// Tables the app's views list (and the app's own tables) get the user's organization rows
/// (owned by the user or the user's teams); organization-owned tables get all rows. Tables only reached through lookups shown in those
/// views get "related rows only" with that relationship selected. Tables that are not
/// offline-enabled are left out and reported.
pub fn generate_profile(app: &App, schema: &Schema) -> (Profile, GenerateReport) {
    let mut profile = Profile::new(&app.name);
    profile.description = format!("Generated from app `{}`", app.name);
    let mut report = GenerateReport::default();
    let mut primary: BTreeSet<String> = BTreeSet::new();
    for t in app.all_tables() {
        match schema.table(&t) {
            Ok(table) if table.offline && table.ownership == Ownership::Organization => {
                // Organization-owned rows have no owner: "my rows" would be none of them.
                primary.insert(t.clone());
                profile
                    .items
                    .insert(t.clone(), ProfileItem::new(&t, RowFilter::All));
                report.review.push(format!(
                    "`{t}` is organization-owned: every row the user can read is downloaded"
                ));
            }
            Ok(table) if table.offline => {
                primary.insert(t.clone());
                profile.items.insert(
                    t.clone(),
                    ProfileItem::new(
                        &t,
                        RowFilter::Organization {
                            owned_by_me: true,
                            owned_by_my_teams: true,
                            owned_by_my_business_unit: false,
                        },
                    ),
                );
                report.review.push(format!(
                    "`{t}` downloads every row owned by the user or the user's teams: narrow it if the app needs less"
                ));
            }
            Ok(_) => report.not_set_up.push(format!(
                "`{t}` is not enabled for offline use, so the app's views of it will not work offline"
            )),
            Err(_) => report
                .not_set_up
                .push(format!("`{t}` is not in the schema")),
        }
    }
    let mut related: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for v in &app.views {
        let Ok(table) = schema.table(&v.table) else {
            continue;
        };
        if let Some(f) = &v.filter {
            if primary.contains(&v.table) {
                report.review.push(format!(
                    "view `{}` filters `{}` with `{f}`: a custom filter could download less",
                    v.name, v.table
                ));
            }
        }
        for c in &v.columns {
            let Some(col) = table.column(c) else { continue };
            let (Some(target), Some(rel)) = (&col.target, &col.relationship) else {
                continue;
            };
            if !primary.contains(&v.table) {
                continue;
            }
            match schema.table(target) {
                Ok(t) if t.offline => {
                    if !primary.contains(target) {
                        related
                            .entry(target.clone())
                            .or_default()
                            .insert(rel.clone());
                    }
                }
                _ => report.not_set_up.push(format!(
                    "`{target}` (column `{c}` of view `{}`) is not enabled for offline use",
                    v.name
                )),
            }
        }
    }
    for (t, rels) in related {
        let mut item = ProfileItem::new(&t, RowFilter::RelatedOnly);
        item.relationships = rels.into_iter().collect();
        profile.items.insert(t, item);
    }
    (profile, report)
}
