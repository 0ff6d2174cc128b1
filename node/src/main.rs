//! The `fieldsync` binary.
fn main() {}
