//! What checking a request costs a brick server: nanoseconds per `Access::check` for the
//! requests of the data path (a client's 4 KiB read and set write, a node's read, a read on a
//! cluster without keys), with the rules of 256 replicated volumes on 16 nodes, against a
//! 4 KiB read round trip to a real brickd over loopback in the same run (which checks
//! nothing: it has no metadata group). The ratio is the share of a read's time the check
//! adds.
//!
//! Run: `cargo bench --bench access_check`. Each figure is the median of five runs of
//! `BRICKFS_BENCH_CHECKS` checks (default 1,000,000) or 20,000 reads.

#![allow(clippy::print_stdout)]

use brickd::access::Access;
use brickfs_client::BrickClient;
use brickfs_proto::cred::{Peer, Role};
use brickfs_proto::meta::{
    ClientCredential, NodeRecord, SetState, VolumeBrick, VolumeRecord, VolumeStatus,
};
use brickfs_proto::msg::{MemberRef, Read, SetRef, SetWrite};
use brickfs_proto::rpc::ClientOptions;
use brickfs_proto::{BrickId, Epoch, Ino, Message, NodeId, ObjectKey, VolumeId};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const VOLUMES: u64 = 256;
const NODES: u64 = 16;
const REPS: usize = 5;
const READS: u64 = 20_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn node_addr(n: u64) -> String {
    format!("10.1.0.{n}:7000")
}

/// 256 volumes of two replica-3 sets each, bricks spread over 16 nodes, each with an
/// allow-networks option and three credentials.
fn rules() -> (Vec<VolumeRecord>, Vec<NodeRecord>) {
    let nodes = (1..=NODES)
        .map(|n| NodeRecord {
            id: NodeId(n),
            addr: node_addr(n),
            last_heartbeat_ms: 1,
        })
        .collect();
    let volumes = (1..=VOLUMES)
        .map(|v| {
            let bricks: Vec<VolumeBrick> = (0..6)
                .map(|i| {
                    let node = (v * 6 + i) % NODES + 1;
                    VolumeBrick {
                        brick: BrickId(v * 6 + i),
                        node: NodeId(node),
                        addr: format!("{}:/b/{v}-{i}", node_addr(node)),
                    }
                })
                .collect();
            let sets = bricks
                .chunks(3)
                .map(|c| {
                    let members: Vec<BrickId> = c.iter().map(|b| b.brick).collect();
                    SetState {
                        primary: members[0],
                        in_sync: members.clone(),
                        members,
                        epoch: Epoch(3),
                        full_heal: Vec::new(),
                        draining: None,
                    }
                })
                .collect();
            VolumeRecord {
                id: VolumeId(v),
                name: format!("vol{v}"),
                root: Ino(1),
                type_name: "distributed-replicated".into(),
                spec: Vec::new(),
                stripe: 1,
                replica: 3,
                disperse_data: 0,
                disperse_redundancy: 0,
                bricks,
                sets,
                status: VolumeStatus::Started,
                options: vec![(
                    "allow-networks".into(),
                    "10.0.0.0/8,192.168.0.0/16,127.0.0.0/8".into(),
                )],
                draining: Vec::new(),
                rebalance: None,
                credentials: (1..=3)
                    .map(|c| ClientCredential {
                        id: v * 100 + c,
                        created_ms: 1,
                        label: format!("client {c}"),
                    })
                    .collect(),
            }
        })
        .collect();
    (volumes, nodes)
}

fn key(v: u64) -> ObjectKey {
    ObjectKey {
        volume: VolumeId(v),
        ino: Ino(77),
        column: 0,
    }
}

fn read(v: u64) -> Message {
    Message::Read(Read {
        brick: BrickId(v * 6),
        key: key(v),
        offset_bytes: 4096 * 9,
        len_bytes: 4096,
        repair: false,
    })
}

fn set_write(v: u64) -> Message {
    Message::SetWrite(SetWrite {
        brick: BrickId(v * 6),
        set: SetRef {
            volume: VolumeId(v),
            set: 0,
            epoch: Epoch(3),
        },
        key: key(v),
        offset_bytes: 0,
        sync: false,
        // The members the primary forwards to: the others.
        members: (1..3)
            .map(|i| {
                let node = (v * 6 + i) % NODES + 1;
                MemberRef {
                    brick: BrickId(v * 6 + i),
                    addr: node_addr(node),
                }
            })
            .collect(),
        degraded: false,
    })
}

