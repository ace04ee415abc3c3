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
use brickfs_erasure::{ReedSolomonCodec, decode_stripes};
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
}

impl VolumeError {
    /// The POSIX-shaped code, when there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            VolumeError::Meta(e) => e.code(),
            VolumeError::Brick { source, .. } => source.code(),
            VolumeError::Refused(b) => b.kind(),
        }
    }
}

fn refused(code: ErrorCode, detail: impl Into<String>) -> VolumeError {
    VolumeError::Refused(ErrorBody::new(code, detail))
}

/// An open file: its attributes at open and the highest end written since.
pub struct FileHandle {
    pub attr: Attr,
    written_end: AtomicU64,
    /// The highest end already committed to the metadata group by this handle.
    committed_end: AtomicU64,
    size: AtomicU64,
}

impl FileHandle {
    /// A handle for a file whose attributes the caller got from the metadata group.
    pub fn new(attr: Attr) -> FileHandle {
        FileHandle {
            written_end: AtomicU64::new(0),
            committed_end: AtomicU64::new(0),
            size: AtomicU64::new(attr.size_bytes),
            attr,
        }
    }

    /// The size this handle knows: at open, grown by its own writes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Records a truncate made through another handle of the same file.
    pub fn set_size(&self, len: u64) {
        self.size.store(len, Ordering::SeqCst);
        self.written_end.fetch_min(len, Ordering::SeqCst);
        self.committed_end.fetch_min(len, Ordering::SeqCst);
    }
}

