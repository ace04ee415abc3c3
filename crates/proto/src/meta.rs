//! Bodies of the metadata messages: what clients ask the metadata group, and what it answers.
//!
//! A write (`MetaOp`) travels in a `MetaWrite` frame with the client's session and sequence
//! number, and is also the record stored in the Raft log, so these types are a compatibility
//! promise twice over: add variants at the end, never reorder or remove them.

use crate::ids::{BrickId, Epoch, Ino, NodeId, VolumeId};
use serde::{Deserialize, Serialize};

/// A client session (one per mount or tool), kept alive by a lease.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// The kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// The attributes of an inode. Times are nanoseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits and set-id/sticky bits (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size_bytes: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub nlink: u32,
    pub rdev: u32,
    /// For a regular file: the stripe group that holds its data (chosen at create).
    pub group: u32,
    /// For a regular file: its stripe unit, fixed at create (0 for other kinds).
    pub unit_bytes: u32,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub ino: Ino,
    pub kind: FileKind,
}

/// A deleted file waiting for its objects to be removed from the bricks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcItem {
    pub ino: Ino,
    pub size_bytes: u64,
    /// The stripe group its objects live in (see `Attr::group`).
    pub group: u32,
    /// Groups it was moved away from (rebalance), whose bricks keep seals for it until now.
    pub moved_from: Vec<u32>,
}

/// A regular file as the rebalancer sees it (`MetaRead::Files`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpot {
    pub ino: Ino,
    pub group: u32,
    pub size_bytes: u64,
}

/// A file being moved from one stripe group to another (between `BeginMove` and
/// `FinishMove` or `AbortMove`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMove {
    pub ino: Ino,
    pub from: u32,
    pub to: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RebalanceState {
    Running,
    Stopped,
    Done,
}

/// A volume's rebalance: what it is doing and how far it got. `run` grows with every start,
/// so that a report from an older run (a node that lost leadership) is ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebalance {
    pub run: u64,
    pub state: RebalanceState,
    /// Only move files off draining groups (started by `remove-brick start`).
    pub drain_only: bool,
    pub progress: RebalanceProgress,
    pub started_ns: i64,
    pub updated_ns: i64,
}

/// Counters of one rebalance run; `cursor` is the last inode scanned in the current pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceProgress {
    pub pass: u32,
    pub cursor: Ino,
    pub scanned: u64,
    pub moved: u64,
    pub moved_bytes: u64,
    /// Files left where they are this pass (a set not fully in sync, a brick unreachable):
    /// the next pass tries them again.
    pub skipped: u64,
    pub last_error: String,
}

/// Attribute changes; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size_bytes: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
    /// Grow only: set the size to the maximum of this and the current size (used when
    /// writers commit their size, so concurrent writers never shrink a file).
    pub size_at_least_bytes: Option<u64>,
}

/// `rename` flags, as in renameat2(2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// A node of the cluster map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub addr: String,
    /// The leader's clock at the node's last heartbeat (0: never).
    pub last_heartbeat_ms: u64,
}

/// A brick of the cluster map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickRecord {
    pub id: BrickId,
    pub node: NodeId,
    pub path: String,
    pub capacity_bytes: u64,
}

/// A volume (its layout comes with the volume types).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub root: Ino,
    /// One of the nine type names ("dispersed", "distributed-striped-replicated", ...).
    pub type_name: String,
    /// The spec in the volume grammar, bricks included.
    pub spec: Vec<String>,
    /// S: sets per stripe group.
    pub stripe: u32,
    /// R for replicate sets, 0 otherwise.
    pub replica: u32,
    /// K and M for disperse sets, 0 otherwise.
    pub disperse_data: u32,
    pub disperse_redundancy: u32,
    /// Bricks in spec order.
    pub bricks: Vec<VolumeBrick>,
    /// Sets in order: set s holds bricks `s*width .. (s+1)*width`.
    pub sets: Vec<SetState>,
    pub status: VolumeStatus,
    /// Options set with `volume set`, sorted by key.
    pub options: Vec<(String, String)>,
    /// Stripe groups being emptied for `remove-brick`: no new file goes there.
    pub draining: Vec<u32>,
    /// The last rebalance started, if any.
    pub rebalance: Option<Box<Rebalance>>,
    /// The client credentials that reach this volume (their secrets are derived from the
    /// cluster key, never stored: see `cred`).
    pub credentials: Vec<ClientCredential>,
}

