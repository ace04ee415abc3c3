//! `brickfs-local`, the embedded default: one brickd on loopback serving six bricks and a
//! one-node metadata group, a volume over the six bricks (dispersed 4+2 unless `--spec` says
//! otherwise), mounted with mountd, a short `brickfs bench` through the mount against the local
//! disk; then it stays up until Ctrl-C (or SIGTERM), which unmounts and stops everything
//! cleanly (also when it comes during the benchmark). A second start reuses the data, the
//! group and the volume.
//!
//! `scripts/quickstart` builds and runs it; `tests/quickstart.rs` drives it.

#![allow(clippy::print_stdout)]

use anyhow::Context;
use brickfs_cli::bench::{BenchArgs, parse_size};
use brickfs_client::{BrickClient, MetaClient, MetaClientOptions, admin};
use brickfs_proto::ErrorCode;
use brickfs_proto::meta::{AdminOp, MetaOp};
use brickfs_proto::rpc::ClientOptions;
use brickfs_testkit::Brickd;
use clap::Parser;
use mountd::is_mounted;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Start a local brickfs cluster on loopback, mount a volume and benchmark it")]
struct Args {
    /// Where the node keeps its data and bricks (reused by the next start).
    #[arg(long)]
    data: PathBuf,
    /// The brickd executable (default: the one next to this program).
    #[arg(long)]
    brickd: Option<PathBuf>,
    /// The mountd executable (default: the one next to this program).
    #[arg(long)]
    mountd: Option<PathBuf>,
    /// Do not mount the volume (the benchmark then goes through the client library).
    #[arg(long)]
    no_mount: bool,
    /// How many bricks to serve.
    #[arg(long, default_value_t = 6)]
    bricks: usize,
    /// Bytes each stream writes and reads in the start-up benchmark (0 skips it).
    #[arg(long, default_value = "128M", value_parser = parse_bench_size)]
    bench_size: u64,
    /// The volume's layout before its bricks, in the volume grammar
    /// (e.g. "stripe 6", "replica 3", "disperse 6 redundancy 2").
    #[arg(long, default_value = "disperse 6 redundancy 2")]
    spec: String,
    /// The volume's name.
    #[arg(long, default_value = "vol0")]
    volume: String,
    /// Where to mount the volume (default: DATA/mnt).
    #[arg(long)]
    mount: Option<PathBuf>,
    /// Serve brickd's metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve mountd's metrics (volume calls and FUSE requests) on this address.
    #[arg(long)]
    mount_metrics_listen: Option<std::net::SocketAddr>,
}

fn parse_bench_size(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size(s)
}

/// Stops a mountd child with SIGTERM and makes sure nothing stays mounted.
fn unmount(mut child: std::process::Child, path: &std::path::Path) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    if is_mounted(path) {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A program installed next to this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("find this program")?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(
        p.exists(),
        "{} not found next to {}: build it (cargo build --release --bins) or pass --{name}",
        p.display(),
        exe.display()
    );
    Ok(p)
}

