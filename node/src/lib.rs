//! The parts of `fieldsync-node` that tests and benches use directly: the hub's upstream bridge
//! to Dataverse, and the `$batch` multipart pieces it shares with the emulator. The rest of the
//! binary lives in `main.rs`.

pub mod multipart;
pub mod upstream;
