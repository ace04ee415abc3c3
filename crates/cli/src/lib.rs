//! brickfs-cli: the `brickfs` admin and benchmark CLI, noun then verb, `--json` for scripts,
//! progress on stderr, exit code 2 for usage errors.
//!
//! Today it has `brickfs node bricks ADDR` (what a node serves, with capacity). Peers, volumes,
//! heal, rebalance and bench come with issues 3, 4, 6, 7 and 8. It reads and writes only
//! through `brickfs-client`.

#![allow(clippy::print_stdout)] // A CLI's output is its product.

use anyhow::Context;
use brickfs_client::BrickClient;
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

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
