//! The parts of `fieldsync-node` that tests and benches use directly: the hub's upstream bridge
//! to Dataverse, and the `$batch` multipart pieces it shares with the emulator. The rest of the
//! binary lives in `main.rs`.

pub mod multipart;
pub mod upstream;

/// Milliseconds since the Unix epoch (a clock before 1970 counts as 0).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs blocking work (the hub replica's lock and storage, fsyncs included) without holding a
/// runtime worker: in `block_in_place` on a multi-threaded runtime, so the worker's other tasks
/// (quinn's endpoint driver, handshakes, the metrics port) move to another thread; directly
/// anywhere else (a current-thread runtime, or no runtime).
pub fn off_worker<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
