//! mountd: mounts a brickfs volume with FUSE (fuser). A thin adapter: every call becomes a
//! metadata operation or a data-path call of `brickfs-client`, and every failure an errno
//! through `errno_for_code`, the one mapping.
//!
//! What it serves: lookup, getattr, setattr (mode, owner, size, times), mknod, mkdir, create,
//! open, read, write, flush, fsync, release, unlink, rmdir, rename (with RENAME_NOREPLACE and
//! RENAME_EXCHANGE), link, symlink, readlink, readdir, statfs and xattrs; POSIX ACLs (kept and
//! inherited by the metadata group, enforced by the kernel with `default_permissions`); POSIX
//! byte-range locks (getlk, setlk, setlkw) and flock(2), both held in the metadata group so
//! they hold across mounts (flock is emulated as a whole-file lock owned by the open file, as
//! NFS does, so a flock and an fcntl lock on one file do conflict). 1 MiB writes, several
//! dispatch threads, readahead per handle. Attribute and entry TTLs of one second bound how
//! stale another mount's changes can look; opens revalidate (close-to-open).

mod behind;
mod convert;
mod dirs;
mod handles;
mod holds;
pub mod journal;
pub mod keeper;
mod locks;
mod mount;
mod readahead;

use journal::{Carried, Journal, Note};
pub use keeper::{Launch, keep, socket_path};
pub use mount::{Options, READAHEAD_KB, Source, is_mounted, kernel_resends, worker_main};

use behind::Open;
use brickfs_client::{FileHandle, MetaClient, VolumeClient, VolumeError};
use brickfs_proto::Ino;
use brickfs_proto::meta::{
    Attr, FileKind, LockKind, LockSpec, MetaOp, MetaRead, MetaReply, RenameFlags as BfRename,
    SetAttr,
};
use brickfs_proto::metrics::OpMetrics;
use bytes::Bytes;
use convert::*;
use dirs::{Listed, Listings};
use fuser::{
    Errno, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use handles::Handles;
pub use readahead::READAHEAD_BYTES;
use readahead::{Readahead, Step};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The fetch of a handle's next readahead window, aborted when dropped.
struct Ahead(Option<tokio::task::JoinHandle<Result<Bytes, VolumeError>>>);

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The largest write the kernel sends in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

/// Per open handle, the readahead state its reads share.
type Windows = Arc<Mutex<HashMap<u64, Arc<Mutex<Readahead<Ahead>>>>>>;

/// How a drain on behalf of `own`'s call tells `o`'s failures (see `behind::Tell`).
fn tell_for(o: &Arc<Open>, own: Option<&Arc<Open>>) -> behind::Tell {
    match own {
        Some(own) if Arc::ptr_eq(o, own) => behind::Tell::Owner,
        Some(_) => behind::Tell::Other,
        None => behind::Tell::Quiet,
    }
}

/// The mounted filesystem.
pub struct BrickFs {
    rt: tokio::runtime::Handle,
    vol: Arc<VolumeClient>,
    handles: Arc<Handles>,
    /// Per open handle: the readahead window of its sequential reads.
    readahead: Windows,
    /// Bumped whenever windows are dropped (a write, a truncate, a lock taken), so that a
    /// read racing with one does not keep a window fetched before it.
    ra_epoch: Arc<AtomicU64>,
    /// Inodes this mount has taken POSIX locks on (closes release them).
    locked: Mutex<std::collections::HashSet<u64>>,
    /// Per open directory: the listing read when it was read from the start.
    dirs: Listings,
    /// The files this mount holds open in the metadata group.
    holds: Arc<holds::Holds>,
    /// Lock requests waiting for a conflicting lock to go.
    waiters: Arc<locks::Waiters>,
    /// Tells the kernel to drop what it caches (set once the session exists).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// FUSE requests served, per kind (`mountd_fuse_ops_total`).
    fuse: Arc<OpMetrics>,
    /// Files known lately to have no `security.capability`.
    no_caps: NoCaps,
    /// Notes to the keeper (see `journal`).
    journal: Arc<Journal>,
    /// Handles whose acknowledged writes a dead worker may have lost: their next fsync or
    /// flush fails with EIO (once).
    lost: Mutex<std::collections::HashSet<u64>>,
}

/// The xattr the kernel reads before every write to a file (to drop file capabilities).
const CAPS_XATTR: &str = "security.capability";

/// The files this mount learnt, within the last attribute TTL, have no file capabilities
/// (their `security.capability` read as absent, or this mount made them with O_EXCL). The
/// kernel asks for that xattr before every write; answered here, a run of writes costs one
/// metadata read a TTL instead of one a write. Another mount setting capabilities is seen
/// as late as its attribute changes are.
#[derive(Default)]
struct NoCaps(Mutex<HashMap<u64, std::time::Instant>>);

impl NoCaps {
    /// Entries beyond which stale ones are swept.
    const SWEEP_AT: usize = 4096;

    fn known(&self, ino: u64) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&ino).is_some_and(|at| at.elapsed() < TTL)
    }

    fn learnt(&self, ino: u64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::SWEEP_AT {
            map.retain(|_, at| at.elapsed() < TTL);
        }
        map.insert(ino, std::time::Instant::now());
    }

    fn forget(&self, ino: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
    }
}

/// Counts one FUSE request and how long its method took, when dropped.
struct Timed<'a> {
    metrics: &'a OpMetrics,
    name: &'static str,
    start: std::time::Instant,
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.metrics
            .record(self.name, self.start.elapsed(), true, 0, 0);
    }
}

/// The value of a `Result`, or answer the FUSE request with its errno and return.
macro_rules! or_reply {
    ($r:expr, $reply:ident) => {
        match $r {
            Ok(v) => v,
            Err(e) => return $reply.error(e),
        }
    };
}

