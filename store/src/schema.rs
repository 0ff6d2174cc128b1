//! Tables, typed columns and N:1 relationships, loaded from a TOML file.
//!
//! A schema is the contract every write is checked against: an unknown table or column, a value
//! of the wrong type or a malformed id is refused before anything reaches the log.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::value::Value;

/// The system columns every table has, besides its primary id.
pub const SYSTEM_COLUMNS: [(&str, ColumnType); 5] = [
    ("ownerid", ColumnType::Owner),
    ("owningbusinessunit", ColumnType::Lookup),
    ("createdon", ColumnType::DateTime),
    ("modifiedon", ColumnType::DateTime),
    ("statecode", ColumnType::Choice),
];

/// `statecode` of an active row, as in Dataverse.
pub const STATE_ACTIVE: i32 = 0;
/// `statecode` of an inactive row, as in Dataverse.
pub const STATE_INACTIVE: i32 = 1;

/// The type of a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ColumnType {
    /// Single-line text.
    Text,
    /// Multi-line text.
    Memo,
    /// 64-bit signed integer.
    Integer,
    /// Exact decimal number.
    Decimal,
    /// 64-bit floating point number.
    Float,
    /// true or false.
    Boolean,
    /// A UTC instant, millisecond precision.
    DateTime,
    /// An option-set value.
    Choice,
    /// The id of a row in another table (the target is named by the column).
    Lookup,
    /// A user or a team that owns the row.
    Owner,
    /// A file, stored as a content-addressed blob.
    File,
    /// An image, stored as a content-addressed blob.
    Image,
}

impl ColumnType {
    /// The name used in schema files.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Memo => "memo",
            ColumnType::Integer => "integer",
            ColumnType::Decimal => "decimal",
            ColumnType::Float => "float",
            ColumnType::Boolean => "boolean",
            ColumnType::DateTime => "datetime",
            ColumnType::Choice => "choice",
            ColumnType::Lookup => "lookup",
            ColumnType::Owner => "owner",
            ColumnType::File => "file",
            ColumnType::Image => "image",
        }
    }

    /// Whether a secondary index is kept on columns of this type (owner, lookups, choices).
    pub fn is_indexed(self) -> bool {
        matches!(
            self,
            ColumnType::Owner | ColumnType::Lookup | ColumnType::Choice
        )
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ColumnType {
    type Err = SchemaError;
    fn from_str(s: &str) -> Result<Self, SchemaError> {
        Ok(match s {
            "text" => ColumnType::Text,
            "memo" => ColumnType::Memo,
            "integer" => ColumnType::Integer,
            "decimal" => ColumnType::Decimal,
            "float" => ColumnType::Float,
            "boolean" => ColumnType::Boolean,
            "datetime" => ColumnType::DateTime,
            "choice" => ColumnType::Choice,
            "owner" => ColumnType::Owner,
            "file" => ColumnType::File,
            "image" => ColumnType::Image,
            other => return Err(SchemaError::UnknownType(other.to_string())),
        })
    }
}

/// Who owns the rows of a table, as in Dataverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Ownership {
    /// Rows are owned by a user or a team (security roles apply at user, BU, ... depth).
    #[default]
    UserOrTeam,
    /// Rows belong to the organization (only organization-depth privileges apply).
    Organization,
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Column {
    /// Logical name, e.g. `revenue`.
    pub name: String,
    /// Its value type.
    pub ty: ColumnType,
    /// For lookups: the target table's logical name.
    pub target: Option<String>,
    /// For lookups: the name of the N:1 relationship, e.g. `account_primary_contact`.
    pub relationship: Option<String>,
    /// For lookups: the Web API's single-valued navigation property, when it is not the
    /// column's name — `parentcustomerid_account` for a Customer lookup, the SchemaName
    /// (`new_ParentSite`) for most custom lookups. See [`Column::navigation_property`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub navigation: Option<String>,
    /// For choices: the allowed option values (empty: any value).
    pub options: Vec<i32>,
    /// For files and images: the largest content a value may name, in KiB, as Dataverse's
    /// `MaxSizeInKB`; `None`: Dataverse's limit for the type ([`Column::max_file_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_kb: Option<u64>,
    /// Whether this is one of the [`SYSTEM_COLUMNS`].
    pub system: bool,
}

/// The largest `MaxSizeInKB` Dataverse allows a file column (10 GiB): a file column's maximum
/// when the schema gives none, so a schema written without maximums takes whatever Dataverse
/// can hold.
pub const LIMIT_FILE_MAX_KB: u64 = 10 * 1024 * 1024;
/// The largest `MaxSizeInKB` Dataverse allows an image column (30 MiB), likewise the default.
pub const LIMIT_IMAGE_MAX_KB: u64 = crate::IMAGE_MAX_BYTES / 1024;

impl Column {
    /// A user column of type `ty` with nothing else set (no target, options or maximum).
    fn plain(name: &str, ty: ColumnType) -> Column {
        Column {
            name: name.to_string(),
            ty,
            target: None,
            relationship: None,
            navigation: None,
            options: Vec::new(),
            max_size_kb: None,
            system: false,
        }
    }

    /// For a file or image column, the largest content a value may name, in bytes: the
    /// column's `max_size_kb`, else Dataverse's limit for its type. `None` for other types.
    pub fn max_file_bytes(&self) -> Option<u64> {
        let default = match self.ty {
            ColumnType::File => LIMIT_FILE_MAX_KB,
            ColumnType::Image => LIMIT_IMAGE_MAX_KB,
            _ => return None,
        };
        Some(self.max_size_kb.unwrap_or(default).saturating_mul(1024))
    }

    /// The navigation property a write names to set this lookup
    /// (`<navigation>@odata.bind`): the declared `navigation`, else the column's name.
    pub fn navigation_property(&self) -> &str {
        self.navigation.as_deref().unwrap_or(&self.name)
    }
}

/// A named N:1 relationship: `table.column` refers to a row of `target`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Relationship {
    /// Dataverse-style name, e.g. `contact_customer_accounts`.
    pub name: String,
    /// The table that holds the lookup column (the "many" side).
    pub table: String,
    /// The lookup column.
    pub column: String,
    /// The table the lookup points at (the "one" side).
    pub target: String,
}

