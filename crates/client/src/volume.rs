//! The data path of a volume through the client library: files are created and found through
//! the metadata group; their bytes are cut into stripe units across the columns of their
//! stripe group (`brickfs-layout`), and each column goes to its set — straight to the brick of a
//! one-brick set, through the primary of a replica set (which orders, versions and fans out).
//! Reads of a replica set are spread over its in-sync members.
//!
//! A disperse set's column goes to its primary, which reads back partial stripes, encodes and
//! writes fragment i of each stripe to member i; reads fetch the K data fragments in parallel
//! and decode (with the parity fragments too when a data fragment is missing or of another
//! version): only fragments of one version are ever combined.
//!
//! File size lives in the metadata group: writers commit the highest end they wrote on `fsync`
//! and `close` (taking the maximum, so concurrent writers never shrink a file).

use crate::brick::BrickClient;
use crate::meta::{MetaClient, MetaError};
use brickfs_erasure::{FragmentRead, ReedSolomonCodec, decode_stripes};
use brickfs_layout::DISPERSE_FRAGMENT_BYTES;
use brickfs_layout::{column_len, merge_contiguous, split_range};

/// The largest request one piece of a read or write becomes (below the protocol's data limit).
const PIECE_MAX_BYTES: u64 = 8 << 20;
use brickfs_proto::meta::{
    Attr, FileKind, GcItem, MetaOp, MetaRead, MetaReply, SetAttr, SetState, VolumeRecord,
};
use brickfs_proto::msg::{
    DisperseGeometry, DisperseTruncate, DisperseWrite, MemberRef, SetRef, SetTruncate, SetWrite,
};
use brickfs_proto::rpc::{RpcError, join_all};
use brickfs_proto::{BrickId, ErrorBody, ErrorCode, Ino, Message, ObjectKey};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Why a data-path call failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("brick {brick}: {source}")]
    Brick {
        brick: BrickId,
        #[source]
        source: RpcError,
    },
    #[error("{0}")]
    Refused(ErrorBody),
    /// No in-sync member holds an object the file's size says must exist (every column
    /// object of a file with data exists from its first write or truncate on): its data is
    /// lost or held only by members out of sync. An error, never a hole of zeros.
    #[error(
        "object {key} is held by no in-sync member of its set, though the file's size covers it"
    )]
    Lost { key: ObjectKey },
}

impl VolumeError {
    /// The POSIX-shaped code, when there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            VolumeError::Meta(e) => e.code(),
            VolumeError::Brick { source, .. } => source.code(),
            VolumeError::Refused(b) => b.kind(),
            VolumeError::Lost { .. } => Some(ErrorCode::Io),
        }
    }
}

/// The node address of a volume's brick (`HOST:PORT` of its `HOST:PORT:/PATH`).
pub fn brick_addr(b: &brickfs_proto::meta::VolumeBrick) -> Result<SocketAddr, VolumeError> {
    let host = b.addr.rsplit_once(":/").map_or(b.addr.as_str(), |(h, _)| h);
    host.parse().map_err(|_| {
        refused(
            ErrorCode::InvalidArgument,
            format!("brick {} has no HOST:PORT address", b.addr),
        )
    })
}

/// How long set calls are retried by default: longer than the metadata group takes to notice a
/// silent node (10 s by default) and change its sets.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(30);

/// Whether a failed set call may succeed once the sets change: a brick that cannot be reached
/// or failed, a stale epoch, a primary shutting down.
fn retryable(e: &VolumeError) -> bool {
    match e {
        VolumeError::Meta(_) => false,
        VolumeError::Brick { source, .. } => !matches!(
            source.code(),
            Some(
                ErrorCode::InvalidArgument
                    | ErrorCode::NoSpace
                    | ErrorCode::ReadOnly
                    | ErrorCode::VersionGap
                    | ErrorCode::TooLarge
                    | ErrorCode::ChecksumMismatch
                    | ErrorCode::PermissionDenied
            )
        ),
        VolumeError::Refused(b) => matches!(
            b.kind(),
            Some(ErrorCode::Io | ErrorCode::StaleEpoch | ErrorCode::ShuttingDown | ErrorCode::Busy)
        ),
        // The sets may have changed (a member back in sync holds it), or a writer on another
        // mount committed the size a moment before its first bytes land: look again, briefly.
        VolumeError::Lost { .. } => true,
    }
}

/// How long a read keeps looking for an object that must exist before saying it is lost.
const LOST_WINDOW: Duration = Duration::from_secs(2);

fn refused(code: ErrorCode, detail: impl Into<String>) -> VolumeError {
    VolumeError::Refused(ErrorBody::new(code, detail))
}

/// An open file: its attributes at open and the highest end written since.
pub struct FileHandle {
    pub attr: Attr,
    /// The stripe group holding its data: `attr.group` until a rebalance moves the file.
    group: std::sync::atomic::AtomicU32,
    /// The furthest end written through this handle since its last commit (0: none).
    dirty_end: AtomicU64,
    /// When this handle last wrote, in ns since the epoch, if not committed yet (0: no
    /// write since the last commit). The commit makes it the file's mtime.
    modified_ns: std::sync::atomic::AtomicI64,
    size: AtomicU64,
    /// Whether this handle made sure every column object of the file exists (see `write`).
    columns_made: std::sync::atomic::AtomicBool,
}

