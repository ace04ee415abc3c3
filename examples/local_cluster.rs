//! The embedded default: one brickd on loopback serving six bricks and a one-node metadata
//! group, a volume over the six bricks (dispersed 4+2 unless `--spec` says otherwise), mounted
//! with mountd (when `--mountd` is given), a short benchmark of brick I/O against the local
//! disk; then it stays up until Ctrl-C (or SIGTERM), which unmounts and stops everything
//! cleanly. A second start reuses the data, the group and the volume.
//!
//! `scripts/quickstart` builds and runs it. `brickfs bench` through the mount comes with issue 7.

#![allow(clippy::print_stdout)]

use anyhow::Context;
use brickfs_client::{BrickClient, MetaClient, MetaClientOptions, admin};
use brickfs_proto::ErrorCode;
use brickfs_proto::meta::{AdminOp, MetaOp};
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
    /// The volume's layout before its bricks, in the volume grammar.
    #[arg(long, default_value = "disperse 6 redundancy 2")]
    spec: String,
    /// The volume's name.
    #[arg(long, default_value = "vol0")]
    volume: String,
    /// The mountd executable; when given, the volume is mounted with FUSE.
    #[arg(long)]
    mountd: Option<PathBuf>,
    /// Where to mount the volume (default: DATA/mnt).
    #[arg(long)]
    mount: Option<PathBuf>,
}

use mountd::is_mounted;

/// Stops a mountd child with SIGTERM and makes sure nothing stays mounted.
fn unmount(mut child: std::process::Child, path: &std::path::Path) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    if is_mounted(path) {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
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
    // The cluster map records the node's address: keep it across restarts.
    let addr_file = node_dir.join("addr");
    let known: Option<std::net::SocketAddr> = std::fs::read_to_string(&addr_file)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let mut node = Brickd::start_at(
        &args.brickd,
        &node_dir.join("data"),
        &bricks,
        &["--meta"],
        known,
    )
    .context("start brickd")?;
    std::fs::write(&addr_file, node.addr().to_string()).context("record the node address")?;
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
    let meta = MetaClient::new(
        vec![addr],
        MetaClientOptions {
            client_name: "local-cluster".into(),
            ..MetaClientOptions::default()
        },
    );
    match meta.admin(AdminOp::Init).await {
        Ok(_) => println!("started a one-node metadata group"),
        Err(e) if e.code() == Some(ErrorCode::Exists) => println!("rejoined the metadata group"),
        Err(e) => return Err(e).context("initialize the metadata group"),
    }
    admin::peer_add(&meta, &client, addr)
        .await
        .context("register the node")?;
    let volume = match admin::volume_info(&meta, &args.volume).await {
        Ok(v) => v,
        Err(_) => {
            let mut spec: Vec<String> = args.spec.split_whitespace().map(String::from).collect();
            spec.extend(served.iter().map(|b| format!("{addr}:{}", b.path)));
            let v = admin::volume_create(&meta, &args.volume, &spec)
                .await
                .with_context(|| format!("create volume {}", args.volume))?;
            meta.write(MetaOp::StartVolume {
                name: v.name.clone(),
            })
            .await?;
            v
        }
    };
    println!(
        "volume {} ({}): {}",
        volume.name,
        volume.type_name,
        volume.spec.join(" ")
    );

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

    let mut mounted = None;
    if let Some(mountd) = &args.mountd {
        let path = args.mount.clone().unwrap_or_else(|| args.data.join("mnt"));
        std::fs::create_dir_all(&path).context("create the mount point")?;
        if is_mounted(&path) {
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        }
        let child = std::process::Command::new(mountd)
            .arg(format!("{addr}/{}", volume.name))
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("start mountd")?;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&path) {
            if Instant::now() > deadline {
                unmount(child, &path);
                anyhow::bail!("mountd did not mount {} within 30 s", path.display());
            }
            tick.tick().await;
        }
        println!("mounted volume {} at {}", volume.name, path.display());
        mounted = Some((child, path));
    }

    println!();
    if let Some((_, path)) = &mounted {
        println!("use:   ls {0}; cp BIGFILE {0}/; df -h {0}", path.display());
    }
    println!("try:   brickfs node bricks {addr}");
    println!("       brickfs --meta {addr} volume info {}", volume.name);
    println!("       brickfs cluster status {addr}");
    println!("log:   {}", node.log_path().display());
    println!("data:  {}", args.data.display());
    println!("Ctrl-C stops it.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Some((child, path)) = mounted {
        println!("unmounting {} ...", path.display());
        unmount(child, &path);
    }
    println!("stopping brickd ...");
    let status = node.sigterm_and_wait(Duration::from_secs(30))?;
    println!("stopped ({status})");
    Ok(())
}
