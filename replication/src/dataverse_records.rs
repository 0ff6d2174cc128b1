//! A profile as Dataverse's own records: `mobileofflineprofile`, `mobileofflineprofileitem` and
//! `mobileofflineprofileitemassociation`, in Web API JSON with Dataverse's field names and
//! option values, so an existing Dataverse profile can be brought over and back.
//!
//! ```json
//! {
//!   "mobileofflineprofile": {"mobileofflineprofileid": "…", "name": "…", "description": "…"},
//!   "mobileofflineprofileitems": [{
//!     "mobileofflineprofileitemid": "…", "_regardingobjectid_value": "<profile id>",
//!     "name": "account", "selectedentitytypecode": "account",
//!     "recorddistributioncriteria": 2,
//!     "recordsownedbyme": true, "recordsownedbymyteam": false,
//!     "recordsownedbymybusinessunit": false,
//!     "profileitementityfilter": null,
//!     "getrelatedentityrecords": true, "syncintervalinminutes": 10,
//!     "selectedcolumns": "{\"Columns\":[\"name\"]}",
//!     "fieldsync_imagecolumns": "{\"Columns\":[\"logo\"]}", "fieldsync_downloadfiles": false
//!   }],
//!   "mobileofflineprofileitemassociations": [{
//!     "mobileofflineprofileitemassociationid": "…",
//!     "_mobileofflineprofileitemid_value": "<item id>",
//!     "relationshipname": "account_parent_account"
//!   }]
//! }
//! ```
//!
//! `recorddistributioncriteria`: 0 related rows only, 1 all rows, 2 organization rows (with the
//! three `recordsownedby…` flags), 3 custom (`profileitementityfilter`, a FetchXML filter).
//! `selectedcolumns` is left out when every column is downloaded. Image columns and the files
//! switch have no documented Dataverse field: they travel in `fieldsync_imagecolumns` and
//! `fieldsync_downloadfiles` (a Dataverse record without them means no images, no files).
//!
//! FetchXML filters: `<fetch><entity name="…"><filter type="and|or">` with nested filters and
//! `<condition attribute="…" operator="…" value="…"/>` (or `<value>` children for `in`), or a
//! bare `<filter>`. The operators are those of [`crate::profile::expr`]; any other operator
//! (e.g. `between`, `eq-useroruserhierarchy`) and any `link-entity` is refused by name.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fieldsync_store::{ColumnType, Schema, Table, Value};
use serde_json::{json, Map, Value as J};
use uuid::Uuid;

use crate::profile::expr::{Condition, Expr, Op, SUPPORTED_OPERATORS};
use crate::profile::{Profile, ProfileError, ProfileItem, RowFilter};

/// Why Dataverse records could not be read as a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// The text is not JSON of the expected shape.
    #[error("not valid profile records JSON: {0}")]
    Json(String),
    /// A required field is missing or has the wrong JSON type.
    #[error("{record}: field `{field}` is missing or not of the expected type")]
    Field {
        /// The record kind.
        record: &'static str,
        /// The field.
        field: &'static str,
    },
    /// An option value Dataverse does not define for the field.
    #[error("`{field}` = {value} is not a known option")]
    Option {
        /// The field.
        field: &'static str,
        /// The value found.
        value: i64,
    },
    /// An association that names an item not among the items.
    #[error("association names item {0}, which is not among the profile's items")]
    UnknownItem(String),
    /// A FetchXML filter that is not well-formed or uses unsupported parts.
    #[error("profileitementityfilter of `{table}`: {reason}")]
    FetchXml {
        /// The item's table.
        table: String,
        /// What is wrong.
        reason: String,
    },
    /// The resulting profile does not fit the schema (or uses an unsupported operator).
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

fn item_id(profile: &Profile, table: &str) -> Uuid {
    Uuid::new_v5(&profile.id, format!("item:{table}").as_bytes())
}

fn columns_json(cols: &[String]) -> String {
    json!({ "Columns": cols }).to_string()
}

