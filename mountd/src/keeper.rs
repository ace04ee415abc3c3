//! The keeper: the process `mountd SOURCE MOUNTPOINT` runs as. It makes the mount (or takes
//! one over from an older mountd), holds the mount's /dev/fuse descriptor for as long as the
//! mount lives, and runs the serving process, the worker (`mountd --serve`), as its child:
//!
//! - **Crash survival:** the worker tells the keeper what a successor needs to answer for
//!   the mount's open files (`journal`). When it dies (a crash, kill -9), the keeper, which
//!   still holds the descriptor, so that the kernel keeps the connection and every request
//!   on it, starts another worker with what it was told; that one asks the kernel to send
//!   again the requests the dead one had taken (FUSE_NOTIFY_RESEND). Handles with writes
//!   acknowledged but not durable at the crash fail their next fsync and close with EIO.
//! - **Upgrade in place:** a mountd started on a mount point a keeper serves connects to the
//!   keeper's socket (`socket_path`) and asks for the mount. The keeper has its worker
//!   quiesce (stop reading requests, finish those taken, make every write durable), then
//!   sends the descriptor (SCM_RIGHTS) and the carried state, and exits once the new one
//!   confirms. Applications see a pause, no error.
//! - **Stopping:** SIGTERM (or Ctrl-C) goes to the worker, which unmounts; killing the
//!   keeper takes its worker with it (the worker dies with its parent), so the mount ends as
//!   it does when any FUSE daemon dies.

use crate::journal::{Carried, Note};
use crate::mount::{Options, mount_id_at, mounts_inside};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The worker's exit status after it quiesced for a hand-over.
pub const HANDED_OVER: i32 = 75;

/// Workers dying in a row before they served, after which the keeper gives the
/// mount up (detaches it: applications get ENOTCONN, as when a FUSE daemon dies).
const QUICK_DEATHS_MAX: u32 = 10;

/// Where the keepers of mounts listen (one socket per mount point).
pub const SOCKET_DIR: &str = "/run/brickfs/mountd";

/// What the keeper was started with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    /// `HOST:PORT[,...]/VOLUME`.
    pub source: String,
    pub mountpoint: PathBuf,
    pub opts: Options,
    pub credential_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// The log filter (the worker logs with it too).
    pub log: Option<String>,
}

/// What a worker is started with (the first line its keeper sends it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub launch: Launch,
    /// What an earlier worker left (none on a new mount, which the worker initialises).
    pub carried: Option<Carried>,
}

/// From the keeper to its worker, after the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Quiesce and exit with `HANDED_OVER`.
    HandOver,
}

/// The keeper's socket for the mount at `mountpoint` (an absolute, resolved path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    // FNV-1a of the path: unix socket paths are short, mount points need not be.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from(SOCKET_DIR).join(format!("{h:016x}.sock"))
}

/// Runs the keeper of `launch`'s mount until the mount ends or is handed over. `ready`
/// (from `mountd --daemon`) gets a line once a worker serves it. The process's exit code.
pub fn keep(launch: Launch, ready: Option<OwnedFd>) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A new mount: the volume must be reachable and started before anything is mounted
    // (bad input gets its error and leaves nothing behind).
    if !crate::is_mounted(&launch.mountpoint) {
        rt.block_on(check_volume(&launch))?;
    }
    // Workers are started from this thread alone: a worker dies with the thread that
    // started it (PR_SET_PDEATHSIG), and this one lives as long as the keeper.
    rt.block_on(Keeper::start(launch, ready)?.run())
}

/// Opens `launch`'s volume as the worker will, and refuses one that is not started.
async fn check_volume(launch: &Launch) -> anyhow::Result<()> {
    let source = crate::Source::parse(&launch.source)?;
    let meta = brickfs_client::MetaClient::new(
        source.members.clone(),
        brickfs_client::MetaClientOptions {
            client_name: format!("mountd {}", launch.mountpoint.display()),
            deadline: launch.opts.timeout,
            ..brickfs_client::MetaClientOptions::default()
        },
    );
    let bricks = brickfs_client::BrickClient::new(brickfs_proto::rpc::ClientOptions {
        peer_name: "mountd".into(),
        request_timeout: launch.opts.timeout,
        ..Default::default()
    });
    let vol = brickfs_client::VolumeClient::open(meta, bricks, &source.volume)
        .await
        .map_err(|e| anyhow::anyhow!("open volume {}: {e}", source.volume))?;
    if vol.record().status != brickfs_proto::meta::VolumeStatus::Started {
        anyhow::bail!(
            "volume {} is not started (brickfs volume start {})",
            source.volume,
            source.volume
        );
    }
    Ok(())
}

