//! Sets under faults with real processes: six brickd nodes on loopback (node 0 runs the
//! metadata group; down-after 5 s, write leases 3 s) serve a dispersed 4+2 volume (`d42`, one
//! brick on every node) and a replica-3 volume (`r3`, on nodes 3, 4 and 5, off the metadata
//! node). Each test starts its own cluster:
//!
//! - a 256 MiB file is written in 4 MiB pieces to each volume while one member's node is
//!   killed (SIGKILL) a quarter of the way in and restarted half way; after the heal every
//!   byte reads back as acknowledged;
//! - three of the six members of the 4+2 set are killed during an overwrite: after they are
//!   back and healed, the file holds what was acknowledged before, and the overwrite's bytes
//!   only if it was acknowledged (never a mix, never an unreadable file);
//! - a reader with a view of the set it never refreshes (a read-only mount) reads in a loop
//!   while a writer rewrites the file, a member's node is stopped (SIGSTOP) past the
//!   down-after time and resumed, and a member is replaced by a spare brick: no read returns
//!   bytes older than what was acknowledged before it started.

mod common;

use brickfs_client::{FileHandle, MetaClient, MetaClientOptions, VolumeClient, admin};
use brickfs_proto::Ino;
use brickfs_proto::meta::{AdminOp, MetaOp};
use brickfs_testkit::Brickd;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ROOT: Ino = Ino(1);
const MIB: u64 = 1 << 20;

struct Six {
    nodes: Vec<Brickd>,
    meta: MetaClient,
    _dir: tempfile::TempDir,
}

impl Six {
    /// Brick `i` of node `n` as a spec word.
    fn brick(&self, n: usize, i: usize) -> String {
        format!(
            "{}:{}",
            self.nodes[n].addr(),
            self.nodes[n].bricks()[i].display()
        )
    }

    async fn open(&self, name: &str) -> Arc<VolumeClient> {
        VolumeClient::open(self.meta.clone(), client(), name)
            .await
            .unwrap()
    }
}

/// Six nodes with three bricks each (b0: `d42`, b1: `r3` on nodes 3–5, b2: spares).
async fn must_six() -> Six {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Brickd> = Vec::new();
    for n in 0..6 {
        let node_dir = dir.path().join(format!("n{n}"));
        let bricks: Vec<_> = (0..3).map(|i| node_dir.join(format!("b{i}"))).collect();
        let mut args: Vec<String> = ["--write-lease-ms", "3000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match nodes.first() {
            None => args.extend(["--meta", "--meta-down-after-secs", "5"].map(String::from)),
            Some(first) => args.extend(["--meta-peers".to_string(), first.addr().to_string()]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes.push(Brickd::start(&brickd_bin(), &node_dir, &bricks, &args).unwrap());
    }
    let meta = MetaClient::new(vec![nodes[0].addr()], MetaClientOptions::default());
    meta.admin(AdminOp::Init).await.unwrap();
    for n in &nodes {
        admin::peer_add(&meta, &client(), n.addr()).await.unwrap();
    }
    for n in &nodes {
        must_serve_reads(n.addr()).await;
    }
    let six = Six {
        nodes,
        meta,
        _dir: dir,
    };
    for (name, head, bricks) in [
        (
            "d42",
            "disperse 6 redundancy 2",
            (0..6).map(|n| (n, 0)).collect::<Vec<_>>(),
        ),
        ("r3", "replica 3", vec![(3, 1), (4, 1), (5, 1)]),
    ] {
        let mut spec: Vec<String> = head.split_whitespace().map(String::from).collect();
        spec.extend(bricks.iter().map(|(n, i)| six.brick(*n, *i)));
        admin::volume_create(&six.meta, name, &spec).await.unwrap();
        six.meta
            .write(MetaOp::StartVolume { name: name.into() })
            .await
            .unwrap();
    }
    six
}

/// Retries an idempotent operation until it is acknowledged (bounded: 180 s).
async fn until_ok<T, E: std::fmt::Display, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
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

/// Waits until every member of every set of `vol` is in sync again (heals done).
async fn must_heal(vol: &VolumeClient) {
    must_wait_for(
        "every member back in sync",
        Duration::from_secs(300),
        || async {
            vol.refresh().await.ok()?;
            vol.sets()
                .iter()
                .all(|s| s.in_sync.len() == s.members.len() && s.draining.is_none())
                .then_some(())
        },
    )
    .await;
}

/// Reads `len` bytes of `fh` back in 8 MiB pieces and compares them with `expect(offset,
/// len)`.
async fn must_read_back(
    vol: &VolumeClient,
    fh: &FileHandle,
    len: u64,
    expect: impl Fn(u64, usize) -> Vec<u8>,
) {
    let mut off = 0;
    while off < len {
        let n = (8 * MIB).min(len - off);
        let got = until_ok("a read", || vol.read(fh, off, n)).await;
        assert!(
            got[..] == expect(off, n as usize)[..],
            "{}: the {n} bytes at {off} differ from what was acknowledged",
            vol.record().name
        );
        off += n;
    }
}

/// 256 MiB to a replica-3 and a dispersed 4+2 volume, in 4 MiB pieces, with a member's
/// node killed a quarter of the way in and restarted half way (it rejoins through a full heal
/// of objects far larger than one frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_file_survives_a_member_killed_and_restarted_mid_write() {
    let mut six = must_six().await;
    for (name, victim, seed) in [("r3", 4, 1), ("d42", 2, 2)] {
        let vol = six.open(name).await;
        let fh = vol.create(ROOT, "big", 0o644, true).await.unwrap();
        let (piece, pieces) = (4 * MIB, 64);
        for i in 0..pieces {
            if i == pieces / 4 {
                six.nodes[victim].sigkill().unwrap();
            }
            if i == pieces / 2 {
                six.nodes[victim].restart().unwrap();
            }
            let off = i * piece;
            let data = pattern(seed, off, piece as usize);
            until_ok("a 4 MiB write", || vol.write(&fh, off, data.clone())).await;
        }
        until_ok("fsync", || vol.fsync(&fh)).await;
        must_heal(&vol).await;
        must_read_back(&vol, &fh, piece * pieces, |o, n| {
            pattern(seed, o, n).to_vec()
        })
        .await;
        eprintln!("{name}: 256 MiB read back after a member was killed and restarted mid-write");
    }
}

/// Three of the six members of a 4+2 set (more than its redundancy) are killed while an
/// overwrite runs. Once they are back and healed, the file reads back: what was acknowledged
/// before, and the overwrite's 4 MiB only if it was acknowledged — all of it or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_of_six_members_killed_during_an_overwrite_lose_nothing_acknowledged() {
    let mut six = must_six().await;
    let vol = six.open("d42").await;
    let fh = Arc::new(vol.create(ROOT, "g", 0o644, true).await.unwrap());
    let len = 16 * MIB;
    let old = pattern(1, 0, len as usize);
    until_ok("the first write", || vol.write(&fh, 0, old.clone())).await;
    until_ok("fsync", || vol.fsync(&fh)).await;
    let (at, n) = (4 * MIB, 4 * MIB as usize);
    let new = pattern(2, at, n);
    let overwrite = {
        let (vol, fh, new) = (vol.clone(), fh.clone(), new.clone());
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), vol.write(&fh, at, new)).await
        })
    };
    for v in [3, 4, 5] {
        six.nodes[v].sigkill().unwrap();
    }
    let acked = matches!(overwrite.await.unwrap(), Ok(Ok(_)));
    for v in [3, 4, 5] {
        six.nodes[v].restart().unwrap();
    }
    must_heal(&vol).await;
    let got = until_ok("the read back", || vol.read(&fh, 0, len)).await;
    assert_eq!(got.len() as u64, len);
    let (a, b) = (at as usize, at as usize + n);
    assert!(
        got[..a] == old[..a] && got[b..] == old[b..],
        "bytes outside the overwrite changed"
    );
    let region = &got[a..b];
    if acked {
        assert!(region == &new[..], "the acknowledged overwrite was lost");
    } else {
        assert!(
            region == &old[a..b] || region == &new[..],
            "a failed overwrite left a mix of old and new bytes"
        );
    }
    eprintln!("overwrite acknowledged: {acked}; the file reads back whole");
}

