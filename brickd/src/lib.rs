//! brickd: the node daemon. It serves the bricks given in its config over the protocol and,
//! with `--meta`, runs a member of the metadata group; one listener serves both.
//!
//! The `brickd` executable (in the root package, `src/bin/brickd.rs`) only parses flags, starts
//! tracing, installs the panic hook and calls [`run`]. This crate owns the config ([`config`])
//! and the daemon's life cycle: open bricks, listen, log readiness, serve, and on SIGTERM or
//! Ctrl-C stop accepting, finish requests in flight, flush, exit.

pub mod access;
pub mod api;
pub mod config;
pub mod telemetry;

use anyhow::Context;
use brickfs_brick::{BrickService, BrickStore, StoreOptions};
use brickfs_meta::node::{MetaNode, MetaOptions};
use brickfs_proto::rpc::Handler;
use brickfs_proto::{ErrorBody, ErrorCode, Message, NodeId};
use bytes::Bytes;
use config::Config;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::Instrument;
use tracing::{info, warn};

/// Runs the daemon until SIGTERM or Ctrl-C.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("brickd")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(config))
}

/// Reads this node's id from the data folder, creating it on first start.
fn load_or_create_node_id(data_dir: &Path) -> anyhow::Result<NodeId> {
    let path = data_dir.join("node.id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let hex = text.trim().strip_prefix('n').unwrap_or(text.trim());
            let raw = u64::from_str_radix(hex, 16)
                .with_context(|| format!("parse node id file {}", path.display()))?;
            return Ok(NodeId(raw));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data folder {}", data_dir.display()))?;
    let id = NodeId(rand::random::<u64>().max(1));
    let tmp = data_dir.join("node.id.tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    writeln!(file, "{id}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    info!(node = %id, "created node id");
    Ok(id)
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "failed to install the SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return "ctrl-c";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "ctrl-c",
    }
}

/// Routes each request to the brick service or the metadata member.
struct NodeHandler {
    node: NodeId,
    bricks: Arc<BrickService>,
    meta: Option<Arc<MetaNode>>,
    metrics: Arc<brickfs_proto::metrics::OpMetrics>,
    access: Arc<access::Access>,
    /// For what this node does for an administrator (credentials); `None` without a group.
    group: Option<brickfs_client::MetaClient>,
}

impl Handler for NodeHandler {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn handle_from(
        &self,
        peer: brickfs_proto::cred::Peer,
        msg: Message,
        data: Bytes,
    ) -> Result<(Message, Bytes), ErrorBody> {
        if let Err(e) = self.access.check(peer, &msg) {
            self.metrics
                .record(msg.name(), std::time::Duration::ZERO, false, 0, 0);
            return Err(e);
        }
        match &msg {
            Message::IssueCredential(req) => {
                let start = std::time::Instant::now();
                let r = self.issue_credential(peer, req).await;
                self.metrics
                    .record(msg.name(), start.elapsed(), r.is_ok(), 0, 0);
                return r.map(|m| (m, Bytes::new()));
            }
            Message::MetaWrite(w) => {
                if let brickfs_proto::meta::MetaOp::RegisterNode { node } = &w.op
                    && matches!(peer.role, brickfs_proto::cred::Role::Admin)
                {
                    verify_node(node).await?;
                }
            }
            _ => {}
        }
        // A client's metadata writes carry who sent them: the group binds sessions to the
        // credential that opened them.
        let msg = match (msg, peer.role) {
            (Message::MetaWrite(mut w), brickfs_proto::cred::Role::Client { volume, id }) => {
                w.op = brickfs_proto::meta::MetaOp::AsClient {
                    volume,
                    credential: id,
                    op: Box::new(w.op),
                };
                Message::MetaWrite(w)
            }
            (msg, _) => msg,
        };
        let reply = self.handle(msg, data).await;
        // A client reads its volume's record (it opens the volume with it), but of the
        // volume's credentials only its own.
        match (reply, peer.role) {
            (
                Ok((Message::MetaOk(brickfs_proto::meta::MetaReply::Volume(mut v)), data)),
                brickfs_proto::cred::Role::Client { id, .. },
            ) => {
                v.credentials.retain(|c| c.id == id);
                Ok((
                    Message::MetaOk(brickfs_proto::meta::MetaReply::Volume(v)),
                    data,
                ))
            }
            (reply, _) => reply,
        }
    }

    async fn handle(&self, msg: Message, data: Bytes) -> Result<(Message, Bytes), ErrorBody> {
        let (name, bytes_in, start) = (msg.name(), data.len() as u64, std::time::Instant::now());
        // Background work on this node rests while this runs (and shortly after).
        let _foreground = is_foreground(&msg).then(brickfs_brick::pace::foreground);
        let r = self.route(msg, data).await;
        let bytes_out = r.as_ref().map_or(0, |(_, d)| d.len() as u64);
        self.metrics
            .record(name, start.elapsed(), r.is_ok(), bytes_in, bytes_out);
        r
    }
}

/// Whether a request is an application's (through a mount or the client library), which the
/// node's background work yields to; heal, scrub, GC deletes, listings, Raft traffic and
/// lock waits held back by the leader are not.
fn is_foreground(msg: &Message) -> bool {
    use brickfs_proto::meta::MetaRead;
    match msg {
        Message::Write(_)
        | Message::Read(_)
        | Message::Truncate(_)
        | Message::Fsync(_)
        | Message::Stat(_)
        | Message::Seal(_)
        | Message::SetWrite(_)
        | Message::SetTruncate(_)
        | Message::MemberWrite(_)
        | Message::MemberTruncate(_)
        | Message::MemberRollback(_)
        | Message::DisperseWrite(_)
        | Message::DisperseTruncate(_)
        | Message::MetaWrite(_) => true,
        Message::MetaRead(r) => !matches!(r.read, MetaRead::WaitLock { .. }),
        _ => false,
    }
}

/// Lists a fresh client credential for `volume` (revoking its others when `replace`) and
/// returns its text, derived from `key`: nothing keeps it.
pub(crate) async fn issue_credential(
    group: &brickfs_client::MetaClient,
    key: &[u8],
    volume: &str,
    label: &str,
    replace: bool,
) -> Result<brickfs_proto::msg::CredentialIssued, ErrorBody> {
    use brickfs_proto::cred::{Credential, client_secret};
    use brickfs_proto::meta::{ClientCredential, MetaOp, MetaRead, MetaReply};
    let rejected = |e: brickfs_client::MetaError| match e {
        brickfs_client::MetaError::Rejected(body) => body,
        other => ErrorBody::new(ErrorCode::Busy, other.to_string()),
    };
    let MetaReply::Volume(v) = group
        .read(MetaRead::VolumeByName {
            name: volume.to_string(),
        })
        .await
        .map_err(rejected)?
    else {
        return Err(ErrorBody::new(
            ErrorCode::Internal,
            "unexpected answer to VolumeByName",
        ));
    };
    let id = rand::random::<u64>().max(1);
    let created_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let credential = ClientCredential {
        id,
        created_ms,
        label: label.to_string(),
    };
    let name = volume.to_string();
    // A rotation is one command: the volume never lists both, nor none.
    let op = if replace {
        MetaOp::RotateCredential { name, credential }
    } else {
        MetaOp::AddCredential { name, credential }
    };
    let revoked = match group.write(op).await.map_err(rejected)? {
        MetaReply::Rotated { revoked, .. } => revoked,
        _ => Vec::new(),
    };
    let credential = Credential::Client {
        volume: v.id,
        id,
        secret: client_secret(key, v.id, id),
    }
    .to_text()
    .unwrap_or_default();
    Ok(brickfs_proto::msg::CredentialIssued {
        volume: v.id,
        id,
        credential,
        revoked,
    })
}

/// An administrator registers a node (`peer add`) only at an address that proves the cluster
/// key and the node id the record names: a holder of the admin credential cannot put an
/// address of its own on the node list.
async fn verify_node(node: &brickfs_proto::meta::NodeRecord) -> Result<(), ErrorBody> {
    let addr: std::net::SocketAddr = node.addr.parse().map_err(|_| {
        ErrorBody::new(
            ErrorCode::InvalidArgument,
            format!("node address {:?} is not HOST:PORT", node.addr),
        )
    })?;
    let client = brickfs_client::BrickClient::new(brickfs_proto::rpc::ClientOptions {
        peer_name: "brickd (checking a node to register)".into(),
        conns_per_peer: 1,
        // Within the caller's metadata request timeout (4 s).
        connect_timeout: std::time::Duration::from_secs(2),
        request_timeout: std::time::Duration::from_secs(2),
        ..brickfs_proto::rpc::ClientOptions::default()
    });
    match client.ping(addr).await {
        Ok(id) if id == node.id => Ok(()),
        Ok(id) => Err(ErrorBody::new(
            ErrorCode::PermissionDenied,
            format!("{addr} is node {id}, not {}", node.id),
        )),
        Err(e) => {
            warn!(%addr, error = %e, "refused to register a node that did not prove the cluster key");
            Err(ErrorBody::new(
                ErrorCode::PermissionDenied,
                format!(
                    "{addr} did not prove the cluster key, so it is not registered as a node: {e}"
                ),
            ))
        }
    }
}

impl NodeHandler {
    /// Makes a client credential of a volume (see `Message::IssueCredential`).
    async fn issue_credential(
        &self,
        peer: brickfs_proto::cred::Peer,
        req: &brickfs_proto::msg::IssueCredential,
    ) -> Result<Message, ErrorBody> {
        use brickfs_proto::cred::Role;
        let key = match (peer.role, brickfs_proto::rpc::cluster_key()) {
            (Role::Node | Role::Admin, Some(key)) => key,
            (_, None) => {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidArgument,
                    "this cluster has no key, so it has no client credentials (start the nodes with --cluster-key-file)",
                ));
            }
            (role, Some(_)) => {
                return Err(ErrorBody::new(
                    ErrorCode::PermissionDenied,
                    format!("{} may not issue credentials", role.describe()),
                ));
            }
        };
        let Some(group) = &self.group else {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                format!("node {} knows no metadata group", self.node),
            ));
        };
        let issued = issue_credential(group, &key, &req.volume, &req.label, req.replace).await?;
        info!(volume = %req.volume, credential = %format!("{:x}", issued.id), revoked = issued.revoked.len(), by = %peer.addr, "issued a client credential");
        Ok(Message::CredentialIssued(issued))
    }

    async fn route(&self, msg: Message, data: Bytes) -> Result<(Message, Bytes), ErrorBody> {
        match msg {
            Message::MetaWrite(_)
            | Message::MetaRead(_)
            | Message::MetaAdmin(_)
            | Message::RaftRpc(_) => match &self.meta {
                Some(meta) => meta.handle(msg, data).await,
                None => Err(ErrorBody::new(
                    ErrorCode::NotLeader,
                    format!("node {} runs no metadata member", self.node),
                )),
            },
            other => self.bricks.handle(other, data).await,
        }
    }
}

