//! The state machine's logic: how each command changes the state, and how reads see it.
//! Deterministic: the same commands on the same state give the same state and answers on every
//! member, because time comes from the command (stamped by the leader), never from the clock.
//!
//! State lives in a key-value space (see [`keys`]); records are bincode with a leading format
//! enum. Failures are POSIX-shaped `ErrorCode`s.

use crate::acl::{self, Acl};
use crate::kv::{KvRead, Overlay};
use crate::locks::LockTable;
use crate::types::{Command, CommandResult};
use brickfs_layout::{Redundancy, VolumeSpec, parse_size};
use brickfs_proto::meta::{
    Attr, BrickRecord, DirEntry, FileKind, GcItem, MetaOp, MetaRead, MetaReply, NodeRecord,
    RenameFlags, SessionId, SessionInfo, SetAttr, SetStanding, SetState, VolumeBrick, VolumeRecord,
    VolumeStatus,
};
use brickfs_proto::{Epoch, ErrorBody, ErrorCode, Ino, VolumeId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

mod elastic;
mod quota;

/// The longest name in a directory, as on Linux.
pub const NAME_MAX_BYTES: usize = 255;
/// The longest symlink target.
pub const SYMLINK_MAX_BYTES: usize = 4095;
/// The most entries one `ReadDir` returns.
pub const READDIR_MAX: usize = 4096;
/// The most hard links to one inode.
pub const LINK_MAX: u32 = 65_000;
pub const XATTR_NAME_MAX_BYTES: usize = 255;
pub const XATTR_VALUE_MAX_BYTES: usize = 64 << 10;
/// The most sessions one client credential holds at once (mounts and CSI nodes sharing it
/// each hold one); more are refused `Busy` until some close or expire.
pub const SESSIONS_PER_CREDENTIAL_MAX: u64 = 8192;
/// The most byte-range locks one file holds; a lock that would add one more is refused
/// (`TooManyLocks`, ENOLCK). Unlocks and locks that merge always pass.
pub const LOCKS_PER_FILE_MAX: usize = 10_000;
/// The longest client name a session keeps (`OpenSession`).
pub const CLIENT_NAME_MAX_BYTES: usize = 256;
/// Files one `CloseFiles` may name.
pub const CLOSE_FILES_MAX: usize = 4096;
/// The stripe unit of new files when the volume sets none.
pub const DEFAULT_UNIT_BYTES: u32 = 1 << 20;
/// The root directory's inode number in every volume.
pub const ROOT_INO: Ino = Ino(1);

/// Key layout of the state column family. One leading byte per table; integers big-endian so
/// that keys sort numerically.
pub mod keys {
    use brickfs_proto::meta::SessionId;
    use brickfs_proto::{BrickId, Ino, NodeId, VolumeId};

    pub const APPLIED: &[u8] = b"\x00applied";
    pub const MEMBERSHIP: &[u8] = b"\x00membership";

    pub fn counter(name: &str) -> Vec<u8> {
        [b"C", name.as_bytes()].concat()
    }
    pub fn node(id: NodeId) -> Vec<u8> {
        [b"N".as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn brick(id: BrickId) -> Vec<u8> {
        [b"B".as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn volume(id: VolumeId) -> Vec<u8> {
        [b"V".as_slice(), &id.0.to_be_bytes()].concat()
    }
    /// The client credential that opened a session (`SessionOwner`), for sessions a client
    /// opened.
    pub fn session_owner(id: SessionId) -> Vec<u8> {
        [b"T".as_slice(), &id.0.to_be_bytes()].concat()
    }
    /// How many sessions a client credential holds open.
    pub(crate) fn owner_sessions(owner: super::SessionOwner) -> Vec<u8> {
        [
            b"t".as_slice(),
            &owner.0.to_be_bytes(),
            &owner.1.to_be_bytes(),
        ]
        .concat()
    }
    pub fn volume_name(name: &str) -> Vec<u8> {
        [b"W", name.as_bytes()].concat()
    }
    pub fn inode(v: VolumeId, ino: Ino) -> Vec<u8> {
        [b"I".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
    }
    pub fn dir_prefix(v: VolumeId, dir: Ino) -> Vec<u8> {
        [b"D".as_slice(), &v.0.to_be_bytes(), &dir.0.to_be_bytes()].concat()
    }
    pub fn dentry(v: VolumeId, dir: Ino, name: &str) -> Vec<u8> {
        [dir_prefix(v, dir).as_slice(), name.as_bytes()].concat()
    }
    pub fn xattr_prefix(v: VolumeId, ino: Ino) -> Vec<u8> {
        [b"X".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
    }
    pub fn xattr(v: VolumeId, ino: Ino, name: &str) -> Vec<u8> {
        [xattr_prefix(v, ino).as_slice(), name.as_bytes()].concat()
    }
    pub fn session(id: SessionId) -> Vec<u8> {
        [b"S".as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn reply_prefix(id: SessionId) -> Vec<u8> {
        [b"R".as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn reply(id: SessionId, seq: u64) -> Vec<u8> {
        [reply_prefix(id).as_slice(), &seq.to_be_bytes()].concat()
    }
    pub fn locks(v: VolumeId, ino: Ino) -> Vec<u8> {
        [b"L".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
    }
    /// Whether `key` is a file's lock table (`locks`).
    pub fn is_locks(key: &[u8]) -> bool {
        key.len() == 17 && key[0] == b'L'
    }
    /// Which files a session holds locks on, to release them when it ends.
    pub fn session_lock_prefix(id: SessionId) -> Vec<u8> {
        [b"K".as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn session_lock(id: SessionId, v: VolumeId, ino: Ino) -> Vec<u8> {
        [
            session_lock_prefix(id).as_slice(),
            &v.0.to_be_bytes(),
            &ino.0.to_be_bytes(),
        ]
        .concat()
    }
    /// Files a session holds open (linked or not): a file whose last name goes stays while
    /// any session holds it, until they close it or end.
    pub fn orphan_prefix(id: SessionId) -> Vec<u8> {
        [b"O".as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn orphan(id: SessionId, v: VolumeId, ino: Ino) -> Vec<u8> {
        [
            orphan_prefix(id).as_slice(),
            &v.0.to_be_bytes(),
            &ino.0.to_be_bytes(),
        ]
        .concat()
    }
    /// The sessions holding a file open (`orphan` keys the same fact by session).
    pub fn holder_prefix(v: VolumeId, ino: Ino) -> Vec<u8> {
        [b"H".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
    }
    pub fn holder(v: VolumeId, ino: Ino, id: SessionId) -> Vec<u8> {
        [holder_prefix(v, ino).as_slice(), &id.0.to_be_bytes()].concat()
    }
    pub fn gc(v: VolumeId, ino: Ino) -> Vec<u8> {
        [b"G".as_slice(), &v.0.to_be_bytes(), &ino.0.to_be_bytes()].concat()
    }
}

/// An inode as stored: attributes plus what only the metadata group needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeV1 {
    pub attr: Attr,
    /// For a directory: its parent (the root is its own parent).
    pub parent: Ino,
    /// For a directory: how many entries it holds.
    pub entries: u64,
    /// For a symlink: its target.
    pub target: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum InodeRecord {
    V1(InodeV1),
}

/// A deleted file in the GC queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum GcRecord {
    V1 {
        size_bytes: u64,
        group: u32,
    },
    /// With the groups the file moved away from (rebalance), whose bricks keep its seals.
    V2 {
        size_bytes: u64,
        group: u32,
        moved_from: Vec<u32>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DentryV1 {
    ino: Ino,
    kind: FileKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SessionV1 {
    client: String,
    lease_ms: u64,
    expires_ns: i64,
    /// Requests below this were answered and their answers dropped.
    acked_below: u64,
}

type Res<T> = Result<T, ErrorBody>;

fn err(code: ErrorCode, detail: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, detail)
}

fn internal(e: impl std::fmt::Display) -> ErrorBody {
    err(ErrorCode::Internal, format!("metadata state: {e}"))
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    brickfs_proto::msg::encode_body(v)
}

fn dec<T: DeserializeOwned>(raw: &[u8]) -> Res<T> {
    brickfs_proto::msg::decode_body(raw).map_err(internal)
}

fn get<T: DeserializeOwned>(kv: &impl KvRead, key: &[u8]) -> Res<Option<T>> {
    kv.get(key)
        .map_err(internal)?
        .map(|raw| dec(&raw))
        .transpose()
}

fn check_name(name: &str) -> Res<()> {
    if name.len() > NAME_MAX_BYTES {
        return Err(err(
            ErrorCode::NameTooLong,
            format!("name of {} bytes", name.len()),
        ));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(err(
            ErrorCode::InvalidPath,
            format!("invalid name {name:?}"),
        ));
    }
    Ok(())
}

/// A volume's name goes into mount sources (`HOST:PORT/NAME`), mount points, fstab lines and
/// URL paths: letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 128
/// bytes.
pub fn check_volume_name(name: &str) -> Res<()> {
    let ok = name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    Err(err(
        ErrorCode::InvalidArgument,
        format!(
            "volume name {name:?}: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 bytes"
        ),
    ))
}

fn load_inode(kv: &impl KvRead, v: VolumeId, ino: Ino) -> Res<InodeV1> {
    match get::<InodeRecord>(kv, &keys::inode(v, ino))? {
        Some(InodeRecord::V1(i)) => Ok(i),
        None => Err(err(
            ErrorCode::NotFound,
            format!("inode {ino} of volume {v}"),
        )),
    }
}

fn load_dir(kv: &impl KvRead, v: VolumeId, ino: Ino) -> Res<InodeV1> {
    let i = load_inode(kv, v, ino)?;
    if i.attr.kind != FileKind::Dir {
        return Err(err(
            ErrorCode::NotDir,
            format!("inode {ino} is not a directory"),
        ));
    }
    Ok(i)
}

fn lookup_entry(kv: &impl KvRead, v: VolumeId, dir: Ino, name: &str) -> Res<Option<DentryV1>> {
    get(kv, &keys::dentry(v, dir, name))
}

fn check_volume(kv: &impl KvRead, v: VolumeId) -> Res<VolumeRecord> {
    get::<VolumeRecord>(kv, &keys::volume(v))?
        .ok_or_else(|| err(ErrorCode::NotFound, format!("volume {v}")))
}

/// Applies commands to a batch.
pub struct Applier<'a, 'b, B: KvRead> {
    kv: &'b mut Overlay<'a, B>,
    now_ns: i64,
}

impl<'a, 'b, B: KvRead> Applier<'a, 'b, B> {
    fn put_inode(&mut self, v: VolumeId, i: &InodeV1) {
        self.kv
            .put(keys::inode(v, i.attr.ino), enc(&InodeRecord::V1(i.clone())));
    }

    fn next_counter(&mut self, name: &str) -> Res<u64> {
        let key = keys::counter(name);
        let next = get::<u64>(self.kv, &key)?.unwrap_or(1);
        self.kv.put(key, enc(&(next + 1)));
        Ok(next)
    }

    fn new_inode(
        &mut self,
        v: VolumeId,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Res<InodeV1> {
        let ino = Ino(self.next_counter(&format!("ino/{}", v.0))?);
        Ok(InodeV1 {
            attr: Attr {
                ino,
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                size_bytes: 0,
                atime_ns: self.now_ns,
                mtime_ns: self.now_ns,
                ctime_ns: self.now_ns,
                nlink: if kind == FileKind::Dir { 2 } else { 1 },
                rdev: 0,
                group: 0,
                unit_bytes: 0,
            },
            parent: Ino(0),
            entries: 0,
            target: None,
        })
    }

    /// Inserts `name → child` into `dir`, updating the directory's counts and times.
    fn add_entry(&mut self, v: VolumeId, dir: &mut InodeV1, name: &str, child: &InodeV1) {
        self.kv.put(
            keys::dentry(v, dir.attr.ino, name),
            enc(&DentryV1 {
                ino: child.attr.ino,
                kind: child.attr.kind,
            }),
        );
        dir.entries += 1;
        if child.attr.kind == FileKind::Dir {
            dir.attr.nlink += 1;
        }
        dir.attr.mtime_ns = self.now_ns;
        dir.attr.ctime_ns = self.now_ns;
    }

    fn remove_entry(&mut self, v: VolumeId, dir: &mut InodeV1, name: &str, kind: FileKind) {
        self.kv.delete(keys::dentry(v, dir.attr.ino, name));
        dir.entries = dir.entries.saturating_sub(1);
        if kind == FileKind::Dir {
            dir.attr.nlink = dir.attr.nlink.saturating_sub(1);
        }
        dir.attr.mtime_ns = self.now_ns;
        dir.attr.ctime_ns = self.now_ns;
    }

    /// Drops one link of `child`; when none is left, the inode goes and its data objects are
    /// queued for removal from the bricks.
    fn drop_link(&mut self, v: VolumeId, mut child: InodeV1) -> Res<()> {
        self.drop_link_keeping(v, &mut child, None)
    }

    /// As `drop_link`; with `keep_for`, a file losing its last link stays as that session's
    /// orphan.
    fn drop_link_keeping(
        &mut self,
        v: VolumeId,
        child: &mut InodeV1,
        keep_for: Option<SessionId>,
    ) -> Res<()> {
        let gone = match child.attr.kind {
            FileKind::Dir => true,
            _ => {
                child.attr.nlink = child.attr.nlink.saturating_sub(1);
                child.attr.nlink == 0
            }
        };
        if let Some(session) = keep_for.filter(|_| child.attr.kind == FileKind::File) {
            self.hold(session, v, child.attr.ino);
        }
        // A file some session holds open outlives its last name (POSIX): it stays, nameless,
        // until the last holder closes it or ends.
        if gone && child.attr.kind == FileKind::File && self.held(v, child.attr.ino)? {
            child.attr.ctime_ns = self.now_ns;
            self.put_inode(v, child);
            return Ok(());
        }
        if gone {
            self.remove_inode(v, child)
        } else {
            child.attr.ctime_ns = self.now_ns;
            self.put_inode(v, child);
            Ok(())
        }
    }

    /// Removes an inode without links: its record and xattrs, and queues a file's objects.
    fn remove_inode(&mut self, v: VolumeId, child: &InodeV1) -> Res<()> {
        self.kv.delete(keys::inode(v, child.attr.ino));
        for (k, _) in self
            .kv
            .scan(&keys::xattr_prefix(v, child.attr.ino), None, usize::MAX)
            .map_err(internal)?
        {
            self.kv.delete(k);
        }
        if child.attr.kind == FileKind::File {
            self.charge(v, child.parent, -i128::from(child.attr.size_bytes))?;
            let from_key = elastic::moved_from_key(v, child.attr.ino);
            let moved_from: Vec<u32> = get(self.kv, &from_key)?.unwrap_or_default();
            self.kv.delete(from_key);
            let item = GcRecord::V2 {
                size_bytes: child.attr.size_bytes,
                group: child.attr.group,
                moved_from,
            };
            self.kv.put(keys::gc(v, child.attr.ino), enc(&item));
        }
        Ok(())
    }

    /// See `MetaOp::ReplaceBrick`.
    fn replace_brick(&mut self, name: &str, old: &str, new: &str) -> Res<MetaReply> {
        let mut v = volume_by_name(self.kv, name)?;
        let parse = |text: &str| {
            brickfs_layout::BrickAddr::parse(text)
                .map_err(|e| err(ErrorCode::InvalidArgument, format!("brick {text:?}: {e}")))
        };
        let (old_addr, new_addr) = (parse(old)?, parse(new)?);
        let at = v
            .bricks
            .iter()
            .position(|b| parse(&b.addr).is_ok_and(|a| a == old_addr))
            .ok_or_else(|| {
                err(
                    ErrorCode::NotFound,
                    format!("{old} is not a brick of volume {name}"),
                )
            })?;
        let old_id = v.bricks[at].brick;
        let nodes: Vec<NodeRecord> = scan_all(self.kv, b"N")?;
        let node = nodes
            .iter()
            .find(|n| n.addr == new_addr.host)
            .ok_or_else(|| {
                err(
                    ErrorCode::NotFound,
                    format!(
                        "node {} is not a peer (brickfs peer add {})",
                        new_addr.host, new_addr.host
                    ),
                )
            })?;
        let bricks: Vec<BrickRecord> = scan_all(self.kv, b"B")?;
        let brick = bricks
            .iter()
            .find(|r| r.node == node.id && r.path == new_addr.path)
            .ok_or_else(|| {
                err(
                    ErrorCode::NotFound,
                    format!(
                        "node {} serves no brick at {}",
                        new_addr.host, new_addr.path
                    ),
                )
            })?;
        let volumes: Vec<VolumeRecord> = scan_all(self.kv, b"V")?;
        if let Some(other) = volumes
            .iter()
            .find(|x| x.bricks.iter().any(|b| b.brick == brick.id))
        {
            return Err(brick_taken(new, other));
        }
        let (index, set) = v
            .sets
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.members.contains(&old_id))
            .ok_or_else(|| internal("brick in no set"))?;
        let others_in_sync: Vec<_> = set
            .in_sync
            .iter()
            .copied()
            .filter(|b| *b != old_id)
            .collect();
        if set.members.len() < 2 || others_in_sync.is_empty() {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "set {index} of volume {name} has no other in-sync copy to rebuild {new} from"
                ),
            ));
        }
        if let Some(d) = &set.draining {
            return Err(err(
                ErrorCode::Busy,
                format!(
                    "set {index} of volume {name} is already replacing brick {}: wait for it (brickfs volume info {name})",
                    d.old
                ),
            ));
        }
        if volumes
            .iter()
            .flat_map(|x| &x.sets)
            .any(|s| s.draining.as_ref().is_some_and(|d| d.new.brick == brick.id))
        {
            return Err(err(
                ErrorCode::Exists,
                format!("brick {new} is already replacing another brick"),
            ));
        }
        let new_brick = VolumeBrick {
            brick: brick.id,
            node: node.id,
            addr: new_addr.to_string(),
        };
        if set.in_sync.contains(&old_id) {
            // A live member may serve readers with an older view of the set: it stops
            // serving reads first (its heartbeat answers say so) while it still takes writes,
            // and leaves once every lease granted before is over (`DetectFailures`).
            set.draining = Some(brickfs_proto::meta::Drain {
                old: old_id,
                new: new_brick,
                since_ms: u64::try_from(self.now_ns / 1_000_000).unwrap_or(0),
            });
            tracing::info!(volume = %name, set = index, %old, %new, "replacing an in-sync brick: it serves no reads from now on and leaves the set once the leases granted before are over");
        } else {
            swap_brick(&mut v, index, old_id, new_brick);
            tracing::info!(volume = %name, set = index, %old, %new, "brick replaced; the new one heals from the set");
        }
        self.kv.put(keys::volume(v.id), enc(&v));
        Ok(MetaReply::Volume(v))
    }

    /// Drops members on silent nodes from every set's in-sync set (see `DetectFailures`).
    fn detect_failures(&mut self, down_after_ms: u64) -> Res<()> {
        let now_ms = u64::try_from(self.now_ns / 1_000_000).unwrap_or(0);
        let nodes: Vec<NodeRecord> = scan_all(self.kv, b"N")?;
        let down = |node: brickfs_proto::NodeId| {
            nodes
                .iter()
                .find(|n| n.id == node)
                .is_none_or(|n| n.last_heartbeat_ms.saturating_add(down_after_ms) < now_ms)
        };
        let volumes: Vec<VolumeRecord> = scan_all(self.kv, b"V")?;
        for mut v in volumes {
            // Replacements whose old member has had no reader for a lease's length.
            let mut changed = false;
            for index in 0..v.sets.len() {
                let Some(d) = v.sets[index].draining.clone() else {
                    continue;
                };
                if d.since_ms.saturating_add(down_after_ms) >= now_ms {
                    continue;
                }
                v.sets[index].draining = None;
                changed = true;
                if v.sets[index].members.contains(&d.old)
                    && v.sets[index].in_sync.iter().any(|b| *b != d.old)
                {
                    tracing::info!(volume = %v.name, set = index, old = %d.old, new = %d.new.addr, "brick replaced after its readers drained; the new one heals from the set");
                    swap_brick(&mut v, index, d.old, d.new);
                } else {
                    tracing::warn!(volume = %v.name, set = index, old = %d.old, "a replacement was dropped: the set changed while it drained (no other in-sync copy, or the brick left)");
                }
            }
            let node_of =
                |b: brickfs_proto::BrickId| v.bricks.iter().find(|x| x.brick == b).map(|x| x.node);
            let mut sets = v.sets.clone();
            for (index, set) in sets.iter_mut().enumerate() {
                let alive: Vec<_> = set
                    .in_sync
                    .iter()
                    .copied()
                    .filter(|b| node_of(*b).is_some_and(|n| !down(n)))
                    .collect();
                if alive.len() == set.in_sync.len() {
                    continue;
                }
                // Keep the last member standing: it is the one that holds every write.
                let keep = if alive.is_empty() {
                    if set.in_sync.len() == 1 {
                        continue;
                    }
                    vec![set.primary]
                } else {
                    alive
                };
                if keep.len() == set.in_sync.len() {
                    continue;
                }
                let dropped: Vec<_> = set
                    .in_sync
                    .iter()
                    .filter(|b| !keep.contains(b))
                    .copied()
                    .collect();
                narrow_in_sync(set, keep);
                changed = true;
                tracing::warn!(
                    volume = %v.name,
                    set = index,
                    epoch = set.epoch.0,
                    primary = %set.primary,
                    dropped = ?dropped,
                    "members on silent nodes left the in-sync set"
                );
            }
            if changed {
                v.sets = sets;
                self.kv.put(keys::volume(v.id), enc(&v));
            }
        }
        Ok(())
    }

    /// `session` holds file `ino` open.
    fn hold(&mut self, session: SessionId, v: VolumeId, ino: Ino) {
        self.kv.put(keys::orphan(session, v, ino), Vec::new());
        self.kv.put(keys::holder(v, ino, session), Vec::new());
    }

    /// The answer to a create: `CreateOpen` also makes the caller's session hold the file.
    fn held_if_asked(
        &mut self,
        op: &MetaOp,
        session: SessionId,
        v: VolumeId,
        a: Attr,
    ) -> MetaReply {
        if matches!(op, MetaOp::CreateOpen { .. }) && a.kind == FileKind::File {
            self.hold(session, v, a.ino);
        }
        MetaReply::Attr(a)
    }

    /// Whether any session holds file `ino` open.
    fn held(&self, v: VolumeId, ino: Ino) -> Res<bool> {
        Ok(!self
            .kv
            .scan(&keys::holder_prefix(v, ino), None, 1)
            .map_err(internal)?
            .is_empty())
    }

    /// A session closed (or lost) a file it held open: a file without a name goes once no
    /// session holds it.
    fn drop_orphan(&mut self, session: SessionId, v: VolumeId, ino: Ino) -> Res<()> {
        self.kv.delete(keys::orphan(session, v, ino));
        self.kv.delete(keys::holder(v, ino, session));
        if let Some(InodeRecord::V1(i)) = get::<InodeRecord>(self.kv, &keys::inode(v, ino))?
            && i.attr.nlink == 0
            && !self.held(v, ino)?
        {
            self.remove_inode(v, &i)?;
        }
        Ok(())
    }

    /// Links a new inode into `parent`. Its mode is the one asked for, restricted by the
    /// umask or, when the parent has a default ACL, by that ACL, which it then inherits.
    fn create_node(
        &mut self,
        v: VolumeId,
        parent: Ino,
        name: &str,
        mut child: InodeV1,
        umask: u32,
    ) -> Res<MetaReply> {
        check_name(name)?;
        check_volume(self.kv, v)?;
        let mut dir = load_dir(self.kv, v, parent)?;
        if lookup_entry(self.kv, v, parent, name)?.is_some() {
            return Err(err(ErrorCode::Exists, format!("{name:?} exists")));
        }
        let default_acl = match child.attr.kind {
            FileKind::Symlink => None,
            _ => self
                .kv
                .get(&keys::xattr(v, parent, acl::DEFAULT_XATTR))
                .map_err(internal)?,
        };
        match default_acl.as_deref().map(Acl::parse) {
            Some(Ok(Some(mut inherited))) => {
                let ino = child.attr.ino;
                if child.attr.kind == FileKind::Dir {
                    self.kv
                        .put(keys::xattr(v, ino, acl::DEFAULT_XATTR), inherited.encode());
                }
                let (mode, extended) = inherited.create_masq(child.attr.mode);
                child.attr.mode = mode;
                if extended {
                    self.kv
                        .put(keys::xattr(v, ino, acl::ACCESS_XATTR), inherited.encode());
                }
            }
            _ => child.attr.mode &= !(umask & 0o777),
        }
        // A directory's parent; a file's directory, charged for its bytes (quotas).
        child.parent = parent;
        if child.attr.kind == FileKind::Dir && dir.attr.nlink >= LINK_MAX {
            return Err(err(ErrorCode::TooManyLinks, "too many subdirectories"));
        }
        // A directory with the setgid bit passes its group (and, for directories, the bit).
        if dir.attr.mode & 0o2000 != 0 {
            child.attr.gid = dir.attr.gid;
            if child.attr.kind == FileKind::Dir {
                child.attr.mode |= 0o2000;
            }
        }
        self.add_entry(v, &mut dir, name, &child);
        self.put_inode(v, &dir);
        self.put_inode(v, &child);
        Ok(MetaReply::Attr(child.attr))
    }

    fn rename(
        &mut self,
        v: VolumeId,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        flags: RenameFlags,
    ) -> Res<MetaReply> {
        check_name(name)?;
        check_name(new_name)?;
        if flags.noreplace && flags.exchange {
            return Err(err(
                ErrorCode::InvalidArgument,
                "noreplace and exchange together",
            ));
        }
        load_dir(self.kv, v, parent)?;
        load_dir(self.kv, v, new_parent)?;
        let src = lookup_entry(self.kv, v, parent, name)?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("{name:?}")))?;
        let dst = lookup_entry(self.kv, v, new_parent, new_name)?;
        if parent == new_parent && name == new_name {
            return match (flags.noreplace, flags.exchange) {
                (true, _) => Err(err(ErrorCode::Exists, format!("{new_name:?} exists"))),
                _ => Ok(MetaReply::Done),
            };
        }
        // A directory may not move into itself or below itself.
        let ancestors_of_new = self.ancestors(v, new_parent)?;
        if src.kind == FileKind::Dir && ancestors_of_new.contains(&src.ino) {
            return Err(err(
                ErrorCode::InvalidArgument,
                "cannot move a directory below itself",
            ));
        }
        if flags.exchange {
            let dst = dst.ok_or_else(|| err(ErrorCode::NotFound, format!("{new_name:?}")))?;
            let ancestors_of_old = self.ancestors(v, parent)?;
            if dst.kind == FileKind::Dir && ancestors_of_old.contains(&dst.ino) {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    "cannot move a directory below itself",
                ));
            }
            self.kv.put(keys::dentry(v, parent, name), enc(&dst));
            self.kv
                .put(keys::dentry(v, new_parent, new_name), enc(&src));
            for (moved, from, to) in [(&src, parent, new_parent), (&dst, new_parent, parent)] {
                let mut i = load_inode(self.kv, v, moved.ino)?;
                i.attr.ctime_ns = self.now_ns;
                if moved.kind == FileKind::Dir || i.parent == from {
                    self.move_charge(v, &i, from, to)?;
                    i.parent = to;
                }
                self.put_inode(v, &i);
            }
            if parent != new_parent && src.kind != dst.kind {
                let (into_new, into_old) = if src.kind == FileKind::Dir {
                    (1i64, -1i64)
                } else {
                    (-1, 1)
                };
                self.adjust_dir(v, new_parent, into_new)?;
                self.adjust_dir(v, parent, into_old)?;
            } else {
                self.adjust_dir(v, parent, 0)?;
                if parent != new_parent {
                    self.adjust_dir(v, new_parent, 0)?;
                }
            }
            return Ok(MetaReply::Done);
        }
        if let Some(dst) = &dst {
            if flags.noreplace {
                return Err(err(ErrorCode::Exists, format!("{new_name:?} exists")));
            }
            if dst.ino == src.ino {
                // Two names of one inode: POSIX says do nothing.
                return Ok(MetaReply::Done);
            }
            let target = load_inode(self.kv, v, dst.ino)?;
            match (src.kind == FileKind::Dir, dst.kind == FileKind::Dir) {
                (true, false) => {
                    return Err(err(
                        ErrorCode::NotDir,
                        format!("{new_name:?} is not a directory"),
                    ));
                }
                (false, true) => {
                    return Err(err(
                        ErrorCode::IsDir,
                        format!("{new_name:?} is a directory"),
                    ));
                }
                (true, true) if target.entries > 0 => {
                    return Err(err(
                        ErrorCode::NotEmpty,
                        format!("{new_name:?} is not empty"),
                    ));
                }
                _ => {}
            }
            let mut np = load_inode(self.kv, v, new_parent)?;
            self.remove_entry(v, &mut np, new_name, dst.kind);
            self.put_inode(v, &np);
            self.drop_link(v, target)?;
        }
        let mut op = load_inode(self.kv, v, parent)?;
        self.remove_entry(v, &mut op, name, src.kind);
        self.put_inode(v, &op);
        let mut np = load_inode(self.kv, v, new_parent)?;
        let mut moved = load_inode(self.kv, v, src.ino)?;
        self.add_entry(v, &mut np, new_name, &moved);
        self.put_inode(v, &np);
        moved.attr.ctime_ns = self.now_ns;
        // A file is charged to the directory it was named in last (a hard link renamed
        // elsewhere moves the charge only when it is that name).
        if moved.attr.kind == FileKind::Dir || moved.parent == parent {
            self.move_charge(v, &moved, parent, new_parent)?;
            moved.parent = new_parent;
        }
        self.put_inode(v, &moved);
        Ok(MetaReply::Done)
    }

    fn adjust_dir(&mut self, v: VolumeId, dir: Ino, nlink_delta: i64) -> Res<()> {
        let mut d = load_inode(self.kv, v, dir)?;
        d.attr.nlink = (i64::from(d.attr.nlink) + nlink_delta).max(0) as u32;
        d.attr.mtime_ns = self.now_ns;
        d.attr.ctime_ns = self.now_ns;
        self.put_inode(v, &d);
        Ok(())
    }

    /// `dir` and every directory above it, up to the root.
    fn ancestors(&self, v: VolumeId, dir: Ino) -> Res<Vec<Ino>> {
        let mut out = vec![dir];
        let mut cur = dir;
        while cur != ROOT_INO {
            let i = load_inode(self.kv, v, cur)?;
            if out.len() > 100_000 {
                return Err(internal("directory tree has a cycle"));
            }
            cur = i.parent;
            out.push(cur);
        }
        Ok(out)
    }

    fn op(&mut self, op: &MetaOp, session: SessionId) -> Res<MetaReply> {
        Ok(match op {
            MetaOp::OpenSession { client, lease_ms } => {
                if client.len() > CLIENT_NAME_MAX_BYTES {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("a session's client name is at most {CLIENT_NAME_MAX_BYTES} bytes"),
                    ));
                }
                let id = SessionId(self.next_counter("session")?);
                let lease_ms = (*lease_ms).clamp(
                    brickfs_proto::meta::LEASE_MIN_MS,
                    brickfs_proto::meta::LEASE_MAX_MS,
                );
                let s = SessionV1 {
                    client: client.clone(),
                    lease_ms,
                    expires_ns: self.now_ns.saturating_add(ms_to_ns(lease_ms)),
                    acked_below: 0,
                };
                self.kv.put(keys::session(id), enc(&s));
                MetaReply::Session(session_info(id, &s))
            }
            MetaOp::AsClient { .. } => {
                return Err(internal(
                    "a client's command reached the applier still wrapped",
                ));
            }
            MetaOp::KeepAlive => {
                let s = get::<SessionV1>(self.kv, &keys::session(session))?
                    .ok_or_else(|| err(ErrorCode::SessionExpired, format!("session {session}")))?;
                MetaReply::Session(session_info(session, &s))
            }
            MetaOp::CloseSession => {
                self.end_session(session)?;
                MetaReply::Done
            }
            MetaOp::ExpireSessions => {
                for (k, raw) in self.kv.scan(b"S", None, usize::MAX).map_err(internal)? {
                    let s: SessionV1 = dec(&raw)?;
                    if s.expires_ns < self.now_ns {
                        let id = SessionId(u64::from_be_bytes(
                            k.get(1..9)
                                .and_then(|b| b.try_into().ok())
                                .ok_or_else(|| internal("session key"))?,
                        ));
                        tracing::info!(session = %id, client = %s.client, "session lease expired");
                        self.end_session(id)?;
                    }
                }
                MetaReply::Done
            }
            MetaOp::RegisterNode { node } => {
                // A node counts as alive from its registration (its heartbeats follow).
                let mut node = node.clone();
                node.last_heartbeat_ms = u64::try_from(self.now_ns / 1_000_000).unwrap_or(0);
                self.kv.put(keys::node(node.id), enc(&node));
                MetaReply::Done
            }
            MetaOp::DetectFailures { down_after_ms } => {
                self.detect_failures(*down_after_ms)?;
                MetaReply::Done
            }
            MetaOp::RejoinMember {
                volume,
                set,
                member,
                epoch,
            } => {
                let mut v = check_volume(self.kv, *volume)?;
                let s = v
                    .sets
                    .get_mut(*set as usize)
                    .ok_or_else(|| err(ErrorCode::InvalidArgument, format!("no set {set}")))?;
                if !s.members.contains(member) {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("brick {member} is not a member of set {set}"),
                    ));
                }
                if s.epoch != *epoch {
                    return Err(err(
                        ErrorCode::StaleEpoch,
                        format!("set {set} is at epoch {}, not {}", s.epoch.0, epoch.0),
                    ));
                }
                if !s.in_sync.contains(member) {
                    let members = s.members.clone();
                    s.in_sync.push(*member);
                    s.in_sync
                        .sort_by_key(|b| members.iter().position(|m| m == b));
                    s.epoch = Epoch(epoch.0 + 1);
                    s.full_heal.retain(|b| b != member);
                    tracing::info!(volume = %v.name, set, %member, epoch = s.epoch.0, "a healed member rejoined its set");
                    self.kv.put(keys::volume(v.id), enc(&v));
                }
                MetaReply::Volume(check_volume(self.kv, *volume)?)
            }
            MetaOp::ReportDamage { brick, key } => {
                let mut v = check_volume(self.kv, key.volume)?;
                let name = v.name.clone();
                let Some((index, s)) = v
                    .sets
                    .iter_mut()
                    .enumerate()
                    .find(|(_, s)| s.members.contains(brick))
                else {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("brick {brick} is in no set of volume {name}"),
                    ));
                };
                if s.in_sync.contains(brick) && s.in_sync.len() > 1 {
                    let keep = s.in_sync.iter().copied().filter(|b| b != brick).collect();
                    narrow_in_sync(s, keep);
                    if !s.full_heal.contains(brick) {
                        s.full_heal.push(*brick);
                    }
                    tracing::warn!(volume = %name, set = index, %brick, %key, epoch = s.epoch.0, "a damaged object took its brick out of sync until healed");
                    self.kv.put(keys::volume(v.id), enc(&v));
                }
                MetaReply::Volume(v)
            }
            MetaOp::ReplaceBrick { name, old, new } => self.replace_brick(name, old, new)?,
            MetaOp::AddBricks { .. }
            | MetaOp::RemoveBricksStart { .. }
            | MetaOp::RemoveBricksStop { .. }
            | MetaOp::RemoveBricksCommit { .. }
            | MetaOp::RebalanceStart { .. }
            | MetaOp::RebalanceStop { .. }
            | MetaOp::RebalanceReport { .. }
            | MetaOp::BeginMove { .. }
            | MetaOp::FinishMove { .. }
            | MetaOp::AbortMove { .. }
            | MetaOp::ForgetMove { .. }
            | MetaOp::DroppedMove { .. } => self.elastic(op)?,
            MetaOp::SetQuota {
                volume,
                dir,
                path,
                limit_bytes,
            } => self.set_quota(*volume, *dir, path, *limit_bytes)?,
            MetaOp::RaiseEpoch {
                volume,
                set,
                at_least,
            } => {
                let mut v = check_volume(self.kv, *volume)?;
                let s = v
                    .sets
                    .get_mut(*set as usize)
                    .ok_or_else(|| err(ErrorCode::InvalidArgument, format!("no set {set}")))?;
                if s.epoch < *at_least {
                    s.epoch = *at_least;
                    self.kv.put(keys::volume(v.id), enc(&v));
                }
                MetaReply::Done
            }
            MetaOp::RegisterBrick { brick } => {
                if get::<NodeRecord>(self.kv, &keys::node(brick.node))?.is_none() {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("node {} is not registered", brick.node),
                    ));
                }
                self.kv.put(keys::brick(brick.id), enc(brick));
                MetaReply::Done
            }
            MetaOp::CreateVolume { name, spec } => self.create_volume(name, spec)?,
            MetaOp::StartVolume { name } => {
                let mut v = volume_by_name(self.kv, name)?;
                if v.status == VolumeStatus::Started {
                    return Err(err(
                        ErrorCode::Exists,
                        format!("volume {name:?} is already started"),
                    ));
                }
                v.status = VolumeStatus::Started;
                self.kv.put(keys::volume(v.id), enc(&v));
                tracing::info!(volume = %v.id, name = %name, "volume started");
                MetaReply::Volume(v)
            }
            MetaOp::StopVolume { name } => {
                let mut v = volume_by_name(self.kv, name)?;
                if v.status != VolumeStatus::Started {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("volume {name:?} is not started"),
                    ));
                }
                v.status = VolumeStatus::Stopped;
                self.kv.put(keys::volume(v.id), enc(&v));
                tracing::info!(volume = %v.id, name = %name, "volume stopped");
                MetaReply::Volume(v)
            }
            MetaOp::DeleteVolume { name } => {
                let v = volume_by_name(self.kv, name)?;
                if v.status == VolumeStatus::Started {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("stop volume {name:?} before deleting it"),
                    ));
                }
                for table in [b'I', b'D', b'X', b'L', b'G', b'M', b'Q', b'U', b'A', b'P'] {
                    let prefix = [[table].as_slice(), &v.id.0.to_be_bytes()].concat();
                    for (k, _) in self.kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
                        self.kv.delete(k);
                    }
                }
                self.kv.delete(keys::counter(&format!("ino/{}", v.id.0)));
                self.kv.delete(keys::volume_name(name));
                // The record stays, holding its bricks, until the leader has removed the
                // volume's objects from all of them (`VolumePurged`).
                let mut v = v;
                v.status = VolumeStatus::Deleting;
                v.rebalance = None;
                self.kv.put(keys::volume(v.id), enc(&v));
                tracing::info!(volume = %v.id, name = %name, "volume deleted; its objects are removed from its bricks next");
                MetaReply::Done
            }
            MetaOp::VolumePurged { volume } => {
                let Some(v) = get::<VolumeRecord>(self.kv, &keys::volume(*volume))? else {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("volume {volume} does not exist"),
                    ));
                };
                if v.status != VolumeStatus::Deleting {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("volume {:?} is not being deleted", v.name),
                    ));
                }
                self.kv.delete(keys::volume(v.id));
                tracing::info!(volume = %v.id, name = %v.name, "deleted volume's objects removed from all its bricks: its bricks are free");
                MetaReply::Done
            }
            MetaOp::AddCredential { name, credential } => {
                let mut v = volume_by_name(self.kv, name)?;
                if v.credentials.iter().any(|c| c.id == credential.id) {
                    return Err(err(
                        ErrorCode::Exists,
                        format!(
                            "volume {name:?} already lists credential {:x}",
                            credential.id
                        ),
                    ));
                }
                if v.credentials.len() >= brickfs_proto::meta::CREDENTIALS_MAX {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!(
                            "volume {name:?} lists {} credentials, the most it may: revoke one first",
                            v.credentials.len()
                        ),
                    ));
                }
                check_label(credential)?;
                v.credentials.push(credential.clone());
                self.kv.put(keys::volume(v.id), enc(&v));
                tracing::info!(volume = %v.id, name = %name, credential = %format!("{:x}", credential.id), "client credential listed");
                MetaReply::Volume(v)
            }
            MetaOp::RotateCredential { name, credential } => {
                let mut v = volume_by_name(self.kv, name)?;
                check_label(credential)?;
                let revoked: Vec<u64> = v
                    .credentials
                    .iter()
                    .map(|c| c.id)
                    .filter(|id| *id != credential.id)
                    .collect();
                v.credentials = vec![credential.clone()];
                self.kv.put(keys::volume(v.id), enc(&v));
                tracing::info!(volume = %v.id, name = %name, credential = %format!("{:x}", credential.id), revoked = revoked.len(), "client credentials rotated");
                MetaReply::Rotated { volume: v, revoked }
            }
            MetaOp::RevokeCredential { name, id } => {
                let mut v = volume_by_name(self.kv, name)?;
                let before = v.credentials.len();
                v.credentials.retain(|c| c.id != *id);
                if v.credentials.len() == before {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("volume {name:?} lists no credential {id:x}"),
                    ));
                }
                self.kv.put(keys::volume(v.id), enc(&v));
                tracing::info!(volume = %v.id, name = %name, credential = %format!("{id:x}"), "client credential revoked");
                MetaReply::Volume(v)
            }
            MetaOp::SetVolumeOption { name, key, value } => {
                let mut v = volume_by_name(self.kv, name)?;
                let value = check_option(&v, key, value)?;
                v.options.retain(|(k, _)| k != key);
                v.options.push((key.clone(), value));
                v.options.sort();
                self.kv.put(keys::volume(v.id), enc(&v));
                MetaReply::Volume(v)
            }
            MetaOp::RemoveNode { node } => {
                if get::<NodeRecord>(self.kv, &keys::node(*node))?.is_none() {
                    return Err(err(
                        ErrorCode::NotFound,
                        format!("node {node} is not registered"),
                    ));
                }
                let used: Vec<String> = scan_all::<VolumeRecord>(self.kv, b"V")?
                    .into_iter()
                    .filter(|v| v.bricks.iter().any(|b| b.node == *node))
                    .map(|v| v.name)
                    .collect();
                if !used.is_empty() {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("node {node} holds bricks of volumes {used:?}"),
                    ));
                }
                for b in scan_all::<BrickRecord>(self.kv, b"B")? {
                    if b.node == *node {
                        self.kv.delete(keys::brick(b.id));
                    }
                }
                self.kv.delete(keys::node(*node));
                MetaReply::Done
            }
            MetaOp::Heartbeat { node } => {
                let mut n = get::<NodeRecord>(self.kv, &keys::node(*node))?.ok_or_else(|| {
                    err(
                        ErrorCode::NotFound,
                        format!("node {node} is not registered"),
                    )
                })?;
                n.last_heartbeat_ms = u64::try_from(self.now_ns / 1_000_000).unwrap_or(0);
                self.kv.put(keys::node(*node), enc(&n));
                // The node learns which of its bricks are in sync: only they serve reads.
                let mut in_sync = Vec::new();
                let mut volumes = Vec::new();
                let mut epochs = Vec::new();
                for v in scan_all::<VolumeRecord>(self.kv, b"V")? {
                    volumes.push(v.id);
                    for b in v.bricks.iter().filter(|b| b.node == *node) {
                        // A member being replaced takes writes but no longer serves reads.
                        if v.sets.iter().any(|s| s.serves_reads(b.brick)) {
                            in_sync.push(b.brick);
                        }
                        for (i, s) in v.sets.iter().enumerate() {
                            if s.members.contains(&b.brick) {
                                epochs.push(SetStanding {
                                    brick: b.brick,
                                    volume: v.id,
                                    set: i as u32,
                                    epoch: s.epoch,
                                    in_sync: s.in_sync.len() as u32,
                                    quorum: brickfs_set::quorum::write_quorum(
                                        v.quorum_option(),
                                        v.replica as usize,
                                        v.disperse_data as usize,
                                        v.set_width(),
                                    ) as u32,
                                });
                            }
                        }
                    }
                }
                MetaReply::Standing {
                    in_sync,
                    volumes,
                    epochs,
                }
            }
            MetaOp::ReportRestart { node, bricks } => {
                for mut v in scan_all::<VolumeRecord>(self.kv, b"V")? {
                    let mut changed = false;
                    let name = v.name.clone();
                    for (index, s) in v.sets.iter_mut().enumerate() {
                        let mine: Vec<_> =
                            bricks.iter().filter(|b| s.members.contains(b)).collect();
                        for brick in mine {
                            if s.in_sync.contains(brick) && s.in_sync.len() > 1 {
                                let keep =
                                    s.in_sync.iter().copied().filter(|b| b != brick).collect();
                                narrow_in_sync(s, keep);
                                if !s.full_heal.contains(brick) {
                                    s.full_heal.push(*brick);
                                }
                                changed = true;
                                tracing::warn!(volume = %name, set = index, %brick, %node, epoch = s.epoch.0, "a brick restarted after an unclean stop: out of sync until a full heal");
                            } else if s.in_sync.contains(brick) {
                                tracing::warn!(volume = %name, set = index, %brick, %node, "a brick restarted after an unclean stop, but it is its set's last in-sync member: kept");
                            }
                        }
                    }
                    if changed {
                        self.kv.put(keys::volume(v.id), enc(&v));
                    }
                }
                MetaReply::Done
            }
            MetaOp::Mkdir {
                volume,
                parent,
                name,
                mode,
                umask,
                uid,
                gid,
            } => {
                let child = self.new_inode(*volume, FileKind::Dir, *mode, *uid, *gid)?;
                self.create_node(*volume, *parent, name, child, *umask)?
            }
            MetaOp::Create {
                volume,
                parent,
                name,
                kind,
                mode,
                umask,
                uid,
                gid,
                rdev,
                exclusive,
            }
            | MetaOp::CreateOpen {
                volume,
                parent,
                name,
                kind,
                mode,
                umask,
                uid,
                gid,
                rdev,
                exclusive,
            } => {
                if *kind == FileKind::Dir || *kind == FileKind::Symlink {
                    return Err(err(ErrorCode::InvalidArgument, "use mkdir or symlink"));
                }
                check_name(name)?;
                if let Some(existing) = lookup_entry(self.kv, *volume, *parent, name)? {
                    load_dir(self.kv, *volume, *parent)?;
                    if *exclusive {
                        return Err(err(ErrorCode::Exists, format!("{name:?} exists")));
                    }
                    if existing.kind == FileKind::Dir {
                        return Err(err(ErrorCode::IsDir, format!("{name:?} is a directory")));
                    }
                    let attr = load_inode(self.kv, *volume, existing.ino)?.attr;
                    return Ok(self.held_if_asked(op, session, *volume, attr));
                }
                let mut child = self.new_inode(*volume, *kind, *mode, *uid, *gid)?;
                child.attr.rdev = *rdev;
                if *kind == FileKind::File {
                    let (group, unit) = self.place(*volume, child.attr.ino)?;
                    child.attr.group = group;
                    child.attr.unit_bytes = unit;
                }
                match self.create_node(*volume, *parent, name, child, *umask)? {
                    MetaReply::Attr(a) => self.held_if_asked(op, session, *volume, a),
                    other => other,
                }
            }
            MetaOp::Symlink {
                volume,
                parent,
                name,
                target,
                uid,
                gid,
            } => {
                if target.is_empty() || target.len() > SYMLINK_MAX_BYTES || target.contains('\0') {
                    return Err(err(
                        ErrorCode::NameTooLong,
                        "symlink target empty or too long",
                    ));
                }
                let mut child = self.new_inode(*volume, FileKind::Symlink, 0o777, *uid, *gid)?;
                child.attr.size_bytes = target.len() as u64;
                child.target = Some(target.clone());
                self.create_node(*volume, *parent, name, child, 0)?
            }
            MetaOp::Link {
                volume,
                ino,
                new_parent,
                new_name,
            } => {
                check_name(new_name)?;
                let mut target = load_inode(self.kv, *volume, *ino)?;
                if target.attr.kind == FileKind::Dir {
                    return Err(err(
                        ErrorCode::PermissionDenied,
                        "hard links to directories are not allowed",
                    ));
                }
                if target.attr.nlink >= LINK_MAX {
                    return Err(err(ErrorCode::TooManyLinks, format!("inode {ino}")));
                }
                let mut dir = load_dir(self.kv, *volume, *new_parent)?;
                if lookup_entry(self.kv, *volume, *new_parent, new_name)?.is_some() {
                    return Err(err(ErrorCode::Exists, format!("{new_name:?} exists")));
                }
                target.attr.nlink += 1;
                target.attr.ctime_ns = self.now_ns;
                self.add_entry(*volume, &mut dir, new_name, &target);
                self.put_inode(*volume, &dir);
                self.put_inode(*volume, &target);
                MetaReply::Attr(target.attr)
            }
            MetaOp::Unlink {
                volume,
                parent,
                name,
            }
            | MetaOp::UnlinkOpen {
                volume,
                parent,
                name,
            } => {
                let keep_for = matches!(op, MetaOp::UnlinkOpen { .. }).then_some(session);
                check_name(name)?;
                let mut dir = load_dir(self.kv, *volume, *parent)?;
                let e = lookup_entry(self.kv, *volume, *parent, name)?
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("{name:?}")))?;
                if e.kind == FileKind::Dir {
                    return Err(err(ErrorCode::IsDir, format!("{name:?} is a directory")));
                }
                let mut child = load_inode(self.kv, *volume, e.ino)?;
                self.remove_entry(*volume, &mut dir, name, e.kind);
                self.put_inode(*volume, &dir);
                self.drop_link_keeping(*volume, &mut child, keep_for)?;
                MetaReply::Done
            }
            MetaOp::DropOrphan { volume, ino } => {
                self.drop_orphan(session, *volume, *ino)?;
                MetaReply::Done
            }
            MetaOp::TouchAtime {
                volume,
                ino,
                atime_ns,
            } => {
                let mut i = load_inode(self.kv, *volume, *ino)?;
                i.attr.atime_ns = i.attr.atime_ns.max(*atime_ns);
                self.put_inode(*volume, &i);
                MetaReply::Done
            }
            MetaOp::OpenFile { volume, ino } => {
                check_volume(self.kv, *volume)?;
                let i = load_inode(self.kv, *volume, *ino)?;
                // A file without a name is opened again only by a session that holds it (a
                // stale name elsewhere must not revive it).
                if i.attr.kind == FileKind::File
                    && i.attr.nlink == 0
                    && self
                        .kv
                        .get(&keys::holder(*volume, *ino, session))
                        .map_err(internal)?
                        .is_none()
                {
                    return Err(err(ErrorCode::NotFound, format!("inode {ino} has no name")));
                }
                if i.attr.kind == FileKind::File {
                    self.hold(session, *volume, *ino);
                }
                MetaReply::Attr(i.attr)
            }
            MetaOp::CloseFiles { volume, inos } => {
                if inos.len() > CLOSE_FILES_MAX {
                    return Err(err(
                        ErrorCode::TooLarge,
                        format!(
                            "{} files in one close (at most {CLOSE_FILES_MAX})",
                            inos.len()
                        ),
                    ));
                }
                for ino in inos {
                    self.drop_orphan(session, *volume, *ino)?;
                }
                MetaReply::Done
            }
            MetaOp::Rmdir {
                volume,
                parent,
                name,
            } => {
                check_name(name)?;
                let mut dir = load_dir(self.kv, *volume, *parent)?;
                let e = lookup_entry(self.kv, *volume, *parent, name)?
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("{name:?}")))?;
                if e.kind != FileKind::Dir {
                    return Err(err(
                        ErrorCode::NotDir,
                        format!("{name:?} is not a directory"),
                    ));
                }
                let child = load_inode(self.kv, *volume, e.ino)?;
                if child.entries > 0 {
                    return Err(err(ErrorCode::NotEmpty, format!("{name:?} is not empty")));
                }
                self.remove_entry(*volume, &mut dir, name, e.kind);
                self.put_inode(*volume, &dir);
                self.drop_link(*volume, child)?;
                MetaReply::Done
            }
            MetaOp::Rename {
                volume,
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => self.rename(*volume, *parent, name, *new_parent, new_name, *flags)?,
            MetaOp::SetAttr { volume, ino, set } => {
                let mut i = load_inode(self.kv, *volume, *ino)?;
                let before = i.attr.size_bytes;
                apply_setattr(&mut i, set, self.now_ns)?;
                let delta = i128::from(i.attr.size_bytes) - i128::from(before);
                self.charge(*volume, i.parent, delta)?;
                if let Some(mode) = set.mode {
                    self.chmod_acl(*volume, *ino, mode)?;
                }
                self.put_inode(*volume, &i);
                MetaReply::Attr(i.attr)
            }
            MetaOp::SetXattr {
                volume,
                ino,
                name,
                value,
                create_only,
                replace_only,
            } => {
                if name.is_empty() || name.len() > XATTR_NAME_MAX_BYTES {
                    return Err(err(ErrorCode::NameTooLong, "xattr name empty or too long"));
                }
                if value.len() > XATTR_VALUE_MAX_BYTES {
                    return Err(err(ErrorCode::TooLarge, "xattr value too large"));
                }
                // The namespaces Linux filesystems know; others are not supported.
                let known = ["user.", "trusted.", "security."]
                    .iter()
                    .any(|ns| name.starts_with(ns) && name.len() > ns.len())
                    || name == acl::ACCESS_XATTR
                    || name == acl::DEFAULT_XATTR;
                if !known {
                    return Err(err(
                        ErrorCode::NotSupported,
                        format!("xattr namespace of {name:?} is not supported"),
                    ));
                }
                let mut i = load_inode(self.kv, *volume, *ino)?;
                let key = keys::xattr(*volume, *ino, name);
                let exists = self.kv.get(&key).map_err(internal)?.is_some();
                if *create_only && exists {
                    return Err(err(ErrorCode::Exists, format!("xattr {name:?} exists")));
                }
                if *replace_only && !exists {
                    return Err(err(ErrorCode::NoData, format!("xattr {name:?}")));
                }
                match name.as_str() {
                    acl::ACCESS_XATTR | acl::DEFAULT_XATTR => {
                        self.set_acl(&mut i, name, value, key)?;
                    }
                    _ => self.kv.put(key, value.clone()),
                }
                i.attr.ctime_ns = self.now_ns;
                self.put_inode(*volume, &i);
                MetaReply::Done
            }
            MetaOp::SetLock { volume, ino, lock } => {
                load_inode(self.kv, *volume, *ino)?;
                if lock.start > lock.end {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        "lock range ends before it starts",
                    ));
                }
                let mut t: LockTable =
                    get(self.kv, &keys::locks(*volume, *ino))?.unwrap_or_default();
                let before = t.posix.len();
                if let Err(held) = t.set(session, lock.clone()) {
                    return Err(err(
                        ErrorCode::WouldBlock,
                        format!(
                            "range {}..{} is locked by session {} owner {} pid {}",
                            held.lock.start,
                            held.lock.end,
                            held.session,
                            held.lock.owner,
                            held.lock.pid
                        ),
                    ));
                }
                // Bounded: one tenant's locks cannot make every lock call on the file slow or
                // its table large without end.
                if lock.kind != brickfs_proto::meta::LockKind::Unlock
                    && t.posix.len() > before
                    && t.posix.len() > LOCKS_PER_FILE_MAX
                {
                    return Err(err(
                        ErrorCode::TooManyLocks,
                        format!(
                            "the file holds {LOCKS_PER_FILE_MAX} byte-range locks, the most it may"
                        ),
                    ));
                }
                self.save_locks(*volume, *ino, session, &t);
                MetaReply::Done
            }
            MetaOp::Flock {
                volume,
                ino,
                owner,
                kind,
            } => {
                load_inode(self.kv, *volume, *ino)?;
                let mut t: LockTable =
                    get(self.kv, &keys::locks(*volume, *ino))?.unwrap_or_default();
                if !t.flock(session, *owner, *kind) {
                    return Err(err(
                        ErrorCode::WouldBlock,
                        format!("inode {ino} is flocked by another owner"),
                    ));
                }
                self.save_locks(*volume, *ino, session, &t);
                MetaReply::Done
            }
            MetaOp::ReleaseLocks { volume, ino, owner } => {
                let mut t: LockTable =
                    get(self.kv, &keys::locks(*volume, *ino))?.unwrap_or_default();
                t.release(session, Some(*owner));
                self.save_locks(*volume, *ino, session, &t);
                MetaReply::Done
            }
            MetaOp::GcDone { volume, ino } => {
                self.kv.delete(keys::gc(*volume, *ino));
                MetaReply::Done
            }
            MetaOp::GcDoneMany { volume, inos } => {
                if inos.len() > brickfs_proto::meta::GC_DONE_MAX {
                    return Err(err(
                        ErrorCode::TooLarge,
                        format!(
                            "{} files in one GcDoneMany (at most {})",
                            inos.len(),
                            brickfs_proto::meta::GC_DONE_MAX
                        ),
                    ));
                }
                for ino in inos {
                    self.kv.delete(keys::gc(*volume, *ino));
                }
                MetaReply::Done
            }
            MetaOp::RemoveXattr { volume, ino, name } => {
                let mut i = load_inode(self.kv, *volume, *ino)?;
                let key = keys::xattr(*volume, *ino, name);
                if self.kv.get(&key).map_err(internal)?.is_none() {
                    return Err(err(ErrorCode::NoData, format!("xattr {name:?}")));
                }
                self.kv.delete(key);
                i.attr.ctime_ns = self.now_ns;
                self.put_inode(*volume, &i);
                MetaReply::Done
            }
        })
    }

    /// Stores an ACL set through its xattr. An access ACL sets the mode's permission bits and
    /// is not kept when it says no more than they do; a default ACL is for directories only;
    /// an empty ACL removes it.
    fn set_acl(&mut self, i: &mut InodeV1, name: &str, value: &[u8], key: Vec<u8>) -> Res<()> {
        let parsed = Acl::parse(value)
            .map_err(|e| err(ErrorCode::InvalidArgument, format!("{name}: {e}")))?;
        if name == acl::DEFAULT_XATTR {
            if i.attr.kind != FileKind::Dir {
                return Err(err(
                    ErrorCode::PermissionDenied,
                    "only directories have a default ACL",
                ));
            }
            match parsed {
                Some(a) => self.kv.put(key, a.encode()),
                None => self.kv.delete(key),
            }
            return Ok(());
        }
        match parsed {
            Some(a) => {
                let (bits, equivalent) = a.mode_bits();
                i.attr.mode = (i.attr.mode & !0o777) | bits;
                if equivalent {
                    self.kv.delete(key);
                } else {
                    self.kv.put(key, a.encode());
                }
            }
            None => self.kv.delete(key),
        }
        Ok(())
    }

    /// A chmod carries the new permission bits into the access ACL, if there is one.
    fn chmod_acl(&mut self, v: VolumeId, ino: Ino, mode: u32) -> Res<()> {
        let key = keys::xattr(v, ino, acl::ACCESS_XATTR);
        if let Some(raw) = self.kv.get(&key).map_err(internal)?
            && let Ok(Some(mut a)) = Acl::parse(&raw)
        {
            a.chmod(mode);
            self.kv.put(key, a.encode());
        }
        Ok(())
    }

    fn save_locks(&mut self, v: VolumeId, ino: Ino, session: SessionId, t: &LockTable) {
        let key = keys::locks(v, ino);
        if t.is_empty() {
            self.kv.delete(key);
        } else {
            self.kv.put(key, enc(t));
        }
        let holds = t.posix.iter().any(|h| h.session == session)
            || t.flock.iter().any(|(s, _, _)| *s == session);
        if holds {
            self.kv.put(keys::session_lock(session, v, ino), Vec::new());
        } else {
            self.kv.delete(keys::session_lock(session, v, ino));
        }
    }

    /// Chooses a new file's stripe group (by inode hash, weighted by the smallest brick of each
    /// group) and its stripe unit (the volume's `stripe-unit` option, 1 MiB by default).
    fn place(&mut self, v: VolumeId, ino: Ino) -> Res<(u32, u32)> {
        let vol = check_volume(self.kv, v)?;
        let unit = vol
            .options
            .iter()
            .find(|(k, _)| k == "stripe-unit")
            .and_then(|(_, val)| val.parse::<u32>().ok())
            .unwrap_or(DEFAULT_UNIT_BYTES);
        if vol.groups() <= 1 {
            return Ok((0, unit));
        }
        let bricks: Vec<BrickRecord> = scan_all(self.kv, b"B")?;
        let weights = vol.placement_weights(|id| {
            bricks
                .iter()
                .find(|b| b.id == id)
                .map_or(0, |b| b.capacity_bytes)
        });
        let group = brickfs_layout::place::pick_group(ino.0, &weights).ok_or_else(|| {
            err(
                ErrorCode::NoSpace,
                format!("no stripe group of volume {} takes new files", vol.name),
            )
        })?;
        Ok((group as u32, unit))
    }

    fn create_volume(&mut self, name: &str, words: &[String]) -> Res<MetaReply> {
        check_name(name)?;
        check_volume_name(name)?;
        if get::<u64>(self.kv, &keys::volume_name(name))?.is_some() {
            return Err(err(ErrorCode::Exists, format!("volume {name:?} exists")));
        }
        let spec = VolumeSpec::parse(&words.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|e| err(ErrorCode::InvalidArgument, format!("volume spec: {e}")))?;
        let resolved = self.resolve_free_bricks(&spec.bricks)?;
        let sets = (0..spec.sets())
            .map(|s| {
                let members: Vec<_> = resolved[spec.set_bricks(s)]
                    .iter()
                    .map(|b| b.brick)
                    .collect();
                SetState {
                    primary: members[0],
                    in_sync: members.clone(),
                    members,
                    epoch: Epoch(1),
                    full_heal: Vec::new(),
                    draining: None,
                }
            })
            .collect();
        let (replica, data, redundancy) = match spec.redundancy {
            Redundancy::None => (0, 0, 0),
            Redundancy::Replica(r) => (r, 0, 0),
            Redundancy::Disperse { data, redundancy } => (0, data, redundancy),
        };
        let id = VolumeId(self.next_counter("volume")?);
        // The root inode takes number 1.
        let root_no = self.next_counter(&format!("ino/{}", id.0))?;
        if root_no != ROOT_INO.0 {
            return Err(internal(format!("volume {id} already has inodes")));
        }
        let root = InodeV1 {
            attr: Attr {
                ino: ROOT_INO,
                kind: FileKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size_bytes: 0,
                atime_ns: self.now_ns,
                mtime_ns: self.now_ns,
                ctime_ns: self.now_ns,
                nlink: 2,
                rdev: 0,
                group: 0,
                unit_bytes: 0,
            },
            parent: ROOT_INO,
            entries: 0,
            target: None,
        };
        self.put_inode(id, &root);
        let rec = VolumeRecord {
            id,
            name: name.to_string(),
            root: ROOT_INO,
            type_name: spec.volume_type().name().to_string(),
            spec: spec.to_words(),
            stripe: spec.stripe,
            replica,
            disperse_data: data,
            disperse_redundancy: redundancy,
            bricks: resolved,
            sets,
            status: VolumeStatus::Created,
            options: Vec::new(),
            draining: Vec::new(),
            rebalance: None,
            credentials: Vec::new(),
        };
        self.kv.put(keys::volume(id), enc(&rec));
        self.kv.put(keys::volume_name(name), enc(&id.0));
        tracing::info!(volume = %id, name = %name, kind = %rec.type_name, "volume created");
        Ok(MetaReply::Volume(rec))
    }

    fn end_session(&mut self, id: SessionId) -> Res<()> {
        let prefix = keys::session_lock_prefix(id);
        for (k, _) in self.kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
            let (v, ino) =
                volume_ino(&k[prefix.len()..]).ok_or_else(|| internal("session lock key"))?;
            let mut t: LockTable = get(self.kv, &keys::locks(v, ino))?.unwrap_or_default();
            t.release(id, None);
            self.save_locks(v, ino, id, &t);
            tracing::debug!(session = %id, volume = %v, %ino, "released locks of an ended session");
        }
        let prefix = keys::orphan_prefix(id);
        for (k, _) in self.kv.scan(&prefix, None, usize::MAX).map_err(internal)? {
            let (v, ino) = volume_ino(&k[prefix.len()..]).ok_or_else(|| internal("orphan key"))?;
            self.drop_orphan(id, v, ino)?;
        }
        self.kv.delete(keys::session(id));
        if let Some(owner) = get::<SessionOwner>(self.kv, &keys::session_owner(id))? {
            self.kv.delete(keys::session_owner(id));
            let held = get::<u64>(self.kv, &keys::owner_sessions(owner))?.unwrap_or(0);
            match held.saturating_sub(1) {
                0 => self.kv.delete(keys::owner_sessions(owner)),
                n => self.kv.put(keys::owner_sessions(owner), enc(&n)),
            }
        }
        for (k, _) in self
            .kv
            .scan(&keys::reply_prefix(id), None, usize::MAX)
            .map_err(internal)?
        {
            self.kv.delete(k);
        }
        Ok(())
    }
}

