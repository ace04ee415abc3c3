//! The mount's serving side (the worker, see `keeper`): the source and options, the FUSE
//! session on the keeper's /dev/fuse descriptor, the session keepalive, the batched release
//! of open-file holds, the hand-over's quiesce, and the unmount.

use crate::journal::{Carried, Journal, Note};
use crate::{BrickFs, holds};
use brickfs_client::{MetaClient, MetaClientOptions, VolumeClient};
use brickfs_proto::Ino;
use brickfs_proto::meta::MetaOp;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What to mount: `HOST:PORT[,HOST:PORT...]/VOLUME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub members: Vec<std::net::SocketAddr>,
    pub volume: String,
}

impl Source {
    pub fn parse(text: &str) -> anyhow::Result<Source> {
        let (hosts, volume) = text
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("{text:?} is not HOST:PORT[,HOST:PORT...]/VOLUME"))?;
        if volume.is_empty() {
            anyhow::bail!("{text:?} names no volume");
        }
        let members = hosts
            .split(',')
            .map(|h| {
                h.parse()
                    .map_err(|_| anyhow::anyhow!("{h:?} is not HOST:PORT"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Source {
            members,
            volume: volume.to_string(),
        })
    }
}

/// How a mount behaves.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Options {
    /// FUSE dispatch threads.
    pub threads: usize,
    /// The session lease: how long the cluster keeps this mount's locks without contact.
    pub lease: Duration,
    /// How long one call waits for unreachable servers before it fails.
    pub timeout: Duration,
    /// Serve Prometheus metrics (`GET /metrics`) here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The kernel's readahead for this mount in KiB (0: the kernel's default).
    pub readahead_kb: u64,
}

/// The kernel's readahead this mount asks for by default: 4 MiB, sent as 1 MiB requests. The
/// kernel's own 128 KiB makes a sequential reader's every MiB eight requests (measured in
/// docs/benchmarks.md: reads through the mount about twice as fast with 4 MiB).
pub const READAHEAD_KB: u64 = 4096;

/// Sets the kernel's readahead of the mount at `mountpoint` (its backing device's
/// read_ahead_kb: FUSE's INIT reply can only lower it).
fn set_readahead(mountpoint: &Path, kb: u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot stat the mount to set its readahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::info!(readahead_kb = kb, "kernel readahead set"),
        Err(e) => tracing::warn!(%path, error = %e, "cannot set the kernel's readahead"),
    }
}

/// Why a worker stops serving.
pub enum Stop {
    /// SIGTERM or Ctrl-C: unmount (this mount only) and exit.
    Term,
    /// A new mountd takes the mount over: quiesce and exit with `keeper::HANDED_OVER`.
    HandOver,
}

/// Whether this kernel sends requests again when asked (FUSE_NOTIFY_RESEND, Linux 6.9).
pub fn kernel_resends() -> bool {
    let Ok(u) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = u.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 9)
}

/// Serves the mount whose /dev/fuse descriptor is `dev` (a worker, under its keeper) until
/// the kernel ends the session or `stop` says otherwise. `carried` is what an earlier worker
/// of the same connection left (none on a new mount: this worker answers FUSE INIT). The
/// exit code.
pub fn serve(
    source: Source,
    mountpoint: &Path,
    opts: &Options,
    dev: std::os::fd::OwnedFd,
    journal: Arc<Journal>,
    carried: Option<Carried>,
    stop: std::sync::mpsc::Receiver<Stop>,
) -> anyhow::Result<i32> {
    // The lines this function logs carry the volume (FUSE worker threads log `ino`).
    let _span = tracing::info_span!("mountd", volume = %source.volume).entered();
    let (threads, lease) = (opts.threads, opts.lease);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("mountd-io")
        .build()?;
    let meta = MetaClient::new(
        source.members.clone(),
        MetaClientOptions {
            client_name: format!("mountd {}", mountpoint.display()),
            deadline: opts.timeout,
            lease,
            ..MetaClientOptions::default()
        },
    );
    // The session continues across workers: its locks and holds are this mount's.
    if let Some((id, seq)) = carried.as_ref().and_then(|c| c.session) {
        meta.adopt_session(brickfs_proto::meta::SessionId(id), seq);
    }
    {
        let j = journal.clone();
        meta.set_session_journal(Arc::new(move |id, below| {
            j.note(&Note::Session {
                id: id.0,
                seq_below: below,
            })
        }));
    }
    let bricks = brickfs_client::BrickClient::new(brickfs_proto::rpc::ClientOptions {
        peer_name: "mountd".into(),
        request_timeout: opts.timeout,
        ..Default::default()
    });
    let vol = rt
        .block_on(VolumeClient::open(meta, bricks, &source.volume))
        .map_err(|e| anyhow::anyhow!("open volume {}: {e}", source.volume))?;
    // A write waits for a failed member to leave its set at most as long as any call waits.
    vol.set_retry_window(opts.timeout);
    if vol.record().status != brickfs_proto::meta::VolumeStatus::Started {
        anyhow::bail!(
            "volume {} is not started (brickfs volume start {})",
            source.volume,
            source.volume
        );
    }
    // Keep the mount's session (and its locks) alive while it is idle.
    let _keepalive = {
        let _guard = rt.enter();
        vol.meta().spawn_keepalive(lease / 3)
    };
    let fs = BrickFs::new(rt.handle().clone(), vol.clone(), journal.clone());
    if let Some(c) = &carried {
        fs.adopt(c);
    }
    let notifier = fs.notifier.clone();
    let quiesce = fs.quiescer();
    if let Some(at) = opts.metrics_listen {
        let l = rt
            .block_on(tokio::net::TcpListener::bind(at))
            .map_err(|e| anyhow::anyhow!("listen for metrics on {at}: {e}"))?;
        let maddr = l.local_addr()?;
        let v = vol.clone();
        let fuse = fs.fuse_metrics();
        let render: std::sync::Arc<dyn Fn() -> String + Send + Sync> =
            std::sync::Arc::new(move || {
                let mut out = String::new();
                v.metrics().render("mountd", &mut out);
                fuse.render("mountd_fuse", &mut out);
                out
            });
        rt.spawn(brickfs_proto::metrics::serve(l, render));
        // Tests wait for this line: keep its wording.
        tracing::info!(addr = %maddr, "metrics listening");
    }
    // Releases of open-file holds go out in batches (see `holds`).
    let holds = fs.holds.clone();
    let flusher = {
        let (holds, vol, journal) = (holds.clone(), vol.clone(), journal.clone());
        rt.spawn(async move {
            loop {
                tokio::time::sleep(HOLD_FLUSH_EVERY).await;
                flush_holds(&holds, &vol, &journal).await;
            }
        })
    };
    let mut config = fuser::Config::default();
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(threads.max(1));
    let resumed = carried.is_some();
    let session = if resumed {
        nonblocking(dev.as_fd())?;
        let s = fuser::Session::from_initialized_fd(fs, dev, fuser::SessionACL::All, config);
        // What the dead or quiesced worker took and did not answer comes again (before this
        // one reads, or it would come twice).
        match s.notifier().resend() {
            Ok(()) => tracing::info!("asked the kernel to send again what was in flight"),
            Err(e) => {
                tracing::warn!(error = %e, "this kernel cannot send requests again (Linux 6.9 and later can): requests the last worker took unanswered stay unanswered")
            }
        }
        Ok(s)
    } else {
        fuser::Session::from_fd(fs, dev, fuser::SessionACL::All, config).and_then(|s| {
            nonblocking(s.as_fd())?;
            Ok(s)
        })
    };
    let session = session.and_then(|s| {
        let _ = notifier.set(s.notifier());
        let flag = s.stop_flag();
        s.spawn().map(|b| (b, flag))
    });
    let (session, readers_stop) = match session {
        Ok(s) => s,
        Err(e) => anyhow::bail!("serve {}: {e}", mountpoint.display()),
    };
    if opts.readahead_kb > 0 && !resumed {
        set_readahead(mountpoint, opts.readahead_kb);
    }
    // This mount's id in the mount table: once it is unmounted another mount may come at the
    // same path (a claim staged again, with the same device number reused), and that one is
    // not this daemon's to unmount.
    let mountpoint_abs = std::path::absolute(mountpoint).unwrap_or(mountpoint.to_path_buf());
    let ours = mount_id_at(&mountpoint_abs);
    journal.note(&Note::Serving);
    tracing::info!(mountpoint = %mountpoint.display(), volume = %source.volume, resumed, "mounted");
    // Serve until told to stop, or until the kernel ends the session: every mount of this
    // filesystem is gone (unmounted here, bind mounts elsewhere too, lazily unmounted ones
    // once their last open file closes).
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !session.guard.is_finished() => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::info!(mountpoint = %mountpoint.display(), "every mount of it is gone; exiting");
                drop(session);
                flusher.abort();
                rt.block_on(flush_holds(&holds, &vol, &journal));
                return Ok(0);
            }
            Ok(Stop::HandOver) => {
                tracing::info!("handing the mount over: no more requests taken here");
                readers_stop.store(true, std::sync::atomic::Ordering::SeqCst);
                // Each reader finishes the request it dispatches.
                if session.join().is_err() {
                    tracing::warn!("a reader ended badly while stopping");
                }
                flusher.abort();
                quiesce.run(kernel_resends());
                journal.note(&Note::Quiesced);
                tracing::info!("quiesced; the new mountd serves on");
                // Exit at once: dropping the runtime would answer the lock waits it holds
                // (EIO); unanswered, the kernel sends them to the next worker.
                std::process::exit(crate::keeper::HANDED_OVER);
            }
            _ => break,
        }
    }
    // Gone already if the kernel ended the session (mount ids are reused at once, so the
    // id alone could name a newer mount at the path).
    if session.guard.is_finished() || ours.is_none() || mount_id_at(&mountpoint_abs) != ours {
        tracing::info!(mountpoint = %mountpoint.display(), "not mounted here any more; stopping without unmounting");
    } else {
        tracing::info!(mountpoint = %mountpoint.display(), "unmounting");
        if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
            // Detaching would take mounts made inside this one with it: only without those.
            let inside = mounts_inside(&mountpoint_abs);
            if inside.is_empty() {
                tracing::warn!(error = %e, "unmount busy, detaching instead");
                let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            } else {
                tracing::warn!(error = %e, inside = ?inside, "unmount busy and other mounts are inside it: left mounted (it answers ENOTCONN once this daemon is gone)");
            }
        }
    }
    drop(session);
    flusher.abort();
    rt.block_on(flush_holds(&holds, &vol, &journal));
    Ok(0)
}

/// `mountd --serve DEV SOCK`: a worker, started by its keeper with the mount's /dev/fuse
/// descriptor and its end of the notes socket. The exit code.
pub fn worker_main(dev: std::os::fd::RawFd, sock: std::os::fd::RawFd) -> i32 {
    use std::io::BufRead;
    // A worker dies with its keeper (which holds the mount): no worker serves on alone.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(error = %e, "cannot tie the worker to its keeper");
    }
    let (dev, sock) = (
        crate::keeper::owned(dev),
        std::os::unix::net::UnixStream::from(crate::keeper::owned(sock)),
    );
    let mut orders = match sock.try_clone() {
        Ok(s) => std::io::BufReader::new(s),
        Err(e) => {
            eprintln!("mountd worker: {e}");
            return 1;
        }
    };
    let mut line = String::new();
    if orders.read_line(&mut line).unwrap_or(0) == 0 {
        eprintln!("mountd worker: the keeper sent no config");
        return 1;
    }
    let config: crate::keeper::WorkerConfig = match serde_json::from_str(&line) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mountd worker: bad config from the keeper: {e}");
            return 1;
        }
    };
    let launch = config.launch;
    if let Err(e) = brickfs_proto::rpc::use_credential_file(launch.credential_file.as_deref())
        .and_then(|()| brickfs_proto::tls::use_ca_file(launch.ca_file.as_deref()))
    {
        eprintln!("mountd: {e}");
        return 2;
    }
    let source = match Source::parse(&launch.source) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mountd: {e:#}");
            return 2;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            loop {
                line.clear();
                match orders.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if serde_json::from_str::<crate::keeper::Order>(&line).ok()
                            == Some(crate::keeper::Order::HandOver)
                        {
                            let _ = tx.send(Stop::HandOver);
                        }
                    }
                }
            }
        });
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(signals) => {
            std::thread::spawn(move || {
                signals.block_on(async {
                    use tokio::signal::unix::{SignalKind, signal};
                    if let Ok(mut term) = signal(SignalKind::terminate()) {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    } else {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                });
                let _ = tx.send(Stop::Term);
            });
        }
        Err(e) => {
            eprintln!("mountd worker: signal runtime: {e}");
            return 1;
        }
    }
    let journal = Arc::new(Journal::new(Some(sock)));
    match serve(
        source,
        &launch.mountpoint,
        &launch.opts,
        dev,
        journal,
        config.carried,
        rx,
    ) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("failed to serve the mount: {e:#}");
            eprintln!("mountd: {e:#}");
            1
        }
    }
}

/// Makes the /dev/fuse descriptor non-blocking (its readers poll; see fuser's `stop_flag`).
fn nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// How often released holds are sent.
const HOLD_FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Files one release batch names (the metadata group takes up to 4096).
const HOLD_BATCH_MAX: usize = 1024;

/// Sends the releases of files closed here (see `holds`).
pub(crate) async fn flush_holds(holds: &holds::Holds, vol: &VolumeClient, journal: &Journal) {
    loop {
        let _gate = holds.gate.lock().await;
        let inos = holds.take_closing(HOLD_BATCH_MAX);
        if inos.is_empty() {
            return;
        }
        let op = MetaOp::CloseFiles {
            volume: vol.record().id,
            inos: inos.iter().map(|&i| Ino(i)).collect(),
        };
        match vol.meta().write(op).await {
            Ok(_) => journal.note(&Note::Released { inos }),
            // The session is gone, and its holds with it.
            Err(e) if e.code() == Some(brickfs_proto::ErrorCode::SessionExpired) => {
                journal.note(&Note::Released { inos })
            }
            Err(e) => {
                tracing::warn!(files = inos.len(), error = %e, "failed to release open files; will retry");
                holds.retry_closing(inos);
                return;
            }
        }
    }
}

/// The id (mountinfo's first field) of the last mount at `path`, if any.
pub(crate) fn mount_id_at(path: &Path) -> Option<u64> {
    let p = path.to_string_lossy().replace(' ', "\\040");
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*p))
        .and_then(|l| l.split(' ').next()?.parse().ok())
}

/// Mount points strictly below `path`.
pub(crate) fn mounts_inside(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| Path::new(m) != path && Path::new(m).starts_with(path))
        .collect()
}

/// Whether `path` is a mount point in /proc/mounts (which escapes spaces as `\040`).
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*p))
}