impl FileHandle {
    /// A handle for a file whose attributes the caller got from the metadata group.
    pub fn new(attr: Attr) -> FileHandle {
        FileHandle {
            group: std::sync::atomic::AtomicU32::new(attr.group),
            dirty_end: AtomicU64::new(0),
            modified_ns: std::sync::atomic::AtomicI64::new(0),
            size: AtomicU64::new(attr.size_bytes),
            columns_made: std::sync::atomic::AtomicBool::new(false),
            attr,
        }
    }

    /// The stripe group this handle reads and writes.
    pub fn group(&self) -> u32 {
        self.group.load(Ordering::SeqCst)
    }

    /// A handle on the file's data in group `group` (the rebalancer's source or target),
    /// `size_bytes` long.
    pub fn in_group(attr: &Attr, group: u32, size_bytes: u64) -> FileHandle {
        let mut attr = attr.clone();
        attr.group = group;
        attr.size_bytes = size_bytes;
        FileHandle::new(attr)
    }

    /// The size this handle knows: at open, grown by its own writes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Records a truncate made through another handle of the same file (after this one's
    /// writes were sent): nothing it wrote past `len` is left to commit.
    pub fn set_size(&self, len: u64) {
        self.size.store(len, Ordering::SeqCst);
        self.dirty_end.fetch_min(len, Ordering::SeqCst);
    }

    /// Takes the size the metadata group has now (another mount may have cut or grown the
    /// file), kept at least as large as what this handle wrote and has not committed.
    pub fn refresh_size(&self, committed: u64) {
        let dirty = self.dirty_end.load(Ordering::SeqCst);
        self.size.store(committed.max(dirty), Ordering::SeqCst);
    }

    /// Records a change of the file's data at `ns` (mountd stamps writes when it accepts
    /// them, before write-behind sends them).
    pub fn modified(&self, ns: i64) {
        self.modified_ns.fetch_max(ns.max(1), Ordering::SeqCst);
    }

    /// When this handle changed the file without committing it yet, if it did.
    pub fn modified_at(&self) -> Option<i64> {
        let ns = self.modified_ns.load(Ordering::SeqCst);
        (ns != 0).then_some(ns)
    }

    /// Whether this handle has writes whose size or time are not committed yet.
    pub fn dirty(&self) -> bool {
        self.dirty_end.load(Ordering::SeqCst) != 0 || self.modified_ns.load(Ordering::SeqCst) != 0
    }
}

/// Now, in ns since the epoch (file times).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A volume's space for file data (`VolumeClient::statfs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VolumeSpace {
    pub total_bytes: u64,
    pub avail_bytes: u64,
}

/// A volume opened by a client.
pub struct VolumeClient {
    meta: MetaClient,
    pub(crate) bricks: BrickClient,
    vol: VolumeRecord,
    /// The sets as last read from the metadata group (refreshed when a set call fails).
    sets: std::sync::RwLock<Arc<Vec<SetState>>>,
    /// How long a failing set call is retried (refreshing the sets) before its error stands.
    retry_window_ms: std::sync::atomic::AtomicU64,
    /// Node addresses of every brick the volume has had (a replaced brick's entry stays;
    /// refreshes add new ones before the sets that name them).
    addrs: std::sync::RwLock<HashMap<BrickId, SocketAddr>>,
    spread: AtomicUsize,
    codec: Option<ReedSolomonCodec>,
    /// Calls, errors, bytes and latency of the data operations (see `metrics`).
    metrics: brickfs_proto::metrics::OpMetrics,
    /// Whether the volume has directory quotas (its `quota` option), and when that was read:
    /// with quotas, a write past a file's end commits the new size first (EDQUOT before any
    /// byte is written).
    quota: std::sync::atomic::AtomicBool,
    quota_read_at: std::sync::Mutex<std::time::Instant>,
}

/// How long a client trusts what it read of the volume's `quota` option.
const QUOTA_RECHECK: Duration = Duration::from_secs(5);

fn has_quota(options: &[(String, String)]) -> bool {
    options.iter().any(|(k, v)| k == "quota" && v == "on")
}

impl VolumeClient {
    /// Opens volume `name`: reads its record and resolves its bricks' addresses.
    pub async fn open(
        meta: MetaClient,
        bricks: BrickClient,
        name: &str,
    ) -> Result<Arc<VolumeClient>, VolumeError> {
        let vol = crate::admin::volume_info(&meta, name)
            .await
            .map_err(|e| match e {
                crate::admin::AdminError::Meta(m) => VolumeError::Meta(m),
                other => refused(ErrorCode::Io, other.to_string()),
            })?;
        let mut addrs = HashMap::new();
        for b in &vol.bricks {
            addrs.insert(b.brick, brick_addr(b)?);
        }
        let codec = if vol.disperse_data > 0 {
            Some(
                ReedSolomonCodec::new(vol.disperse_data as usize, vol.disperse_redundancy as usize)
                    .map_err(|e| refused(ErrorCode::InvalidArgument, e.to_string()))?,
            )
        } else {
            None
        };
        let vol_options = vol.options.clone();
        Ok(Arc::new(VolumeClient {
            meta,
            bricks,
            sets: std::sync::RwLock::new(Arc::new(vol.sets.clone())),
            retry_window_ms: std::sync::atomic::AtomicU64::new(
                DEFAULT_RETRY_WINDOW.as_millis() as u64
            ),
            vol,
            addrs: std::sync::RwLock::new(addrs),
            spread: AtomicUsize::new(0),
            codec,
            metrics: Default::default(),
            quota: std::sync::atomic::AtomicBool::new(has_quota(&vol_options)),
            quota_read_at: std::sync::Mutex::new(std::time::Instant::now()),
        }))
    }