/// Narrows a set's in-sync members to `keep` (non-empty): a new primary when the old one
/// left, and a new epoch.
/// Puts `new` in `old`'s place in set `index` of `v`, out of sync (a full heal fills it).
fn swap_brick(v: &mut VolumeRecord, index: usize, old: brickfs_proto::BrickId, new: VolumeBrick) {
    let set = &mut v.sets[index];
    for m in &mut set.members {
        if *m == old {
            *m = new.brick;
        }
    }
    let keep = set.in_sync.iter().copied().filter(|b| *b != old).collect();
    narrow_in_sync(set, keep);
    set.full_heal.retain(|b| *b != old);
    set.full_heal.push(new.brick);
    if let Some(at) = v.bricks.iter().position(|b| b.brick == old) {
        v.bricks[at] = new;
    }
}

fn narrow_in_sync(set: &mut SetState, keep: Vec<brickfs_proto::BrickId>) {
    if !keep.contains(&set.primary) {
        set.primary = keep[0];
    }
    set.in_sync = keep;
    set.epoch = Epoch(set.epoch.0 + 1);
}

/// The (volume, inode) a key suffix names: two big-endian u64s.
fn volume_ino(raw: &[u8]) -> Option<(VolumeId, Ino)> {
    let v = u64::from_be_bytes(raw.get(0..8)?.try_into().ok()?);
    let ino = u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
    Some((VolumeId(v), Ino(ino)))
}