/// A client credential a volume lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCredential {
    pub id: u64,
    pub created_ms: u64,
    /// Free text for whoever reads `volume credential list` ("csi pvc-…", a host name).
    pub label: String,
}

/// Credentials one volume may list.
pub const CREDENTIALS_MAX: usize = 64;

impl VolumeRecord {
    /// Sets per stripe group.
    pub fn group_width(&self) -> usize {
        self.stripe.max(1) as usize
    }

    /// Stripe groups, retired ones included (their sets have no members).
    pub fn groups(&self) -> usize {
        self.sets.len() / self.group_width()
    }

    /// Whether group `g` was taken out of the volume by `remove-brick commit`.
    pub fn retired(&self, g: usize) -> bool {
        self.sets
            .get(g * self.group_width())
            .is_none_or(|s| s.members.is_empty())
    }

    /// Whether new files (and moved ones) may go to group `g`.
    pub fn takes_files(&self, g: usize) -> bool {
        !self.retired(g) && !self.draining.contains(&(g as u32))
    }

    /// The volume's `quorum` option, when set to a number: with the layout, what
    /// `brickfs_set::quorum::write_quorum` makes the least in-sync members a set needs to
    /// take writes (clients check it, and primaries refuse mutations below it).
    pub fn quorum_option(&self) -> Option<usize> {
        self.options
            .iter()
            .find(|(k, _)| k == "quorum")
            .and_then(|(_, v)| v.parse::<usize>().ok())
    }

    /// Bricks per set: R, K+M or 1.
    pub fn set_width(&self) -> usize {
        if self.replica > 0 {
            self.replica as usize
        } else if self.disperse_data > 0 {
            (self.disperse_data + self.disperse_redundancy) as usize
        } else {
            1
        }
    }

    /// How new files spread over the groups (see `brickfs_layout::place::pick_group`): a
    /// group's weight is its smallest brick's capacity in MiB (at least 1), 0 for groups that
    /// take no files. `capacity` gives a brick's capacity in bytes.
    pub fn placement_weights(&self, capacity: impl Fn(BrickId) -> u64) -> Vec<u64> {
        let s = self.group_width();
        (0..self.groups())
            .map(|g| {
                if !self.takes_files(g) {
                    return 0;
                }
                self.sets[g * s..(g + 1) * s]
                    .iter()
                    .flat_map(|x| x.members.iter())
                    .map(|m| capacity(*m) >> 20)
                    .min()
                    .unwrap_or(0)
                    .max(1)
            })
            .collect()
    }
}

/// A brick of a volume, resolved to its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBrick {
    pub brick: BrickId,
    pub node: NodeId,
    /// `HOST:PORT:/PATH` as given in the spec.
    pub addr: String,
}

/// The configuration of one set (a replica or disperse set, or a single brick).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetState {
    pub members: Vec<BrickId>,
    /// Grows with every change of primary or in-sync set; stale requests are fenced by it.
    pub epoch: Epoch,
    pub primary: BrickId,
    /// The members that hold every acknowledged write.
    pub in_sync: Vec<BrickId>,
    /// Members out of sync that must be healed by comparing every object (a replaced brick
    /// starts empty; a damaged one lost objects no write touched), not just the objects the
    /// in-sync members journaled as written while the set was degraded.
    pub full_heal: Vec<BrickId>,
    /// A live in-sync member being replaced (`ReplaceBrick`): it still takes writes, but its
    /// node's heartbeat answers no longer count it in sync, so it serves no reads; once every
    /// lease granted before is over (the down-after time), `DetectFailures` puts `new` in
    /// its place. Until then a reader with an older view could still be served by it, and
    /// the set's writes (which skip it after the swap) would leave it serving old bytes.
    pub draining: Option<Drain>,
}