/// What `GET /metrics` shows: requests served (per message kind: calls, errors, bytes,
/// latency), each brick's capacity, objects and heal journal, the lease, and the metadata
/// member's Raft state.
fn render_metrics(
    metrics: Arc<brickfs_proto::metrics::OpMetrics>,
    service: Arc<BrickService>,
    meta: Option<Arc<MetaNode>>,
) -> Arc<dyn Fn() -> String + Send + Sync> {
    use brickfs_proto::metrics::gauge;
    Arc::new(move || {
        let mut out = String::new();
        metrics.render("brickd", &mut out);
        for b in service.bricks() {
            let labels = format!("brick=\"{}\"", b.id());
            if let Ok(st) = b.statfs() {
                gauge(
                    &mut out,
                    "brickd_brick_total_bytes",
                    "Brick file system size.",
                    &labels,
                    st.total_bytes as f64,
                );
                gauge(
                    &mut out,
                    "brickd_brick_avail_bytes",
                    "Brick file system space available.",
                    &labels,
                    st.avail_bytes as f64,
                );
                gauge(
                    &mut out,
                    "brickd_brick_objects",
                    "Objects on the brick.",
                    &labels,
                    st.objects as f64,
                );
            }
            if let Ok(n) = b.journal_len(1_000_000) {
                gauge(
                    &mut out,
                    "brickd_heal_journal_objects",
                    "Objects journaled for the heal of members out of sync (the heal backlog this brick knows of).",
                    &labels,
                    n as f64,
                );
            }
        }
        gauge(
            &mut out,
            "brickd_lease_held",
            "1 while the metadata group acknowledges this node's heartbeats (or it needs none).",
            "",
            f64::from(u8::from(service.lease_held())),
        );
        if let Some(m) = &meta {
            let st = m.status();
            gauge(
                &mut out,
                "brickd_raft_term",
                "The metadata member's Raft term.",
                "",
                st.term as f64,
            );
            gauge(
                &mut out,
                "brickd_raft_commit_index",
                "The last log index applied.",
                "",
                st.last_applied_index.unwrap_or(0) as f64,
            );
            gauge(
                &mut out,
                "brickd_raft_last_log_index",
                "The last log index.",
                "",
                st.last_log_index.unwrap_or(0) as f64,
            );
            gauge(
                &mut out,
                "brickd_raft_is_leader",
                "1 on the leader.",
                "",
                f64::from(u8::from(st.leader == Some(st.node))),
            );
            gauge(
                &mut out,
                "brickd_raft_leader_known",
                "1 when this member knows a leader.",
                "",
                f64::from(u8::from(st.leader.is_some())),
            );
        }
        out
    })
}