fn volume_by_name(kv: &impl KvRead, name: &str) -> Res<VolumeRecord> {
    let id = get::<u64>(kv, &keys::volume_name(name))?
        .ok_or_else(|| err(ErrorCode::NotFound, format!("volume {name:?}")))?;
    check_volume(kv, VolumeId(id))
}

/// The volume options `volume set` knows, with their checks; returns the normalized value.
pub const VOLUME_OPTIONS: [&str; 5] = [
    "stripe-unit",
    "quorum",
    "heal-bandwidth",
    "cache-ttl-ms",
    "allow-networks",
];

fn check_option(v: &VolumeRecord, key: &str, value: &str) -> Res<String> {
    let bad = |why: String| {
        err(
            ErrorCode::InvalidArgument,
            format!("option {key}={value:?}: {why}"),
        )
    };
    match key {
        "stripe-unit" => {
            let n = parse_size(value).map_err(bad)?;
            if !n.is_power_of_two() || !(4096..=64 << 20).contains(&n) {
                return Err(bad("must be a power of two from 4KiB to 64MiB".into()));
            }
            Ok(n.to_string())
        }
        "quorum" => {
            let width = v.set_width();
            let n: usize = value.parse().map_err(|_| bad("not a number".into()))?;
            if n == 0 || n > width {
                return Err(bad(format!("must be 1 to the set width {width}")));
            }
            Ok(n.to_string())
        }
        "heal-bandwidth" => Ok(parse_size(value).map_err(bad)?.to_string()),
        "cache-ttl-ms" => {
            let n: u64 = value.parse().map_err(|_| bad("not a number".into()))?;
            if n > 60_000 {
                return Err(bad("at most 60000".into()));
            }
            Ok(n.to_string())
        }
        "allow-networks" => {
            let mut nets = Vec::new();
            for net in value.split(',').map(str::trim) {
                let (ip, prefix) = match net.split_once('/') {
                    Some((ip, p)) => (ip, Some(p)),
                    None => (net, None),
                };
                let ip: std::net::IpAddr = ip
                    .parse()
                    .map_err(|_| bad(format!("{net:?} is not an address")))?;
                let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    None => max,
                    Some(p) => p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| bad(format!("{net:?} has a bad prefix length")))?,
                };
                nets.push(format!("{ip}/{prefix}"));
            }
            Ok(nets.join(","))
        }
        _ => Err(bad(format!(
            "unknown option; known: {}",
            VOLUME_OPTIONS.join(", ")
        ))),
    }
}

