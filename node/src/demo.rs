//! `fieldsync demo`.
use anyhow::Result;

pub fn run(_dir: Option<&std::path::Path>) -> Result<()> {
    anyhow::bail!("demo not built yet")
}