/// How often a node tells the metadata group it is alive.
const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reports this node alive to the metadata group until shutdown. A node not yet registered
/// (`peer add`) is skipped quietly; an unreachable group is logged once per outage.
async fn heartbeat(
    node: NodeId,
    peers: Vec<std::net::SocketAddr>,
    service: Arc<BrickService>,
    mut stop: watch::Receiver<bool>,
) {
    let client = brickfs_client::MetaClient::new(
        peers,
        brickfs_client::MetaClientOptions {
            client_name: format!("brickd {node}"),
            deadline: HEARTBEAT_EVERY,
            ..brickfs_client::MetaClientOptions::default()
        },
    );
    // Until the group first acknowledges one (the node just started, or is not registered
    // yet), heartbeats go ten times as often: the lease (which reads and writes need) comes up
    // right after `peer add`.
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY / 10);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acknowledged = false;
    let mut reachable = true;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // Bricks opened after an unclean stop may have lost acknowledged writes: the group
        // takes them out of sync (for a full heal) before this node reads for anyone. Until
        // then they refuse client reads.
        let unclean = service.unreported();
        if !unclean.is_empty() {
            let op = brickfs_proto::meta::MetaOp::ReportRestart {
                node,
                bricks: unclean.clone(),
            };
            // In this node's session: applied exactly once, so that a retry of a report whose
            // answer was lost cannot take a brick healed meanwhile out of its set again.
            match client.write(op).await {
                Ok(_) => {
                    warn!(%node, bricks = ?unclean, "bricks opened after an unclean stop: reported, out of sync until healed");
                    service.reported(&unclean);
                }
                Err(e) => {
                    warn!(%node, error = %e, "could not report bricks opened after an unclean stop; they serve no reads meanwhile");
                    continue;
                }
            }
        }
        let sent = std::time::Instant::now();
        match client
            .write_unsessioned(brickfs_proto::meta::MetaOp::Heartbeat { node })
            .await
        {
            Ok(reply) => {
                // Which bricks are out of sync, before the lease lets reads through.
                if let brickfs_proto::meta::MetaReply::Standing {
                    in_sync,
                    volumes,
                    epochs,
                } = reply
                {
                    service.fence_epochs(&epochs).await;
                    service.set_standing(in_sync, volumes, sent);
                }
                service.renew_lease(sent);
                if !acknowledged {
                    acknowledged = true;
                    tick = tokio::time::interval(HEARTBEAT_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick.reset();
                }
                if !reachable {
                    info!(%node, "metadata group reachable again");
                }
                reachable = true;
            }
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                tracing::debug!(%node, "not registered yet; heartbeat skipped");
            }
            Err(e) => {
                if reachable {
                    warn!(%node, error = %e, "failed to send a heartbeat to the metadata group");
                }
                reachable = false;
            }
        }
    }
}