fn ms_to_ns(ms: u64) -> i64 {
    i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

fn session_info(id: SessionId, s: &SessionV1) -> SessionInfo {
    SessionInfo {
        id,
        client: s.client.clone(),
        lease_expires_ms: u64::try_from(s.expires_ns / 1_000_000).unwrap_or(0),
    }
}

fn apply_setattr(i: &mut InodeV1, set: &SetAttr, now_ns: i64) -> Res<()> {
    if (set.size_bytes.is_some() || set.size_at_least_bytes.is_some())
        && i.attr.kind != FileKind::File
    {
        return Err(match i.attr.kind {
            FileKind::Dir => err(ErrorCode::IsDir, "cannot set the size of a directory"),
            _ => err(ErrorCode::InvalidArgument, "size applies to regular files"),
        });
    }
    if let Some(m) = set.mode {
        i.attr.mode = m & 0o7777;
    }
    if let Some(u) = set.uid {
        i.attr.uid = u;
    }
    if let Some(g) = set.gid {
        i.attr.gid = g;
    }
    if let Some(s) = set.size_bytes {
        i.attr.size_bytes = s;
        i.attr.mtime_ns = now_ns;
    }
    if let Some(s) = set.size_at_least_bytes {
        i.attr.size_bytes = i.attr.size_bytes.max(s);
    }
    if let Some(t) = set.atime_ns {
        i.attr.atime_ns = t;
    }
    if let Some(t) = set.mtime_ns {
        i.attr.mtime_ns = t;
    }
    i.attr.ctime_ns = now_ns;
    Ok(())
}

/// A credential's label is short free text.
fn check_label(credential: &brickfs_proto::meta::ClientCredential) -> Res<()> {
    if credential.label.len() > 256 {
        return Err(err(
            ErrorCode::InvalidArgument,
            "a credential's label is at most 256 bytes",
        ));
    }
    if credential.label.chars().any(char::is_control) {
        return Err(err(
            ErrorCode::InvalidArgument,
            "a credential's label holds no control characters (it is printed as it is)",
        ));
    }
    Ok(())
}

/// Who opened a session, when a client did: its volume's id and its credential's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionOwner(u64, u64);

/// Applies one command with exactly-once semantics: a (session, sequence) seen before answers
/// with its first result; a session that does not exist (any more) is refused.
pub fn apply_command<B: KvRead>(kv: &mut Overlay<'_, B>, cmd: &Command) -> CommandResult {
    let mut a = Applier {
        kv,
        now_ns: cmd.now_ns,
    };
    // A client's command: bound to the sessions its credential opened.
    let (op, client) = match &cmd.op {
        MetaOp::AsClient {
            volume,
            credential,
            op,
        } => (&**op, Some(SessionOwner(volume.0, *credential))),
        op => (op, None),
    };
    if matches!(op, MetaOp::AsClient { .. }) {
        return Err(err(
            ErrorCode::InvalidArgument,
            "a client command inside another",
        ));
    }
    if cmd.session == SessionId(0) {
        if let Some(owner) = client {
            if !matches!(op, MetaOp::OpenSession { .. }) {
                return Err(err(
                    ErrorCode::SessionExpired,
                    "a client's request needs a session",
                ));
            }
            // Bounded per credential: a tenant cannot grow the group's state without end.
            let held = get::<u64>(a.kv, &keys::owner_sessions(owner))?.unwrap_or(0);
            if held >= SESSIONS_PER_CREDENTIAL_MAX {
                return Err(err(
                    ErrorCode::Busy,
                    format!(
                        "client credential {:x} of volume {} holds {held} sessions, the most one may: close some, or wait for their leases to end",
                        owner.1, owner.0
                    ),
                ));
            }
            let opened = a.op(op, cmd.session)?;
            if let MetaReply::Session(info) = &opened {
                a.kv.put(keys::session_owner(info.id), enc(&owner));
                a.kv.put(keys::owner_sessions(owner), enc(&(held + 1)));
            }
            return Ok(opened);
        }
        return match op {
            MetaOp::OpenSession { .. }
            | MetaOp::ExpireSessions
            | MetaOp::DetectFailures { .. }
            | MetaOp::ReportDamage { .. }
            | MetaOp::ReportRestart { .. }
            | MetaOp::RegisterNode { .. }
            | MetaOp::RegisterBrick { .. }
            | MetaOp::Heartbeat { .. } => a.op(op, cmd.session),
            _ => Err(err(
                ErrorCode::SessionExpired,
                "this request needs a session",
            )),
        };
    }
    let skey = keys::session(cmd.session);
    let Some(mut session) = get::<SessionV1>(a.kv, &skey)? else {
        return Err(err(
            ErrorCode::SessionExpired,
            format!("session {} is unknown or expired", cmd.session),
        ));
    };
    // Before the answers kept for retries: those are the session's, not the caller's.
    if let Some(caller) = client {
        let owner = get::<SessionOwner>(a.kv, &keys::session_owner(cmd.session))?;
        if owner != Some(caller) {
            return Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "session {} was not opened with this client credential",
                    cmd.session
                ),
            ));
        }
    }
    if let Some(cached) = get::<CommandResult>(a.kv, &keys::reply(cmd.session, cmd.seq))? {
        return cached;
    }
    if cmd.seq < session.acked_below {
        return Err(err(
            ErrorCode::StaleRequest,
            format!(
                "request {} of session {} was answered long ago",
                cmd.seq, cmd.session
            ),
        ));
    }
    // Forget answers the client confirmed it has. Those below the old mark are gone already:
    // the scan starts at it, for a scan from the prefix's start would step over the deletes
    // of every earlier answer still in the database's memtable (creates fell from 360/s to
    // 130/s over 15,000 files of one session, brickd busy in RocksDB's iterator).
    if cmd.acked_below > session.acked_below {
        let prefix = keys::reply_prefix(cmd.session);
        let from = session
            .acked_below
            .checked_sub(1)
            .map(|below| keys::reply(cmd.session, below));
        let most = usize::try_from(cmd.acked_below - session.acked_below).unwrap_or(usize::MAX);
        for (k, _) in
            a.kv.scan(&prefix, from.as_deref(), most)
                .map_err(internal)?
        {
            let seq = k
                .get(9..17)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if seq >= cmd.acked_below {
                break;
            }
            a.kv.delete(k);
        }
        session.acked_below = cmd.acked_below;
    }
    session.expires_ns = cmd.now_ns.saturating_add(ms_to_ns(session.lease_ms));
    let closing = matches!(op, MetaOp::CloseSession);
    // A failed command changes nothing but the session bookkeeping: run it on a nested overlay.
    let result = {
        let mut inner = Overlay::new(&*a.kv);
        let r = Applier {
            kv: &mut inner,
            now_ns: cmd.now_ns,
        }
        .op(op, cmd.session);
        let changes = if r.is_ok() {
            inner.into_changes()
        } else {
            Default::default()
        };
        for (k, v) in changes {
            match v {
                Some(v) => a.kv.put(k, v),
                None => a.kv.delete(k),
            }
        }
        r
    };
    if !closing {
        a.kv.put(skey, enc(&session));
        a.kv.put(keys::reply(cmd.session, cmd.seq), enc(&result));
    }
    result
}

