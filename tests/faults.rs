//! Fault injection: three brickd nodes (each a metadata voter with three bricks, each on its own
//! test host in a network namespace) serve a replica-3 volume and a disperse 2+1 volume
//! (default quorums: 2 and 3) while a seeded, randomized workload of writes, truncates,
//! renames, fsyncs and reads runs from a fourth host, and a seeded fault schedule partitions
//! nodes from the rest (first of all the metadata leader, which is also the primary of both
//! sets: leader and primaries cut off together), kills nodes with SIGKILL (restarting them,
//! sometimes killing one again in the middle of its heal), freezes them with SIGSTOP/SIGCONT,
//! fills a node's brick disk (a tmpfs per node) for a few seconds and flips bytes in object
//! files on disk — one node at a time, so the cluster always keeps a
//! majority (the disperse set is read-only while one of its members is out: operations on it
//! wait, retried, until it heals).
//!
//! The workload retries each operation until it is acknowledged (operations are idempotent),
//! so the model of every file is exactly what was acknowledged. The checker proves: every read
//! during the run returned exactly the model's bytes (or an error, never wrong bytes); after
//! the faults stop and every member healed, every file reads back as acknowledged, every name
//! is where the last acknowledged rename left it, and no two copies of any object differ.
//!
//! A third of the way in, the replica volume grows by a stripe group (a third brick on each
//! node) and a rebalance starts: its files move while the faults and the workload go on (the
//! workload's handles follow them); after the faults the rebalance must finish.
//!
//! `BRICKFS_FAULT_SEED` reproduces a run (the seed is printed); `BRICKFS_FAULT_SECS` sets how
//! long faults are injected (default 20, the CI profile; try 600 by hand for the long one).
//! Needs root (network namespaces, tmpfs mounts) and iproute2.

mod common;

use brickfs_client::BrickClient;
use brickfs_client::{FileHandle, MetaClient, MetaClientOptions, VolumeClient, admin};
use brickfs_proto::Ino;
use brickfs_proto::meta::{AdminOp, MetaOp, MetaRead, MetaReply};
use brickfs_proto::rpc::ClientOptions;
use brickfs_testkit::{Brickd, TestNet};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ROOT: Ino = Ino(1);

/// Waits `d` on the fault schedule's clock (what is being modelled is time, not readiness).
async fn hold(d: Duration) {
    let mut t = tokio::time::interval(d);
    t.tick().await;
    t.tick().await;
}

struct Cluster {
    nodes: Arc<Mutex<Vec<Brickd>>>,
    meta: MetaClient,
    /// The nodes' ids, in node order.
    ids: Vec<brickfs_proto::NodeId>,
    // Dropped after the nodes stop: their brick disks, then the folder.
    _disks: Vec<TmpfsGuard>,
    _dir: tempfile::TempDir,
}

/// Unmounts a node's brick disk (a small tmpfs, so that the suite can fill it) when dropped.
struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Fills the file system holding `filler` until it refuses more (ENOSPC).
fn fill(filler: &std::path::Path) -> u64 {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(filler) else {
        return 0;
    };
    let chunk = vec![0x5au8; 1 << 20];
    let mut wrote = 0;
    // Bounded: the disks are 128 MiB.
    for _ in 0..1024 {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => wrote += n as u64,
        }
    }
    wrote
}

/// The test host the workload runs on (hosts 0..3 are the nodes).
const CLIENT_HOST: usize = 3;

/// A brick client as a mount would use it: a request to a node that is cut off gives up after
/// a few seconds (and is retried) instead of the test's usual minute.
fn fault_client() -> BrickClient {
    BrickClient::new(ClientOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        peer_name: "faults".into(),
        ..ClientOptions::default()
    })
}

impl Drop for Cluster {
    /// On failure, what each node logged last (its log goes with the temporary folder).
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(nodes) = self.nodes.lock()
        {
            for (i, n) in nodes.iter().enumerate() {
                eprintln!("--- node {i} log tail ---\n{}", n.log_tail(60));
            }
        }
    }
}