    /// What this client's data operations did (read, write, fsync, truncate), for Prometheus.
    pub fn metrics(&self) -> &brickfs_proto::metrics::OpMetrics {
        &self.metrics
    }

    /// The volume as read at open (its sets may have changed since: see `sets`).
    pub fn record(&self) -> &VolumeRecord {
        &self.vol
    }

    /// The sets as this client last saw them.
    pub fn sets(&self) -> Arc<Vec<SetState>> {
        self.sets.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How long a set call that fails (a member or primary gone) is retried while the
    /// metadata group changes the set, before its error stands.
    pub fn set_retry_window(&self, window: Duration) {
        self.retry_window_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// Reads the volume's sets again.
    pub async fn refresh(&self) -> Result<(), VolumeError> {
        let reply = self
            .meta
            .read(MetaRead::VolumeByName {
                name: self.vol.name.clone(),
            })
            .await?;
        let MetaReply::Volume(v) = reply else {
            return Err(refused(
                ErrorCode::Internal,
                "unexpected reply to VolumeByName",
            ));
        };
        if v.id != self.vol.id {
            return Err(refused(
                ErrorCode::NotFound,
                format!("volume {} was deleted and made again", self.vol.name),
            ));
        }
        // A replaced brick brings a new address: known before any set names it.
        let mut known = Vec::with_capacity(v.bricks.len());
        for b in &v.bricks {
            known.push((b.brick, brick_addr(b)?));
        }
        self.addrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(known);
        *self.sets.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v.sets);
        self.quota.store(has_quota(&v.options), Ordering::Relaxed);
        *self.quota_read_at.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        Ok(())
    }

    /// Whether the volume had quotas when last looked at (no look now).
    pub fn quota_known(&self) -> bool {
        self.quota.load(Ordering::Relaxed)
    }

    /// Whether the volume has quotas, read again when the last look is old.
    async fn quota_on(&self) -> bool {
        let age = self
            .quota_read_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if age > QUOTA_RECHECK {
            self.refresh_within(Duration::from_secs(2)).await;
        }
        self.quota.load(Ordering::Relaxed)
    }

    /// The least in-sync members a set needs to take writes (`brickfs_set::quorum`).
    pub fn quorum(&self) -> usize {
        let v = &self.vol;
        brickfs_set::quorum::write_quorum(
            v.quorum_option(),
            v.replica as usize,
            v.disperse_data as usize,
            v.set_width(),
        )
    }

    /// Refuses writes to a set below its quorum (EROFS): reads go on.
    fn check_quorum(&self, index: usize, set: &SetState) -> Result<(), VolumeError> {
        let q = self.quorum();
        if set.in_sync.len() < q {
            return Err(refused(
                ErrorCode::ReadOnly,
                format!(
                    "set {index} of volume {} has {} of {} members in sync, below its quorum of {q}: read-only until they heal",
                    self.vol.name,
                    set.in_sync.len(),
                    set.members.len()
                ),
            ));
        }
        Ok(())
    }

    /// Re-reads the sets, giving up after `limit` (the metadata group may be unreachable too:
    /// a retry window must not stretch to the group client's own deadline).
    async fn refresh_within(&self, limit: Duration) {
        match tokio::time::timeout(limit, self.refresh()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "could not re-read the volume's sets"),
            Err(_) => tracing::debug!(?limit, "re-reading the volume's sets timed out"),
        }
    }