/// The clients of a duty the metadata leader's node runs (GC, heal), named after it. Its
/// session is renewed by a task of its own, every third of its lease, so that a long round
/// of the duty never lets it expire.
fn duty_clients(
    node: NodeId,
    advertise: std::net::SocketAddr,
    duty: &str,
    every: std::time::Duration,
) -> (brickfs_client::MetaClient, brickfs_client::BrickClient) {
    let meta = brickfs_client::MetaClient::new(
        vec![advertise],
        brickfs_client::MetaClientOptions {
            client_name: format!("brickd {node} {duty}"),
            deadline: every * 5,
            ..brickfs_client::MetaClientOptions::default()
        },
    );
    // Ends by itself once `meta` is dropped.
    let _keepalive = meta.spawn_keepalive(brickfs_client::MetaClientOptions::default().lease / 3);
    let bricks = brickfs_client::BrickClient::new(brickfs_proto::rpc::ClientOptions {
        peer_name: format!("brickd {node} {duty}"),
        ..Default::default()
    });
    (meta, bricks)
}

/// Waits for the next round of a leader's duty: false once the node stops; rounds while this
/// node's metadata member does not lead are skipped.
async fn next_round_as_leader(
    tick: &mut tokio::time::Interval,
    stop: &mut watch::Receiver<bool>,
    member: &MetaNode,
    node: NodeId,
) -> bool {
    loop {
        tokio::select! {
            _ = stop.changed() => return false,
            _ = tick.tick() => {}
        }
        if member.status().leader == Some(node) {
            return true;
        }
    }
}

/// How often the metadata leader's node looks for deleted files to remove from the bricks.
const GC_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Deleted files removed per volume and round.
const GC_BATCH: u32 = 256;
/// Files one GC commit reports removed.
const GC_DONE_BATCH: usize = 64;

