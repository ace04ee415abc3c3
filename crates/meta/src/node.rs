//! One member of the metadata group: the Raft instance over the RocksDB store, the answers to
//! client writes, reads and administration, and the leader's housekeeping (session expiry).

use crate::kv::KvRead;
use crate::network::Network;
use crate::sm;
use crate::store::{self, DbState, LogStore, StateMachine};
use crate::types::{Command, Raft};
use brickfs_proto::meta::{
    AdminOp, GroupStatus, MemberInfo, MetaOp, MetaRedirect, MetaReply, MetaWrite, RaftRpcKind,
    SessionId,
};
use brickfs_proto::rpc::{ClientOptions, Pool};
use brickfs_proto::{ErrorBody, ErrorCode, Message, NodeId};
use bytes::Bytes;
use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ChangeMembers, SnapshotPolicy};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Settings of a member.
#[derive(Clone, Debug)]
pub struct MetaOptions {
    /// Build a snapshot (and compact the log) after this many entries, or after as many
    /// as the last snapshot's bytes / [`SNAPSHOT_BYTES_PER_ENTRY`] if that is more.
    pub snapshot_after_logs: u64,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    /// How often the leader expires sessions whose lease ran out and looks for silent nodes.
    pub session_sweep: Duration,
    /// A node silent (no heartbeat) for this long is down: its bricks leave the in-sync sets.
    pub down_after: Duration,
}

impl Default for MetaOptions {
    fn default() -> Self {
        MetaOptions {
            snapshot_after_logs: 10_000,
            heartbeat: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(600),
            session_sweep: Duration::from_secs(1),
            down_after: Duration::from_secs(10),
        }
    }
}

/// A snapshot copies the whole namespace, the log one entry per change: a member snapshots
/// again only once the log since the last one holds about as many bytes as it did, so the
/// snapshots' writes stay a bounded share of the log's however large the namespace grows
/// (a fixed count of entries would copy a namespace of a million files every few seconds).
pub const SNAPSHOT_BYTES_PER_ENTRY: u64 = 256;

/// A running member.
pub struct MetaNode {
    id: NodeId,
    addr: String,
    raft: Raft,
    db: Arc<rocksdb::DB>,
    stop: watch::Sender<bool>,
    /// Bumped when applied commands change a file's locks (`MetaRead::WaitLock`).
    lock_changes: Arc<watch::Sender<u64>>,
}

/// Asks for a snapshot whenever the applied entries since the last one reach
/// `max(every, last snapshot's bytes / SNAPSHOT_BYTES_PER_ENTRY)`; one request at a time.
async fn pace_snapshots(
    raft: Raft,
    every: u64,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    // The applied index a requested snapshot must reach, and when it was asked for.
    let mut asked: Option<(u64, std::time::Instant)> = None;
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = stop.changed() => return,
        }
        let (applied, snapshot) = {
            let m = metrics.borrow();
            (
                m.last_applied.map_or(0, |l| l.index),
                m.snapshot.map_or(0, |l| l.index),
            )
        };
        if let Some((at, when)) = asked {
            // Done, or lost (a build that failed logs why): ask again after a minute.
            if snapshot < at && when.elapsed() < Duration::from_secs(60) {
                continue;
            }
            asked = None;
        }
        let need =
            every.max(bytes.load(std::sync::atomic::Ordering::Relaxed) / SNAPSHOT_BYTES_PER_ENTRY);
        if applied.saturating_sub(snapshot) >= need {
            if let Err(e) = raft.trigger().snapshot().await {
                tracing::debug!(error = %e, "could not ask for a metadata snapshot");
                return;
            }
            asked = Some((applied, std::time::Instant::now()));
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn redirect(f: &ForwardToLeader<u64, BasicNode>) -> Message {
    Message::MetaRedirect(MetaRedirect {
        leader: f.leader_id.map(NodeId),
        leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
    })
}

fn fatal(e: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::ShuttingDown,
        format!("metadata member stopped: {e}"),
    )
}

fn encode_reply<T: serde::Serialize>(v: &T) -> (Message, Bytes) {
    (
        Message::RaftRpcReply(brickfs_proto::meta::RaftRpcReply {}),
        Bytes::from(brickfs_proto::msg::encode_body(v)),
    )
}

