//! Brick write and read throughput over loopback with 1 MiB requests and 1, 4 and 16 requests
//! in flight, each as a ratio to writing and reading the same bytes to a local file on the same
//! disk in the same run.
//!
//! Run: `cargo bench --bench brick_io` (set `BRICKFS_BENCH_MIB`, default 1024, and
//! `BRICKFS_BENCH_DIR`, default the system temp folder, to choose size and disk). Each figure
//! is the median of three runs. Reads come from the page cache for both sides, as they would
//! for recently written data.

#![allow(clippy::print_stdout)]

use brickfs_client::BrickClient;
use brickfs_proto::rpc::ClientOptions;
use brickfs_proto::{BrickId, Ino, ObjectKey, VolumeId};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use rand::RngCore;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;
const REPS: usize = 3;

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / took.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn local_file(dir: &Path, chunk: &[u8], chunks: u64) -> (f64, f64) {
    let (mut w, mut r) = (Vec::new(), Vec::new());
    for rep in 0..REPS {
        let path = dir.join(format!("baseline-{rep}"));
        let start = Instant::now();
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..chunks {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
        w.push(mib_per_s(chunks * CHUNK as u64, start.elapsed()));
        let start = Instant::now();
        let mut f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..chunks {
            f.read_exact(&mut buf).unwrap();
        }
        r.push(mib_per_s(chunks * CHUNK as u64, start.elapsed()));
        std::fs::remove_file(&path).unwrap();
    }
    (median(w), median(r))
}

async fn brick_run(
    c: &BrickClient,
    addr: SocketAddr,
    brick: BrickId,
    chunk: Bytes,
    chunks: u64,
    inflight: usize,
    ino: u64,
) -> (f64, f64) {
    let key = ObjectKey {
        volume: VolumeId(1),
        ino: Ino(ino),
        column: 0,
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..chunks {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (c, chunk) = (c.clone(), chunk.clone());
        tasks.spawn(async move {
            c.write(addr, brick, key, i * CHUNK as u64, chunk, false)
                .await
                .unwrap();
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    c.fsync(addr, brick, key).await.unwrap();
    let write = mib_per_s(chunks * CHUNK as u64, start.elapsed());

    let start = Instant::now();
    for i in 0..chunks {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let c = c.clone();
        tasks.spawn(async move {
            let (_, data) = c
                .read(addr, brick, key, i * CHUNK as u64, CHUNK as u32)
                .await
                .unwrap();
            assert_eq!(data.len(), CHUNK);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    let read = mib_per_s(chunks * CHUNK as u64, start.elapsed());
    c.delete(addr, brick, key).await.unwrap();
    (write, read)
}

fn main() {
    let mib: u64 = std::env::var("BRICKFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = std::env::var_os("BRICKFS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("brickfs-bench-")
        .tempdir_in(&base)
        .unwrap();
    let mut chunk = vec![0u8; CHUNK];
    rand::rng().fill_bytes(&mut chunk);
    let chunk = Bytes::from(chunk);

    let (base_w, base_r) = local_file(dir.path(), &chunk, mib);
    let node = Brickd::start(
        Path::new(env!("CARGO_BIN_EXE_brickd")),
        &dir.path().join("data"),
        &[dir.path().join("brick0")],
        &[],
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("brick I/O over loopback, {mib} MiB per run, 1 MiB requests, median of {REPS}");
    println!("| case | write MiB/s | write ratio | read MiB/s | read ratio |");
    println!("|---|---:|---:|---:|---:|");
    println!("| local file (baseline) | {base_w:.0} | 1.00 | {base_r:.0} | 1.00 |");
    rt.block_on(async {
        let c = BrickClient::new(ClientOptions {
            peer_name: "bench".into(),
            ..ClientOptions::default()
        });
        let brick = c.list_bricks(node.addr()).await.unwrap()[0].id;
        let mut ino = 1;
        for inflight in [1usize, 4, 16] {
            let (mut w, mut r) = (Vec::new(), Vec::new());
            for _ in 0..REPS {
                let (wi, ri) =
                    brick_run(&c, node.addr(), brick, chunk.clone(), mib, inflight, ino).await;
                ino += 1;
                w.push(wi);
                r.push(ri);
            }
            let (w, r) = (median(w), median(r));
            println!(
                "| brick, {inflight} in flight | {w:.0} | {:.2} | {r:.0} | {:.2} |",
                w / base_w,
                r / base_r
            );
        }
    });
}