/// Removes the objects of deleted files (the metadata group's GC queue) while this node's
/// metadata member leads; one round every `GC_EVERY`, logged when it removed anything.
async fn collect_garbage(
    node: NodeId,
    member: Arc<MetaNode>,
    advertise: std::net::SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    use brickfs_proto::meta::{MetaRead, MetaReply, VolumeStatus};
    let (meta, bricks) = duty_clients(node, advertise, "gc", GC_EVERY);
    let mut tick = tokio::time::interval(GC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_round_as_leader(&mut tick, &mut stop, &member, node).await {
        let Ok(volumes) = meta.list_volumes().await else {
            continue;
        };
        for v in volumes.iter().filter(|v| v.status == VolumeStatus::Started) {
            let items = match meta
                .read(MetaRead::ListGc {
                    volume: v.id,
                    limit: GC_BATCH,
                })
                .await
            {
                Ok(MetaReply::Gc(items)) if !items.is_empty() => items,
                _ => continue,
            };
            let vol =
                match brickfs_client::VolumeClient::open(meta.clone(), bricks.clone(), &v.name)
                    .await
                {
                    Ok(vol) => vol,
                    Err(e) => {
                        warn!(volume = %v.name, error = %e, "gc: cannot open the volume");
                        continue;
                    }
                };
            let (mut removed, mut bytes, mut failed) = (0u64, 0u64, 0u64);
            let mut done = Vec::new();
            for item in &items {
                let span = tracing::debug_span!("gc", volume = %v.name, ino = %item.ino);
                let start = tokio::time::Instant::now();
                match vol.remove_objects(item).instrument(span).await {
                    Ok(()) => {
                        removed += 1;
                        bytes += item.size_bytes;
                        done.push(item.ino);
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::debug!(volume = %v.name, ino = %item.ino, error = %e, "gc: removal failed; retried next round");
                    }
                }
                if done.len() >= GC_DONE_BATCH {
                    gc_done(&meta, v.id, std::mem::take(&mut done)).await;
                }
                // Background work: it yields to this node's foreground (see `pace`).
                brickfs_brick::pace::rest_async(start.elapsed()).await;
            }
            gc_done(&meta, v.id, done).await;
            info!(volume = %v.name, removed, bytes, failed, "gc: removed the objects of deleted files");
        }
        for v in volumes
            .iter()
            .filter(|v| v.status == VolumeStatus::Deleting)
        {
            purge_volume(&meta, &bricks, v).await;
        }
    }
}

/// Objects of a deleted volume removed per brick and round.
const PURGE_BATCH: u32 = 1024;

/// Removes up to `PURGE_BATCH` objects of deleted volume `v` from each of its bricks; once no
/// brick lists any, tells the metadata group (`VolumePurged`), which frees the bricks.
/// Resumable by construction: what is removed is gone, so the next round (after a restart or
/// a change of leader too) lists only what is left. A brick that does not answer is tried
/// again next round; until it answers the bricks stay taken.
async fn purge_volume(
    meta: &brickfs_client::MetaClient,
    bricks: &brickfs_client::BrickClient,
    v: &brickfs_proto::meta::VolumeRecord,
) {
    use brickfs_proto::meta::{MetaOp, MetaRead, MetaReply};
    let Ok(MetaReply::Nodes(nodes)) = meta.read(MetaRead::ListNodes).await else {
        return;
    };
    let first = brickfs_proto::ObjectKey {
        volume: v.id,
        ino: brickfs_proto::Ino(0),
        column: 0,
    };
    let mut clean = true;
    for b in &v.bricks {
        let Some(addr) = nodes
            .iter()
            .find(|n| n.id == b.node)
            .and_then(|n| n.addr.parse::<std::net::SocketAddr>().ok())
        else {
            warn!(volume = %v.name, brick = %b.addr, "purge: the brick's node is not in the cluster map; its objects stay");
            clean = false;
            continue;
        };
        let (mut removed, mut left) = (0u64, false);
        'pages: while removed < u64::from(PURGE_BATCH) {
            // Removed objects no longer list: every page starts at the volume's first key.
            let (page, more) = match bricks.list(addr, b.brick, Some(first), PURGE_BATCH).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(volume = %v.name, brick = %b.addr, error = %e, "purge: cannot list the brick; retried next round");
                    left = true;
                    break;
                }
            };
            for o in &page {
                if o.key.volume != v.id {
                    break 'pages;
                }
                let start = tokio::time::Instant::now();
                if let Err(e) = bricks.delete(addr, b.brick, o.key).await {
                    warn!(volume = %v.name, brick = %b.addr, object = %o.key, error = %e, "purge: removal failed; retried next round");
                    left = true;
                    break 'pages;
                }
                removed += 1;
                brickfs_brick::pace::rest_async(start.elapsed()).await;
            }
            if !more || page.is_empty() {
                break;
            }
        }
        if removed >= u64::from(PURGE_BATCH) {
            left = true;
        }
        if removed > 0 || left {
            info!(volume = %v.name, brick = %b.addr, removed, done = !left, "purge: removed objects of the deleted volume");
        }
        clean &= !left;
    }
    if clean {
        match meta.write(MetaOp::VolumePurged { volume: v.id }).await {
            Ok(_) => {
                info!(volume = %v.name, id = %v.id, "purge: the deleted volume's bricks hold none of its objects; they are free")
            }
            Err(e) => {
                warn!(volume = %v.name, error = %e, "purge: could not report the volume purged; retried next round")
            }
        }
    }
}

/// Drops files whose objects are gone from the GC queue, in one command (a failure leaves
/// them queued: removing them again is harmless).
async fn gc_done(
    meta: &brickfs_client::MetaClient,
    volume: brickfs_proto::VolumeId,
    inos: Vec<brickfs_proto::Ino>,
) {
    if inos.is_empty() {
        return;
    }
    let n = inos.len();
    if let Err(e) = meta
        .write(brickfs_proto::meta::MetaOp::GcDoneMany { volume, inos })
        .await
    {
        warn!(%volume, files = n, error = %e, "gc: could not report removed files; they are removed again next round");
    }
}

