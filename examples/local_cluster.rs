//! The embedded default, as far as it exists today: one brickd on loopback serving six bricks
//! under a data folder, a short benchmark of brick I/O against the local disk, then it stays
//! up until Ctrl-C (or SIGTERM), which stops brickd cleanly. A second start reuses the data.
//!
//! `scripts/quickstart` builds and runs it. The metadata group, volumes and the FUSE mount
//! join this command as issues 3 to 7 land.

#![allow(clippy::print_stdout)]

use anyhow::Context;
use brickfs_client::BrickClient;
use brickfs_proto::rpc::ClientOptions;
use brickfs_proto::{Ino, ObjectKey, VolumeId};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use clap::Parser;
use rand::RngCore;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Start a local brickfs node on loopback and benchmark it")]
struct Args {
    /// The brickd executable.
    #[arg(long)]
    brickd: PathBuf,
    /// Where the node keeps its data and bricks (reused by the next start).
    #[arg(long)]
    data: PathBuf,
    /// How many bricks to serve.
    #[arg(long, default_value_t = 6)]
    bricks: usize,
    /// MiB to write and read in the start-up benchmark (0 skips it).
    #[arg(long, default_value_t = 512)]
    bench_mib: u64,
}

const CHUNK: usize = 1 << 20;

fn mib_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / took.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let node_dir = args.data.join("node0");
    let bricks: Vec<PathBuf> = (0..args.bricks)
        .map(|i| node_dir.join(format!("brick{i}")))
        .collect();
    let mut node = Brickd::start(&args.brickd, &node_dir.join("data"), &bricks, &[])
        .context("start brickd")?;
    let addr = node.addr();
    let client = BrickClient::new(ClientOptions {
        peer_name: "local-cluster".into(),
        ..ClientOptions::default()
    });
    let served = client.list_bricks(addr).await.context("list bricks")?;
    println!(
        "brickfs node listening on {addr} with {} bricks:",
        served.len()
    );
    for b in &served {
        println!("  {}  {}", b.id, b.path);
    }

    if args.bench_mib > 0 {
        let mut chunk = vec![0u8; CHUNK];
        rand::rng().fill_bytes(&mut chunk);
        let chunk = Bytes::from(chunk);
        let total = args.bench_mib * CHUNK as u64;

        let path = args.data.join("baseline.tmp");
        let start = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..args.bench_mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        let disk = mib_s(total, start.elapsed());
        std::fs::remove_file(&path)?;

        // Spread 1 MiB requests over every brick, 16 in flight, then fsync each object.
        let key = ObjectKey {
            volume: VolumeId(0),
            ino: Ino(u64::MAX),
            column: 0,
        };
        let sem = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        let n = served.len().max(1) as u64;
        for i in 0..args.bench_mib {
            let permit = sem.clone().acquire_owned().await?;
            let (c, chunk, brick) = (client.clone(), chunk.clone(), served[(i % n) as usize].id);
            tasks.spawn(async move {
                let r = c
                    .write(addr, brick, key, (i / n) * CHUNK as u64, chunk, false)
                    .await;
                drop(permit);
                r.map(|_| ())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        for b in &served {
            client.fsync(addr, b.id, key).await?;
        }
        let write = mib_s(total, start.elapsed());
        let start = Instant::now();
        for i in 0..args.bench_mib {
            let permit = sem.clone().acquire_owned().await?;
            let (c, brick) = (client.clone(), served[(i % n) as usize].id);
            tasks.spawn(async move {
                let r = c
                    .read(addr, brick, key, (i / n) * CHUNK as u64, CHUNK as u32)
                    .await;
                drop(permit);
                r.map(|_| ())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let read = mib_s(total, start.elapsed());
        for b in &served {
            client.delete(addr, b.id, key).await?;
        }
        println!();
        println!(
            "benchmark: {} MiB in 1 MiB requests over {} bricks, 16 in flight",
            args.bench_mib, n
        );
        println!("  local disk write (fsync at end): {disk:>7.0} MiB/s");
        println!(
            "  brick write (fsync at end):      {write:>7.0} MiB/s  ({:.2} x disk)",
            write / disk
        );
        println!("  brick read:                      {read:>7.0} MiB/s");
    }

    println!();
    println!("try:   brickfs node bricks {addr}");
    println!("log:   {}", node.log_path().display());
    println!("data:  {}", args.data.display());
    println!("Ctrl-C stops it.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping brickd ...");
    let status = node.sigterm_and_wait(Duration::from_secs(30))?;
    println!("stopped ({status})");
    Ok(())
}
