//! Rows between the hub's typed values and the Web API's JSON: what to `$select`, how a read
//! row becomes values (`_<col>_value` lookups, the owner from `_owninguser_value` /
//! `_owningteam_value`), and how values become a write body (`<navigation>@odata.bind`, the
//! lookup's navigation property from the schema — `parentcustomerid_account` for a Customer
//! lookup — and `ownerid@odata.bind`).

use std::collections::BTreeMap;

use fieldsync_store::{ColumnType, OwnerKind, OwnerRef, Ownership, RowId, Schema, Table, Value};
use serde_json::{json, Map, Value as J};
use uuid::Uuid;

use super::UpstreamError;

/// Columns the bridge relays: every column but files and images (uploaded separately), and
/// the owner only where the table has owners.
pub fn synced(table: &Table) -> impl Iterator<Item = &fieldsync_store::Column> {
    let owned = table.ownership == Ownership::UserOrTeam;
    table.columns.iter().filter(move |c| match c.ty {
        ColumnType::File | ColumnType::Image => false,
        ColumnType::Owner => owned,
        _ => true,
    })
}

/// Columns Dataverse computes itself: read, never written.
fn computed(name: &str) -> bool {
    matches!(name, "createdon" | "modifiedon" | "owningbusinessunit")
}

/// The `$select` list for a table.
pub fn select(table: &Table) -> String {
    let mut out: Vec<String> = table.blob_columns().map(|c| c.name.clone()).collect();
    for c in synced(table) {
        match c.ty {
            ColumnType::Owner => {
                out.push("_ownerid_value".to_string());
                out.push("_owninguser_value".to_string());
                out.push("_owningteam_value".to_string());
            }
            ColumnType::Lookup => out.push(format!("_{}_value", c.name)),
            _ => out.push(c.name.clone()),
        }
    }
    out.join(",")
}

/// A row as read: its id, `@odata.etag` and values (absent columns are null).
#[derive(Debug, Clone, PartialEq)]
pub struct WireRow {
    pub id: RowId,
    pub etag: String,
    pub values: BTreeMap<String, Value>,
    /// File and image columns that hold a file: column → Dataverse's file id.
    pub files: BTreeMap<String, String>,
    /// File columns whose content was downloaded: the values to write to the hub.
    pub file_writes: Vec<(String, Value)>,
    /// What is known of each file column upstream (filled by the download step).
    pub file_states: BTreeMap<String, super::state::FileState>,
    /// Every file of the row came down and a download of it was pending: applying the row
    /// clears that record.
    pub downloads_done: bool,
}

fn guid(j: Option<&J>) -> Option<Uuid> {
    j.and_then(J::as_str).and_then(|s| Uuid::parse_str(s).ok())
}

/// Reads an entity from a response body.
pub fn from_wire(table: &Table, m: &Map<String, J>) -> Result<WireRow, UpstreamError> {
    let bad = |what: String| UpstreamError::BadReply(format!("{} row: {what}", table.name));
    let id = guid(m.get(&table.primary_id_column()))
        .ok_or_else(|| bad(format!("no {} GUID", table.primary_id_column())))?;
    let etag = m
        .get("@odata.etag")
        .and_then(J::as_str)
        .ok_or_else(|| bad("no @odata.etag".into()))?
        .to_string();
    let mut values = BTreeMap::new();
    for c in synced(table) {
        let v = match c.ty {
            ColumnType::Owner => {
                let team = guid(m.get("_owningteam_value"));
                match (guid(m.get("_ownerid_value")), team) {
                    (Some(id), Some(t)) if t == id => Value::Owner(OwnerRef {
                        kind: OwnerKind::Team,
                        id,
                    }),
                    (Some(id), _) => Value::Owner(OwnerRef {
                        kind: OwnerKind::User,
                        id,
                    }),
                    (None, _) => Value::Null,
                }
            }
            ColumnType::Lookup => match guid(m.get(&format!("_{}_value", c.name))) {
                Some(id) => Value::Lookup(id),
                None => Value::Null,
            },
            ty => match m.get(&c.name) {
                None => Value::Null,
                Some(j) => Value::from_json(ty, j).map_err(|e| bad(e.to_string()))?,
            },
        };
        if !v.is_null() {
            values.insert(c.name.clone(), v);
        }
    }
    let files = table
        .blob_columns()
        .filter_map(|c| {
            let id = m.get(&c.name)?.as_str()?;
            Some((c.name.clone(), id.to_string()))
        })
        .collect();
    Ok(WireRow {
        id,
        etag,
        values,
        files,
        file_writes: Vec::new(),
        file_states: BTreeMap::new(),
        downloads_done: false,
    })
}

/// The values of `row` that the bridge relays (files, images and nulls left out).
pub fn relayed(table: &Table, values: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    synced(table)
        .filter_map(|c| {
            let v = values.get(&c.name)?;
            (!v.is_null()).then(|| (c.name.clone(), v.clone()))
        })
        .collect()
}

/// A create or update body: every relayed, writable column (nulls clear), lookups and the
/// owner as `@odata.bind`.
pub fn to_wire(
    schema: &Schema,
    table: &Table,
    values: &BTreeMap<String, Value>,
) -> Result<J, UpstreamError> {
    to_wire_where(schema, table, values, |_| true)
}