async fn must_cluster(net: &TestNet) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--meta",
        "--meta-down-after-secs",
        "5",
        "--write-lease-ms",
        "3000",
        "--scrub-interval-secs",
        "2",
    ];
    let mut nodes = Vec::new();
    let mut ids = Vec::new();
    let mut disks = Vec::new();
    for n in 0..3 {
        let node_dir = dir.path().join(format!("n{n}"));
        // The node's bricks on a disk of their own (its metadata stays on the machine's).
        let disk = node_dir.join("disk");
        std::fs::create_dir_all(&disk).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &disk,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=128m"),
        )
        .unwrap();
        disks.push(TmpfsGuard(disk.clone()));
        // b0: the replica volume, b1: the disperse volume, b2: the replica volume's growth.
        let bricks: Vec<_> = (0..3).map(|i| disk.join(format!("b{i}"))).collect();
        let node = Brickd::start_in(&brickd_bin(), &node_dir, &bricks, &args, net.host(n)).unwrap();
        ids.push(client().ping(node.addr()).await.unwrap());
        nodes.push(node);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr()).collect();
    MetaClient::new(vec![addrs[0]], MetaClientOptions::default())
        .admin(AdminOp::Init)
        .await
        .unwrap();
    let meta = MetaClient::new(
        addrs.clone(),
        MetaClientOptions {
            deadline: Duration::from_secs(60),
            ..MetaClientOptions::default()
        },
    );
    for n in 1..3 {
        meta.admin(AdminOp::AddMember {
            id: ids[n],
            addr: addrs[n].to_string(),
            voter: true,
        })
        .await
        .unwrap();
    }
    for a in &addrs {
        admin::peer_add(&meta, &client(), *a).await.unwrap();
    }
    for (name, head, col) in [
        ("r3", "replica 3", 0),
        ("d21", "disperse 3 redundancy 1", 1),
    ] {
        let mut spec: Vec<String> = head.split_whitespace().map(String::from).collect();
        spec.extend(
            nodes
                .iter()
                .map(|n| format!("{}:{}", n.addr(), n.bricks()[col].display())),
        );
        // Default quorums: a majority of the replicas; K+1 fragments for disperse, so that a
        // failure in the middle of a write still leaves K fragments of it to heal from.
        admin::volume_create(&meta, name, &spec).await.unwrap();
        meta.write(MetaOp::StartVolume { name: name.into() })
            .await
            .unwrap();
    }
    Cluster {
        nodes: Arc::new(Mutex::new(nodes)),
        meta,
        ids,
        _disks: disks,
        _dir: dir,
    }
}

/// One file of the workload and what was acknowledged of it.
struct File {
    vol: Arc<VolumeClient>,
    fh: Arc<FileHandle>,
    name: String,
    model: Vec<u8>,
}

/// Retries an idempotent operation until it is acknowledged (bounded).
async fn until_acked<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what} never acknowledged: {e}");
                tick.tick().await;
            }
        }
    }
}

/// Flips one byte in a random object file of brick folder `brick` (if it holds any).
fn flip_a_byte(brick: &std::path::Path, rng: &mut StdRng) -> Option<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![brick.join("objects")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.metadata().map(|m| m.len() > 0).unwrap_or(false) {
                files.push(p);
            }
        }
    }
    if files.is_empty() {
        return None;
    }
    files.sort();
    let f = files[rng.random_range(0..files.len())].clone();
    let mut raw = std::fs::read(&f).ok()?;
    let at = rng.random_range(0..raw.len());
    raw[at] ^= 1 << rng.random_range(0..8);
    std::fs::write(&f, &raw).ok()?;
    Some(f)
}