/// A table: a UUID primary id plus typed columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Logical name, e.g. `account`.
    pub name: String,
    /// Dataverse entity set name, e.g. `accounts`.
    pub entity_set: String,
    /// Whether the table may be added to offline profiles.
    pub offline: bool,
    /// User/team-owned or organization-owned.
    pub ownership: Ownership,
    /// Every column, system columns first, in a stable order (a column's index is its position).
    pub columns: Vec<Column>,
}

impl Table {
    /// The column with this logical name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The position of the column with this logical name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The file and image columns: their values are references to blobs.
    pub fn blob_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns
            .iter()
            .filter(|c| matches!(c.ty, ColumnType::File | ColumnType::Image))
    }

    /// The name of the primary id column, `<table>id` as in Dataverse.
    pub fn primary_id_column(&self) -> String {
        format!("{}id", self.name)
    }

    /// Check a value against a column of this table.
    pub fn check_value(&self, column: &str, value: &Value) -> Result<(), SchemaError> {
        let col = self
            .column(column)
            .ok_or_else(|| SchemaError::UnknownColumn {
                table: self.name.clone(),
                column: column.to_string(),
            })?;
        if value.is_null() {
            return Ok(());
        }
        if value.column_type() != Some(col.ty) {
            return Err(SchemaError::WrongType {
                table: self.name.clone(),
                column: column.to_string(),
                expected: col.ty,
                found: value.type_name(),
            });
        }
        if let Value::Choice(v) = value {
            if !col.options.is_empty() && !col.options.contains(v) {
                return Err(SchemaError::InvalidChoice {
                    table: self.name.clone(),
                    column: column.to_string(),
                    value: *v,
                });
            }
        }
        Ok(())
    }

    /// Check a file or image reference against its column's maximum size (other values
    /// pass). Writes check a reference they set (not one the row already holds: a maximum
    /// may be lower than what Dataverse took before); pulls and merges do not.
    pub fn check_file_size(&self, column: &str, value: &Value) -> Result<(), SchemaError> {
        let (Value::File(blob) | Value::Image(blob)) = value else {
            return Ok(());
        };
        let max = self.column(column).and_then(Column::max_file_bytes);
        match max {
            Some(max) if blob.size > max => Err(SchemaError::FileTooLarge {
                table: self.name.clone(),
                column: column.to_string(),
                size: blob.size,
                max,
            }),
            _ => Ok(()),
        }
    }
}

/// Every table and relationship of an environment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Schema {
    tables: BTreeMap<String, Table>,
    relationships: Vec<Relationship>,
}