impl BrickFs {
    pub fn new(
        rt: tokio::runtime::Handle,
        vol: Arc<VolumeClient>,
        journal: Arc<Journal>,
    ) -> BrickFs {
        BrickFs {
            rt,
            vol,
            handles: Arc::new(Handles::new(journal.clone())),
            readahead: Arc::new(Mutex::new(HashMap::new())),
            ra_epoch: Arc::new(AtomicU64::new(0)),
            locked: Mutex::new(std::collections::HashSet::new()),
            dirs: Listings::default(),
            holds: Arc::new(holds::Holds::default()),
            waiters: Arc::new(locks::Waiters::default()),
            notifier: Arc::new(std::sync::OnceLock::new()),
            fuse: Arc::new(OpMetrics::default()),
            no_caps: NoCaps::default(),
            journal,
            lost: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Takes over what an earlier worker of this mount left: its handles (attributes read
    /// again), the files held open in the metadata group and those with POSIX locks. The
    /// session itself was adopted by the metadata client.
    pub fn adopt(&self, c: &Carried) {
        self.handles.start_at(c.fh_below);
        for (&fh, h) in &c.handles {
            match self.getattr_ino(h.ino) {
                Ok(attr) => {
                    let sync = h.flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
                    let stripe = self.vol.stripe_bytes(&attr);
                    self.handles
                        .insert_at(fh, Open::new(FileHandle::new(attr), sync, stripe));
                    self.holds.open(h.ino);
                    if h.lost {
                        self.lost_lock().insert(fh);
                    }
                }
                Err(e) => {
                    tracing::warn!(fh, ino = h.ino, errno = ?e, "an open file of the last worker is gone: its descriptor answers EBADF");
                    self.journal.note(&Note::Closed { fh });
                }
            }
        }
        for ino in c.unheld() {
            self.holds.release_later(ino);
        }
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(c.locked.iter().copied());
        let lost = self.lost_lock().len();
        tracing::info!(
            handles = c.handles.len(),
            lost,
            "took over the last worker's open files"
        );
    }

    fn lost_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A dead worker's lost writes, reported once to `fh`'s fsync or flush; `any_of`: also
    /// when another handle of that file lost them (an fsync covers every handle's writes).
    fn take_lost(&self, fh: u64, any_of: Option<u64>) -> Result<(), Errno> {
        let mut lost = self.lost_lock();
        if lost.remove(&fh) {
            drop(lost);
            self.journal.note(&Note::Reported { fh });
            return Err(Errno::EIO);
        }
        if let Some(ino) = any_of
            && lost.iter().any(|&l| self.handles.is_of(l, ino))
        {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// Notes handles of `ino` whose writes are all durable and committed now.
    fn note_clean(&self, ino: u64) {
        for (fh, o) in self.handles.of_ino_fh(ino) {
            let mut noted = o.noted_dirty.lock().unwrap_or_else(|p| p.into_inner());
            if *noted && !o.pending_or_dirty() {
                self.journal.note(&Note::Clean { fh });
                *noted = false;
            }
        }
    }

    /// What a hand-over needs after the readers stopped.
    pub fn quiescer(&self) -> Quiesce {
        Quiesce {
            rt: self.rt.clone(),
            vol: self.vol.clone(),
            handles: self.handles.clone(),
            holds: self.holds.clone(),
            waiters: self.waiters.clone(),
            journal: self.journal.clone(),
        }
    }

    /// The FUSE requests this mount has served, per kind.
    pub fn fuse_metrics(&self) -> Arc<OpMetrics> {
        self.fuse.clone()
    }

    fn fuse_op(&self, name: &'static str) -> Timed<'_> {
        Timed {
            metrics: &self.fuse,
            name,
            start: std::time::Instant::now(),
        }
    }

    fn meta(&self) -> &MetaClient {
        self.vol.meta()
    }

    fn volume(&self) -> brickfs_proto::VolumeId {
        self.vol.record().id
    }

    fn write_op(&self, op: MetaOp) -> Result<MetaReply, Errno> {
        self.rt.block_on(self.meta().write(op)).map_err(|e| {
            tracing::debug!(error = %e, "metadata write refused");
            errno_meta(&e)
        })
    }

    fn read_op(&self, r: MetaRead) -> Result<MetaReply, Errno> {
        self.rt.block_on(self.meta().read(r)).map_err(|e| {
            tracing::debug!(error = %e, "metadata read refused");
            errno_meta(&e)
        })
    }

    fn attr_of(reply: Result<MetaReply, Errno>) -> Result<Attr, Errno> {
        match reply? {
            MetaReply::Attr(a) => Ok(a),
            _ => Err(Errno::EIO),
        }
    }

    /// The attributes, with the size grown by writes still open on this mount.
    fn getattr_ino(&self, ino: u64) -> Result<Attr, Errno> {
        let mut a = Self::attr_of(self.read_op(MetaRead::GetAttr {
            volume: self.volume(),
            ino: Ino(ino),
        }))?;
        self.merge_open_sizes(&mut a);
        Ok(a)
    }

    /// Merges what open handles of this mount wrote and have not committed: the size grows
    /// to their furthest byte and mtime/ctime to their last write. Handles with nothing
    /// pending take the committed size (another mount may have cut or grown the file).
    fn merge_open_sizes(&self, a: &mut Attr) {
        if a.kind != FileKind::File {
            return;
        }
        let m = self.handles.merge(a.ino.0, a.size_bytes);
        a.size_bytes = m.size;
        if let Some(t) = m.modified {
            a.mtime_ns = a.mtime_ns.max(t);
            a.ctime_ns = a.ctime_ns.max(t);
        }
    }

    /// The listing of open directory `fh`: read afresh when read from the start (or when the
    /// handle has none), else the one read then, so that offsets stay stable.
    fn listing(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Arc<Vec<Listed>>, Errno> {
        if let Some(l) = self.dirs.resume(fh, offset, plus) {
            return Ok(l);
        }
        let dir = self.getattr_ino(ino)?;
        let mut listing = vec![
            Listed {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
                attr: Some(dir.clone()),
            },
            Listed {
                ino,
                kind: FileType::Directory,
                name: "..".into(),
                attr: Some(dir),
            },
        ];
        let mut after = None;
        loop {
            let (volume, ino, after_name) = (self.volume(), Ino(ino), after.clone());
            let read = if plus {
                MetaRead::ReadDirPlus {
                    volume,
                    ino,
                    after: after_name,
                    limit: 1024,
                }
            } else {
                MetaRead::ReadDir {
                    volume,
                    ino,
                    after: after_name,
                    limit: 1024,
                }
            };
            let more = match self.read_op(read)? {
                MetaReply::Entries { entries, more } => {
                    after = entries.last().map(|e| e.name.clone());
                    listing.extend(entries.into_iter().map(|e| Listed {
                        ino: e.ino.0,
                        kind: kind_of(e.kind),
                        name: e.name,
                        attr: None,
                    }));
                    more
                }
                MetaReply::EntriesPlus { entries, more } => {
                    after = entries.last().map(|(e, _)| e.name.clone());
                    listing.extend(entries.into_iter().map(|(e, a)| Listed {
                        ino: e.ino.0,
                        kind: kind_of(e.kind),
                        name: e.name,
                        attr: Some(a),
                    }));
                    more
                }
                _ => return Err(Errno::EIO),
            };
            if !more {
                break;
            }
        }
        let listing = Arc::new(listing);
        self.dirs.keep(fh, listing.clone());
        Ok(listing)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Open>, Errno> {
        self.handles.get(fh).ok_or(Errno::EBADF)
    }

    /// Opens a handle; `flags` are open(2)'s (O_SYNC and O_DSYNC write through).
    fn open_handle(&self, attr: Attr, flags: i32) -> u64 {
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let stripe = self.vol.stripe_bytes(&attr);
        let ino = attr.ino.0;
        let fh = self
            .handles
            .insert(Open::new(FileHandle::new(attr), sync, stripe));
        self.journal.note(&Note::Opened { fh, ino, flags });
        fh
    }

    /// The open handles of `ino` on this mount.
    fn opens_of(&self, ino: u64) -> Vec<Arc<Open>> {
        self.handles.of_ino(ino)
    }

    /// Sends every write of `ino` still behind on this mount and waits for them. A failed
    /// write stays with its own handle too (its next write, fsync or close reports it).
    /// `own` is the handle whose call this is (see `Tell`), `None` for a read.
    fn drain_ino(&self, ino: u64, own: Option<&Arc<Open>>) -> Result<(), Errno> {
        let mut first = Ok(());
        for o in self.opens_of(ino) {
            if let Err(e) = o.drain(&self.rt, &self.vol, tell_for(&o, own)) {
                tracing::debug!(ino, errno = ?e, "a handle's write-behind failed");
                first = first.and(Err(e));
            }
        }
        first
    }

    /// Publishes what this mount wrote to `ino`: every handle's write-behind is sent and its
    /// size and mtime committed, so that another mount that opens the file or takes a lock
    /// next sees all of it. The first failure, if any.
    /// `own` is the handle whose call this is (see `Tell`), `None` for a truncate, a lock or
    /// a setattr, which a quota must not block.
    fn publish_ino(&self, ino: u64, own: Option<&Arc<Open>>) -> Result<(), Errno> {
        let mut first = Ok(());
        for o in self.opens_of(ino) {
            if let Err(e) = o.publish(&self.rt, &self.vol, tell_for(&o, own)) {
                tracing::debug!(ino, errno = ?e, "publishing a handle's writes failed");
                first = first.and(Err(e));
            }
        }
        first
    }

    /// After taking a lock (or opening): what this mount cached of `ino` may be older than
    /// another mount's last writes under the lock, so the kernel's pages and attributes, the
    /// readahead windows and the handles' sizes go.
    fn forget_cached(&self, ino: u64) {
        let size = self.rt.block_on(committed_size(&self.vol, ino));
        self.cache().forget(ino, size);
    }

    fn entry(&self, reply: ReplyEntry, r: Result<MetaReply, Errno>) {
        match Self::attr_of(r) {
            Ok(a) => reply.entry(&TTL, &fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for BrickFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // POSIX ACLs: the kernel enforces them (reading them as xattrs) and leaves the umask
        // to the metadata group, which ignores it under a default ACL. flock(2) arrives as a
        // whole-file lock owned by the open file, so it holds across mounts too.
        for flag in [
            fuser::InitFlags::FUSE_POSIX_LOCKS,
            fuser::InitFlags::FUSE_FLOCK_LOCKS,
            fuser::InitFlags::FUSE_POSIX_ACL,
            fuser::InitFlags::FUSE_DONT_MASK,
            fuser::InitFlags::FUSE_DO_READDIRPLUS,
            fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        ] {
            if let Err(unsupported) = config.add_capabilities(flag) {
                tracing::warn!(?unsupported, "the kernel lacks a FUSE capability");
            }
        }
        if let Err(max) = config.set_max_write(MAX_WRITE_BYTES) {
            tracing::info!(max, "the kernel takes smaller writes");
        }
        if let Err(max) = config.set_max_readahead(MAX_WRITE_BYTES) {
            tracing::debug!(max, "FUSE INIT caps readahead (the mount raises it after)");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.fuse_op("lookup");
        let name = or_reply!(name_of(name), reply);
        let r = self.read_op(MetaRead::Lookup {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
        });
        // The lookup's answer holds the child's attributes: no second read.
        match Self::attr_of(r) {
            Ok(mut a) => {
                self.merge_open_sizes(&mut a);
                reply.entry(&TTL, &fuse_attr(&a), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        let _op = self.fuse_op("getattr");
        match self.getattr_ino(ino.0) {
            Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
            Err(e) => reply.error(stale(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<fuser::FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = self.fuse_op("setattr");
        let now = ns_of(SystemTime::now());
        let t = |x: Option<TimeOrNow>| {
            x.map(|t| match t {
                TimeOrNow::SpecificTime(s) => ns_of(s),
                TimeOrNow::Now => now,
            })
        };
        // What this mount wrote goes first: its commit must not land after (and undo) the
        // times or size set here.
        if (size.is_some() || atime.is_some() || mtime.is_some())
            && let Err(e) = self.publish_ino(ino.0, None)
        {
            return reply.error(e);
        }
        // A truncate sets mtime and ctime, as ext4 does, even when the size stays (O_TRUNC
        // of an empty file), which skips the data path.
        let mtime = mtime.or(size.map(|_| TimeOrNow::Now));
        let size = match size {
            Some(len) => match self.getattr_ino(ino.0) {
                Ok(a) if a.size_bytes == len => None,
                _ => Some(len),
            },
            None => None,
        };
        if let Some(len) = size {
            self.drop_readahead(ino.0);
            // Cut or extend the data first, then the size follows in the metadata group.
            let handle = match fh.map(|f| self.handle(f.0)) {
                Some(Ok(o)) => o.h.clone(),
                _ => match self.getattr_ino(ino.0) {
                    Ok(a) => Arc::new(FileHandle::new(a)),
                    Err(e) => return reply.error(e),
                },
            };
            if let Err(e) = self.rt.block_on(self.vol.truncate(&handle, len)) {
                return reply.error(errno_of(&e));
            }
            for o in self.opens_of(ino.0) {
                o.truncated(len);
            }
        }
        let set = SetAttr {
            mode,
            uid,
            gid,
            size_bytes: None,
            atime_ns: t(atime),
            mtime_ns: t(mtime),
            size_at_least_bytes: None,
        };
        match Self::attr_of(self.write_op(MetaOp::SetAttr {
            volume: self.volume(),
            ino: Ino(ino.0),
            set,
        })) {
            Ok(_) => match self.getattr_ino(ino.0) {
                Ok(a) => reply.attr(&TTL, &fuse_attr(&a)),
                Err(e) => reply.error(e),
            },
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = self.fuse_op("readlink");
        match self.read_op(MetaRead::ReadLink {
            volume: self.volume(),
            ino: Ino(ino.0),
        }) {
            Ok(MetaReply::Target(t)) => reply.data(t.as_bytes()),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.fuse_op("mknod");
        let name = or_reply!(name_of(name), reply);
        let op = MetaOp::Create {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
            kind: kind_from_mode(mode),
            mode: mode & 0o7777,
            umask,
            uid: req.uid(),
            gid: req.gid(),
            rdev,
            exclusive: true,
        };
        self.entry(reply, self.write_op(op));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.fuse_op("mkdir");
        let name = or_reply!(name_of(name), reply);
        let op = MetaOp::Mkdir {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
            mode: mode & 0o7777,
            umask,
            uid: req.uid(),
            gid: req.gid(),
        };
        self.entry(reply, self.write_op(op));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.fuse_op("unlink");
        let name = or_reply!(name_of(name), reply);
        // A file open on any mount stays readable and writable after its last name goes
        // (POSIX): the metadata group keeps it while a session holds it open (`holds`).
        match self.write_op(MetaOp::Unlink {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
        }) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.fuse_op("rmdir");
        let name = or_reply!(name_of(name), reply);
        match self.write_op(MetaOp::Rmdir {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
        }) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _op = self.fuse_op("symlink");
        let (Ok(name), Some(target)) = (name_of(link_name), target.to_str()) else {
            return reply.error(Errno::EINVAL);
        };
        let op = MetaOp::Symlink {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
            target: target.to_string(),
            uid: req.uid(),
            gid: req.gid(),
        };
        self.entry(reply, self.write_op(op));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("rename");
        let (Ok(name), Ok(new_name)) = (name_of(name), name_of(newname)) else {
            return reply.error(Errno::EINVAL);
        };
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let op = MetaOp::Rename {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
            new_parent: Ino(newparent.0),
            new_name,
            flags: BfRename {
                noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
            },
        };
        match self.write_op(op) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _op = self.fuse_op("link");
        let name = match name_of(newname) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let op = MetaOp::Link {
            volume: self.volume(),
            ino: Ino(ino.0),
            new_parent: Ino(newparent.0),
            new_name: name,
        };
        match self.write_op(op) {
            // POSIX says EPERM for a hard link to a directory.
            Err(e) if e == Errno::EACCES => reply.error(Errno::EPERM),
            r => self.entry(reply, r),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.fuse_op("open");
        match self.hold_open(ino.0) {
            Ok(a) if a.kind == FileKind::Dir => {
                self.release_hold(ino.0);
                reply.error(Errno::EISDIR)
            }
            Ok(a) => {
                // Close-to-open: the kernel may hold attributes from before another mount's
                // last close (for up to the TTL); they go, so that the size read next is the
                // one just fetched. Not opening with FOPEN_KEEP_CACHE drops cached pages.
                if let Some(n) = self.notifier.get()
                    && let Err(e) = n.inval_inode(ino, -1, 0)
                {
                    tracing::debug!(ino = ino.0, error = %e, "attribute invalidation refused");
                }
                reply.opened(
                    fuser::FileHandle(self.open_handle(a, flags.0)),
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(stale(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = self.fuse_op("create");
        let name = or_reply!(name_of(name), reply);
        let op = MetaOp::CreateOpen {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
            kind: FileKind::File,
            mode: mode & 0o7777,
            umask,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            exclusive: flags & libc::O_EXCL != 0,
        };
        // The group holds the new file for this session; the count here follows (a file
        // already held here keeps that hold).
        let created = {
            let _gate = self.rt.block_on(self.holds.gate.lock());
            Self::attr_of(self.write_op(op))
        };
        match created {
            Ok(a) => {
                self.holds.open(a.ino.0);
                if flags & libc::O_EXCL != 0 {
                    // Made just now: nothing has set its capabilities.
                    self.no_caps.learnt(a.ino.0);
                }
                let fh = self.open_handle(a.clone(), flags);
                reply.created(
                    &TTL,
                    &fuse_attr(&a),
                    Generation(0),
                    fuser::FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let _op = self.fuse_op("read");
        let o = or_reply!(self.handle(fh.0), reply);
        // The epoch is read before the drain: a write accepted after this point bumps it, so
        // a window fetched before that write reached the bricks is not kept.
        let epoch = self.ra_epoch.load(Ordering::SeqCst);
        // Read-your-writes: what this mount wrote to the file is sent first.
        or_reply!(self.drain_ino(o.h.attr.ino.0, None), reply);
        self.touch_atime(&o);
        let h = o.h.clone();
        let size = u64::from(size);
        // Reads of one handle share its window: the kernel sends several of a sequential
        // reader's requests at once, and each would otherwise fetch on its own.
        let slot = self
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(fh.0)
            .or_default()
            .clone();
        let mut ra = slot.lock().unwrap_or_else(|p| p.into_inner());
        let answer = loop {
            match ra.step(offset, size) {
                Step::Serve(bytes) => break bytes,
                Step::Await(at, mut task) => {
                    let got = task.0.take().map(|t| self.rt.block_on(t));
                    ra.ahead_done(offset, at, got.and_then(|r| r.ok()?.ok()));
                }
                // A window: the handle's other reads wait for it.
                Step::Fetch { want } if want > size => {
                    match self.rt.block_on(self.vol.read(&h, offset, want)) {
                        Ok(bytes) => break ra.fetched(offset, size, bytes),
                        Err(e) => return reply.error(errno_of(&e)),
                    }
                }
                // A random read: the handle's other reads need not wait for it.
                Step::Fetch { want } => {
                    drop(ra);
                    let got = self.rt.block_on(self.vol.read(&h, offset, want));
                    ra = slot.lock().unwrap_or_else(|p| p.into_inner());
                    match got {
                        Ok(bytes) => break ra.fetched(offset, size, bytes),
                        Err(e) => return reply.error(errno_of(&e)),
                    }
                }
            }
        };
        reply.data(&answer);
        if self.ra_epoch.load(Ordering::SeqCst) != epoch {
            // A write, truncate or lock came meanwhile: what was fetched may predate it.
            *ra = Readahead::default();
            return;
        }
        if let Some(at) = ra.prefetch(o.size()) {
            let (vol, h) = (self.vol.clone(), h.clone());
            let task = self
                .rt
                .spawn(async move { vol.read(&h, at, READAHEAD_BYTES).await });
            ra.set_ahead(at, Ahead(Some(task)));
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let _op = self.fuse_op("write");
        let o = or_reply!(self.handle(fh.0), reply);
        let ino = o.h.attr.ino.0;
        // O_APPEND: the kernel placed the write at the end it caches, which another mount
        // may have moved (it appended under a lock this mount then took, whose hand-over
        // refreshed the handles' sizes). The write goes to the end this mount knows; if that
        // is not where the kernel put it, the kernel's pages and size of the file go once
        // this write is answered (it holds those pages until then).
        let offset = if flags.0 & libc::O_APPEND != 0 {
            let end = self
                .opens_of(ino)
                .iter()
                .map(|h| h.size())
                .fold(offset, u64::max);
            if end != offset {
                let cache = self.cache();
                self.rt.spawn_blocking(move || cache.forget(ino, None));
            }
            end
        } else {
            offset
        };
        // Accepted first, then the windows go (see `read`): a read that loaded the epoch
        // before this write either finds the bytes in the drain or loses its window.
        // Noted dirty before the write is acknowledged (a worker dying after the answer must
        // not leave the loss untold); held while the write is taken in, so that a concurrent
        // `note_clean` cannot see the handle clean in between.
        let r = {
            let mut noted = o.noted_dirty.lock().unwrap_or_else(|p| p.into_inner());
            if !*noted {
                self.journal.note(&Note::Dirty { fh: fh.0 });
                *noted = true;
            }
            o.write(&self.rt, &self.vol, offset, data)
        };
        self.drop_readahead(ino);
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("flush");
        // Close-to-open: what this handle wrote, its size and mtime are committed when it
        // closes, before its locks go, so the next holder of a lock sees them.
        let published = self
            .handle(fh.0)
            .and_then(|o| o.publish(&self.rt, &self.vol, behind::Tell::Owner))
            .and_then(|()| {
                self.note_clean(ino.0);
                self.take_lost(fh.0, None)
            });
        // A close drops the closing process's POSIX locks on the file (fcntl(2)), whatever
        // became of its writes.
        if self
            .locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ino.0)
        {
            let op = MetaOp::ReleaseLocks {
                volume: self.volume(),
                ino: Ino(ino.0),
                owner: lock_owner.0,
            };
            if let Err(e) = self.write_op(op) {
                return reply.error(e);
            }
        }
        match published {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("release");
        let h = self.handles.remove(fh.0);
        if h.is_some() {
            self.journal.note(&Note::Closed { fh: fh.0 });
        }
        self.lost_lock().remove(&fh.0);
        self.readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        // What the handle wrote is published before its flock goes.
        let committed = h.as_ref().map_or(Ok(()), |o| {
            o.publish(&self.rt, &self.vol, behind::Tell::Owner)
        });
        // The last close of an open file drops the flock(2) lock it holds (the kernel names
        // the lock's owner only when there is one).
        if let Some(owner) = lock_owner {
            let op = MetaOp::ReleaseLocks {
                volume: self.volume(),
                ino: Ino(ino.0),
                owner: owner.0,
            };
            if let Err(e) = self.write_op(op) {
                tracing::warn!(ino = ino.0, errno = ?e, "releasing a flock on close failed");
            }
        }
        // The last close here releases the hold (in the next batch).
        if let Some(o) = &h {
            self.release_hold(o.h.attr.ino.0);
        }
        match committed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("fsync");
        let o = or_reply!(self.handle(fh.0), reply);
        // Every write any descriptor of this mount accepted for the file is made durable,
        // not only this one's: send them all, sync the file's objects, commit every handle.
        let drained = self.drain_ino(o.h.attr.ino.0, Some(&o));
        let synced = self
            .rt
            .block_on(self.vol.fsync(&o.h))
            .map_err(|e| errno_of(&e));
        let committed = self.publish_ino(o.h.attr.ino.0, Some(&o));
        if committed.is_ok() {
            self.note_clean(o.h.attr.ino.0);
        }
        let lost = self.take_lost(fh.0, Some(o.h.attr.ino.0));
        match drained.and(synced).and(committed).and(lost) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.fuse_op("opendir");
        match self.getattr_ino(ino.0).map_err(stale) {
            Ok(a) if a.kind != FileKind::Dir => reply.error(Errno::ENOTDIR),
            Ok(_) => {
                let fh = self.handles.next_id();
                reply.opened(fuser::FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = self.fuse_op("readdir");
        let listing = or_reply!(self.listing(ino.0, fh.0, offset, false), reply);
        for (i, e) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let _op = self.fuse_op("readdirplus");
        let listing = or_reply!(self.listing(ino.0, fh.0, offset, true), reply);
        for (i, e) in listing.iter().enumerate().skip(offset as usize) {
            let Some(attr) = &e.attr else {
                return reply.error(Errno::EIO);
            };
            let mut attr = attr.clone();
            self.merge_open_sizes(&mut attr);
            let full = reply.add(
                INodeNo(e.ino),
                (i + 1) as u64,
                &e.name,
                &TTL,
                &fuse_attr(&attr),
                Generation(0),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("releasedir");
        self.dirs.forget(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.fuse_op("statfs");
        // The bricks' real space, as the volume's layout lets files use it (a replica-3 set
        // holds a third of its members' raw space, a 4+2 set two thirds); at a directory with
        // a quota, the quota's (`df` in a pod shows its claim's size).
        let space = self.rt.block_on(self.vol.statfs_at(Ino(ino.0)));
        let bsize = 4096u64;
        reply.statfs(
            space.total_bytes / bsize,
            space.avail_bytes / bsize,
            space.avail_bytes / bsize,
            1 << 32,
            1 << 32,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("setxattr");
        let name = or_reply!(name_of(name), reply);
        if name == CAPS_XATTR {
            self.no_caps.forget(ino.0);
        }
        let op = MetaOp::SetXattr {
            volume: self.volume(),
            ino: Ino(ino.0),
            name,
            value: value.to_vec(),
            create_only: flags & libc::XATTR_CREATE != 0,
            replace_only: flags & libc::XATTR_REPLACE != 0,
        };
        match self.write_op(op) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _op = self.fuse_op("getxattr");
        let name = or_reply!(name_of(name), reply);
        let caps = name == CAPS_XATTR;
        if caps && self.no_caps.known(ino.0) {
            return reply.error(Errno::NO_XATTR);
        }
        match self.read_op(MetaRead::GetXattr {
            volume: self.volume(),
            ino: Ino(ino.0),
            name,
        }) {
            Ok(MetaReply::Value(v)) => xattr_reply(reply, size, &v),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => {
                if caps && e == Errno::NO_XATTR {
                    self.no_caps.learnt(ino.0);
                }
                reply.error(e)
            }
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _op = self.fuse_op("listxattr");
        match self.read_op(MetaRead::ListXattr {
            volume: self.volume(),
            ino: Ino(ino.0),
        }) {
            Ok(MetaReply::Names(names)) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                xattr_reply(reply, size, &buf)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: fuser::FileHandle,
        lock_owner: fuser::LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: fuser::ReplyLock,
    ) {
        let _op = self.fuse_op("getlk");
        let spec = or_reply!(lock_spec(lock_owner.0, pid, start, end, typ), reply);
        let Some(session) = self.meta().session_id() else {
            // No session yet: this mount holds nothing, so only others' locks can conflict.
            return match self.write_op(MetaOp::KeepAlive) {
                Ok(_) => self.getlk(_req, ino, _fh, lock_owner, start, end, typ, pid, reply),
                Err(e) => reply.error(e),
            };
        };
        let r = self.read_op(MetaRead::GetLock {
            volume: self.volume(),
            ino: Ino(ino.0),
            session,
            lock: spec,
        });
        match r {
            Ok(MetaReply::Lock(Some(held))) => {
                let typ = if held.lock.kind == LockKind::Write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                let end = if held.lock.end == u64::MAX {
                    i64::MAX as u64
                } else {
                    held.lock.end - 1
                };
                reply.locked(held.lock.start, end, typ, held.lock.pid)
            }
            Ok(MetaReply::Lock(None)) => reply.locked(start, end, libc::F_UNLCK, 0),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: fuser::FileHandle,
        lock_owner: fuser::LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("setlk");
        let spec = or_reply!(lock_spec(lock_owner.0, pid, start, end, typ), reply);
        // Whoever takes the lock next, on any mount, sees what was written under it: the
        // file's writes, size and mtime are published before any lock changes.
        match self.publish_ino(ino.0, None) {
            Ok(()) => self.note_clean(ino.0),
            Err(e) => {
                tracing::debug!(ino = ino.0, errno = ?e, "publishing before a lock change failed")
            }
        }
        if spec.kind == LockKind::Unlock {
            return match self.lock_once(ino.0, spec) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        if self
            .locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino.0)
        {
            self.journal.note(&Note::Locked { ino: ino.0 });
        }
        match self.lock_once(ino.0, spec.clone()) {
            Ok(()) => {
                self.forget_cached(ino.0);
                reply.ok()
            }
            Err(e) if e == Errno::EAGAIN && sleep => self.wait_lock(req, ino.0, spec, reply),
            Err(e) => reply.error(e),
        }
    }

    fn interrupt(&self, _req: &Request, unique: fuser::RequestId) {
        let _op = self.fuse_op("interrupt");
        self.waiters.interrupt(unique.0);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _op = self.fuse_op("fallocate");
        let o = or_reply!(self.handle(fh.0), reply);
        match self.fallocate_ino(&o, ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.fuse_op("removexattr");
        let name = or_reply!(name_of(name), reply);
        match self.write_op(MetaOp::RemoveXattr {
            volume: self.volume(),
            ino: Ino(ino.0),
            name,
        }) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl BrickFs {
    /// Forgets the readahead of every handle of `ino` on this mount (after a write or a
    /// truncate through any of them).
    fn drop_readahead(&self, ino: u64) {
        self.cache().drop_readahead(ino);
    }

    /// Opens `ino` for this mount: the first descriptor here holds the file in the metadata
    /// group (which answers its attributes), later ones only read them.
    fn hold_open(&self, ino: u64) -> Result<Attr, Errno> {
        let (need_hold, first) = self.holds.open_counted(ino);
        let got = if need_hold {
            let _gate = self.rt.block_on(self.holds.gate.lock());
            Self::attr_of(self.write_op(MetaOp::OpenFile {
                volume: self.volume(),
                ino: Ino(ino),
            }))
            .map(|mut a| {
                self.merge_open_sizes(&mut a);
                a
            })
        } else {
            self.getattr_ino(ino)
        };
        match got {
            // A file without a name, not open here: the kernel reached it by a name another
            // mount removed since (a stale dentry). ESTALE makes it look the name up again,
            // so that O_CREAT makes a new file instead of reviving the old one.
            Ok(a) if first && a.kind == FileKind::File && a.nlink == 0 => {
                self.holds.close(ino);
                Err(Errno::ESTALE)
            }
            Ok(a) => Ok(a),
            Err(e) => {
                self.holds.open_failed(ino);
                Err(e)
            }
        }
    }

    /// A descriptor of `ino` closed here.
    fn release_hold(&self, ino: u64) {
        self.holds.close(ino);
    }

    /// relatime: the first read through a handle sets atime when it is not newer than mtime
    /// or ctime, or is a day old. In the background; ctime stays.
    fn touch_atime(&self, o: &Open) {
        if o.atime_checked.swap(true, Ordering::Relaxed) {
            return;
        }
        let a = &o.h.attr;
        let now = brickfs_client::volume::now_ns();
        const DAY_NS: i64 = 24 * 3600 * 1_000_000_000;
        if a.atime_ns > a.mtime_ns && a.atime_ns > a.ctime_ns && now - a.atime_ns < DAY_NS {
            return;
        }
        let (vol, ino) = (self.vol.clone(), a.ino);
        self.rt.spawn(async move {
            let op = MetaOp::TouchAtime {
                volume: vol.record().id,
                ino,
                atime_ns: now,
            };
            if let Err(e) = vol.meta().write(op).await {
                tracing::debug!(ino = ino.0, error = %e, "atime update failed");
            }
        });
    }

    /// F_SETLKW or a blocking flock that conflicts: the wait moves to a task (see `locks`),
    /// freeing this FUSE worker.
    fn wait_lock(&self, req: &Request, ino: u64, spec: LockSpec, reply: ReplyEmpty) {
        let unique = req.unique().0;
        let Some(interrupted) = self.waiters.register(unique) else {
            return reply.error(Errno::EINTR);
        };
        let (vol, waiters, cache) = (self.vol.clone(), self.waiters.clone(), self.cache());
        self.rt.spawn(async move {
            let r = wait_for_lock(&vol, ino, spec, &interrupted).await;
            waiters.done(unique);
            match r {
                Ok(()) => {
                    let size = committed_size(&vol, ino).await;
                    // The kernel's invalidation can wait on page locks: not on a runtime
                    // worker.
                    let forgot = tokio::task::spawn_blocking(move || cache.forget(ino, size));
                    if forgot.await.is_err() {
                        tracing::warn!(ino, "dropping caches after a lock wait failed");
                    }
                    reply.ok()
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn cache(&self) -> CacheRefs {
        CacheRefs {
            notifier: self.notifier.clone(),
            readahead: self.readahead.clone(),
            handles: self.handles.clone(),
            ra_epoch: self.ra_epoch.clone(),
        }
    }

    /// fallocate(2): modes 0 and KEEP_SIZE grow the size (unless KEEP_SIZE) without
    /// reserving space (objects grow as they are written); PUNCH_HOLE and ZERO_RANGE write
    /// zeros over the range (inside the file for a punch; ZERO_RANGE without KEEP_SIZE grows
    /// the file to cover it). Every mode sets mtime and ctime. Others: EOPNOTSUPP.
    fn fallocate_ino(
        &self,
        o: &Open,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let (keep, punch, zero) = (
            libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_PUNCH_HOLE,
            libc::FALLOC_FL_ZERO_RANGE,
        );
        if mode & !(keep | punch | zero) != 0 || (mode & punch != 0 && mode & zero != 0) {
            return Err(Errno::EOPNOTSUPP);
        }
        if mode & punch != 0 && mode & keep == 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(Errno::EFBIG)?;
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        self.publish_ino(ino, None)?;
        self.drop_readahead(ino);
        let size = self.getattr_ino(ino)?.size_bytes;
        let grow = mode & keep == 0 && end > size;
        if grow {
            self.rt
                .block_on(self.vol.truncate(&o.h, end))
                .map_err(|e| errno_of(&e))?;
            for other in self.opens_of(ino) {
                other.truncated(end);
            }
        }
        let zero_end = if grow { end } else { end.min(size) };
        if mode & (punch | zero) != 0 && zero_end > offset {
            const ZEROS_BYTES: u64 = 4 << 20;
            let zeros = Bytes::from(vec![0u8; ZEROS_BYTES as usize]);
            let mut at = offset;
            while at < zero_end {
                let n = (zero_end - at).min(ZEROS_BYTES);
                self.rt
                    .block_on(self.vol.write(&o.h, at, zeros.slice(..n as usize)))
                    .map_err(|e| errno_of(&e))?;
                at += n;
            }
            self.rt
                .block_on(self.vol.commit_size(&o.h))
                .map_err(|e| errno_of(&e))?;
        } else if !grow {
            // Nothing written and no size change: the times still move.
            let set = SetAttr {
                mtime_ns: Some(brickfs_client::volume::now_ns()),
                ..SetAttr::default()
            };
            self.write_op(MetaOp::SetAttr {
                volume: self.volume(),
                ino: Ino(ino),
                set,
            })?;
        }
        Ok(())
    }

    fn lock_once(&self, ino: u64, spec: LockSpec) -> Result<(), Errno> {
        self.write_op(MetaOp::SetLock {
            volume: self.volume(),
            ino: Ino(ino),
            lock: spec,
        })
        .map(|_| ())
    }
}

/// A hand-over's last steps, once the readers stopped: lock waits are abandoned (the kernel
/// sends them to the next worker; on kernels that cannot, they are interrupted), every
/// handle's writes made durable and committed, and the holds of closed files released.
pub struct Quiesce {
    rt: tokio::runtime::Handle,
    vol: Arc<VolumeClient>,
    handles: Arc<Handles>,
    holds: Arc<holds::Holds>,
    waiters: Arc<locks::Waiters>,
    journal: Arc<Journal>,
}

impl Quiesce {
    pub fn run(&self, kernel_resends: bool) {
        if !kernel_resends {
            self.waiters.interrupt_all();
        }
        for (fh, o) in self.handles.all() {
            match o.publish(&self.rt, &self.vol, behind::Tell::Quiet) {
                Ok(()) => {
                    let mut noted = o.noted_dirty.lock().unwrap_or_else(|p| p.into_inner());
                    if *noted && !o.pending_or_dirty() {
                        self.journal.note(&Note::Clean { fh });
                        *noted = false;
                    }
                }
                Err(e) => {
                    tracing::warn!(fh, errno = ?e, "a handle's writes could not be made durable before the hand-over: its next fsync or close fails")
                }
            }
        }
        self.rt
            .block_on(mount::flush_holds(&self.holds, &self.vol, &self.journal));
    }
}

/// What a lock waiter's task needs of the mount to drop its caches of a file.
#[derive(Clone)]
struct CacheRefs {
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    readahead: Windows,
    handles: Arc<Handles>,
    ra_epoch: Arc<AtomicU64>,
}

impl CacheRefs {
    /// The windows go from the map first, then the epoch moves: a read that loads the new
    /// epoch finds no old window, and one that loaded the old epoch drops what it fetched.
    fn drop_readahead(&self, ino: u64) {
        self.readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|fh, _| !self.handles.is_of(*fh, ino));
        self.ra_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Drops the kernel's pages and attributes of `ino`, the readahead windows, and takes
    /// `size` (the committed one) into handles with nothing pending.
    fn forget(&self, ino: u64, size: Option<u64>) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_inode(INodeNo(ino), 0, -1)
        {
            tracing::debug!(ino, error = %e, "cache invalidation refused");
        }
        self.drop_readahead(ino);
        if let Some(size) = size {
            self.handles.merge(ino, size);
        }
    }
}

/// The file's committed size in the metadata group, if it can be read.
async fn committed_size(vol: &VolumeClient, ino: u64) -> Option<u64> {
    let read = MetaRead::GetAttr {
        volume: vol.record().id,
        ino: Ino(ino),
    };
    match vol.meta().read(read).await {
        Ok(MetaReply::Attr(a)) => Some(a.size_bytes),
        _ => None,
    }
}

/// Waits until `spec` can be granted and takes it, or until `interrupted` fires (EINTR). See
/// `locks` for the protocol.
async fn wait_for_lock(
    vol: &VolumeClient,
    ino: u64,
    spec: LockSpec,
    interrupted: &tokio::sync::Notify,
) -> Result<(), Errno> {
    let volume = vol.record().id;
    loop {
        // The failed attempt that sent us here opened the session.
        let session = vol.meta().session_id().ok_or(Errno::EIO)?;
        let wait = vol.meta().read(MetaRead::WaitLock {
            volume,
            ino: Ino(ino),
            session,
            lock: spec.clone(),
            wait_ms: brickfs_proto::meta::LOCK_WAIT_MAX_MS,
        });
        tokio::select! {
            biased;
            () = interrupted.notified() => return Err(Errno::EINTR),
            r = wait => {
                if let Err(e) = r {
                    return Err(errno_meta(&e));
                }
            }
        }
        let op = MetaOp::SetLock {
            volume,
            ino: Ino(ino),
            lock: spec.clone(),
        };
        match vol.meta().write(op).await {
            Ok(_) => return Ok(()),
            Err(e) if errno_meta(&e) == Errno::EAGAIN => {}
            Err(e) => return Err(errno_meta(&e)),
        }
    }
}