/// The fault schedule: first a partition of the metadata leader's node (`leader`, also the
/// primary of both sets), then until `until` one fault at a time on a random node.
async fn inject(
    nodes: Arc<Mutex<Vec<Brickd>>>,
    net: Arc<TestNet>,
    leader: usize,
    seed: u64,
    until: Instant,
) -> (Vec<String>, (Instant, Instant)) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xFA17);
    let mut log = Vec::new();
    // Blocking testkit calls (wait for exit, for the readiness line) off the async workers.
    let with = |n: usize, f: fn(&mut Brickd)| {
        let nodes = nodes.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&mut nodes.lock().unwrap()[n]))
                .await
                .unwrap()
        }
    };
    let mut first = true;
    let mut leader_cut = (Instant::now(), Instant::now());
    while Instant::now() < until {
        hold(Duration::from_millis(rng.random_range(500..2000))).await;
        let mut n = rng.random_range(0..3usize);
        let mut kind = rng.random_range(0..6u32);
        if first {
            (n, kind, first) = (leader, 4, false);
        }
        match kind {
            0 => {
                let down = Duration::from_millis(rng.random_range(1000..9000));
                log.push(format!("kill -9 node {n} for {down:?}"));
                with(n, |b| b.sigkill().unwrap()).await;
                hold(down).await;
                with(n, |b| b.restart().unwrap()).await;
            }
            1 => {
                let frozen = Duration::from_millis(rng.random_range(500..5000));
                log.push(format!("SIGSTOP node {n} for {frozen:?}"));
                with(n, |b| b.sigstop().unwrap()).await;
                hold(frozen).await;
                with(n, |b| b.sigcont().unwrap()).await;
            }
            4 => {
                // Long enough, at times, for the group to move the node's sets and its lease
                // to lapse; short enough, at others, for neither. The leader's partition is
                // long enough for the majority side to elect a leader and move the sets.
                let cut = if log.is_empty() {
                    Duration::from_secs(25)
                } else {
                    Duration::from_millis(rng.random_range(1000..9000))
                };
                log.push(format!("partition node {n} from the others for {cut:?}"));
                let from = Instant::now();
                net.cut(n).unwrap();
                hold(cut).await;
                net.mend(n).unwrap();
                if log.len() == 1 {
                    leader_cut = (from, Instant::now());
                }
            }
            5 => {
                let full = Duration::from_millis(rng.random_range(1000..4000));
                let disk = nodes.lock().unwrap()[n].bricks()[0]
                    .parent()
                    .expect("the node's disk")
                    .to_path_buf();
                let filler = disk.join("filler");
                let f = filler.clone();
                let wrote = tokio::task::spawn_blocking(move || fill(&f)).await.unwrap();
                log.push(format!(
                    "fill node {n}'s disk ({} MiB) for {full:?}",
                    wrote >> 20
                ));
                hold(full).await;
                std::fs::remove_file(&filler).unwrap();
            }
            2 => {
                let bricks = nodes.lock().unwrap()[n].bricks().to_vec();
                let b = &bricks[rng.random_range(0..bricks.len())];
                if let Some(f) = flip_a_byte(b, &mut rng) {
                    log.push(format!("flip a byte in {}", f.display()));
                }
            }
            _ => {
                // Down long enough to leave its sets, back, and down again mid-heal.
                log.push(format!(
                    "kill -9 node {n}, restart, kill again during its heal"
                ));
                with(n, |b| b.sigkill().unwrap()).await;
                hold(Duration::from_secs(7)).await;
                with(n, |b| b.restart().unwrap()).await;
                hold(Duration::from_millis(rng.random_range(200..1500))).await;
                with(n, |b| b.sigkill().unwrap()).await;
                hold(Duration::from_secs(2)).await;
                with(n, |b| b.restart().unwrap()).await;
            }
        }
        // Let the cluster settle a moment before the next fault.
        hold(Duration::from_millis(rng.random_range(500..2500))).await;
    }
    (log, leader_cut)
}

#[test]
fn acknowledged_writes_survive_random_faults() {
    let net = Arc::new(
        TestNet::new(4).expect("test hosts in network namespaces (needs root and iproute2)"),
    );
    let on_host = net.clone();
    let run = std::thread::spawn(move || {
        // This thread, and the runtime's threads it starts, are on the client's test host.
        on_host.enter(CLIENT_HOST).unwrap();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap()
            .block_on(random_faults(on_host))
    })
    .join();
    if let Err(panic) = run {
        std::panic::resume_unwind(panic);
    }
}

