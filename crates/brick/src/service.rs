//! The brick service: answers chunk-store requests for the bricks a node serves. Disk work runs
//! on the blocking pool so the async workers keep moving frames.

use crate::error::StoreError;
use crate::store::BrickStore;
use crate::store::VersionRule;
use brickfs_erasure::{ReedSolomonCodec, decode_stripes, encode_stripes};
use brickfs_proto::msg::{
    BrickInfo, BrickList, Deleted, ListReply, ListedObject, MemberRef, MemberTruncate, MemberWrite,
    ObjectState, Pong, ReadData, StatfsReply,
};
use brickfs_proto::msg::{DisperseGeometry, REPLACE_PART_BYTES, SetRef};
use brickfs_proto::rpc::{ClientOptions, Handler, Pool, RpcError, join_all};
use brickfs_proto::{BrickId, ErrorBody, ErrorCode, Message, NodeId};
use brickfs_proto::{ObjectKey, ObjectVersion};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The metadata group's last word on this node's bricks (`set_standing`).
struct Standing {
    in_sync: std::collections::HashSet<BrickId>,
    volumes: std::collections::HashSet<brickfs_proto::VolumeId>,
}

/// Where the bytes of an object copy come from (`copy_object`).
enum CopyFrom<'a> {
    /// This node's copy (a replica primary's), checked to hold the version part by part.
    Local(Arc<BrickStore>),
    /// Rebuilt from the members of `g` that take fragments: fragment `index`.
    Rebuild {
        g: &'a DisperseGeometry,
        codec: &'a ReedSolomonCodec,
        f: u64,
        index: usize,
    },
}

/// Applies one part of a `MemberReplace` (fenced by the caller): a copy in one part replaces
/// the object at once; others are staged, and the last part installs the staged copy. The
/// object's state afterwards (the staged length until the last part).
fn apply_replace(
    b: &BrickStore,
    key: &ObjectKey,
    version: ObjectVersion,
    tag: u64,
    offset: u64,
    total: u64,
    data: &[u8],
) -> Result<crate::store::ObjectMeta, StoreError> {
    let end = offset
        .checked_add(data.len() as u64)
        .filter(|e| *e <= total);
    let Some(end) = end else {
        return Err(StoreError::InvalidArgument(format!(
            "a replace part of {} bytes at {offset} overruns the object's {total}",
            data.len()
        )));
    };
    if data.len() as u64 > REPLACE_PART_BYTES {
        return Err(StoreError::InvalidArgument(format!(
            "a replace part of {} bytes exceeds {REPLACE_PART_BYTES}",
            data.len()
        )));
    }
    if offset == 0 && end == total {
        return b.replace(key, data, version, tag);
    }
    let staged = b.stage(key, offset, data)?;
    if end == total {
        return b.commit_staged(key, total, version, tag);
    }
    Ok(crate::store::ObjectMeta {
        version: ObjectVersion(0),
        len_bytes: staged,
        tag: 0,
    })
}

/// The longest path accepted in a request.
pub const PATH_MAX_BYTES: usize = 4096;

/// Serves a fixed set of bricks.
pub struct BrickService {
    node: NodeId,
    bricks: HashMap<BrickId, Arc<BrickStore>>,
    stopping: AtomicBool,
    /// The write lease: as a primary, this node orders set mutations only while the metadata
    /// group acknowledged its heartbeat within it (so a primary cut off from the group stops
    /// taking writes before the group gives its sets to others). `None`: no lease.
    lease: std::sync::Mutex<Option<brickfs_set::lease::Lease>>,
    /// The origin of the lease's clock (milliseconds since it).
    born: std::time::Instant,
    /// Connections to the other members of sets this node is primary for (forwards, reads).
    peers: Pool,
    /// The same, for whole-object copies (repairs and heals), which may take long.
    bulk: Pool,
    /// Orders a primary's mutations per object: held across the local apply and the fan-out,
    /// so every member sees an object's versions in the same order.
    ordering: Vec<tokio::sync::Mutex<()>>,
    /// One gate per set this node orders mutations of: every mutation holds it shared, a
    /// heal's barrier pass exclusively, so that the barrier stalls that set's writes only.
    gates: std::sync::Mutex<HashMap<(brickfs_proto::VolumeId, u32), Gate>>,
    /// What the background scrubber found, per brick (filled by brickd's scrub task).
    scrub: std::sync::Mutex<HashMap<BrickId, brickfs_proto::msg::ScrubReport>>,
    /// This node's bricks that serve client reads: the in-sync members of sets, as the
    /// metadata group answered the last heartbeat (`None`: no word yet, or no group; reads
    /// then wait for the lease, if any). Bricks opened after a stop that was not clean serve
    /// none until the group has taken them out of sync (`unreported`).
    in_sync: std::sync::Mutex<Option<Standing>>,
    unreported: std::sync::Mutex<std::collections::HashSet<BrickId>>,
    /// Bricks this node is taking out of their sets itself (a damaged object): they serve no
    /// reads from before the report until a standing from a heartbeat sent after the report's
    /// answer (`None`: not answered yet), which no longer counts them.
    holds: std::sync::Mutex<HashMap<BrickId, Option<std::time::Instant>>>,
    /// Source of the tags this node gives the set mutations it orders as a primary.
    tags: AtomicU64,
    /// Disperse objects whose last mutation here did not settle cleanly
    /// (`brickfs_set::disperse::Settle::settled`): the next one reconciles them first, so
    /// that no write lands on top of a version fewer than K members hold. In memory: a new
    /// primary starts without, and finds disagreeing members by their gaps.
    unsettled: std::sync::Mutex<std::collections::HashSet<ObjectKey>>,
    /// What the metadata group last said of each set this node has a member of (epoch,
    /// members in sync, write quorum; see `brickfs_set::quorum`).
    known: std::sync::Mutex<HashMap<(brickfs_proto::VolumeId, u32), brickfs_set::quorum::Known>>,
}

const ORDERING_SHARDS: usize = 1024;

/// A set's gate (`BrickService::gates`).
type Gate = Arc<tokio::sync::RwLock<()>>;

/// A member's refusal of a forward (see `brickfs_set::Refusal`).
type Refusal = brickfs_set::Refusal<ErrorBody>;

/// A member's answer as a refusal: a refused version is a gap; anything else it answered
/// means it did not apply.
fn refusal(e: ErrorBody) -> Refusal {
    if e.kind() == Some(ErrorCode::VersionGap) {
        Refusal::Gap
    } else {
        Refusal::Failed(e)
    }
}

/// What one copy of an object holds: `(version, tag)` (see `ObjectState`); `(0, 0)` is no
/// object at all.
type Held = (u64, u64);

/// A change to one object on one member.
enum Mutation {
    /// `undo`: keep what the write overwrites (`BrickStore::write_undoable`).
    Write {
        offset_bytes: u64,
        data: Bytes,
        undo: bool,
    },
    /// `undo`: keep what the truncate cuts off (`BrickStore::truncate_undoable`).
    Truncate { len_bytes: u64, undo: bool },
}

/// A member's answer to `MemberStat` from `BrickStore::stat_undo` (version 0: nothing held).
fn member_stat_reply(
    (held, undo): (
        Option<crate::store::ObjectMeta>,
        Option<crate::store::ObjectMeta>,
    ),
) -> brickfs_proto::msg::MemberStatReply {
    brickfs_proto::msg::MemberStatReply {
        state: held.map_or(
            ObjectState {
                version: ObjectVersion(0),
                len_bytes: 0,
                tag: 0,
            },
            state,
        ),
        undo: undo.map(state),
    }
}

fn state(meta: crate::store::ObjectMeta) -> ObjectState {
    ObjectState {
        version: meta.version,
        len_bytes: meta.len_bytes,
        tag: meta.tag,
    }
}

