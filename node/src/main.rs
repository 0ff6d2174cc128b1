//! The `fieldsync` binary: device commands, offline profile tools, and (as they land) the hub,
//! the Dataverse emulator, the simulator and the demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod demo_upstream;
mod device_cmd;
mod device_sync;
mod emulator;
mod hub_admin;
mod hub_cmd;
mod profile_cmd;
mod sync;

/// fieldsync: an offline-first sync engine for field apps.
#[derive(Debug, Parser)]
#[command(name = "fieldsync", version, about)]
struct Cli {
    /// Log format on stderr (`RUST_LOG` sets the level; default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with a device's local store: create, edit, query, inspect.
    #[command(subcommand)]
    Device(device_cmd::DeviceCommand),
    /// Run a hub: init, serve, enroll and revoke devices.
    #[command(subcommand)]
    Hub(hub_cmd::HubCommand),
    /// Simulate spotty connectivity over the real store and protocol: run a scenario, or sweep
    /// a parameter.
    #[command(subcommand)]
    Sim(fieldsync_sim::cli::SimCommand),
    /// An embedded hub and three devices on loopback QUIC: offline edits, a conflict, a
    /// rejected write and an owner change, then what each device holds.
    Demo {
        /// Keep the demo's directories here instead of a temporary directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Relay the hub to an in-process Dataverse Web API emulator, and show an office edit
        /// reaching a device and device edits reaching Dataverse.
        #[arg(long)]
        upstream_emulator: bool,
    },
    /// Offline profiles: validate, show, generate from an app, estimate sizes, Dataverse records.
    #[command(subcommand)]
    Profile(profile_cmd::ProfileCommand),
    /// Serve a local emulator of the Dataverse Web API (the subset fieldsync uses).
    DataverseEmulator(emulator::EmulatorArgs),
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // sled reports what it finds in a damaged directory as log records; the store turns
        // that into one typed error, so by default they would only repeat it.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sled=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Device(cmd) => device_cmd::run(cmd),
        Command::Hub(cmd) => hub_cmd::run(cmd),
        Command::Sim(cmd) => match fieldsync_sim::cli::execute(cmd) {
            // FAILURE when an invariant was violated: the report says which.
            Ok(code) => return code,
            Err(e) => Err(anyhow::Error::new(e)),
        },
        Command::Demo {
            dir,
            upstream_emulator,
        } => demo::run(dir.as_deref(), upstream_emulator),
        Command::Profile(cmd) => profile_cmd::run(cmd),
        Command::DataverseEmulator(args) => emulator::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, outermost first. A cause whose text the line
/// already ends with (after a `: `) is left out: many errors put their source in their own text
/// (`I/O error: {0}`), and `{:#}` would print the OS message twice.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if line != text && !line.ends_with(&format!(": {text}")) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_already_in_its_message_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(fieldsync_store::StoreError::Io(io)).context("cannot open");
        assert_eq!(one_line(&err), "cannot open: I/O error: no such file");
        let err = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(one_line(&err), "outer: middle: inner");
        // A cause that merely ends the message's last word is kept.
        let err = anyhow::anyhow!("0").context("no listener on port 80");
        assert_eq!(one_line(&err), "no listener on port 80: 0");
    }
}