async fn random_faults(net: Arc<TestNet>) {
    let seed: u64 = std::env::var("BRICKFS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let secs: u64 = std::env::var("BRICKFS_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("fault suite: BRICKFS_FAULT_SEED={seed} BRICKFS_FAULT_SECS={secs}");
    let c = must_cluster(&net).await;
    let mut files = Vec::new();
    for vname in ["r3", "d21"] {
        let vol = VolumeClient::open(c.meta.clone(), fault_client(), vname)
            .await
            .unwrap();
        vol.set_retry_window(Duration::from_secs(15));
        for i in 0..2 {
            let name = format!("f{i}");
            let fh = vol.create(ROOT, &name, 0o644, true).await.unwrap();
            files.push(File {
                vol: vol.clone(),
                fh: Arc::new(fh),
                name,
                model: Vec::new(),
            });
        }
    }
    let leader_addr = c.nodes.lock().unwrap()[0].addr();
    let leader_id = c.meta.status_of(leader_addr).await.unwrap().leader;
    let leader = c
        .ids
        .iter()
        .position(|id| Some(*id) == leader_id)
        .expect("a leader among the nodes");
    let until = Instant::now() + Duration::from_secs(secs);
    let injector = tokio::spawn(inject(c.nodes.clone(), net.clone(), leader, seed, until));

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r3_files: Vec<File> = files.drain(..2).collect();
    let d21_files: Vec<File> = std::mem::take(&mut files);
    // A third of the way in: grow the replica volume and rebalance it under the faults.
    let grow = {
        let meta = c.meta.clone();
        let bricks: Vec<String> = c
            .nodes
            .lock()
            .unwrap()
            .iter()
            .map(|n| format!("{}:{}", n.addr(), n.bricks()[2].display()))
            .collect();
        tokio::spawn(async move {
            hold(Duration::from_secs(secs / 3)).await;
            // A retry whose first try took effect is refused as done already.
            let done_already = |e: brickfs_client::MetaError| match e.code() {
                Some(brickfs_proto::ErrorCode::Exists) => Ok(()),
                _ => Err(e.to_string()),
            };
            until_acked("add-brick", || {
                let op = MetaOp::AddBricks {
                    name: "r3".into(),
                    bricks: bricks.clone(),
                };
                let meta = meta.clone();
                async move { meta.write(op).await.map(|_| ()).or_else(done_already) }
            })
            .await;
            until_acked("rebalance start", || {
                let meta = meta.clone();
                async move {
                    meta.write(MetaOp::RebalanceStart { name: "r3".into() })
                        .await
                        .map(|_| ())
                        .or_else(done_already)
                }
            })
            .await;
            eprintln!("fault suite: r3 grew by a group; rebalancing");
        })
    };
    let r3 = tokio::spawn(workload(r3_files, seed, until, done.clone()));
    let d21 = tokio::spawn(workload(d21_files, seed ^ 0xD21, until, done.clone()));
    let (log, cut) = injector.await.unwrap();
    grow.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (r3_files, ops3, reads3, acks) = r3.await.unwrap();
    let (d21_files, ops21, reads21, _) = d21.await.unwrap();
    let (ops, reads) = (ops3 + ops21, reads3 + reads21);
    let files: Vec<File> = r3_files.into_iter().chain(d21_files).collect();
    eprintln!("fault suite: {ops} operations, {reads} checked reads, faults: {log:#?}");
    // While the leader and primary was cut off, the replica volume kept taking writes (through
    // a new primary, once the group on the majority side had moved the set).
    let (from, to) = cut;
    let during: Vec<_> = acks
        .iter()
        .filter(|t| **t > from + Duration::from_secs(1) && **t < to)
        .collect();
    let first = during
        .first()
        .map(|t| t.duration_since(from))
        .unwrap_or_default();
    eprintln!(
        "fault suite: {} replica writes acknowledged while the leader was cut off, the first {first:?} after the cut",
        during.len()
    );
    assert!(
        !during.is_empty(),
        "seed {seed}: no write acknowledged while the leader and primary were cut off"
    );

    // Faults over: every node is up; wait until every member of every set is in sync again.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let mut all = true;
        for vname in ["r3", "d21"] {
            let v = admin::volume_info(&c.meta, vname).await.unwrap();
            all &= v.sets.iter().all(|s| s.in_sync.len() == s.members.len());
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the sets never healed"
        );
        tick.tick().await;
    }
    // The rebalance finishes once everything is up, and leaves no move behind.
    let r3 = admin::volume_info(&c.meta, "r3").await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (moved, passes) = loop {
        let v = admin::volume_info(&c.meta, "r3").await.unwrap();
        let r = v.rebalance.expect("a rebalance was started");
        let moves = c
            .meta
            .read(MetaRead::Moves { volume: r3.id })
            .await
            .unwrap();
        let idle = matches!(&moves, MetaReply::Moves { moving, abandoned, dropping } if moving.is_empty() && abandoned.is_empty() && dropping.is_empty());
        if r.state == brickfs_proto::meta::RebalanceState::Done && idle {
            break (r.progress.moved, r.progress.pass);
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(120),
            "seed {seed}: the rebalance never finished: {r:?} {moves:?}"
        );
        tick.tick().await;
    };
    eprintln!(
        "fault suite: the rebalance moved {moved} files in {} passes",
        passes + 1
    );
    // Sizes reach the metadata group at fsync or close: close every file.
    for f in &files {
        let (vol, fh) = (f.vol.clone(), f.fh.clone());
        until_acked("close", || {
            let (vol, fh) = (vol.clone(), fh.clone());
            async move { vol.commit_size(&fh).await.map_err(|e| e.to_string()) }
        })
        .await;
    }
    // Every file reads back as acknowledged, under its last name, from a fresh client.
    for f in &files {
        let vol = VolumeClient::open(c.meta.clone(), fault_client(), &f.vol.record().name)
            .await
            .unwrap();
        let fh = vol.open_file(ROOT, &f.name).await.unwrap();
        assert_eq!(
            fh.attr.size_bytes,
            f.model.len() as u64,
            "seed {seed}: {}",
            f.name
        );
        let got = vol.read(&fh, 0, f.model.len() as u64).await.unwrap();
        assert!(
            got == f.model[..],
            "seed {seed}: {} differs from what was acknowledged",
            f.name
        );
        must_have_identical_copies(&vol).await;
    }
}

