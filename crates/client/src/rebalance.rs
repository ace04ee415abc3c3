//! Rebalance: moving files between stripe groups while mounts keep working.
//!
//! A file lives in one stripe group (`Attr::group`). To move it to group `to`:
//!
//! 1. `BeginMove` records the move in the metadata group (a move left behind by a mover that
//!    died is found there and abandoned by the next round).
//! 2. Every member of every source set **freezes** the file's objects (`Seal Freeze`): writes
//!    and truncates answer `Moved`, reads go on. A write acknowledged before the freeze is on
//!    every in-sync member, so the copy below sees it; one refused by it is retried by its
//!    client, which reads the file's group again and waits until the move ends.
//! 3. The target's objects are cleared (leftovers of an earlier, abandoned move), the file's
//!    bytes are copied up to the furthest byte any member holds (writes not yet committed to
//!    the metadata group's size included), skipping zeros, and made durable.
//! 4. `FinishMove` switches the file's group; from then on clients that still write to the
//!    old group get `Moved` and follow. The source objects are dropped, keeping their seals
//!    (until the file is deleted), so a client that knew the old group never reads or writes
//!    there again; `DroppedMove` ends it (until then the move is listed as dropping, the file
//!    cannot move, and every round of the leader's node tries the drop again).
//!
//! A failure before `FinishMove` abandons the move: `AbortMove` first (so that it can no longer
//! finish; the move stays listed as abandoned and the file cannot move again), then the source
//! is thawed and the target cleared, and `ForgetMove` ends it. A member that cannot be reached
//! leaves the abandoned move listed: every round of the leader's node tries the clean-up again.

use crate::volume::{VolumeClient, VolumeError};
use crate::{BrickClient, FileHandle, MetaClient};
use brickfs_layout::place::{file_offset, pick_group};
use brickfs_proto::meta::{
    Attr, BrickRecord, FileMove, FileSpot, MetaOp, MetaRead, MetaReply, RebalanceProgress,
    RebalanceState, VolumeRecord,
};
use brickfs_proto::msg::SealAction;
use brickfs_proto::{ErrorBody, ErrorCode, Ino, ObjectKey};
use std::time::{Duration, Instant};

/// Files read from the metadata group per page (and per progress report).
const PAGE: u32 = 64;
/// Bytes copied per request (rounded up to whole stripes).
const COPY_BYTES: u64 = 4 << 20;
/// Copy requests in flight per file.
const COPY_INFLIGHT: usize = 4;
/// Files moved at once (4 measured slower than 2 on 2 cores: docs/benchmarks.md).
const MOVES_INFLIGHT: usize = 2;

fn refused(code: ErrorCode, detail: impl Into<String>) -> VolumeError {
    VolumeError::Refused(ErrorBody::new(code, detail))
}

/// Where files belong in a volume as it is now: the weights new files are placed by,
/// worked out once for many files.
pub struct Placement {
    weights: Vec<u64>,
    takes: Vec<bool>,
}

impl Placement {
    pub fn new(rec: &VolumeRecord, bricks: &[BrickRecord]) -> Placement {
        let weights = rec.placement_weights(|id| {
            bricks
                .iter()
                .find(|b| b.id == id)
                .map_or(0, |b| b.capacity_bytes)
        });
        let takes = (0..rec.groups()).map(|g| rec.takes_files(g)).collect();
        Placement { weights, takes }
    }

    /// The group a new file numbered `ino` would get.
    pub fn home(&self, ino: Ino) -> Option<u32> {
        if self.takes.len() <= 1 {
            return self.takes.first().copied().unwrap_or(false).then_some(0);
        }
        pick_group(ino.0, &self.weights).map(|g| g as u32)
    }

    /// Where a file should go: off a group that takes no files always, to its home unless
    /// only draining. `None`: it stays.
    pub fn destination(&self, drain_only: bool, spot: &FileSpot) -> Option<u32> {
        let draining = !self
            .takes
            .get(spot.group as usize)
            .copied()
            .unwrap_or(false);
        if drain_only && !draining {
            return None;
        }
        self.home(spot.ino).filter(|g| *g != spot.group)
    }
}

fn key(vol: &VolumeClient, ino: Ino, column: u64) -> ObjectKey {
    ObjectKey {
        volume: vol.record().id,
        ino,
        column: column as u32,
    }
}

