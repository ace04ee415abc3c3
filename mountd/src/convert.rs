//! Conversions between brickfs's metadata types and FUSE's: attributes, file kinds, times,
//! errnos (through `errno_for_code`, the one mapping), lock ranges and xattr replies.

use brickfs_client::VolumeError;
use brickfs_proto::errno_for_code;
use brickfs_proto::meta::{Attr, FileKind, LockKind, LockSpec};
use fuser::{Errno, FileAttr, FileType, INodeNo, ReplyXattr};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and entries.
pub(crate) const TTL: Duration = Duration::from_secs(1);
pub(crate) fn errno_of(e: &VolumeError) -> Errno {
    match e.code() {
        Some(code) => Errno::from_i32(errno_for_code(code.as_u16())),
        None => Errno::EIO,
    }
}

pub(crate) fn errno_meta(e: &brickfs_client::MetaError) -> Errno {
    match e.code() {
        Some(code) => Errno::from_i32(errno_for_code(code.as_u16())),
        None => Errno::from_i32(libc::ENOTCONN),
    }
}

/// An inode the kernel named that is gone (another mount removed it while a dentry here still
/// pointed at it): ESTALE, which makes the kernel look the name up again and retry (open with
/// O_CREAT then creates it, stat finds the new file), as it does for NFS.
pub(crate) fn stale(e: Errno) -> Errno {
    if e == Errno::ENOENT { Errno::ESTALE } else { e }
}

pub(crate) fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

pub(crate) fn ns_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub(crate) fn kind_of(k: FileKind) -> FileType {
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

pub(crate) fn kind_from_mode(mode: u32) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

pub(crate) fn fuse_attr(a: &Attr) -> FileAttr {
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

pub(crate) fn name_of(name: &OsStr) -> Result<String, Errno> {
    std::str::from_utf8(name.as_bytes())
        .map(str::to_string)
        .map_err(|_| Errno::EINVAL)
}

/// FUSE lock ranges end inclusively, with `OFFSET_MAX` for "to the end of the file"; brickfs
/// ranges end exclusively, with `u64::MAX`.
pub(crate) fn lock_spec(
    owner: u64,
    pid: u32,
    start: u64,
    end: u64,
    typ: i32,
) -> Result<LockSpec, Errno> {
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

pub(crate) fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brickfs_proto::Ino;

    #[test]
    fn lock_ranges_end_exclusively_and_offset_max_is_the_end_of_the_file() {
        let l = lock_spec(7, 42, 10, 19, libc::F_WRLCK).unwrap();
        assert_eq!((l.start, l.end, l.kind), (10, 20, LockKind::Write));
        let l = lock_spec(7, 42, 0, i64::MAX as u64, libc::F_RDLCK).unwrap();
        assert_eq!((l.start, l.end, l.kind), (0, u64::MAX, LockKind::Read));
        let l = lock_spec(7, 42, 0, u64::MAX, libc::F_UNLCK).unwrap();
        assert_eq!((l.end, l.kind), (u64::MAX, LockKind::Unlock));
        assert_eq!(lock_spec(7, 42, 0, 1, 99).unwrap_err(), Errno::EINVAL);
    }

    #[test]
    fn attributes_keep_times_kind_and_permission_bits() {
        let a = Attr {
            ino: Ino(9),
            kind: FileKind::Symlink,
            mode: 0o104755,
            uid: 1,
            gid: 2,
            size_bytes: 1025,
            atime_ns: 1_000_000_001,
            mtime_ns: 2_000_000_002,
            ctime_ns: -5,
            nlink: 3,
            rdev: 0,
            group: 0,
            unit_bytes: 0,
        };
        let f = fuse_attr(&a);
        assert_eq!((f.ino, f.size, f.blocks), (INodeNo(9), 1025, 3));
        assert_eq!(f.kind, FileType::Symlink);
        assert_eq!(f.perm, 0o4755);
        assert_eq!(ns_of(f.atime), 1_000_000_001);
        assert_eq!(ns_of(f.mtime), 2_000_000_002);
        assert_eq!(f.ctime, UNIX_EPOCH, "times before the epoch clamp to it");
        assert_eq!((f.nlink, f.uid, f.gid), (3, 1, 2));
    }

    #[test]
    fn modes_name_their_kind_and_names_must_be_utf8() {
        assert_eq!(kind_from_mode(libc::S_IFIFO | 0o644), FileKind::Fifo);
        assert_eq!(kind_from_mode(libc::S_IFSOCK), FileKind::Socket);
        assert_eq!(kind_from_mode(libc::S_IFCHR), FileKind::CharDevice);
        assert_eq!(kind_from_mode(libc::S_IFBLK), FileKind::BlockDevice);
        assert_eq!(kind_from_mode(libc::S_IFREG | 0o600), FileKind::File);
        assert_eq!(name_of(OsStr::new("a b")).unwrap(), "a b");
        assert_eq!(
            name_of(OsStr::from_bytes(b"\xff")).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(stale(Errno::ENOENT), Errno::ESTALE);
        assert_eq!(stale(Errno::EACCES), Errno::EACCES);
    }
}
