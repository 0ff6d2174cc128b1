//! A field app's use of the store: open, load the schema, work offline (create, edit,
//! delete, attach a signature), run a view, read a conflict. Run:
//! `cargo run -p fieldsync-store --example field_app`.

use fieldsync_store::{
    Durability, OpenError, OwnerKind, OwnerRef, Query, Schema, Store, StoreOptions, Value,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. Open the device's store (created on first run) with the app's schema.
    let schema = Schema::from_toml(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/field-service/schema.toml"
    ))?)?;
    let dir = tempfile::tempdir()?; // an app would use its data directory
    let path = dir.path().join("store");
    let store = match Store::open(&path, StoreOptions::default()) {
        // A store keeps the schema it was created with.
        Err(OpenError::NotFound(_)) => Store::create(&path, schema, StoreOptions::default())?,
        opened => opened?,
    };
    let me = Value::Owner(OwnerRef {
        kind: OwnerKind::User,
        id: uuid::Uuid::from_u128(42),
    });

    // 2. Work offline: create, edit, delete. Each commit is on disk when it returns.
    let mut tx = store.begin();
    let wo = tx.insert(
        "msdyn_workorder",
        &[
            ("msdyn_name", Value::Text("WO-0001".into())),
            ("msdyn_priority", Value::Choice(2)),
            ("ownerid", me.clone()),
        ],
    )?;
    let old = tx.insert(
        "msdyn_workorder",
        &[
            ("msdyn_name", Value::Text("WO-0000".into())),
            ("ownerid", me.clone()),
        ],
    )?;
    tx.commit()?;

    let mut tx = store.begin();
    tx.update(
        "msdyn_workorder",
        wo,
        &[("msdyn_workordersummary", Value::Memo("Fan is noisy".into()))],
    )?;
    tx.delete("msdyn_workorder", old)?;
    tx.commit()?;

    // Attach a file or an image: store its bytes (content-addressed, in chunks), then put the
    // reference in the column. An enrolled device uploads the bytes after the edit's op.
    let signature = store.put_blob(
        "signature.png",
        &mut &b"\x89PNG\r\n\x1a\n signed by the customer"[..],
    )?;
    let mut tx = store.begin();
    tx.update(
        "msdyn_workorder",
        wo,
        &[("msdyn_signature", Value::Image(signature.clone()))],
    )?;
    tx.commit()?;
    assert_eq!(store.read_blob(&signature)?.len() as u64, signature.size);

    // 3. A view: my active work orders, newest first (served from an index).
    let view = Query::table("msdyn_workorder")
        .eq("ownerid", me)
        .eq("statecode", Value::Choice(fieldsync_store::STATE_ACTIVE))
        .order_by("modifiedon", fieldsync_store::Order::Desc)
        .limit(50);
    for row in store.query(&view)? {
        println!("{} {}", row.id, row.get("msdyn_name"));
    }

    // 4. A conflict: a dispatcher's device edits the same column concurrently; replication
    //    (here by hand) brings its change over.
    let dispatcher = Store::temporary(store.schema().clone(), StoreOptions::default())?;
    let mine = store.ops_since(0, 1000)?;
    dispatcher.apply_remote(
        &mine.iter().map(|e| e.to_remote()).collect::<Vec<_>>(),
        Durability::Group,
    )?;
    let mut tx = dispatcher.begin();
    tx.update(
        "msdyn_workorder",
        wo,
        &[("msdyn_priority", Value::Choice(1))],
    )?;
    tx.commit()?;
    let mut tx = store.begin();
    tx.update(
        "msdyn_workorder",
        wo,
        &[("msdyn_priority", Value::Choice(3))],
    )?;
    tx.commit()?;
    let theirs = dispatcher.ops_since(0, 1000)?;
    store.apply_remote(
        &theirs.iter().map(|e| e.to_remote()).collect::<Vec<_>>(),
        Durability::Immediate,
    )?;

    for c in store.conflicts("msdyn_workorder", wo)? {
        println!("conflict on {}: showing {}", c.column, c.winner);
        for (value, actor) in &c.values {
            println!("  {value} written by {actor}");
        }
    }
    // Writing the column again resolves it.
    let mut tx = store.begin();
    tx.update(
        "msdyn_workorder",
        wo,
        &[("msdyn_priority", Value::Choice(1))],
    )?;
    tx.commit()?;
    assert!(store.conflicts("msdyn_workorder", wo)?.is_empty());
    Ok(())
}