impl MetaNode {
    /// Opens the member's database under `dir` and starts Raft. A member that was part of a
    /// group rejoins it from its stored state; a new one waits for `Init` or to be added.
    pub async fn start(
        id: NodeId,
        addr: String,
        dir: &Path,
        opts: MetaOptions,
    ) -> Result<Arc<MetaNode>, String> {
        let db = store::open_db(&dir.join("meta"))?;
        let config = openraft::Config {
            cluster_name: "brickfs".into(),
            heartbeat_interval: opts.heartbeat.as_millis() as u64,
            election_timeout_min: opts.election_timeout_min.as_millis() as u64,
            election_timeout_max: opts.election_timeout_min.as_millis() as u64 * 2,
            install_snapshot_timeout: 10_000,
            // `pace_snapshots` asks for them.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: opts.snapshot_after_logs.min(1000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("raft config: {e}"))?;
        let pool = Arc::new(Pool::new(ClientOptions {
            peer_name: format!("meta {id}"),
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
            conns_per_peer: 1,
            ..ClientOptions::default()
        }));
        let sm = StateMachine::new(db.clone());
        let lock_changes = sm.lock_changes();
        let snapshot_bytes = sm.snapshot_bytes();
        let raft = Raft::new(
            id.0,
            Arc::new(config),
            Network::new(pool),
            LogStore::new(db.clone()),
            sm,
        )
        .await
        .map_err(|e| format!("start raft: {e}"))?;
        let (stop, stop_rx) = watch::channel(false);
        let node = Arc::new(MetaNode {
            id,
            addr,
            raft,
            db,
            stop,
            lock_changes,
        });
        tokio::spawn(housekeeping(
            node.clone(),
            opts.session_sweep,
            opts.down_after,
            stop_rx,
        ));
        tokio::spawn(pace_snapshots(
            node.raft.clone(),
            opts.snapshot_after_logs,
            snapshot_bytes,
            node.stop.subscribe(),
        ));
        tracing::info!(node = %id, "metadata member started");
        Ok(node)
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Stops Raft (at daemon shutdown).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "failed to stop raft cleanly");
        }
    }

    /// Answers one metadata or Raft message.
    pub async fn handle(&self, msg: Message, data: Bytes) -> Result<(Message, Bytes), ErrorBody> {
        let none = Bytes::new();
        match msg {
            Message::MetaWrite(w) => Ok((self.write(w).await?, none)),
            Message::MetaRead(r) => {
                match self.raft.ensure_linearizable().await {
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(f) = e.forward_to_leader() {
                            return Ok((redirect(f), none));
                        }
                        return Err(ErrorBody::new(
                            ErrorCode::NotLeader,
                            format!("cannot confirm leadership: {e}"),
                        ));
                    }
                }
                if let brickfs_proto::meta::MetaRead::WaitLock { wait_ms, .. } = &r.read {
                    let wait = Duration::from_millis(u64::from(
                        (*wait_ms).min(brickfs_proto::meta::LOCK_WAIT_MAX_MS),
                    ));
                    return Ok((Message::MetaOk(self.wait_lock(r.read, wait).await?), none));
                }
                Ok((Message::MetaOk(self.read_state(r.read).await?), none))
            }
            Message::MetaAdmin(a) => self.admin(a.op).await.map(|m| (m, none)),
            Message::RaftRpc(rpc) => self.raft_rpc(rpc.kind, &data).await,
            other => Err(ErrorBody::new(
                ErrorCode::Malformed,
                format!("{} is not a metadata request", other.name()),
            )),
        }
    }

    /// Reads applied state on a blocking thread.
    async fn read_state(
        &self,
        read: brickfs_proto::meta::MetaRead,
    ) -> Result<MetaReply, ErrorBody> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || sm::read(&DbState::new(&db), &read))
            .await
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
    }

    /// `MetaRead::WaitLock`: answers once nothing conflicts, or with the conflict after
    /// `wait`. Subscribing before each check means a release applied between the check and
    /// the wait still wakes it.
    async fn wait_lock(
        &self,
        read: brickfs_proto::meta::MetaRead,
        wait: Duration,
    ) -> Result<MetaReply, ErrorBody> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.lock_changes.subscribe();
        loop {
            changes.borrow_and_update();
            let reply = self.read_state(read.clone()).await?;
            if matches!(reply, MetaReply::Lock(None)) {
                return Ok(reply);
            }
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return Ok(reply);
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(reply),
            }
        }
    }

    async fn write(&self, w: MetaWrite) -> Result<Message, ErrorBody> {
        let cmd = Command {
            session: w.session,
            seq: w.seq,
            acked_below: w.acked_below,
            now_ns: now_ns(),
            op: w.op,
        };
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(Message::MetaOk(resp.data?)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Ok(redirect(&f)),
            Err(RaftError::APIError(e)) => Err(ErrorBody::new(ErrorCode::Busy, e.to_string())),
            Err(RaftError::Fatal(e)) => Err(fatal(e)),
        }
    }

    async fn raft_rpc(
        &self,
        kind: RaftRpcKind,
        data: &[u8],
    ) -> Result<(Message, Bytes), ErrorBody> {
        let bad = |e: brickfs_proto::msg::DecodeError| {
            ErrorBody::new(ErrorCode::Malformed, format!("raft rpc: {e}"))
        };
        Ok(match kind {
            RaftRpcKind::AppendEntries => {
                let req = brickfs_proto::msg::decode_body(data).map_err(bad)?;
                encode_reply(&self.raft.append_entries(req).await)
            }
            RaftRpcKind::Vote => {
                let req = brickfs_proto::msg::decode_body(data).map_err(bad)?;
                encode_reply(&self.raft.vote(req).await)
            }
            RaftRpcKind::InstallSnapshot => {
                let req = brickfs_proto::msg::decode_body(data).map_err(bad)?;
                encode_reply(&self.raft.install_snapshot(req).await)
            }
        })
    }

    async fn admin(&self, op: AdminOp) -> Result<Message, ErrorBody> {
        let change_err = |e: RaftError<u64, ClientWriteError<u64, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Ok(redirect(&f)),
            // The previous change is still being committed: the client retries (Busy).
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                openraft::error::ChangeMembershipError::InProgress(e),
            )) => Err(ErrorBody::new(ErrorCode::Busy, e.to_string())),
            RaftError::APIError(e) => {
                Err(ErrorBody::new(ErrorCode::InvalidArgument, e.to_string()))
            }
            RaftError::Fatal(e) => Err(fatal(e)),
        };
        match op {
            AdminOp::Init => {
                let members = BTreeMap::from([(self.id.0, BasicNode::new(&self.addr))]);
                match self.raft.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(node = %self.id, "initialized a new metadata group");
                        Ok(Message::MetaOk(MetaReply::Done))
                    }
                    Err(RaftError::APIError(e)) => Err(ErrorBody::new(
                        ErrorCode::Exists,
                        format!("cannot initialize: {e}"),
                    )),
                    Err(RaftError::Fatal(e)) => Err(fatal(e)),
                }
            }
            AdminOp::AddMember { id, addr, voter } => {
                if let Err(e) = self
                    .raft
                    .add_learner(id.0, BasicNode::new(&addr), true)
                    .await
                {
                    return change_err(e);
                }
                if voter
                    && let Err(e) = self
                        .raft
                        .change_membership(
                            ChangeMembers::AddVoterIds(BTreeSet::from([id.0])),
                            false,
                        )
                        .await
                {
                    return change_err(e);
                }
                tracing::info!(member = %id, %addr, voter, "added a metadata member");
                Ok(Message::MetaOk(MetaReply::Done))
            }
            AdminOp::RemoveMember { id } => {
                let voters: BTreeSet<u64> = self
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect();
                let change = if voters.contains(&id.0) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id.0]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id.0]))
                };
                if let Err(e) = self.raft.change_membership(change, false).await {
                    return change_err(e);
                }
                tracing::info!(member = %id, "removed a metadata member");
                Ok(Message::MetaOk(MetaReply::Done))
            }
            AdminOp::Status => Ok(Message::GroupStatus(self.status())),
        }
    }

    /// What this member knows of the group.
    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                id: NodeId(*id),
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect::<Vec<_>>();
        GroupStatus {
            node: self.id,
            initialized: !members.is_empty(),
            leader: m.current_leader.map(NodeId),
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            members,
        }
    }

    /// Reads committed state on this member without confirming leadership (for tests and
    /// diagnostics: may be stale on a follower).
    pub fn read_local(&self, r: &brickfs_proto::meta::MetaRead) -> Result<MetaReply, ErrorBody> {
        sm::read(&DbState::new(&self.db), r)
    }

    /// Whether this member's state holds `key` (diagnostics).
    pub fn has_state_key(&self, key: &[u8]) -> bool {
        DbState::new(&self.db).get(key).ok().flatten().is_some()
    }
}

