//! Helpers shared by the workspace end-to-end tests: they run the real `fieldsync` binary as
//! separate processes.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `examples/field-service/<name>` in the workspace.
pub fn field_service(name: &str) -> PathBuf {
    workspace_root()
        .join("examples")
        .join("field-service")
        .join(name)
}

/// The `fieldsync` binary, brought up to date once per test process with the same cargo that
/// runs the tests.
///
/// It asks for the workspace's test build (`cargo test --workspace --no-run`), not a plain
/// `cargo build`: that resolves features exactly as `cargo test --workspace` does, so under the
/// README's test command it finds everything built and rebuilds nothing.
///
/// Panics (failing the test) when the build fails.
pub fn fieldsync_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = workspace_root();
        let status = Command::new(cargo)
            .args(["test", "-q", "--workspace", "--no-run"])
            .current_dir(&root)
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo build: {e}"));
        assert!(status.success(), "cargo build of fieldsync failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug").join("fieldsync");
        assert!(bin.exists(), "no fieldsync binary at {}", bin.display());
        bin
    })
}

/// Run `fieldsync` with these arguments and wait for it.
pub fn fieldsync<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(fieldsync_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run fieldsync: {e}"))
}

/// Run `fieldsync`, require success, and return its stdout.
pub fn fieldsync_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = fieldsync(args);
    assert!(
        out.status.success(),
        "fieldsync failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `fieldsync`, require failure with exactly one line on stderr, and return that line.
pub fn fieldsync_err<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = fieldsync(args);
    assert!(
        !out.status.success(),
        "fieldsync should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(!stderr.contains("panicked"), "fieldsync panicked: {stderr}");
    lines[0].to_string()
}

/// A free UDP port on loopback (bound and released; the hub binds it right after).
pub fn free_udp_port() -> u16 {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a UDP port: {e}"));
    sock.local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .port()
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a test that fails
/// half-way leaves no process behind.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// SIGTERM, then its exit status.
    pub fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()?;
        self.0.wait()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `fieldsync hub serve` process.
#[derive(Debug)]
pub struct HubProcess {
    child: std::process::Child,
    /// The address it listens on.
    pub addr: String,
    /// The metrics address, if asked for.
    pub metrics: Option<String>,
}

impl HubProcess {
    /// Spawns `fieldsync hub serve --data DATA --listen LISTEN [--metrics M]` and waits for its
    /// "listening on" line (and the metrics line).
    pub fn spawn(data: &Path, listen: &str, metrics: Option<&str>) -> HubProcess {
        use std::io::BufRead;
        let mut cmd = Command::new(fieldsync_bin());
        cmd.arg("hub")
            .arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(listen);
        if let Some(m) = metrics {
            cmd.arg("--metrics").arg(m);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn the hub: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = None;
        let mut metrics_addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap_or_default();
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = rest.split_whitespace().next().map(str::to_string);
                if metrics.is_none() {
                    break;
                }
            }
            if let Some(rest) = line.strip_prefix("metrics on http://") {
                metrics_addr = rest.split('/').next().map(str::to_string);
                break;
            }
        }
        // Keep draining stdout so the hub never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = addr.unwrap_or_else(|| panic!("the hub did not print its listen address"));
        HubProcess {
            child,
            addr,
            metrics: metrics_addr,
        }
    }

    /// SIGKILL: no drain, no flush.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
