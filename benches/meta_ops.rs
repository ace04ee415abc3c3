//! Metadata throughput: creates/s, stats/s and renames/s through the metadata client with 1
//! and 3 voters and 1, 8 and 32 concurrent clients (each with its own session). The Raft log is
//! always fsynced before an entry counts (openraft batches entries into one sync).
//!
//! Baselines measured in the same run on the same disk: creating empty files in a local folder
//! (no fsync), and small appends each followed by fdatasync (the cost floor of a durable
//! commit). Run: `cargo bench --bench meta_ops` (`BRICKFS_BENCH_OPS`, default 2000 per case).

#![allow(clippy::print_stdout)]

use brickfs_client::{MetaClient, MetaClientOptions};
use brickfs_proto::meta::{AdminOp, MetaOp, MetaRead, MetaReply, RenameFlags};
use brickfs_proto::{Ino, VolumeId};
use brickfs_testkit::Brickd;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const ROOT: Ino = Ino(1);

fn client(addrs: &[SocketAddr], name: &str) -> MetaClient {
    MetaClient::new(
        addrs.to_vec(),
        MetaClientOptions {
            client_name: name.into(),
            deadline: Duration::from_secs(60),
            ..MetaClientOptions::default()
        },
    )
}

fn local_baselines(dir: &Path, ops: usize) -> (f64, f64) {
    let d = dir.join("baseline");
    std::fs::create_dir_all(&d).unwrap();
    let start = Instant::now();
    for i in 0..ops {
        std::fs::File::create(d.join(format!("f{i}"))).unwrap();
    }
    let creates = ops as f64 / start.elapsed().as_secs_f64();
    let mut f = std::fs::File::create(d.join("log")).unwrap();
    let n = ops.min(500);
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&[7u8; 128]).unwrap();
        f.sync_data().unwrap();
    }
    let fsyncs = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&d).unwrap();
    (creates, fsyncs)
}

async fn run_case(
    addrs: &[SocketAddr],
    volume: VolumeId,
    clients: usize,
    ops: usize,
    case: usize,
) -> (f64, f64, f64) {
    let admin = client(addrs, "bench-admin");
    let dir = match admin
        .write(MetaOp::Mkdir {
            volume,
            parent: ROOT,
            name: format!("case{case}"),
            mode: 0o755,
            umask: 0,
            uid: 0,
            gid: 0,
        })
        .await
        .unwrap()
    {
        MetaReply::Attr(a) => a.ino,
        other => panic!("{other:?}"),
    };
    let cs: Vec<MetaClient> = (0..clients)
        .map(|i| client(addrs, &format!("bench{i}")))
        .collect();
    for c in &cs {
        c.open_session().await.unwrap();
    }
    let per = ops / clients;
    let phase = |kind: u8| {
        let cs = cs.clone();
        async move {
            let start = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for (ci, c) in cs.into_iter().enumerate() {
                tasks.spawn(async move {
                    for i in 0..per {
                        let name = format!("c{ci}-{i}");
                        match kind {
                            0 => {
                                c.write(MetaOp::create_file(volume, dir, &name, 0o644, true))
                                    .await
                                    .unwrap();
                            }
                            1 => {
                                c.read(MetaRead::Lookup {
                                    volume,
                                    parent: dir,
                                    name,
                                })
                                .await
                                .unwrap();
                            }
                            _ => {
                                c.write(MetaOp::Rename {
                                    volume,
                                    parent: dir,
                                    name: name.clone(),
                                    new_parent: dir,
                                    new_name: format!("r{name}"),
                                    flags: RenameFlags::default(),
                                })
                                .await
                                .unwrap();
                            }
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
            (per * clients) as f64 / start.elapsed().as_secs_f64()
        }
    };
    let creates = phase(0).await;
    let stats = phase(1).await;
    let renames = phase(2).await;
    (creates, stats, renames)
}

fn main() {
    let ops: usize = std::env::var("BRICKFS_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let base = std::env::var_os("BRICKFS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("brickfs-meta-bench-")
        .tempdir_in(&base)
        .unwrap();
    let (local_creates, local_fsyncs) = local_baselines(dir.path(), ops);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("metadata ops through the client, {ops} per phase; log fsynced before each commit");
    println!(
        "baselines: local file creates {local_creates:.0}/s (no fsync), 128-byte append+fdatasync {local_fsyncs:.0}/s"
    );
    println!("| voters | clients | creates/s | ×fsync | stats/s | renames/s | ×fsync |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let bin = Path::new(env!("CARGO_BIN_EXE_brickd"));
    for voters in [1usize, 3] {
        let nodes: Vec<Brickd> = (0..voters)
            .map(|i| {
                let d = dir.path().join(format!("v{voters}n{i}"));
                Brickd::start(bin, &d, &[d.join("brick")], &["--meta"]).unwrap()
            })
            .collect();
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr()).collect();
        rt.block_on(async {
            client(&addrs[..1], "init")
                .admin(AdminOp::Init)
                .await
                .unwrap();
            let admin = client(&addrs, "admin");
            let pinger = brickfs_client::BrickClient::new(Default::default());
            for a in &addrs[1..] {
                let id = pinger.ping(*a).await.unwrap();
                admin
                    .admin(AdminOp::AddMember {
                        id,
                        addr: a.to_string(),
                        voter: true,
                    })
                    .await
                    .unwrap();
            }
            let (node, bricks) = brickfs_client::admin::peer_add(&admin, &pinger, addrs[0])
                .await
                .unwrap();
            let spec = vec![format!("{}:{}", node.addr, bricks[0].path)];
            let volume = brickfs_client::admin::volume_create(&admin, "bench", &spec)
                .await
                .unwrap()
                .id;
            for (case, clients) in [1usize, 8, 32].into_iter().enumerate() {
                let (c, s, r) = run_case(&addrs, volume, clients, ops, case).await;
                println!(
                    "| {voters} | {clients} | {c:.0} | {:.2} | {s:.0} | {r:.0} | {:.2} |",
                    c / local_fsyncs,
                    r / local_fsyncs
                );
            }
        });
        drop(nodes);
    }
}