/// Resolves when Ctrl-C or SIGTERM arrives.
async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The mountd child and its mount point: unmounted when dropped, on every path out.
struct Mounted {
    child: Option<std::process::Child>,
    path: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            unmount(child, &self.path);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let brickd = match &args.brickd {
        Some(p) => p.clone(),
        None => sibling("brickd")?,
    };
    let mountd = match (&args.mountd, args.no_mount) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => Some(sibling("mountd")?),
    };
    let node_dir = args.data.join("node0");
    let bricks: Vec<PathBuf> = (0..args.bricks)
        .map(|i| node_dir.join(format!("brick{i}")))
        .collect();
    // The cluster map records the node's address: keep it across restarts.
    let addr_file = node_dir.join("addr");
    let known: Option<std::net::SocketAddr> = std::fs::read_to_string(&addr_file)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let mut brickd_args = vec!["--meta".to_string()];
    if let Some(m) = args.metrics_listen {
        brickd_args.extend(["--metrics-listen".to_string(), m.to_string()]);
    }
    let brickd_args: Vec<&str> = brickd_args.iter().map(String::as_str).collect();
    let mut node = Brickd::start_at(
        &brickd,
        &node_dir.join("data"),
        &bricks,
        &brickd_args,
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
        "brickd pid {} listening on {addr} with {} bricks:",
        node.pid().unwrap_or(0),
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
        Ok(v) => {
            println!("reusing volume {}", v.name);
            v
        }
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
            println!("created volume {}", v.name);
            v
        }
    };
    println!(
        "volume {} ({}): {}",
        volume.name,
        volume.type_name,
        volume.spec.join(" ")
    );

    let mut mounted = None;
    if let Some(mountd) = &mountd {
        let path = args.mount.clone().unwrap_or_else(|| args.data.join("mnt"));
        std::fs::create_dir_all(&path).context("create the mount point")?;
        if is_mounted(&path) {
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        }
        let mut cmd = std::process::Command::new(mountd);
        cmd.arg(format!("{addr}/{}", volume.name))
            .arg(&path)
            .stdin(std::process::Stdio::null());
        if let Some(m) = args.mount_metrics_listen {
            cmd.arg("--metrics-listen").arg(m.to_string());
        }
        // Its own process group: Ctrl-C reaches only this program, which unmounts first.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("start mountd")?;
        let pid = child.id();
        let m = Mounted {
            child: Some(child),
            path: path.clone(),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&path) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "mountd did not mount {} within 30 s",
                path.display()
            );
            tick.tick().await;
        }
        println!(
            "mountd pid {pid}: volume {} mounted at {}",
            volume.name,
            path.display()
        );
        mounted = Some(m);
    }

    let stop = stop_signal();
    tokio::pin!(stop);
    let mut stopped = false;
    if args.bench_size > 0 {
        let bench = BenchArgs {
            mount: mounted.as_ref().map(|m| m.path.clone()),
            volume: if mounted.is_some() {
                Vec::new()
            } else {
                vec![volume.name.clone()]
            },
            size: args.bench_size,
            streams: vec![1, 4],
            block: 1 << 20,
            rand_reads: 1000,
            files: 200,
            gc_load: 0,
            disk: args.data.clone(),
            no_disk: false,
            plot: Some(args.data.join("bench.svg")),
        };
        println!();
        println!(
            "benchmark: brickfs bench {} against the disk under {} ...",
            if mounted.is_some() {
                "through the mount"
            } else {
                "through the client library"
            },
            args.data.display()
        );
        tokio::select! {
            r = brickfs_cli::bench::run(bench, Some(meta.clone()), false) => {
                if let Err(e) = r {
                    println!("benchmark failed: {e:#}");
                }
            }
            r = &mut stop => {
                r?;
                stopped = true;
            }
        }
    }

    if !stopped {
        println!();
        if let Some(m) = &mounted {
            println!(
                "use:   ls {0}; cp BIGFILE {0}/; df -h {0}",
                m.path.display()
            );
            println!(
                "bench: brickfs bench --mount {} --size 1G --streams 1,2,4,8 --plot bench.svg",
                m.path.display()
            );
        }
        println!("try:   brickfs node bricks {addr}");
        println!("       brickfs --meta {addr} volume info {}", volume.name);
        println!(
            "       brickfs --meta {addr} volume heal {} info",
            volume.name
        );
        println!("log:   {}", node.log_path().display());
        println!("data:  {}", args.data.display());
        println!("Ctrl-C stops it.");
        stop.await?;
    }
    if let Some(m) = mounted {
        println!("unmounting {} ...", m.path.display());
        drop(m);
    }
    println!("stopping brickd ...");
    let status = node.sigterm_and_wait(Duration::from_secs(30))?;
    println!("stopped ({status})");
    Ok(())
}
