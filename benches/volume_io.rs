//! Large-file throughput through the client library: sequential write (then fsync) and read of
//! files with 1 and 4 parallel streams, for distributed, replicated 3, striped 4,
//! distributed-striped-replicated 2x2x2 and dispersed 4+2 volumes on three brickd processes,
//! each figure as a ratio to writing and reading the same bytes on the raw local disk in the
//! same run. Every byte of every replica or fragment lands on the same disk here, so a
//! replica-3 volume writes three times the bytes it is given.
//!
//! Run: `cargo bench --bench volume_io` (`BRICKFS_BENCH_MIB`, default 1024 per case;
//! `BRICKFS_BENCH_DIR` to choose the disk).

#![allow(clippy::print_stdout)]

use brickfs_client::{MetaClient, MetaClientOptions, VolumeClient, admin};
use brickfs_proto::Ino;
use brickfs_proto::meta::{AdminOp, MetaOp};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use rand::RngCore;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const REQUEST: usize = 4 << 20;

/// A volume to measure: name, spec head, bricks as (node, brick index).
type Case = (&'static str, &'static str, Vec<(usize, usize)>);

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / secs
}

fn raw_disk(dir: &Path, chunk: &[u8], total: u64) -> (f64, f64) {
    let path = dir.join("raw");
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..total / REQUEST as u64 {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    let w = mib_s(total, start.elapsed().as_secs_f64());
    let start = Instant::now();
    let mut f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; REQUEST];
    for _ in 0..total / REQUEST as u64 {
        f.read_exact(&mut buf).unwrap();
    }
    let r = mib_s(total, start.elapsed().as_secs_f64());
    std::fs::remove_file(&path).unwrap();
    (w, r)
}

async fn run(
    vol: Arc<VolumeClient>,
    streams: usize,
    total: u64,
    chunk: Bytes,
    case: &str,
) -> (f64, f64) {
    let per = total / streams as u64;
    let mut files = Vec::new();
    for s in 0..streams {
        files.push(Arc::new(
            vol.create(Ino(1), &format!("{case}-{s}"), 0o644, true)
                .await
                .unwrap(),
        ));
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for fh in &files {
        let (vol, fh, chunk) = (vol.clone(), fh.clone(), chunk.clone());
        tasks.spawn(async move {
            let mut off = 0;
            while off < per {
                vol.write(&fh, off, chunk.clone()).await.unwrap();
                off += chunk.len() as u64;
            }
            vol.fsync(&fh).await.unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
    let w = mib_s(total, start.elapsed().as_secs_f64());
    let start = Instant::now();
    for fh in &files {
        let (vol, fh) = (vol.clone(), fh.clone());
        tasks.spawn(async move {
            let mut off = 0;
            while off < per {
                let got = vol.read(&fh, off, REQUEST as u64).await.unwrap();
                assert_eq!(got.len(), REQUEST);
                off += REQUEST as u64;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let r = mib_s(total, start.elapsed().as_secs_f64());
    (w, r)
}

fn main() {
    let mib: u64 = std::env::var("BRICKFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let total = mib << 20;
    let base = std::env::var_os("BRICKFS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("brickfs-vol-bench-")
        .tempdir_in(&base)
        .unwrap();
    let mut chunk = vec![0u8; REQUEST];
    rand::rng().fill_bytes(&mut chunk);
    let chunk = Bytes::from(chunk);
    let (raw_w, raw_r) = raw_disk(dir.path(), &chunk, total);

    let bin = Path::new(env!("CARGO_BIN_EXE_brickd"));
    let mut nodes: Vec<Brickd> = Vec::new();
    for n in 0..3 {
        let d = dir.path().join(format!("n{n}"));
        let bricks: Vec<_> = (0..8).map(|i| d.join(format!("b{i}"))).collect();
        // Every node heartbeats to node 0's metadata group.
        let extra = match nodes.first() {
            None => vec!["--meta".to_string()],
            Some(first) => vec!["--meta-peers".to_string(), first.addr().to_string()],
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        nodes.push(Brickd::start(bin, &d, &bricks, &extra).unwrap());
    }
    let brick =
        |n: usize, i: usize| format!("{}:{}", nodes[n].addr(), nodes[n].bricks()[i].display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "volume I/O through the client library, {mib} MiB per case, {} MiB requests",
        REQUEST >> 20
    );
    println!("raw disk: write {raw_w:.0} MiB/s (fsync at end), read {raw_r:.0} MiB/s");
    println!("| volume | streams | write MiB/s | × raw | read MiB/s | × raw |");
    println!("|---|---:|---:|---:|---:|---:|");
    rt.block_on(async {
        let meta = MetaClient::new(vec![nodes[0].addr()], MetaClientOptions::default());
        meta.admin(AdminOp::Init).await.unwrap();
        let bc = brickfs_client::BrickClient::new(Default::default());
        for n in &nodes {
            admin::peer_add(&meta, &bc, n.addr()).await.unwrap();
        }
        let cases: Vec<Case> = vec![
            ("distributed", "", vec![(0, 0), (1, 0), (2, 0)]),
            ("replicated-3", "replica 3", vec![(0, 1), (1, 1), (2, 1)]),
            (
                "striped-4",
                "stripe 4",
                vec![(0, 2), (1, 2), (2, 2), (0, 3)],
            ),
            (
                "dist-striped-repl-2x2x2",
                "stripe 2 replica 2",
                vec![
                    (1, 3),
                    (2, 3),
                    (0, 4),
                    (1, 4),
                    (2, 4),
                    (0, 5),
                    (1, 5),
                    (2, 5),
                ],
            ),
            (
                "dispersed-4+2",
                "disperse 6 redundancy 2",
                vec![(0, 6), (1, 6), (2, 6), (0, 7), (1, 7), (2, 7)],
            ),
        ];
        for (name, head, bricks) in cases {
            let mut spec: Vec<String> = head.split_whitespace().map(String::from).collect();
            spec.extend(bricks.iter().map(|(n, i)| brick(*n, *i)));
            admin::volume_create(&meta, name, &spec).await.unwrap();
            meta.write(MetaOp::StartVolume { name: name.into() })
                .await
                .unwrap();
            let vol = VolumeClient::open(meta.clone(), bc.clone(), name)
                .await
                .unwrap();
            for streams in [1usize, 4] {
                let (w, r) = run(
                    vol.clone(),
                    streams,
                    total,
                    chunk.clone(),
                    &format!("s{streams}"),
                )
                .await;
                println!(
                    "| {name} | {streams} | {w:.0} | {:.2} | {r:.0} | {:.2} |",
                    w / raw_w,
                    r / raw_r
                );
            }
        }
    });
    drop(nodes);
}