/// The refusal of a brick another volume holds: a deleted one until its objects are gone.
pub(crate) fn brick_taken(brick: impl std::fmt::Display, owner: &VolumeRecord) -> ErrorBody {
    if owner.status == VolumeStatus::Deleting {
        err(
            ErrorCode::Exists,
            format!(
                "brick {brick} still holds objects of deleted volume {:?} (id {}); the leader is removing them: try again once `brickfs volume list` no longer shows it",
                owner.name, owner.id
            ),
        )
    } else {
        err(
            ErrorCode::Exists,
            format!("brick {brick} is already in volume {:?}", owner.name),
        )
    }
}

/// Answers a read from committed state.
pub fn read(kv: &impl KvRead, r: &MetaRead) -> CommandResult {
    Ok(match r {
        MetaRead::Lookup {
            volume,
            parent,
            name,
        } => {
            check_name(name)?;
            load_dir(kv, *volume, *parent)?;
            let e = lookup_entry(kv, *volume, *parent, name)?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("{name:?}")))?;
            MetaReply::Attr(load_inode(kv, *volume, e.ino)?.attr)
        }
        MetaRead::GetAttr { volume, ino } => MetaReply::Attr(load_inode(kv, *volume, *ino)?.attr),
        MetaRead::ReadDir {
            volume,
            ino,
            after,
            limit,
        } => {
            let (entries, more) = read_dir(kv, *volume, *ino, after.as_deref(), *limit)?;
            MetaReply::Entries { entries, more }
        }
        MetaRead::ReadDirPlus {
            volume,
            ino,
            after,
            limit,
        } => {
            let (entries, more) = read_dir(kv, *volume, *ino, after.as_deref(), *limit)?;
            let entries = entries
                .into_iter()
                .map(|e| load_inode(kv, *volume, e.ino).map(|i| (e, i.attr)))
                .collect::<Res<Vec<_>>>()?;
            MetaReply::EntriesPlus { entries, more }
        }
        MetaRead::ReadLink { volume, ino } => {
            let i = load_inode(kv, *volume, *ino)?;
            MetaReply::Target(
                i.target
                    .ok_or_else(|| err(ErrorCode::InvalidArgument, "not a symlink"))?,
            )
        }
        MetaRead::GetXattr { volume, ino, name } => {
            load_inode(kv, *volume, *ino)?;
            MetaReply::Value(
                kv.get(&keys::xattr(*volume, *ino, name))
                    .map_err(internal)?
                    .ok_or_else(|| err(ErrorCode::NoData, format!("xattr {name:?}")))?,
            )
        }
        MetaRead::ListXattr { volume, ino } => {
            load_inode(kv, *volume, *ino)?;
            let prefix = keys::xattr_prefix(*volume, *ino);
            let names = kv
                .scan(&prefix, None, usize::MAX)
                .map_err(internal)?
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
                .collect();
            MetaReply::Names(names)
        }
        MetaRead::Files {
            volume,
            after,
            limit,
        } => elastic::read_files(kv, *volume, *after, *limit)?,
        MetaRead::Moves { volume } => elastic::read_moves(kv, *volume)?,
        MetaRead::Quotas { volume } => quota::read_quotas(kv, *volume)?,
        MetaRead::ListNodes => MetaReply::Nodes(scan_all(kv, b"N")?),
        MetaRead::ListBricks => MetaReply::Bricks(scan_all::<BrickRecord>(kv, b"B")?),
        MetaRead::ListVolumes => MetaReply::Volumes(scan_all(kv, b"V")?),
        MetaRead::VolumesPage { after, limit } => volumes_page(kv, *after, *limit)?,
        MetaRead::VolumeByName { name } => {
            let id = get::<u64>(kv, &keys::volume_name(name))?
                .ok_or_else(|| err(ErrorCode::NotFound, format!("volume {name:?}")))?;
            MetaReply::Volume(check_volume(kv, VolumeId(id))?)
        }
        MetaRead::GetLock {
            volume,
            ino,
            session,
            lock,
        }
        | MetaRead::WaitLock {
            volume,
            ino,
            session,
            lock,
            ..
        } => {
            load_inode(kv, *volume, *ino)?;
            let t: LockTable = get(kv, &keys::locks(*volume, *ino))?.unwrap_or_default();
            MetaReply::Lock(t.conflict(*session, lock).cloned())
        }
        MetaRead::ListGc { volume, limit } => {
            let prefix = [b"G".as_slice(), &volume.0.to_be_bytes()].concat();
            let mut out = Vec::new();
            for (k, v) in kv
                .scan(&prefix, None, (*limit as usize).clamp(1, READDIR_MAX))
                .map_err(internal)?
            {
                let ino = k
                    .get(9..17)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| internal("gc key"))?;
                let (size_bytes, group, moved_from) = elastic::dec_gc(&v)?;
                out.push(GcItem {
                    ino: Ino(ino),
                    size_bytes,
                    group,
                    moved_from,
                });
            }
            MetaReply::Gc(out)
        }
        MetaRead::ListSessions => {
            let mut out = Vec::new();
            for (k, v) in kv.scan(b"S", None, usize::MAX).map_err(internal)? {
                let s: SessionV1 = dec(&v)?;
                let id = k
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                out.push(session_info(SessionId(id), &s));
            }
            MetaReply::Sessions(out)
        }
    })
}

/// A page of a directory's entries in name order after `after`, and whether more follow.
fn read_dir(
    kv: &impl KvRead,
    volume: VolumeId,
    ino: Ino,
    after: Option<&str>,
    limit: u32,
) -> Res<(Vec<DirEntry>, bool)> {
    load_dir(kv, volume, ino)?;
    let prefix = keys::dir_prefix(volume, ino);
    let after_key = after.map(|n| keys::dentry(volume, ino, n));
    let limit = (limit as usize).clamp(1, READDIR_MAX);
    let rows = kv
        .scan(&prefix, after_key.as_deref(), limit + 1)
        .map_err(internal)?;
    let more = rows.len() > limit;
    let mut entries = Vec::new();
    for (k, v) in rows.into_iter().take(limit) {
        let d: DentryV1 = dec(&v)?;
        let name = String::from_utf8(k[prefix.len()..].to_vec()).map_err(internal)?;
        entries.push(DirEntry {
            name,
            ino: d.ino,
            kind: d.kind,
        });
    }
    Ok((entries, more))
}

/// One page of `MetaRead::VolumesPage`.
fn volumes_page(kv: &impl KvRead, after: Option<VolumeId>, limit: u32) -> Res<MetaReply> {
    let limit = (limit as usize).clamp(1, READDIR_MAX);
    let from = after.map(keys::volume);
    let rows = kv
        .scan(b"V", from.as_deref(), limit + 1)
        .map_err(internal)?;
    let (mut volumes, mut bytes) = (Vec::new(), 0usize);
    let mut next = None;
    for (i, (_, raw)) in rows.iter().enumerate() {
        let full = i == limit
            || (!volumes.is_empty() && bytes + raw.len() > brickfs_proto::meta::VOLUME_PAGE_BYTES);
        if full {
            next = volumes.last().map(|v: &VolumeRecord| v.id);
            break;
        }
        bytes += raw.len();
        volumes.push(dec::<VolumeRecord>(raw)?);
    }
    Ok(MetaReply::VolumePage { volumes, next })
}