/// Reads every object of every brick of this node at `rate` bytes per second, one pass every
/// `interval`, verifying every block. A damaged object is reported to the metadata group,
/// which takes the brick out of its set's in-sync members (unless it is the last one); the
/// object is then quarantined so that the set heals it from the good copies.
async fn scrub(
    node: NodeId,
    service: Arc<BrickService>,
    peers: Vec<std::net::SocketAddr>,
    rate: u64,
    interval: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    use brickfs_proto::meta::{MetaOp, MetaReply};
    if rate == 0 {
        info!("scrubber off (scrub_rate 0)");
        return;
    }
    let meta = brickfs_client::MetaClient::new(
        peers,
        brickfs_client::MetaClientOptions {
            client_name: format!("brickd {node} scrub"),
            ..brickfs_client::MetaClientOptions::default()
        },
    );
    let piece: u64 = 1 << 20;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        for brick in service.bricks().cloned().collect::<Vec<_>>() {
            let id = brick.id();
            service.scrub_report(id, |r| r.rate_bytes_per_sec = rate);
            let mut after = None;
            loop {
                let b = brick.clone();
                let Ok(Ok((page, more))) =
                    tokio::task::spawn_blocking(move || b.list(after, 256)).await
                else {
                    break;
                };
                after = page.last().map(|(k, _)| *k);
                for (key, m) in page {
                    let mut off = 0;
                    while off < m.len_bytes {
                        let n = (m.len_bytes - off).min(piece);
                        let b = brick.clone();
                        let r = tokio::task::spawn_blocking(move || b.read(&key, off, n)).await;
                        match r {
                            Ok(Ok(_)) => {}
                            Ok(Err(brickfs_brick::StoreError::Checksum { .. })) => {
                                damaged(&meta, &service, &brick, key).await;
                                break;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(brick = %id, %key, error = %e, "scrub skipped an object");
                                break;
                            }
                            Err(_) => break,
                        }
                        off += n;
                        service.scrub_report(id, |r| r.bytes_scanned += n);
                        let pause = std::time::Duration::from_secs_f64(n as f64 / rate as f64);
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                    service.scrub_report(id, |r| r.objects_scanned += 1);
                }
                if !more {
                    break;
                }
            }
            service.scrub_report(id, |r| r.passes += 1);
        }
    }

    async fn damaged(
        meta: &brickfs_client::MetaClient,
        service: &BrickService,
        brick: &BrickStore,
        key: brickfs_proto::ObjectKey,
    ) {
        let id = brick.id();
        warn!(brick = %id, %key, "scrub found a damaged object");
        service.scrub_report(id, |r| {
            r.damaged_found += 1;
            r.recent_damaged.push(key);
            if r.recent_damaged.len() > 16 {
                r.recent_damaged.remove(0);
            }
        });
        // Quarantine only once the set no longer counts on this brick: the last in-sync copy
        // keeps its undamaged blocks readable. The brick serves no reads from before the
        // report (the set's writes skip it from the report on) until a heartbeat after it.
        service.hold_reads(id);
        // In a session: applied once (a retried report must not take the brick out again
        // after it healed).
        let reply = meta.write(MetaOp::ReportDamage { brick: id, key }).await;
        service.report_answered(id);
        let out_of_sync = match reply {
            Ok(MetaReply::Volume(v)) => v
                .sets
                .iter()
                .any(|s| s.members.contains(&id) && !s.in_sync.contains(&id)),
            Ok(_) => false,
            Err(e) => {
                warn!(brick = %id, %key, error = %e, "could not report a damaged object");
                false
            }
        };
        if out_of_sync {
            match brick.quarantine(&key) {
                Ok(to) => {
                    info!(brick = %id, %key, to = %to.display(), "damaged object quarantined; the set will heal it")
                }
                Err(e) => {
                    warn!(brick = %id, %key, error = %e, "could not quarantine a damaged object")
                }
            }
        } else {
            warn!(brick = %id, %key, "damaged object kept: its brick is the set's last in-sync member");
        }
    }
}

