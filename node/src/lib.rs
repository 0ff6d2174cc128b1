//! The parts of `fieldsync-node` that tests and benches use directly: the hub's upstream bridge
//! to Dataverse. The rest of the binary lives in `main.rs`.

pub mod upstream;