/// One volume's share of the workload: random operations on `files` until the faults are over,
/// each retried until acknowledged; returns the files with their models, the operation and
/// checked-read counts, and when each write was acknowledged.
async fn workload(
    mut files: Vec<File>,
    seed: u64,
    until: Instant,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<File>, u64, u64, Vec<Instant>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut ops, mut reads) = (0u64, 0u64);
    let mut acks = Vec::new();
    while Instant::now() < until || !done.load(std::sync::atomic::Ordering::SeqCst) {
        let at = rng.random_range(0..files.len());
        let f = &mut files[at];
        let (vol, fh) = (f.vol.clone(), f.fh.clone());
        match rng.random_range(0..100u32) {
            0..60 => {
                let len = rng.random_range(1..200_000usize);
                let off = rng.random_range(0..(f.model.len() as u64 + 100_000));
                let data = pattern(rng.random(), off, len);
                until_acked("write", || {
                    let (vol, fh, data) = (vol.clone(), fh.clone(), data.clone());
                    async move { vol.write(&fh, off, data).await.map_err(|e| e.to_string()) }
                })
                .await;
                let end = off as usize + len;
                if f.model.len() < end {
                    f.model.resize(end, 0);
                }
                f.model[off as usize..end].copy_from_slice(&data);
                acks.push(Instant::now());
            }
            60..68 => {
                let len = rng.random_range(0..(f.model.len() as u64 + 50_000));
                until_acked("truncate", || {
                    let (vol, fh) = (vol.clone(), fh.clone());
                    async move { vol.truncate(&fh, len).await.map_err(|e| e.to_string()) }
                })
                .await;
                f.model.resize(len as usize, 0);
            }
            68..76 => {
                until_acked("fsync", || {
                    let (vol, fh) = (vol.clone(), fh.clone());
                    async move { vol.fsync(&fh).await.map_err(|e| e.to_string()) }
                })
                .await;
            }
            76..82 => {
                let new = if f.name.ends_with("-r") {
                    f.name.trim_end_matches("-r").to_string()
                } else {
                    format!("{}-r", f.name)
                };
                let volume = vol.record().id;
                let (old, new2) = (f.name.clone(), new.clone());
                until_acked("rename", || {
                    let (vol, old, new) = (vol.clone(), old.clone(), new2.clone());
                    async move {
                        let op = MetaOp::Rename {
                            volume,
                            parent: ROOT,
                            name: old.clone(),
                            new_parent: ROOT,
                            new_name: new.clone(),
                            flags: Default::default(),
                        };
                        match vol.meta().write(op).await {
                            Ok(_) => Ok(()),
                            // A retried rename that had landed: the new name is there.
                            Err(e) => {
                                let lookup = MetaRead::Lookup {
                                    volume,
                                    parent: ROOT,
                                    name: new,
                                };
                                match vol.meta().read(lookup).await {
                                    Ok(MetaReply::Attr(_)) => Ok(()),
                                    _ => Err(e.to_string()),
                                }
                            }
                        }
                    }
                })
                .await;
                f.name = new;
            }
            _ => {
                // A read returns exactly what was acknowledged, or an error: never other bytes.
                let size = f.model.len() as u64;
                if let Ok(got) = vol.read(&fh, 0, size).await {
                    reads += 1;
                    assert!(
                        got == f.model[..],
                        "seed {seed}: {} of {} read {} bytes that differ from the {} acknowledged",
                        f.name,
                        vol.record().name,
                        got.len(),
                        f.model.len()
                    );
                }
            }
        }
        ops += 1;
    }
    (files, ops, reads, acks)
}