    /// Runs a set call; when it fails in a way a changed set can cure (a brick gone, a stale
    /// epoch), reads the sets again and retries with backoff until the retry window closes.
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        fh: &FileHandle,
        call: F,
    ) -> Result<T, VolumeError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, VolumeError>>,
    {
        let window = Duration::from_millis(self.retry_window_ms.load(Ordering::Relaxed));
        let start = std::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut refreshed_for_quorum = false;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                // Read-only by this client's view of the sets, which may be old: look again
                // once before saying so.
                Err(e) if e.code() == Some(ErrorCode::ReadOnly) && !refreshed_for_quorum => {
                    refreshed_for_quorum = true;
                    if let Err(r) = self.refresh().await {
                        tracing::debug!(error = %r, "could not re-read the volume's sets");
                        return Err(e);
                    }
                }
                // The file moved (or is moving) to another stripe group: follow it.
                Err(e)
                    if e.code() == Some(ErrorCode::Moved) && start.elapsed() + backoff < window =>
                {
                    match self.follow_move(fh).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::debug!(what, ino = %fh.attr.ino, "file is moving; waiting for it");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                        Err(r) => {
                            tracing::debug!(error = %r, "could not read where the file moved");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                Err(e)
                    if retryable(&e)
                        && (start.elapsed() + backoff >= window
                            || matches!(e, VolumeError::Lost { .. })
                                && start.elapsed() + backoff >= LOST_WINDOW) =>
                {
                    if let VolumeError::Lost { key } = &e {
                        tracing::error!(%key, "an object of a file with data is missing from every in-sync member: reads of it fail with EIO");
                    }
                    // Out of time: look at the sets once more (briefly), so that the caller's
                    // next try goes where they are now (one call may have used the window).
                    self.refresh_within(Duration::from_secs(2)).await;
                    return Err(e);
                }
                Err(e) if retryable(&e) => {
                    tracing::debug!(what, error = %e, "set call failed; re-reading the sets and retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    let left = window.saturating_sub(start.elapsed());
                    self.refresh_within(left.max(Duration::from_secs(1))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// Reads the file's stripe group again (a rebalance moved it): true when it changed.
    pub async fn follow_move(&self, fh: &FileHandle) -> Result<bool, VolumeError> {
        let attr = Self::attr(
            self.meta
                .read(MetaRead::GetAttr {
                    volume: self.vol.id,
                    ino: fh.attr.ino,
                })
                .await?,
        )?;
        let old = fh.group.swap(attr.group, Ordering::SeqCst);
        if old != attr.group {
            tracing::debug!(ino = %fh.attr.ino, from = old, to = attr.group, "file moved to another stripe group");
        }
        Ok(old != attr.group)
    }

    fn attr(reply: MetaReply) -> Result<Attr, VolumeError> {
        match reply {
            MetaReply::Attr(a) => Ok(a),
            other => Err(refused(
                ErrorCode::Internal,
                format!("unexpected answer {other:?}"),
            )),
        }
    }

    /// Creates a regular file (`exclusive`: fail if the name exists) and opens it.
    pub async fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        exclusive: bool,
    ) -> Result<FileHandle, VolumeError> {
        let op = MetaOp::create_file(self.vol.id, parent, name, mode, exclusive);
        Ok(FileHandle::new(Self::attr(self.meta.write(op).await?)?))
    }

    /// Opens an existing file by name.
    pub async fn open_file(&self, parent: Ino, name: &str) -> Result<FileHandle, VolumeError> {
        let read = MetaRead::Lookup {
            volume: self.vol.id,
            parent,
            name: name.to_string(),
        };
        let attr = Self::attr(self.meta.read(read).await?)?;
        if attr.kind != FileKind::File {
            return Err(refused(
                ErrorCode::IsDir,
                format!("{name:?} is not a regular file"),
            ));
        }
        Ok(FileHandle::new(attr))
    }

    /// The bytes of one whole stripe of a file: writes cut at multiples of it (from offset 0)
    /// fill every column, and every disperse stripe, without a read-modify-write.
    pub fn stripe_bytes(&self, attr: &Attr) -> u64 {
        let (unit, stripe, _) = self.geometry(attr, attr.group);
        let width = unit * stripe;
        if self.dispersed() {
            let k = u64::from(self.vol.disperse_data.max(1)) * u64::from(DISPERSE_FRAGMENT_BYTES);
            let gcd = |mut a: u64, mut b: u64| {
                while b != 0 {
                    (a, b) = (b, a % b);
                }
                a
            };
            width / gcd(width, k) * k
        } else {
            width
        }
    }

    fn geometry(&self, attr: &Attr, group: u32) -> (u64, u64, usize) {
        let unit = u64::from(attr.unit_bytes.max(4096));
        let stripe = u64::from(self.vol.stripe.max(1));
        let first_set = group as usize * stripe as usize;
        (unit, stripe, first_set)
    }

    pub(crate) fn set(&self, index: usize) -> Result<SetState, VolumeError> {
        // A set this client has not seen was added since it read the sets (add-brick): a
        // stale view, which `retrying` cures by reading them again.
        self.sets().get(index).cloned().ok_or_else(|| {
            refused(
                ErrorCode::StaleEpoch,
                format!("set {index} is not in the volume as this client last read it"),
            )
        })
    }

    pub(crate) fn addr(&self, brick: BrickId) -> Result<SocketAddr, VolumeError> {
        self.addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&brick)
            .copied()
            .ok_or_else(|| refused(ErrorCode::Internal, format!("brick {brick} has no address")))
    }

    fn key(&self, attr: &Attr, column: u64) -> ObjectKey {
        ObjectKey {
            volume: self.vol.id,
            ino: attr.ino,
            column: column as u32,
        }
    }

    fn set_ref(&self, index: usize, set: &SetState) -> SetRef {
        SetRef {
            volume: self.vol.id,
            set: index as u32,
            epoch: set.epoch,
        }
    }

    fn others(&self, set: &SetState) -> Result<Vec<MemberRef>, VolumeError> {
        set.in_sync
            .iter()
            .filter(|b| **b != set.primary)
            .map(|b| {
                Ok(MemberRef {
                    brick: *b,
                    addr: self.addr(*b)?.to_string(),
                })
            })
            .collect()
    }

    fn dispersed(&self) -> bool {
        self.vol.disperse_data > 0
    }

    fn disperse_geometry(&self, set: &SetState) -> Result<DisperseGeometry, VolumeError> {
        Ok(DisperseGeometry {
            data_fragments: self.vol.disperse_data,
            parity_fragments: self.vol.disperse_redundancy,
            fragment_bytes: DISPERSE_FRAGMENT_BYTES,
            members: set
                .members
                .iter()
                .map(|b| {
                    Ok(MemberRef {
                        brick: *b,
                        addr: self.addr(*b)?.to_string(),
                    })
                })
                .collect::<Result<_, VolumeError>>()?,
            in_sync: set.in_sync.clone(),
        })
    }

    fn codec(&self) -> Result<&ReedSolomonCodec, VolumeError> {
        self.codec
            .as_ref()
            .ok_or_else(|| refused(ErrorCode::Internal, "volume is not dispersed"))
    }

    /// Reads `len` bytes at `column_offset` of a disperse column: the K data fragments first,
    /// every fragment when that is not enough.
    async fn read_disperse(
        &self,
        set: SetState,
        key: ObjectKey,
        column_offset: u64,
        len: u64,
    ) -> Result<Bytes, VolumeError> {
        let k = self.vol.disperse_data as usize;
        let f = u64::from(DISPERSE_FRAGMENT_BYTES);
        let sb = k as u64 * f;
        let (j0, j1) = (column_offset / sb, (column_offset + len - 1) / sb);
        let stripes = (j1 - j0 + 1) as usize;
        let (off, n) = (j0 * f, stripes as u64 * f);
        // Members out of sync may hold fragments of older versions: never read them.
        let moved = std::sync::atomic::AtomicBool::new(false);
        let held = std::sync::atomic::AtomicBool::new(false);
        let fetch = |brick: BrickId| {
            let bricks = self.bricks.clone();
            let addr = self.addr(brick);
            // A member being replaced serves no reads.
            let in_sync = set.serves_reads(brick);
            let (moved, held) = (&moved, &held);
            async move {
                if !in_sync {
                    return None;
                }
                let addr = addr.ok()?;
                match bricks.read(addr, brick, key, off, n as u32).await {
                    Ok((st, bytes)) => {
                        held.store(true, Ordering::Relaxed);
                        Some(((st.version.0, st.tag), bytes.to_vec()))
                    }
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => Some(((0, 0), Vec::new())),
                    Err(e) => {
                        if e.code() == Some(ErrorCode::Moved) {
                            moved.store(true, Ordering::Relaxed);
                        }
                        tracing::debug!(%brick, error = %e, "fragment read failed");
                        None
                    }
                }
            }
        };
        let codec = self.codec()?;
        // A version is (number, tag): two writes that produced one number never combine.
        let mut frags: Vec<FragmentRead<(u64, u64)>> =
            join_all(set.members[..k].iter().map(|b| fetch(*b)).collect()).await;
        frags.resize(set.members.len(), None);
        let decoded = match decode_stripes(codec, &frags, f as usize, stripes) {
            Ok(d) => d,
            Err(_) => {
                let parity = join_all(set.members[k..].iter().map(|b| fetch(*b)).collect()).await;
                for (slot, p) in frags[k..].iter_mut().zip(parity) {
                    *slot = p;
                }
                decode_stripes(codec, &frags, f as usize, stripes).map_err(|e| {
                    let code = if moved.load(Ordering::Relaxed) {
                        ErrorCode::Moved
                    } else {
                        ErrorCode::Io
                    };
                    refused(
                        code,
                        format!(
                            "column {} of inode {} cannot be decoded: {e}",
                            key.column, key.ino
                        ),
                    )
                })?
            }
        };
        // K in-sync members without the object: it was written (the file has data), so it is
        // lost, not a hole.
        if !held.load(Ordering::Relaxed) {
            return Err(VolumeError::Lost { key });
        }
        let at = (column_offset - j0 * sb) as usize;
        Ok(Bytes::from(decoded.1).slice(at..at + len as usize))
    }

    /// Sends one set request to its primary.
    fn to_primary(
        &self,
        primary: BrickId,
        addr: SocketAddr,
        msg: Message,
        data: Bytes,
    ) -> impl std::future::Future<Output = Result<(Message, Bytes), VolumeError>> + use<> {
        let bricks = self.bricks.clone();
        async move {
            bricks
                .pool()
                .call(addr, msg, data)
                .await
                .map_err(|source| VolumeError::Brick {
                    brick: primary,
                    source,
                })
        }
    }

    /// Writes `data` at `offset`: every stripe-unit piece goes to its set at once. Retried
    /// while a set changes under it (see `retrying`); EROFS below a set's quorum.
    pub async fn write(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: Bytes,
    ) -> Result<(), VolumeError> {
        let start = std::time::Instant::now();
        let end = offset + data.len() as u64;
        // Every column object of a file with data exists, so that a missing one reads as an
        // error, never as zeros (`read`). A write makes the objects it reaches; on a striped
        // file the first write of a handle makes the others too, before any size is
        // committed. So does a quota's early size commit of an empty file.
        let (_, stripe, _) = self.geometry(&fh.attr, fh.group());
        let quota = end > fh.size() && self.quota_on().await;
        if (stripe > 1 || quota && fh.size() == 0 && !self.dispersed())
            && !fh.columns_made.load(Ordering::SeqCst)
        {
            let r = self
                .retrying("write", fh, || self.make_columns_once(fh))
                .await;
            if let Err(e) = r {
                self.metrics
                    .record("write", start.elapsed(), false, data.len() as u64, 0);
                return Err(e);
            }
            fh.columns_made.store(true, Ordering::SeqCst);
        }
        if quota {
            // Quotas count committed sizes: commit the new end before writing, so that a
            // write past a quota fails (EDQUOT) before any of its bytes lands.
            if let Err(e) = self.commit_end(fh, end).await {
                self.metrics
                    .record("write", start.elapsed(), false, data.len() as u64, 0);
                return Err(e);
            }
        }
        let r = self
            .retrying("write", fh, || self.write_once(fh, offset, data.clone()))
            .await;
        let len = data.len() as u64;
        self.metrics
            .record("write", start.elapsed(), r.is_ok(), len, 0);
        r?;
        let end = offset + data.len() as u64;
        fh.dirty_end.fetch_max(end, Ordering::SeqCst);
        fh.modified(now_ns());
        fh.size.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    /// Makes every column object of the file that does not exist yet (an empty write at 0
    /// creates an object and changes no byte). Replicated sets only: a striped volume is
    /// never dispersed.
    async fn make_columns_once(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        let (_, stripe, first_set) = self.geometry(&fh.attr, fh.group());
        let mut tasks = Vec::with_capacity(stripe as usize);
        for column in 0..stripe {
            let index = first_set + column as usize;
            let set = &self.set(index)?;
            self.check_quorum(index, set)?;
            let primary = set.primary;
            let addr = self.addr(primary)?;
            let msg = self.set_write(index, set, self.key(&fh.attr, column), 0)?;
            tasks.push(self.to_primary(primary, addr, msg, Bytes::new()));
        }
        for r in join_all(tasks).await {
            r?;
        }
        Ok(())
    }

    /// A replicated set's write of `key` at `offset_bytes`, to its primary.
    fn set_write(
        &self,
        index: usize,
        set: &SetState,
        key: ObjectKey,
        offset_bytes: u64,
    ) -> Result<Message, VolumeError> {
        Ok(Message::SetWrite(SetWrite {
            brick: set.primary,
            set: self.set_ref(index, set),
            key,
            offset_bytes,
            sync: false,
            members: self.others(set)?,
            degraded: set.in_sync.len() < set.members.len(),
        }))
    }

    async fn write_once(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: Bytes,
    ) -> Result<(), VolumeError> {
        let (unit, stripe, first_set) = self.geometry(&fh.attr, fh.group());
        let pieces = merge_contiguous(
            split_range(offset, data.len() as u64, unit, stripe),
            PIECE_MAX_BYTES,
        );
        let mut tasks = Vec::with_capacity(pieces.len());
        for p in pieces {
            let index = first_set + p.column as usize;
            let set = &self.set(index)?;
            self.check_quorum(index, set)?;
            let key = self.key(&fh.attr, p.column);
            let chunk = data.slice(p.buf_offset as usize..(p.buf_offset + p.len) as usize);
            let primary = set.primary;
            let addr = self.addr(primary)?;
            let msg = if self.dispersed() {
                Message::DisperseWrite(DisperseWrite {
                    brick: primary,
                    set: self.set_ref(index, set),
                    key,
                    offset_bytes: p.column_offset,
                    sync: false,
                    geometry: self.disperse_geometry(set)?,
                })
            } else {
                self.set_write(index, set, key, p.column_offset)?
            };
            tasks.push(self.to_primary(primary, addr, msg, chunk));
        }
        for r in join_all(tasks).await {
            r?;
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`, short at the file's end; holes read as zeros.
    pub async fn read(&self, fh: &FileHandle, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        // Every member tried failed: the sets may have changed (re-read them) or the members
        // may be back soon (retry within the window).
        let start = std::time::Instant::now();
        let r = self
            .retrying("read", fh, || self.read_once(fh, offset, len))
            .await;
        let got = r.as_ref().map_or(0, |b| b.len() as u64);
        self.metrics
            .record("read", start.elapsed(), r.is_ok(), 0, got);
        r
    }

    async fn read_once(
        &self,
        fh: &FileHandle,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, VolumeError> {
        let size = fh.size();
        if offset >= size {
            return Ok(Bytes::new());
        }
        let len = len.min(size - offset);
        let (unit, stripe, first_set) = self.geometry(&fh.attr, fh.group());
        let pieces = merge_contiguous(split_range(offset, len, unit, stripe), PIECE_MAX_BYTES);
        let mut tasks = Vec::with_capacity(pieces.len());
        if self.dispersed() {
            let mut reads = Vec::with_capacity(pieces.len());
            for p in &pieces {
                let set = &self.set(first_set + p.column as usize)?;
                reads.push(self.read_disperse(
                    set.clone(),
                    self.key(&fh.attr, p.column),
                    p.column_offset,
                    p.len,
                ));
            }
            let mut out = BytesMut::with_capacity(len as usize);
            for r in join_all(reads).await {
                out.extend_from_slice(&r?);
            }
            return Ok(out.freeze());
        }
        for p in &pieces {
            let index = first_set + p.column as usize;
            let set = &self.set(index)?;
            // Spread reads over the in-sync members (not one being replaced: it serves no
            // reads); on a failure, try the next one.
            let start = self.spread.fetch_add(1, Ordering::Relaxed);
            let readable: Vec<BrickId> = set
                .in_sync
                .iter()
                .copied()
                .filter(|b| set.serves_reads(*b))
                .collect();
            let n_members = readable.len().max(1);
            let order: Vec<(BrickId, SocketAddr)> = (0..n_members)
                .filter_map(|i| readable.get((start + i) % n_members).copied())
                .map(|b| Ok((b, self.addr(b)?)))
                .collect::<Result<_, VolumeError>>()?;
            let key = self.key(&fh.attr, p.column);
            let (column_offset, n) = (p.column_offset, p.len);
            let bricks = self.bricks.clone();
            tasks.push(async move {
                let mut last = None;
                let mut missing = 0;
                let members = order.len();
                for (brick, addr) in order {
                    match bricks.read(addr, brick, key, column_offset, n as u32).await {
                        Ok((_, bytes)) => return Ok(bytes),
                        Err(e) if e.code() == Some(ErrorCode::NotFound) => missing += 1,
                        Err(source) => {
                            tracing::debug!(%brick, error = %source, "read failed, trying another member");
                            last = Some(VolumeError::Brick { brick, source });
                        }
                    }
                }
                // Every column object of a file with data exists (made by the first write or
                // truncate): one that no in-sync member holds is lost, never a hole. If some
                // member could not answer, it may hold the data: say that instead.
                if missing == members && last.is_none() {
                    return Err(VolumeError::Lost { key });
                }
                Err(last.unwrap_or_else(|| refused(ErrorCode::Io, "set has no in-sync member")))
            });
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for (p, r) in pieces.iter().zip(join_all(tasks).await) {
            let bytes = r?;
            let have = bytes.len().min(p.len as usize);
            out.extend_from_slice(&bytes[..have]);
            // Short: past the column's end inside the file is a hole.
            out.resize(out.len() + (p.len as usize - have), 0);
        }
        Ok(out.freeze())
    }

    /// Sets the file's length: every column object is cut (or extended) to its share, then
    /// the size is committed.
    pub async fn truncate(&self, fh: &FileHandle, len: u64) -> Result<(), VolumeError> {
        let start = std::time::Instant::now();
        let r = self
            .retrying("truncate", fh, || self.truncate_objects(fh, len))
            .await;
        self.metrics
            .record("truncate", start.elapsed(), r.is_ok(), 0, 0);
        r?;
        let set = SetAttr {
            size_bytes: Some(len),
            ..SetAttr::default()
        };
        self.meta
            .write(MetaOp::SetAttr {
                volume: self.vol.id,
                ino: fh.attr.ino,
                set,
            })
            .await?;
        // The truncate set the file's mtime and size: writes before it (drained by the
        // caller) have nothing left to commit past `len`.
        fh.size.store(len, Ordering::SeqCst);
        fh.dirty_end.fetch_min(len, Ordering::SeqCst);
        fh.modified_ns.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Cuts or extends every column object of the file to its share of `len`.
    pub(crate) async fn truncate_objects(
        &self,
        fh: &FileHandle,
        len: u64,
    ) -> Result<(), VolumeError> {
        let (unit, stripe, first_set) = self.geometry(&fh.attr, fh.group());
        let mut tasks = Vec::new();
        for column in 0..stripe {
            let index = first_set + column as usize;
            let set = &self.set(index)?;
            self.check_quorum(index, set)?;
            let primary = set.primary;
            let addr = self.addr(primary)?;
            let msg = if self.dispersed() {
                Message::DisperseTruncate(DisperseTruncate {
                    brick: primary,
                    set: self.set_ref(index, set),
                    key: self.key(&fh.attr, column),
                    len_bytes: column_len(len, column, unit, stripe),
                    sync: false,
                    geometry: self.disperse_geometry(set)?,
                })
            } else {
                Message::SetTruncate(SetTruncate {
                    brick: primary,
                    set: self.set_ref(index, set),
                    key: self.key(&fh.attr, column),
                    len_bytes: column_len(len, column, unit, stripe),
                    sync: false,
                    members: self.others(set)?,
                    degraded: set.in_sync.len() < set.members.len(),
                })
            };
            tasks.push(self.to_primary(primary, addr, msg, Bytes::new()));
        }
        for r in join_all(tasks).await {
            r?;
        }
        Ok(())
    }

    /// Makes the file's data durable on every in-sync member and commits its size.
    pub async fn fsync(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        // A member that cannot answer may have left its set: re-read the sets and try again.
        let start = std::time::Instant::now();
        let r = match self.retrying("fsync", fh, || self.fsync_objects(fh)).await {
            Ok(()) => self.commit_size(fh).await,
            Err(e) => Err(e),
        };
        self.metrics
            .record("fsync", start.elapsed(), r.is_ok(), 0, 0);
        r
    }

    /// Makes the file's objects durable on every in-sync member, without committing a size.
    pub(crate) async fn sync_objects(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        self.fsync_objects(fh).await
    }

    /// Asks every in-sync member of every column's set to make the column durable.
    async fn fsync_objects(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        let (_, stripe, first_set) = self.geometry(&fh.attr, fh.group());
        let mut tasks = Vec::new();
        for column in 0..stripe {
            let index = first_set + column as usize;
            let set = &self.set(index)?;
            for brick in set.in_sync.clone() {
                let addr = self.addr(brick)?;
                let key = self.key(&fh.attr, column);
                let bricks = self.bricks.clone();
                tasks.push(async move {
                    match bricks.fsync(addr, brick, key).await {
                        Ok(_) => Ok(()),
                        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
                        Err(source) => Err(VolumeError::Brick { brick, source }),
                    }
                });
            }
        }
        for r in join_all(tasks).await {
            r?;
        }
        Ok(())
    }

    /// Grows the file's committed size to at least `end` (quotas are checked there).
    async fn commit_end(&self, fh: &FileHandle, end: u64) -> Result<(), VolumeError> {
        let set = SetAttr {
            size_at_least_bytes: Some(end),
            ..SetAttr::default()
        };
        let attr = Self::attr(
            self.meta
                .write(MetaOp::SetAttr {
                    volume: self.vol.id,
                    ino: fh.attr.ino,
                    set,
                })
                .await?,
        )?;
        fh.size.fetch_max(attr.size_bytes, Ordering::SeqCst);
        Ok(())
    }

    /// Commits what this handle wrote since its last commit: the size grows to at least the
    /// furthest end written (never shrinks: concurrent writers), and mtime becomes the time
    /// of the last write (ctime follows). Nothing new since the last commit sends nothing.
    /// On failure the handle stays dirty, so the next commit retries.
    pub async fn commit_size(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        let end = fh.dirty_end.swap(0, Ordering::SeqCst);
        let mtime = fh.modified_ns.swap(0, Ordering::SeqCst);
        if end == 0 && mtime == 0 {
            return Ok(());
        }
        let set = SetAttr {
            size_at_least_bytes: (end > 0).then_some(end),
            mtime_ns: (mtime != 0).then_some(mtime),
            ..SetAttr::default()
        };
        let written = self
            .meta
            .write(MetaOp::SetAttr {
                volume: self.vol.id,
                ino: fh.attr.ino,
                set,
            })
            .await
            .map_err(VolumeError::from)
            .and_then(Self::attr);
        match written {
            Ok(attr) => {
                fh.refresh_size(attr.size_bytes);
                Ok(())
            }
            Err(e) => {
                fh.dirty_end.fetch_max(end, Ordering::SeqCst);
                fh.modified_ns.fetch_max(mtime, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Removes every object of a deleted file (each column on every member of its sets). An
    /// object already gone is fine; a brick that cannot be reached fails it (the file stays
    /// queued for the next round).
    pub async fn remove_objects(&self, item: &GcItem) -> Result<(), VolumeError> {
        let stripe = u64::from(self.vol.stripe.max(1));
        let mut deletes = Vec::new();
        // The groups it moved away from hold its seals: they go too.
        let places = std::iter::once(item.group).chain(item.moved_from.iter().copied());
        for (first, column) in
            places.flat_map(|g| (0..stripe).map(move |c| (g as usize * stripe as usize, c)))
        {
            let set = &self.set(first + column as usize)?;
            let key = ObjectKey {
                volume: self.vol.id,
                ino: item.ino,
                column: column as u32,
            };
            for &brick in &set.members {
                let addr = self.addr(brick)?;
                let bricks = self.bricks.clone();
                deletes.push(async move {
                    bricks
                        .delete(addr, brick, key)
                        .await
                        .map_err(|source| VolumeError::Brick { brick, source })
                });
            }
        }
        for r in join_all(deletes).await {
            r?;
        }
        Ok(())
    }

    /// As `remove_objects`, then tells the metadata group (`GcDone`).
    pub async fn remove_file(&self, item: &GcItem) -> Result<(), VolumeError> {
        self.remove_objects(item).await?;
        self.meta
            .write(MetaOp::GcDone {
                volume: self.vol.id,
                ino: item.ino,
            })
            .await?;
        Ok(())
    }

    /// The volume's space as files see it: every set holds what its fullest member still
    /// has room for (a replica set one copy of it; a disperse set K fragments' worth), and the
    /// volume the sum over its sets. Members that do not answer are left out; a set none of
    /// whose members answers counts nothing.
    /// The space `df` shows at directory `dir`: its quota's limit and what is left of it
    /// (no more than the volume has left), when the directory has a quota; otherwise the
    /// volume's (a claim of the CSI driver is such a directory, or a volume whose root has
    /// one).
    pub async fn statfs_at(&self, dir: Ino) -> VolumeSpace {
        let space = self.statfs().await;
        if !self.quota_on().await {
            return space;
        }
        let Ok(MetaReply::Quotas(quotas)) = self
            .meta
            .read(MetaRead::Quotas {
                volume: self.vol.id,
            })
            .await
        else {
            return space;
        };
        match quotas.iter().find(|q| q.dir == dir) {
            Some(q) => VolumeSpace {
                total_bytes: q.limit_bytes,
                avail_bytes: q
                    .limit_bytes
                    .saturating_sub(q.used_bytes)
                    .min(space.avail_bytes),
            },
            None => space,
        }
    }

    pub async fn statfs(&self) -> VolumeSpace {
        let sets = self.sets();
        let data_share = u64::from(self.vol.disperse_data.max(1));
        let mut calls = Vec::new();
        for (index, set) in sets.iter().enumerate() {
            for &brick in &set.members {
                let Ok(addr) = self.addr(brick) else { continue };
                let bricks = self.bricks.clone();
                calls.push(async move { (index, bricks.statfs(addr, brick).await) });
            }
        }
        let mut per_set: Vec<Option<(u64, u64)>> = vec![None; sets.len()];
        for (index, r) in join_all(calls).await {
            let Ok(r) = r else { continue };
            let slot = &mut per_set[index];
            *slot = Some(match *slot {
                None => (r.total_bytes, r.avail_bytes),
                Some((t, a)) => (t.min(r.total_bytes), a.min(r.avail_bytes)),
            });
        }
        let (mut total_bytes, mut avail_bytes) = (0u64, 0u64);
        for (t, a) in per_set.into_iter().flatten() {
            total_bytes = total_bytes.saturating_add(t.saturating_mul(data_share));
            avail_bytes = avail_bytes.saturating_add(a.saturating_mul(data_share));
        }
        VolumeSpace {
            total_bytes,
            avail_bytes,
        }
    }

    /// Closes a handle: commits its size.
    pub async fn close(&self, fh: FileHandle) -> Result<(), VolumeError> {
        self.commit_size(&fh).await
    }
}
