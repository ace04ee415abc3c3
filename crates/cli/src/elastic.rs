//! `brickfs volume add-brick | remove-brick | rebalance`: growing and shrinking volumes while
//! they are mounted (the moving itself runs on the metadata leader's node, see
//! `brickfs_client::rebalance`).

use super::{UsageError, expect_volume, print_json};
use anyhow::Context;
use brickfs_client::MetaClient;
use brickfs_proto::meta::{BrickRecord, MetaOp, MetaRead, MetaReply, RebalanceState, VolumeRecord};
use serde::Serialize;

/// What `remove-brick` does with the groups named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveAction {
    Start,
    Status,
    Stop,
    Commit,
}

/// Splits `BRICK... start|status|stop|commit` (GlusterFS's order).
pub fn parse_remove(words: &[String]) -> Result<(Vec<String>, RemoveAction), UsageError> {
    let (last, bricks) = words
        .split_last()
        .ok_or_else(|| UsageError("remove-brick needs BRICK... start|status|stop|commit".into()))?;
    let action = match last.as_str() {
        "start" => RemoveAction::Start,
        "status" => RemoveAction::Status,
        "stop" => RemoveAction::Stop,
        "commit" => RemoveAction::Commit,
        other => {
            return Err(UsageError(format!(
                "remove-brick ends with start, status, stop or commit, not {other:?}"
            )));
        }
    };
    if action == RemoveAction::Start && bricks.is_empty() {
        return Err(UsageError(
            "remove-brick start needs the bricks to remove".into(),
        ));
    }
    Ok((bricks.to_vec(), action))
}

/// A rebalance's state and what is left, as `rebalance status` and `remove-brick status`
/// show it.
#[derive(Debug, Serialize)]
pub struct MoveStatus {
    pub volume: String,
    /// not started, running, stopped, done.
    pub state: String,
    pub drain_only: bool,
    pub pass: u32,
    pub scanned: u64,
    pub moved: u64,
    pub moved_bytes: u64,
    pub skipped: u64,
    pub last_error: String,
    pub elapsed_secs: f64,
    /// Groups being emptied by remove-brick, and their bricks.
    pub draining_groups: Vec<u32>,
    pub draining_bricks: Vec<String>,
    /// Files not where they should be yet (on draining groups, or away from their home), and
    /// their bytes.
    pub files_left: u64,
    pub bytes_left: u64,
}

async fn read_volume(m: &MetaClient, name: &str) -> anyhow::Result<VolumeRecord> {
    expect_volume(
        m.read(MetaRead::VolumeByName {
            name: name.to_string(),
        })
        .await
        .with_context(|| format!("get volume {name}"))?,
    )
}

/// Reads the volume's rebalance and counts the files still to move (a scan of its inodes).
pub async fn move_status(m: &MetaClient, name: &str) -> anyhow::Result<MoveStatus> {
    let v = read_volume(m, name).await?;
    let bricks: Vec<BrickRecord> = match m.read(MetaRead::ListBricks).await? {
        MetaReply::Bricks(b) => b,
        other => anyhow::bail!("unexpected answer {other:?}"),
    };
    let drain_only = v.rebalance.as_ref().is_none_or(|r| r.drain_only);
    let (mut files_left, mut bytes_left) = (0, 0);
    let placement = brickfs_client::rebalance::Placement::new(&v, &bricks);
    let mut after = brickfs_proto::Ino(0);
    loop {
        let MetaReply::Files { files, next } = m
            .read(MetaRead::Files {
                volume: v.id,
                after,
                limit: 4096,
            })
            .await?
        else {
            anyhow::bail!("unexpected answer to Files");
        };
        for f in &files {
            if placement.destination(drain_only, f).is_some() {
                files_left += 1;
                bytes_left += f.size_bytes;
            }
        }
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    let s = v.group_width();
    let draining_bricks = v
        .draining
        .iter()
        .flat_map(|g| v.sets[*g as usize * s..(*g as usize + 1) * s].iter())
        .flat_map(|set| set.members.iter())
        .filter_map(|id| v.bricks.iter().find(|b| b.brick == *id))
        .map(|b| b.addr.clone())
        .collect();
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let r = v.rebalance.clone();
    let p = r.as_ref().map(|r| r.progress.clone()).unwrap_or_default();
    Ok(MoveStatus {
        volume: v.name.clone(),
        state: match r.as_ref().map(|r| r.state) {
            None => "not started",
            Some(RebalanceState::Running) => "running",
            Some(RebalanceState::Stopped) => "stopped",
            Some(RebalanceState::Done) => "done",
        }
        .to_string(),
        drain_only,
        pass: p.pass,
        scanned: p.scanned,
        moved: p.moved,
        moved_bytes: p.moved_bytes,
        skipped: p.skipped,
        last_error: p.last_error,
        elapsed_secs: r.as_ref().map_or(0.0, |r| {
            let until = if r.state == RebalanceState::Running {
                now_ns
            } else {
                r.updated_ns
            };
            (until - r.started_ns).max(0) as f64 / 1e9
        }),
        draining_groups: v.draining.clone(),
        draining_bricks,
        files_left,
        bytes_left,
    })
}

fn print_status(st: &MoveStatus, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(st);
    }
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let total = st.moved + st.files_left;
    let pct = if total == 0 {
        100.0
    } else {
        st.moved as f64 * 100.0 / total as f64
    };
    println!(
        "Volume {}: rebalance {}{} (pass {}, {:.0} s)",
        st.volume,
        st.state,
        if st.drain_only { ", draining only" } else { "" },
        st.pass,
        st.elapsed_secs
    );
    println!(
        "  scanned {} files, moved {} ({:.1} MiB), skipped this pass {}; {} files ({:.1} MiB) left to move: {pct:.0}% done",
        st.scanned,
        st.moved,
        mib(st.moved_bytes),
        st.skipped,
        st.files_left,
        mib(st.bytes_left)
    );
    if !st.draining_groups.is_empty() {
        println!(
            "  removing groups {:?}: {}",
            st.draining_groups,
            st.draining_bricks.join(" ")
        );
        if st.files_left == 0 {
            println!("  drained: `remove-brick ... commit` takes the bricks out");
        }
    }
    if !st.last_error.is_empty() {
        println!("  last error: {}", st.last_error);
    }
    Ok(())
}

