//! Self-heal: bringing a set member that is out of sync (it was down while the set took
//! writes) back to the set's state, then into its in-sync members.
//!
//! One member at a time: bulk passes copy every object whose version, tag or length differs
//! (replicas from the primary, disperse fragments rebuilt from the in-sync members) while
//! writes go on — among the objects the in-sync members journaled as written while the set was
//! degraded, for a member that was only away, or among all objects (`full`, or a member the
//! group marked for a full heal: a replaced brick, a damaged one); then a barrier pass fences
//! the primary at the next epoch and copies what
//! changed meanwhile with every write held off; then the metadata group lets the member rejoin
//! at that epoch. A heal that stops after the fence raises the set's epoch so that writes go on
//! without the member. Each object is copied under the primary's ordering lock, so a copy
//! never races a write to that object.

use crate::volume::{VolumeError, brick_addr};
use crate::{BrickClient, MetaClient};
use brickfs_proto::meta::{MetaOp, VolumeRecord};
use brickfs_proto::msg::{DisperseGeometry, HealObjects, Healed, MemberRef, SetRef};
use brickfs_proto::{BrickId, Epoch, ErrorBody, ErrorCode, Message};
use bytes::Bytes;

/// What a heal did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealStats {
    /// Objects compared, copied, and the bytes copied.
    pub scanned: u64,
    pub copied: u64,
    pub bytes: u64,
}

impl HealStats {
    fn add(&mut self, h: &Healed) {
        self.scanned += h.scanned;
        self.copied += h.copied;
        self.bytes += h.bytes;
    }
}

/// How long to wait before going on, so that `bytes` copied since `elapsed` ago stay within
/// `rate` bytes per second (0: no limit).
pub fn pace(bytes: u64, rate: u64, elapsed: std::time::Duration) -> std::time::Duration {
    if rate == 0 {
        return std::time::Duration::ZERO;
    }
    let due = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
    due.saturating_sub(elapsed)
}

/// The volume's heal bandwidth (`heal-bandwidth`, bytes per second; 0 when unset).
pub fn bandwidth(rec: &VolumeRecord) -> u64 {
    rec.options
        .iter()
        .find(|(k, _)| k == "heal-bandwidth")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The (set index, member) pairs of a volume that are out of sync.
pub fn out_of_sync(rec: &VolumeRecord) -> Vec<(usize, BrickId)> {
    rec.sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.members
                .iter()
                .filter(|m| !s.in_sync.contains(m))
                .map(move |m| (i, *m))
        })
        .collect()
}

fn member_ref(rec: &VolumeRecord, brick: BrickId) -> Result<MemberRef, VolumeError> {
    let vb = rec
        .bricks
        .iter()
        .find(|b| b.brick == brick)
        .ok_or_else(|| {
            VolumeError::Refused(ErrorBody::new(
                ErrorCode::Internal,
                format!("brick {brick} is not in the volume"),
            ))
        })?;
    Ok(MemberRef {
        brick,
        addr: brick_addr(vb)?.to_string(),
    })
}