/// A replacement waiting out the old member's readers (`SetState::draining`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub old: BrickId,
    pub new: VolumeBrick,
    /// When the group's command started it (its clock, milliseconds since the epoch).
    pub since_ms: u64,
}

impl SetState {
    /// Whether member `b` serves client reads: in sync and not being replaced.
    pub fn serves_reads(&self, b: BrickId) -> bool {
        self.in_sync.contains(&b) && self.draining.as_ref().is_none_or(|d| d.old != b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeStatus {
    Created,
    Started,
    Stopped,
    /// Deleted: its namespace and name are gone; the leader removes its objects from every
    /// brick (`MetaOp::VolumePurged` then drops the record), and until then its bricks are
    /// not free for another volume.
    Deleting,
}

/// A mutation, applied by the metadata group exactly once per (session, sequence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOp {
    /// Opens a session whose lease lasts `lease_ms` past each renewal.
    OpenSession {
        client: String,
        lease_ms: u64,
    },
    KeepAlive,
    CloseSession,
    RegisterNode {
        node: NodeRecord,
    },
    RegisterBrick {
        brick: BrickRecord,
    },
    /// Creates a volume from a spec in the volume grammar; its bricks must be registered and
    /// in no other volume.
    CreateVolume {
        name: String,
        spec: Vec<String>,
    },
    StartVolume {
        name: String,
    },
    StopVolume {
        name: String,
    },
    /// Deletes a volume that is not started: its namespace and name at once, its objects on
    /// the bricks afterwards (the volume is `Deleting` until then).
    DeleteVolume {
        name: String,
    },
    SetVolumeOption {
        name: String,
        key: String,
        value: String,
    },
    /// Removes a node (and its bricks) that no volume uses.
    RemoveNode {
        node: NodeId,
    },
    /// A node reports that it is alive.
    Heartbeat {
        node: NodeId,
    },
    /// Makes a directory. `mode` is the mode asked for; `umask` applies to it unless the
    /// parent has a default ACL, which the new directory then inherits (POSIX ACL rules).
    Mkdir {
        volume: VolumeId,
        parent: Ino,
        name: String,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    },
    /// Creates a regular file (or, with `kind`, a special file). `exclusive` fails with
    /// `Exists` when the name is taken; otherwise an existing file is returned. `mode` and
    /// `umask` as for `Mkdir`.
    Create {
        volume: VolumeId,
        parent: Ino,
        name: String,
        kind: FileKind,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        exclusive: bool,
    },
    Symlink {
        volume: VolumeId,
        parent: Ino,
        name: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    Link {
        volume: VolumeId,
        ino: Ino,
        new_parent: Ino,
        new_name: String,
    },
    Unlink {
        volume: VolumeId,
        parent: Ino,
        name: String,
    },
    Rmdir {
        volume: VolumeId,
        parent: Ino,
        name: String,
    },
    Rename {
        volume: VolumeId,
        parent: Ino,
        name: String,
        new_parent: Ino,
        new_name: String,
        flags: RenameFlags,
    },
    SetAttr {
        volume: VolumeId,
        ino: Ino,
        set: SetAttr,
    },
    SetXattr {
        volume: VolumeId,
        ino: Ino,
        name: String,
        value: Vec<u8>,
        create_only: bool,
        replace_only: bool,
    },
    RemoveXattr {
        volume: VolumeId,
        ino: Ino,
        name: String,
    },
    /// Expires sessions whose lease ended before the leader's clock (proposed by the leader).
    ExpireSessions,
    /// A POSIX byte-range lock (fcntl F_SETLK) for `owner` (the FUSE lock owner) of this
    /// session on `[start, end)`; `end == u64::MAX` means to the end of the file. A conflict
    /// answers `WouldBlock`; blocking waits (F_SETLKW) retry.
    SetLock {
        volume: VolumeId,
        ino: Ino,
        lock: LockSpec,
    },
    /// flock(2) on the whole file.
    Flock {
        volume: VolumeId,
        ino: Ino,
        owner: u64,
        kind: LockKind,
    },
    /// Releases every lock and flock of `owner` on the file (close of the last descriptor).
    ReleaseLocks {
        volume: VolumeId,
        ino: Ino,
        owner: u64,
    },
    /// The data path removed the objects of a deleted file: drop it from the GC queue.
    GcDone {
        volume: VolumeId,
        ino: Ino,
    },
    /// As `Unlink`, for a file the caller still has open: when its last link goes, the inode
    /// stays (link count 0, still readable and writable by inode) as an orphan of the caller's
    /// session until `DropOrphan` or the session's end.
    UnlinkOpen {
        volume: VolumeId,
        parent: Ino,
        name: String,
    },
    /// The caller closed an orphan: the inode goes if no link came back.
    DropOrphan {
        volume: VolumeId,
        ino: Ino,
    },
    /// Proposed by the leader: every set drops from its in-sync set the members on nodes
    /// silent for longer than `down_after_ms` (by the command's time), with a new epoch and,
    /// when the primary went, a new primary. A set never loses its last in-sync member. A
    /// replacement draining for longer than `down_after_ms` is carried out.
    DetectFailures {
        down_after_ms: u64,
    },
    /// A healed member rejoins set `set`'s in-sync members; applies only while the set is at
    /// `epoch` (the heal fenced the primary at `epoch + 1`, which the set then takes).
    RejoinMember {
        volume: VolumeId,
        set: u32,
        member: BrickId,
        epoch: Epoch,
    },
    /// A brick's scrubber found (and quarantined) a damaged object: the brick leaves its
    /// set's in-sync members (unless it is the last), so that the set heals it.
    ReportDamage {
        brick: BrickId,
        key: crate::ids::ObjectKey,
    },
    /// Puts brick `new` (registered, in no volume) in the place of `old` in volume `name`
    /// (both `HOST:PORT:/PATH`): the new brick joins the old one's set out of sync, to be
    /// healed from the other members; refused when the set has no other copy to heal from.
    ReplaceBrick {
        name: String,
        old: String,
        new: String,
    },
    /// Raises a set's epoch to at least `at_least` (after a heal fenced its primary but could
    /// not finish, so that clients can write again).
    RaiseEpoch {
        volume: VolumeId,
        set: u32,
        at_least: Epoch,
    },
    /// Adds whole stripe groups (`HOST:PORT:/PATH`, registered, in no volume; a multiple of
    /// stripe × set width) to volume `name`. New files spread over them at once; existing
    /// ones move with `RebalanceStart`.
    AddBricks {
        name: String,
        bricks: Vec<String>,
    },
    /// Starts emptying the stripe groups that hold `bricks` (every brick of each group must be
    /// named): no new file goes there, and a drain-only rebalance moves their files away.
    RemoveBricksStart {
        name: String,
        bricks: Vec<String>,
    },
    /// Stops draining: the groups take files again (files already moved stay moved).
    RemoveBricksStop {
        name: String,
    },
    /// Takes the drained groups out of the volume (their sets keep their numbers, without
    /// members; the bricks are free again). Refused while a file lives or moves there.
    RemoveBricksCommit {
        name: String,
    },
    /// Starts (or restarts from the beginning) moving files to the groups the placement picks
    /// for them now, and off draining groups.
    RebalanceStart {
        name: String,
    },
    RebalanceStop {
        name: String,
    },
    /// The rebalancer's progress for run `run`; `done` ends the run. Ignored for another run
    /// or one that was stopped.
    RebalanceReport {
        volume: VolumeId,
        run: u64,
        progress: RebalanceProgress,
        done: bool,
    },
    /// Records that a file starts moving (before its objects are sealed). Refused if it is not
    /// in group `from`, already moving, or `to` takes no files.
    BeginMove {
        volume: VolumeId,
        file: FileMove,
    },
    /// The file's objects are in group `to`: it lives there from now on. The move stays
    /// listed as dropping (and the file cannot move) until `DroppedMove`.
    FinishMove {
        volume: VolumeId,
        file: FileMove,
    },
    /// The move is abandoned: the file stays in `from`. The move stays listed as abandoned
    /// (and the file cannot move again) until `ForgetMove` says its source was thawed.
    AbortMove {
        volume: VolumeId,
        file: FileMove,
    },
    /// An abandoned move's source objects are thawed and its target cleared: forget it.
    ForgetMove {
        volume: VolumeId,
        file: FileMove,
    },
    /// A finished move's source objects are dropped (sealed `Gone`): forget it.
    DroppedMove {
        volume: VolumeId,
        file: FileMove,
    },
    /// Sets directory `dir`'s quota (`path` is how it was named, for listing) to
    /// `limit_bytes`, or removes it (`None`). A new quota counts what the tree holds now.
    SetQuota {
        volume: VolumeId,
        dir: Ino,
        path: String,
        limit_bytes: Option<u64>,
    },
    /// The caller's session opens file `ino`: while any session holds it open, the inode
    /// outlives its last name (unlink, rename over it) and its objects stay. Answers its
    /// attributes.
    OpenFile {
        volume: VolumeId,
        ino: Ino,
    },
    /// The caller's session closed its last descriptor of each file: those with no name and
    /// no other holder go (their objects are queued for removal).
    CloseFiles {
        volume: VolumeId,
        inos: Vec<Ino>,
    },
    /// `Create`, and the caller's session holds the file open (as `OpenFile`).
    CreateOpen {
        volume: VolumeId,
        parent: Ino,
        name: String,
        kind: FileKind,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        exclusive: bool,
    },
    /// A read moved the file's atime (relatime): unlike `SetAttr`, ctime stays.
    TouchAtime {
        volume: VolumeId,
        ino: Ino,
        atime_ns: i64,
    },
    /// Node `node` opened `bricks` after a stop that was not clean: they may have lost
    /// acknowledged writes that were not synced. Each leaves its set's in-sync members (unless
    /// it is the last) and is marked for a full heal, as a damaged brick is.
    ReportRestart {
        node: NodeId,
        bricks: Vec<BrickId>,
    },
    /// As `GcDone`, for several files of one volume in one command (at most
    /// `GC_DONE_MAX`).
    GcDoneMany {
        volume: VolumeId,
        inos: Vec<Ino>,
    },
    /// No brick of a `Deleting` volume holds an object of it any more: the record goes and
    /// its bricks are free.
    VolumePurged {
        volume: VolumeId,
    },
    /// Lists a client credential for volume `name` (a node issues it: see
    /// `Message::IssueCredential`).
    AddCredential {
        name: String,
        credential: ClientCredential,
    },
    /// Drops client credential `id` of volume `name`: requests made with it are refused from
    /// then on, on connections already open too.
    RevokeCredential {
        name: String,
        id: u64,
    },
    /// `op`, as a client of `volume` holding credential `credential` sent it. The node that
    /// received the request wraps it so (none is taken from the wire: see `is_client_op`),
    /// and the group binds each session to the credential that opened it: a client's
    /// command in a session it did not open is refused.
    AsClient {
        volume: VolumeId,
        credential: u64,
        op: Box<MetaOp>,
    },
    /// Lists `credential` as volume `name`'s only client credential, revoking every other in
    /// the same command (a rotation: never both, never none). Answers `Rotated`.
    RotateCredential {
        name: String,
        credential: ClientCredential,
    },
}

/// Files one `GcDoneMany` may name.
pub const GC_DONE_MAX: usize = 1024;

impl MetaOp {
    /// Creates a regular file (`exclusive`: refuse an existing name).
    pub fn create_file(
        volume: VolumeId,
        parent: Ino,
        name: &str,
        mode: u32,
        exclusive: bool,
    ) -> MetaOp {
        MetaOp::Create {
            volume,
            parent,
            name: name.to_string(),
            kind: FileKind::File,
            mode,
            umask: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive,
        }
    }
}

impl MetaOp {
    /// The volume whose namespace or data this op touches, for access checks (`None`: cluster
    /// administration, sessions, or a volume named in the op).
    pub fn volume(&self) -> Option<VolumeId> {
        use MetaOp::*;
        match self {
            Mkdir { volume, .. }
            | Create { volume, .. }
            | Symlink { volume, .. }
            | Link { volume, .. }
            | Unlink { volume, .. }
            | Rmdir { volume, .. }
            | Rename { volume, .. }
            | SetAttr { volume, .. }
            | SetXattr { volume, .. }
            | RemoveXattr { volume, .. }
            | SetLock { volume, .. }
            | Flock { volume, .. }
            | ReleaseLocks { volume, .. }
            | GcDone { volume, .. }
            | GcDoneMany { volume, .. }
            | UnlinkOpen { volume, .. }
            | DropOrphan { volume, .. }
            | RejoinMember { volume, .. }
            | RaiseEpoch { volume, .. }
            | RebalanceReport { volume, .. }
            | BeginMove { volume, .. }
            | FinishMove { volume, .. }
            | AbortMove { volume, .. }
            | SetQuota { volume, .. }
            | ForgetMove { volume, .. }
            | DroppedMove { volume, .. }
            | OpenFile { volume, .. }
            | CloseFiles { volume, .. }
            | CreateOpen { volume, .. }
            | TouchAtime { volume, .. } => Some(*volume),
            _ => None,
        }
    }
}

impl MetaOp {
    /// The volume an administrative command names, by name (see `volume` for those by id).
    pub fn volume_name(&self) -> Option<&str> {
        use MetaOp::*;
        match self {
            StartVolume { name }
            | StopVolume { name }
            | DeleteVolume { name }
            | SetVolumeOption { name, .. }
            | ReplaceBrick { name, .. }
            | AddBricks { name, .. }
            | RemoveBricksStart { name, .. }
            | RemoveBricksStop { name, .. }
            | RemoveBricksCommit { name, .. }
            | RebalanceStart { name, .. }
            | RebalanceStop { name, .. }
            | AddCredential { name, .. }
            | RevokeCredential { name, .. }
            | RotateCredential { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether only a node of the cluster sends this command (its duties: damage and restart
    /// reports, heal, garbage collection, rebalance moves, purges). Heartbeats are not among
    /// them: a node heartbeats before it is in the map.
    pub fn is_node_duty(&self) -> bool {
        use MetaOp::*;
        matches!(
            self,
            ExpireSessions
                | DetectFailures { .. }
                | ReportDamage { .. }
                | ReportRestart { .. }
                | RejoinMember { .. }
                | RaiseEpoch { .. }
                | GcDone { .. }
                | GcDoneMany { .. }
                | VolumePurged { .. }
                | RebalanceReport { .. }
                | BeginMove { .. }
                | FinishMove { .. }
                | AbortMove { .. }
                | ForgetMove { .. }
                | DroppedMove { .. }
        )
    }
}

impl MetaOp {
    /// Whether a client of a volume may send this command (for its own volume: see
    /// `volume`): its sessions, the namespace, locks and open files. Not the volume's
    /// administration (options, quotas, bricks, credentials) nor any node duty.
    pub fn is_client_op(&self) -> bool {
        use MetaOp::*;
        matches!(
            self,
            OpenSession { .. }
                | KeepAlive
                | CloseSession
                | Mkdir { .. }
                | Create { .. }
                | Symlink { .. }
                | Link { .. }
                | Unlink { .. }
                | Rmdir { .. }
                | Rename { .. }
                | SetAttr { .. }
                | SetXattr { .. }
                | RemoveXattr { .. }
                | SetLock { .. }
                | Flock { .. }
                | ReleaseLocks { .. }
                | UnlinkOpen { .. }
                | DropOrphan { .. }
                | OpenFile { .. }
                | CloseFiles { .. }
                | CreateOpen { .. }
                | TouchAtime { .. }
        )
    }
}

impl MetaRead {
    /// The volume this read looks into, by id (see `MetaOp::volume`).
    pub fn volume(&self) -> Option<VolumeId> {
        use MetaRead::*;
        match self {
            Lookup { volume, .. }
            | GetAttr { volume, .. }
            | ReadDir { volume, .. }
            | ReadLink { volume, .. }
            | GetXattr { volume, .. }
            | ListXattr { volume, .. }
            | GetLock { volume, .. }
            | WaitLock { volume, .. }
            | ListGc { volume, .. }
            | ReadDirPlus { volume, .. }
            | Files { volume, .. }
            | Moves { volume }
            | Quotas { volume } => Some(*volume),
            _ => None,
        }
    }
}

/// Lock types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A byte-range lock request or holding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockSpec {
    pub owner: u64,
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
}

/// A lock held by someone, as `GetLock` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    pub session: SessionId,
    pub lock: LockSpec,
}

/// A linearizable read, served by the leader after it confirms its leadership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRead {
    Lookup {
        volume: VolumeId,
        parent: Ino,
        name: String,
    },
    GetAttr {
        volume: VolumeId,
        ino: Ino,
    },
    /// Entries in name order after `after`, at most `limit`.
    ReadDir {
        volume: VolumeId,
        ino: Ino,
        after: Option<String>,
        limit: u32,
    },
    ReadLink {
        volume: VolumeId,
        ino: Ino,
    },
    GetXattr {
        volume: VolumeId,
        ino: Ino,
        name: String,
    },
    ListXattr {
        volume: VolumeId,
        ino: Ino,
    },
    ListNodes,
    ListBricks,
    ListVolumes,
    VolumeByName {
        name: String,
    },
    ListSessions,
    /// The first lock that would conflict with `lock` taken by `session` (fcntl F_GETLK).
    GetLock {
        volume: VolumeId,
        ino: Ino,
        session: SessionId,
        lock: LockSpec,
    },
    /// Deleted files whose objects the data path must remove, in order, at most `limit`.
    ListGc {
        volume: VolumeId,
        limit: u32,
    },
    /// As `ReadDir`, with each entry's attributes (FUSE readdirplus: `ls -l` without a lookup
    /// per name).
    ReadDirPlus {
        volume: VolumeId,
        ino: Ino,
        after: Option<String>,
        limit: u32,
    },
    /// Regular files (linked or orphaned) with inode numbers above `after`, in inode order,
    /// at most `limit`.
    Files {
        volume: VolumeId,
        after: Ino,
        limit: u32,
    },
    /// Files between `BeginMove` and `FinishMove`/`AbortMove`.
    Moves {
        volume: VolumeId,
    },
    /// Every directory quota of the volume.
    Quotas {
        volume: VolumeId,
    },
    /// As `GetLock`, but the leader holds the answer back while a lock conflicts, for at most
    /// `wait_ms` (capped at `LOCK_WAIT_MAX_MS`): it answers `Lock(None)` as soon as a change
    /// of the file's locks leaves nothing in the way, else the conflicting lock when the time
    /// is up. A hint for F_SETLKW and flock waiters, who then retry `SetLock`: only `SetLock`
    /// grants.
    WaitLock {
        volume: VolumeId,
        ino: Ino,
        session: SessionId,
        lock: LockSpec,
        wait_ms: u32,
    },
    /// Volumes in id order after `after`: at most `limit`, and no more records than
    /// `VOLUME_PAGE_BYTES` hold, so that every page fits one frame (`ListVolumes` answers
    /// `TooLarge` once they all do not).
    VolumesPage {
        after: Option<VolumeId>,
        limit: u32,
    },
}

/// About the most bytes of volume records one `VolumesPage` answer holds (a page always
/// holds at least one record; one record is far below a frame).
pub const VOLUME_PAGE_BYTES: usize = 256 << 10;

/// The longest a `WaitLock` is held back, below every client's request timeout.
pub const LOCK_WAIT_MAX_MS: u32 = 2_500;

/// The shortest and longest session lease the metadata group grants (`OpenSession` asks; the
/// group clamps), so that no client can keep its locks and holds for ever.
pub const LEASE_MIN_MS: u64 = 1_000;
pub const LEASE_MAX_MS: u64 = 600_000;

/// A session as the metadata group keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub client: String,
    pub lease_expires_ms: u64,
}

/// The answer to a write or read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    Done,
    Session(SessionInfo),
    Attr(Attr),
    Entries {
        entries: Vec<DirEntry>,
        more: bool,
    },
    Target(String),
    Value(Vec<u8>),
    Names(Vec<String>),
    Nodes(Vec<NodeRecord>),
    Bricks(Vec<BrickRecord>),
    Volumes(Vec<VolumeRecord>),
    Volume(VolumeRecord),
    Sessions(Vec<SessionInfo>),
    Lock(Option<HeldLock>),
    /// Deleted files whose objects are to be removed.
    Gc(Vec<GcItem>),
    EntriesPlus {
        entries: Vec<(DirEntry, Attr)>,
        more: bool,
    },
    /// A page of files; `next` is where the next page starts (`None`: this was the last).
    Files {
        files: Vec<FileSpot>,
        next: Option<Ino>,
    },
    /// Moves in progress, moves given up whose source is not yet known to be thawed, and
    /// finished moves whose source is not yet known to be dropped.
    Moves {
        moving: Vec<FileMove>,
        abandoned: Vec<FileMove>,
        dropping: Vec<FileMove>,
    },
    Quotas(Vec<QuotaInfo>),
    /// The answer to a heartbeat: the node's bricks that are in-sync members of a set, and
    /// the volumes that exist. A brick serves client reads of an existing volume's objects
    /// only while it is an in-sync member (not out of sync, not replaced).
    ///
    /// `epochs` names each set one of the node's bricks is a member of, at its current epoch:
    /// the node fences its bricks at it, so that a primary the group has moved on from (a
    /// restarted or resumed node) refuses writes of clients that still see the old epoch.
    Standing {
        in_sync: Vec<BrickId>,
        volumes: Vec<VolumeId>,
        epochs: Vec<SetStanding>,
    },
    /// A page of volumes; `next`: where the next page starts (`None`: this was the last).
    VolumePage {
        volumes: Vec<VolumeRecord>,
        next: Option<VolumeId>,
    },
    /// The volume after a `RotateCredential`, and the credentials it revoked.
    Rotated {
        volume: VolumeRecord,
        revoked: Vec<u64>,
    },
}

/// What a heartbeat answer says of one set a node's brick is a member of: its epoch (the
/// brick fences it), and how many members are in sync at that epoch against the volume's
/// write quorum (a primary refuses mutations below it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetStanding {
    pub brick: BrickId,
    pub volume: VolumeId,
    pub set: u32,
    pub epoch: Epoch,
    pub in_sync: u32,
    pub quorum: u32,
}

/// A directory quota and what its tree holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaInfo {
    pub dir: Ino,
    pub path: String,
    pub limit_bytes: u64,
    pub used_bytes: u64,
}

