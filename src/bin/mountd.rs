//! The `mountd` executable (also installed as `mount.brickfs` / `mount.fuse.brickfs`): parse
//! flags, start tracing, mount, and unmount on SIGTERM or Ctrl-C.

#![allow(clippy::print_stdout)] // --daemon prints the daemon's pid for scripts.

use clap::Parser;

#[derive(Parser)]
#[command(name = "mountd", version, about = "Mount a brickfs volume with FUSE")]
struct Flags {
    /// What to mount: HOST:PORT[,HOST:PORT...]/VOLUME (members of the metadata group).
    source: String,
    /// Where to mount it.
    mountpoint: std::path::PathBuf,
    /// FUSE dispatch threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Session lease in seconds: after this long without contact the cluster drops this
    /// mount's locks.
    #[arg(long, default_value_t = 30)]
    lease_secs: u64,
    /// Seconds a call waits for unreachable servers before it fails (ENOTCONN when the
    /// metadata group is gone, EIO when bricks are).
    #[arg(long, default_value_t = 20)]
    timeout_secs: u64,
    /// Serve Prometheus metrics (`GET /metrics`: the volume's reads, writes, fsyncs and
    /// truncates with bytes and latency, and every FUSE request by kind) on this address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// How far the kernel reads ahead of a sequential reader, in KiB (the mount's
    /// read_ahead_kb; the kernel's own default is 128; 0 leaves it). Larger windows make
    /// fewer, 1 MiB, requests.
    #[arg(long, default_value_t = mountd::READAHEAD_KB)]
    readahead_kb: u64,
    /// The credential file, when the cluster has a key: the volume's client credential
    /// (`brickfs volume credential VOLUME new` prints one), or the admin credential or the
    /// cluster key (also `-o credential=PATH`; `--cluster-key-file` and `-o keyfile=` are its
    /// older names).
    #[arg(
        long,
        env = "BRICKFS_CREDENTIAL_FILE",
        visible_alias = "cluster-key-file"
    )]
    credential_file: Option<std::path::PathBuf>,
    /// The cluster CA certificate to check nodes against (`brickfs cluster ca` prints it; also
    /// `-o cafile=PATH`). Without it a mount holding only a client credential relies on the
    /// handshake's proofs alone.
    #[arg(long, env = "BRICKFS_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Mount options as `mount -o` passes them: `threads=N`, `lease=SECS`, `timeout=SECS`,
    /// `readahead_kb=N` and `metrics=HOST:PORT` set the flags of those names; generic options (rw, defaults, _netdev, noauto, ...) are
    /// accepted and ignored.
    #[arg(short = 'o')]
    options: Option<String>,
    /// The filesystem type, as mount(8) passes it to a helper (ignored).
    #[arg(short = 't', hide = true)]
    fs_type: Option<String>,
    /// mount(8)'s helper flags: no mtab, sloppy, fake, verbose (ignored).
    #[arg(short = 'n', hide = true)]
    no_mtab: bool,
    #[arg(short = 's', hide = true)]
    sloppy: bool,
    #[arg(short = 'f', hide = true)]
    fake: bool,
    #[arg(short = 'v', hide = true)]
    verbose: bool,
    /// Log filter directives (default `info`; `BRICKFS_LOG` also works).
    #[arg(long)]
    log: Option<String>,
    /// Run in the background: return once the volume is mounted, printing the daemon's pid.
    /// Implied when called as `mount.brickfs` or `mount.fuse.brickfs` (by mount(8)).
    #[arg(long)]
    daemon: bool,
    /// (Set by --daemon for its child: a pipe told once the mount is served.)
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
}

/// Where a daemonized mountd logs.
const DAEMON_LOG: &str = "/var/log/brickfs-mountd.log";

use mountd::is_mounted;

/// Applies the `-o` options mountd knows to the flags; refuses a known option with a bad value.
fn apply_options(flags: &mut Flags) -> Result<(), String> {
    let Some(options) = flags.options.clone() else {
        return Ok(());
    };
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        let Some((key, value)) = opt.split_once('=') else {
            continue;
        };
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("mount option {opt:?}: {value:?} is not a whole number"))
        };
        match key {
            "threads" => flags.threads = number()? as usize,
            "lease" => flags.lease_secs = number()?,
            "timeout" => flags.timeout_secs = number()?,
            "readahead_kb" => flags.readahead_kb = number()?,
            "keyfile" | "credential" => flags.credential_file = Some(value.into()),
            "cafile" => flags.ca_file = Some(value.into()),
            "metrics" => {
                flags.metrics_listen = Some(
                    value
                        .parse()
                        .map_err(|_| format!("mount option {opt:?}: {value:?} is not HOST:PORT"))?,
                )
            }
            _ => {}
        }
    }
    Ok(())
}