/// A volume opened by a client.
pub struct VolumeClient {
    meta: MetaClient,
    bricks: BrickClient,
    vol: VolumeRecord,
    addrs: HashMap<BrickId, SocketAddr>,
    spread: AtomicUsize,
    codec: Option<ReedSolomonCodec>,
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
            let host = b.addr.rsplit_once(":/").map_or(b.addr.as_str(), |(h, _)| h);
            let addr: SocketAddr = host.parse().map_err(|_| {
                refused(
                    ErrorCode::InvalidArgument,
                    format!("brick {} has no HOST:PORT address", b.addr),
                )
            })?;
            addrs.insert(b.brick, addr);
        }
        let codec = if vol.disperse_data > 0 {
            Some(
                ReedSolomonCodec::new(vol.disperse_data as usize, vol.disperse_redundancy as usize)
                    .map_err(|e| refused(ErrorCode::InvalidArgument, e.to_string()))?,
            )
        } else {
            None
        };
        Ok(Arc::new(VolumeClient {
            meta,
            bricks,
            vol,
            addrs,
            spread: AtomicUsize::new(0),
            codec,
        }))
    }

    pub fn record(&self) -> &VolumeRecord {
        &self.vol
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
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
        let (unit, stripe, _) = self.geometry(attr);
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

    fn geometry(&self, attr: &Attr) -> (u64, u64, usize) {
        let unit = u64::from(attr.unit_bytes.max(4096));
        let stripe = u64::from(self.vol.stripe.max(1));
        let first_set = attr.group as usize * stripe as usize;
        (unit, stripe, first_set)
    }

    fn set(&self, index: usize) -> Result<&SetState, VolumeError> {
        self.vol.sets.get(index).ok_or_else(|| {
            refused(
                ErrorCode::Internal,
                format!("set {index} is not in the volume"),
            )
        })
    }

    fn addr(&self, brick: BrickId) -> Result<SocketAddr, VolumeError> {
        self.addrs
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
        set: &SetState,
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
        let fetch = |brick: BrickId| {
            let bricks = self.bricks.clone();
            let addr = self.addr(brick);
            async move {
                let addr = addr.ok()?;
                match bricks.read(addr, brick, key, off, n as u32).await {
                    Ok((st, bytes)) => Some((st.version.0, bytes.to_vec())),
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => Some((0, Vec::new())),
                    Err(e) => {
                        tracing::debug!(%brick, error = %e, "fragment read failed");
                        None
                    }
                }
            }
        };
        let codec = self.codec()?;
        let mut frags: Vec<Option<(u64, Vec<u8>)>> =
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
                    refused(
                        ErrorCode::Io,
                        format!(
                            "column {} of inode {} cannot be decoded: {e}",
                            key.column, key.ino
                        ),
                    )
                })?
            }
        };
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

    /// Writes `data` at `offset`: every stripe-unit piece goes to its set at once.
    pub async fn write(
        &self,
        fh: &FileHandle,
        offset: u64,
        data: Bytes,
    ) -> Result<(), VolumeError> {
        let (unit, stripe, first_set) = self.geometry(&fh.attr);
        let pieces = merge_contiguous(
            split_range(offset, data.len() as u64, unit, stripe),
            PIECE_MAX_BYTES,
        );
        let mut tasks = Vec::with_capacity(pieces.len());
        for p in pieces {
            let index = first_set + p.column as usize;
            let set = self.set(index)?;
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
                Message::SetWrite(SetWrite {
                    brick: primary,
                    set: self.set_ref(index, set),
                    key,
                    offset_bytes: p.column_offset,
                    sync: false,
                    members: self.others(set)?,
                })
            };
            tasks.push(self.to_primary(primary, addr, msg, chunk));
        }
        for r in join_all(tasks).await {
            r?;
        }
        let end = offset + data.len() as u64;
        fh.written_end.fetch_max(end, Ordering::SeqCst);
        fh.size.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`, short at the file's end; holes read as zeros.
    pub async fn read(&self, fh: &FileHandle, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        let size = fh.size();
        if offset >= size {
            return Ok(Bytes::new());
        }
        let len = len.min(size - offset);
        let (unit, stripe, first_set) = self.geometry(&fh.attr);
        let pieces = merge_contiguous(split_range(offset, len, unit, stripe), PIECE_MAX_BYTES);
        let mut tasks = Vec::with_capacity(pieces.len());
        if self.dispersed() {
            let mut reads = Vec::with_capacity(pieces.len());
            for p in &pieces {
                let set = self.set(first_set + p.column as usize)?;
                reads.push(self.read_disperse(
                    set,
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
            let set = self.set(index)?;
            // Spread reads over the in-sync members; on a failure, try the next one.
            let start = self.spread.fetch_add(1, Ordering::Relaxed);
            let n_members = set.in_sync.len().max(1);
            let order: Vec<(BrickId, SocketAddr)> = (0..n_members)
                .filter_map(|i| set.in_sync.get((start + i) % n_members).copied())
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
                // A column no in-sync member holds was never written: a hole. If some member
                // could not answer, it may hold the data: say so rather than invent zeros.
                if missing == members {
                    return Ok(Bytes::new());
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
        let (unit, stripe, first_set) = self.geometry(&fh.attr);
        let mut tasks = Vec::new();
        for column in 0..stripe {
            let index = first_set + column as usize;
            let set = self.set(index)?;
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
                })
            };
            tasks.push(self.to_primary(primary, addr, msg, Bytes::new()));
        }
        for r in join_all(tasks).await {
            r?;
        }
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
        fh.size.store(len, Ordering::SeqCst);
        fh.written_end.store(0, Ordering::SeqCst);
        fh.committed_end.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Makes the file's data durable on every in-sync member and commits its size.
    pub async fn fsync(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        let (_, stripe, first_set) = self.geometry(&fh.attr);
        let mut tasks = Vec::new();
        for column in 0..stripe {
            let index = first_set + column as usize;
            let set = self.set(index)?;
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
        self.commit_size(fh).await
    }

    /// Commits the highest end written through this handle (grow only).
    pub async fn commit_size(&self, fh: &FileHandle) -> Result<(), VolumeError> {
        let end = fh.written_end.load(Ordering::SeqCst);
        // Nothing new since the last commit (a close after an fsync, a release after a flush).
        if end == 0 || end <= fh.committed_end.load(Ordering::SeqCst) {
            return Ok(());
        }
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
        fh.committed_end.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    /// Removes every object of a deleted file (each column on every member of its sets) and
    /// tells the metadata group (`GcDone`). An object already gone is fine; a brick that cannot
    /// be reached leaves the file queued for the next round.
    pub async fn remove_file(&self, item: &GcItem) -> Result<(), VolumeError> {
        let stripe = u64::from(self.vol.stripe.max(1));
        let first = item.group as usize * stripe as usize;
        let mut deletes = Vec::new();
        for column in 0..stripe {
            let set = self.set(first + column as usize)?;
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
        self.meta
            .write(MetaOp::GcDone {
                volume: self.vol.id,
                ino: item.ino,
            })
            .await?;
        Ok(())
    }

    /// Closes a handle: commits its size.
    pub async fn close(&self, fh: FileHandle) -> Result<(), VolumeError> {
        self.commit_size(&fh).await
    }
}
