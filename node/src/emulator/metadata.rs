//! `EntityDefinitions`: tables, their `Attributes` and relationships, rendered from the schema
//! with the property names of Dataverse's `EntityMetadata`, `AttributeMetadata` and
//! `OneToManyRelationshipMetadata` (`webapi/query-metadata-web-api.md`). Only the properties a
//! hub reads are present; `MetadataId`s are derived from names, so they are stable.

use fieldsync_store::{ColumnType, Ownership, Relationship, Schema, Table};
use serde_json::{json, Map, Value as J};

use super::security::derived_id;

/// The `SchemaName` the emulator gives a logical name: as is (Dataverse capitalizes system
/// names; custom ones keep their publisher prefix), so it is stable and unique.
fn schema_name(logical: &str) -> String {
    let mut c = logical.chars();
    match c.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

/// `AttributeType` and `AttributeTypeName.Value` for a column type.
fn attribute_type(ty: ColumnType, name: &str) -> (&'static str, &'static str) {
    match ty {
        ColumnType::Text => ("String", "StringType"),
        ColumnType::Memo => ("Memo", "MemoType"),
        ColumnType::Integer => ("Integer", "IntegerType"),
        ColumnType::Decimal => ("Decimal", "DecimalType"),
        ColumnType::Float => ("Double", "DoubleType"),
        ColumnType::Boolean => ("Boolean", "BooleanType"),
        ColumnType::DateTime => ("DateTime", "DateTimeType"),
        ColumnType::Choice if name == "statecode" => ("State", "StateType"),
        ColumnType::Choice => ("Picklist", "PicklistType"),
        ColumnType::Lookup => ("Lookup", "LookupType"),
        ColumnType::Owner => ("Owner", "OwnerType"),
        ColumnType::File => ("Virtual", "FileType"),
        ColumnType::Image => ("Virtual", "ImageType"),
    }
}

/// The primary name column: `name`, else `fullname`, else the first text column.
fn primary_name(table: &Table) -> Option<String> {
    for candidate in ["name", "fullname", "title", "msdyn_name", "lastname"] {
        if table.column(candidate).is_some() {
            return Some(candidate.to_string());
        }
    }
    table
        .columns
        .iter()
        .find(|c| c.ty == ColumnType::Text)
        .map(|c| c.name.clone())
}

/// One `EntityMetadata` object, without navigation collections.
pub fn entity(table: &Table) -> Map<String, J> {
    let mut m = Map::new();
    m.insert(
        "MetadataId".into(),
        json!(derived_id("entity", &table.name).to_string()),
    );
    m.insert("LogicalName".into(), json!(table.name));
    m.insert("SchemaName".into(), json!(schema_name(&table.name)));
    m.insert("EntitySetName".into(), json!(table.entity_set));
    m.insert("LogicalCollectionName".into(), json!(table.entity_set));
    m.insert(
        "PrimaryIdAttribute".into(),
        json!(table.primary_id_column()),
    );
    m.insert("PrimaryNameAttribute".into(), json!(primary_name(table)));
    m.insert(
        "OwnershipType".into(),
        json!(match table.ownership {
            Ownership::UserOrTeam => "UserOwned",
            Ownership::Organization => "OrganizationOwned",
        }),
    );
    m.insert("IsAvailableOffline".into(), json!(table.offline));
    // Every emulated table tracks changes (the emulator keeps tombstones for all of them).
    m.insert("ChangeTrackingEnabled".into(), json!(true));
    m.insert("IsCustomEntity".into(), json!(table.name.contains('_')));
    m.insert("IsActivity".into(), json!(false));
    m.insert(
        "CanChangeTrackingBeEnabled".into(),
        json!({"Value": true, "CanBeChanged": false,
               "ManagedPropertyLogicalName": "canchangetrackingbeenabled"}),
    );
    m
}

/// The `Attributes` of a table, primary id first.
pub fn attributes(table: &Table) -> Vec<J> {
    let mut out = vec![json!({
        "MetadataId": derived_id("attribute", &format!("{}.{}", table.name, table.primary_id_column())).to_string(),
        "LogicalName": table.primary_id_column(),
        "SchemaName": schema_name(&table.primary_id_column()),
        "EntityLogicalName": table.name,
        "AttributeType": "Uniqueidentifier",
        "AttributeTypeName": {"Value": "UniqueidentifierType"},
        "IsPrimaryId": true,
        "IsPrimaryName": false,
        "IsValidForCreate": true,
        "IsValidForUpdate": false,
        "Targets": null,
    })];
    let name_col = primary_name(table);
    for col in &table.columns {
        let (ty, type_name) = attribute_type(col.ty, &col.name);
        let targets = match col.ty {
            ColumnType::Lookup => col.target.as_ref().map(|t| json!([t])),
            ColumnType::Owner => Some(json!(["systemuser", "team"])),
            _ if col.name == "owningbusinessunit" => Some(json!(["businessunit"])),
            _ => None,
        };
        let system_only = matches!(
            col.name.as_str(),
            "createdon" | "modifiedon" | "owningbusinessunit"
        );
        let mut a = json!({
            "MetadataId": derived_id("attribute", &format!("{}.{}", table.name, col.name)).to_string(),
            "LogicalName": col.name,
            "SchemaName": schema_name(&col.name),
            "EntityLogicalName": table.name,
            "AttributeType": ty,
            "AttributeTypeName": {"Value": type_name},
            "IsPrimaryId": false,
            "IsPrimaryName": Some(&col.name) == name_col.as_ref(),
            "IsValidForCreate": !system_only && !matches!(col.ty, ColumnType::File | ColumnType::Image),
            "IsValidForUpdate": !system_only && !matches!(col.ty, ColumnType::File | ColumnType::Image),
            "Targets": targets,
        });
        if col.ty == ColumnType::Choice && !col.options.is_empty() {
            a["OptionValues"] = json!(col.options);
        }
        if let Some(max) = super::files::max_size_kb(col) {
            a["MaxSizeInKB"] = json!(max);
        }
        if col.ty == ColumnType::Image {
            a["CanStoreFullImage"] = json!(true);
        }
        out.push(a);
    }
    out
}

fn relationship(schema_name: &str, referencing: &str, column: &str, referenced: &str) -> J {
    relationship_via(schema_name, referencing, column, column, referenced)
}

/// A lookup's relationship, with the navigation property a write names.
fn lookup_relationship(schema: &Schema, r: &Relationship) -> J {
    let navigation = schema
        .table(&r.table)
        .ok()
        .and_then(|t| t.column(&r.column))
        .map_or(r.column.as_str(), |c| c.navigation_property());
    relationship_via(&r.name, &r.table, &r.column, navigation, &r.target)
}

fn relationship_via(
    schema_name: &str,
    referencing: &str,
    column: &str,
    navigation: &str,
    referenced: &str,
) -> J {
    json!({
        "MetadataId": derived_id("relationship", schema_name).to_string(),
        "SchemaName": schema_name,
        "RelationshipType": "OneToManyRelationship",
        "ReferencedEntity": referenced,
        "ReferencedAttribute": format!("{referenced}id"),
        "ReferencingEntity": referencing,
        "ReferencingAttribute": column,
        "ReferencingEntityNavigationPropertyName": navigation,
        "ReferencedEntityNavigationPropertyName": schema_name,
        "IsValidForAdvancedFind": true,
    })
}

/// N:1 relationships where `table` holds the lookup, including the owner relationships.
pub fn many_to_one(schema: &Schema, table: &Table) -> Vec<J> {
    let mut out: Vec<J> = schema
        .relationships()
        .iter()
        .filter(|r| r.table == table.name)
        .map(|r| lookup_relationship(schema, r))
        .collect();
    if table.ownership == Ownership::UserOrTeam {
        out.push(relationship(
            &format!("business_unit_{}", table.entity_set),
            &table.name,
            "owningbusinessunit",
            "businessunit",
        ));
        out.push(relationship(
            &format!("user_{}", table.name),
            &table.name,
            "owninguser",
            "systemuser",
        ));
        out.push(relationship(
            &format!("team_{}", table.name),
            &table.name,
            "owningteam",
            "team",
        ));
    }
    out
}

/// 1:N relationships where `table` is the target of a lookup.
pub fn one_to_many(schema: &Schema, table: &Table) -> Vec<J> {
    schema
        .relationships()
        .iter()
        .filter(|r| r.target == table.name)
        .map(|r| lookup_relationship(schema, r))
        .collect()
}