struct Keeper {
    launch: Launch,
    mountpoint: PathBuf,
    /// The mount's /dev/fuse descriptor.
    dev: OwnedFd,
    carried: Carried,
    /// Whether a worker has initialised the connection (FUSE INIT).
    initialised: bool,
    ready: Option<std::fs::File>,
    /// The socket and its inode (removed at exit only while it is still this keeper's).
    listener: Option<(tokio::net::UnixListener, u64)>,
    /// An old keeper to confirm a take-over to, once this one holds the mount.
    taken_from: Option<StdUnixStream>,
}

struct Worker {
    child: tokio::process::Child,
    to: tokio::net::unix::OwnedWriteHalf,
    notes: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    serving: bool,
    quiesced: bool,
}

impl Keeper {
    fn start(launch: Launch, ready: Option<OwnedFd>) -> anyhow::Result<Keeper> {
        let mountpoint = std::fs::canonicalize(&launch.mountpoint)
            .or_else(|_| std::path::absolute(&launch.mountpoint))?;
        let sock = socket_path(&mountpoint);
        let (dev, carried, initialised, taken_from) = match take_over(&sock, &mountpoint)? {
            Some((dev, carried, conn)) => {
                tracing::info!(mountpoint = %mountpoint.display(), handles = carried.handles.len(), "took the mount over from the mountd serving it");
                (dev, carried, true, Some(conn))
            }
            None => (
                mount_new(&launch, &mountpoint)?,
                Carried::default(),
                false,
                None,
            ),
        };
        Ok(Keeper {
            launch,
            mountpoint,
            dev,
            carried,
            initialised,
            ready: ready.map(std::fs::File::from),
            listener: None,
            taken_from,
        })
    }

    fn listen(&mut self) {
        let sock = socket_path(&self.mountpoint);
        let _ = std::fs::create_dir_all(SOCKET_DIR);
        let _ = std::fs::remove_file(&sock);
        match tokio::net::UnixListener::bind(&sock) {
            Ok(l) => {
                use std::os::unix::fs::MetadataExt;
                let ino = std::fs::metadata(&sock).map(|m| m.ino()).unwrap_or(0);
                self.listener = Some((l, ino));
            }
            Err(e) => {
                tracing::warn!(path = %sock.display(), error = %e, "cannot listen for upgrades: a new mountd cannot take this mount over")
            }
        }
    }