/// Why a schema file or a value was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The schema file is not valid TOML of the expected shape.
    #[error("schema file is not valid: {0}")]
    Parse(String),
    /// A column type name that fieldsync does not know.
    #[error("unknown column type `{0}` (expected text, memo, integer, decimal, float, boolean, datetime, choice, lookup, owner, file or image)")]
    UnknownType(String),
    /// A table name that is not in the schema.
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    /// A column name that is not in the table.
    #[error("unknown column `{column}` in table `{table}`")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column that was not found.
        column: String,
    },
    /// A value whose type does not match its column.
    #[error("column `{table}.{column}` holds {expected} values, not {found}")]
    WrongType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The column's type.
        expected: ColumnType,
        /// What was given.
        found: &'static str,
    },
    /// File or image content larger than the column's maximum (`max_size_kb`).
    #[error("`{table}.{column}` takes files of at most {max} bytes, not {size}")]
    FileTooLarge {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The content's size in bytes.
        size: u64,
        /// The column's maximum in bytes.
        max: u64,
    },
    /// A `max_size_kb` on a column that is not a file or image, or past Dataverse's limit.
    #[error("`{table}.{column}`: {reason}")]
    InvalidMaxSize {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Why.
        reason: String,
    },
    /// A choice value not among the column's options.
    #[error("{value} is not an option of choice column `{table}.{column}`")]
    InvalidChoice {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The refused value.
        value: i32,
    },
    /// A lookup whose target table is not in the schema.
    #[error("lookup `{table}.{column}` targets unknown table `{target}`")]
    UnknownLookupTarget {
        /// The table.
        table: String,
        /// The lookup column.
        column: String,
        /// The missing target.
        target: String,
    },
    /// A name that is not a valid logical name, or a user column that shadows a system one.
    #[error("invalid name `{0}`: logical names are lower-case ASCII letters, digits and `_`, and may not redefine a system column")]
    InvalidName(String),
    /// A lookup's `navigation` that is not a navigation property name.
    #[error("lookup `{table}.{column}`: `{navigation}` is not a navigation property name (ASCII letters, digits and `_`, starting with a letter)")]
    InvalidNavigation {
        /// The table.
        table: String,
        /// The lookup column.
        column: String,
        /// The refused name.
        navigation: String,
    },
    /// Two relationships with the same name.
    #[error("relationship name `{0}` is used twice")]
    DuplicateRelationship(String),
    /// A value that cannot be parsed for its column's type.
    #[error("`{value}` is not a valid {expected} value for `{table}.{column}`")]
    InvalidValue {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The column's type.
        expected: ColumnType,
        /// The text that failed to parse.
        value: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    #[serde(default)]
    tables: BTreeMap<String, TableFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    offline: bool,
    entity_set: Option<String>,
    ownership: Option<String>,
    #[serde(default)]
    columns: BTreeMap<String, ColumnFile>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ColumnFile {
    Plain(String),
    Lookup(LookupFile),
    Sized(SizedFile),
    Choice { choice: Vec<i32> },
}

/// `{ type = "file" | "image", max_size_kb = <KiB> }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SizedFile {
    #[serde(rename = "type")]
    ty: String,
    max_size_kb: Option<u64>,
}

/// `{ lookup = "<table>", relationship = "<name>", navigation = "<property>" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupFile {
    lookup: String,
    relationship: Option<String>,
    navigation: Option<String>,
}

/// A navigation property name: ASCII letters (either case: custom ones are SchemaNames),
/// digits and `_`, starting with a letter.
fn valid_navigation(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.as_bytes()[0].is_ascii_alphabetic()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.as_bytes()[0].is_ascii_lowercase()
}

impl Schema {
    /// Whether a table or column name is one a schema accepts: 1 to 64 lower-case ASCII
    /// letters, digits and `_`, starting with a letter.
    pub fn is_valid_name(name: &str) -> bool {
        valid_name(name)
    }

