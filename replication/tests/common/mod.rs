//! Shared helpers for the replication tests.
// Test helpers may unwrap: a panic there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use fieldsync_replication::RowView;
use fieldsync_store::{OwnerKind, OwnerRef, RowId, Schema, Value};
use uuid::Uuid;

pub fn example(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/field-service")
        .join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn example_schema() -> Schema {
    Schema::from_toml(&example("schema.toml")).unwrap()
}

/// A small schema with a self reference (`node.parent`) and a cycle (`a.b` → `b`, `b.a` → `a`).
pub const CYCLE_SCHEMA: &str = r#"
[tables.a]
offline = true
[tables.a.columns]
name = "text"
n = "integer"
b = { lookup = "b", relationship = "a_b" }
[tables.b]
offline = true
[tables.b.columns]
name = "text"
a = { lookup = "a", relationship = "b_a" }
[tables.node]
offline = true
[tables.node.columns]
name = "text"
parent = { lookup = "node", relationship = "node_parent" }
[tables.org]
offline = true
ownership = "organization"
[tables.org.columns]
name = "text"
[tables.hidden]
offline = false
[tables.hidden.columns]
name = "text"
"#;

#[derive(Debug, Clone)]
pub struct TestRow {
    pub table: String,
    pub id: RowId,
    pub values: BTreeMap<String, Value>,
}

impl TestRow {
    pub fn new(table: &str) -> TestRow {
        TestRow {
            table: table.to_string(),
            id: Uuid::new_v4(),
            values: BTreeMap::new(),
        }
    }
    pub fn owner_user(mut self, id: Uuid) -> TestRow {
        self.values.insert(
            "ownerid".into(),
            Value::Owner(OwnerRef {
                kind: OwnerKind::User,
                id,
            }),
        );
        self
    }
    pub fn owner_team(mut self, id: Uuid) -> TestRow {
        self.values.insert(
            "ownerid".into(),
            Value::Owner(OwnerRef {
                kind: OwnerKind::Team,
                id,
            }),
        );
        self
    }
    pub fn set(mut self, col: &str, v: Value) -> TestRow {
        self.values.insert(col.into(), v);
        self
    }
    pub fn view(&self) -> RowView<'_> {
        RowView {
            table: &self.table,
            id: self.id,
            values: &self.values,
        }
    }
}

pub fn views(rows: &[TestRow]) -> Vec<RowView<'_>> {
    rows.iter().map(TestRow::view).collect()
}