    fn unlisten(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Some((_, ino)) = self.listener.take() {
            let sock = socket_path(&self.mountpoint);
            if std::fs::metadata(&sock).map(|m| m.ino()).ok() == Some(ino) {
                let _ = std::fs::remove_file(&sock);
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<Worker> {
        let (ours, theirs) = StdUnixStream::pair()?;
        let exe = std::env::current_exe()
            .ok()
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--serve")
            .arg(self.dev.as_raw_fd().to_string())
            .arg(theirs.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null());
        if let Some(log) = &self.launch.log {
            cmd.env("BRICKFS_LOG", log);
        }
        // The two descriptors are inherited (and only these two).
        inheritable(self.dev.as_fd(), true)?;
        inheritable(theirs.as_fd(), true)?;
        let child = tokio::process::Command::from(cmd).spawn();
        inheritable(self.dev.as_fd(), false)?;
        drop(theirs);
        let child = child?;
        tracing::info!(
            pid = child.id().unwrap_or(0),
            resumes = self.initialised,
            "worker started"
        );
        // The worker reads its config first (a worker that dies at once shows in `run`).
        let config = WorkerConfig {
            launch: self.launch.clone(),
            carried: self.initialised.then(|| self.carried.clone()),
        };
        let mut line = serde_json::to_vec(&config)?;
        line.push(b'\n');
        ours.set_write_timeout(Some(Duration::from_secs(30)))?;
        if let Err(e) = (&ours).write_all(&line) {
            tracing::warn!(error = %e, "the worker did not take its config");
        }
        ours.set_nonblocking(true)?;
        let (rd, to) = tokio::net::UnixStream::from_std(ours)?.into_split();
        Ok(Worker {
            child,
            to,
            notes: BufReader::new(rd).lines(),
            serving: false,
            quiesced: false,
        })
    }

    async fn run(mut self) -> anyhow::Result<i32> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut worker = self.spawn()?;
        let mut stopping = false;
        let mut handing: Option<tokio::net::UnixStream> = None;
        // Consecutive workers that died before they served.
        let mut quick_deaths = 0u32;
        loop {
            let accept = async {
                match &self.listener {
                    Some((l, _)) => l.accept().await.map(|(s, _)| s),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                line = worker.notes.next_line() => match line {
                    Ok(Some(line)) => match serde_json::from_str::<Note>(&line) {
                        Ok(note) => self.noted(&mut worker, &note),
                        Err(e) => tracing::warn!(error = %e, "unreadable note from the worker"),
                    },
                    // The worker is gone or going: its exit comes next.
                    _ => {
                        let status = worker.child.wait().await?;
                        let code = status.code();
                        tracing::info!(?status, "worker exited");
                        if worker.quiesced && code == Some(HANDED_OVER) {
                            if let Some(conn) = handing.take() {
                                match self.hand_over(conn).await {
                                    Ok(()) => {
                                        tracing::info!(mountpoint = %self.mountpoint.display(), "mount handed over to the new mountd; exiting");
                                        return Ok(0);
                                    }
                                    Err(e) => tracing::warn!(error = %e, "the new mountd did not take the mount: serving on"),
                                }
                            }
                        } else if code == Some(0) || (stopping && worker.serving) {
                            // Unmounted, or every mount of it is gone.
                            if stopping {
                                self.unmount_if_ours();
                            }
                            self.unlisten();
                            return Ok(0);
                        } else if !self.initialised {
                            // A new mount that never served (a bad volume, say): it goes.
                            tracing::warn!("the worker failed before it served the new mount");
                            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                            self.unlisten();
                            return Ok(code.unwrap_or(1).max(1));
                        }
                        if stopping {
                            self.unmount_if_ours();
                            self.unlisten();
                            return Ok(0);
                        }
                        // A crash (or a failed hand-over): what was not durable is lost.
                        self.carried.worker_died();
                        // A worker that died before it served counts towards giving up
                        // (a binary or a cluster that cannot serve); restarts after such
                        // deaths back off, never past a quarter of the session lease, or
                        // the mount's locks would go with it.
                        if worker.serving {
                            quick_deaths = 0;
                        } else {
                            quick_deaths += 1;
                        }
                        if quick_deaths > QUICK_DEATHS_MAX {
                            tracing::error!(deaths = quick_deaths, "workers keep dying at once: giving the mount up");
                            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                            self.unlisten();
                            return Ok(1);
                        }
                        if quick_deaths > 1 {
                            let wait = Duration::from_millis(50 << quick_deaths.min(6))
                                .min(self.launch.opts.lease / 4);
                            tokio::time::sleep(wait).await;
                        }
                        tracing::warn!(handles = self.carried.handles.len(), "the worker died; starting another on the same connection");
                        worker = self.spawn()?;
                    }
                },
                conn = accept => match conn {
                    Ok(conn) if handing.is_none() && !stopping => {
                        match read_request(&conn).await {
                            Ok(r) if r == "take-over" => {
                                tracing::info!("a new mountd asks for the mount: quiescing the worker");
                                let mut line = serde_json::to_vec(&Order::HandOver)?;
                                line.push(b'\n');
                                if worker.to.write_all(&line).await.is_ok() {
                                    handing = Some(conn);
                                }
                            }
                            Ok(other) => tracing::warn!(request = %other, "unknown request on the upgrade socket"),
                            Err(e) => tracing::debug!(error = %e, "upgrade socket: no request"),
                        }
                    }
                    Ok(_) => tracing::info!("a take-over is in progress or the mount is stopping: request dropped"),
                    Err(e) => tracing::warn!(error = %e, "upgrade socket accept failed"),
                },
                _ = term.recv() => self.stop(&worker, &mut stopping),
                _ = int.recv() => self.stop(&worker, &mut stopping),
            }
        }
    }

    fn noted(&mut self, worker: &mut Worker, note: &Note) {
        self.carried.apply(note);
        match note {
            Note::Serving => {
                worker.serving = true;
                self.initialised = true;
                if let Some(mut r) = self.ready.take() {
                    let _ = r.write_all(b"serving\n");
                }
                if let Some(mut old) = self.taken_from.take() {
                    let _ = old.write_all(b"adopted\n");
                }
                if self.listener.is_none() {
                    self.listen();
                }
            }
            Note::Quiesced => worker.quiesced = true,
            _ => {}
        }
    }

    fn stop(&self, worker: &Worker, stopping: &mut bool) {
        *stopping = true;
        if let Some(pid) = worker.child.id() {
            tracing::info!("stopping: telling the worker");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// The worker died while told to stop: the keeper unmounts (as the worker would have).
    fn unmount_if_ours(&self) {
        if mount_id_at(&self.mountpoint).is_none() {
            return;
        }
        if nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()).is_err()
            && mounts_inside(&self.mountpoint).is_empty()
        {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Sends the descriptor and the carried state to the new mountd on `conn` and waits for
    /// it to confirm that it holds them.
    async fn hand_over(&mut self, conn: tokio::net::UnixStream) -> anyhow::Result<()> {
        let conn = conn.into_std()?;
        conn.set_nonblocking(false)?;
        let body = serde_json::to_vec(&self.carried)?;
        let dev = self.dev.try_clone()?;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
            let len = (body.len() as u64).to_le_bytes();
            let fds = [dev.as_raw_fd()];
            sendmsg::<()>(
                conn.as_raw_fd(),
                &[std::io::IoSlice::new(&len)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )?;
            (&conn).write_all(&body)?;
            conn.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut ack = [0u8; 8];
            (&conn).read_exact(&mut ack)?;
            anyhow::ensure!(&ack == b"adopted\n", "unexpected confirmation");
            Ok(())
        })
        .await?
    }
}

async fn read_request(conn: &tokio::net::UnixStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::timeout_at(deadline, conn.readable())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let mut b = [0u8; 64];
        match conn.try_read(&mut b) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf.extend_from_slice(&b[..n]);
                if let Some(end) = buf.iter().position(|&c| c == b'\n') {
                    return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
                }
                if buf.len() > 1024 {
                    return Err(std::io::ErrorKind::InvalidData.into());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

fn inheritable(fd: std::os::fd::BorrowedFd<'_>, yes: bool) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = if yes {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// Opens /dev/fuse and mounts a `fuse.brickfs` filesystem on it at `mountpoint` (through
/// mount(2), so that it shows with type `fuse.brickfs` and source `brickfs:VOLUME`).
fn mount_new(launch: &Launch, mountpoint: &Path) -> anyhow::Result<OwnedFd> {
    let volume = crate::Source::parse(&launch.source)?.volume;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| anyhow::anyhow!("open /dev/fuse: {e} (is the fuse module loaded?)"))?;
    let fd = dev.as_raw_fd();
    let data =
        format!("fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other");
    nix::mount::mount(
        Some(format!("brickfs:{volume}").as_str()),
        mountpoint,
        Some("fuse.brickfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| anyhow::anyhow!("mount {}: {e}", mountpoint.display()))?;
    Ok(OwnedFd::from(dev))
}

/// Asks the keeper of the mount at `mountpoint`, if one listens, for the mount: its
/// descriptor, the carried state, and the connection to confirm on once this process holds
/// them. None when nothing serves a mount there.
fn take_over(
    sock: &Path,
    mountpoint: &Path,
) -> anyhow::Result<Option<(OwnedFd, Carried, StdUnixStream)>> {
    if !crate::is_mounted(mountpoint) {
        return Ok(None);
    }
    let Ok(mut conn) = StdUnixStream::connect(sock) else {
        return Ok(None);
    };
    conn.write_all(b"take-over\n")?;
    // The old worker makes every write durable first: that can take as long as a flush.
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut len = [0u8; 8];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (got, fd) = {
        let mut iov = [std::io::IoSliceMut::new(&mut len)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| anyhow::anyhow!("take-over of {}: {e}", mountpoint.display()))?;
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    fd = Some(owned(f));
                }
            }
        }
        (msg.bytes, fd)
    };
    let Some(fd) = fd else {
        anyhow::bail!(
            "the mountd serving {} refused the take-over",
            mountpoint.display()
        );
    };
    anyhow::ensure!(got == 8, "short take-over header");
    let mut body = vec![0u8; u64::from_le_bytes(len) as usize];
    conn.read_exact(&mut body)?;
    let carried: Carried = serde_json::from_slice(&body)?;
    Ok(Some((fd, carried, conn)))
}

/// A descriptor this process inherited under number `fd` (`--ready-fd`), if it is open.
pub fn inherited_fd(fd: std::os::fd::RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // Open? (F_GETFD fails on a closed number.)
    let open = nix::fcntl::fcntl(
        // SAFETY-free borrow: checked by the kernel, not dereferenced.
        unsafe_borrow(fd),
        nix::fcntl::FcntlArg::F_GETFD,
    );
    open.ok().map(|_| owned(fd))
}

#[allow(unsafe_code)]
fn unsafe_borrow(fd: std::os::fd::RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only passed to fcntl(F_GETFD), which checks the number itself.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

#[allow(unsafe_code)]
pub(crate) fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` came in an SCM_RIGHTS message just now; this process opened it and
    // nothing else refers to it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