/// A write to the metadata group. `acked_below` lets the group forget the answers to this
/// session's requests below it: the client has received them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaWrite {
    pub session: SessionId,
    pub seq: u64,
    pub acked_below: u64,
    pub op: MetaOp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaReadReq {
    pub read: MetaRead,
}

/// This node cannot answer: ask the leader (when known).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRedirect {
    pub leader: Option<NodeId>,
    pub leader_addr: Option<String>,
}

/// A member of the metadata group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub addr: String,
    pub voter: bool,
}

/// Cluster administration, answered by any member (changes go to the leader).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    /// Bootstraps a new group with this node as its only voter.
    Init,
    /// Adds a member (as a learner first, then as a voter when `voter`), online.
    AddMember {
        id: NodeId,
        addr: String,
        voter: bool,
    },
    /// Removes a member from the group, online.
    RemoveMember {
        id: NodeId,
    },
    Status,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaAdmin {
    pub op: AdminOp,
}

/// What a member knows of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub node: NodeId,
    pub initialized: bool,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub members: Vec<MemberInfo>,
}

/// One Raft RPC between members; the request and reply travel as opaque bytes (bincode of
/// openraft 0.9 types, see `brickfs-meta`) in the data section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpcKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftRpc {
    pub kind: RaftRpcKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftRpcReply {}