/// Export a profile as Dataverse records (JSON).
pub fn export_records(profile: &Profile) -> J {
    let mut items = Vec::new();
    let mut assocs = Vec::new();
    for (table, item) in &profile.items {
        let iid = item_id(profile, table);
        let (criteria, me, team, bu, filter) = match &item.filter {
            RowFilter::RelatedOnly => (0, false, false, false, J::Null),
            RowFilter::All => (1, false, false, false, J::Null),
            RowFilter::Organization {
                owned_by_me,
                owned_by_my_teams,
                owned_by_my_business_unit,
            } => (
                2,
                *owned_by_me,
                *owned_by_my_teams,
                *owned_by_my_business_unit,
                J::Null,
            ),
            RowFilter::Custom(e) => (3, false, false, false, J::String(to_fetchxml(table, e))),
        };
        let mut rec = Map::new();
        rec.insert("mobileofflineprofileitemid".into(), json!(iid.to_string()));
        rec.insert(
            "_regardingobjectid_value".into(),
            json!(profile.id.to_string()),
        );
        rec.insert("name".into(), json!(table));
        rec.insert("selectedentitytypecode".into(), json!(table));
        rec.insert("recorddistributioncriteria".into(), json!(criteria));
        rec.insert("recordsownedbyme".into(), json!(me));
        rec.insert("recordsownedbymyteam".into(), json!(team));
        rec.insert("recordsownedbymybusinessunit".into(), json!(bu));
        rec.insert("profileitementityfilter".into(), filter);
        rec.insert(
            "getrelatedentityrecords".into(),
            json!(!item.relationships.is_empty()),
        );
        rec.insert(
            "syncintervalinminutes".into(),
            json!(item.sync_interval_minutes),
        );
        if let Some(cols) = &item.columns {
            rec.insert("selectedcolumns".into(), json!(columns_json(cols)));
        }
        if !item.images.is_empty() {
            rec.insert(
                "fieldsync_imagecolumns".into(),
                json!(columns_json(&item.images)),
            );
        }
        rec.insert("fieldsync_downloadfiles".into(), json!(item.files));
        items.push(J::Object(rec));
        for rel in &item.relationships {
            assocs.push(json!({
                "mobileofflineprofileitemassociationid":
                    Uuid::new_v5(&iid, rel.as_bytes()).to_string(),
                "_mobileofflineprofileitemid_value": iid.to_string(),
                "relationshipname": rel,
                "relationshipdisplayname": rel,
            }));
        }
    }
    json!({
        "mobileofflineprofile": {
            "mobileofflineprofileid": profile.id.to_string(),
            "name": profile.name,
            "description": profile.description,
        },
        "mobileofflineprofileitems": items,
        "mobileofflineprofileitemassociations": assocs,
    })
}

fn get_str<'a>(
    rec: &'a J,
    record: &'static str,
    field: &'static str,
) -> Result<&'a str, RecordsError> {
    rec.get(field)
        .and_then(J::as_str)
        .ok_or(RecordsError::Field { record, field })
}

fn get_bool(rec: &J, field: &'static str) -> bool {
    match rec.get(field) {
        Some(J::Bool(b)) => *b,
        Some(J::Number(n)) => n.as_i64() == Some(1),
        _ => false,
    }
}

fn parse_uuid(s: &str, record: &'static str, field: &'static str) -> Result<Uuid, RecordsError> {
    Uuid::parse_str(s.trim_matches(|c| c == '{' || c == '}'))
        .map_err(|_| RecordsError::Field { record, field })
}

fn parse_columns(rec: &J, field: &'static str) -> Result<Option<Vec<String>>, RecordsError> {
    let Some(s) = rec.get(field).and_then(J::as_str) else {
        return Ok(None);
    };
    let v: J = serde_json::from_str(s).map_err(|e| RecordsError::Json(e.to_string()))?;
    let cols = v
        .get("Columns")
        .and_then(J::as_array)
        .ok_or(RecordsError::Field {
            record: "mobileofflineprofileitem",
            field,
        })?;
    Ok(Some(
        cols.iter()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect(),
    ))
}

