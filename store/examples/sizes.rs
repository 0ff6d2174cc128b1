//! Bytes per key space after a small import (a development aid).
use fieldsync_store::{Schema, Store, StoreOptions, Value};
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let schema = Schema::from_toml(include_str!("../../examples/field-service/schema.toml"))?;
    let store = Store::create(dir.path(), schema, StoreOptions::default())?;
    let rows: Vec<Vec<(String, Value)>> = (0..1000)
        .map(|i: i64| {
            vec![
                ("msdyn_name".to_string(), Value::Text(format!("WO-{i:07}"))),
                (
                    "msdyn_workordersummary".to_string(),
                    Value::Memo(format!("Replace filter on unit {i}")),
                ),
                ("msdyn_systemstatus".to_string(), Value::Choice(690_970_000)),
                ("msdyn_priority".to_string(), Value::Choice(1)),
                (
                    "msdyn_serviceaccount".to_string(),
                    Value::Lookup(uuid::Uuid::from_u128(i as u128)),
                ),
                (
                    "msdyn_primaryincidenttype".to_string(),
                    Value::Text("Maintenance".into()),
                ),
                ("msdyn_estimatedduration".to_string(), Value::Integer(30)),
                (
                    "msdyn_totalamount".to_string(),
                    Value::Decimal(rust_decimal::Decimal::new(12345, 2)),
                ),
                (
                    "msdyn_datewindowstart".to_string(),
                    Value::DateTime(1_790_000_000_000),
                ),
                ("msdyn_latitude".to_string(), Value::Float(47.6)),
                ("msdyn_longitude".to_string(), Value::Float(-122.3)),
                (
                    "ownerid".to_string(),
                    Value::Owner(fieldsync_store::OwnerRef {
                        kind: fieldsync_store::OwnerKind::User,
                        id: uuid::Uuid::from_u128(7),
                    }),
                ),
            ]
        })
        .collect();
    store.bulk_insert("msdyn_workorder", rows, &mut |_| {})?;
    drop(store);
    let db = sled::open(dir.path().join("db"))?;
    let mut sizes = std::collections::BTreeMap::new();
    for kv in db.iter() {
        let (k, v) = kv?;
        let e = sizes
            .entry(k[0] as char)
            .or_insert((0usize, 0usize, 0usize));
        e.0 += 1;
        e.1 += k.len();
        e.2 += v.len();
    }
    for (p, (n, k, v)) in sizes {
        println!(
            "{p}: {n} keys, {} key B/row, {} value B/row",
            k / 1000,
            v / 1000
        );
    }
    Ok(())
}
