//! brickfs-cli: the `brickfs` admin and benchmark CLI, noun then verb, `--json` for scripts,
//! progress on stderr, exit code 2 for usage errors.
//!
//! `brickfs node bricks ADDR` (what a node serves, with capacity), `brickfs cluster
//! init|join|leave|status` (the metadata group), `peer`, `volume` (create, start, heal,
//! replace-brick, bitrot, ...) and `bench` (see `bench.rs`). It reads and writes only through
//! `brickfs-client`.

#![allow(clippy::print_stdout)] // A CLI's output is its product.

pub mod bench;
pub mod elastic;
pub mod quota;

use anyhow::Context;
use brickfs_client::{BrickClient, MetaClient, MetaClientOptions, admin};
use brickfs_proto::meta::{AdminOp, MetaOp, MetaRead, MetaReply, VolumeRecord};
use brickfs_proto::rpc::ClientOptions;
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::net::SocketAddr;

#[derive(Debug, Parser)]
#[command(name = "brickfs", version, about = "brickfs admin and benchmark CLI")]
pub struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Members of the metadata group (any one is enough), HOST:PORT[,HOST:PORT...].
    #[arg(long, global = true, env = "BRICKFS_META", value_delimiter = ',')]
    pub meta: Vec<SocketAddr>,
    /// The credential file, when the cluster has a key: the cluster key itself (a node's
    /// powers) or the admin credential (`brickfs cluster credential admin` prints it).
    #[arg(
        long,
        global = true,
        env = "BRICKFS_CREDENTIAL_FILE",
        visible_alias = "cluster-key-file"
    )]
    pub credential_file: Option<std::path::PathBuf>,
    /// The cluster CA certificate (`brickfs cluster ca` prints it) to check nodes against, for
    /// a CLI that holds no cluster key (with the key, the CA is known).
    #[arg(long, global = true, env = "BRICKFS_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask one node directly.
    Node {
        #[command(subcommand)]
        verb: NodeVerb,
    },
    /// The metadata group: bootstrap it, add and remove members, show its state.
    Cluster {
        #[command(subcommand)]
        verb: ClusterVerb,
    },
    /// Storage nodes in the cluster map.
    Peer {
        #[command(subcommand)]
        verb: PeerVerb,
    },
    /// Volumes: create from a spec, start, stop, delete, inspect, set options.
    Volume {
        #[command(subcommand)]
        verb: VolumeVerb,
    },
    /// Benchmark large-file and small-file I/O through a mount or the client library, against
    /// the raw local disk measured in the same run.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum PeerVerb {
    /// Add the node at ADDR and every brick it serves to the cluster map.
    Add { addr: SocketAddr },
    /// List nodes and their bricks.
    List,
    /// Remove the node at ADDR (no volume may use its bricks).
    Remove { addr: SocketAddr },
}

