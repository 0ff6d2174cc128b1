//! The `fieldsync sim` commands without the `fieldsync` binary:
//! `cargo run -p fieldsync-sim --features cli --example sim -- run scenarios/field-day.toml --seed 3`.

use clap::Parser;
use fieldsync_sim::cli::{execute, SimCommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "sim",
    about = "fieldsync's deterministic connectivity simulator"
)]
struct Args {
    #[command(subcommand)]
    cmd: SimCommand,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match execute(args.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