/// Applies `action` to the file's objects on every member of every set of `group`.
async fn seal_group(
    vol: &VolumeClient,
    ino: Ino,
    group: u32,
    action: SealAction,
) -> Result<(), VolumeError> {
    let stripe = u64::from(vol.record().stripe.max(1));
    let mut calls = Vec::new();
    for column in 0..stripe {
        let set = vol.set(group as usize * stripe as usize + column as usize)?;
        for brick in set.members {
            let addr = vol.addr(brick)?;
            let k = key(vol, ino, column);
            let bricks = vol.bricks.clone();
            calls.push(async move {
                bricks
                    .seal(addr, brick, k, action)
                    .await
                    .map_err(|source| VolumeError::Brick { brick, source })
            });
        }
    }
    for r in brickfs_proto::rpc::join_all(calls).await {
        r?;
    }
    Ok(())
}

/// Refuses to move through a set that is not wholly in sync: a member out of sync would miss
/// the seals (and a heal would race the copy).
fn check_in_sync(vol: &VolumeClient, group: u32) -> Result<(), VolumeError> {
    let stripe = vol.record().stripe.max(1) as usize;
    for index in group as usize * stripe..(group as usize + 1) * stripe {
        let set = vol.set(index)?;
        if set.members.is_empty() || set.in_sync.len() != set.members.len() {
            return Err(refused(
                ErrorCode::Busy,
                format!(
                    "set {index} has {} of {} members in sync",
                    set.in_sync.len(),
                    set.members.len()
                ),
            ));
        }
    }
    Ok(())
}

/// The furthest file byte any member of the file's source sets holds (+1), at least the size
/// the metadata group knows: writes not yet committed are copied too.
async fn extent(vol: &VolumeClient, attr: &Attr, group: u32) -> Result<u64, VolumeError> {
    let rec = vol.record();
    let stripe = u64::from(rec.stripe.max(1));
    let unit = u64::from(attr.unit_bytes.max(4096));
    let k = u64::from(rec.disperse_data.max(1));
    let mut end = attr.size_bytes;
    for column in 0..stripe {
        let set = vol.set(group as usize * stripe as usize + column as usize)?;
        for brick in set.in_sync {
            let addr = vol.addr(brick)?;
            let st = vol
                .bricks
                .stat(addr, brick, key(vol, attr.ino, column))
                .await
                .map_err(|source| VolumeError::Brick { brick, source })?;
            // A disperse member holds one fragment of each stripe: the column is at most K
            // times longer.
            let column_len = st.map_or(0, |s| s.len_bytes) * k;
            if column_len > 0 {
                end = end.max(file_offset(column, column_len - 1, unit, stripe) + 1);
            }
        }
    }
    Ok(end)
}

/// Moves one file to group `to` (see the module's comment); returns the bytes copied.
#[tracing::instrument(level = "info", name = "move", skip_all, fields(ino = %spot.ino, from = spot.group, to))]
pub async fn move_file(vol: &VolumeClient, spot: &FileSpot, to: u32) -> Result<u64, VolumeError> {
    let file = FileMove {
        ino: spot.ino,
        from: spot.group,
        to,
    };
    vol.refresh().await?;
    check_in_sync(vol, file.from)?;
    check_in_sync(vol, file.to)?;
    let volume = vol.record().id;
    vol.meta().write(MetaOp::BeginMove { volume, file }).await?;
    match copy(vol, &file).await {
        Ok(bytes) => {
            // The file lives in `to` now: drop the source (keeping its seals).
            drop_source(vol, &file).await;
            Ok(bytes)
        }
        Err(e) => {
            abandon(vol, &file).await;
            Err(e)
        }
    }
}

/// Freezes, copies and switches: everything between `BeginMove` and the drop.
async fn copy(vol: &VolumeClient, file: &FileMove) -> Result<u64, VolumeError> {
    seal_group(vol, file.ino, file.from, SealAction::Freeze).await?;
    seal_group(vol, file.ino, file.to, SealAction::Clear).await?;
    let attr = match vol
        .meta()
        .read(MetaRead::GetAttr {
            volume: vol.record().id,
            ino: file.ino,
        })
        .await?
    {
        MetaReply::Attr(a) => a,
        other => {
            return Err(refused(
                ErrorCode::Internal,
                format!("unexpected answer {other:?}"),
            ));
        }
    };
    let end = extent(vol, &attr, file.from).await?;
    let src = FileHandle::in_group(&attr, file.from, end);
    let dst = FileHandle::in_group(&attr, file.to, end);
    let stripe_bytes = vol.stripe_bytes(&attr);
    let chunk = COPY_BYTES.div_ceil(stripe_bytes).max(1) * stripe_bytes;
    // COPY_INFLIGHT chunks at a time: each read, then (unless all zeros) written.
    let (src, dst) = (&src, &dst);
    let offsets: Vec<u64> = (0..end.div_ceil(chunk)).map(|i| i * chunk).collect();
    let mut copied = 0;
    for batch in offsets.chunks(COPY_INFLIGHT) {
        let tasks = batch
            .iter()
            .map(|&at| async move {
                let data = vol.read(src, at, chunk.min(end - at)).await?;
                if data.iter().all(|b| *b == 0) {
                    return Ok::<u64, VolumeError>(0);
                }
                let n = data.len() as u64;
                vol.write(dst, at, data).await?;
                Ok(n)
            })
            .collect();
        for r in brickfs_proto::rpc::join_all(tasks).await {
            copied += r?;
        }
    }
    // Chunks of zeros were not copied: give every column object its length anyway, so that
    // the file's objects exist in its new group as they did in the old (a missing one reads
    // as lost, not as a hole).
    if end > 0 {
        vol.truncate_objects(dst, end).await?;
    }
    vol.sync_objects(dst).await?;
    vol.meta()
        .write(MetaOp::FinishMove {
            volume: vol.record().id,
            file: *file,
        })
        .await?;
    tracing::info!(ino = %file.ino, from = file.from, to = file.to, bytes = copied, "file moved");
    Ok(copied)
}

