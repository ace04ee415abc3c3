//! The mount itself: the source and options, mount(2) of a `fuse.brickfs` filesystem over
//! /dev/fuse, the FUSE session, the session keepalive, the batched release of open-file
//! holds, and the unmount.

use crate::{BrickFs, holds};
use brickfs_client::{MetaClient, MetaClientOptions, VolumeClient};
use brickfs_proto::Ino;
use brickfs_proto::meta::MetaOp;
use std::path::Path;
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
#[derive(Clone, Debug)]
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

/// Mounts `source` at `mountpoint` and serves it until the mount goes away or `stop` fires.
pub fn run(
    source: Source,
    mountpoint: &Path,
    opts: &Options,
    stop: std::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
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
    let fs = BrickFs::new(rt.handle().clone(), vol.clone());
    let notifier = fs.notifier.clone();
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
        let (holds, vol) = (holds.clone(), vol.clone());
        rt.spawn(async move {
            loop {
                tokio::time::sleep(HOLD_FLUSH_EVERY).await;
                flush_holds(&holds, &vol).await;
            }
        })
    };
    let mut config = fuser::Config::default();
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(threads.max(1));
    // Mount through mount(2) ourselves, so that the mount shows as type `fuse.brickfs` with
    // source `brickfs:VOLUME` (fuser would mount it as plain `fuse`).
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| anyhow::anyhow!("open /dev/fuse: {e} (is the fuse module loaded?)"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&dev);
    let data =
        format!("fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other");
    nix::mount::mount(
        Some(format!("brickfs:{}", source.volume).as_str()),
        mountpoint,
        Some("fuse.brickfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| anyhow::anyhow!("mount {}: {e}", mountpoint.display()))?;
    let session = fuser::Session::from_fd(
        fs,
        std::os::fd::OwnedFd::from(dev),
        fuser::SessionACL::All,
        config,
    )
    .and_then(|s| {
        let _ = notifier.set(s.notifier());
        s.spawn()
    });
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            anyhow::bail!("serve {}: {e}", mountpoint.display());
        }
    };
    if opts.readahead_kb > 0 {
        set_readahead(mountpoint, opts.readahead_kb);
    }
    // This mount's id in the mount table: once it is unmounted another mount may come at the
    // same path (a claim staged again, with the same device number reused), and that one is
    // not this daemon's to unmount.
    let mountpoint_abs = std::path::absolute(mountpoint).unwrap_or(mountpoint.to_path_buf());
    let ours = mount_id_at(&mountpoint_abs);
    tracing::info!(mountpoint = %mountpoint.display(), volume = %source.volume, "mounted");
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
                rt.block_on(flush_holds(&holds, &vol));
                return Ok(());
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
    rt.block_on(flush_holds(&holds, &vol));
    Ok(())
}

/// How often released holds are sent.
const HOLD_FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Files one release batch names (the metadata group takes up to 4096).
const HOLD_BATCH_MAX: usize = 1024;

/// Sends the releases of files closed here (see `holds`).
async fn flush_holds(holds: &holds::Holds, vol: &VolumeClient) {
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
            Ok(_) => {}
            // The session is gone, and its holds with it.
            Err(e) if e.code() == Some(brickfs_proto::ErrorCode::SessionExpired) => {}
            Err(e) => {
                tracing::warn!(files = inos.len(), error = %e, "failed to release open files; will retry");
                holds.retry_closing(inos);
                return;
            }
        }
    }
}

/// The id (mountinfo's first field) of the last mount at `path`, if any.
fn mount_id_at(path: &Path) -> Option<u64> {
    let p = path.to_string_lossy().replace(' ', "\\040");
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*p))
        .and_then(|l| l.split(' ').next()?.parse().ok())
}

/// Mount points strictly below `path`.
fn mounts_inside(path: &Path) -> Vec<String> {
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