/// The bytes of version `seq` of the reader test's file: its number, then a pattern.
fn version_bytes(seq: u64) -> Vec<u8> {
    let mut v = pattern(seq, 0, 64 << 10).to_vec();
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v
}

/// A reader with a view of the set it never refreshes reads while a writer rewrites the file
/// and the set changes under it: a member's node stopped past the down-after time and
/// resumed, then a member replaced by a spare. Every read returns exactly one version, at
/// least as new as the last one acknowledged before the read started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_with_an_old_view_never_reads_old_bytes_as_members_come_and_go() {
    let six = must_six().await;
    let writer = six.open("r3").await;
    let fh = writer.create(ROOT, "h", 0o644, true).await.unwrap();
    writer.write(&fh, 0, version_bytes(1).into()).await.unwrap();
    let acked = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stale = six.open("r3").await;
        let sfh = FileHandle::in_group(&fh.attr, fh.group(), 64 << 10);
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut reads, mut errors) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let before = acked.load(Ordering::SeqCst);
                match stale.read(&sfh, 0, 64 << 10).await {
                    Ok(got) => {
                        let seq = u64::from_le_bytes(got[..8].try_into().unwrap());
                        assert!(
                            seq >= before,
                            "read version {seq} after version {before} was acknowledged"
                        );
                        assert!(
                            got[..] == version_bytes(seq)[..],
                            "version {seq} is not whole"
                        );
                        reads += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            (reads, errors)
        })
    };
    let writing = {
        let (acked, stop, writer) = (acked.clone(), stop.clone(), writer.clone());
        tokio::spawn(async move {
            let mut seq = 1;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let data = version_bytes(seq);
                until_ok("a rewrite", || writer.write(&fh, 0, data.clone().into())).await;
                acked.store(seq, Ordering::SeqCst);
            }
            seq
        })
    };
    // A member's node stopped past the down-after time (it leaves the set), then resumed (it
    // heals and rejoins).
    six.nodes[4].sigstop().unwrap();
    must_wait_for("node 4 out of the set", Duration::from_secs(30), || async {
        writer.refresh().await.ok()?;
        (writer.sets()[0].in_sync.len() == 2).then_some(())
    })
    .await;
    six.nodes[4].sigcont().unwrap();
    must_heal(&writer).await;
    // A live member replaced by a spare brick.
    let meta_addr = six.nodes[0].addr().to_string();
    let (old, new) = (six.brick(5, 1), six.brick(5, 2));
    let out = brickfs(&[
        "--meta",
        meta_addr.as_str(),
        "volume",
        "replace-brick",
        "r3",
        &old,
        &new,
        "commit",
        "force",
    ]);
    assert_eq!(out.0, 0, "{out:?}");
    must_heal(&writer).await;
    stop.store(true, Ordering::Relaxed);
    let versions = writing.await.unwrap();
    let (reads, errors) = reader.await.unwrap();
    eprintln!("{versions} versions written, {reads} reads checked, {errors} failed reads");
    assert!(
        reads > 100,
        "the reader got few reads through: {reads} ({errors} failed)"
    );
}