/// Starts this executable again in the foreground, detached in its own process group, and
/// waits (at most 30 s) until the mount appears or the child fails.
fn daemonize(flags: &Flags) -> std::process::ExitCode {
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("mountd: cannot find its own executable");
        return std::process::ExitCode::FAILURE;
    };
    // The real path (links resolved): the daemon mounts there, and the wait below must look
    // for the mount where the kernel lists it.
    let mountpoint = std::fs::canonicalize(&flags.mountpoint)
        .or_else(|_| std::path::absolute(&flags.mountpoint))
        .unwrap_or(flags.mountpoint.clone());
    let was_mounted = is_mounted(&mountpoint);
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(&flags.source)
        .arg(&mountpoint)
        .arg("--threads")
        .arg(flags.threads.to_string())
        .arg("--lease-secs")
        .arg(flags.lease_secs.to_string())
        .arg("--timeout-secs")
        .arg(flags.timeout_secs.to_string())
        .arg("--readahead-kb")
        .arg(flags.readahead_kb.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // The daemon must not hold the caller's output open (mount(8) and scripts wait for EOF):
    // its log goes to a file.
    let log_path = std::path::PathBuf::from(DAEMON_LOG);
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => {
            cmd.stderr(f);
        }
        Err(_) => {
            cmd.stderr(std::process::Stdio::null());
        }
    }
    if let Some(log) = &flags.log {
        cmd.arg("--log").arg(log);
    }
    if let Some(at) = flags.metrics_listen {
        cmd.arg("--metrics-listen").arg(at.to_string());
    }
    if let Some(k) = &flags.credential_file {
        cmd.arg("--credential-file").arg(k);
    }
    if let Some(k) = &flags.ca_file {
        cmd.arg("--ca-file").arg(k);
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // The daemon says on this pipe when it serves the mount (a new one, or one it took over
    // from an older mountd: that one is mounted already).
    let (ready_rd, ready_wr) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mountd: pipe: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    cmd.arg("--ready-fd")
        .arg(std::os::fd::AsRawFd::as_raw_fd(&ready_wr).to_string());
    if nix::fcntl::fcntl(
        &ready_wr,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .is_err()
    {
        return std::process::ExitCode::FAILURE;
    }
    let spawned = cmd.spawn();
    drop(ready_wr);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mountd: failed to start the daemon: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let ready = std::fs::File::from(ready_rd);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(ready).read_line(&mut line);
        let _ = ready_tx.send(line.trim() == "serving");
    });
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return std::process::ExitCode::FAILURE;
    };
    let mounted = rt.block_on(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
        for _ in 0..1200 {
            tick.tick().await;
            match ready_rx.try_recv() {
                Ok(serving) => return serving,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
        }
        false
    });
    if mounted {
        println!("pid {}", child.id());
        std::process::ExitCode::SUCCESS
    } else {
        let _ = child.kill();
        let _ = child.wait();
        // A mount the killed daemon made but was not seen serving would answer nothing (one
        // it was taking over from another mountd is that one's still).
        if !was_mounted && is_mounted(&mountpoint) {
            let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        eprintln!(
            "mountd: {} was not mounted (see {DAEMON_LOG})",
            mountpoint.display()
        );
        std::process::ExitCode::FAILURE
    }
}

fn main() -> std::process::ExitCode {
    // `mountd --serve DEV SOCK`: the worker its keeper starts (see mountd::keeper).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        brickd::telemetry::init_tracing("info", None);
        brickd::telemetry::install_panic_hook();
        let fd = |i: usize| args.get(i).and_then(|a| a.parse::<i32>().ok());
        let (Some(dev), Some(sock)) = (fd(2), fd(3)) else {
            eprintln!("mountd: --serve takes the /dev/fuse and keeper descriptors");
            return std::process::ExitCode::from(2);
        };
        let code = mountd::worker_main(dev, sock);
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let mut flags = Flags::parse();
    if let Err(e) = apply_options(&mut flags) {
        eprintln!("mountd: {e}");
        return std::process::ExitCode::from(2);
    }
    let argv0 = std::env::args().next().unwrap_or_default();
    let helper = argv0.ends_with("mount.brickfs") || argv0.ends_with("mount.fuse.brickfs");
    if flags.daemon || helper {
        if let Err(e) = mountd::Source::parse(&flags.source) {
            eprintln!("mountd: {e:#}");
            return std::process::ExitCode::from(2);
        }
        return daemonize(&flags);
    }
    brickd::telemetry::init_tracing("info", flags.log.as_deref());
    brickd::telemetry::install_panic_hook();
    if let Err(e) = mountd::Source::parse(&flags.source) {
        eprintln!("mountd: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let credential_file = flags.credential_file.clone().or_else(|| {
        // The flag's older name's variable.
        std::env::var_os("BRICKFS_CLUSTER_KEY_FILE").map(Into::into)
    });
    // Refused here, before anything is mounted, when unreadable.
    if let Err(e) = brickfs_proto::rpc::use_credential_file(credential_file.as_deref())
        .and_then(|()| brickfs_proto::tls::use_ca_file(flags.ca_file.as_deref()))
    {
        eprintln!("mountd: {e}");
        return std::process::ExitCode::from(2);
    }
    let launch = mountd::Launch {
        source: flags.source.clone(),
        mountpoint: flags.mountpoint.clone(),
        opts: mountd::Options {
            threads: flags.threads.max(1),
            lease: std::time::Duration::from_secs(flags.lease_secs.max(1)),
            timeout: std::time::Duration::from_secs(flags.timeout_secs.max(1)),
            metrics_listen: flags.metrics_listen,
            readahead_kb: flags.readahead_kb,
        },
        credential_file,
        ca_file: flags.ca_file.clone(),
        log: flags.log.clone(),
    };
    let ready = flags.ready_fd.and_then(mountd::keeper::inherited_fd);
    match mountd::keep(launch, ready) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!("failed to mount: {e:#}");
            eprintln!("mountd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
