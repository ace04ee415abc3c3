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
mod holds;
mod locks;

use behind::Open;
use brickfs_client::{FileHandle, MetaClient, MetaClientOptions, VolumeClient, VolumeError};
use brickfs_proto::meta::{
    Attr, FileKind, LockKind, LockSpec, MetaOp, MetaRead, MetaReply, RenameFlags as BfRename,
    SetAttr,
};
use brickfs_proto::{Ino, errno_for_code};
use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and entries.
const TTL: Duration = Duration::from_secs(1);
/// How much a sequential reader fetches ahead in one request (the kernel asks 128 KiB at a
/// time).
pub const READAHEAD_BYTES: u64 = 4 << 20;

/// Bytes fetched ahead for one open handle, where its next sequential read would start, and
/// the fetch of the window after this one, started as soon as this one is in use.
struct Window {
    start: u64,
    bytes: Bytes,
    next: u64,
    ahead: Option<(u64, tokio::task::JoinHandle<Result<Bytes, VolumeError>>)>,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn covers(&self, offset: u64, size: u64) -> bool {
        offset >= self.start && offset + size <= self.end()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some((_, task)) = self.ahead.take() {
            task.abort();
        }
    }
}

/// The largest write the kernel sends in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

/// The mounted filesystem.
pub struct BrickFs {
    rt: tokio::runtime::Handle,
    vol: Arc<VolumeClient>,
    handles: Arc<Mutex<HashMap<u64, Arc<Open>>>>,
    /// Per open handle: the readahead window of its sequential reads.
    readahead: Arc<Mutex<HashMap<u64, Window>>>,
    /// Bumped whenever windows are dropped (a write, a truncate, a lock taken), so that a
    /// read racing with one does not keep a window fetched before it.
    ra_epoch: Arc<AtomicU64>,
    next_fh: AtomicU64,
    /// Inodes this mount has taken POSIX locks on (closes release them).
    locked: Mutex<std::collections::HashSet<u64>>,
    /// Per open directory: the listing read when it was read from the start.
    dirs: Mutex<HashMap<u64, Arc<Vec<Listed>>>>,
    /// The files this mount holds open in the metadata group.
    holds: Arc<holds::Holds>,
    /// Lock requests waiting for a conflicting lock to go.
    waiters: Arc<locks::Waiters>,
    /// Tells the kernel to drop what it caches (set once the session exists).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

/// One name of a directory listing; offsets into the listing are the kernel's cookies (1 is
/// ".", 2 is "..", then the entries in name order).
struct Listed {
    ino: u64,
    kind: FileType,
    name: String,
    /// With readdirplus.
    attr: Option<Attr>,
}

fn errno_of(e: &VolumeError) -> Errno {
    match e.code() {
        Some(code) => Errno::from_i32(errno_for_code(code.as_u16())),
        None => Errno::EIO,
    }
}

fn errno_meta(e: &brickfs_client::MetaError) -> Errno {
    match e.code() {
        Some(code) => Errno::from_i32(errno_for_code(code.as_u16())),
        None => Errno::from_i32(libc::ENOTCONN),
    }
}

/// An inode the kernel named that is gone (another mount removed it while a dentry here still
/// pointed at it): ESTALE, which makes the kernel look the name up again and retry (open with
/// O_CREAT then creates it, stat finds the new file), as it does for NFS.
fn stale(e: Errno) -> Errno {
    if e == Errno::ENOENT { Errno::ESTALE } else { e }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

fn ns_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn kind_of(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn kind_from_mode(mode: u32) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

fn fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size_bytes,
        blocks: a.size_bytes.div_ceil(512),
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: kind_of(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
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

fn name_of(name: &OsStr) -> Result<String, Errno> {
    std::str::from_utf8(name.as_bytes())
        .map(str::to_string)
        .map_err(|_| Errno::EINVAL)
}

impl BrickFs {
    pub fn new(rt: tokio::runtime::Handle, vol: Arc<VolumeClient>) -> BrickFs {
        BrickFs {
            rt,
            vol,
            handles: Arc::new(Mutex::new(HashMap::new())),
            readahead: Arc::new(Mutex::new(HashMap::new())),
            ra_epoch: Arc::new(AtomicU64::new(0)),
            next_fh: AtomicU64::new(1),
            locked: Mutex::new(std::collections::HashSet::new()),
            dirs: Mutex::new(HashMap::new()),
            holds: Arc::new(holds::Holds::default()),
            waiters: Arc::new(locks::Waiters::default()),
            notifier: Arc::new(std::sync::OnceLock::new()),
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
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let opens: Vec<&Arc<Open>> = handles.values().filter(|o| o.h.attr.ino == a.ino).collect();
        for o in opens.iter().filter(|o| o.pending_or_dirty()) {
            a.size_bytes = a.size_bytes.max(o.size());
            if let Some(m) = o.h.modified_at() {
                a.mtime_ns = a.mtime_ns.max(m);
                a.ctime_ns = a.ctime_ns.max(m);
            }
        }
        // The others take the size the file has now: committed, grown by this mount's
        // pending writes.
        for o in opens {
            o.settle_size(a.size_bytes);
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
        if offset > 0
            && let Some(l) = self.dirs.lock().unwrap_or_else(|p| p.into_inner()).get(&fh)
            && (!plus || l.iter().all(|e| e.attr.is_some()))
        {
            return Ok(l.clone());
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
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, listing.clone());
        Ok(listing)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Open>, Errno> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// Opens a handle; `flags` are open(2)'s (O_SYNC and O_DSYNC write through).
    fn open_handle(&self, attr: Attr, flags: i32) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let stripe = self.vol.stripe_bytes(&attr);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(Open::new(FileHandle::new(attr), sync, stripe)));
        fh
    }

    /// The open handles of `ino` on this mount.
    fn opens_of(&self, ino: u64) -> Vec<Arc<Open>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|o| o.h.attr.ino.0 == ino)
            .cloned()
            .collect()
    }

    /// Sends every write of `ino` still behind on this mount and waits for them. A failed
    /// write stays with its own handle too (its next write, fsync or close reports it).
    fn drain_ino(&self, ino: u64) -> Result<(), Errno> {
        let mut first = Ok(());
        for o in self.opens_of(ino) {
            if let Err(e) = o.drain(&self.rt, &self.vol) {
                tracing::debug!(ino, errno = ?e, "a handle's write-behind failed");
                first = first.and(Err(e));
            }
        }
        first
    }

    /// Publishes what this mount wrote to `ino`: every handle's write-behind is sent and its
    /// size and mtime committed, so that another mount that opens the file or takes a lock
    /// next sees all of it. The first failure, if any.
    fn publish_ino(&self, ino: u64) -> Result<(), Errno> {
        let mut first = Ok(());
        for o in self.opens_of(ino) {
            if let Err(e) = o.publish(&self.rt, &self.vol) {
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
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        let _ = config.set_max_readahead(MAX_WRITE_BYTES);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = or_reply!(name_of(name), reply);
        let r = self.read_op(MetaRead::Lookup {
            volume: self.volume(),
            parent: Ino(parent.0),
            name,
        });
        match Self::attr_of(r) {
            Ok(a) => match self.getattr_ino(a.ino.0) {
                Ok(a) => reply.entry(&TTL, &fuse_attr(&a), Generation(0)),
                Err(e) => reply.error(e),
            },
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
            && let Err(e) = self.publish_ino(ino.0)
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
        let o = or_reply!(self.handle(fh.0), reply);
        // The epoch is read before the drain: a write accepted after this point bumps it, so
        // a window fetched before that write reached the bricks is not kept.
        let epoch = self.ra_epoch.load(Ordering::SeqCst);
        // Read-your-writes: what this mount wrote to the file is sent first.
        or_reply!(self.drain_ino(o.h.attr.ino.0), reply);
        self.touch_atime(&o);
        let h = o.h.clone();
        let size = u64::from(size);
        let window = self
            .readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        let sequential = match &window {
            Some(w) => w.next == offset,
            None => offset == 0,
        };
        // A sequential reader that reached the end of its window moves on to the one fetched
        // ahead.
        let window = match window {
            Some(mut w) if sequential && offset >= w.end() && w.ahead.is_some() => {
                let (start, task) = w.ahead.take().expect("checked");
                match self.rt.block_on(task) {
                    Ok(Ok(bytes)) if start == offset && !bytes.is_empty() => Some(Window {
                        start,
                        bytes,
                        next: offset,
                        ahead: None,
                    }),
                    _ => None,
                }
            }
            w => w,
        };
        let (reply_bytes, window) = match window {
            Some(w) if w.covers(offset, size) => {
                let at = (offset - w.start) as usize;
                (w.bytes.slice(at..at + size as usize), Some(w))
            }
            _ => {
                // A sequential reader gets a large window in one request; others read what
                // they ask.
                let want = if sequential {
                    size.max(READAHEAD_BYTES)
                } else {
                    size
                };
                let bytes = match self.rt.block_on(self.vol.read(&h, offset, want)) {
                    Ok(b) => b,
                    Err(e) => return reply.error(errno_of(&e)),
                };
                let n = (size as usize).min(bytes.len());
                let w = (sequential && bytes.len() > n).then(|| Window {
                    start: offset,
                    bytes: bytes.clone(),
                    next: offset,
                    ahead: None,
                });
                (bytes.slice(..n), w)
            }
        };
        reply.data(&reply_bytes);
        let Some(mut w) = window else { return };
        w.next = offset + reply_bytes.len() as u64;
        if w.ahead.is_none() && w.end() < o.size() {
            let (vol, h, at) = (self.vol.clone(), h.clone(), w.end());
            let task = self
                .rt
                .spawn(async move { vol.read(&h, at, READAHEAD_BYTES).await });
            w.ahead = Some((at, task));
        }
        let mut ra = self.readahead.lock().unwrap_or_else(|p| p.into_inner());
        if self.ra_epoch.load(Ordering::SeqCst) == epoch {
            ra.insert(fh.0, w);
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
        let r = o.write(&self.rt, &self.vol, offset, data);
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
        // Close-to-open: what this handle wrote, its size and mtime are committed when it
        // closes, before its locks go, so the next holder of a lock sees them.
        let published = self
            .handle(fh.0)
            .and_then(|o| o.publish(&self.rt, &self.vol));
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
        let h = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        self.readahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        // What the handle wrote is published before its flock goes.
        let committed = h
            .as_ref()
            .map_or(Ok(()), |o| o.publish(&self.rt, &self.vol));
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
        let o = or_reply!(self.handle(fh.0), reply);
        // Every write any descriptor of this mount accepted for the file is made durable,
        // not only this one's: send them all, sync the file's objects, commit every handle.
        let drained = self.drain_ino(o.h.attr.ino.0);
        let synced = self
            .rt
            .block_on(self.vol.fsync(&o.h))
            .map_err(|e| errno_of(&e));
        let committed = self.publish_ino(o.h.attr.ino.0);
        match drained.and(synced).and(committed) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.getattr_ino(ino.0).map_err(stale) {
            Ok(a) if a.kind != FileKind::Dir => reply.error(Errno::ENOTDIR),
            Ok(_) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
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
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The bricks' real space, as the volume's layout lets files use it (a replica-3 set
        // holds a third of its members' raw space, a 4+2 set two thirds).
        let space = self.rt.block_on(self.vol.statfs());
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
        let name = or_reply!(name_of(name), reply);
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
        let name = or_reply!(name_of(name), reply);
        match self.read_op(MetaRead::GetXattr {
            volume: self.volume(),
            ino: Ino(ino.0),
            name,
        }) {
            Ok(MetaReply::Value(v)) => xattr_reply(reply, size, &v),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
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
        let spec = or_reply!(lock_spec(lock_owner.0, pid, start, end, typ), reply);
        // Whoever takes the lock next, on any mount, sees what was written under it: the
        // file's writes, size and mtime are published before any lock changes.
        if let Err(e) = self.publish_ino(ino.0) {
            tracing::debug!(ino = ino.0, errno = ?e, "publishing before a lock change failed");
        }
        if spec.kind == LockKind::Unlock {
            return match self.lock_once(ino.0, spec) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        self.locked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino.0);
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
        let o = or_reply!(self.handle(fh.0), reply);
        match self.fallocate_ino(&o, ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
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

/// FUSE lock ranges end inclusively, with `OFFSET_MAX` for "to the end of the file"; brickfs
/// ranges end exclusively, with `u64::MAX`.
fn lock_spec(owner: u64, pid: u32, start: u64, end: u64, typ: i32) -> Result<LockSpec, Errno> {
    let kind = match typ {
        libc::F_RDLCK => LockKind::Read,
        libc::F_WRLCK => LockKind::Write,
        libc::F_UNLCK => LockKind::Unlock,
        _ => return Err(Errno::EINVAL),
    };
    let end = if end >= i64::MAX as u64 {
        u64::MAX
    } else {
        end + 1
    };
    Ok(LockSpec {
        owner,
        pid,
        start,
        end,
        kind,
    })
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
        self.publish_ino(ino)?;
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

/// What a lock waiter's task needs of the mount to drop its caches of a file.
#[derive(Clone)]
struct CacheRefs {
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    readahead: Arc<Mutex<HashMap<u64, Window>>>,
    handles: Arc<Mutex<HashMap<u64, Arc<Open>>>>,
    ra_epoch: Arc<AtomicU64>,
}

impl CacheRefs {
    fn drop_readahead(&self, ino: u64) {
        self.ra_epoch.fetch_add(1, Ordering::SeqCst);
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let mut ra = self.readahead.lock().unwrap_or_else(|p| p.into_inner());
        ra.retain(|fh, _| handles.get(fh).is_none_or(|o| o.h.attr.ino.0 != ino));
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
            let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            let opens: Vec<&Arc<Open>> =
                handles.values().filter(|o| o.h.attr.ino.0 == ino).collect();
            let size = opens
                .iter()
                .filter(|o| o.pending_or_dirty())
                .map(|o| o.size())
                .fold(size, u64::max);
            for o in opens {
                o.settle_size(size);
            }
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

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

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
    if let Some(at) = opts.metrics_listen {
        let l = rt
            .block_on(tokio::net::TcpListener::bind(at))
            .map_err(|e| anyhow::anyhow!("listen for metrics on {at}: {e}"))?;
        let maddr = l.local_addr()?;
        let v = vol.clone();
        let render: std::sync::Arc<dyn Fn() -> String + Send + Sync> =
            std::sync::Arc::new(move || {
                let mut out = String::new();
                v.metrics().render("mountd", &mut out);
                out
            });
        rt.spawn(brickfs_proto::metrics::serve(l, render));
        // Tests wait for this line: keep its wording.
        tracing::info!(addr = %maddr, "metrics listening");
    }
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
    tracing::info!(mountpoint = %mountpoint.display(), volume = %source.volume, "mounted");
    // Serve until told to stop, or until someone else unmounts (umount(8)).
    let mountpoint_abs = std::path::absolute(mountpoint).unwrap_or(mountpoint.to_path_buf());
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if is_mounted(&mountpoint_abs) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::info!(mountpoint = %mountpoint.display(), "unmounted from outside; exiting");
                drop(session);
                return Ok(());
            }
            _ => break,
        }
    }
    tracing::info!(mountpoint = %mountpoint.display(), "unmounting");
    if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
        tracing::warn!(error = %e, "unmount busy, detaching instead");
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
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

/// Whether `path` is a mount point in /proc/mounts (which escapes spaces as `\040`).
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*p))
}