/// An update body of the columns whose value differs from `base` (what Dataverse had when the
/// hub last saw the row): a column the hub did not change is not written over Dataverse's.
pub fn changes_to_wire(
    schema: &Schema,
    table: &Table,
    values: &BTreeMap<String, Value>,
    base: &BTreeMap<String, Value>,
) -> Result<J, UpstreamError> {
    to_wire_where(schema, table, values, |c| {
        values.get(c).unwrap_or(&Value::Null) != base.get(c).unwrap_or(&Value::Null)
    })
}

/// Upstream `values` with each value the hub's schema refuses (a choice option added in
/// Dataverse since) replaced by `keep`'s, or dropped if `keep` has none; and those columns.
/// `keep` is asked for only when a value is refused.
pub fn within_schema<E>(
    table: &Table,
    mut values: BTreeMap<String, Value>,
    keep: impl FnOnce() -> Result<BTreeMap<String, Value>, E>,
) -> Result<(BTreeMap<String, Value>, Vec<String>), E> {
    let refused: Vec<String> = values
        .iter()
        .filter(|(c, v)| table.check_value(c, v).is_err())
        .map(|(c, _)| c.clone())
        .collect();
    if refused.is_empty() {
        return Ok((values, refused));
    }
    let keep = keep()?;
    for c in &refused {
        match keep.get(c) {
            Some(v) => values.insert(c.clone(), v.clone()),
            None => values.remove(c),
        };
    }
    Ok((values, refused))
}

fn to_wire_where(
    schema: &Schema,
    table: &Table,
    values: &BTreeMap<String, Value>,
    keep: impl Fn(&str) -> bool,
) -> Result<J, UpstreamError> {
    let mut m = Map::new();
    for c in synced(table) {
        if computed(&c.name) || !keep(&c.name) {
            continue;
        }
        let v = values.get(&c.name).unwrap_or(&Value::Null);
        match (c.ty, v) {
            (ColumnType::Owner, Value::Owner(o)) => {
                let set = match o.kind {
                    OwnerKind::User => "systemusers",
                    OwnerKind::Team => "teams",
                };
                m.insert(
                    "ownerid@odata.bind".into(),
                    json!(format!("/{set}({})", o.id)),
                );
            }
            (ColumnType::Owner, _) => {}
            (ColumnType::Lookup, Value::Lookup(id)) => {
                let target = c.target.as_deref().ok_or_else(|| {
                    UpstreamError::BadRequest(format!("lookup {} has no target", c.name))
                })?;
                let set = &schema
                    .table(target)
                    .map_err(|e| UpstreamError::BadRequest(e.to_string()))?
                    .entity_set;
                m.insert(
                    format!("{}@odata.bind", c.navigation_property()),
                    json!(format!("/{set}({id})")),
                );
            }
            // A null bind through the same property disassociates
            // (`associate-disassociate-entities-using-web-api.md`).
            (ColumnType::Lookup, _) => {
                m.insert(format!("{}@odata.bind", c.navigation_property()), J::Null);
            }
            (ColumnType::Decimal, Value::Decimal(d)) => {
                // Never `null` for a value that fails to convert: that would clear the column.
                let n = d.to_string().parse::<serde_json::Number>().map_err(|e| {
                    UpstreamError::BadRequest(format!("decimal {d} in {}: {e}", c.name))
                })?;
                m.insert(c.name.clone(), J::Number(n));
            }
            _ => {
                m.insert(c.name.clone(), v.to_json());
            }
        }
    }
    Ok(J::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"
[tables.account.columns]
name = "text"
[tables.contact.columns]
parentcustomerid = { lookup = "account", navigation = "parentcustomerid_account" }
[tables.site.columns]
new_parentsite = { lookup = "site", navigation = "new_ParentSite" }
new_account = { lookup = "account" }
"#;

    #[test]
    fn lookups_bind_through_their_navigation_property() {
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let id = Uuid::new_v4();
        let contact = schema.table("contact").unwrap();
        let set = BTreeMap::from([("parentcustomerid".to_string(), Value::Lookup(id))]);
        let body = to_wire(&schema, contact, &set).unwrap();
        assert_eq!(
            body["parentcustomerid_account@odata.bind"],
            json!(format!("/accounts({id})"))
        );
        assert!(body.get("parentcustomerid@odata.bind").is_none(), "{body}");
        // Cleared with a null bind through the same property.
        let body = to_wire(&schema, contact, &BTreeMap::new()).unwrap();
        assert_eq!(body["parentcustomerid_account@odata.bind"], J::Null);
        // A custom lookup's SchemaName keeps its case; an undeclared one is the column's name.
        let site = schema.table("site").unwrap();
        let values = BTreeMap::from([
            ("new_parentsite".to_string(), Value::Lookup(id)),
            ("new_account".to_string(), Value::Lookup(id)),
        ]);
        let body = to_wire(&schema, site, &values).unwrap();
        assert_eq!(
            body["new_ParentSite@odata.bind"],
            json!(format!("/sites({id})"))
        );
        assert_eq!(
            body["new_account@odata.bind"],
            json!(format!("/accounts({id})"))
        );
        // Reads still use the column: `_parentcustomerid_value`.
        assert!(select(contact).contains("_parentcustomerid_value"));
    }
}