/// How long a new or thawed leader leads before it judges nodes silent (see `housekeeping`).
const LEADER_GRACE: Duration = Duration::from_secs(3);

async fn housekeeping(
    node: Arc<MetaNode>,
    every: Duration,
    down_after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let down_after_ms = down_after.as_millis() as u64;
    // Heartbeats reach the state machine only through a working leader: a member that just
    // became leader, or that was itself frozen, sees every node silent. It judges silence only
    // after leading, awake, for `LEADER_GRACE` (or `down_after`, if shorter): by then every
    // live node's heartbeat (one a second, trying the members in turn) has found it.
    let mut leading_since: Option<std::time::Instant> = None;
    let mut last_tick = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let paused = last_tick.elapsed() > every * 3;
        last_tick = std::time::Instant::now();
        let leader = node.raft.metrics().borrow().current_leader;
        if leader != Some(node.id.0) {
            leading_since = None;
            continue;
        }
        if paused || leading_since.is_none() {
            leading_since = Some(std::time::Instant::now());
        }
        let judge_silence =
            leading_since.is_some_and(|t| t.elapsed() >= down_after.min(LEADER_GRACE));
        // Propose only when there is something to do, so an idle group writes nothing.
        let now = now_ns();
        let expired = match node.read_local(&brickfs_proto::meta::MetaRead::ListSessions) {
            Ok(MetaReply::Sessions(list)) => list.iter().any(|s| {
                i64::try_from(s.lease_expires_ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX)
                    < now
            }),
            _ => false,
        };
        if expired {
            node.propose(MetaOp::ExpireSessions).await;
        }
        if judge_silence && silent_in_sync_member(&node, now, down_after_ms) {
            node.propose(MetaOp::DetectFailures { down_after_ms }).await;
        }
    }
}