/// Checks a brick path from the network: absolute, normalized (no `.`, `..` or empty
/// components), no NUL, bounded length. The path is only ever compared, never joined.
pub fn validate_brick_path(path: &str) -> Result<(), ErrorBody> {
    let bad = |why: &str| {
        Err(ErrorBody::new(
            ErrorCode::InvalidPath,
            format!("brick path {path:?}: {why}"),
        ))
    };
    if path.len() > PATH_MAX_BYTES {
        return bad("too long");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    let Some(rest) = path.strip_prefix('/') else {
        return bad("must be absolute");
    };
    if rest.is_empty() {
        return bad("the root folder cannot be a brick");
    }
    for part in rest.split('/') {
        match part {
            "" => return bad("empty component (double or trailing slash)"),
            "." | ".." => return bad("'.' and '..' components are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

impl BrickService {
    pub fn new(node: NodeId, bricks: Vec<Arc<BrickStore>>) -> BrickService {
        let bricks_unclean: Vec<BrickId> = bricks
            .iter()
            .filter(|b| b.unclean_start())
            .map(|b| b.id())
            .collect();
        BrickService {
            node,
            bricks: bricks.into_iter().map(|b| (b.id(), b)).collect(),
            stopping: AtomicBool::new(false),
            lease: std::sync::Mutex::new(None),
            born: std::time::Instant::now(),
            peers: Pool::new(ClientOptions {
                peer_name: format!("primary {node}"),
                // A member that cannot take a forward within this is as good as failed: the
                // write fails and is retried once the group has moved the set on.
                request_timeout: std::time::Duration::from_secs(10),
                connect_timeout: std::time::Duration::from_secs(2),
                ..ClientOptions::default()
            }),
            bulk: Pool::new(ClientOptions {
                peer_name: format!("primary {node} copies"),
                request_timeout: std::time::Duration::from_secs(300),
                connect_timeout: std::time::Duration::from_secs(2),
                ..ClientOptions::default()
            }),
            scrub: std::sync::Mutex::new(HashMap::new()),
            in_sync: std::sync::Mutex::new(None),
            unreported: std::sync::Mutex::new(bricks_unclean.into_iter().collect()),
            holds: std::sync::Mutex::new(HashMap::new()),
            ordering: (0..ORDERING_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            unsettled: std::sync::Mutex::new(std::collections::HashSet::new()),
            known: std::sync::Mutex::new(HashMap::new()),
            gates: std::sync::Mutex::new(HashMap::new()),
            tags: AtomicU64::new(
                node.0
                    ^ std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
            ),
        }
    }

    /// A fresh tag for one set mutation: unique per node and run (a restarted primary must
    /// not reuse the tag of a write its members applied before it died), and never 0 (the
    /// tag of objects written outside any set).
    fn new_tag(&self) -> u64 {
        let mut z = self
            .tags
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).max(1)
    }

    /// Set `set`'s gate (see `gates`).
    fn gate(&self, set: SetRef) -> Gate {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((set.volume, set.set))
            .or_default()
            .clone()
    }

    /// Refuses (`ReadOnly`) a mutation at an epoch the metadata group said leaves the set
    /// below its write quorum (`brickfs_set::quorum::admit`).
    fn admit(&self, set: SetRef) -> Result<(), ErrorBody> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(set.volume, set.set))
            .copied();
        brickfs_set::quorum::admit(known, set.epoch.0).map_err(|why| {
            ErrorBody::new(
                ErrorCode::ReadOnly,
                format!("set {} of volume {}: {why}", set.set, set.volume.0),
            )
        })
    }

    fn ordering_lock(&self, key: &brickfs_proto::ObjectKey) -> &tokio::sync::Mutex<()> {
        let raw = [key.volume.0.to_le_bytes(), key.ino.0.to_le_bytes()].concat();
        let h = crc32c::crc32c_append(crc32c::crc32c(&raw), &key.column.to_le_bytes());
        &self.ordering[h as usize % ORDERING_SHARDS]
    }

    /// Orders one mutation of a replica set as its primary: runs the steps of
    /// `brickfs_set::replica::Mutation` (apply to this node's copy as the next version,
    /// forward it to the other in-sync members at exactly that version on top of the same
    /// parent, send the whole copy to members that refuse the version), all under the
    /// object's ordering lock.
    #[allow(clippy::too_many_arguments)]
    async fn replica_mutation(
        &self,
        brick: BrickId,
        set: SetRef,
        key: ObjectKey,
        members: &[MemberRef],
        mutation: Mutation,
        sync: bool,
        degraded: bool,
    ) -> Result<crate::store::ObjectMeta, ErrorBody> {
        use brickfs_set::replica::Step;
        let own = self.brick(brick)?;
        self.admit(set)?;
        let gate = self.gate(set);
        let _gate = gate.read().await;
        let _order = self.ordering_lock(&key).lock().await;
        let (mut core, first) =
            brickfs_set::replica::Mutation::start(members.len(), self.new_tag());
        let Step::ApplyLocal(brickfs_set::member::Rule::Next { tag }) = first else {
            unreachable!("a mutation starts with the primary's own copy")
        };
        let (forward, data) = match &mutation {
            Mutation::Write {
                offset_bytes, data, ..
            } => (Some(*offset_bytes), data.clone()),
            Mutation::Truncate { .. } => (None, Bytes::new()),
        };
        let len_bytes = match &mutation {
            Mutation::Truncate { len_bytes, .. } => *len_bytes,
            Mutation::Write { .. } => 0,
        };
        let rule = VersionRule::Next { tag };
        let local = Self::apply_fenced(own.clone(), set, key, mutation, sync, rule, degraded).await;
        let meta = local.as_ref().ok().map(|(m, _)| *m);
        let mut steps = core.applied(local.map(|(m, parent)| ((m.version.0, m.tag), parent)));
        loop {
            let mut calls = Vec::new();
            for step in steps.drain(..) {
                match step {
                    Step::Reply(r) => {
                        return r.map(|_| meta.expect("a mutation acknowledged was applied"));
                    }
                    Step::ApplyLocal(_) => unreachable!("applied once"),
                    Step::Forward { member, rule } => {
                        let brickfs_set::member::Rule::Exactly {
                            version,
                            tag,
                            parent,
                        } = rule
                        else {
                            unreachable!("members apply exact versions")
                        };
                        let b = members[member].brick;
                        let msg = match forward {
                            Some(offset_bytes) => Message::MemberWrite(MemberWrite {
                                brick: b,
                                set,
                                key,
                                offset_bytes,
                                version: ObjectVersion(version),
                                tag,
                                parent_tag: parent,
                                sync,
                                degraded,
                                undo: false,
                            }),
                            None => Message::MemberTruncate(MemberTruncate {
                                brick: b,
                                set,
                                key,
                                len_bytes,
                                version: ObjectVersion(version),
                                tag,
                                parent_tag: parent,
                                sync,
                                degraded,
                                undo: false,
                            }),
                        };
                        let data = data.clone();
                        calls.push(Box::pin(async move {
                            let r = self.forward(&members[member], msg, data).await;
                            (member, Ok(r))
                        })
                            as std::pin::Pin<
                                Box<dyn std::future::Future<Output = _> + Send + '_>,
                            >);
                    }
                    Step::Replace { member, .. } => {
                        let held = meta.expect("replaced after applied");
                        let own = own.clone();
                        calls.push(Box::pin(async move {
                            let r = self
                                .replace_on(&own, set, key, held, &members[member])
                                .await;
                            (member, Err(r))
                        }));
                    }
                }
            }
            for (member, r) in join_all(calls).await {
                let next = match r {
                    Ok(forwarded) => core.forwarded(member, forwarded),
                    Err(replaced) => core.replaced(member, replaced),
                };
                steps.extend(next);
            }
        }
    }

    /// Fences this node's bricks at their sets' current epochs (the group's word, see
    /// `MetaReply::Standing`): a primary the group has moved on from then refuses writes at an
    /// older epoch instead of ordering them (and sending its copy over newer ones).
    /// It also keeps what the group said of each set's quorum at that epoch (`admit`).
    pub async fn fence_epochs(&self, epochs: &[brickfs_proto::meta::SetStanding]) {
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            for s in epochs {
                known.insert(
                    (s.volume, s.set),
                    brickfs_set::quorum::Known {
                        epoch: s.epoch.0,
                        in_sync: s.in_sync as usize,
                        quorum: s.quorum as usize,
                    },
                );
            }
        }
        for s in epochs {
            let (brick, volume, set, epoch) = (s.brick, s.volume, s.set, s.epoch);
            let Some(b) = self.bricks.get(&brick).cloned() else {
                continue;
            };
            let r = Self::blocking(b, move |b| b.fence(volume.0, set, epoch.0)).await;
            if let Err(e) = r {
                tracing::warn!(%brick, error = %e, "failed to fence a set's epoch");
            }
        }
    }

    /// Stops `brick` serving reads until a standing from a heartbeat sent after
    /// [`BrickService::report_answered`]: call before reporting it to the group.
    pub fn hold_reads(&self, brick: BrickId) {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(brick, None);
    }

    /// The report that [`BrickService::hold_reads`] preceded was answered (or failed).
    pub fn report_answered(&self, brick: BrickId) {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(brick, Some(std::time::Instant::now()));
    }

    /// Takes the metadata group's answer to the heartbeat sent at `sent`: which of this
    /// node's bricks are in sync (they alone serve reads), and which volumes exist.
    pub fn set_standing(
        &self,
        in_sync: Vec<BrickId>,
        volumes: Vec<brickfs_proto::VolumeId>,
        sent: std::time::Instant,
    ) {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, answered| answered.is_none_or(|at| at > sent));
        *self.in_sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(Standing {
            in_sync: in_sync.into_iter().collect(),
            volumes: volumes.into_iter().collect(),
        });
    }

    /// Bricks opened after an unclean stop that the metadata group has not been told of.
    pub fn unreported(&self) -> Vec<BrickId> {
        let mut v: Vec<BrickId> = self
            .unreported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort();
        v
    }

    /// The metadata group took these bricks out of sync (`ReportRestart`).
    pub fn reported(&self, bricks: &[BrickId]) {
        let mut u = self.unreported.lock().unwrap_or_else(|p| p.into_inner());
        for b in bricks {
            u.remove(b);
        }
    }

    /// Refuses a client read of a brick that is out of sync (or may have lost writes and is
    /// not reported yet): another member holds what the set acknowledged.
    fn check_standing(&self, brick: BrickId, key: &ObjectKey) -> Result<(), ErrorBody> {
        let out = self
            .in_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| s.volumes.contains(&key.volume) && !s.in_sync.contains(&brick))
            || self
                .unreported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&brick)
            || self
                .holds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&brick);
        if out {
            return Err(ErrorBody::new(
                ErrorCode::StaleEpoch,
                format!("brick {brick} is not an in-sync member of a set: read another member"),
            ));
        }
        Ok(())
    }

    /// Turns the write lease on, `length` long (see `lease`).
    pub fn enable_lease(&self, length: std::time::Duration) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(brickfs_set::lease::Lease::new(length.as_millis() as u64));
    }

    fn lease_clock_ms(&self, at: std::time::Instant) -> u64 {
        at.saturating_duration_since(self.born).as_millis() as u64
    }

    /// The metadata group acknowledged the heartbeat sent at `sent`: the lease runs from
    /// then (not from the reply's arrival, which a paused process or a slow commit delays
    /// past the moment the group may give this node's sets to others).
    pub fn renew_lease(&self, sent: std::time::Instant) {
        let at = self.lease_clock_ms(sent);
        if let Some(l) = self
            .lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            l.acknowledged(at);
        }
    }

    /// Whether the lease (if any) is held now.
    pub fn lease_held(&self) -> bool {
        self.check_lease().is_ok()
    }

    /// Refuses a set mutation while the lease has lapsed (`Busy`: clients retry, and find the
    /// set's new primary once the group has moved it).
    fn check_lease(&self) -> Result<(), ErrorBody> {
        let now = self.lease_clock_ms(std::time::Instant::now());
        match *self.lease.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(l) if !l.held(now) => Err(ErrorBody::new(
                ErrorCode::Busy,
                format!(
                    "node {}'s lease has lapsed: the metadata group has not acknowledged it for {} ms",
                    self.node,
                    l.length_ms()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Updates the scrub report of a brick.
    pub fn scrub_report(
        &self,
        brick: BrickId,
        update: impl FnOnce(&mut brickfs_proto::msg::ScrubReport),
    ) {
        let mut all = self.scrub.lock().unwrap_or_else(|p| p.into_inner());
        update(all.entry(brick).or_default());
    }

    /// Sends the primary's whole object (as `held`: version and tag) to member `m`, replacing
    /// its copy — whether the member missed versions or holds a version the primary never
    /// wrote (a write of a deposed primary that was never acknowledged).
    async fn replace_on(
        &self,
        own: &Arc<BrickStore>,
        set: SetRef,
        key: ObjectKey,
        held: crate::store::ObjectMeta,
        m: &MemberRef,
    ) -> Result<(), ErrorBody> {
        let version = held.version;
        let meta = Self::blocking(own.clone(), move |b| b.stat(&key)).await?;
        if meta.version != version || meta.tag != held.tag {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                format!("{key} moved on from version {} during a repair", version.0),
            ));
        }
        tracing::info!(%key, member = %m.brick, version = version.0, bytes = meta.len_bytes, "member missed or forked a version; sending the whole object");
        self.copy_object(
            m,
            set,
            key,
            (version.0, held.tag),
            meta.len_bytes,
            CopyFrom::Local(own.clone()),
        )
        .await
        .map(|_| ())
    }

    /// Copies object `key` (`len` bytes, at `held`) to member `m` in parts of at most
    /// `REPLACE_PART_BYTES`, so that objects of any size are repaired with one part in memory
    /// (see `MemberReplace`). The bytes sent.
    async fn copy_object(
        &self,
        m: &MemberRef,
        set: SetRef,
        key: ObjectKey,
        held: Held,
        len: u64,
        from: CopyFrom<'_>,
    ) -> Result<u64, ErrorBody> {
        for (off, n) in brickfs_set::heal::parts(len, REPLACE_PART_BYTES) {
            let part = match &from {
                CopyFrom::Local(own) => {
                    let (meta, bytes) =
                        Self::blocking(own.clone(), move |b| b.read(&key, off, n)).await?;
                    if (meta.version.0, meta.tag) != held || bytes.len() as u64 != n {
                        return Err(ErrorBody::new(
                            ErrorCode::Busy,
                            format!("{key} moved on from version {} during a copy", held.0),
                        ));
                    }
                    bytes
                }
                CopyFrom::Rebuild { g, codec, f, index } => {
                    self.rebuild_fragment(g, codec, *f, key, held, off, n, *index)
                        .await?
                }
            };
            self.install(m, set, key, held, off, len, part).await?;
        }
        Ok(len)
    }

    /// Refuses new work from now on (requests already running finish).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn bricks(&self) -> impl Iterator<Item = &Arc<BrickStore>> {
        self.bricks.values()
    }

    fn brick(&self, id: BrickId) -> Result<Arc<BrickStore>, ErrorBody> {
        self.bricks.get(&id).cloned().ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::UnknownBrick,
                format!("brick {id} is not served by node {}", self.node),
            )
        })
    }

    /// Reads `len` bytes at `offset` of one member's fragment object: `((version, tag),
    /// bytes)`, `((0, 0), empty)` when the member has no such object, `None` when it cannot
    /// answer.
    async fn read_fragment(
        &self,
        m: &MemberRef,
        key: ObjectKey,
        offset: u64,
        len: u64,
    ) -> Option<(Held, Vec<u8>)> {
        if let Some(b) = self.bricks.get(&m.brick).cloned() {
            return match Self::blocking(b, move |b| b.read(&key, offset, len)).await {
                Ok((meta, bytes)) => Some(((meta.version.0, meta.tag), bytes.to_vec())),
                Err(e) if e.is(ErrorCode::NotFound) => Some(((0, 0), Vec::new())),
                Err(_) => None,
            };
        }
        let addr: std::net::SocketAddr = m.addr.parse().ok()?;
        let msg = Message::Read(brickfs_proto::msg::Read {
            brick: m.brick,
            key,
            offset_bytes: offset,
            len_bytes: u32::try_from(len).ok()?,
            repair: true,
        });
        // Whole fragment objects (rebuilds) may take long; stripes are quick.
        let pool = if len > 16 << 20 {
            &self.bulk
        } else {
            &self.peers
        };
        match pool.call(addr, msg, Bytes::new()).await {
            Ok((Message::ReadData(r), bytes)) => {
                Some(((r.state.version.0, r.state.tag), bytes.to_vec()))
            }
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Some(((0, 0), Vec::new())),
            _ => None,
        }
    }

    /// Writes fragment bytes to one member at exactly `version`.
    /// Applies a member write on this node when it serves the member, else forwards it.
    async fn write_fragment(
        &self,
        m: &MemberRef,
        w: MemberWrite,
        data: Bytes,
    ) -> Result<(), Refusal> {
        if let Some(b) = self.bricks.get(&m.brick).cloned() {
            let m = Mutation::Write {
                offset_bytes: w.offset_bytes,
                data,
                undo: w.undo,
            };
            let rule = VersionRule::Exactly {
                version: w.version,
                tag: w.tag,
                parent: w.parent_tag,
            };
            return Self::apply_fenced(b, w.set, w.key, m, w.sync, rule, w.degraded)
                .await
                .map(|_| ())
                .map_err(refusal);
        }
        self.forward(m, Message::MemberWrite(w), data).await
    }

    /// Sends one member a forward: its refusal as the set's rules see it (a member that
    /// answered no did not apply; one that did not answer may have).
    async fn forward(&self, m: &MemberRef, msg: Message, data: Bytes) -> Result<(), Refusal> {
        let addr: std::net::SocketAddr = m.addr.parse().map_err(|_| {
            Refusal::Failed(ErrorBody::new(
                ErrorCode::InvalidArgument,
                format!("member {} has a bad address {:?}", m.brick, m.addr),
            ))
        })?;
        match self.peers.call(addr, msg, data).await {
            Ok(_) => Ok(()),
            Err(RpcError::Remote(body)) => Err(refusal(ErrorBody::new(
                body.kind().unwrap_or(ErrorCode::Io),
                format!("member {} at {}: {}", m.brick, m.addr, body.detail),
            ))),
            Err(e) => Err(Refusal::Unknown(ErrorBody::new(
                ErrorCode::Io,
                format!("member {} at {}: {e}", m.brick, m.addr),
            ))),
        }
    }

    /// Whether a disperse set has members out of sync (its writes are journaled for them).
    fn degraded(g: &DisperseGeometry) -> bool {
        !g.in_sync.is_empty() && g.in_sync.len() < g.members.len()
    }

    /// Whether a disperse member takes fragments (it is in sync).
    fn takes_fragments(g: &DisperseGeometry, brick: BrickId) -> bool {
        g.in_sync.is_empty() || g.in_sync.contains(&brick)
    }

    fn disperse_setup(
        &self,
        own: BrickId,
        g: &DisperseGeometry,
    ) -> Result<(ReedSolomonCodec, u64), ErrorBody> {
        let (k, m, f) = (
            g.data_fragments as usize,
            g.parity_fragments as usize,
            u64::from(g.fragment_bytes),
        );
        brickfs_set::disperse::check_geometry(k, m, f, g.members.len())
            .map_err(|e| ErrorBody::new(ErrorCode::InvalidArgument, e))?;
        if !g.members.iter().any(|x| x.brick == own) {
            return Err(ErrorBody::new(
                ErrorCode::InvalidArgument,
                format!("primary {own} is not a member of the set"),
            ));
        }
        let in_sync = g
            .members
            .iter()
            .filter(|m| Self::takes_fragments(g, m.brick))
            .count();
        if in_sync < k {
            return Err(ErrorBody::new(
                ErrorCode::ReadOnly,
                format!("only {in_sync} members in sync, fewer than the {k} data fragments"),
            ));
        }
        let codec = ReedSolomonCodec::new(k, m)
            .map_err(|e| ErrorBody::new(ErrorCode::InvalidArgument, e.to_string()))?;
        Ok((codec, f))
    }

    /// Reads stripe `j` of the column (all in-sync fragments) and decodes it; the version used
    /// must be the one the primary holds, else the copies disagree (`VersionGap`: the caller
    /// reconciles them).
    #[allow(clippy::too_many_arguments)]
    async fn read_stripe(
        &self,
        g: &DisperseGeometry,
        codec: &ReedSolomonCodec,
        key: ObjectKey,
        j: u64,
        f: u64,
        have: Held,
    ) -> Result<Vec<u8>, ErrorBody> {
        self.read_stripes(g, codec, key, j, 1, f, have).await
    }

    /// Reads `count` stripes from stripe `j` on in one round of fragment reads, as
    /// `read_stripe` reads one.
    #[allow(clippy::too_many_arguments)]
    async fn read_stripes(
        &self,
        g: &DisperseGeometry,
        codec: &ReedSolomonCodec,
        key: ObjectKey,
        j: u64,
        count: u64,
        f: u64,
        have: Held,
    ) -> Result<Vec<u8>, ErrorBody> {
        // Members out of sync may hold older versions: only in-sync fragments are decoded.
        let reads = g
            .members
            .iter()
            .map(|m| async move {
                if Self::takes_fragments(g, m.brick) {
                    self.read_fragment(m, key, j * f, count * f).await
                } else {
                    None
                }
            })
            .collect();
        let frags = join_all(reads).await;
        let answered = frags.iter().flatten().count();
        let (version, bytes) =
            decode_stripes(codec, &frags, f as usize, count as usize).map_err(|e| {
                // Too few members answered (down, or their lease lapsed): try again later. Enough
                // answered but disagreeing: the copies need reconciling.
                let code = if answered < g.data_fragments as usize {
                    ErrorCode::Busy
                } else {
                    ErrorCode::VersionGap
                };
                ErrorBody::new(
                    code,
                    format!("stripe {j} of {key} cannot be read back: {e}"),
                )
            })?;
        if version != have {
            return Err(ErrorBody::new(
                ErrorCode::VersionGap,
                format!(
                    "stripe {j} of {key} decodes at version {}/{:x}, the primary holds {}/{:x}",
                    version.0, version.1, have.0, have.1
                ),
            ));
        }
        Ok(bytes)
    }

    /// The members of a disperse set that take fragments, with their fragment index.
    fn takers(g: &DisperseGeometry) -> Vec<(usize, &MemberRef)> {
        g.members
            .iter()
            .enumerate()
            .filter(|(_, m)| Self::takes_fragments(g, m.brick))
            .collect()
    }

    /// What a brick this node serves holds of `key` (`(0, 0)` for nothing) and its length,
    /// checking the set's epoch first.
    async fn held_here(
        own: &Arc<BrickStore>,
        set: SetRef,
        key: ObjectKey,
    ) -> Result<(Held, u64), ErrorBody> {
        Self::blocking(own.clone(), move |b| {
            b.fence(set.volume.0, set.set, set.epoch.0)?;
            match b.stat(&key) {
                Ok(m) => Ok(((m.version.0, m.tag), m.len_bytes)),
                Err(StoreError::NotFound { .. }) => Ok(((0, 0), 0)),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Runs a disperse mutation under the object's ordering lock; when the fragments turn out
    /// to disagree (a write that reached only some members before a failure, on a primary that
    /// lost its own copy or not), reconciles them and tries again (twice at most).
    async fn disperse_mutation<'a, Fut>(
        &'a self,
        g: &'a DisperseGeometry,
        codec: &'a ReedSolomonCodec,
        f: u64,
        set: SetRef,
        key: ObjectKey,
        once: impl Fn() -> Fut,
    ) -> Result<ObjectState, ErrorBody>
    where
        Fut: std::future::Future<Output = Result<ObjectState, ErrorBody>> + 'a,
    {
        self.admit(set)?;
        let gate = self.gate(set);
        let _gate = gate.read().await;
        let _order = self.ordering_lock(&key).lock().await;
        if self.is_unsettled(&key) {
            tracing::info!(%key, "the last mutation did not settle; reconciling first");
            self.reconcile(g, codec, f, set, key, &[]).await?;
        }
        let mut attempt = 0;
        loop {
            match once().await {
                Err(e) if e.kind() == Some(ErrorCode::VersionGap) && attempt < 2 => {
                    attempt += 1;
                    tracing::info!(%key, error = %e.detail, "fragments disagree; reconciling");
                    self.reconcile(g, codec, f, set, key, &[]).await?;
                }
                r => return r,
            }
        }
    }

    async fn disperse_write(
        &self,
        req: brickfs_proto::msg::DisperseWrite,
        data: Bytes,
    ) -> Result<ObjectState, ErrorBody> {
        let own = self.brick(req.brick)?;
        let g = &req.geometry;
        let (codec, f) = self.disperse_setup(req.brick, g)?;
        self.disperse_mutation(g, &codec, f, req.set, req.key, || {
            self.disperse_write_once(&own, &req, &codec, f, &data)
        })
        .await
    }

    /// One attempt at a disperse write (under the ordering lock).
    async fn disperse_write_once(
        &self,
        own: &Arc<BrickStore>,
        req: &brickfs_proto::msg::DisperseWrite,
        codec: &ReedSolomonCodec,
        f: u64,
        data: &Bytes,
    ) -> Result<ObjectState, ErrorBody> {
        let g = &req.geometry;
        let k = u64::from(g.data_fragments);
        let sb = k * f;
        let (key, set) = (req.key, req.set);
        let (have, _) = Self::held_here(own, set, key).await?;
        let off = req.offset_bytes;
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| ErrorBody::new(ErrorCode::InvalidArgument, "range overflows"))?;
        if data.is_empty() {
            return Ok(ObjectState {
                version: ObjectVersion(have.0),
                len_bytes: 0,
                tag: have.1,
            });
        }
        let plan = brickfs_set::disperse::plan_write(k, f, off, data.len() as u64, have);
        let (first, last) = (plan.first, plan.last);
        let mut buf = vec![0u8; ((last - first + 1) * sb) as usize];
        // Stripes the write covers in part are read back first. What the write overwrites
        // each member keeps itself (`MemberWrite.undo`), to go back should it fail.
        for j in plan.partial {
            let at = ((j - first) * sb) as usize;
            let old = self.read_stripe(g, codec, key, j, f, have).await?;
            buf[at..at + sb as usize].copy_from_slice(&old);
        }
        let at = (off - first * sb) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        let frags = encode_stripes(codec, &buf, f as usize)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("encode: {e}")))?;
        let version = ObjectVersion(have.0 + 1);
        let tag = self.new_tag();
        let takers = Self::takers(g);
        let writes = takers
            .iter()
            .map(|(i, m)| {
                let w = MemberWrite {
                    brick: m.brick,
                    set,
                    key,
                    offset_bytes: first * f,
                    version,
                    tag,
                    parent_tag: have.1,
                    sync: req.sync,
                    degraded: Self::degraded(g),
                    undo: true,
                };
                self.write_fragment(m, w, Bytes::from(frags[*i].clone()))
            })
            .collect();
        let results = join_all(writes).await;
        self.settle(
            g,
            codec,
            f,
            set,
            key,
            ((version.0, tag), have),
            takers,
            results,
            true,
        )
        .await?;
        Ok(ObjectState {
            version,
            len_bytes: end,
            tag,
        })
    }

    /// Settles a mutation's fan-out to the takers, as `brickfs_set::disperse::settle`
    /// decides: acknowledge; take the members that applied it back to the version before
    /// (`wrote.1`) on what they kept (`kept`: a write) and fail; or rebuild the members that
    /// refused the version from those that applied it, when at least K did (`VersionGap`, so
    /// that the caller reconciles, when fewer did). An outcome that leaves the members
    /// disagreeing marks the object unsettled: its next mutation reconciles first.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        g: &DisperseGeometry,
        codec: &ReedSolomonCodec,
        f: u64,
        set: SetRef,
        key: ObjectKey,
        (wrote, before): (Held, Held),
        takers: Vec<(usize, &MemberRef)>,
        results: Vec<Result<(), Refusal>>,
        kept: bool,
    ) -> Result<(), ErrorBody> {
        use brickfs_set::disperse::Settle;
        let member = |i: usize| {
            takers
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(j, m)| (*j, *m))
                .expect("an index of a taker")
        };
        let outcomes = takers.iter().map(|(i, _)| *i).zip(results).collect();
        let k = g.data_fragments as usize;
        let decision = brickfs_set::disperse::settle(k, outcomes, kept);
        if !decision.settled() {
            self.unsettled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key);
        }
        match decision {
            Settle::Ack => Ok(()),
            Settle::Fail { roll_back, error } => {
                let applied: Vec<_> = roll_back.into_iter().map(member).collect();
                self.roll_back(set, key, wrote, before, &applied).await;
                Err(error)
            }
            Settle::Reconcile { roll_back } => {
                let applied: Vec<_> = roll_back.into_iter().map(member).collect();
                self.roll_back(set, key, wrote, before, &applied).await;
                Err(ErrorBody::new(
                    ErrorCode::VersionGap,
                    format!(
                        "version {} of {key} was applied by fewer than the {k} data fragments",
                        wrote.0
                    ),
                ))
            }
            Settle::Repair { from, to, error } => {
                let mut source = g.clone();
                source.in_sync = from.iter().map(|i| member(*i).1.brick).collect();
                let frag_len = match self.stat_member(member(from[0]).1, set, key).await {
                    Some(c) if c.held == wrote => c.frag_len,
                    _ => {
                        return Err(ErrorBody::new(
                            ErrorCode::Busy,
                            format!("{key} moved on from version {} during a repair", wrote.0),
                        ));
                    }
                };
                for i in to {
                    let m = member(i).1;
                    tracing::info!(%key, member = %m.brick, version = wrote.0, bytes = frag_len, "member missed or forked a version; sending its whole fragment");
                    let from = CopyFrom::Rebuild {
                        g: &source,
                        codec,
                        f,
                        index: i,
                    };
                    self.copy_object(m, set, key, wrote, frag_len, from).await?;
                }
                error.map_or(Ok(()), Err)
            }
        }
    }

    fn is_unsettled(&self, key: &ObjectKey) -> bool {
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Takes `members` back from version `from` of `key` to `to` on what each kept
    /// (`MemberRollback`): `Ok` when every one is back (or was never there).
    async fn undo_on(
        &self,
        set: SetRef,
        key: ObjectKey,
        from: Held,
        to: Held,
        members: &[(usize, &MemberRef)],
    ) -> Result<(), ErrorBody> {
        let calls = members.iter().map(|(_, m)| async move {
            let r = if let Some(b) = self.bricks.get(&m.brick).cloned() {
                Self::blocking(b, move |b| {
                    b.fence(set.volume.0, set.set, set.epoch.0)?;
                    b.undo(
                        &key,
                        (ObjectVersion(from.0), from.1),
                        (ObjectVersion(to.0), to.1),
                    )
                    .map(|_| ())
                })
                .await
            } else {
                let msg = Message::MemberRollback(brickfs_proto::msg::MemberRollback {
                    brick: m.brick,
                    set,
                    key,
                    from: ObjectVersion(from.0),
                    from_tag: from.1,
                    to: ObjectVersion(to.0),
                    to_tag: to.1,
                });
                self.forward(m, msg, Bytes::new())
                    .await
                    .map_err(|r| match r {
                        brickfs_set::Refusal::Gap => ErrorBody::new(
                            ErrorCode::VersionGap,
                            format!("member {} holds another version", m.brick),
                        ),
                        brickfs_set::Refusal::Failed(e) | brickfs_set::Refusal::Unknown(e) => e,
                    })
            };
            match &r {
                Ok(()) => tracing::warn!(%key, member = %m.brick, from = from.0, to = to.0, "took a member back from a write that failed"),
                Err(e) => tracing::error!(%key, member = %m.brick, error = %e, "could not take a member back from a write that failed"),
            }
            r
        });
        join_all(calls.collect())
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
    }

    /// Takes the members that applied version `wrote` of `key` back to `before` (best
    /// effort: a member that cannot be reached is left for reconcile and heal).
    async fn roll_back(
        &self,
        set: SetRef,
        key: ObjectKey,
        wrote: Held,
        before: Held,
        applied: &[(usize, &MemberRef)],
    ) {
        if !applied.is_empty() {
            let _ = self.undo_on(set, key, wrote, before, applied).await;
        }
    }

    /// What member `m` holds of `key` and what it can go back to (`MemberStat`; version 0:
    /// nothing), as an in-sync member's copy (`taker`); `None` when it cannot answer.
    /// What member `m` holds of `key`, fenced at `set`'s epoch first: from then on the member
    /// refuses a deposed primary's forwards, which could otherwise still count as applied a
    /// write that the caller (a reconcile) takes back. `None` when it did not answer.
    async fn stat_member(
        &self,
        m: &MemberRef,
        set: SetRef,
        key: ObjectKey,
    ) -> Option<brickfs_set::disperse::Copy> {
        let reply = if let Some(b) = self.bricks.get(&m.brick).cloned() {
            Self::blocking(b, move |b| {
                b.fence(set.volume.0, set.set, set.epoch.0)?;
                b.stat_undo(&key)
            })
            .await
            .map(member_stat_reply)
        } else {
            let addr: std::net::SocketAddr = m.addr.parse().ok()?;
            let msg = Message::MemberStat(brickfs_proto::msg::MemberStat {
                brick: m.brick,
                set,
                key,
            });
            match self.peers.call(addr, msg, Bytes::new()).await {
                Ok((Message::MemberStatReply(r), _)) => Ok(r),
                Ok(_) => return None,
                Err(RpcError::Remote(body)) => Err(body),
                Err(_) => return None,
            }
        };
        let r = reply.ok()?;
        Some(brickfs_set::disperse::Copy {
            held: (r.state.version.0, r.state.tag),
            frag_len: r.state.len_bytes,
            undo: r.undo.map(|u| ((u.version.0, u.tag), u.len_bytes)),
            taker: true,
        })
    }

    /// Makes member `m`'s copy of `key` hold `held` (`(0, 0)`: no object): `bytes` is the part
    /// at `offset` of the whole copy, `total` bytes long (see `MemberReplace`).
    #[allow(clippy::too_many_arguments)]
    async fn install(
        &self,
        m: &MemberRef,
        set: SetRef,
        key: ObjectKey,
        held: Held,
        offset: u64,
        total: u64,
        bytes: Bytes,
    ) -> Result<(), ErrorBody> {
        let (version, tag) = (ObjectVersion(held.0), held.1);
        if let Some(b) = self.bricks.get(&m.brick).cloned() {
            return Self::blocking(b, move |b| {
                b.fence(set.volume.0, set.set, set.epoch.0)?;
                if held == (0, 0) {
                    b.delete(&key).map(|_| ())
                } else {
                    apply_replace(b, &key, version, tag, offset, total, &bytes).map(|_| ())
                }
            })
            .await;
        }
        let msg = if held == (0, 0) {
            Message::Delete(brickfs_proto::msg::Delete {
                brick: m.brick,
                key,
            })
        } else {
            Message::MemberReplace(brickfs_proto::msg::MemberReplace {
                brick: m.brick,
                set,
                key,
                version,
                tag,
                offset_bytes: offset,
                total_bytes: total,
            })
        };
        let addr: std::net::SocketAddr = m
            .addr
            .parse()
            .map_err(|_| ErrorBody::new(ErrorCode::InvalidArgument, "member has a bad address"))?;
        self.bulk
            .call(addr, msg, bytes)
            .await
            .map(|_| ())
            .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("member {}: {e}", m.brick)))
    }

    /// Brings the takers' fragments of `key` to one version (`brickfs_set::disperse::reconcile`):
    /// the members that hold a write torn below K go back to the version before on what they
    /// kept, the others are rebuilt from those that hold it. `healing`, members out of sync
    /// (a heal's), help decode and are brought to that version too. The version; `ReadOnly`
    /// when no version can be decoded (nothing is changed).
    async fn reconcile(
        &self,
        g: &DisperseGeometry,
        codec: &ReedSolomonCodec,
        f: u64,
        set: SetRef,
        key: ObjectKey,
        healing: &[(usize, &MemberRef)],
    ) -> Result<Held, ErrorBody> {
        let mut members = Self::takers(g);
        members.extend(healing.iter().copied());
        let stats = join_all(
            members
                .iter()
                .map(|(_, m)| self.stat_member(m, set, key))
                .collect(),
        )
        .await;
        let indexed: Vec<(usize, Option<brickfs_set::disperse::Copy>)> = members
            .iter()
            .zip(stats)
            .map(|((i, m), c)| {
                let taker = !healing.iter().any(|(_, h)| h.brick == m.brick);
                (*i, c.map(|c| brickfs_set::disperse::Copy { taker, ..c }))
            })
            .collect();
        let k = g.data_fragments as usize;
        let Some(r) = brickfs_set::disperse::reconcile(k, &indexed) else {
            return Err(ErrorBody::new(
                ErrorCode::ReadOnly,
                format!(
                    "the fragments of {key} disagree and no version is held by {k} members: it cannot be decoded until more answer ({indexed:?})"
                ),
            ));
        };
        let member = |i: usize| {
            members
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(j, m)| (*j, *m))
                .expect("an index of a member")
        };
        for &i in &r.undo {
            let from = indexed
                .iter()
                .find(|(j, _)| *j == i)
                .and_then(|(_, c)| *c)
                .map(|c| c.held)
                .expect("an answer");
            tracing::warn!(%key, member = %g.members[i].brick, ?from, now = ?r.held, "taking a fragment back from a write torn below K");
            self.undo_on(set, key, from, r.held, &[member(i)]).await?;
        }
        let mut source = g.clone();
        source.in_sync = r.sources.iter().map(|i| g.members[*i].brick).collect();
        for i in r.fix {
            let m = &g.members[i];
            let was = indexed.iter().find(|(j, _)| *j == i).and_then(|(_, s)| *s);
            tracing::warn!(%key, member = %m.brick, ?was, now = ?r.held, "reconciling a fragment the others disagree with");
            if r.held == (0, 0) {
                self.install(m, set, key, r.held, 0, 0, Bytes::new())
                    .await?;
            } else {
                let from = CopyFrom::Rebuild {
                    g: &source,
                    codec,
                    f,
                    index: i,
                };
                self.copy_object(m, set, key, r.held, r.frag_len, from)
                    .await?;
            }
        }
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        Ok(r.held)
    }

    async fn disperse_truncate(
        &self,
        req: brickfs_proto::msg::DisperseTruncate,
    ) -> Result<ObjectState, ErrorBody> {
        let g = req.geometry.clone();
        let (codec, f) = self.disperse_setup(req.brick, &g)?;
        let sb = u64::from(g.data_fragments) * f;
        let len = req.len_bytes;
        // Zero the tail of the last stripe, so bytes past the new end read as zeros if the
        // column grows again, then cut every fragment object to whole stripes.
        if !len.is_multiple_of(sb) {
            let tail = sb - len % sb;
            let zeros = Bytes::from(vec![0u8; tail as usize]);
            let w = brickfs_proto::msg::DisperseWrite {
                brick: req.brick,
                set: req.set,
                key: req.key,
                offset_bytes: len,
                sync: req.sync,
                geometry: g.clone(),
            };
            self.disperse_write(w, zeros).await?;
        }
        let own = self.brick(req.brick)?;
        let frag_len = len.div_ceil(sb) * f;
        self.disperse_mutation(&g, &codec, f, req.set, req.key, || async {
            let (key, set, sync) = (req.key, req.set, req.sync);
            let degraded = Self::degraded(&g);
            let (have, _) = Self::held_here(&own, set, key).await?;
            let version = ObjectVersion(have.0 + 1);
            let tag = self.new_tag();
            let takers = Self::takers(&g);
            let calls = takers
                .iter()
                .map(|(_, m)| {
                    let m = (*m).clone();
                    async move {
                        if let Some(b) = self.bricks.get(&m.brick).cloned() {
                            let m = Mutation::Truncate {
                                len_bytes: frag_len,
                                undo: true,
                            };
                            let rule = VersionRule::Exactly {
                                version,
                                tag,
                                parent: have.1,
                            };
                            return Self::apply_fenced(b, set, key, m, sync, rule, degraded)
                                .await
                                .map(|_| ())
                                .map_err(refusal);
                        }
                        let msg = Message::MemberTruncate(MemberTruncate {
                            brick: m.brick,
                            set,
                            key,
                            len_bytes: frag_len,
                            version,
                            tag,
                            parent_tag: have.1,
                            sync,
                            degraded,
                            undo: true,
                        });
                        self.forward(&m, msg, Bytes::new()).await
                    }
                })
                .collect();
            let results = join_all(calls).await;
            self.settle(
                &g,
                &codec,
                f,
                set,
                key,
                ((version.0, tag), have),
                takers,
                results,
                true,
            )
            .await?;
            Ok(ObjectState {
                version,
                len_bytes: len,
                tag,
            })
        })
        .await
    }

    /// Brings a member out of sync up to date (see `HealObjects`).
    async fn heal_objects(
        &self,
        req: brickfs_proto::msg::HealObjects,
    ) -> Result<brickfs_proto::msg::Healed, ErrorBody> {
        let own = self.brick(req.brick)?;
        let set = req.set;
        Self::blocking(own.clone(), move |b| {
            b.fence(set.volume.0, set.set, set.epoch.0)
        })
        .await?;
        // Fragments are rebuilt from every other member: decoding only ever combines one
        // version (the newest that K members hold) and must match the primary's, so members
        // out of sync that still hold the current version of an object help too — which lets
        // a set that lost more members than its redundancy, one of which still holds current
        // fragments, heal at all.
        let sources = req.geometry.as_ref().map(|g| {
            let mut s = g.clone();
            s.in_sync = g
                .members
                .iter()
                .map(|m| m.brick)
                .filter(|b| *b != req.target.brick)
                .collect();
            s
        });
        let codec = match &sources {
            Some(g) => Some(self.disperse_setup(req.brick, g)?),
            None => None,
        };
        // The set's in-sync members, the target aside.
        let takers = req.geometry.as_ref().map(|g| {
            let mut t = g.clone();
            if t.in_sync.is_empty() {
                t.in_sync = g.members.iter().map(|m| m.brick).collect();
            }
            t.in_sync.retain(|b| *b != req.target.brick);
            t
        });
        let target_index = match &req.geometry {
            Some(g) => Some(
                g.members
                    .iter()
                    .position(|m| m.brick == req.target.brick)
                    .ok_or_else(|| {
                        ErrorBody::new(ErrorCode::InvalidArgument, "heal target is not a member")
                    })?,
            ),
            None => None,
        };
        let target: std::net::SocketAddr = req.target.addr.parse().map_err(|_| {
            ErrorBody::new(ErrorCode::InvalidArgument, "heal target has a bad address")
        })?;
        // A barrier holds the set's gate: no write of this set runs meanwhile (other sets'
        // go on).
        let gate = self.gate(set);
        let barrier = if req.barrier {
            Some(gate.write().await)
        } else {
            None
        };
        let mut out = brickfs_proto::msg::Healed {
            scanned: 0,
            copied: 0,
            bytes: 0,
            last: None,
            more: false,
            mark: own.journal_mark(),
        };
        let mut after = req.after;
        loop {
            // A returning member: only what was journaled while it was away; else everything.
            let (journal, vol, index, since) = (req.journal, set.volume.0, set.set, req.since);
            let (page, more) = Self::blocking(own.clone(), move |b| {
                if journal {
                    b.journal_list(vol, index, after, 256, since)
                } else {
                    b.list(after, 256)
                        .map(|(p, more)| (p.into_iter().map(|(k, _)| k).collect(), more))
                }
            })
            .await?;
            for key in &page {
                let key = *key;
                out.scanned += 1;
                let _order = if req.barrier {
                    None
                } else {
                    Some(self.ordering_lock(&key).lock().await)
                };
                // A disperse primary's own fragment is not the object: it may have missed
                // writes that K others applied, or hold one torn below K. The takers (and
                // the target, which helps decode) are reconciled first.
                if let (Some(g), Some((codec, f)), Some(_)) = (&takers, &codec, target_index) {
                    // Every member out of sync helps (the target first of all): a set that
                    // lost more members than its redundancy heals from them.
                    let helpers: Vec<(usize, &MemberRef)> = g
                        .members
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| !g.in_sync.contains(&m.brick))
                        .collect();
                    self.reconcile(g, codec, *f, set, key, &helpers)
                        .await
                        .map_err(|e| {
                            ErrorBody::new(
                                e.kind().unwrap_or(ErrorCode::Io),
                                format!("heal of {key}: {}", e.detail),
                            )
                        })?;
                }
                let mine = match Self::blocking(own.clone(), move |b| b.stat(&key)).await {
                    Ok(m) => m,
                    Err(e) if e.kind() == Some(ErrorCode::NotFound) => continue,
                    Err(e) => return Err(e),
                };
                let theirs = match self
                    .peers
                    .call(
                        target,
                        Message::Stat(brickfs_proto::msg::Stat {
                            brick: req.target.brick,
                            key,
                        }),
                        Bytes::new(),
                    )
                    .await
                {
                    Ok((Message::StatReply(st), _)) => Some(st),
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => None,
                    Ok(_) => None,
                    Err(e) => {
                        return Err(ErrorBody::new(
                            ErrorCode::Io,
                            format!("heal target {}: {e}", req.target.brick),
                        ));
                    }
                };
                let expect_len = mine.len_bytes;
                if theirs.is_some_and(|t| {
                    t.version == mine.version && t.tag == mine.tag && t.len_bytes == expect_len
                }) {
                    continue;
                }
                let held = (mine.version.0, mine.tag);
                let from = match (&sources, &codec, target_index) {
                    (Some(g), Some((codec, f)), Some(index)) => CopyFrom::Rebuild {
                        g,
                        codec,
                        f: *f,
                        index,
                    },
                    _ => CopyFrom::Local(own.clone()),
                };
                out.bytes += self
                    .copy_object(&req.target, set, key, held, mine.len_bytes, from)
                    .await
                    .map_err(|e| {
                        ErrorBody::new(
                            e.kind().unwrap_or(ErrorCode::Io),
                            format!("heal target {}: {}", req.target.brick, e.detail),
                        )
                    })?;
                out.copied += 1;
            }
            out.last = page.last().copied().or(out.last);
            after = out.last;
            if !more {
                break;
            }
            if !req.barrier && out.scanned >= u64::from(req.limit.max(1)) {
                out.more = true;
                break;
            }
        }
        drop(barrier);
        Ok(out)
    }

    /// Rebuilds `len` bytes at `offset` (whole stripes: multiples of `f`) of member `index`'s
    /// fragment object of a disperse column from the in-sync members, at the version the
    /// primary holds.
    #[allow(clippy::too_many_arguments)]
    async fn rebuild_fragment(
        &self,
        g: &DisperseGeometry,
        codec: &ReedSolomonCodec,
        f: u64,
        key: ObjectKey,
        version: Held,
        offset: u64,
        len: u64,
        index: usize,
    ) -> Result<Bytes, ErrorBody> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let stripes = len.div_ceil(f) as usize;
        let reads = g
            .members
            .iter()
            .map(|m| async move {
                if Self::takes_fragments(g, m.brick) {
                    self.read_fragment(m, key, offset, stripes as u64 * f).await
                } else {
                    None
                }
            })
            .collect();
        let frags = join_all(reads).await;
        let (v, data) = decode_stripes(codec, &frags, f as usize, stripes)
            .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("{key} cannot be rebuilt: {e}")))?;
        if v != version {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                format!(
                    "{key} decodes at version {}/{:x}, the primary holds {}/{:x}",
                    v.0, v.1, version.0, version.1
                ),
            ));
        }
        let mut frags = encode_stripes(codec, &data, f as usize)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, format!("encode: {e}")))?;
        let mut mine = std::mem::take(&mut frags[index]);
        mine.truncate(len as usize);
        Ok(Bytes::from(mine))
    }

    /// Applies a mutation to a brick this node serves under a set's epoch: fence first (an
    /// older epoch is refused, a newer one recorded), then journal the object if the set is
    /// `degraded` (or forget the set's journal: every member is in sync at this epoch), then
    /// write or truncate under `rule`. The object's state after, and the tag it held before
    /// (the parent of the version made).
    #[allow(clippy::too_many_arguments)]
    async fn apply_fenced(
        brick: Arc<BrickStore>,
        set: SetRef,
        key: ObjectKey,
        mutation: Mutation,
        sync: bool,
        rule: VersionRule,
        degraded: bool,
    ) -> Result<(crate::store::ObjectMeta, u64), ErrorBody> {
        Self::blocking(brick, move |b| {
            b.fence(set.volume.0, set.set, set.epoch.0)?;
            if degraded {
                b.journal_add(set.volume.0, set.set, &key)?;
            } else {
                b.journal_forget(set.volume.0, set.set)?;
            }
            let parent = match b.stat(&key) {
                Ok(m) => m.tag,
                Err(StoreError::NotFound { .. }) => 0,
                Err(e) => return Err(e),
            };
            let meta = match mutation {
                Mutation::Write {
                    offset_bytes,
                    data,
                    undo: false,
                } => b.write_versioned(&key, offset_bytes, &data, sync, rule),
                Mutation::Write {
                    offset_bytes,
                    data,
                    undo: true,
                } => b.write_undoable(&key, offset_bytes, &data, sync, rule),
                Mutation::Truncate {
                    len_bytes,
                    undo: false,
                } => b.truncate_versioned(&key, len_bytes, sync, rule),
                Mutation::Truncate {
                    len_bytes,
                    undo: true,
                } => b.truncate_undoable(&key, len_bytes, sync, rule),
            }?;
            Ok((meta, parent))
        })
        .await
    }

    /// Applies a primary's forward (`MemberWrite`/`MemberTruncate`) to one of this node's
    /// bricks at exactly the version and tag the primary gave it.
    #[allow(clippy::too_many_arguments)]
    async fn apply_forward(
        &self,
        brick: BrickId,
        set: SetRef,
        key: ObjectKey,
        mutation: Mutation,
        sync: bool,
        (version, tag, parent): (ObjectVersion, u64, u64),
        degraded: bool,
    ) -> Result<crate::store::ObjectMeta, ErrorBody> {
        let rule = VersionRule::Exactly {
            version,
            tag,
            parent,
        };
        Self::apply_fenced(self.brick(brick)?, set, key, mutation, sync, rule, degraded)
            .await
            .map(|(meta, _)| meta)
    }

    fn info(brick: &BrickStore) -> BrickInfo {
        BrickInfo {
            id: brick.id(),
            path: brick.root().to_string_lossy().into_owned(),
        }
    }

    async fn blocking<T: Send + 'static>(
        brick: Arc<BrickStore>,
        op: impl FnOnce(&BrickStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ErrorBody> {
        let id = brick.id();
        match tokio::task::spawn_blocking(move || op(&brick)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                match &e {
                    StoreError::Io { .. } | StoreError::Db(_) | StoreError::Corrupt(_) => {
                        tracing::warn!(brick = %id, error = %e, "failed to serve a request");
                    }
                    _ => tracing::debug!(brick = %id, error = %e, "request refused"),
                }
                Err(e.to_wire())
            }
            Err(e) => Err(ErrorBody::new(
                ErrorCode::Internal,
                format!("brick task failed: {e}"),
            )),
        }
    }

    async fn dispatch(&self, msg: Message, data: Bytes) -> Result<(Message, Bytes), ErrorBody> {
        let none = Bytes::new();
        // Every set mutation goes through a primary: a primary without a lease refuses it
        // before applying anything. Members do not check (a member refusing while its primary
        // applied would tear a disperse stripe); a stale primary cannot reach them anyway.
        // Reads are leased too: a node cut off from the group stops serving them before the
        // group can move its sets and the others take writes it would not see (its reads
        // would be stale). Reads a primary makes of its own bricks do not come through here.
        if matches!(
            msg,
            Message::SetWrite(_)
                | Message::SetTruncate(_)
                | Message::DisperseWrite(_)
                | Message::DisperseTruncate(_)
                | Message::HealObjects(_)
                | Message::Read(_)
        ) {
            self.check_lease()?;
        }
        Ok(match msg {
            Message::Ping(_) => (Message::Pong(Pong { node: self.node }), none),
            Message::ListBricks(_) => {
                let mut bricks: Vec<BrickInfo> =
                    self.bricks.values().map(|b| Self::info(b)).collect();
                bricks.sort_by(|a, b| a.path.cmp(&b.path));
                (Message::BrickList(BrickList { bricks }), none)
            }
            Message::OpenBrick(req) => {
                validate_brick_path(&req.path)?;
                let found = self
                    .bricks
                    .values()
                    .find(|b| b.root().as_os_str() == req.path.as_str())
                    .ok_or_else(|| {
                        ErrorBody::new(
                            ErrorCode::UnknownBrick,
                            format!("node {} serves no brick at {}", self.node, req.path),
                        )
                    })?;
                (Message::BrickOpened(Self::info(found)), none)
            }
            Message::Write(req) => {
                let brick = self.brick(req.brick)?;
                let meta = Self::blocking(brick, move |b| {
                    b.write(&req.key, req.offset_bytes, &data, req.sync)
                })
                .await?;
                (Message::Written(state(meta)), none)
            }
            Message::Read(req) => {
                let brick = self.brick(req.brick)?;
                let most = brickfs_proto::frame::Limits::default().data_max_bytes;
                if req.len_bytes > most {
                    // Its reply would not fit a frame: refused before anything is read.
                    return Err(ErrorBody::new(
                        ErrorCode::TooLarge,
                        format!(
                            "a read of {} bytes is more than one reply carries ({most}): read in pieces",
                            req.len_bytes
                        ),
                    ));
                }
                if !req.repair {
                    self.check_standing(req.brick, &req.key)?;
                }
                let (meta, bytes) = Self::blocking(brick, move |b| {
                    b.read(&req.key, req.offset_bytes, u64::from(req.len_bytes))
                })
                .await?;
                (Message::ReadData(ReadData { state: state(meta) }), bytes)
            }
            Message::Truncate(req) => {
                let brick = self.brick(req.brick)?;
                let meta = Self::blocking(brick, move |b| {
                    b.truncate(&req.key, req.len_bytes, req.sync)
                })
                .await?;
                (Message::Truncated(state(meta)), none)
            }
            Message::Delete(req) => {
                let brick = self.brick(req.brick)?;
                let existed = Self::blocking(brick, move |b| b.delete(&req.key)).await?;
                (Message::Deleted(Deleted { existed }), none)
            }
            Message::Fsync(req) => {
                let brick = self.brick(req.brick)?;
                let meta = Self::blocking(brick, move |b| b.fsync(&req.key)).await?;
                (Message::Synced(state(meta)), none)
            }
            Message::Stat(req) => {
                let brick = self.brick(req.brick)?;
                let meta = Self::blocking(brick, move |b| b.stat(&req.key)).await?;
                (Message::StatReply(state(meta)), none)
            }
            Message::Seal(req) => {
                let brick = self.brick(req.brick)?;
                let meta = Self::blocking(brick, move |b| b.seal(&req.key, req.action)).await?;
                tracing::debug!(brick = %req.brick, key = %req.key, action = ?req.action, "seal");
                (Message::Sealed(state(meta)), none)
            }
            Message::List(req) => {
                let brick = self.brick(req.brick)?;
                let (objects, more) =
                    Self::blocking(brick, move |b| b.list(req.after, req.limit as usize)).await?;
                let objects = objects
                    .into_iter()
                    .map(|(key, meta)| ListedObject {
                        key,
                        state: state(meta),
                    })
                    .collect();
                (Message::ListReply(ListReply { objects, more }), none)
            }
            Message::Statfs(req) => {
                let brick = self.brick(req.brick)?;
                let st = Self::blocking(brick, |b| b.statfs()).await?;
                (
                    Message::StatfsReply(StatfsReply {
                        total_bytes: st.total_bytes,
                        free_bytes: st.free_bytes,
                        avail_bytes: st.avail_bytes,
                        objects: st.objects,
                    }),
                    none,
                )
            }
            Message::SetWrite(req) => {
                let m = Mutation::Write {
                    offset_bytes: req.offset_bytes,
                    data: data.clone(),
                    undo: false,
                };
                let meta = self
                    .replica_mutation(
                        req.brick,
                        req.set,
                        req.key,
                        &req.members,
                        m,
                        req.sync,
                        req.degraded,
                    )
                    .await?;
                (Message::Written(state(meta)), none)
            }
            Message::SetTruncate(req) => {
                let m = Mutation::Truncate {
                    len_bytes: req.len_bytes,
                    undo: false,
                };
                let meta = self
                    .replica_mutation(
                        req.brick,
                        req.set,
                        req.key,
                        &req.members,
                        m,
                        req.sync,
                        req.degraded,
                    )
                    .await?;
                (Message::Truncated(state(meta)), none)
            }
            Message::DisperseWrite(req) => {
                let st = self.disperse_write(req, data).await?;
                (Message::Written(st), none)
            }
            Message::DisperseTruncate(req) => {
                let st = self.disperse_truncate(req).await?;
                (Message::Truncated(st), none)
            }
            Message::MemberWrite(req) => {
                let m = Mutation::Write {
                    offset_bytes: req.offset_bytes,
                    data,
                    undo: req.undo,
                };
                let meta = self
                    .apply_forward(
                        req.brick,
                        req.set,
                        req.key,
                        m,
                        req.sync,
                        (req.version, req.tag, req.parent_tag),
                        req.degraded,
                    )
                    .await?;
                (Message::Written(state(meta)), none)
            }
            Message::ScrubStatus(req) => {
                self.brick(req.brick)?;
                let report = self
                    .scrub
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&req.brick)
                    .cloned()
                    .unwrap_or_default();
                (Message::ScrubReply(report), none)
            }
            Message::HealObjects(req) => (Message::HealReply(self.heal_objects(req).await?), none),
            Message::MemberRollback(req) => {
                let brick = self.brick(req.brick)?;
                let set = req.set;
                let meta = Self::blocking(brick, move |b| {
                    b.fence(set.volume.0, set.set, set.epoch.0)?;
                    b.undo(&req.key, (req.from, req.from_tag), (req.to, req.to_tag))
                })
                .await?;
                (
                    Message::Written(meta.map_or(
                        ObjectState {
                            version: ObjectVersion(0),
                            len_bytes: 0,
                            tag: 0,
                        },
                        state,
                    )),
                    none,
                )
            }
            Message::MemberStat(req) => {
                let brick = self.brick(req.brick)?;
                let (key, set) = (req.key, req.set);
                let reply = Self::blocking(brick, move |b| {
                    b.fence(set.volume.0, set.set, set.epoch.0)?;
                    b.stat_undo(&key)
                })
                .await?;
                (Message::MemberStatReply(member_stat_reply(reply)), none)
            }
            Message::MemberReplace(req) => {
                let brick = self.brick(req.brick)?;
                let set = req.set;
                let meta = Self::blocking(brick, move |b| {
                    b.fence(set.volume.0, set.set, set.epoch.0)?;
                    apply_replace(
                        b,
                        &req.key,
                        req.version,
                        req.tag,
                        req.offset_bytes,
                        req.total_bytes,
                        &data,
                    )
                })
                .await?;
                (Message::Written(state(meta)), none)
            }
            Message::MemberTruncate(req) => {
                let m = Mutation::Truncate {
                    len_bytes: req.len_bytes,
                    undo: req.undo,
                };
                let meta = self
                    .apply_forward(
                        req.brick,
                        req.set,
                        req.key,
                        m,
                        req.sync,
                        (req.version, req.tag, req.parent_tag),
                        req.degraded,
                    )
                    .await?;
                (Message::Truncated(state(meta)), none)
            }
            other => {
                return Err(ErrorBody::new(
                    ErrorCode::Malformed,
                    format!("{} is not a request this node serves", other.name()),
                ));
            }
        })
    }
}

impl Handler for BrickService {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn handle(&self, msg: Message, data: Bytes) -> Result<(Message, Bytes), ErrorBody> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ErrorBody::new(
                ErrorCode::ShuttingDown,
                "node is shutting down",
            ));
        }
        self.dispatch(msg, data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brick_paths_are_validated() {
        for good in ["/data/b1", "/a", "/srv/brick-1/x_y.z"] {
            assert!(validate_brick_path(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "data/b1",
            "/",
            "/data/../etc",
            "/data/./b",
            "/data//b",
            "/data/b/",
            "/a\0b",
            "/..",
        ] {
            let err = validate_brick_path(bad).unwrap_err();
            assert!(err.is(ErrorCode::InvalidPath), "{bad:?}");
        }
        assert!(validate_brick_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}