/// Import a profile from Dataverse records (JSON text), checked against a schema.
pub fn import_records(text: &str, schema: &Schema) -> Result<Profile, RecordsError> {
    let root: J = serde_json::from_str(text).map_err(|e| RecordsError::Json(e.to_string()))?;
    const P: &str = "mobileofflineprofile";
    const I: &str = "mobileofflineprofileitem";
    const A: &str = "mobileofflineprofileitemassociation";
    let p = root.get(P).ok_or(RecordsError::Field {
        record: P,
        field: "mobileofflineprofile",
    })?;
    let id = parse_uuid(
        get_str(p, P, "mobileofflineprofileid")?,
        P,
        "mobileofflineprofileid",
    )?;
    let mut profile = Profile {
        id,
        name: get_str(p, P, "name")?.to_string(),
        description: p
            .get("description")
            .and_then(J::as_str)
            .unwrap_or("")
            .to_string(),
        items: BTreeMap::new(),
    };
    let empty = Vec::new();
    let items = root
        .get("mobileofflineprofileitems")
        .and_then(J::as_array)
        .unwrap_or(&empty);
    let mut by_id: BTreeMap<Uuid, String> = BTreeMap::new();
    for rec in items {
        let table_name = get_str(rec, I, "selectedentitytypecode")?.to_string();
        let table = schema
            .table(&table_name)
            .map_err(|_| ProfileError::UnknownTable(table_name.clone()))?;
        if let Some(s) = rec.get("mobileofflineprofileitemid").and_then(J::as_str) {
            by_id.insert(
                parse_uuid(s, I, "mobileofflineprofileitemid")?,
                table_name.clone(),
            );
        }
        let criteria = rec
            .get("recorddistributioncriteria")
            .and_then(J::as_i64)
            .ok_or(RecordsError::Field {
                record: I,
                field: "recorddistributioncriteria",
            })?;
        let filter = match criteria {
            0 => RowFilter::RelatedOnly,
            1 => RowFilter::All,
            2 => RowFilter::Organization {
                owned_by_me: get_bool(rec, "recordsownedbyme"),
                owned_by_my_teams: get_bool(rec, "recordsownedbymyteam"),
                owned_by_my_business_unit: get_bool(rec, "recordsownedbymybusinessunit"),
            },
            3 => {
                let xml = get_str(rec, I, "profileitementityfilter")?;
                RowFilter::Custom(parse_fetchxml(xml, table)?)
            }
            other => {
                return Err(RecordsError::Option {
                    field: "recorddistributioncriteria",
                    value: other,
                })
            }
        };
        let interval = rec
            .get("syncintervalinminutes")
            .and_then(J::as_i64)
            .unwrap_or(i64::from(crate::profile::SYNC_INTERVAL_DEFAULT_MINUTES));
        let mut item = ProfileItem::new(&table_name, filter);
        item.sync_interval_minutes = u32::try_from(interval).unwrap_or(0);
        item.columns = parse_columns(rec, "selectedcolumns")?;
        item.images = parse_columns(rec, "fieldsync_imagecolumns")?.unwrap_or_default();
        item.files = get_bool(rec, "fieldsync_downloadfiles");
        profile.items.insert(table_name, item);
    }
    let assocs = root
        .get("mobileofflineprofileitemassociations")
        .and_then(J::as_array)
        .unwrap_or(&empty);
    for rec in assocs {
        let iid = get_str(rec, A, "_mobileofflineprofileitemid_value")?;
        let table = by_id
            .get(&parse_uuid(iid, A, "_mobileofflineprofileitemid_value")?)
            .ok_or_else(|| RecordsError::UnknownItem(iid.to_string()))?;
        let rel = get_str(rec, A, "relationshipname")?.to_string();
        if let Some(item) = profile.items.get_mut(table) {
            if !item.relationships.contains(&rel) {
                item.relationships.push(rel);
            }
        }
    }
    profile.validate(schema)?;
    Ok(profile)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn value_text(v: &Value) -> String {
    v.to_string()
}

fn write_expr(out: &mut String, e: &Expr) {
    match e {
        Expr::And(v) | Expr::Or(v) => {
            let kind = if matches!(e, Expr::And(_)) {
                "and"
            } else {
                "or"
            };
            let _ = write!(out, "<filter type=\"{kind}\">");
            for x in v {
                write_expr(out, x);
            }
            out.push_str("</filter>");
        }
        Expr::Cond(c) => {
            let attr = xml_escape(&c.column);
            let op = c.op.name();
            match &c.op {
                Op::Eq(v) | Op::Ne(v) | Op::Lt(v) | Op::Le(v) | Op::Gt(v) | Op::Ge(v) => {
                    let _ = write!(
                        out,
                        "<condition attribute=\"{attr}\" operator=\"{op}\" value=\"{}\"/>",
                        xml_escape(&value_text(v))
                    );
                }
                Op::Like(p) => {
                    let _ = write!(
                        out,
                        "<condition attribute=\"{attr}\" operator=\"like\" value=\"{}\"/>",
                        xml_escape(p)
                    );
                }
                Op::LastXDays(n) | Op::NextXDays(n) => {
                    let _ = write!(
                        out,
                        "<condition attribute=\"{attr}\" operator=\"{op}\" value=\"{n}\"/>"
                    );
                }
                Op::In(vs) => {
                    let _ = write!(out, "<condition attribute=\"{attr}\" operator=\"in\">");
                    for v in vs {
                        let _ = write!(out, "<value>{}</value>", xml_escape(&value_text(v)));
                    }
                    out.push_str("</condition>");
                }
                _ => {
                    let _ = write!(out, "<condition attribute=\"{attr}\" operator=\"{op}\"/>");
                }
            }
        }
    }
}

/// A custom filter as a FetchXML document over its table.
pub fn to_fetchxml(table: &str, e: &Expr) -> String {
    let mut out = format!(
        "<fetch version=\"1.0\" mapping=\"logical\"><entity name=\"{}\">",
        xml_escape(table)
    );
    match e {
        Expr::Cond(_) => {
            out.push_str("<filter type=\"and\">");
            write_expr(&mut out, e);
            out.push_str("</filter>");
        }
        _ => write_expr(&mut out, e),
    }
    out.push_str("</entity></fetch>");
    out
}

#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        let end = rest[p..]
            .find(';')
            .ok_or_else(|| "unterminated entity".to_string())?;
        let ent = &rest[p + 1..p + end];
        match ent {
            "amp" => out.push('&'),
            "lt" => out.push('<'),
            "gt" => out.push('>'),
            "quot" => out.push('"'),
            "apos" => out.push('\''),
            _ => {
                let code = ent
                    .strip_prefix("#x")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown entity `&{ent};`"))?;
                out.push(code);
            }
        }
        rest = &rest[p + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A small XML reader: elements, attributes, text, comments and declarations. Enough for
/// FetchXML; not a general XML parser.
fn parse_xml(text: &str) -> Result<Element, String> {
    let mut stack: Vec<Element> = vec![Element::default()];
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("<!--") {
            let end = r.find("-->").ok_or("unterminated comment")?;
            rest = &r[end + 3..];
        } else if let Some(r) = rest.strip_prefix("<?") {
            let end = r.find("?>").ok_or("unterminated declaration")?;
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix("</") {
            let end = r.find('>').ok_or("unterminated end tag")?;
            let name = r[..end].trim();
            let el = stack.pop().ok_or("unbalanced end tag")?;
            if el.name != name {
                return Err(format!("`</{name}>` closes `<{}>`", el.name));
            }
            stack
                .last_mut()
                .ok_or("unbalanced end tag")?
                .children
                .push(el);
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('<') {
            // Find the end of the tag, skipping quoted attribute values.
            let mut quote = None;
            let mut end = None;
            for (i, c) in r.char_indices() {
                match (quote, c) {
                    (None, '"' | '\'') => quote = Some(c),
                    (Some(q), c) if c == q => quote = None,
                    (None, '>') => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.ok_or("unterminated tag")?;
            let mut tag = &r[..end];
            let self_closing = tag.ends_with('/');
            if self_closing {
                tag = &tag[..tag.len() - 1];
            }
            let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
            let mut el = Element {
                name: tag[..name_end].to_string(),
                ..Element::default()
            };
            if el.name.is_empty() {
                return Err("empty tag name".into());
            }
            let mut a = tag[name_end..].trim_start();
            while !a.is_empty() {
                let eq = a.find('=').ok_or("attribute without a value")?;
                let key = a[..eq].trim().to_string();
                let v = a[eq + 1..].trim_start();
                let q = v.chars().next().ok_or("attribute without a value")?;
                if q != '"' && q != '\'' {
                    return Err(format!("attribute `{key}` is not quoted"));
                }
                let close = v[1..].find(q).ok_or("unterminated attribute value")?;
                el.attrs.push((key, unescape(&v[1..1 + close])?));
                a = v[close + 2..].trim_start();
            }
            rest = &r[end + 1..];
            if self_closing {
                stack.last_mut().ok_or("unbalanced tag")?.children.push(el);
            } else {
                stack.push(el);
            }
        } else {
            let end = rest.find('<').unwrap_or(rest.len());
            let t = unescape(&rest[..end])?;
            if let Some(top) = stack.last_mut() {
                top.text.push_str(&t);
            }
            rest = &rest[end..];
        }
    }
    let mut doc = stack.pop().ok_or("empty document")?;
    if !stack.is_empty() {
        return Err(format!("`<{}>` is not closed", doc.name));
    }
    if doc.children.len() != 1 {
        return Err("expected exactly one root element".into());
    }
    doc.children.pop().ok_or_else(|| "empty document".into())
}

/// Parse a FetchXML filter (a `<fetch>` document or a bare `<filter>`) into a filter
/// expression over `table`, refusing unsupported operators by name.
pub fn parse_fetchxml(xml: &str, table: &Table) -> Result<Expr, RecordsError> {
    let err = |reason: String| RecordsError::FetchXml {
        table: table.name.clone(),
        reason,
    };
    let root = parse_xml(xml).map_err(&err)?;
    let filters: Vec<&Element> = match root.name.as_str() {
        "filter" => vec![&root],
        "fetch" => {
            let entity = root
                .children
                .iter()
                .find(|c| c.name == "entity")
                .ok_or_else(|| err("`<fetch>` has no `<entity>`".into()))?;
            if let Some(n) = entity.attr("name") {
                if n != table.name {
                    return Err(err(format!("the filter is for `{n}`")));
                }
            }
            for c in &entity.children {
                if c.name == "link-entity" {
                    return Err(err(
                        "`link-entity` (conditions on related tables) is not supported; select the relationship instead"
                            .into(),
                    ));
                }
            }
            entity
                .children
                .iter()
                .filter(|c| c.name == "filter")
                .collect()
        }
        other => return Err(err(format!("unexpected root element `<{other}>`"))),
    };
    let mut parts = Vec::new();
    for f in filters {
        parts.push(filter_expr(f, table)?);
    }
    let e = if parts.len() == 1 {
        parts.pop().unwrap_or(Expr::And(Vec::new()))
    } else {
        Expr::And(parts)
    };
    e.check(table)?;
    Ok(e)
}

fn filter_expr(f: &Element, table: &Table) -> Result<Expr, RecordsError> {
    let err = |reason: String| RecordsError::FetchXml {
        table: table.name.clone(),
        reason,
    };
    let mut parts = Vec::new();
    for c in &f.children {
        match c.name.as_str() {
            "filter" => parts.push(filter_expr(c, table)?),
            "condition" => parts.push(Expr::Cond(condition(c, table)?)),
            "link-entity" => {
                return Err(err("`link-entity` is not supported".into()));
            }
            other => return Err(err(format!("unexpected element `<{other}>` in a filter"))),
        }
    }
    match f.attr("type").unwrap_or("and") {
        "and" => Ok(Expr::And(parts)),
        "or" => Ok(Expr::Or(parts)),
        other => Err(err(format!("filter type `{other}` (expected and or or)"))),
    }
}

fn condition(c: &Element, table: &Table) -> Result<Condition, RecordsError> {
    let err = |reason: String| RecordsError::FetchXml {
        table: table.name.clone(),
        reason,
    };
    if c.attr("entityname").is_some() {
        return Err(err(
            "conditions on related tables (`entityname`) are not supported".into(),
        ));
    }
    let column = c
        .attr("attribute")
        .ok_or_else(|| err("a condition without `attribute`".into()))?
        .to_string();
    let op_name = c
        .attr("operator")
        .ok_or_else(|| err(format!("condition on `{column}` without `operator`")))?;
    if !SUPPORTED_OPERATORS.contains(&op_name) {
        return Err(ProfileError::UnsupportedOperator {
            operator: op_name.to_string(),
        }
        .into());
    }
    let col = table
        .column(&column)
        .ok_or_else(|| ProfileError::UnknownColumn {
            table: table.name.clone(),
            column: column.clone(),
        })?;
    let ty = col.ty;
    let parse = |s: &str| -> Result<Value, RecordsError> {
        let s = s.trim();
        match ty {
            ColumnType::Text => Ok(Value::Text(s.to_string())),
            ColumnType::Memo => Ok(Value::Memo(s.to_string())),
            ColumnType::Lookup | ColumnType::Owner => {
                Value::parse(ty, s.trim_matches(|c| c == '{' || c == '}'))
                    .map_err(|e| err(e.to_string()))
            }
            _ => Value::parse(ty, s).map_err(|e| err(e.to_string())),
        }
    };
    let one = || -> Result<Value, RecordsError> {
        let v = c
            .attr("value")
            .map(str::to_string)
            .or_else(|| c.children.first().map(|v| v.text.clone()))
            .ok_or_else(|| err(format!("`{op_name}` on `{column}` needs a value")))?;
        parse(&v)
    };
    let days = || -> Result<u32, RecordsError> {
        c.attr("value")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| err(format!("`{op_name}` needs a number of days")))
    };
    let op = match op_name {
        "eq" => Op::Eq(one()?),
        "ne" => Op::Ne(one()?),
        "lt" => Op::Lt(one()?),
        "le" => Op::Le(one()?),
        "gt" => Op::Gt(one()?),
        "ge" => Op::Ge(one()?),
        "like" => Op::Like(
            c.attr("value")
                .map(str::to_string)
                .ok_or_else(|| err("`like` needs a value".into()))?,
        ),
        "in" => {
            let vs: Vec<Value> = c
                .children
                .iter()
                .filter(|v| v.name == "value")
                .map(|v| parse(&v.text))
                .collect::<Result<_, _>>()?;
            if vs.is_empty() {
                return Err(err("`in` needs `<value>` children".into()));
            }
            Op::In(vs)
        }
        "null" => Op::Null,
        "not-null" => Op::NotNull,
        "eq-userid" => Op::EqUserId,
        "eq-userteams" => Op::EqUserTeams,
        "eq-useroruserteams" => Op::EqUserOrUserTeams,
        "eq-businessid" => Op::EqBusinessId,
        "last-x-days" => Op::LastXDays(days()?),
        "next-x-days" => Op::NextXDays(days()?),
        other => {
            return Err(ProfileError::UnsupportedOperator {
                operator: other.to_string(),
            }
            .into())
        }
    };
    Ok(Condition { column, op })
}