/// Gives a move up: it can no longer finish (`AbortMove`; the metadata group keeps it listed
/// as abandoned), then cleans it up (`clean_up`). If the metadata group says the move is not
/// in progress, nothing is touched (it finished, or someone else gave it up).
pub async fn abandon(vol: &VolumeClient, file: &FileMove) {
    let volume = vol.record().id;
    if let Err(e) = vol
        .meta()
        .write(MetaOp::AbortMove {
            volume,
            file: *file,
        })
        .await
    {
        tracing::warn!(ino = %file.ino, error = %e, "could not abandon the move in the metadata group; left as it is");
        return;
    }
    tracing::info!(ino = %file.ino, from = file.from, to = file.to, "move abandoned; the file stays where it was");
    clean_up(vol, file).await;
}

/// Thaws an abandoned move's source and clears its target, then lets the metadata group forget
/// it; a member that cannot be reached leaves it listed, for the next round to try again (and
/// the file cannot move meanwhile).
async fn clean_up(vol: &VolumeClient, file: &FileMove) {
    if let Err(e) = seal_group(vol, file.ino, file.from, SealAction::Thaw).await {
        tracing::warn!(ino = %file.ino, group = file.from, error = %e, "abandoned move: a member could not be thawed yet; writes to the file wait until it is");
        return;
    }
    if let Err(e) = seal_group(vol, file.ino, file.to, SealAction::Clear).await {
        tracing::warn!(ino = %file.ino, group = file.to, error = %e, "abandoned move: its partial copy could not be cleared yet");
        return;
    }
    let forget = MetaOp::ForgetMove {
        volume: vol.record().id,
        file: *file,
    };
    match vol.meta().write(forget).await {
        Ok(_) => tracing::debug!(ino = %file.ino, "abandoned move cleaned up"),
        Err(e) => {
            tracing::warn!(ino = %file.ino, error = %e, "abandoned move cleaned up, but the metadata group could not be told; tried again next round")
        }
    }
}

/// Drops a finished move's source objects (sealed `Gone`, so that clients that knew the old
/// place follow the file) and tells the metadata group (`DroppedMove`); a member that cannot
/// be reached leaves the move listed as dropping, for the next round to try again (until then
/// the old copy is frozen: no writes, and the file cannot move).
async fn drop_source(vol: &VolumeClient, file: &FileMove) {
    if let Err(e) = seal_group(vol, file.ino, file.from, SealAction::Drop).await {
        tracing::warn!(ino = %file.ino, group = file.from, error = %e, "moved, but the old copy could not be dropped yet; tried again next round");
        return;
    }
    let done = MetaOp::DroppedMove {
        volume: vol.record().id,
        file: *file,
    };
    if let Err(e) = vol.meta().write(done).await {
        tracing::warn!(ino = %file.ino, error = %e, "old copy dropped, but the metadata group could not be told; tried again next round");
    }
}

/// Abandons the moves the metadata group has in progress for the volume (their mover died:
/// call only when no mover of this volume runs), cleans up abandoned ones and drops the
/// sources of finished ones not dropped yet; returns how many it found.
pub async fn abandon_stale_moves(vol: &VolumeClient) -> Result<usize, VolumeError> {
    let MetaReply::Moves {
        moving,
        abandoned,
        dropping,
    } = vol
        .meta()
        .read(MetaRead::Moves {
            volume: vol.record().id,
        })
        .await?
    else {
        return Err(refused(ErrorCode::Internal, "unexpected answer to Moves"));
    };
    for m in &moving {
        abandon(vol, m).await;
    }
    for m in &abandoned {
        clean_up(vol, m).await;
    }
    for m in &dropping {
        drop_source(vol, m).await;
    }
    Ok(moving.len() + abandoned.len() + dropping.len())
}