pub async fn add_brick(
    m: &MetaClient,
    name: &str,
    bricks: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    for b in &bricks {
        brickfs_layout::BrickAddr::parse(b).map_err(|e| UsageError(e.to_string()))?;
    }
    let n = bricks.len();
    let v = expect_volume(
        m.write(MetaOp::AddBricks {
            name: name.to_string(),
            bricks,
        })
        .await
        .with_context(|| format!("add bricks to volume {name}"))?,
    )?;
    if json {
        return print_json(&v);
    }
    println!(
        "volume add-brick: {name}: {n} bricks added, now {} ({} bricks); new files spread over them now, `brickfs volume rebalance {name} start` moves existing ones",
        v.type_name,
        v.bricks.len()
    );
    Ok(())
}

pub async fn remove_brick(
    m: &MetaClient,
    name: &str,
    words: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    let (bricks, action) = parse_remove(&words)?;
    let op = match action {
        RemoveAction::Status => return print_status(&move_status(m, name).await?, json),
        RemoveAction::Start => MetaOp::RemoveBricksStart {
            name: name.to_string(),
            bricks,
        },
        RemoveAction::Stop => MetaOp::RemoveBricksStop {
            name: name.to_string(),
        },
        RemoveAction::Commit => MetaOp::RemoveBricksCommit {
            name: name.to_string(),
        },
    };
    let v = expect_volume(
        m.write(op)
            .await
            .with_context(|| format!("remove-brick {action:?} on volume {name}"))?,
    )?;
    if json {
        return print_json(&v);
    }
    match action {
        RemoveAction::Start => println!(
            "volume remove-brick start: {name}: draining groups {:?}; follow with `brickfs volume remove-brick {name} status`",
            v.draining
        ),
        RemoveAction::Stop => {
            println!("volume remove-brick stop: {name}: the groups take files again")
        }
        _ => println!(
            "volume remove-brick commit: {name}: done, now {} ({} bricks); the removed bricks are free",
            v.type_name,
            v.bricks.len()
        ),
    }
    Ok(())
}

pub async fn rebalance(m: &MetaClient, name: &str, action: &str, json: bool) -> anyhow::Result<()> {
    let op = match action {
        "status" => return print_status(&move_status(m, name).await?, json),
        "start" => MetaOp::RebalanceStart {
            name: name.to_string(),
        },
        "stop" => MetaOp::RebalanceStop {
            name: name.to_string(),
        },
        other => {
            return Err(UsageError(format!(
                "rebalance takes start, status or stop, not {other:?}"
            ))
            .into());
        }
    };
    let v = expect_volume(
        m.write(op)
            .await
            .with_context(|| format!("rebalance {action} on volume {name}"))?,
    )?;
    if json {
        return print_json(&v);
    }
    println!(
        "volume rebalance: {name}: {action} succeeded; `brickfs volume rebalance {name} status` shows progress"
    );
    Ok(())
}