/// No two copies differ: every replica of every object holds the same version and bytes;
/// every fragment of a disperse object the same version, and every K of them decode alike.
async fn must_have_identical_copies(vol: &VolumeClient) {
    let rec = vol.record();
    let bc = client();
    let sets = vol.sets();
    for set in sets.iter() {
        let addr = |b| node_addr(rec, b);
        let mut listings = Vec::new();
        for b in &set.members {
            let (objs, more) = bc.list(addr(*b), *b, None, 10_000).await.unwrap();
            assert!(!more);
            listings.push(
                objs.into_iter()
                    .map(|o| (o.key, o.state.version, o.state.tag))
                    .collect::<Vec<_>>(),
            );
        }
        for l in &listings[1..] {
            assert_eq!(
                l, &listings[0],
                "members list different objects or versions"
            );
        }
        for (key, _, _) in &listings[0] {
            let mut frags = Vec::new();
            for b in &set.members {
                let (st, bytes) = must_read_object(&bc, addr(*b), *b, *key).await;
                frags.push(((st.version.0, st.tag), bytes));
            }
            if rec.disperse_data == 0 {
                for f in &frags[1..] {
                    assert!(f == &frags[0], "replicas of {key} differ");
                }
            } else {
                let (k, m) = (rec.disperse_data as usize, rec.disperse_redundancy as usize);
                let codec = brickfs_erasure::ReedSolomonCodec::new(k, m).unwrap();
                let f = brickfs_layout::DISPERSE_FRAGMENT_BYTES as usize;
                let stripes = frags[0].1.len().div_ceil(f);
                let mut decoded = None;
                for missing in 0..frags.len() {
                    let some: Vec<_> = frags
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (i != missing).then(|| x.clone()))
                        .collect();
                    let d = brickfs_erasure::decode_stripes(&codec, &some, f, stripes).unwrap();
                    if let Some(prev) = &decoded {
                        assert!(prev == &d, "fragments of {key} decode differently");
                    }
                    decoded = Some(d);
                }
            }
        }
    }
}