/// Cleans up after dead movers of a volume with no rebalance running: moves left in progress
/// are abandoned, abandoned ones cleaned up. One metadata read when there is nothing to do.
pub async fn clean_up_moves(
    meta: &MetaClient,
    bricks: &BrickClient,
    name: &str,
    volume: brickfs_proto::VolumeId,
) -> Result<usize, VolumeError> {
    match meta.read(MetaRead::Moves { volume }).await? {
        MetaReply::Moves {
            moving,
            abandoned,
            dropping,
        } if moving.is_empty() && abandoned.is_empty() && dropping.is_empty() => {
            return Ok(0);
        }
        _ => {}
    }
    let vol = VolumeClient::open(meta.clone(), bricks.clone(), name).await?;
    abandon_stale_moves(&vol).await
}

/// Runs volume `rec`'s rebalance for up to `budget`, reporting progress to the metadata group
/// after every page of files; returns when it is done, stopped, or out of time (the next call
/// goes on from the cursor). Files that cannot move now are counted as skipped and tried again
/// in another pass.
pub async fn rebalance_round(
    meta: &MetaClient,
    bricks: &BrickClient,
    name: &str,
    budget: Duration,
) -> Result<(), VolumeError> {
    let started = Instant::now();
    let vol = VolumeClient::open(meta.clone(), bricks.clone(), name).await?;
    let mut rec = vol.record().clone();
    let Some(run) = rec.rebalance.clone() else {
        return Ok(());
    };
    if run.state != RebalanceState::Running {
        return Ok(());
    }
    let stale = abandon_stale_moves(&vol).await?;
    if stale > 0 {
        tracing::info!(volume = %name, moves = stale, "abandoned moves left by an earlier mover");
    }
    let mut progress: RebalanceProgress = run.progress.clone();
    loop {
        let MetaReply::Bricks(brick_records) = meta.read(MetaRead::ListBricks).await? else {
            return Err(refused(
                ErrorCode::Internal,
                "unexpected answer to ListBricks",
            ));
        };
        let MetaReply::Files { files, next } = meta
            .read(MetaRead::Files {
                volume: rec.id,
                after: progress.cursor,
                limit: PAGE,
            })
            .await?
        else {
            return Err(refused(ErrorCode::Internal, "unexpected answer to Files"));
        };
        progress.scanned += files.len() as u64;
        let placement = Placement::new(&rec, &brick_records);
        let to_move: Vec<(FileSpot, u32)> = files
            .iter()
            .filter_map(|spot| Some((*spot, placement.destination(run.drain_only, spot)?)))
            .collect();
        // MOVES_INFLIGHT files at a time (each frozen for writes only while it is copied).
        for batch in to_move.chunks(MOVES_INFLIGHT) {
            let moves = batch
                .iter()
                .map(|(spot, to)| {
                    let vol = &vol;
                    async move { (spot, move_file(vol, spot, *to).await) }
                })
                .collect();
            for (spot, r) in brickfs_proto::rpc::join_all(moves).await {
                match r {
                    Ok(bytes) => {
                        progress.moved += 1;
                        progress.moved_bytes += bytes;
                    }
                    // Deleted or changed meanwhile: nothing to do.
                    Err(e) if e.code() == Some(ErrorCode::StaleRequest) => {}
                    Err(e) => {
                        tracing::debug!(volume = %name, ino = %spot.ino, error = %e, "file not moved this pass");
                        progress.skipped += 1;
                        progress.last_error = format!("inode {}: {e}", spot.ino);
                    }
                }
            }
        }
        let mut done = false;
        match next {
            Some(at) => progress.cursor = at,
            None if progress.skipped == 0 => done = true,
            None => {
                tracing::info!(volume = %name, pass = progress.pass, skipped = progress.skipped, "rebalance pass left files behind; another pass follows");
                progress.pass += 1;
                progress.cursor = Ino(0);
                progress.skipped = 0;
            }
        }
        meta.write(MetaOp::RebalanceReport {
            volume: rec.id,
            run: run.run,
            progress: progress.clone(),
            done,
        })
        .await?;
        if done || next.is_none() || started.elapsed() >= budget {
            return Ok(());
        }
        // Stopped, restarted or changed (a remove-brick) meanwhile: follow the record.
        vol.refresh().await?;
        rec = match meta
            .read(MetaRead::VolumeByName {
                name: name.to_string(),
            })
            .await?
        {
            MetaReply::Volume(v) => v,
            _ => return Err(refused(ErrorCode::Internal, "unexpected answer")),
        };
        match &rec.rebalance {
            Some(r) if r.run == run.run && r.state == RebalanceState::Running => {}
            _ => return Ok(()),
        }
    }
}