fn scan_all<T: DeserializeOwned>(kv: &impl KvRead, prefix: &[u8]) -> Res<Vec<T>> {
    kv.scan(prefix, None, usize::MAX)
        .map_err(internal)?
        .into_iter()
        .map(|(_, v)| dec(&v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Overlay;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Path = Vec<&'static str>;

    #[derive(Clone, Debug)]
    enum Op {
        Mkdir(Path),
        Create(Path),
        Unlink(Path),
        Rmdir(Path),
        Rename(Path, Path, RenameFlags),
    }

    /// The namespace as a map from path to kind: the simplest model there is.
    #[derive(Default)]
    struct Model {
        paths: BTreeMap<Path, FileKind>,
    }

    impl Model {
        fn kind(&self, p: &Path) -> Option<FileKind> {
            if p.is_empty() {
                Some(FileKind::Dir)
            } else {
                self.paths.get(p).copied()
            }
        }
        fn children(&self, p: &Path) -> usize {
            self.paths
                .keys()
                .filter(|k| k.len() == p.len() + 1 && k.starts_with(p))
                .count()
        }
        fn move_tree(&mut self, from: &Path, to: &Path) {
            let moved: Vec<(Path, FileKind)> = self
                .paths
                .iter()
                .filter(|(k, _)| k.starts_with(from))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            for (k, _) in &moved {
                self.paths.remove(k);
            }
            for (k, v) in moved {
                let mut n = to.clone();
                n.extend_from_slice(&k[from.len()..]);
                self.paths.insert(n, v);
            }
        }
        fn remove_tree(&mut self, p: &Path) {
            self.paths.retain(|k, _| !k.starts_with(p));
        }
        /// Same rules, same order of checks, as `Applier::rename`.
        fn rename(&mut self, src: &Path, dst: &Path, flags: RenameFlags) -> Result<(), ErrorCode> {
            if flags.noreplace && flags.exchange {
                return Err(ErrorCode::InvalidArgument);
            }
            let sk = self.kind(src).ok_or(ErrorCode::NotFound)?;
            if src == dst {
                return if flags.noreplace {
                    Err(ErrorCode::Exists)
                } else {
                    Ok(())
                };
            }
            let dst_parent = dst[..dst.len() - 1].to_vec();
            if sk == FileKind::Dir && dst_parent.starts_with(src) {
                return Err(ErrorCode::InvalidArgument);
            }
            let dk = self.kind(dst);
            if flags.exchange {
                let dk = dk.ok_or(ErrorCode::NotFound)?;
                let src_parent = src[..src.len() - 1].to_vec();
                if dk == FileKind::Dir && src_parent.starts_with(dst) {
                    return Err(ErrorCode::InvalidArgument);
                }
                let tmp = vec!["\u{0}tmp"];
                self.move_tree(src, &tmp);
                self.move_tree(dst, src);
                self.move_tree(&tmp, dst);
                return Ok(());
            }
            if let Some(dk) = dk {
                if flags.noreplace {
                    return Err(ErrorCode::Exists);
                }
                match (sk == FileKind::Dir, dk == FileKind::Dir) {
                    (true, false) => return Err(ErrorCode::NotDir),
                    (false, true) => return Err(ErrorCode::IsDir),
                    (true, true) if self.children(dst) > 0 => return Err(ErrorCode::NotEmpty),
                    _ => {}
                }
                self.remove_tree(dst);
            }
            self.move_tree(src, dst);
            Ok(())
        }
    }

    /// A session's lease is clamped to the group's bounds, whatever the client asks.
    #[test]
    fn session_leases_are_clamped() {
        for (ask, got) in [
            (0, brickfs_proto::meta::LEASE_MIN_MS),
            (5_000, 5_000),
            (u64::MAX, brickfs_proto::meta::LEASE_MAX_MS),
        ] {
            let base = BTreeMap::new();
            let mut overlay = Overlay::new(&base);
            let cmd = Command {
                session: SessionId(0),
                seq: 1,
                acked_below: 1,
                now_ns: 7_000_000,
                op: MetaOp::OpenSession {
                    client: "t".into(),
                    lease_ms: ask,
                },
            };
            match apply_command(&mut overlay, &cmd).unwrap() {
                MetaReply::Session(info) => {
                    assert_eq!(info.lease_expires_ms, 7 + got, "asked {ask}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    struct Sm {
        base: BTreeMap<Vec<u8>, Vec<u8>>,
        seq: u64,
        volume: VolumeId,
    }

    impl Sm {
        fn new() -> Sm {
            let mut sm = Sm {
                base: BTreeMap::new(),
                seq: 0,
                volume: VolumeId(0),
            };
            sm.apply(
                SessionId(0),
                MetaOp::OpenSession {
                    client: "t".into(),
                    lease_ms: 1000,
                },
            )
            .unwrap();
            sm.register(1, 3);
            let create = MetaOp::CreateVolume {
                name: "v".into(),
                spec: vec!["h1:/b0".into()],
            };
            match sm.apply(SessionId(1), create).unwrap() {
                MetaReply::Volume(v) => sm.volume = v.id,
                other => panic!("{other:?}"),
            }
            sm
        }
        /// Registers node `hN` with bricks `/b0`, `/b1`, ... (ids N*100 + i).
        fn register(&mut self, node: u64, bricks: u64) {
            use brickfs_proto::{BrickId, NodeId};
            let rec = NodeRecord {
                id: NodeId(node),
                addr: format!("h{node}"),
                last_heartbeat_ms: 0,
            };
            self.apply(SessionId(0), MetaOp::RegisterNode { node: rec })
                .unwrap();
            for i in 0..bricks {
                let brick = BrickRecord {
                    id: BrickId(node * 100 + i),
                    node: NodeId(node),
                    path: format!("/b{i}"),
                    capacity_bytes: 1 << 30,
                };
                self.apply(SessionId(0), MetaOp::RegisterBrick { brick })
                    .unwrap();
            }
        }

        fn apply(&mut self, session: SessionId, op: MetaOp) -> CommandResult {
            self.seq += 1;
            let cmd = Command {
                session,
                seq: self.seq,
                acked_below: self.seq,
                now_ns: self.seq as i64,
                op,
            };
            self.apply_command(cmd)
        }
        fn apply_command(&mut self, cmd: Command) -> CommandResult {
            let mut overlay = Overlay::new(&self.base);
            let r = apply_command(&mut overlay, &cmd);
            for (k, v) in overlay.into_changes() {
                match v {
                    Some(v) => self.base.insert(k, v),
                    None => self.base.remove(&k),
                };
            }
            r
        }
        /// Resolves a path to an inode, as a client would with lookups.
        fn resolve(&self, p: &[&str]) -> Option<Ino> {
            let mut ino = ROOT_INO;
            for name in p {
                match read(
                    &self.base,
                    &MetaRead::Lookup {
                        volume: self.volume,
                        parent: ino,
                        name: name.to_string(),
                    },
                ) {
                    Ok(MetaReply::Attr(a)) => ino = a.ino,
                    _ => return None,
                }
            }
            Some(ino)
        }
        /// Walks the tree, checking each directory's link count on the way.
        fn walk(&self, dir: Ino, at: &Path, out: &mut BTreeMap<Path, FileKind>) {
            let Ok(MetaReply::Entries { entries, .. }) = read(
                &self.base,
                &MetaRead::ReadDir {
                    volume: self.volume,
                    ino: dir,
                    after: None,
                    limit: 1000,
                },
            ) else {
                panic!("readdir failed")
            };
            let Ok(MetaReply::Attr(attr)) = read(
                &self.base,
                &MetaRead::GetAttr {
                    volume: self.volume,
                    ino: dir,
                },
            ) else {
                panic!("getattr failed")
            };
            let subdirs = entries.iter().filter(|e| e.kind == FileKind::Dir).count() as u32;
            assert_eq!(attr.nlink, 2 + subdirs, "nlink of {at:?}");
            for e in entries {
                let name: &'static str = Box::leak(e.name.clone().into_boxed_str());
                let mut p = at.clone();
                p.push(name);
                out.insert(p.clone(), e.kind);
                if e.kind == FileKind::Dir {
                    self.walk(e.ino, &p, out);
                }
            }
        }
    }

    fn path() -> impl Strategy<Value = Path> {
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        let flags = prop_oneof![
            3 => Just(RenameFlags::default()),
            1 => Just(RenameFlags { noreplace: true, exchange: false }),
            1 => Just(RenameFlags { noreplace: false, exchange: true }),
        ];
        prop_oneof![
            3 => path().prop_map(Op::Mkdir),
            3 => path().prop_map(Op::Create),
            1 => path().prop_map(Op::Unlink),
            1 => path().prop_map(Op::Rmdir),
            4 => (path(), path(), flags).prop_map(|(a, b, f)| Op::Rename(a, b, f)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// mkdir, create, unlink, rmdir and rename (plain, noreplace, exchange) on the state
        /// machine give the same answers and the same tree as the path model, and directory
        /// link counts always equal 2 + subdirectories.
        #[test]
        fn namespace_matches_the_path_model(ops in proptest::collection::vec(op(), 1..40)) {
            let mut sm = Sm::new();
            let mut model = Model::default();
            let v = sm.volume;
            let s = SessionId(1);
            for op in ops {
                let parent_of = |p: &Path| p[..p.len() - 1].to_vec();
                let last = |p: &Path| p[p.len() - 1].to_string();
                // Only ops whose parents exist as directories in the model reach the state
                // machine by inode; the others are what a client's path walk would refuse.
                let dirs_ok = |m: &Model, ps: &[&Path]| ps.iter().all(|p| m.kind(&parent_of(p)) == Some(FileKind::Dir));
                let (got, want): (Result<(), ErrorCode>, Result<(), ErrorCode>) = match &op {
                    Op::Mkdir(p) | Op::Create(p) => {
                        if !dirs_ok(&model, &[p]) { continue; }
                        let parent = sm.resolve(&parent_of(p)).unwrap();
                        let kind = if matches!(op, Op::Mkdir(_)) { FileKind::Dir } else { FileKind::File };
                        let cmd = if kind == FileKind::Dir {
                            MetaOp::Mkdir { volume: v, parent, name: last(p), mode: 0o755, umask: 0, uid: 0, gid: 0 }
                        } else {
                            MetaOp::Create { volume: v, parent, name: last(p), kind, mode: 0o644, umask: 0, uid: 0, gid: 0, rdev: 0, exclusive: true }
                        };
                        let want = if model.kind(p).is_some() { Err(ErrorCode::Exists) } else { model.paths.insert(p.clone(), kind); Ok(()) };
                        (sm.apply(s, cmd).map(|_| ()).map_err(|e| e.kind().unwrap()), want)
                    }
                    Op::Unlink(p) | Op::Rmdir(p) => {
                        if !dirs_ok(&model, &[p]) { continue; }
                        let parent = sm.resolve(&parent_of(p)).unwrap();
                        let rmdir = matches!(op, Op::Rmdir(_));
                        let want = match (model.kind(p), rmdir) {
                            (None, _) => Err(ErrorCode::NotFound),
                            (Some(FileKind::Dir), false) => Err(ErrorCode::IsDir),
                            (Some(k), true) if k != FileKind::Dir => Err(ErrorCode::NotDir),
                            (Some(_), true) if model.children(p) > 0 => Err(ErrorCode::NotEmpty),
                            _ => { model.remove_tree(p); Ok(()) }
                        };
                        let cmd = if rmdir {
                            MetaOp::Rmdir { volume: v, parent, name: last(p) }
                        } else {
                            MetaOp::Unlink { volume: v, parent, name: last(p) }
                        };
                        (sm.apply(s, cmd).map(|_| ()).map_err(|e| e.kind().unwrap()), want)
                    }
                    Op::Rename(a, b, flags) => {
                        if !dirs_ok(&model, &[a, b]) { continue; }
                        let (pa, pb) = (sm.resolve(&parent_of(a)).unwrap(), sm.resolve(&parent_of(b)).unwrap());
                        let want = model.rename(a, b, *flags);
                        let cmd = MetaOp::Rename { volume: v, parent: pa, name: last(a), new_parent: pb, new_name: last(b), flags: *flags };
                        (sm.apply(s, cmd).map(|_| ()).map_err(|e| e.kind().unwrap()), want)
                    }
                };
                prop_assert_eq!(got, want, "op {:?}", op);
                let mut tree = BTreeMap::new();
                sm.walk(ROOT_INO, &Vec::new(), &mut tree);
                prop_assert_eq!(&tree, &model.paths, "after {:?}", op);
            }
        }
    }

    /// A client's commands go only into sessions its own credential opened: in another
    /// credential's session, or one opened without a credential, they are refused, and an
    /// answer the session kept for a retry is not handed to them.
    #[test]
    fn client_sessions_are_bound_to_the_credential_that_opened_them() {
        let mut sm = Sm::new();
        let v = sm.volume;
        let as_client = |credential: u64, op: MetaOp| MetaOp::AsClient {
            volume: v,
            credential,
            op: Box::new(op),
        };
        let opening = || MetaOp::OpenSession {
            client: "m".into(),
            lease_ms: 30_000,
        };
        let open = |sm: &mut Sm, op| match sm.apply(SessionId(0), op) {
            Ok(MetaReply::Session(info)) => info.id,
            other => panic!("{other:?}"),
        };
        let mkdir = |name: &str| MetaOp::Mkdir {
            volume: v,
            parent: ROOT_INO,
            name: name.into(),
            mode: 0o755,
            umask: 0,
            uid: 0,
            gid: 0,
        };
        let denied = |r: CommandResult| match r {
            Err(e) if e.is(ErrorCode::PermissionDenied) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let first = open(&mut sm, as_client(1, opening()));
        let second = open(&mut sm, as_client(2, opening()));
        let plain = open(&mut sm, opening());
        sm.apply(first, as_client(1, mkdir("a"))).unwrap();
        sm.apply(first, as_client(1, MetaOp::KeepAlive)).unwrap();
        let why = denied(sm.apply(first, as_client(2, MetaOp::KeepAlive)));
        assert!(
            why.contains("not opened with this client credential"),
            "{why}"
        );
        denied(sm.apply(first, as_client(2, MetaOp::CloseSession)));
        denied(sm.apply(plain, as_client(1, mkdir("b"))));
        assert_eq!(sm.resolve(&["b"]), None, "nothing applied");
        // A kept answer (request 1000 of `second`) is not given to another credential.
        let at = |op| Command {
            session: second,
            seq: 1000,
            acked_below: 0,
            now_ns: 1,
            op,
        };
        sm.apply_command(at(as_client(2, mkdir("c")))).unwrap();
        denied(sm.apply_command(at(as_client(1, mkdir("c")))));
        // Nodes and administrators (no wrapper) reach any session; a closed session's
        // binding goes with it.
        sm.apply(first, MetaOp::KeepAlive).unwrap();
        sm.apply(first, as_client(1, MetaOp::CloseSession)).unwrap();
        assert_eq!(sm.base.get(&keys::session_owner(first)), None);
        assert!(sm.apply(second, as_client(2, MetaOp::KeepAlive)).is_ok());
        // Only an OpenSession goes without a session, and no wrapper nests.
        assert!(sm.apply(SessionId(0), as_client(1, mkdir("d"))).is_err());
        let nested = as_client(1, as_client(1, MetaOp::KeepAlive));
        assert!(sm.apply(second, nested).is_err());

        // A credential holds at most SESSIONS_PER_CREDENTIAL_MAX sessions; an ended one
        // frees its place; other credentials are not held to its count.
        let held: Vec<SessionId> = (1..SESSIONS_PER_CREDENTIAL_MAX)
            .map(|_| open(&mut sm, as_client(2, opening())))
            .collect();
        let over = sm.apply(SessionId(0), as_client(2, opening())).unwrap_err();
        assert!(over.is(ErrorCode::Busy), "{over}");
        assert!(over.to_string().contains("holds 8192 sessions"), "{over}");
        open(&mut sm, as_client(3, opening()));
        sm.apply(held[0], as_client(2, MetaOp::CloseSession))
            .unwrap();
        open(&mut sm, as_client(2, opening()));
        assert!(sm.apply(SessionId(0), as_client(2, opening())).is_err());
    }

    /// A file holds at most LOCKS_PER_FILE_MAX byte-range locks: one more is ENOLCK and
    /// changes nothing; unlocks (even those that split a lock) and locks that merge pass.
    #[test]
    fn a_file_holds_a_bounded_number_of_locks() {
        use brickfs_proto::meta::{LockKind, LockSpec};
        let mut sm = Sm::new();
        let v = sm.volume;
        let s = SessionId(1);
        let Ok(MetaReply::Attr(f)) =
            sm.apply(s, MetaOp::create_file(v, ROOT_INO, "f", 0o644, true))
        else {
            panic!("create")
        };
        let lock = |start: u64, end: u64, kind| MetaOp::SetLock {
            volume: v,
            ino: f.ino,
            lock: LockSpec {
                owner: 1,
                pid: 1,
                start,
                end,
                kind,
            },
        };
        let max = LOCKS_PER_FILE_MAX as u64;
        for i in 0..max {
            sm.apply(s, lock(i * 4, i * 4 + 1, LockKind::Write))
                .unwrap();
        }
        let over = sm
            .apply(s, lock(max * 4, max * 4 + 1, LockKind::Write))
            .unwrap_err();
        assert!(over.is(ErrorCode::TooManyLocks), "{over}");
        // Merging into a neighbour adds none; an unlock that splits one still passes.
        sm.apply(s, lock(1, 2, LockKind::Write)).unwrap();
        sm.apply(s, lock(4 * 7, 4 * 7 + 1, LockKind::Unlock))
            .unwrap();
        sm.apply(s, lock(0, max * 4, LockKind::Unlock)).unwrap();
        sm.apply(s, lock(max * 4, max * 4 + 1, LockKind::Write))
            .unwrap();
    }

    /// A rotation lists the new credential alone and says which it revoked, in one command.
    #[test]
    fn a_rotation_replaces_every_credential_at_once() {
        use brickfs_proto::meta::ClientCredential;
        let mut sm = Sm::new();
        let s = SessionId(1);
        let cred = |id| ClientCredential {
            id,
            created_ms: 0,
            label: "l".into(),
        };
        for id in [7, 8] {
            sm.apply(
                s,
                MetaOp::AddCredential {
                    name: "v".into(),
                    credential: cred(id),
                },
            )
            .unwrap();
        }
        let rotate = |sm: &mut Sm, credential| {
            sm.apply(
                s,
                MetaOp::RotateCredential {
                    name: "v".into(),
                    credential,
                },
            )
        };
        match rotate(&mut sm, cred(9)).unwrap() {
            MetaReply::Rotated { volume, revoked } => {
                assert_eq!(revoked, vec![7, 8]);
                assert_eq!(volume.credentials, vec![cred(9)]);
            }
            other => panic!("{other:?}"),
        }
        let long = ClientCredential {
            label: "x".repeat(257),
            ..cred(10)
        };
        assert!(rotate(&mut sm, long).is_err());
        let bell = ClientCredential {
            label: "ring\u{7}\n\u{1b}[31m".into(),
            ..cred(11)
        };
        assert!(
            rotate(&mut sm, bell).is_err(),
            "control characters in a label"
        );
        for good in ["pvc-1", "a.b_c", "V9"] {
            assert!(check_volume_name(good).is_ok(), "{good}");
        }
        for bad in [
            "a b",
            "-rf",
            "a:b",
            "név",
            ".hidden",
            "",
            "a/b",
            &"x".repeat(129),
        ] {
            assert!(check_volume_name(bad).is_err(), "{bad:?}");
        }
        let spaced = MetaOp::CreateVolume {
            name: "a b".into(),
            spec: vec!["h1:/b1".into()],
        };
        assert_eq!(
            sm.apply(s, spaced).unwrap_err().kind(),
            Some(ErrorCode::InvalidArgument)
        );
        let MetaReply::Volume(v) =
            read(&sm.base, &MetaRead::VolumeByName { name: "v".into() }).unwrap()
        else {
            panic!("a volume")
        };
        assert_eq!(
            v.credentials,
            vec![cred(9)],
            "a refused rotation changes nothing"
        );
        let long_name = MetaOp::OpenSession {
            client: "c".repeat(CLIENT_NAME_MAX_BYTES + 1),
            lease_ms: 1000,
        };
        assert!(sm.apply(SessionId(0), long_name).is_err());
    }

    /// With more volume records than one frame holds, `ListVolumes` cannot be sent, and
    /// `VolumesPage` lists every volume once, in id order, each page within its byte bound.
    #[test]
    fn volume_pages_fit_a_frame_and_list_each_volume_once() {
        use brickfs_proto::Message;
        use brickfs_proto::meta::{ClientCredential, VOLUME_PAGE_BYTES};
        let mut sm = Sm::new();
        sm.register(2, 64);
        let s = SessionId(1);
        for i in 0..64 {
            let name = format!("v{i}");
            let spec = vec![format!("h2:/b{i}")];
            sm.apply(
                s,
                MetaOp::CreateVolume {
                    name: name.clone(),
                    spec,
                },
            )
            .unwrap();
            for c in 0..64 {
                let credential = ClientCredential {
                    id: 1000 + c,
                    created_ms: 0,
                    label: "x".repeat(256),
                };
                sm.apply(
                    s,
                    MetaOp::AddCredential {
                        name: name.clone(),
                        credential,
                    },
                )
                .unwrap();
            }
        }
        let MetaReply::Volumes(all) = read(&sm.base, &MetaRead::ListVolumes).unwrap() else {
            panic!("ListVolumes answers volumes")
        };
        assert_eq!(all.len(), 65, "these and the test machine's own");
        let frame_max = brickfs_proto::frame::Limits::default().body_max_bytes as usize;
        let whole = Message::MetaOk(MetaReply::Volumes(all.clone()))
            .encode_body()
            .len();
        assert!(
            whole > frame_max,
            "{whole} bytes: the test needs more than a frame"
        );
        let page = |after, limit| match read(&sm.base, &MetaRead::VolumesPage { after, limit }) {
            Ok(MetaReply::VolumePage { volumes, next }) => (volumes, next),
            other => panic!("{other:?}"),
        };
        let (mut got, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (volumes, next) = page(after, 1000);
            let body = Message::MetaOk(MetaReply::VolumePage {
                volumes: volumes.clone(),
                next,
            })
            .encode_body()
            .len();
            assert!(
                body <= VOLUME_PAGE_BYTES + (32 << 10),
                "a page of {body} bytes"
            );
            assert!(!volumes.is_empty(), "every page holds a volume");
            pages += 1;
            assert!(pages <= 65, "paging does not end");
            got.extend(volumes);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert!(pages >= 4, "{pages} pages for {whole} bytes");
        assert_eq!(got, all, "every volume once, in id order");
        // The count limit holds too, and the next page starts after the last one given.
        let (five, next) = page(None, 5);
        assert_eq!(five, all[..5]);
        assert_eq!(next, Some(all[4].id));
        let (last, next) = page(Some(all[63].id), 5);
        assert_eq!((last, next), (all[64..].to_vec(), None));
    }

    /// Volumes: a spec resolves to registered bricks and forms sets with epoch 1, the first
    /// member as primary and every member in sync; bricks serve one volume; start, stop,
    /// options and delete follow their rules.
    #[test]
    fn volumes_form_sets_and_follow_their_rules() {
        let mut sm = Sm::new();
        sm.register(2, 3);
        sm.register(3, 3);
        let s = SessionId(1);
        let spec = |words: &str| {
            words
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let create = |sm: &mut Sm, name: &str, words: &str| {
            sm.apply(
                s,
                MetaOp::CreateVolume {
                    name: name.into(),
                    spec: spec(words),
                },
            )
        };
        let v = match create(
            &mut sm,
            "r",
            "stripe 2 replica 2 h2:/b0 h3:/b0 h2:/b1 h3:/b1",
        )
        .unwrap()
        {
            MetaReply::Volume(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(v.type_name, "striped-replicated");
        assert_eq!(v.sets.len(), 2);
        assert_eq!(
            v.sets[1].members,
            vec![brickfs_proto::BrickId(201), brickfs_proto::BrickId(301)]
        );
        assert_eq!(
            (v.sets[1].epoch, v.sets[1].primary),
            (Epoch(1), brickfs_proto::BrickId(201))
        );
        assert_eq!(v.sets[1].in_sync, v.sets[1].members);
        let code = |r: CommandResult| r.unwrap_err().kind();
        assert_eq!(
            code(create(&mut sm, "x", "h2:/b0")),
            Some(ErrorCode::Exists),
            "brick reuse"
        );
        assert_eq!(
            code(create(&mut sm, "x", "h9:/b0")),
            Some(ErrorCode::NotFound),
            "unknown node"
        );
        assert_eq!(
            code(create(&mut sm, "x", "h2:/b7")),
            Some(ErrorCode::NotFound),
            "unknown brick"
        );
        assert_eq!(
            code(create(&mut sm, "x", "replica 3 h2:/b2 h3:/b2")),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(create(&mut sm, "r", "h2:/b2")),
            Some(ErrorCode::Exists),
            "name reuse"
        );
        let d = match create(&mut sm, "d", "disperse 3 h1:/b1 h2:/b2 h3:/b2").unwrap() {
            MetaReply::Volume(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (d.type_name.as_str(), d.disperse_data, d.disperse_redundancy),
            ("dispersed", 2, 1)
        );

        let set = |sm: &mut Sm, key: &str, value: &str| {
            sm.apply(
                s,
                MetaOp::SetVolumeOption {
                    name: "r".into(),
                    key: key.into(),
                    value: value.into(),
                },
            )
        };
        set(&mut sm, "stripe-unit", "256KiB").unwrap();
        assert_eq!(
            code(set(&mut sm, "stripe-unit", "100000")),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(set(&mut sm, "quorum", "3")),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(set(&mut sm, "colour", "blue")),
            Some(ErrorCode::InvalidArgument)
        );
        match set(&mut sm, "allow-networks", "127.0.0.0/8, ::1").unwrap() {
            MetaReply::Volume(v) => assert!(
                v.options
                    .contains(&("allow-networks".into(), "127.0.0.0/8,::1/128".into()))
            ),
            other => panic!("{other:?}"),
        }
        sm.apply(s, MetaOp::StartVolume { name: "r".into() })
            .unwrap();
        assert_eq!(
            code(sm.apply(s, MetaOp::DeleteVolume { name: "r".into() })),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(
            code(sm.apply(
                s,
                MetaOp::RemoveNode {
                    node: brickfs_proto::NodeId(2)
                }
            )),
            Some(ErrorCode::InvalidArgument)
        );
        sm.apply(s, MetaOp::StopVolume { name: "r".into() })
            .unwrap();
        sm.apply(s, MetaOp::DeleteVolume { name: "r".into() })
            .unwrap();
        // The name is free at once; the bricks only once their objects are gone.
        let volumes = |sm: &Sm| match read(&sm.base, &MetaRead::ListVolumes).unwrap() {
            MetaReply::Volumes(v) => v,
            other => panic!("{other:?}"),
        };
        let gone = volumes(&sm)
            .into_iter()
            .find(|v| v.name == "r")
            .expect("the deleted volume's record stays");
        assert_eq!(gone.status, VolumeStatus::Deleting);
        assert_eq!(
            code(sm.apply(s, MetaOp::StopVolume { name: "r".into() })),
            Some(ErrorCode::NotFound),
            "the name is gone"
        );
        let refused = create(&mut sm, "r2", "h2:/b0").unwrap_err();
        assert_eq!(refused.kind(), Some(ErrorCode::Exists));
        assert!(refused.to_string().contains("deleted volume"), "{refused}");
        assert_eq!(
            code(sm.apply(s, MetaOp::VolumePurged { volume: sm.volume })),
            Some(ErrorCode::InvalidArgument),
            "a live volume is not purged"
        );
        sm.apply(s, MetaOp::VolumePurged { volume: gone.id })
            .unwrap();
        assert!(volumes(&sm).iter().all(|v| v.id != gone.id));
        // Its bricks are free again.
        create(&mut sm, "r2", "h2:/b0").unwrap();
    }

    fn gc_item(ino: Ino, size_bytes: u64) -> GcItem {
        GcItem {
            ino,
            size_bytes,
            group: 0,
            moved_from: Vec::new(),
        }
    }

    /// A file unlinked while open stays (link count 0, found by inode only, not queued for
    /// GC) until its session drops it or ends.
    #[test]
    fn orphans_live_until_dropped_or_their_session_ends() {
        let mut sm = Sm::new();
        let (v, s) = (sm.volume, SessionId(1));
        let mut inos = Vec::new();
        for name in ["f", "g"] {
            let op = MetaOp::create_file(v, ROOT_INO, name, 0o644, true);
            let MetaReply::Attr(a) = sm.apply(s, op).unwrap() else {
                panic!("create")
            };
            sm.apply(
                s,
                MetaOp::UnlinkOpen {
                    volume: v,
                    parent: ROOT_INO,
                    name: name.into(),
                },
            )
            .unwrap();
            inos.push(a.ino);
        }
        let getattr = |sm: &Sm, ino| read(&sm.base, &MetaRead::GetAttr { volume: v, ino });
        let gc = |sm: &Sm| {
            read(
                &sm.base,
                &MetaRead::ListGc {
                    volume: v,
                    limit: 10,
                },
            )
            .unwrap()
        };
        let MetaReply::Attr(a) = getattr(&sm, inos[0]).unwrap() else {
            panic!("getattr")
        };
        assert_eq!(a.nlink, 0);
        let lookup = MetaRead::Lookup {
            volume: v,
            parent: ROOT_INO,
            name: "f".into(),
        };
        assert_eq!(
            read(&sm.base, &lookup).unwrap_err().kind(),
            Some(ErrorCode::NotFound)
        );
        assert_eq!(gc(&sm), MetaReply::Gc(vec![]));

        sm.apply(
            s,
            MetaOp::DropOrphan {
                volume: v,
                ino: inos[0],
            },
        )
        .unwrap();
        assert!(getattr(&sm, inos[0]).is_err());
        assert_eq!(gc(&sm), MetaReply::Gc(vec![gc_item(inos[0], 0)]));
        assert!(getattr(&sm, inos[1]).is_ok());
        sm.apply(s, MetaOp::CloseSession).unwrap();
        assert!(
            getattr(&sm, inos[1]).is_err(),
            "the session's end dropped its orphan"
        );
        assert_eq!(
            gc(&sm),
            MetaReply::Gc(vec![gc_item(inos[0], 0), gc_item(inos[1], 0)])
        );
    }

    /// Deleting the last link of a file queues it for the data path, with its size; a
    /// directory or a file with links left is not queued; GcDone drops the entry.
    #[test]
    fn last_unlink_queues_the_file_for_gc() {
        let mut sm = Sm::new();
        let (v, s) = (sm.volume, SessionId(1));
        let create = |name: &str| MetaOp::create_file(v, ROOT_INO, name, 0o644, true);
        let f = match sm.apply(s, create("f")).unwrap() {
            MetaReply::Attr(a) => a,
            o => panic!("{o:?}"),
        };
        sm.apply(
            s,
            MetaOp::SetAttr {
                volume: v,
                ino: f.ino,
                set: SetAttr {
                    size_bytes: Some(4096),
                    ..Default::default()
                },
            },
        )
        .unwrap();
        sm.apply(
            s,
            MetaOp::Link {
                volume: v,
                ino: f.ino,
                new_parent: ROOT_INO,
                new_name: "g".into(),
            },
        )
        .unwrap();
        sm.apply(
            s,
            MetaOp::Unlink {
                volume: v,
                parent: ROOT_INO,
                name: "f".into(),
            },
        )
        .unwrap();
        let gc = |sm: &Sm| {
            read(
                &sm.base,
                &MetaRead::ListGc {
                    volume: v,
                    limit: 10,
                },
            )
            .unwrap()
        };
        assert_eq!(gc(&sm), MetaReply::Gc(vec![]));
        sm.apply(
            s,
            MetaOp::Unlink {
                volume: v,
                parent: ROOT_INO,
                name: "g".into(),
            },
        )
        .unwrap();
        assert_eq!(gc(&sm), MetaReply::Gc(vec![gc_item(f.ino, 4096)]));
        sm.apply(
            s,
            MetaOp::Mkdir {
                volume: v,
                parent: ROOT_INO,
                name: "d".into(),
                mode: 0o755,
                umask: 0,
                uid: 0,
                gid: 0,
            },
        )
        .unwrap();
        sm.apply(
            s,
            MetaOp::Rmdir {
                volume: v,
                parent: ROOT_INO,
                name: "d".into(),
            },
        )
        .unwrap();
        sm.apply(
            s,
            MetaOp::GcDone {
                volume: v,
                ino: f.ino,
            },
        )
        .unwrap();
        assert_eq!(gc(&sm), MetaReply::Gc(vec![]));
    }

    /// GcDoneMany drops every file it names from the queue and no other; too many at once is
    /// refused whole.
    #[test]
    fn gc_done_many_drops_the_files_it_names() {
        let mut sm = Sm::new();
        let (v, s) = (sm.volume, SessionId(1));
        let mut inos = Vec::new();
        for name in ["a", "b", "c"] {
            match sm
                .apply(s, MetaOp::create_file(v, ROOT_INO, name, 0o644, true))
                .unwrap()
            {
                MetaReply::Attr(a) => inos.push(a.ino),
                o => panic!("{o:?}"),
            }
            sm.apply(
                s,
                MetaOp::Unlink {
                    volume: v,
                    parent: ROOT_INO,
                    name: name.into(),
                },
            )
            .unwrap();
        }
        let queued = |sm: &Sm| match read(
            &sm.base,
            &MetaRead::ListGc {
                volume: v,
                limit: 10,
            },
        )
        .unwrap()
        {
            MetaReply::Gc(items) => items.iter().map(|i| i.ino).collect::<Vec<_>>(),
            o => panic!("{o:?}"),
        };
        assert_eq!(queued(&sm).len(), 3);
        let too_many = vec![inos[0]; brickfs_proto::meta::GC_DONE_MAX + 1];
        assert!(
            sm.apply(
                s,
                MetaOp::GcDoneMany {
                    volume: v,
                    inos: too_many
                }
            )
            .is_err()
        );
        assert_eq!(queued(&sm).len(), 3);
        sm.apply(
            s,
            MetaOp::GcDoneMany {
                volume: v,
                inos: inos[..2].to_vec(),
            },
        )
        .unwrap();
        assert_eq!(queued(&sm), vec![inos[2]]);
    }

    /// A session's stored answers are forgotten once the client confirms it has them, however
    /// its confirmations lag or jump: a long session keeps only the answers it may still
    /// retry, so its keys (and the scans over them) do not grow with its age.
    #[test]
    fn confirmed_answers_are_forgotten() {
        let mut sm = Sm::new();
        let v = sm.volume;
        let replies = |sm: &Sm| {
            let prefix = keys::reply_prefix(SessionId(1));
            sm.base
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .map(|k| u64::from_be_bytes(k[9..17].try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        // Sequences continue after the set-up's; the client confirms with a lag that varies
        // between 0 and 6, and sometimes not at all for a while.
        let first = sm.seq + 1;
        let mut acked = first;
        for (i, seq) in (first..first + 3000).enumerate() {
            if i % 7 != 3 {
                acked = acked.max(seq.saturating_sub((i % 7) as u64));
            }
            let cmd = Command {
                session: SessionId(1),
                seq,
                acked_below: acked,
                now_ns: seq as i64,
                op: MetaOp::create_file(v, ROOT_INO, &format!("f{i}"), 0o644, true),
            };
            let mut overlay = Overlay::new(&sm.base);
            apply_command(&mut overlay, &cmd).unwrap();
            for (k, val) in overlay.into_changes() {
                match val {
                    Some(val) => sm.base.insert(k, val),
                    None => sm.base.remove(&k),
                };
            }
            let kept = replies(&sm);
            assert_eq!(
                kept,
                (acked..=seq).collect::<Vec<_>>(),
                "after request {seq} (confirmed below {acked})"
            );
        }
    }

    /// A retried (session, sequence) answers its first result without applying twice; a
    /// request for an unknown session is refused.
    #[test]
    fn retries_are_answered_once() {
        let mut sm = Sm::new();
        let v = sm.volume;
        let op = MetaOp::create_file(v, ROOT_INO, "f", 0o644, true);
        let cmd = Command {
            session: SessionId(1),
            seq: 100,
            acked_below: 100,
            now_ns: 5,
            op: op.clone(),
        };
        let run = |sm: &mut Sm, cmd: &Command| {
            let mut overlay = Overlay::new(&sm.base);
            let r = apply_command(&mut overlay, cmd);
            for (k, val) in overlay.into_changes() {
                match val {
                    Some(val) => sm.base.insert(k, val),
                    None => sm.base.remove(&k),
                };
            }
            r
        };
        let first = run(&mut sm, &cmd).unwrap();
        assert_eq!(run(&mut sm, &cmd).unwrap(), first);
        let again = Command {
            seq: 101,
            acked_below: 101,
            ..cmd.clone()
        };
        assert_eq!(
            run(&mut sm, &again).unwrap_err().kind(),
            Some(ErrorCode::Exists)
        );
        let stale = Command {
            seq: 50,
            ..cmd.clone()
        };
        assert_eq!(
            run(&mut sm, &stale).unwrap_err().kind(),
            Some(ErrorCode::StaleRequest)
        );
        let stranger = Command {
            session: SessionId(77),
            ..cmd
        };
        assert_eq!(
            run(&mut sm, &stranger).unwrap_err().kind(),
            Some(ErrorCode::SessionExpired)
        );
    }

    /// Growing a volume by whole groups, draining one (new files avoid it, files move off it
    /// through BeginMove/FinishMove), refusing to commit while a file lives there, then
    /// committing: the group's sets keep their numbers without members, the brick is free.
    #[test]
    fn volumes_grow_drain_and_shrink() {
        use brickfs_proto::meta::{FileMove, RebalanceProgress, RebalanceState};
        let mut sm = Sm::new();
        sm.register(2, 3);
        let (v, s) = (sm.volume, SessionId(1));
        let code = |r: CommandResult| r.unwrap_err().kind();
        let vol = |sm: &Sm| match read(&sm.base, &MetaRead::VolumeByName { name: "v".into() }) {
            Ok(MetaReply::Volume(v)) => v,
            other => panic!("{other:?}"),
        };
        let add = |sm: &mut Sm, bricks: &[&str]| {
            sm.apply(
                s,
                MetaOp::AddBricks {
                    name: "v".into(),
                    bricks: bricks.iter().map(|b| b.to_string()).collect(),
                },
            )
        };
        add(&mut sm, &["h2:/b0"]).unwrap();
        assert_eq!(code(add(&mut sm, &["h2:/b0"])), Some(ErrorCode::Exists));
        assert_eq!(code(add(&mut sm, &["h9:/b0"])), Some(ErrorCode::NotFound));
        assert_eq!(
            code(add(&mut sm, &["h2:/b1", "h2:/b1"])),
            Some(ErrorCode::InvalidArgument)
        );
        assert_eq!(vol(&sm).groups(), 2);
        let mut files = Vec::new();
        for i in 0..40 {
            let op = MetaOp::create_file(v, ROOT_INO, &format!("f{i}"), 0o644, true);
            match sm.apply(s, op).unwrap() {
                MetaReply::Attr(a) => files.push(a),
                o => panic!("{o:?}"),
            }
        }
        assert!(files.iter().any(|f| f.group == 0) && files.iter().any(|f| f.group == 1));
        let start = MetaOp::RemoveBricksStart {
            name: "v".into(),
            bricks: vec!["h1:/b0".into()],
        };
        assert_eq!(
            code(sm.apply(s, start.clone())),
            Some(ErrorCode::InvalidArgument),
            "not started"
        );
        sm.apply(s, MetaOp::StartVolume { name: "v".into() })
            .unwrap();
        sm.apply(s, start).unwrap();
        let r = vol(&sm).rebalance.unwrap();
        assert!(r.drain_only && r.state == RebalanceState::Running && r.run == 1);
        for i in 0..20 {
            let op = MetaOp::create_file(v, ROOT_INO, &format!("new{i}"), 0o644, true);
            match sm.apply(s, op).unwrap() {
                MetaReply::Attr(a) => assert_eq!(a.group, 1, "a draining group takes no file"),
                o => panic!("{o:?}"),
            }
        }
        let commit = MetaOp::RemoveBricksCommit { name: "v".into() };
        assert_eq!(code(sm.apply(s, commit.clone())), Some(ErrorCode::NotEmpty));
        let on0: Vec<_> = files.iter().filter(|f| f.group == 0).collect();
        // A move given up stays listed (and the file cannot move) until its clean-up is done.
        let first = FileMove {
            ino: on0[0].ino,
            from: 0,
            to: 1,
        };
        let moves = |sm: &Sm| match read(&sm.base, &MetaRead::Moves { volume: v }).unwrap() {
            MetaReply::Moves {
                moving,
                abandoned,
                dropping,
            } => {
                assert!(dropping.is_empty() || moving.is_empty());
                (moving, abandoned)
            }
            o => panic!("{o:?}"),
        };
        assert_eq!(
            code(sm.apply(
                s,
                MetaOp::AbortMove {
                    volume: v,
                    file: first
                }
            )),
            Some(ErrorCode::NotFound)
        );
        sm.apply(
            s,
            MetaOp::BeginMove {
                volume: v,
                file: first,
            },
        )
        .unwrap();
        assert_eq!(moves(&sm), (vec![first], vec![]));
        sm.apply(
            s,
            MetaOp::AbortMove {
                volume: v,
                file: first,
            },
        )
        .unwrap();
        assert_eq!(moves(&sm), (vec![], vec![first]));
        assert_eq!(
            code(sm.apply(
                s,
                MetaOp::BeginMove {
                    volume: v,
                    file: first
                }
            )),
            Some(ErrorCode::Busy)
        );
        assert_eq!(code(sm.apply(s, commit.clone())), Some(ErrorCode::NotEmpty));
        sm.apply(
            s,
            MetaOp::ForgetMove {
                volume: v,
                file: first,
            },
        )
        .unwrap();
        assert_eq!(
            code(sm.apply(
                s,
                MetaOp::ForgetMove {
                    volume: v,
                    file: first
                }
            )),
            Some(ErrorCode::NotFound)
        );
        assert_eq!(moves(&sm), (vec![], vec![]));
        for f in &on0 {
            let file = FileMove {
                ino: f.ino,
                from: 0,
                to: 1,
            };
            let back = FileMove {
                from: 1,
                to: 0,
                ..file
            };
            sm.apply(s, MetaOp::BeginMove { volume: v, file }).unwrap();
            assert_eq!(
                code(sm.apply(s, MetaOp::BeginMove { volume: v, file })),
                Some(ErrorCode::Busy)
            );
            assert_eq!(
                code(sm.apply(
                    s,
                    MetaOp::FinishMove {
                        volume: v,
                        file: back
                    }
                )),
                Some(ErrorCode::NotFound)
            );
            match sm.apply(s, MetaOp::FinishMove { volume: v, file }).unwrap() {
                MetaReply::Attr(a) => assert_eq!(a.group, 1),
                o => panic!("{o:?}"),
            }
            // Until its source is dropped, the file cannot move again.
            assert_eq!(
                code(sm.apply(
                    s,
                    MetaOp::BeginMove {
                        volume: v,
                        file: FileMove {
                            from: 1,
                            to: 2,
                            ..file
                        }
                    }
                )),
                Some(ErrorCode::Busy)
            );
            sm.apply(s, MetaOp::DroppedMove { volume: v, file })
                .unwrap();
            // Back to a draining group: refused.
            assert_eq!(
                code(sm.apply(
                    s,
                    MetaOp::BeginMove {
                        volume: v,
                        file: back
                    }
                )),
                Some(ErrorCode::InvalidArgument)
            );
        }
        // A moved file's deletion also clears its seals in the group it left.
        let moved = on0[0];
        let name = format!(
            "f{}",
            files.iter().position(|f| f.ino == moved.ino).unwrap()
        );
        sm.apply(
            s,
            MetaOp::Unlink {
                volume: v,
                parent: ROOT_INO,
                name,
            },
        )
        .unwrap();
        match read(
            &sm.base,
            &MetaRead::ListGc {
                volume: v,
                limit: 10,
            },
        )
        .unwrap()
        {
            MetaReply::Gc(items) => {
                assert_eq!(items.len(), 1);
                assert_eq!((items[0].group, items[0].moved_from.clone()), (1, vec![0]));
            }
            o => panic!("{o:?}"),
        }
        // Progress from another run is ignored; this run's is kept.
        let report = |run, scanned| MetaOp::RebalanceReport {
            volume: v,
            run,
            progress: RebalanceProgress {
                scanned,
                ..Default::default()
            },
            done: false,
        };
        sm.apply(s, report(7, 99)).unwrap();
        sm.apply(s, report(1, 40)).unwrap();
        assert_eq!(vol(&sm).rebalance.unwrap().progress.scanned, 40);
        match sm.apply(s, commit).unwrap() {
            MetaReply::Volume(after) => {
                assert!(after.retired(0) && !after.retired(1));
                assert!(after.draining.is_empty());
                assert_eq!(after.bricks.len(), 1);
                assert_eq!(after.spec, vec!["h2:/b0".to_string()]);
                assert_eq!(after.rebalance.unwrap().state, RebalanceState::Done);
            }
            o => panic!("{o:?}"),
        }
        // The brick is free for another volume; files page through in inode order.
        sm.apply(
            s,
            MetaOp::CreateVolume {
                name: "w".into(),
                spec: vec!["h1:/b0".into()],
            },
        )
        .unwrap();
        let mut seen = 0;
        let mut after = Ino(0);
        loop {
            match read(
                &sm.base,
                &MetaRead::Files {
                    volume: v,
                    after,
                    limit: 7,
                },
            )
            .unwrap()
            {
                MetaReply::Files { files, next } => {
                    assert!(files.iter().all(|f| f.group == 1 && f.ino > after));
                    seen += files.len();
                    match next {
                        Some(n) => after = n,
                        None => break,
                    }
                }
                o => panic!("{o:?}"),
            }
        }
        assert_eq!(seen, 59);
        sm.apply(s, MetaOp::RebalanceStart { name: "v".into() })
            .unwrap();
        assert_eq!(vol(&sm).rebalance.unwrap().run, 2);
        sm.apply(s, MetaOp::RebalanceStop { name: "v".into() })
            .unwrap();
        assert_eq!(
            code(sm.apply(s, MetaOp::RebalanceStop { name: "v".into() })),
            Some(ErrorCode::InvalidArgument)
        );
    }

    /// Directory quotas count file sizes up the tree, refuse growth past a limit (EDQUOT),
    /// follow renames of files and whole directories, and give bytes back on unlink.
    #[test]
    fn quotas_count_refuse_and_follow_renames() {
        let mut sm = Sm::new();
        let (v, s) = (sm.volume, SessionId(1));
        let code = |r: CommandResult| r.unwrap_err().kind();
        let mkdir = |sm: &mut Sm, parent: Ino, name: &str| -> Ino {
            let op = MetaOp::Mkdir {
                volume: v,
                parent,
                name: name.into(),
                mode: 0o755,
                umask: 0,
                uid: 0,
                gid: 0,
            };
            match sm.apply(s, op).unwrap() {
                MetaReply::Attr(a) => a.ino,
                o => panic!("{o:?}"),
            }
        };
        let file = |sm: &mut Sm, parent: Ino, name: &str| -> Ino {
            match sm
                .apply(s, MetaOp::create_file(v, parent, name, 0o644, true))
                .unwrap()
            {
                MetaReply::Attr(a) => a.ino,
                o => panic!("{o:?}"),
            }
        };
        let size = |ino: Ino, n: u64| MetaOp::SetAttr {
            volume: v,
            ino,
            set: SetAttr {
                size_bytes: Some(n),
                ..Default::default()
            },
        };
        let mv = |parent: Ino, name: &str, new_parent: Ino| MetaOp::Rename {
            volume: v,
            parent,
            name: name.into(),
            new_parent,
            new_name: name.into(),
            flags: RenameFlags::default(),
        };
        let used = |sm: &Sm| -> Vec<(String, u64)> {
            match read(&sm.base, &MetaRead::Quotas { volume: v }).unwrap() {
                MetaReply::Quotas(q) => q.into_iter().map(|q| (q.path, q.used_bytes)).collect(),
                o => panic!("{o:?}"),
            }
        };
        let q = mkdir(&mut sm, ROOT_INO, "q");
        let sub = mkdir(&mut sm, q, "sub");
        let other = mkdir(&mut sm, ROOT_INO, "other");
        let f = file(&mut sm, sub, "f");
        sm.apply(s, size(f, 1000)).unwrap();
        let set = |dir: Ino, path: &str, limit: Option<u64>| MetaOp::SetQuota {
            volume: v,
            dir,
            path: path.into(),
            limit_bytes: limit,
        };
        sm.apply(s, set(q, "/q", Some(4096))).unwrap();
        assert_eq!(
            used(&sm),
            vec![("/q".to_string(), 1000)],
            "counts what is there"
        );
        assert_eq!(
            code(sm.apply(s, size(f, 5000))),
            Some(ErrorCode::QuotaExceeded)
        );
        sm.apply(s, size(f, 4096)).unwrap();
        let g = file(&mut sm, q, "g");
        assert_eq!(
            code(sm.apply(s, size(g, 1))),
            Some(ErrorCode::QuotaExceeded)
        );
        let h = file(&mut sm, other, "h");
        sm.apply(s, size(h, 10)).unwrap();
        assert_eq!(
            code(sm.apply(s, mv(other, "h", q))),
            Some(ErrorCode::QuotaExceeded),
            "a rename into a full tree"
        );
        sm.apply(s, mv(sub, "f", other)).unwrap();
        assert_eq!(used(&sm), vec![("/q".to_string(), 0)]);
        sm.apply(s, mv(other, "f", sub)).unwrap();
        sm.apply(s, mv(q, "sub", other)).unwrap();
        assert_eq!(
            used(&sm),
            vec![("/q".to_string(), 0)],
            "a directory takes its tree"
        );
        sm.apply(s, mv(other, "sub", q)).unwrap();
        assert_eq!(used(&sm), vec![("/q".to_string(), 4096)]);
        // A nested quota is checked too; raising a limit keeps the count.
        sm.apply(s, set(q, "/q", Some(10_000))).unwrap();
        sm.apply(s, set(sub, "/q/sub", Some(5000))).unwrap();
        sm.apply(s, size(f, 100)).unwrap();
        let f2 = file(&mut sm, sub, "f2");
        assert_eq!(
            code(sm.apply(s, size(f2, 4901))),
            Some(ErrorCode::QuotaExceeded)
        );
        sm.apply(s, size(f2, 4900)).unwrap();
        assert_eq!(
            used(&sm),
            vec![("/q".to_string(), 5000), ("/q/sub".to_string(), 5000)]
        );
        sm.apply(
            s,
            MetaOp::Unlink {
                volume: v,
                parent: sub,
                name: "f2".into(),
            },
        )
        .unwrap();
        assert_eq!(
            used(&sm),
            vec![("/q".to_string(), 100), ("/q/sub".to_string(), 100)]
        );
        let opts = |sm: &Sm| match read(&sm.base, &MetaRead::VolumeByName { name: "v".into() }) {
            Ok(MetaReply::Volume(v)) => v.options,
            o => panic!("{o:?}"),
        };
        assert!(opts(&sm).contains(&("quota".into(), "on".into())));
        sm.apply(s, set(sub, "/q/sub", None)).unwrap();
        sm.apply(s, set(q, "/q", None)).unwrap();
        assert_eq!(
            code(sm.apply(s, set(q, "/q", None))),
            Some(ErrorCode::NotFound)
        );
        assert!(!opts(&sm).iter().any(|(k, _)| k == "quota"));
        sm.apply(s, size(g, 1 << 40)).unwrap();
    }
}