/// How often the metadata leader's node looks for set members to heal.
const HEAL_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Heals set members that are out of sync but whose nodes are alive again, one at a time,
/// while this node's metadata member leads (see `brickfs_client::heal`).
async fn heal_members(
    node: NodeId,
    member: Arc<MetaNode>,
    advertise: std::net::SocketAddr,
    down_after: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    use brickfs_proto::meta::{MetaRead, MetaReply, VolumeStatus};
    let (meta, bricks) = duty_clients(node, advertise, "heal", HEAL_EVERY);
    let mut tick = tokio::time::interval(HEAL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_round_as_leader(&mut tick, &mut stop, &member, node).await {
        let (Ok(volumes), Ok(MetaReply::Nodes(nodes))) = (
            meta.list_volumes().await,
            meta.read(MetaRead::ListNodes).await,
        ) else {
            continue;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let alive = |n: NodeId| {
            nodes
                .iter()
                .any(|x| x.id == n && x.last_heartbeat_ms + down_after.as_millis() as u64 >= now_ms)
        };
        for v in volumes.iter().filter(|v| v.status == VolumeStatus::Started) {
            for (set, target) in brickfs_client::heal::out_of_sync(v) {
                let on_alive_node = v
                    .bricks
                    .iter()
                    .find(|b| b.brick == target)
                    .is_some_and(|b| alive(b.node));
                if !on_alive_node {
                    continue;
                }
                info!(volume = %v.name, set, brick = %target, "healing a member out of sync");
                let r = brickfs_client::heal::heal_member(&meta, &bricks, v, set, target, false, |s| {
                    tracing::debug!(volume = %v.name, set, brick = %target, scanned = s.scanned, copied = s.copied, bytes = s.bytes, "heal progress");
                })
                .instrument(tracing::info_span!("heal", volume = %v.name, brick = %target, set))
                .await;
                match r {
                    Ok(s) => {
                        info!(
                            volume = %v.name, set, brick = %target, scanned = s.scanned,
                            copied = s.copied, bytes = s.bytes, "healed; the member is in sync again"
                        );
                        // The sets changed: read them again before the next heal.
                        break;
                    }
                    // Another member may heal where this one cannot (say, one whose node
                    // still holds current copies): try it before the next round.
                    Err(e) => {
                        warn!(volume = %v.name, set, brick = %target, error = %e, "heal failed; retried next round")
                    }
                }
            }
        }
    }
}

/// Reads the volumes' `allow-networks` from the metadata group every
/// `access::REFRESH_EVERY` (see `access`).
async fn refresh_access(
    node: NodeId,
    access: Arc<access::Access>,
    peers: Vec<std::net::SocketAddr>,
    mut stop: watch::Receiver<bool>,
) {
    let meta = brickfs_client::MetaClient::new(
        peers,
        brickfs_client::MetaClientOptions {
            client_name: format!("brickd {node} access"),
            deadline: access::REFRESH_EVERY * 5,
            ..brickfs_client::MetaClientOptions::default()
        },
    );
    let mut tick = tokio::time::interval(access::REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
            // A refusal asks for fresh rules before it stands.
            _ = access.stale() => {}
        }
        if let Err(e) = access.refresh(&meta).await {
            tracing::debug!(error = %e, "could not read the volumes' allow-networks");
        }
        // Until the first read, requests that need the rules are refused: try again soon.
        while !access.known() {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            }
            if let Err(e) = access.refresh(&meta).await {
                tracing::debug!(error = %e, "could not read the volumes' allow-networks yet");
            }
        }
    }
}