/// Nanoseconds per check of `msg` from `from`, each of `threads` threads doing `n` checks
/// at once (so the figure includes contention on the rules' lock).
fn ns_per_check(access: &Arc<Access>, from: Peer, msg: &Message, n: u64, threads: usize) -> f64 {
    if let Err(e) = access.check(from, msg) {
        panic!("{from:?} refused: {}", e.detail);
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..n {
                    black_box(access.check(black_box(from), black_box(msg))).expect("refused");
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Microseconds per 4 KiB read to a real brickd, `inflight` at once.
async fn us_per_read(c: &BrickClient, addr: SocketAddr, brick: BrickId, inflight: usize) -> f64 {
    let key = key(1);
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for i in 0..READS {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let c = c.clone();
        tasks.spawn(async move {
            let off = (i * 7919 % 256) * 4096;
            let (_, data) = c.read(addr, brick, key, off, 4096).await.unwrap();
            assert_eq!(data.len(), 4096);
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    start.elapsed().as_nanos() as f64 / 1000.0 / READS as f64
}

fn main() {
    let n: u64 = std::env::var("BRICKFS_BENCH_CHECKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let access = Arc::new(Access::new(true));
    let (volumes, nodes) = rules();
    access.install(volumes, nodes);
    let client_addr: SocketAddr = "10.9.8.7:40000".parse().unwrap();
    let v = VOLUMES / 2;
    let client = Peer {
        addr: client_addr,
        role: Role::Client {
            volume: VolumeId(v),
            id: v * 100 + 2,
        },
    };
    let node = Peer {
        addr: "10.1.0.3:7000".parse().unwrap(),
        role: Role::Node,
    };
    let open = Peer {
        addr: client_addr,
        role: Role::Open,
    };
    let cases = [
        ("client, 4 KiB Read", client, read(v)),
        ("client, SetWrite", client, set_write(v)),
        ("node, 4 KiB Read", node, read(v)),
        ("no keys (Open), 4 KiB Read", open, read(v)),
    ];

    let dir = tempfile::Builder::new()
        .prefix("brickfs-bench-")
        .tempdir()
        .unwrap();
    let brickd = Brickd::start(
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
    let (read1, read16) = rt.block_on(async {
        let c = BrickClient::new(ClientOptions {
            peer_name: "bench".into(),
            ..ClientOptions::default()
        });
        let brick = c.list_bricks(brickd.addr()).await.unwrap()[0].id;
        let data = Bytes::from(vec![7u8; 1 << 20]);
        c.write(brickd.addr(), brick, key(1), 0, data, true)
            .await
            .unwrap();
        let (mut r1, mut r16) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            r1.push(us_per_read(&c, brickd.addr(), brick, 1).await);
            r16.push(us_per_read(&c, brickd.addr(), brick, 16).await);
        }
        (median(r1), median(r16))
    });
    drop(brickd);

    println!(
        "access checks: {VOLUMES} volumes (replica 3 x 2, allow-networks, 3 credentials each), {NODES} nodes; median of {REPS} runs of {n} checks"
    );
    println!(
        "baseline: a 4 KiB brick read over loopback takes {read1:.1} us (1 in flight) and {read16:.1} us of wall time per read (16 in flight)"
    );
    println!(
        "| request | ns per check, 1 thread | ns per check, 2 threads | share of a read, 1 in flight | share, 16 in flight |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, from, msg) in &cases {
        let one = median(
            (0..REPS)
                .map(|_| ns_per_check(&access, *from, msg, n, 1))
                .collect(),
        );
        let two = median(
            (0..REPS)
                .map(|_| ns_per_check(&access, *from, msg, n, 2))
                .collect(),
        );
        println!(
            "| {label} | {one:.0} | {two:.0} | {:.3} % | {:.3} % |",
            one / (read1 * 1000.0) * 100.0,
            two / (read16 * 1000.0) * 100.0
        );
    }
}