/// Whether some set has more than one in-sync member and one of them is on a node silent for
/// longer than `down_after_ms`, or a replacement has drained for longer than that.
fn silent_in_sync_member(node: &MetaNode, now_ns: i64, down_after_ms: u64) -> bool {
    use brickfs_proto::meta::MetaRead;
    let now_ms = u64::try_from(now_ns / 1_000_000).unwrap_or(0);
    let (Ok(MetaReply::Nodes(nodes)), Ok(MetaReply::Volumes(volumes))) = (
        node.read_local(&MetaRead::ListNodes),
        node.read_local(&MetaRead::ListVolumes),
    ) else {
        return false;
    };
    let silent = |id| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .is_none_or(|n| n.last_heartbeat_ms.saturating_add(down_after_ms) < now_ms)
    };
    volumes.iter().any(|v| {
        v.sets.iter().any(|set| {
            set.draining
                .as_ref()
                .is_some_and(|d| d.since_ms.saturating_add(down_after_ms) < now_ms)
                || set.in_sync.len() > 1
                    && set.in_sync.iter().any(|b| {
                        v.bricks
                            .iter()
                            .find(|x| x.brick == *b)
                            .is_some_and(|x| silent(x.node))
                    })
        })
    })
}

impl MetaNode {
    /// Proposes a housekeeping command (outside any session) stamped with this leader's clock.
    async fn propose(&self, op: MetaOp) {
        let cmd = Command {
            session: SessionId(0),
            seq: 0,
            acked_below: 0,
            now_ns: now_ns(),
            op,
        };
        if let Err(e) = self.raft.client_write(cmd).await {
            tracing::debug!(error = %e, "housekeeping command not applied");
        }
    }
}