#[derive(Debug, Subcommand)]
pub enum VolumeVerb {
    /// Create a volume: `NAME [stripe S] [replica R | disperse N redundancy M] HOST:PORT:/PATH...`
    Create {
        name: String,
        #[arg(required = true, num_args = 1.., allow_hyphen_values = false)]
        spec: Vec<String>,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Show a volume's layout, sets and options.
    Info {
        name: String,
    },
    /// Show a volume's bricks and whether their nodes answer.
    Status {
        name: String,
    },
    List,
    /// Set an option (stripe-unit, quorum, heal-bandwidth, cache-ttl-ms, allow-networks).
    Set {
        name: String,
        key: String,
        value: String,
    },
    /// Show one option, or all.
    Get {
        name: String,
        key: Option<String>,
    },
    /// Self-heal: `info` (members out of sync), `full` (heal them now, with progress),
    /// `statistics` (how many objects each one lacks).
    Heal {
        name: String,
        #[command(subcommand)]
        what: HealVerb,
    },
    /// Replace brick OLD with NEW (both HOST:PORT:/PATH; NEW registered and unused): the new
    /// brick is healed from the rest of its set. `commit force` as in GlusterFS.
    ReplaceBrick {
        name: String,
        old: String,
        new: String,
        /// The words `commit force`.
        #[arg(num_args = 2)]
        confirm: Vec<String>,
    },
    /// Add whole stripe groups of bricks (HOST:PORT:/PATH, registered and unused); new files
    /// spread over them at once, `rebalance start` moves existing ones.
    AddBrick {
        name: String,
        #[arg(required = true, num_args = 1..)]
        bricks: Vec<String>,
    },
    /// `BRICK... start` drains whole stripe groups (files move off them online), `status`
    /// shows progress, `stop` gives up, `commit` takes the drained bricks out.
    RemoveBrick {
        name: String,
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
    /// `start` moves files to where the placement puts them now (after add-brick), `status`
    /// shows progress, `stop` stops.
    Rebalance {
        name: String,
        action: String,
    },
    /// Directory quotas: `limit-usage PATH SIZE` (EDQUOT past it), `remove PATH`, `list`.
    Quota {
        name: String,
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
    /// The bitrot scrubber: `status` (passes, bytes read, damaged objects found per brick).
    Bitrot {
        name: String,
        #[command(subcommand)]
        what: BitrotVerb,
    },
    /// Client credentials of a keyed cluster: `new` (printed once, never again), `rotate`
    /// (a new one; the others are revoked), `revoke ID`, `list`.
    Credential {
        name: String,
        #[command(subcommand)]
        what: CredentialVerb,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialVerb {
    /// Make a client credential and print it (once: nothing keeps it).
    New {
        /// Free text shown by `list` (who holds it).
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Make a new credential and revoke every other one of the volume.
    Rotate {
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Revoke credential ID (hex, as `list` shows it): requests made with it are refused.
    Revoke { id: String },
    /// The credentials the volume lists (ids, labels, when made; never secrets).
    List,
}

#[derive(Debug, Subcommand)]
pub enum BitrotVerb {
    /// What each brick's scrubber has read and found.
    Status,
}

#[derive(Serialize)]
struct BitrotRow {
    brick: String,
    id: String,
    online: bool,
    #[serde(flatten)]
    report: Option<brickfs_proto::msg::ScrubReport>,
    /// Why the brick's node refused to tell (a credential without the right), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum HealVerb {
    Info,
    Full,
    Statistics,
}

#[derive(Serialize)]
struct HealInfoRow {
    set: usize,
    epoch: u64,
    primary: String,
    brick: String,
    id: String,
    in_sync: bool,
    /// Objects the member lacks or holds at another version (statistics only).
    #[serde(skip_serializing_if = "Option::is_none")]
    backlog_objects: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum ClusterVerb {
    /// Bootstrap a new metadata group with the node at ADDR (started with --meta) as its only
    /// voter.
    Init { addr: SocketAddr },
    /// Add the node at ADDR (started with --meta) to the group that MEMBER belongs to.
    Join {
        addr: SocketAddr,
        /// Any member of the group.
        #[arg(long = "to")]
        member: SocketAddr,
        /// Add it as a non-voting learner only.
        #[arg(long)]
        learner: bool,
    },
    /// Remove the node at ADDR from the group that MEMBER belongs to.
    Leave {
        addr: SocketAddr,
        #[arg(long = "from")]
        member: SocketAddr,
    },
    /// Show what the member at ADDR knows of the group.
    Status { addr: SocketAddr },
    /// Print the bearer token of the `api` or `metrics` HTTPS endpoint, derived from the
    /// cluster key or the admin credential (--credential-file).
    Token { endpoint: String },
    /// Print the admin credential (`admin`), derived from the cluster key: the CLI's
    /// administrative commands and the provisioning API take it in place of the key, and it
    /// cannot act as a node.
    Credential { role: String },
    /// Print the cluster CA certificate (PEM), derived from the cluster key: clients, `curl
    /// --cacert` and Prometheus' `tls_config.ca_file` check nodes' certificates with it.
    Ca {
        /// Write it to this file instead.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeVerb {
    /// List the bricks a node serves, with capacity and object counts.
    Bricks {
        /// The node's address, HOST:PORT.
        addr: SocketAddr,
    },
}

/// A mistake in how the command was called: exit code 2, like clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Serialize)]
struct BrickRow {
    id: String,
    path: String,
    total_bytes: u64,
    avail_bytes: u64,
    objects: u64,
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let file = cli.credential_file.clone().or_else(|| {
        // The flag's older name's variable.
        std::env::var_os("BRICKFS_CLUSTER_KEY_FILE").map(Into::into)
    });
    if let Err(e) = brickfs_proto::rpc::use_credential_file(file.as_deref())
        .and_then(|()| brickfs_proto::tls::use_ca_file(cli.ca_file.as_deref()))
    {
        eprintln!("brickfs: {e}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("brickfs: failed to start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brickfs: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn meta_client(members: Vec<SocketAddr>) -> MetaClient {
    MetaClient::new(
        members,
        MetaClientOptions {
            client_name: "brickfs-cli".into(),
            deadline: std::time::Duration::from_secs(60),
            ..MetaClientOptions::default()
        },
    )
}

async fn node_id(addr: SocketAddr) -> anyhow::Result<brickfs_proto::NodeId> {
    let client = BrickClient::new(ClientOptions {
        peer_name: "brickfs-cli".into(),
        ..ClientOptions::default()
    });
    client
        .ping(addr)
        .await
        .with_context(|| format!("reach node {addr}"))
}

async fn cluster(verb: ClusterVerb, json: bool) -> anyhow::Result<()> {
    match verb {
        ClusterVerb::Init { addr } => {
            meta_client(vec![addr])
                .admin(AdminOp::Init)
                .await
                .with_context(|| format!("initialize the metadata group on {addr}"))?;
            eprintln!("initialized a metadata group with {addr} as its only voter");
            if brickfs_proto::rpc::cluster_key().is_some() {
                eprintln!(
                    "the cluster's CA certificate, for clients and HTTPS: brickfs cluster ca --out ca.pem; the admin credential: brickfs cluster credential admin"
                );
            }
        }
        ClusterVerb::Join {
            addr,
            member,
            learner,
        } => {
            let id = node_id(addr).await?;
            meta_client(vec![member])
                .admin(AdminOp::AddMember {
                    id,
                    addr: addr.to_string(),
                    voter: !learner,
                })
                .await
                .with_context(|| format!("add {addr} to the group of {member}"))?;
            eprintln!(
                "{addr} ({id}) joined as a {}",
                if learner { "learner" } else { "voter" }
            );
        }
        ClusterVerb::Leave { addr, member } => {
            let id = node_id(addr).await?;
            meta_client(vec![member])
                .admin(AdminOp::RemoveMember { id })
                .await
                .with_context(|| format!("remove {addr} from the group of {member}"))?;
            eprintln!("{addr} ({id}) left the group");
        }
        ClusterVerb::Token { endpoint } => {
            if endpoint != "api" && endpoint != "metrics" {
                return Err(UsageError(format!(
                    "token is for the api or metrics endpoint, not {endpoint:?}"
                ))
                .into());
            }
            use brickfs_proto::cred::Credential;
            let token = match brickfs_proto::rpc::credential().as_deref() {
                Some(Credential::Node(key)) => brickfs_proto::http::token(key, &endpoint),
                Some(Credential::Admin(secret)) => {
                    brickfs_proto::http::admin_token(secret, &endpoint)
                }
                _ => {
                    return Err(UsageError(
                        "a token comes from the cluster key or the admin credential: give --credential-file (or BRICKFS_CREDENTIAL_FILE)".into(),
                    )
                    .into());
                }
            };
            println!("{token}");
        }
        ClusterVerb::Ca { out } => {
            let Some(key) = brickfs_proto::rpc::cluster_key() else {
                return Err(UsageError(
                    "the cluster CA comes from the cluster key: give the key file (--credential-file); it is public, so copy the printed file to whoever needs it".into(),
                )
                .into());
            };
            let pem = brickfs_proto::tls::ca_pem(&key).map_err(|e| anyhow::anyhow!(e))?;
            match out {
                Some(path) => {
                    std::fs::write(&path, &pem)
                        .with_context(|| format!("write {}", path.display()))?;
                    eprintln!("wrote the cluster CA certificate to {}", path.display());
                }
                None => print!("{pem}"),
            }
        }
        ClusterVerb::Credential { role } => {
            if role != "admin" {
                return Err(UsageError(format!(
                    "credential prints the admin credential (`admin`), not {role:?}; client credentials are per volume: brickfs volume credential VOLUME new"
                ))
                .into());
            }
            let Some(key) = brickfs_proto::rpc::cluster_key() else {
                return Err(UsageError(
                    "the admin credential comes from the cluster key: give the key file (--credential-file)".into(),
                )
                .into());
            };
            let admin =
                brickfs_proto::cred::Credential::Admin(brickfs_proto::cred::admin_secret(&key));
            println!("{}", admin.to_text().unwrap_or_default());
        }
        ClusterVerb::Status { addr } => {
            let st = meta_client(vec![addr])
                .status_of(addr)
                .await
                .with_context(|| format!("ask {addr} for the group status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "node {}  term {}  leader {}",
                    st.node,
                    st.term,
                    st.leader.map_or("none".into(), |l| l.to_string())
                );
                println!(
                    "log {:?}  applied {:?}",
                    st.last_log_index, st.last_applied_index
                );
                for m in st.members {
                    println!(
                        "  {}  {}  {}",
                        m.id,
                        m.addr,
                        if m.voter { "voter" } else { "learner" }
                    );
                }
            }
        }
    }
    Ok(())
}

fn group(meta: &[SocketAddr]) -> anyhow::Result<MetaClient> {
    if meta.is_empty() {
        return Err(UsageError(
            "say where the metadata group is: --meta HOST:PORT (or BRICKFS_META)".into(),
        )
        .into());
    }
    Ok(meta_client(meta.to_vec()))
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_volume(v: &VolumeRecord) {
    println!("Volume Name: {}", v.name);
    println!("Volume ID: {}", v.id);
    println!("Type: {}", v.type_name);
    println!("Status: {:?}", v.status);
    let live = (0..v.groups()).filter(|g| !v.retired(*g)).count();
    println!(
        "Number of Bricks: {} x {} = {}",
        live,
        v.group_width() * v.set_width(),
        v.bricks.len()
    );
    if !v.draining.is_empty() {
        println!("Draining groups (remove-brick): {:?}", v.draining);
    }
    if v.disperse_data > 0 {
        println!(
            "Disperse: {} data + {} redundancy",
            v.disperse_data, v.disperse_redundancy
        );
    }
    println!("Bricks:");
    for (i, b) in v.bricks.iter().enumerate() {
        println!("Brick{}: {} ({})", i + 1, b.addr, b.brick);
    }
    println!("Sets:");
    for (i, s) in v.sets.iter().enumerate() {
        if s.members.is_empty() {
            println!("  set {i}: removed");
            continue;
        }
        let ids = |l: &[brickfs_proto::BrickId]| {
            l.iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "  set {i}: epoch {} primary {} in-sync [{}]",
            s.epoch.0,
            s.primary,
            ids(&s.in_sync)
        );
    }
    if !v.options.is_empty() {
        println!("Options Reconfigured:");
        for (k, val) in &v.options {
            println!("{k}: {val}");
        }
    }
}

fn expect_volume(reply: MetaReply) -> anyhow::Result<VolumeRecord> {
    match reply {
        MetaReply::Volume(v) => Ok(v),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

async fn peer(verb: PeerVerb, meta: &[SocketAddr], json: bool) -> anyhow::Result<()> {
    let m = group(meta)?;
    let bricks = BrickClient::new(ClientOptions {
        peer_name: "brickfs-cli".into(),
        ..ClientOptions::default()
    });
    match verb {
        PeerVerb::Add { addr } => {
            let (node, recs) = admin::peer_add(&m, &bricks, addr)
                .await
                .with_context(|| format!("add peer {addr}"))?;
            if json {
                return print_json(&(node, recs));
            }
            println!(
                "peer add: success: {} ({}) with {} bricks",
                node.addr,
                node.id,
                recs.len()
            );
            for b in recs {
                println!("  {}:{}  {}", node.addr, b.path, b.id);
            }
        }
        PeerVerb::List => {
            let nodes = match m.read(MetaRead::ListNodes).await? {
                MetaReply::Nodes(n) => n,
                other => anyhow::bail!("unexpected answer {other:?}"),
            };
            let all = match m.read(MetaRead::ListBricks).await? {
                MetaReply::Bricks(b) => b,
                other => anyhow::bail!("unexpected answer {other:?}"),
            };
            if json {
                return print_json(&(nodes, all));
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            for n in nodes {
                // Approximate: the leader's clock stamped the heartbeat, ours reads it.
                let state = match n.last_heartbeat_ms {
                    0 => "never seen",
                    t if now_ms.saturating_sub(t) < 10_000 => "up",
                    _ => "down",
                };
                println!("{}  {}  {state}", n.id, n.addr);
                for b in all.iter().filter(|b| b.node == n.id) {
                    println!(
                        "  {}  {}  {:.1} GiB",
                        b.id,
                        b.path,
                        b.capacity_bytes as f64 / f64::from(1u32 << 30)
                    );
                }
            }
        }
        PeerVerb::Remove { addr } => {
            let id = node_id(addr).await?;
            m.write(MetaOp::RemoveNode { node: id })
                .await
                .with_context(|| format!("remove peer {addr}"))?;
            eprintln!("peer remove: success: {addr} ({id})");
        }
    }
    Ok(())
}

/// Asks the first member that answers for a client credential of `volume`.
async fn issue_credential(
    meta: &[SocketAddr],
    volume: &str,
    label: &str,
    replace: bool,
) -> anyhow::Result<brickfs_proto::msg::CredentialIssued> {
    let client = BrickClient::new(ClientOptions {
        peer_name: "brickfs-cli".into(),
        conns_per_peer: 1,
        ..ClientOptions::default()
    });
    let req = brickfs_proto::msg::IssueCredential {
        volume: volume.to_string(),
        label: label.to_string(),
        replace,
    };
    let mut last = None;
    for addr in meta {
        match client.issue_credential(*addr, req.clone()).await {
            Ok(c) => return Ok(c),
            // Refused for a reason (not an admin, no key, no such volume): asking another
            // member changes nothing.
            Err(brickfs_proto::rpc::RpcError::Remote(body))
                if !body.is(brickfs_proto::ErrorCode::Busy) =>
            {
                anyhow::bail!("{}", body.detail);
            }
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("ask {addr}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no metadata member to ask (--meta)")))
}

fn print_issued(name: &str, c: &brickfs_proto::msg::CredentialIssued) {
    println!(
        "client credential {:x} of volume {name} (shown this once: save it to a file; mounts take it with --credential-file):",
        c.id
    );
    println!("{}", c.credential);
    if !c.revoked.is_empty() {
        let ids: Vec<String> = c.revoked.iter().map(|i| format!("{i:x}")).collect();
        println!("revoked: {}", ids.join(" "));
    }
}

async fn volume(verb: VolumeVerb, meta: &[SocketAddr], json: bool) -> anyhow::Result<()> {
    let m = group(meta)?;
    let show = |v: VolumeRecord| -> anyhow::Result<()> {
        if json {
            print_json(&v)
        } else {
            print_volume(&v);
            Ok(())
        }
    };
    match verb {
        VolumeVerb::Create { name, spec } => {
            // Check the grammar here too, for an error before any network round trip.
            let words: Vec<&str> = spec.iter().map(String::as_str).collect();
            brickfs_layout::VolumeSpec::parse(&words)
                .map_err(|e| UsageError(format!("invalid volume spec: {e}")))?;
            let v = admin::volume_create(&m, &name, &spec)
                .await
                .with_context(|| format!("create volume {name}"))?;
            // A keyed cluster's volume gets its first client credential now.
            let issued = if brickfs_proto::rpc::credential().is_some() {
                Some(
                    issue_credential(meta, &name, "made with the volume", false)
                        .await
                        .with_context(|| {
                            format!("volume {name} was created, but making its client credential failed (retry: brickfs volume credential {name} new)")
                        })?,
                )
            } else {
                None
            };
            if json {
                let mut out = serde_json::to_value(&v)?;
                if let (Some(obj), Some(c)) = (out.as_object_mut(), &issued) {
                    obj.insert("credential".into(), c.credential.clone().into());
                }
                return print_json(&out);
            }
            println!("volume create: {name}: success: please start the volume to access data");
            if let Some(c) = issued {
                print_issued(&name, &c);
            }
        }
        VolumeVerb::Credential { name, what } => match what {
            CredentialVerb::New { ref label } | CredentialVerb::Rotate { ref label } => {
                let replace = matches!(what, CredentialVerb::Rotate { .. });
                let c = issue_credential(meta, &name, label, replace).await?;
                if json {
                    return print_json(&serde_json::json!({
                        "volume": name,
                        "id": format!("{:x}", c.id),
                        "credential": c.credential,
                        "revoked": c.revoked.iter().map(|i| format!("{i:x}")).collect::<Vec<_>>(),
                    }));
                }
                print_issued(&name, &c);
            }
            CredentialVerb::Revoke { id } => {
                let raw = u64::from_str_radix(id.trim_start_matches("0x"), 16).map_err(|_| {
                    UsageError(format!(
                        "credential id {id:?} is not hex (as `list` shows it)"
                    ))
                })?;
                m.write(MetaOp::RevokeCredential {
                    name: name.clone(),
                    id: raw,
                })
                .await
                .with_context(|| format!("revoke credential {id} of volume {name}"))?;
                println!(
                    "volume credential revoke: {name}: {id}: success (nodes refuse it within a few seconds)"
                );
            }
            CredentialVerb::List => {
                let v = admin::volume_info(&m, &name)
                    .await
                    .with_context(|| format!("get volume {name}"))?;
                if json {
                    return print_json(&v.credentials);
                }
                if v.credentials.is_empty() {
                    println!("volume {name} lists no client credentials");
                }
                for c in &v.credentials {
                    println!("{:016x}  made {} ms  {}", c.id, c.created_ms, c.label);
                }
            }
        },
        VolumeVerb::Start { name } => {
            m.write(MetaOp::StartVolume { name: name.clone() })
                .await
                .with_context(|| format!("start volume {name}"))?;
            println!("volume start: {name}: success");
        }
        VolumeVerb::Stop { name } => {
            m.write(MetaOp::StopVolume { name: name.clone() })
                .await
                .with_context(|| format!("stop volume {name}"))?;
            println!("volume stop: {name}: success");
        }
        VolumeVerb::Delete { name } => {
            m.write(MetaOp::DeleteVolume { name: name.clone() })
                .await
                .with_context(|| format!("delete volume {name}"))?;
            println!(
                "volume delete: {name}: success: its objects are removed from its bricks in the background (`brickfs volume list` shows it until its bricks are free)"
            );
        }
        VolumeVerb::Info { name } => show(
            admin::volume_info(&m, &name)
                .await
                .with_context(|| format!("get volume {name}"))?,
        )?,
        VolumeVerb::List => {
            let vols = m.list_volumes().await?;
            if json {
                return print_json(&vols);
            }
            let (deleting, live): (Vec<_>, Vec<_>) = vols
                .into_iter()
                .partition(|v| v.status == brickfs_proto::meta::VolumeStatus::Deleting);
            if live.is_empty() {
                println!("No volumes present in cluster");
            }
            for v in live {
                println!("{}", v.name);
            }
            for v in deleting {
                println!(
                    "{} (deleted: its objects are being removed from its {} bricks)",
                    v.name,
                    v.bricks.len()
                );
            }
        }
        VolumeVerb::Status { name } => {
            let v = admin::volume_info(&m, &name)
                .await
                .with_context(|| format!("get volume {name}"))?;
            let bricks = status_bricks();
            let addr =
                |b: &brickfs_proto::meta::VolumeBrick| brickfs_client::volume::brick_addr(b).ok();
            let mut rows = Vec::new();
            for (i, set) in v.sets.iter().enumerate() {
                // The primary's objects, only when some member needs healing.
                let primary_objects = match v.bricks.iter().find(|b| b.brick == set.primary) {
                    Some(p) if set.in_sync.len() < set.members.len() => match addr(p) {
                        Some(a) => brick_objects(&bricks, a, set.primary).await.ok(),
                        None => None,
                    },
                    _ => None,
                };
                for id in &set.members {
                    let Some(b) = v.bricks.iter().find(|b| b.brick == *id) else {
                        continue;
                    };
                    let online = match addr(b) {
                        Some(a) => bricks.statfs(a, b.brick).await.ok(),
                        None => None,
                    };
                    let state = if *id == set.primary {
                        "primary"
                    } else if set.in_sync.contains(id) {
                        "in sync"
                    } else if set.full_heal.contains(id) {
                        "needs full heal"
                    } else {
                        "needs heal"
                    };
                    let heal_backlog_objects = match (&primary_objects, set.in_sync.contains(id)) {
                        (Some(p), false) => backlog_of(&bricks, p, addr(b), *id).await,
                        _ => 0,
                    };
                    rows.push(BrickStatusRow {
                        brick: b.addr.clone(),
                        id: b.brick.to_string(),
                        set: i,
                        state,
                        online: online.is_some(),
                        total_bytes: online.as_ref().map_or(0, |s| s.total_bytes),
                        avail_bytes: online.as_ref().map_or(0, |s| s.avail_bytes),
                        heal_backlog_objects,
                    });
                }
            }
            if json {
                return print_json(&rows);
            }
            println!("Status of volume: {name} ({:?})", v.status);
            if let Some(r) = &v.rebalance {
                let p = &r.progress;
                println!(
                    "Rebalance: {:?}{} (pass {}, {} files moved, {} skipped this pass)",
                    r.state,
                    if r.drain_only { ", draining only" } else { "" },
                    p.pass,
                    p.moved,
                    p.skipped
                );
            }
            if !v.draining.is_empty() {
                println!(
                    "Draining groups (remove-brick): {:?}; see `brickfs volume remove-brick {name} status`",
                    v.draining
                );
            }
            let w = rows.iter().map(|r| r.brick.len()).max().unwrap_or(5).max(5);
            println!(
                "{:<w$}  {:>3}  {:<15} {:<6} {:>9} {:>9} {:>12}",
                "Brick", "Set", "State", "Online", "Size GiB", "Free GiB", "Heal backlog"
            );
            for r in rows {
                let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
                println!(
                    "{:<w$}  {:>3}  {:<15} {:<6} {:>9.1} {:>9.1} {:>12}",
                    r.brick,
                    r.set,
                    r.state,
                    if r.online { "Y" } else { "N" },
                    gib(r.total_bytes),
                    gib(r.avail_bytes),
                    r.heal_backlog_objects
                );
            }
        }
        VolumeVerb::Set { name, key, value } => {
            let v = expect_volume(
                m.write(MetaOp::SetVolumeOption {
                    name: name.clone(),
                    key: key.clone(),
                    value,
                })
                .await
                .with_context(|| format!("set {key} on volume {name}"))?,
            )?;
            let set = v
                .options
                .iter()
                .find(|(k, _)| *k == key)
                .map_or("", |(_, val)| val.as_str());
            println!("volume set: {name}: {key} = {set}: success");
        }
        VolumeVerb::Get { name, key } => {
            let v = admin::volume_info(&m, &name)
                .await
                .with_context(|| format!("get volume {name}"))?;
            let opts: Vec<&(String, String)> = v
                .options
                .iter()
                .filter(|(k, _)| key.as_ref().is_none_or(|w| w == k))
                .collect();
            if let Some(k) = &key
                && opts.is_empty()
            {
                anyhow::bail!("option {k} is not set on volume {name}");
            }
            if json {
                return print_json(&opts);
            }
            for (k, val) in opts {
                println!("{k} {val}");
            }
        }
        VolumeVerb::Heal { name, what } => heal(&m, &name, what, json).await?,
        VolumeVerb::ReplaceBrick {
            name,
            old,
            new,
            confirm,
        } => {
            if confirm != ["commit", "force"] {
                return Err(UsageError(format!(
                    "replace-brick needs `commit force` after the bricks, not {confirm:?}"
                ))
                .into());
            }
            let v = expect_volume(
                m.write(MetaOp::ReplaceBrick {
                    name: name.clone(),
                    old: old.clone(),
                    new: new.clone(),
                })
                .await
                .with_context(|| format!("replace {old} in volume {name}"))?,
            )?;
            // A live brick first stops serving reads, then leaves once the leases granted
            // before are over (the group's down-after time): wait for it, with progress.
            let draining = |v: &VolumeRecord| {
                v.sets.iter().filter_map(|s| s.draining.as_ref()).any(|d| {
                    let parse = |t: &str| brickfs_layout::BrickAddr::parse(t).ok();
                    d.new.addr == new || parse(&d.new.addr).is_some_and(|a| Some(a) == parse(&new))
                })
            };
            let mut v = v;
            let started = std::time::Instant::now();
            let limit = std::time::Duration::from_secs(600);
            let mut said = std::time::Duration::ZERO;
            while draining(&v) {
                let waited = started.elapsed();
                if waited > limit {
                    anyhow::bail!(
                        "volume replace-brick: {name}: {old} still drains its readers after {} s; the group's leader carries it out (brickfs volume info {name})",
                        waited.as_secs()
                    );
                }
                if !json && waited >= said {
                    eprintln!(
                        "volume replace-brick: {name}: {old} serves no more reads; it leaves the set once the leases granted before are over ({} s so far)",
                        waited.as_secs()
                    );
                    said = waited + std::time::Duration::from_secs(5);
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                v = expect_volume(
                    m.read(MetaRead::VolumeByName { name: name.clone() })
                        .await
                        .with_context(|| format!("read volume {name}"))?,
                )?;
            }
            if json {
                return print_json(&v);
            }
            println!(
                "volume replace-brick: {name}: {old} -> {new}: success; the new brick heals in the background (brickfs volume heal {name} info)"
            );
        }
        VolumeVerb::AddBrick { name, bricks } => {
            elastic::add_brick(&m, &name, bricks, json).await?
        }
        VolumeVerb::RemoveBrick { name, args } => {
            elastic::remove_brick(&m, &name, args, json).await?
        }
        VolumeVerb::Quota { name, args } => quota::quota(&m, &name, &args, json).await?,
        VolumeVerb::Rebalance { name, action } => {
            elastic::rebalance(&m, &name, &action, json).await?
        }
        VolumeVerb::Bitrot {
            name,
            what: BitrotVerb::Status,
        } => {
            let v = admin::volume_info(&m, &name)
                .await
                .with_context(|| format!("get volume {name}"))?;
            let bricks = status_bricks();
            let mut rows = Vec::new();
            for b in &v.bricks {
                // A refusal is not an outage: say which it is.
                let (report, refused) = match brickfs_client::volume::brick_addr(b) {
                    Ok(a) => match bricks.scrub_status(a, b.brick).await {
                        Ok(r) => (Some(r), None),
                        Err(brickfs_proto::rpc::RpcError::Remote(body))
                            if body.is(brickfs_proto::ErrorCode::PermissionDenied) =>
                        {
                            (None, Some(body.detail))
                        }
                        Err(_) => (None, None),
                    },
                    Err(_) => (None, None),
                };
                rows.push(BitrotRow {
                    brick: b.addr.clone(),
                    id: b.brick.to_string(),
                    online: report.is_some() || refused.is_some(),
                    report,
                    refused,
                });
            }
            if json {
                return print_json(&rows);
            }
            println!("Bitrot scrub of volume {name}");
            println!(
                "{:<48} {:>7} {:>10} {:>10} {:>8}  damaged",
                "Brick", "passes", "objects", "MiB read", "MiB/s"
            );
            for r in rows {
                match r.report {
                    Some(s) => println!(
                        "{:<48} {:>7} {:>10} {:>10.1} {:>8.1}  {}{}",
                        r.brick,
                        s.passes,
                        s.objects_scanned,
                        s.bytes_scanned as f64 / f64::from(1u32 << 20),
                        s.rate_bytes_per_sec as f64 / f64::from(1u32 << 20),
                        s.damaged_found,
                        if s.recent_damaged.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " (latest {})",
                                s.recent_damaged
                                    .iter()
                                    .map(|k| k.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    ),
                    None => match &r.refused {
                        Some(why) => println!("{:<48} refused: {why}", r.brick),
                        None => println!("{:<48} offline", r.brick),
                    },
                }
            }
        }
    }
    Ok(())
}

/// The objects of one brick: key → (version, length).
async fn brick_objects(
    bricks: &BrickClient,
    addr: SocketAddr,
    brick: brickfs_proto::BrickId,
) -> anyhow::Result<
    std::collections::HashMap<brickfs_proto::ObjectKey, brickfs_proto::msg::ObjectState>,
> {
    let mut out = std::collections::HashMap::new();
    let mut after = None;
    loop {
        let (page, more) = bricks.list(addr, brick, after, 4096).await?;
        after = page.last().map(|o| o.key);
        out.extend(page.into_iter().map(|o| (o.key, o.state)));
        if !more {
            return Ok(out);
        }
    }
}

/// How many of the primary's objects (`primary`) member `brick` at `addr` lacks or holds at
/// another version: everything when it cannot be reached.
async fn backlog_of(
    bricks: &BrickClient,
    primary: &std::collections::HashMap<brickfs_proto::ObjectKey, brickfs_proto::msg::ObjectState>,
    addr: Option<SocketAddr>,
    brick: brickfs_proto::BrickId,
) -> u64 {
    let Some(a) = addr else {
        return primary.len() as u64;
    };
    match brick_objects(bricks, a, brick).await {
        Ok(theirs) => primary
            .iter()
            .filter(|(k, st)| theirs.get(*k) != Some(*st))
            .count() as u64,
        // Unreachable: it lacks everything the primary holds.
        Err(_) => primary.len() as u64,
    }
}

async fn heal(m: &MetaClient, name: &str, what: HealVerb, json: bool) -> anyhow::Result<()> {
    let v = admin::volume_info(m, name)
        .await
        .with_context(|| format!("get volume {name}"))?;
    let bricks = BrickClient::new(ClientOptions {
        peer_name: "brickfs-cli".into(),
        connect_timeout: std::time::Duration::from_secs(2),
        ..ClientOptions::default()
    });
    let addr_of = |b: brickfs_proto::BrickId| {
        v.bricks
            .iter()
            .find(|x| x.brick == b)
            .map(|x| (x.addr.clone(), brickfs_client::volume::brick_addr(x)))
    };
    match what {
        HealVerb::Info | HealVerb::Statistics => {
            let mut rows = Vec::new();
            for (i, set) in v.sets.iter().enumerate() {
                let primary_objects =
                    match (&what, addr_of(set.primary)) {
                        (HealVerb::Statistics, Some((_, Ok(a)))) => {
                            Some(brick_objects(&bricks, a, set.primary).await.with_context(
                                || format!("list the objects of primary {}", set.primary),
                            )?)
                        }
                        _ => None,
                    };
                for b in &set.members {
                    let in_sync = set.in_sync.contains(b);
                    let (label, addr) = match addr_of(*b) {
                        Some((label, addr)) => (label, addr.ok()),
                        None => (String::new(), None),
                    };
                    let backlog_objects = match (&primary_objects, in_sync) {
                        (Some(_), true) => Some(0),
                        (Some(p), false) => Some(backlog_of(&bricks, p, addr, *b).await),
                        _ => None,
                    };
                    rows.push(HealInfoRow {
                        set: i,
                        epoch: set.epoch.0,
                        primary: set.primary.to_string(),
                        brick: label,
                        id: b.to_string(),
                        in_sync,
                        backlog_objects,
                    });
                }
            }
            if json {
                return print_json(&rows);
            }
            let pending = rows.iter().filter(|r| !r.in_sync).count();
            println!("Heal of volume {name}: {pending} member(s) out of sync");
            for r in rows {
                let state = if r.in_sync { "in sync" } else { "needs heal" };
                match r.backlog_objects {
                    Some(n) => println!(
                        "set {} (epoch {}): {} [{}] {state}, {n} object(s) to heal",
                        r.set, r.epoch, r.brick, r.id
                    ),
                    None => println!(
                        "set {} (epoch {}): {} [{}] {state}",
                        r.set, r.epoch, r.brick, r.id
                    ),
                }
            }
        }
        HealVerb::Full => {
            let mut total = brickfs_client::heal::HealStats::default();
            let pending = brickfs_client::heal::out_of_sync(&v);
            if pending.is_empty() {
                println!("volume heal: {name}: every member is in sync");
                return Ok(());
            }
            let mut failed = 0;
            for (set, target) in pending {
                // Read the sets again: an earlier heal changed them.
                let v = admin::volume_info(m, name).await?;
                let label = addr_of(target).map(|(l, _)| l).unwrap_or_default();
                // `heal full` crawls every object, as GlusterFS's does.
                let r = brickfs_client::heal::heal_member(m, &bricks, &v, set, target, true, |s| {
                    eprint!(
                        "\rheal set {set} {label}: {} objects compared, {} copied ({:.1} MiB)   ",
                        s.scanned,
                        s.copied,
                        s.bytes as f64 / f64::from(1u32 << 20)
                    );
                })
                .await;
                eprintln!();
                match r {
                    Ok(s) => {
                        total.scanned += s.scanned;
                        total.copied += s.copied;
                        total.bytes += s.bytes;
                        println!("set {set} {label}: healed, in sync again");
                    }
                    Err(e) => {
                        failed += 1;
                        println!("set {set} {label}: not healed: {e}");
                    }
                }
            }
            if json {
                return print_json(&serde_json::json!({
                    "scanned": total.scanned, "copied": total.copied, "bytes": total.bytes, "failed": failed,
                }));
            }
            println!(
                "volume heal: {name}: {} objects compared, {} copied ({} bytes), {failed} member(s) not healed",
                total.scanned, total.copied, total.bytes
            );
            if failed > 0 {
                anyhow::bail!("{failed} member(s) of volume {name} could not be healed");
            }
        }
    }
    Ok(())
}

/// A brick client for status questions: short timeouts, so a dead node shows as offline.
fn status_bricks() -> BrickClient {
    BrickClient::new(ClientOptions {
        peer_name: "brickfs-cli".into(),
        connect_timeout: std::time::Duration::from_secs(2),
        request_timeout: std::time::Duration::from_secs(5),
        ..ClientOptions::default()
    })
}

#[derive(Serialize)]
struct BrickStatusRow {
    brick: String,
    id: String,
    set: usize,
    /// "primary", "in sync", "needs heal" or "needs full heal" (replaced or damaged).
    state: &'static str,
    online: bool,
    total_bytes: u64,
    avail_bytes: u64,
    /// Objects a member out of sync lacks or holds at another version.
    heal_backlog_objects: u64,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Cluster { verb } => cluster(verb, cli.json).await,
        Command::Peer { verb } => peer(verb, &cli.meta, cli.json).await,
        Command::Volume { verb } => volume(verb, &cli.meta, cli.json).await,
        Command::Bench(args) => {
            let meta = (!cli.meta.is_empty()).then(|| meta_client(cli.meta.clone()));
            bench::run(args, meta, cli.json).await
        }
        Command::Node {
            verb: NodeVerb::Bricks { addr },
        } => {
            let client = BrickClient::new(ClientOptions {
                peer_name: "brickfs-cli".into(),
                ..ClientOptions::default()
            });
            let bricks = client
                .list_bricks(addr)
                .await
                .with_context(|| format!("list bricks of {addr}"))?;
            let mut rows = Vec::new();
            for b in bricks {
                let st = client
                    .statfs(addr, b.id)
                    .await
                    .with_context(|| format!("statfs brick {}", b.id))?;
                rows.push(BrickRow {
                    id: b.id.to_string(),
                    path: b.path,
                    total_bytes: st.total_bytes,
                    avail_bytes: st.avail_bytes,
                    objects: st.objects,
                });
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<18} {:>12} {:>12} {:>10}  PATH",
                    "BRICK", "SIZE_GIB", "AVAIL_GIB", "OBJECTS"
                );
                for r in rows {
                    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
                    println!(
                        "{:<18} {:>12.1} {:>12.1} {:>10}  {}",
                        r.id,
                        gib(r.total_bytes),
                        gib(r.avail_bytes),
                        r.objects,
                        r.path
                    );
                }
            }
            Ok(())
        }
    }
}
