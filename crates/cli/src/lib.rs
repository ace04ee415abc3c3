//! brickfs-cli: the `brickfs` admin and benchmark CLI, noun then verb, `--json` for scripts,
//! progress on stderr, exit code 2 for usage errors.
//!
//! Today it has `brickfs node bricks ADDR` (what a node serves, with capacity) and
//! `brickfs cluster init|join|leave|status` (the metadata group). Peers, volumes, heal,
//! rebalance and bench come with issues 4, 6, 7 and 8. It reads and writes only through
//! `brickfs-client`.

#![allow(clippy::print_stdout)] // A CLI's output is its product.

use anyhow::Context;
use brickfs_client::{BrickClient, MetaClient, MetaClientOptions};
use brickfs_proto::meta::AdminOp;
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
}

#[derive(Debug, Subcommand)]
pub enum NodeVerb {
    /// List the bricks a node serves, with capacity and object counts.
    Bricks {
        /// The node's address, HOST:PORT.
        addr: SocketAddr,
    },
}

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
    let runtime = match tokio::runtime::Builder::new_current_thread()
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
            std::process::ExitCode::FAILURE
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

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Cluster { verb } => cluster(verb, cli.json).await,
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
