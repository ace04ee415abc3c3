//! brickfs-testkit: the supervisor of real daemon processes, for tests, benchmarks and the
//! one-command local cluster.
//!
//! [`Brickd`] spawns one `brickd` on loopback (port 0, the chosen address read from its
//! readiness log line), tees its log to a file, and offers the faults tests need: SIGKILL,
//! SIGTERM, SIGSTOP/SIGCONT and restart on the same address. [`Cluster`] starts several.
//! [`TestNet`] makes test hosts in network namespaces (for partitions); [`Brickd::start_in`]
//! runs a brickd on one of them. Every process is stopped by pid when its guard drops, failures
//! included. No waiting here sleeps: readiness is a log line received over a channel, with a
//! deadline.

mod net;
pub use net::{Host, TestNet};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// How long a daemon may take to report that it listens.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The readiness line brickd logs (see brickd's `serve`).
const LISTENING_MARK: &str = "brickd listening addr=";

/// One running (or stopped) brickd process.
pub struct Brickd {
    bin: PathBuf,
    data_dir: PathBuf,
    bricks: Vec<PathBuf>,
    extra_args: Vec<String>,
    addr: Option<SocketAddr>,
    child: Option<Child>,
    log_path: PathBuf,
    error_lines: Arc<AtomicUsize>,
    /// The test host it runs on (its network namespace), if not the machine's own network.
    host: Option<Host>,
}

impl Brickd {
    /// Starts brickd serving `bricks` (formatted on first start) with its node data in
    /// `data_dir`, on a free loopback port, and waits until it listens.
    pub fn start(
        bin: &Path,
        data_dir: &Path,
        bricks: &[PathBuf],
        extra_args: &[&str],
    ) -> anyhow::Result<Brickd> {
        Self::start_at(bin, data_dir, bricks, extra_args, None)
    }

    /// Like [`Brickd::start`], on a given address (a restarted local cluster keeps its
    /// address, which the cluster map records).
    pub fn start_at(
        bin: &Path,
        data_dir: &Path,
        bricks: &[PathBuf],
        extra_args: &[&str],
        addr: Option<SocketAddr>,
    ) -> anyhow::Result<Brickd> {
        Self::launch(bin, data_dir, bricks, extra_args, addr, None)
    }

    /// Like [`Brickd::start`], on test host `host` (inside its network namespace, listening
    /// on the host's address); restarts stay there.
    pub fn start_in(
        bin: &Path,
        data_dir: &Path,
        bricks: &[PathBuf],
        extra_args: &[&str],
        host: &Host,
    ) -> anyhow::Result<Brickd> {
        Self::launch(bin, data_dir, bricks, extra_args, None, Some(host.clone()))
    }

    fn launch(
        bin: &Path,
        data_dir: &Path,
        bricks: &[PathBuf],
        extra_args: &[&str],
        addr: Option<SocketAddr>,
        host: Option<Host>,
    ) -> anyhow::Result<Brickd> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("create {}", data_dir.display()))?;
        let mut node = Brickd {
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            bricks: bricks.to_vec(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            addr,
            child: None,
            log_path: data_dir.join("brickd.log"),
            error_lines: Arc::new(AtomicUsize::new(0)),
            host,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let ip = self
            .host
            .as_ref()
            .map_or_else(|| "127.0.0.1".to_string(), |h| h.ip.to_string());
        let listen = self
            .addr
            .map_or_else(|| format!("{ip}:0"), |a| a.to_string());
        // On a test host, nsenter enters its network namespace and then becomes brickd (same
        // pid: signals reach brickd itself).
        let mut cmd = match &self.host {
            Some(h) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", h.netns_path().display()))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        // Its own process group: a Ctrl-C at the terminal goes to whoever started it, which
        // stops it in order (after unmounting what uses it).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--init")
            .args(&self.extra_args)
            .env_remove("BRICKFS_CONFIG")
            .env_remove("BRICKFS_BRICKS")
            .env_remove("BRICKFS_CLUSTER_KEY_FILE")
            .env_remove("BRICKFS_CREDENTIAL_FILE")
            .env("BRICKFS_LOG", "info,brickfs=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for b in &self.bricks {
            cmd.arg("--brick").arg(b);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        let stderr = child.stderr.take().context("take brickd stderr")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open {}", self.log_path.display()))?;
        let (tx, rx) = mpsc::channel();
        let errors = self.error_lines.clone();
        std::thread::spawn(move || tee_log(stderr, log, tx, errors));
        self.child = Some(child);
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(addr) => {
                self.addr = Some(addr);
                Ok(())
            }
            Err(_) => {
                let status = self.kill_and_wait();
                bail!(
                    "brickd did not report listening ({status:?}); log tail:\n{}",
                    self.log_tail(30)
                )
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn bricks(&self) -> &[PathBuf] {
        &self.bricks
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// How many ERROR lines the daemon has logged so far.
    pub fn error_lines(&self) -> usize {
        self.error_lines.load(Ordering::SeqCst)
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("brickd is not running")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), sig).with_context(|| format!("send {sig} to brickd {pid}"))
    }

    fn kill_and_wait(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// kill -9, and reap it.
    pub fn sigkill(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.kill_and_wait();
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit (SIGKILL and an error after it).
    pub fn sigterm_and_wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        let pid = self.pid().context("brickd is not running")?;
        let mut child = self.child.take().context("brickd is not running")?;
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(());
            status
        });
        let timed_out = rx.recv_timeout(timeout).is_err();
        if timed_out {
            let _ = kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL);
        }
        let status = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiter thread panicked"))??;
        if timed_out {
            bail!("brickd did not exit within {timeout:?} of SIGTERM");
        }
        Ok(status)
    }

    /// SIGSTOP: the process hangs, as a frozen node would.
    pub fn sigstop(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    pub fn sigcont(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Starts it again on the same address, with the same bricks and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("brickd is still running");
        }
        self.spawn()
    }
}

impl Drop for Brickd {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

fn tee_log(
    stderr: std::process::ChildStderr,
    mut log: File,
    ready: mpsc::Sender<SocketAddr>,
    errors: Arc<AtomicUsize>,
) {
    let mut ready = Some(ready);
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(log, "{line}");
        if line.contains(" ERROR ") {
            errors.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(pos) = line.find(LISTENING_MARK) {
            let rest = &line[pos + LISTENING_MARK.len()..];
            let text = rest.split_whitespace().next().unwrap_or("");
            if let (Ok(addr), Some(tx)) = (text.parse::<SocketAddr>(), ready.take()) {
                let _ = tx.send(addr);
            }
        }
    }
}

/// Several brickd nodes, each with its own bricks, under one temporary folder that is removed
/// when the cluster drops (after every process is stopped).
pub struct Cluster {
    pub nodes: Vec<Brickd>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `nodes` brickd processes with `bricks_per_node` bricks each.
    pub fn start(bin: &Path, nodes: usize, bricks_per_node: usize) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("brickfs-test-")
            .tempdir()
            .context("create cluster folder")?;
        let mut started = Vec::new();
        for n in 0..nodes {
            let node_dir = dir.path().join(format!("node{n}"));
            let bricks: Vec<PathBuf> = (0..bricks_per_node)
                .map(|b| node_dir.join(format!("brick{b}")))
                .collect();
            started.push(Brickd::start(bin, &node_dir.join("data"), &bricks, &[])?);
        }
        Ok(Cluster {
            nodes: started,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop processes before the folder goes away.
        self.nodes.clear();
    }
}