/// Heals `target` of set `index` of the volume `rec` (as last read) and lets it rejoin;
/// `progress` sees the running totals after every page.
pub async fn heal_member(
    meta: &MetaClient,
    bricks: &BrickClient,
    rec: &VolumeRecord,
    index: usize,
    target: BrickId,
    full: bool,
    mut progress: impl FnMut(&HealStats),
) -> Result<HealStats, VolumeError> {
    let set = rec.sets.get(index).ok_or_else(|| {
        VolumeError::Refused(ErrorBody::new(
            ErrorCode::InvalidArgument,
            format!("no set {index}"),
        ))
    })?;
    if set.in_sync.contains(&target) {
        return Ok(HealStats::default());
    }
    let primary = set.primary;
    let primary_addr = brick_addr(
        rec.bricks
            .iter()
            .find(|b| b.brick == primary)
            .ok_or_else(|| {
                VolumeError::Refused(ErrorBody::new(ErrorCode::Internal, "no primary"))
            })?,
    )?;
    let geometry = if rec.disperse_data > 0 {
        Some(DisperseGeometry {
            data_fragments: rec.disperse_data,
            parity_fragments: rec.disperse_redundancy,
            fragment_bytes: brickfs_layout::DISPERSE_FRAGMENT_BYTES,
            members: set
                .members
                .iter()
                .map(|b| member_ref(rec, *b))
                .collect::<Result<_, _>>()?,
            in_sync: set.in_sync.clone(),
        })
    } else {
        None
    };
    let epoch = set.epoch;
    // A member that was only away missed just what the in-sync members journaled meanwhile;
    // a replaced or damaged one (or a heal asked to crawl) compares every object.
    let journal = !full && !set.full_heal.contains(&target);
    let request = |epoch: Epoch, after, barrier, since: Option<u64>| HealObjects {
        brick: primary,
        set: SetRef {
            volume: rec.id,
            set: index as u32,
            epoch,
        },
        target: member_ref(rec, target).expect("checked above"),
        geometry: geometry.clone(),
        after,
        limit: 256,
        barrier,
        journal: journal || since.is_some(),
        since: since.unwrap_or(0),
    };
    member_ref(rec, target)?;
    let call = |req: HealObjects| async move {
        match bricks
            .pool()
            .call(primary_addr, Message::HealObjects(req), Bytes::new())
            .await
        {
            Ok((Message::HealReply(h), _)) => Ok(h),
            Ok((other, _)) => Err(VolumeError::Refused(ErrorBody::new(
                ErrorCode::Malformed,
                format!("HealObjects answered with {}", other.name()),
            ))),
            Err(source) => Err(VolumeError::Brick {
                brick: primary,
                source,
            }),
        }
    };
    let mut stats = HealStats::default();
    // Bulk sweeps while writes go on, within the volume's heal bandwidth: the first over the
    // journal or every object, then over what the primary journaled since the sweep before
    // began, until a sweep copies at most a page (or after four), so that the barrier pass,
    // which holds the set's writes, has only the last sweep's changes to look at.
    let (rate, started) = (bandwidth(rec), std::time::Instant::now());
    let mut since = None;
    for sweep in 0..5 {
        let mut after = None;
        let (mut mark, mut copied) = (None, 0);
        loop {
            let h = call(request(epoch, after, false, since)).await?;
            stats.add(&h);
            progress(&stats);
            mark.get_or_insert(h.mark);
            copied += h.copied;
            after = h.last;
            if !h.more {
                break;
            }
            let wait = pace(stats.bytes, rate, started.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        since = mark;
        if copied <= 256 || sweep == 4 {
            break;
        }
    }
    // The barrier pass (over what was journaled since the last sweep began) and the rejoin,
    // at the next epoch.
    let next = Epoch(epoch.0 + 1);
    let finished = async {
        let h = call(request(next, None, true, since)).await?;
        stats.add(&h);
        progress(&stats);
        meta.write(MetaOp::RejoinMember {
            volume: rec.id,
            set: index as u32,
            member: target,
            epoch,
        })
        .await?;
        Ok::<(), VolumeError>(())
    }
    .await;
    if let Err(e) = finished {
        // The primary may be fenced at `next` already: let the set catch up so writes go on.
        let raise = meta
            .write(MetaOp::RaiseEpoch {
                volume: rec.id,
                set: index as u32,
                at_least: next,
            })
            .await;
        if let Err(r) = raise {
            tracing::warn!(error = %r, "could not raise the epoch after a failed heal");
        }
        return Err(e);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pacing_keeps_copies_within_the_bandwidth() {
        assert_eq!(
            pace(10 << 20, 0, Duration::ZERO),
            Duration::ZERO,
            "no limit"
        );
        // 4 MiB at 1 MiB/s after 1 s: 3 s to wait; after 5 s: none.
        assert_eq!(
            pace(4 << 20, 1 << 20, Duration::from_secs(1)),
            Duration::from_secs(3)
        );
        assert_eq!(
            pace(4 << 20, 1 << 20, Duration::from_secs(5)),
            Duration::ZERO
        );
    }
}