/// How often the metadata leader's node looks for rebalances to run.
const REBALANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long one rebalance round runs before the volumes are read again.
const REBALANCE_ROUND: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the volumes' rebalances (`brickfs volume rebalance`, `remove-brick start`) while this
/// node's metadata member leads; progress goes to the metadata group after every page of
/// files (see `brickfs_client::rebalance`).
async fn rebalance_volumes(
    node: NodeId,
    member: Arc<MetaNode>,
    advertise: std::net::SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    use brickfs_proto::meta::{RebalanceState, VolumeStatus};
    let (meta, bricks) = duty_clients(node, advertise, "rebalance", REBALANCE_EVERY);
    let mut tick = tokio::time::interval(REBALANCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_round_as_leader(&mut tick, &mut stop, &member, node).await {
        let Ok(volumes) = meta.list_volumes().await else {
            continue;
        };
        for v in volumes.iter().filter(|v| v.status == VolumeStatus::Started) {
            let running = v
                .rebalance
                .as_ref()
                .is_some_and(|r| r.state == RebalanceState::Running);
            let span = tracing::info_span!("rebalance", volume = %v.name);
            if !running {
                // No mover runs for it: only what dead movers left behind.
                let clean =
                    brickfs_client::rebalance::clean_up_moves(&meta, &bricks, &v.name, v.id);
                match clean.instrument(span).await {
                    Ok(0) => {}
                    Ok(n) => {
                        info!(volume = %v.name, moves = n, "cleaned up moves left by an earlier mover")
                    }
                    Err(e) => {
                        tracing::debug!(volume = %v.name, error = %e, "could not clean up moves; retried next round")
                    }
                }
                continue;
            }
            let round = brickfs_client::rebalance::rebalance_round(
                &meta,
                &bricks,
                &v.name,
                REBALANCE_ROUND,
            )
            .instrument(span);
            tokio::select! {
                _ = stop.changed() => return,
                r = round => if let Err(e) = r {
                    warn!(volume = %v.name, error = %e, "rebalance round failed; retried next round");
                },
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    if let Some(key) = config.cluster_key.clone() {
        brickfs_proto::rpc::set_cluster_key(key);
        info!("cluster key loaded: peers must prove it");
    }
    let node = load_or_create_node_id(&config.data_dir)?;
    // Every line this node logs from its tasks carries `node` (style: fixed span fields).
    let node_span = tracing::info_span!("brickd", node = %node);
    let mut stores = Vec::new();
    for brick in &config.bricks {
        let path = brick.path.clone();
        let opts = StoreOptions {
            init: config.init,
            expect_id: brick.expect_id,
        };
        let store = tokio::task::spawn_blocking(move || BrickStore::open(&path, opts))
            .await
            .context("open brick task")?
            .with_context(|| format!("open brick {}", brick.path.display()))?;
        info!(brick = %store.id(), path = %brick.path.display(), "brick online");
        stores.push(Arc::new(store));
    }
    let service = Arc::new(BrickService::new(node, stores));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let advertise = config.advertise.unwrap_or(addr);
    // The node's TLS certificate names the addresses it is reached at (interfaces are in
    // anyway; an advertised address may be a NAT's).
    brickfs_proto::tls::set_server_names(
        [
            Some(advertise),
            Some(addr),
            config.api_listen,
            config.metrics_listen,
        ]
        .into_iter()
        .flatten()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .collect(),
    );
    let meta = if config.meta {
        let opts = MetaOptions {
            snapshot_after_logs: config.meta_snapshot_logs,
            down_after: config.meta_down_after,
            ..MetaOptions::default()
        };
        let member = MetaNode::start(node, advertise.to_string(), &config.data_dir, opts)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .context("start the metadata member")?;
        Some(member)
    } else {
        None
    };
    let metrics = Arc::new(brickfs_proto::metrics::OpMetrics::default());
    let access = Arc::new(access::Access::new(
        !config.meta_peers.is_empty() || config.meta,
    ));
    let mut peers = config.meta_peers.clone();
    if peers.is_empty() && config.meta {
        peers.push(advertise);
    }
    let handler = Arc::new(NodeHandler {
        node,
        bricks: service.clone(),
        meta: meta.clone(),
        metrics: metrics.clone(),
        access: access.clone(),
        group: (!peers.is_empty()).then(|| {
            brickfs_client::MetaClient::new(
                peers.clone(),
                brickfs_client::MetaClientOptions {
                    client_name: format!("brickd {node} admin"),
                    ..brickfs_client::MetaClientOptions::default()
                },
            )
        }),
    });
    if let Some(at) = config.metrics_listen {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("listen for metrics on {at}"))?;
        let maddr = l.local_addr()?;
        let render = render_metrics(metrics, service.clone(), meta.clone());
        tokio::spawn(brickfs_proto::metrics::serve(l, render).instrument(node_span.clone()));
        // Tests wait for this line: keep its wording.
        info!(addr = %maddr, "metrics listening");
    }
    // Tests and scripts wait for this line: keep its wording.
    info!(%addr, %node, bricks = config.bricks.len(), meta = config.meta, "brickd listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(at) = config.api_listen {
        anyhow::ensure!(
            !peers.is_empty(),
            "api_listen needs a metadata member on this node (--meta) or --meta-peers"
        );
        let l = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("listen for the provisioning API on {at}"))?;
        let aaddr = l.local_addr()?;
        let client = brickfs_client::MetaClient::new(
            peers.clone(),
            brickfs_client::MetaClientOptions {
                client_name: format!("brickd {node} api"),
                ..brickfs_client::MetaClientOptions::default()
            },
        );
        tokio::spawn(api::serve(l, client, peers[0]).instrument(node_span.clone()));
        // Tests wait for this line: keep its wording.
        info!(addr = %aaddr, "provisioning API listening");
    }
    if !peers.is_empty() {
        tokio::spawn(
            refresh_access(node, access, peers.clone(), stop_rx.clone())
                .instrument(node_span.clone()),
        );
    }
    if peers.is_empty() {
        // No metadata group: the bricks are in no set, and there is nobody to tell.
        service.reported(&service.unreported());
    } else {
        service.enable_lease(config.write_lease);
        tokio::spawn(
            heartbeat(node, peers.clone(), service.clone(), stop_rx.clone())
                .instrument(node_span.clone()),
        );
    }
    if !peers.is_empty() {
        tokio::spawn(
            scrub(
                node,
                service.clone(),
                peers.clone(),
                config.scrub_rate,
                config.scrub_interval,
                stop_rx.clone(),
            )
            .instrument(node_span.clone()),
        );
    }
    if let Some(member) = &meta {
        tokio::spawn(
            heal_members(
                node,
                member.clone(),
                advertise,
                config.meta_down_after,
                stop_rx.clone(),
            )
            .instrument(node_span.clone()),
        );
        tokio::spawn(
            collect_garbage(node, member.clone(), advertise, stop_rx.clone())
                .instrument(node_span.clone()),
        );
        tokio::spawn(
            rebalance_volumes(node, member.clone(), advertise, stop_rx.clone())
                .instrument(node_span.clone()),
        );
    }
    let server = tokio::spawn(
        brickfs_proto::rpc::serve(listener, handler, config.limits, stop_rx)
            .instrument(node_span.clone()),
    );
    let why = shutdown_signal().await;
    info!(signal = why, "shutting down");
    service.begin_shutdown();
    let _ = stop_tx.send(true);
    server.await.context("join the server task")?;
    if let Some(meta) = meta {
        meta.shutdown().await;
    }
    // A clean stop: everything reaches the disk, and the next start trusts the bricks.
    for brick in service.bricks() {
        if let Err(e) = brick.close_clean() {
            warn!(brick = %brick.id(), error = %e, "failed to close brick cleanly at shutdown; the next start heals it");
        }
    }
    info!("brickd stopped");
    Ok(())
}