    /// Parse a schema from TOML text (see `examples/field-service/schema.toml`, whose header
    /// describes each column form: a type name, `{ choice = [..] }`,
    /// `{ lookup = "<table>", relationship = "<name>", navigation = "<property>" }`, or
    /// `{ type = "file" | "image", max_size_kb = <KiB> }`).
    pub fn from_toml(text: &str) -> Result<Schema, SchemaError> {
        let file: SchemaFile =
            toml::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        let mut schema = Schema::default();
        for (name, tf) in &file.tables {
            if !valid_name(name) {
                return Err(SchemaError::InvalidName(name.clone()));
            }
            let ownership = match tf.ownership.as_deref() {
                None | Some("user") | Some("userorteam") => Ownership::UserOrTeam,
                Some("organization") => Ownership::Organization,
                Some(other) => {
                    return Err(SchemaError::Parse(format!(
                        "table `{name}`: ownership must be `user` or `organization`, not `{other}`"
                    )))
                }
            };
            let mut columns: Vec<Column> = SYSTEM_COLUMNS
                .iter()
                .map(|(n, ty)| Column {
                    options: if *n == "statecode" {
                        vec![STATE_ACTIVE, STATE_INACTIVE]
                    } else {
                        Vec::new()
                    },
                    system: true,
                    ..Column::plain(n, *ty)
                })
                .collect();
            for (cname, cf) in &tf.columns {
                let primary = format!("{name}id");
                if !valid_name(cname)
                    || SYSTEM_COLUMNS.iter().any(|(s, _)| s == cname)
                    || *cname == primary
                {
                    return Err(SchemaError::InvalidName(format!("{name}.{cname}")));
                }
                let col = match cf {
                    ColumnFile::Plain(ty) => Column::plain(cname, ty.parse()?),
                    ColumnFile::Sized(SizedFile { ty, max_size_kb }) => {
                        let ty: ColumnType = ty.parse()?;
                        let limit = match ty {
                            ColumnType::File => LIMIT_FILE_MAX_KB,
                            ColumnType::Image => LIMIT_IMAGE_MAX_KB,
                            other => {
                                return Err(SchemaError::InvalidMaxSize {
                                    table: name.clone(),
                                    column: cname.clone(),
                                    reason: format!(
                                    "`{{ type = ... }}` is for file and image columns, not {other}"
                                ),
                                })
                            }
                        };
                        if let Some(kb) = max_size_kb.filter(|kb| *kb == 0 || *kb > limit) {
                            return Err(SchemaError::InvalidMaxSize {
                                table: name.clone(),
                                column: cname.clone(),
                                reason: format!(
                                    "max_size_kb must be 1 to {limit} for a {ty} column (Dataverse's limit), not {kb}"
                                ),
                            });
                        }
                        Column {
                            max_size_kb: *max_size_kb,
                            ..Column::plain(cname, ty)
                        }
                    }
                    ColumnFile::Lookup(LookupFile {
                        lookup,
                        relationship,
                        navigation,
                    }) => {
                        let rel = relationship
                            .clone()
                            .unwrap_or_else(|| format!("{lookup}_{name}_{cname}"));
                        if let Some(nav) = navigation {
                            if !valid_navigation(nav) {
                                return Err(SchemaError::InvalidNavigation {
                                    table: name.clone(),
                                    column: cname.clone(),
                                    navigation: nav.clone(),
                                });
                            }
                        }
                        Column {
                            target: Some(lookup.clone()),
                            relationship: Some(rel),
                            navigation: navigation.clone(),
                            ..Column::plain(cname, ColumnType::Lookup)
                        }
                    }
                    ColumnFile::Choice { choice } => Column {
                        options: choice.clone(),
                        ..Column::plain(cname, ColumnType::Choice)
                    },
                };
                columns.push(col);
            }
            schema.tables.insert(
                name.clone(),
                Table {
                    name: name.clone(),
                    entity_set: tf.entity_set.clone().unwrap_or_else(|| format!("{name}s")),
                    offline: tf.offline,
                    ownership,
                    columns,
                },
            );
        }
        // Relationships, once every table is known.
        let mut seen = std::collections::BTreeSet::new();
        for table in schema.tables.values() {
            for col in &table.columns {
                if let (Some(target), Some(rel)) = (&col.target, &col.relationship) {
                    if !schema.tables.contains_key(target) {
                        return Err(SchemaError::UnknownLookupTarget {
                            table: table.name.clone(),
                            column: col.name.clone(),
                            target: target.clone(),
                        });
                    }
                    if !seen.insert(rel.clone()) {
                        return Err(SchemaError::DuplicateRelationship(rel.clone()));
                    }
                    schema.relationships.push(Relationship {
                        name: rel.clone(),
                        table: table.name.clone(),
                        column: col.name.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        Ok(schema)
    }

    /// The table with this logical name.
    pub fn table(&self, name: &str) -> Result<&Table, SchemaError> {
        self.tables
            .get(name)
            .ok_or_else(|| SchemaError::UnknownTable(name.to_string()))
    }

    /// Every table, by name.
    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.values()
    }

    /// Every N:1 relationship.
    pub fn relationships(&self) -> &[Relationship] {
        &self.relationships
    }

    /// The relationship with this name.
    pub fn relationship(&self, name: &str) -> Option<&Relationship> {
        self.relationships.iter().find(|r| r.name == name)
    }

    /// The table whose entity set has this name (`accounts` → `account`).
    pub fn table_by_entity_set(&self, entity_set: &str) -> Option<&Table> {
        self.tables.values().find(|t| t.entity_set == entity_set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[tables.account]
offline = true
[tables.account.columns]
name = "text"
revenue = "decimal"
primarycontactid = { lookup = "contact", relationship = "account_primary_contact" }
logo = "image"
contract = "file"
industrycode = { choice = [1, 2, 3] }

[tables.contact]
offline = true
[tables.contact.columns]
fullname = "text"
parentcustomerid = { lookup = "account", relationship = "contact_customer_accounts" }
"#;

    #[test]
    fn loads_tables_columns_and_relationships() {
        let s = Schema::from_toml(SAMPLE).unwrap();
        let account = s.table("account").unwrap();
        assert!(account.offline);
        assert_eq!(account.entity_set, "accounts");
        assert_eq!(account.column("revenue").unwrap().ty, ColumnType::Decimal);
        assert_eq!(account.column("ownerid").unwrap().ty, ColumnType::Owner);
        assert_eq!(
            account.column("industrycode").unwrap().options,
            vec![1, 2, 3]
        );
        let rel = s.relationship("contact_customer_accounts").unwrap();
        assert_eq!(
            (rel.table.as_str(), rel.column.as_str(), rel.target.as_str()),
            ("contact", "parentcustomerid", "account")
        );
        assert_eq!(s.relationships().len(), 2);
    }

    #[test]
    fn refuses_bad_files() {
        assert!(matches!(
            Schema::from_toml("[tables.a.columns]\nx = \"blob\""),
            Err(SchemaError::UnknownType(_))
        ));
        assert!(matches!(
            Schema::from_toml("[tables.a.columns]\nx = { lookup = \"nope\" }"),
            Err(SchemaError::UnknownLookupTarget { .. })
        ));
        assert!(matches!(
            Schema::from_toml("[tables.a.columns]\nownerid = \"text\""),
            Err(SchemaError::InvalidName(_))
        ));
        assert!(matches!(
            Schema::from_toml("[tables.A]"),
            Err(SchemaError::InvalidName(_))
        ));
        assert!(matches!(
            Schema::from_toml("not toml ["),
            Err(SchemaError::Parse(_))
        ));
        assert!(matches!(
            Schema::from_toml("[tables.a]\nbogus = 1"),
            Err(SchemaError::Parse(_))
        ));
    }

    #[test]
    fn a_lookup_names_its_navigation_property_or_defaults_to_its_column() {
        let text = SAMPLE.replace(
            "parentcustomerid = { lookup = \"account\", relationship = \"contact_customer_accounts\" }",
            "parentcustomerid = { lookup = \"account\", relationship = \"contact_customer_accounts\", navigation = \"parentcustomerid_account\" }",
        );
        let s = Schema::from_toml(&text).unwrap();
        let customer = s
            .table("contact")
            .unwrap()
            .column("parentcustomerid")
            .unwrap();
        assert_eq!(
            customer.navigation.as_deref(),
            Some("parentcustomerid_account")
        );
        assert_eq!(customer.navigation_property(), "parentcustomerid_account");
        let plain = s
            .table("account")
            .unwrap()
            .column("primarycontactid")
            .unwrap();
        assert_eq!(plain.navigation, None);
        assert_eq!(plain.navigation_property(), "primarycontactid");
        // A custom lookup's SchemaName keeps its case.
        let custom = Schema::from_toml(
            "[tables.site.columns]\nnew_parentsite = { lookup = \"site\", navigation = \"new_ParentSite\" }",
        )
        .unwrap();
        assert_eq!(
            custom
                .table("site")
                .unwrap()
                .column("new_parentsite")
                .unwrap()
                .navigation_property(),
            "new_ParentSite"
        );
        // It survives the store's JSON copy of the schema; a schema without it reads as before.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Schema>(&json).unwrap(), s);
        let plain_json = serde_json::to_string(&Schema::from_toml(SAMPLE).unwrap()).unwrap();
        assert!(!plain_json.contains("navigation"), "{plain_json}");
        // Not a property name, or a misspelt key: refused.
        for bad in ["", "1st", "parent customer", "x/y", "a@odata.bind"] {
            let r = Schema::from_toml(&format!(
                "[tables.a.columns]\nx = {{ lookup = \"a\", navigation = {bad:?} }}"
            ));
            assert!(
                matches!(r, Err(SchemaError::InvalidNavigation { .. })),
                "{bad}: {r:?}"
            );
        }
        assert!(matches!(
            Schema::from_toml("[tables.a.columns]\nx = { lookup = \"a\", navigaton = \"x_a\" }"),
            Err(SchemaError::Parse(_))
        ));
    }

    #[test]
    fn checks_values_against_columns() {
        let s = Schema::from_toml(SAMPLE).unwrap();
        let account = s.table("account").unwrap();
        assert!(account
            .check_value("name", &Value::Text("x".into()))
            .is_ok());
        assert!(matches!(
            account.check_value("name", &Value::Integer(1)),
            Err(SchemaError::WrongType { .. })
        ));
        assert!(matches!(
            account.check_value("nope", &Value::Null),
            Err(SchemaError::UnknownColumn { .. })
        ));
        assert!(matches!(
            account.check_value("industrycode", &Value::Choice(9)),
            Err(SchemaError::InvalidChoice { .. })
        ));
        assert!(account.check_value("name", &Value::Null).is_ok());
        assert!(matches!(s.table("nope"), Err(SchemaError::UnknownTable(_))));
    }

    #[test]
    fn file_and_image_columns_hold_content_up_to_their_maximum() {
        use crate::value::BlobRef;
        let s = Schema::from_toml(
            "[tables.a.columns]\n\
             plain_file = \"file\"\n\
             plain_image = \"image\"\n\
             small = { type = \"file\", max_size_kb = 2 }\n\
             photo = { type = \"image\", max_size_kb = 30720 }\n\
             typed = { type = \"file\" }",
        )
        .unwrap();
        let a = s.table("a").unwrap();
        let max = |c: &str| a.column(c).unwrap().max_file_bytes();
        assert_eq!(max("plain_file"), Some(LIMIT_FILE_MAX_KB * 1024));
        assert_eq!(max("plain_image"), Some(LIMIT_IMAGE_MAX_KB * 1024));
        assert_eq!(max("typed"), Some(LIMIT_FILE_MAX_KB * 1024));
        assert_eq!(max("small"), Some(2048));
        assert_eq!(max("photo"), Some(crate::IMAGE_MAX_BYTES));
        assert_eq!(max("ownerid"), None);
        let blob = |size: u64| BlobRef {
            sha256: [1; 32],
            size,
            name: "f".into(),
        };
        assert!(a.check_file_size("small", &Value::File(blob(2048))).is_ok());
        assert!(matches!(
            a.check_file_size("small", &Value::File(blob(2049))),
            Err(SchemaError::FileTooLarge {
                size: 2049,
                max: 2048,
                ..
            })
        ));
        assert!(matches!(
            a.check_file_size(
                "plain_image",
                &Value::Image(blob(LIMIT_IMAGE_MAX_KB * 1024 + 1))
            ),
            Err(SchemaError::FileTooLarge { .. })
        ));
        // The type check is the type check: a filter may name any reference.
        assert!(a.check_value("small", &Value::File(blob(2049))).is_ok());
        assert!(a.check_file_size("small", &Value::Null).is_ok());
        // The maximum travels with the store's JSON copy of the schema.
        let copy: Schema = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(copy, s);
        // Past Dataverse's limits, zero, or on another type: refused, with the column named.
        for bad in [
            "x = { type = \"image\", max_size_kb = 30721 }",
            "x = { type = \"file\", max_size_kb = 10485761 }",
            "x = { type = \"file\", max_size_kb = 0 }",
            "x = { type = \"text\", max_size_kb = 5 }",
        ] {
            let err = Schema::from_toml(&format!("[tables.a.columns]\n{bad}")).unwrap_err();
            assert!(
                matches!(&err, SchemaError::InvalidMaxSize { column, .. } if column == "x"),
                "{bad}: {err:?}"
            );
        }
        assert!(matches!(
            Schema::from_toml("[tables.a.columns]\nx = { type = \"blob\", max_size_kb = 5 }"),
            Err(SchemaError::UnknownType(_))
        ));
        assert!(matches!(
            Schema::from_toml("[tables.a.columns]\nx = { type = \"file\", max_kb = 5 }"),
            Err(SchemaError::Parse(_))
        ));
    }
}
