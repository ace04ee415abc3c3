//! Volumes end to end through the client library on real brickd processes: for each volume
//! type whose data path exists (every type but the dispersed ones), random writes, reads and
//! truncates around stripe-unit boundaries, sparse files and two concurrent writers of one file
//! are compared byte for byte with an in-memory model; after fsync a fresh client sees the same
//! bytes; and the members of every replica set hold identical copies with identical versions.

mod common;

use brickfs_client::admin;
use brickfs_client::{MetaClient, MetaClientOptions, VolumeClient};
use brickfs_proto::meta::{AdminOp, MetaOp, MetaRead, MetaReply};
use brickfs_proto::msg::{SetRef, SetWrite};
use brickfs_proto::{ErrorCode, Ino, Message, ObjectKey};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use common::*;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

const ROOT: Ino = Ino(1);
const UNIT: u64 = 16 << 10;

async fn must_volume(
    c: &Cluster,
    name: &str,
    head: &str,
    bricks: &[(usize, usize)],
) -> Arc<VolumeClient> {
    must_volume_with_unit(c, name, head, bricks, UNIT).await
}

fn apply(model: &mut Vec<u8>, off: usize, data: &[u8]) {
    if model.len() < off + data.len() {
        model.resize(off + data.len(), 0);
    }
    model[off..off + data.len()].copy_from_slice(data);
}

/// The random workload against one volume; returns the model of every file.
async fn must_match_model(vol: &VolumeClient, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files = Vec::new();
    let mut models = Vec::new();
    for f in 0..3 {
        files.push(
            vol.create(ROOT, &format!("f{f}"), 0o644, true)
                .await
                .unwrap(),
        );
        models.push(Vec::<u8>::new());
    }
    for step in 0..60 {
        let f = rng.random_range(0..files.len());
        let (fh, model) = (&files[f], &mut models[f]);
        match rng.random_range(0..10) {
            0..=5 => {
                // Offsets and lengths near unit boundaries, and far past the end (sparse).
                let off = match rng.random_range(0..3) {
                    0 => (rng.random_range(0..8) * UNIT + rng.random_range(0..3)).saturating_sub(1),
                    1 => rng.random_range(0..300_000),
                    _ => rng.random_range(600_000..900_000),
                }
                .min(1 << 20) as usize;
                let len = match rng.random_range(0..3) {
                    0 => (rng.random_range(1..4) * UNIT) as usize,
                    1 => rng.random_range(1..3000),
                    _ => rng.random_range(1..100_000),
                };
                let data = pattern(seed * 1000 + step, off as u64, len);
                vol.write(fh, off as u64, data.clone()).await.unwrap();
                apply(model, off, &data);
            }
            6 => {
                let len = rng.random_range(0..model.len() as u64 + 50_000);
                vol.truncate(fh, len).await.unwrap();
                model.resize(len as usize, 0);
            }
            _ => {
                let off = rng.random_range(0..model.len() as u64 + 10);
                let len = rng.random_range(0..200_000u64);
                let got = vol.read(fh, off, len).await.unwrap();
                let s = (off as usize).min(model.len());
                let e = ((off + len) as usize).min(model.len());
                assert!(
                    got[..] == model[s..e],
                    "file {f} step {step}: read {off}+{len} differs"
                );
            }
        }
    }
    // Two writers of one file at once, on interleaved units.
    let fh = &files[0];
    let a = pattern(seed + 77, 0, 8 * UNIT as usize);
    let b = pattern(seed + 78, 8 * UNIT, 8 * UNIT as usize);
    let (ra, rb) = tokio::join!(
        vol.write(fh, 0, a.clone()),
        vol.write(fh, 8 * UNIT, b.clone())
    );
    ra.unwrap();
    rb.unwrap();
    apply(&mut models[0], 0, &a);
    apply(&mut models[0], 8 * UNIT as usize, &b);
    for (fh, model) in files.iter().zip(&models) {
        vol.fsync(fh).await.unwrap();
        let all = vol.read(fh, 0, model.len() as u64 + 100).await.unwrap();
        assert!(all[..] == model[..], "whole file differs");
    }
    // A fresh client (another session) sees the committed sizes and bytes.
    let other = VolumeClient::open(
        MetaClient::new(
            vec![vol.meta().leader().unwrap()],
            MetaClientOptions::default(),
        ),
        client(),
        &vol.record().name,
    )
    .await
    .unwrap();
    for (f, model) in models.iter().enumerate() {
        let fh = other.open_file(ROOT, &format!("f{f}")).await.unwrap();
        assert_eq!(fh.size(), model.len() as u64, "size of f{f}");
        let all = other.read(&fh, 0, model.len() as u64).await.unwrap();
        assert!(all[..] == model[..], "f{f} differs through a fresh client");
    }
}

/// Every member of every replica set holds the same objects with the same versions and bytes;
/// every member of a disperse set holds the same objects and versions, and any K decode alike.
async fn must_have_identical_replicas(vol: &VolumeClient) {
    let rec = vol.record();
    let addr_of = |b| node_addr(rec, b);
    let bc = client();
    for set in &rec.sets {
        let first = set.members[0];
        let (objects, _) = bc.list(addr_of(first), first, None, 10_000).await.unwrap();
        if rec.disperse_data > 0 {
            // Disperse members hold different fragments of the same objects at the same
            // versions, and any K of them decode to the same bytes.
            let (k, m) = (rec.disperse_data as usize, rec.disperse_redundancy as usize);
            let codec = brickfs_erasure::ReedSolomonCodec::new(k, m).unwrap();
            for other in &set.members[1..] {
                let (theirs, _) = bc
                    .list(addr_of(*other), *other, None, 10_000)
                    .await
                    .unwrap();
                assert_eq!(
                    objects, theirs,
                    "objects or versions of {first} and {other} differ"
                );
            }
            for o in &objects {
                let mut frags = Vec::new();
                for b in &set.members {
                    let (st, bytes) = must_read_object(&bc, addr_of(*b), *b, o.key).await;
                    frags.push(Some((st.version.0, bytes)));
                }
                let f = brickfs_layout::DISPERSE_FRAGMENT_BYTES as usize;
                let stripes = frags[0].as_ref().unwrap().1.len().div_ceil(f);
                let mut decoded = Vec::new();
                for lost in [
                    vec![],
                    (0..m).collect::<Vec<_>>(),
                    (k..k + m).collect(),
                    vec![0, k + m - 1],
                ] {
                    let mut subset = frags.clone();
                    for i in lost.iter().take(m) {
                        subset[*i] = None;
                    }
                    decoded.push(
                        brickfs_erasure::decode_stripes(&codec, &subset, f, stripes).unwrap(),
                    );
                }
                assert!(
                    decoded.windows(2).all(|w| w[0] == w[1]),
                    "subsets of {} decode differently",
                    o.key
                );
            }
            continue;
        }
        for other in &set.members[1..] {
            let (theirs, _) = bc
                .list(addr_of(*other), *other, None, 10_000)
                .await
                .unwrap();
            assert_eq!(
                objects, theirs,
                "object lists of {first} and {other} differ"
            );
            for o in &objects {
                let (_, a) = must_read_object(&bc, addr_of(first), first, o.key).await;
                let (_, b) = must_read_object(&bc, addr_of(*other), *other, o.key).await;
                assert!(a == b, "replicas of {} differ", o.key);
            }
        }
    }
}

macro_rules! volume_type_test {
    ($name:ident, $head:expr, $bricks:expr, $type_name:expr) => {
        /// The random workload and its model on this volume type.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let c = must_cluster().await;
            let vol = must_volume(&c, "v", $head, &$bricks).await;
            assert_eq!(vol.record().type_name, $type_name);
            let seed = stringify!($name).len() as u64;
            tokio::time::timeout(Duration::from_secs(120), must_match_model(&vol, seed))
                .await
                .unwrap();
            must_have_identical_replicas(&vol).await;
        }
    };
}

volume_type_test!(
    distributed_matches_model,
    "",
    [(0, 0), (1, 0), (2, 0)],
    "distributed"
);
volume_type_test!(
    replicated_matches_model,
    "replica 3",
    [(0, 0), (1, 0), (2, 0)],
    "replicated"
);
volume_type_test!(
    striped_matches_model,
    "stripe 3",
    [(0, 0), (1, 0), (2, 0)],
    "striped"
);
volume_type_test!(
    distributed_striped_matches_model,
    "stripe 2",
    [(0, 0), (1, 0), (2, 0), (0, 1)],
    "distributed-striped"
);
volume_type_test!(
    distributed_replicated_matches_model,
    "replica 2",
    [(0, 0), (1, 0), (2, 0), (0, 1)],
    "distributed-replicated"
);
volume_type_test!(
    striped_replicated_matches_model,
    "stripe 2 replica 2",
    [(0, 0), (1, 0), (2, 0), (0, 1)],
    "striped-replicated"
);
volume_type_test!(
    distributed_striped_replicated_matches_model,
    "stripe 2 replica 2",
    [
        (0, 0),
        (1, 0),
        (2, 0),
        (0, 1),
        (1, 1),
        (2, 1),
        (0, 2),
        (1, 2)
    ],
    "distributed-striped-replicated"
);

volume_type_test!(
    dispersed_matches_model,
    "disperse 6 redundancy 2",
    [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)],
    "dispersed"
);
volume_type_test!(
    distributed_dispersed_matches_model,
    "disperse 3",
    [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)],
    "distributed-dispersed"
);

/// What a workload saw: the acknowledged writes in order, and the one that failed (its
/// outcome unknown: it may or may not have been applied).
struct History {
    acked: Vec<(u64, Bytes)>,
    unknown: Option<(u64, Bytes)>,
}

/// A writer that records every acknowledged write (write and fsync both returned) until the
/// first failure, while the test kills bricks under it.
async fn acked_workload(
    vol: Arc<VolumeClient>,
    fh: Arc<brickfs_client::FileHandle>,
    seed: u64,
) -> History {
    let mut acked = Vec::new();
    for i in 0..400u64 {
        let off = (i * 37 % 64) * UNIT + i % 5;
        let data = pattern(seed + i, off, (UNIT + i * 97 % 3000) as usize);
        if vol.write(&fh, off, data.clone()).await.is_err() || vol.fsync(&fh).await.is_err() {
            return History {
                acked,
                unknown: Some((off, data)),
            };
        }
        acked.push((off, data));
    }
    History {
        acked,
        unknown: None,
    }
}

/// Checks bytes read back against the history: every byte equals what the acknowledged writes
/// left, except where the unknown write may have landed, which may hold either.
fn must_match_history(got: &[u8], h: &History) {
    let model = model_of(&h.acked);
    assert!(
        got.len() >= model.len(),
        "file shorter than its acknowledged writes"
    );
    for (i, b) in got.iter().enumerate() {
        let acked = model.get(i).copied().unwrap_or(0);
        let maybe = h.unknown.as_ref().and_then(|(off, data)| {
            let off = *off as usize;
            (off..off + data.len()).contains(&i).then(|| data[i - off])
        });
        assert!(
            *b == acked || Some(*b) == maybe,
            "byte {i} is {b}, acknowledged {acked}"
        );
    }
}

/// Replays acknowledged writes in order into a model.
fn model_of(acked: &[(u64, Bytes)]) -> Vec<u8> {
    let mut model = Vec::new();
    for (off, data) in acked {
        apply(&mut model, *off as usize, data);
    }
    model
}

/// kill -9 during a workload of the node holding M = 2 fragments of every stripe of a 4+2
/// volume: every acknowledged write reads back, rebuilt from the other four; with one more
/// node gone, reads fail with a clear error instead of returning wrong bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispersed_acked_writes_survive_m_lost_fragments() {
    let mut c = must_cluster().await;
    let vol = must_volume(
        &c,
        "d",
        "disperse 6 redundancy 2",
        &[(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)],
    )
    .await;
    let fh = Arc::new(vol.create(ROOT, "f", 0o644, true).await.unwrap());
    let writer = tokio::spawn(acked_workload(vol.clone(), fh.clone(), 50));
    must_wait_for("writes under way", Duration::from_secs(30), || async {
        (fh.size() > 20 * UNIT).then_some(())
    })
    .await;
    c.nodes[1].sigkill().unwrap();
    let h = writer.await.unwrap();
    assert!(
        !h.acked.is_empty() && h.unknown.is_some(),
        "the kill must land during the workload"
    );
    let got = match vol.read(&fh, 0, model_of(&h.acked).len() as u64).await {
        Ok(got) => got,
        Err(e) => {
            let rec = vol.record();
            let mut states = Vec::new();
            for b in &rec.bricks {
                let addr = brickfs_client::volume::brick_addr(b).unwrap();
                let key = brickfs_proto::ObjectKey {
                    volume: rec.id,
                    ino: fh.attr.ino,
                    column: 0,
                };
                states.push((
                    b.brick,
                    client()
                        .stat(addr, b.brick, key)
                        .await
                        .map_err(|e| e.to_string()),
                ));
            }
            panic!("{e}: sets {:?}, fragments {states:?}", vol.sets());
        }
    };
    must_match_history(&got, &h);
    c.nodes[2].sigkill().unwrap();
    // Reads retry within the window in case members come back: keep it short here.
    vol.set_retry_window(Duration::from_secs(2));
    let err = vol.read(&fh, 0, 1000).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Io), "{err}");
}

/// kill -9 of R-1 members of a replica 3 set during a workload: every acknowledged write reads
/// back from the survivor; writes stop with an error (until failure handling moves the set on)
/// and never leave wrong bytes in what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_acked_writes_survive_two_of_three_killed() {
    let mut c = must_cluster().await;
    let vol = must_volume(&c, "v", "replica 3", &[(0, 0), (1, 0), (2, 0)]).await;
    let fh = Arc::new(vol.create(ROOT, "f", 0o644, true).await.unwrap());
    let writer = tokio::spawn(acked_workload(vol.clone(), fh.clone(), 70));
    must_wait_for("writes under way", Duration::from_secs(30), || async {
        (fh.size() > 20 * UNIT).then_some(())
    })
    .await;
    // Node 0 runs the metadata group: kill the other two.
    c.nodes[1].sigkill().unwrap();
    c.nodes[2].sigkill().unwrap();
    let h = writer.await.unwrap();
    assert!(
        !h.acked.is_empty() && h.unknown.is_some(),
        "the kill must land during the workload"
    );
    for _ in 0..3 {
        let got = vol
            .read(&fh, 0, model_of(&h.acked).len() as u64)
            .await
            .unwrap();
        must_match_history(&got, &h);
    }
    // Beyond the tolerance: the last copy gone too, reads fail instead of inventing bytes.
    c.nodes[0].sigkill().unwrap();
    // Reads retry within the window in case members come back: keep it short here.
    vol.set_retry_window(Duration::from_secs(2));
    let err = vol.read(&fh, 0, 1000).await.unwrap_err();
    assert!(
        matches!(err, brickfs_client::VolumeError::Brick { .. }),
        "{err}"
    );
}

/// Deleting a file removes its objects from every brick that held them (the metadata
/// leader's node empties the GC queue), for a striped replicated and a dispersed volume;
/// files still linked keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_leave_no_objects_on_the_bricks() {
    let c = must_cluster().await;
    let vols = [
        must_volume(
            &c,
            "sr",
            "stripe 2 replica 2",
            &[(0, 0), (1, 0), (2, 0), (0, 1)],
        )
        .await,
        must_volume(
            &c,
            "dd",
            "disperse 3 redundancy 1",
            &[(0, 2), (1, 2), (2, 2)],
        )
        .await,
    ];
    let bc = client();
    for vol in &vols {
        let rec = vol.record().clone();
        let addr_of = |b| node_addr(&rec, b);
        let objects = || async {
            let mut all = Vec::new();
            for b in &rec.bricks {
                let (objs, _) = bc
                    .list(addr_of(b.brick), b.brick, None, 10_000)
                    .await
                    .unwrap();
                all.extend(objs.into_iter().map(|o| o.key));
            }
            all
        };
        let gone = vol.create(ROOT, "gone", 0o644, true).await.unwrap();
        let kept = vol.create(ROOT, "kept", 0o644, true).await.unwrap();
        for fh in [&gone, &kept] {
            vol.write(fh, 0, pattern(3, 0, 200_000)).await.unwrap();
            vol.fsync(fh).await.unwrap();
        }
        let before = objects().await;
        assert!(before.iter().any(|k| k.ino == gone.attr.ino), "{before:?}");
        vol.meta()
            .write(MetaOp::Unlink {
                volume: rec.id,
                parent: ROOT,
                name: "gone".into(),
            })
            .await
            .unwrap();
        must_wait_for(
            "the deleted file's objects to go",
            Duration::from_secs(60),
            || async {
                let now = objects().await;
                (!now.iter().any(|k| k.ino == gone.attr.ino)).then_some(now)
            },
        )
        .await;
        let after = objects().await;
        let kept_before = before.iter().filter(|k| k.ino == kept.attr.ino).count();
        assert!(kept_before > 0);
        assert_eq!(
            after.iter().filter(|k| k.ino == kept.attr.ino).count(),
            kept_before
        );
        let read = vol.read(&kept, 0, 200_000).await.unwrap();
        assert!(read == pattern(3, 0, 200_000));
        // The GC reports removals after removing them: the queue empties soon after.
        must_wait_for("the GC queue to empty", Duration::from_secs(30), || async {
            let gc = vol
                .meta()
                .read(MetaRead::ListGc {
                    volume: rec.id,
                    limit: 10,
                })
                .await
                .unwrap();
            (gc == MetaReply::Gc(vec![])).then_some(())
        })
        .await;
    }
}

/// Three nodes with three bricks each (node 0 runs the metadata group, which calls a node down
/// after 5 s of silence; nodes hold 3 s write leases), a replica-3 volume "r3" over the first bricks and a disperse 2+1
/// volume "d21" with quorum 2 over the second, each with an empty file "f"; the third bricks
/// are spares.
async fn must_failure_cluster() -> (
    tempfile::TempDir,
    Vec<Brickd>,
    Vec<(Arc<VolumeClient>, brickfs_client::FileHandle, Vec<u8>)>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Brickd> = Vec::new();
    for n in 0..3 {
        let node_dir = dir.path().join(format!("n{n}"));
        let bricks: Vec<_> = (0..3).map(|i| node_dir.join(format!("b{i}"))).collect();
        let extra: &[&str] = if n == 0 {
            &[
                "--scrub-interval-secs",
                "1",
                "--write-lease-ms",
                "3000",
                "--meta",
                "--meta-down-after-secs",
                "5",
            ]
        } else {
            &[
                "--scrub-interval-secs",
                "1",
                "--write-lease-ms",
                "3000",
                "--meta-peers",
            ]
        };
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if n > 0 {
            args.push(nodes[0usize].addr().to_string());
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
    let brick =
        |n: usize, i: usize| format!("{}:{}", nodes[n].addr(), nodes[n].bricks()[i].display());
    let mut vols = Vec::new();
    for (name, head, col, quorum) in [
        ("r3", "replica 3", 0, None),
        ("d21", "disperse 3 redundancy 1", 1, Some("2")),
    ] {
        let mut spec: Vec<String> = head.split_whitespace().map(String::from).collect();
        spec.extend((0..3).map(|n| brick(n, col)));
        admin::volume_create(&meta, name, &spec).await.unwrap();
        if let Some(q) = quorum {
            meta.write(MetaOp::SetVolumeOption {
                name: name.into(),
                key: "quorum".into(),
                value: q.into(),
            })
            .await
            .unwrap();
        }
        meta.write(MetaOp::StartVolume { name: name.into() })
            .await
            .unwrap();
        let vol = VolumeClient::open(meta.clone(), client(), name)
            .await
            .unwrap();
        let fh = vol.create(ROOT, "f", 0o644, true).await.unwrap();
        vols.push((vol, fh, Vec::<u8>::new()));
    }
    (dir, nodes, vols)
}

/// Failure detection and quorum: when a node stops, the metadata leader takes its bricks out
/// of their sets (new epoch, new primary if needed) within the configured time and writes go
/// on through the members left, for a replica-3 set and a disperse 2+1 set whose quorum is
/// set to 2; every acknowledged byte reads back; when a second node stops, the sets fall below
/// their quorum and writes fail with ReadOnly (EROFS) while reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_nodes_leave_their_sets_and_quorum_makes_sets_read_only() {
    let (_dir, mut nodes, mut vols) = must_failure_cluster().await;
    let mut seed = 0;
    let mut write =
        async |vol: &VolumeClient, fh: &brickfs_client::FileHandle, model: &mut Vec<u8>| {
            seed += 1;
            let off = model.len() as u64;
            let data = pattern(seed, off, 300_000);
            let r = vol.write(fh, off, data.clone()).await;
            if r.is_ok() {
                model.extend_from_slice(&data);
            }
            r
        };
    for (vol, fh, model) in &mut vols {
        write(vol, fh, model).await.unwrap();
    }

    // One node stops: its bricks leave the sets, and writes go on.
    nodes[2].sigkill().unwrap();
    for (vol, fh, model) in &mut vols {
        write(vol, fh, model)
            .await
            .expect("a write with one node down");
        let set = vol.sets()[0].clone();
        assert_eq!(set.in_sync.len(), 2, "{set:?}");
        assert!(set.epoch.0 >= 2, "{set:?}");
        vol.fsync(fh).await.unwrap();
        let got = vol.read(fh, 0, model.len() as u64).await.unwrap();
        assert!(
            got == *model,
            "{} reads back what was acknowledged",
            vol.record().name
        );
    }

    // A second node stops: below quorum, writes are refused as read-only; reads go on.
    nodes[1].sigkill().unwrap();
    for (vol, fh, model) in &mut vols {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let err = loop {
            match write(vol, fh, model).await {
                Ok(()) => assert!(std::time::Instant::now() < deadline, "writes never stopped"),
                Err(e) if e.code() == Some(ErrorCode::ReadOnly) => break e,
                Err(e) => {
                    // Before the detector acts, a failed fan-out may surface (the write was
                    // not acknowledged); afterwards only ReadOnly.
                    assert!(std::time::Instant::now() < deadline, "{e}");
                }
            }
        };
        assert!(err.to_string().contains("quorum"), "{err}");
        if vol.record().disperse_data == 0 {
            let got = vol.read(fh, 0, model.len() as u64).await.unwrap();
            assert!(got == *model, "reads go on below quorum");
            must_refuse_below_quorum_at_the_primary(vol).await;
        }
    }
}

/// A write sent straight to a replica set's primary (past the client's own quorum check)
/// at the set's current epoch, below its quorum, is refused there as well: the metadata
/// group's heartbeat answers tell the primary each set's quorum standing.
async fn must_refuse_below_quorum_at_the_primary(vol: &VolumeClient) {
    vol.refresh().await.unwrap();
    let rec = vol.record().clone();
    let sets = vol.sets();
    let (index, set) = sets
        .iter()
        .enumerate()
        .find(|(_, s)| !s.members.is_empty())
        .expect("a set");
    assert!(set.in_sync.len() < vol.quorum(), "{set:?}");
    let msg = Message::SetWrite(SetWrite {
        brick: set.primary,
        set: SetRef {
            volume: rec.id,
            set: index as u32,
            epoch: set.epoch,
        },
        key: ObjectKey {
            volume: rec.id,
            ino: Ino(1 << 40),
            column: 0,
        },
        offset_bytes: 0,
        sync: false,
        members: Vec::new(),
        degraded: true,
    });
    let addr = node_addr(&rec, set.primary);
    // The primary hears of the epoch with its next heartbeat answer.
    let refused = must_wait_for(
        "the primary to refuse a write below quorum",
        Duration::from_secs(20),
        || async {
            match client()
                .pool()
                .call(addr, msg.clone(), Bytes::from_static(b"below quorum"))
                .await
            {
                Err(e) if e.code() == Some(ErrorCode::ReadOnly) => Some(e.to_string()),
                _ => None,
            }
        },
    )
    .await;
    assert!(refused.contains("quorum"), "{refused}");
}

/// Self-heal: a node that was down while its sets took writes comes back; the metadata
/// leader's node heals its bricks (replica copies, disperse fragments rebuilt) while writes go
/// on, and lets them rejoin; the copies then agree, and with another node down the healed
/// bricks alone serve every acknowledged byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_heals_and_rejoins_while_writes_go_on() {
    let (_dir, mut nodes, mut vols) = must_failure_cluster().await;
    let mut seed = 100;
    let mut write =
        async |vol: &VolumeClient, fh: &brickfs_client::FileHandle, model: &mut Vec<u8>| {
            seed += 1;
            let off = (model.len() as u64).saturating_sub(50_000);
            let data = pattern(seed, off, 400_000);
            vol.write(fh, off, data.clone()).await.expect("write");
            apply(model, off as usize, &data);
        };
    for (vol, fh, model) in &mut vols {
        write(vol, fh, model).await;
    }
    nodes[2].sigkill().unwrap();
    for _ in 0..3 {
        for (vol, fh, model) in &mut vols {
            write(vol, fh, model).await;
        }
    }
    for (vol, _, _) in &vols {
        assert_eq!(vol.sets()[0].in_sync.len(), 2);
    }
    // The CLI shows the members out of sync, and what they lack.
    let meta_addr = nodes[0].addr().to_string();
    let cli = |args: &[&str]| must_ok(&[&["--meta", meta_addr.as_str()], args].concat());
    let info = cli(&["volume", "heal", "r3", "info"]);
    assert!(info.contains("1 member(s) out of sync"), "{info}");
    assert!(info.contains("needs heal"), "{info}");
    let stats = cli(&["--json", "volume", "heal", "r3", "statistics"]);
    let rows: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let backlog: u64 = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["in_sync"] == false)
        .map(|r| r["backlog_objects"].as_u64().unwrap())
        .sum();
    assert!(backlog >= 1, "{stats}");
    // So does `volume status`: every brick's state, whether its node answers, its backlog.
    let status = cli(&["--json", "volume", "status", "r3"]);
    let rows: serde_json::Value = serde_json::from_str(&status).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{status}");
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(
        states.iter().filter(|s| **s == "primary").count(),
        1,
        "{status}"
    );
    let away: Vec<_> = rows.iter().filter(|r| r["state"] == "needs heal").collect();
    assert_eq!(away.len(), 1, "{status}");
    assert_eq!(away[0]["online"], false, "{status}");
    assert!(
        away[0]["heal_backlog_objects"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(cli(&["volume", "status", "r3"]).contains("needs heal"));

    nodes[2].restart().unwrap();
    // Writes go on while the heal runs; it finishes with every member in sync.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        for (vol, fh, model) in &mut vols {
            write(vol, fh, model).await;
        }
        let mut healed = true;
        for (vol, _, _) in &vols {
            vol.refresh().await.unwrap();
            healed &= vol.sets()[0].in_sync.len() == 3;
        }
        if healed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the returning node's bricks never healed"
        );
        tick.tick().await;
    }
    for (vol, fh, model) in &mut vols {
        write(vol, fh, model).await;
        vol.fsync(fh).await.unwrap();
        must_have_identical_replicas(vol).await;
    }
    let info = cli(&["volume", "heal", "d21", "info"]);
    assert!(info.contains("0 member(s) out of sync"), "{info}");
    let full = cli(&["volume", "heal", "r3", "full"]);
    assert!(full.contains("every member is in sync"), "{full}");
    let status = cli(&["--json", "volume", "status", "r3"]);
    let rows: serde_json::Value = serde_json::from_str(&status).unwrap();
    for r in rows.as_array().unwrap() {
        assert!(
            r["state"] == "primary" || r["state"] == "in sync",
            "{status}"
        );
        assert_eq!(
            (r["online"].as_bool(), r["heal_backlog_objects"].as_u64()),
            (Some(true), Some(0)),
            "{status}"
        );
    }
    // Node 1 goes: what node 2 holds now (healed) serves every acknowledged byte.
    nodes[1].sigkill().unwrap();
    for (vol, fh, model) in &vols {
        let got = vol.read(fh, 0, model.len() as u64).await;
        let got = match got {
            Ok(b) => b,
            Err(_) => {
                // The read may race the detector: once node 1 is out of the sets, it works.
                must_wait_for("reads without node 1", Duration::from_secs(30), || async {
                    vol.refresh().await.ok()?;
                    vol.read(fh, 0, model.len() as u64).await.ok()
                })
                .await
            }
        };
        assert!(
            got == *model,
            "{}: the healed copies differ from what was acknowledged",
            vol.record().name
        );
    }
}

/// Bitrot: a byte flipped on disk in one replica's object is found by that node's scrubber,
/// reported (the brick leaves the in-sync members), quarantined and healed from the good
/// copies; reads never return the damaged byte; `brickfs volume bitrot VOL status` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_flipped_bytes_and_the_set_heals_them() {
    let (_dir, nodes, mut vols) = must_failure_cluster().await;
    let (vol, fh, model) = &mut vols[0];
    let data = pattern(77, 0, 700_000);
    vol.write(fh, 0, data.clone()).await.unwrap();
    vol.fsync(fh).await.unwrap();
    model.extend_from_slice(&data);
    let objects = nodes[1].bricks()[0].join("objects");
    let file = find_object_file(&objects, &format!("{:016x}-{:08x}", fh.attr.ino.0, 0))
        .expect("the replica's object file");
    let mut raw = std::fs::read(&file).unwrap();
    raw[123_456] ^= 0x01;
    std::fs::write(&file, &raw).unwrap();
    // Reads never return the flipped byte, whichever member serves them.
    for _ in 0..6 {
        let got = vol.read(fh, 0, model.len() as u64).await.unwrap();
        assert!(got == *model);
    }
    let meta_addr = nodes[0].addr().to_string();
    let status = || {
        let out = must_ok(&[
            "--meta", &meta_addr, "--json", "volume", "bitrot", "r3", "status",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let damaged_brick = nodes[1].bricks()[0].display().to_string();
    must_wait_for(
        "the scrubber to find the damage",
        Duration::from_secs(60),
        || async {
            let rows = status();
            rows.as_array()?
                .iter()
                .find(|r| {
                    r["brick"]
                        .as_str()
                        .is_some_and(|b| b.ends_with(&damaged_brick))
                })
                .filter(|r| r["damaged_found"].as_u64() >= Some(1))
                .cloned()
        },
    )
    .await;
    must_wait_for(
        "the damaged replica to heal",
        Duration::from_secs(60),
        || async {
            vol.refresh().await.ok()?;
            let set = vol.sets()[0].clone();
            (set.in_sync.len() == 3 && set.epoch.0 >= 3).then_some(())
        },
    )
    .await;
    assert!(
        nodes[1].bricks()[0]
            .join("quarantine")
            .read_dir()
            .unwrap()
            .count()
            >= 1
    );
    must_have_identical_replicas(vol).await;
    let healed = std::fs::read(&file).unwrap();
    assert!(
        healed == model[..],
        "the healed replica holds the good bytes"
    );
}

/// replace-brick: a replica's brick is replaced by a spare (a new disk at a new path); the new
/// brick joins out of sync, heals from the others while writes go on, and rejoins; the copies
/// then agree and the old brick is out of the volume. Bad input is refused clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_brick_heals_the_new_brick_from_its_set() {
    let (_dir, nodes, mut vols) = must_failure_cluster().await;
    let (vol, fh, model) = &mut vols[0];
    let data = pattern(31, 0, 900_000);
    vol.write(fh, 0, data.clone()).await.unwrap();
    vol.fsync(fh).await.unwrap();
    model.extend_from_slice(&data);
    let brick =
        |n: usize, i: usize| format!("{}:{}", nodes[n].addr(), nodes[n].bricks()[i].display());
    let meta_addr = nodes[0].addr().to_string();
    let cli = |args: &[&str]| {
        brickfs(
            &[
                &["--meta", meta_addr.as_str(), "volume", "replace-brick"],
                args,
            ]
            .concat(),
        )
    };
    let (old, new) = (brick(1, 0), brick(1, 2));
    // Without `commit force`, with an unknown brick, with a brick already in a volume.
    assert_eq!(cli(&["r3", &old, &new]).0, 2);
    let out = cli(&[
        "r3",
        &old,
        &format!("{}:/nowhere", nodes[1].addr()),
        "commit",
        "force",
    ]);
    assert!(out.2.contains("serves no brick"), "{out:?}");
    let out = cli(&["r3", &old, &brick(1, 1), "commit", "force"]);
    assert!(out.2.contains("already in volume"), "{out:?}");

    // A reader whose view of the set is from before the replace (it never re-reads it).
    let stale = VolumeClient::open(vol.meta().clone(), client(), "r3")
        .await
        .unwrap();
    let out = cli(&["r3", &old, &new, "commit", "force"]);
    assert_eq!(out.0, 0, "{}", out.2);
    assert!(out.2.contains("serves no more reads"), "{out:?}");
    // New bytes right after the replace: the replaced brick, out of the set now, still
    // holds the old ones, and never serves them to the reader with the old view (before the
    // replacement drained the old brick's readers first, its node served them until its
    // next heartbeat).
    // The writer knows the set as it is now: its write skips the replaced brick.
    vol.refresh().await.unwrap();
    let data = pattern(32, 0, 900_000);
    vol.write(fh, 0, data.clone()).await.unwrap();
    vol.fsync(fh).await.unwrap();
    model.clear();
    model.extend_from_slice(&data);
    let sfh = brickfs_client::FileHandle::in_group(&fh.attr, fh.group(), data.len() as u64);
    for i in 0..30 {
        let got = stale.read(&sfh, 0, data.len() as u64).await.unwrap();
        assert!(
            got == data[..],
            "read {i} through the old view returned old bytes"
        );
    }
    must_wait_for(
        "the new brick to heal and rejoin",
        Duration::from_secs(60),
        || async {
            vol.refresh().await.ok()?;
            let set = vol.sets()[0].clone();
            (set.in_sync.len() == 3).then_some(())
        },
    )
    .await;
    let vol = VolumeClient::open(vol.meta().clone(), client(), "r3")
        .await
        .unwrap();
    let rec = vol.record();
    assert!(
        rec.bricks
            .iter()
            .any(|b| b.addr.ends_with(&*nodes[1].bricks()[2].to_string_lossy()))
    );
    assert!(
        !rec.bricks
            .iter()
            .any(|b| b.addr.ends_with(&*nodes[1].bricks()[0].to_string_lossy()))
    );
    must_have_identical_replicas(&vol).await;
    let got = vol.read(fh, 0, model.len() as u64).await.unwrap();
    assert!(got == model[..]);
    let got = stale.read(&sfh, 0, data.len() as u64).await.unwrap();
    assert!(got == data[..], "the old view after the heal");
}

/// Unmounts a tmpfs when dropped (failures included).
struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A full disk: one replica's brick sits on a small tmpfs. Writes fail with NoSpace (ENOSPC)
/// once it fills, never losing what was acknowledged; when a deleted file's objects are
/// removed, writes go on and the copies agree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_cleanly_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("n2").join("b0");
    std::fs::create_dir_all(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=12m"),
    )
    .unwrap();
    let _tmpfs = TmpfsGuard(small.clone());
    let mut nodes: Vec<Brickd> = Vec::new();
    for n in 0..3 {
        let node_dir = dir.path().join(format!("n{n}"));
        let extra = match nodes.first() {
            None => vec!["--meta".to_string()],
            Some(first) => vec!["--meta-peers".to_string(), first.addr().to_string()],
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        nodes
            .push(Brickd::start(&brickd_bin(), &node_dir, &[node_dir.join("b0")], &extra).unwrap());
    }
    let meta = MetaClient::new(vec![nodes[0].addr()], MetaClientOptions::default());
    meta.admin(AdminOp::Init).await.unwrap();
    for n in &nodes {
        admin::peer_add(&meta, &client(), n.addr()).await.unwrap();
    }
    let mut spec = vec!["replica".to_string(), "3".to_string()];
    spec.extend(
        nodes
            .iter()
            .map(|n| format!("{}:{}", n.addr(), n.bricks()[0].display())),
    );
    admin::volume_create(&meta, "full", &spec).await.unwrap();
    meta.write(MetaOp::StartVolume {
        name: "full".into(),
    })
    .await
    .unwrap();
    let vol = VolumeClient::open(meta.clone(), client(), "full")
        .await
        .unwrap();
    vol.set_retry_window(Duration::from_secs(2));

    let filler = vol.create(ROOT, "filler", 0o644, true).await.unwrap();
    vol.write(&filler, 0, pattern(1, 0, 6 << 20)).await.unwrap();
    vol.fsync(&filler).await.unwrap();
    let fh = vol.create(ROOT, "f", 0o644, true).await.unwrap();
    let mut model = Vec::new();
    let err = loop {
        let off = model.len() as u64;
        let data = pattern(2, off, 1 << 20);
        match vol.write(&fh, off, data.clone()).await {
            Ok(()) => model.extend_from_slice(&data),
            Err(e) => break e,
        }
        assert!(model.len() < 32 << 20, "a 12 MiB disk never filled");
    };
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "{err}");
    vol.fsync(&fh).await.ok();
    let got = vol.read(&fh, 0, model.len() as u64).await.unwrap();
    assert!(got == model[..], "acknowledged bytes survive the full disk");

    // Space returns when the filler's objects are removed; writes go on.
    meta.write(MetaOp::Unlink {
        volume: vol.record().id,
        parent: ROOT,
        name: "filler".into(),
    })
    .await
    .unwrap();
    let off = model.len() as u64;
    let data = pattern(3, off, 1 << 20);
    must_wait_for(
        "writes after space returns",
        Duration::from_secs(60),
        || async { vol.write(&fh, off, data.clone()).await.ok() },
    )
    .await;
    model.extend_from_slice(&data);
    vol.fsync(&fh).await.unwrap();
    let got = vol.read(&fh, 0, model.len() as u64).await.unwrap();
    assert!(got == model[..]);
    must_have_identical_replicas(&vol).await;
}

/// Leases: nodes cut off from the metadata group (here: the group is frozen) stop taking set
/// writes, and serving reads, once their lease lapses — before the group could give their
/// sets to others — and take them again once the group acknowledges their heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_cut_off_from_the_metadata_group_stop_taking_writes() {
    let (_dir, nodes, vols) = must_failure_cluster().await;
    let meta = vols[0].0.meta().clone();
    // A replica-2 volume on the spare bricks of nodes 1 and 2: its primary is not on node 0.
    let spec = vec![
        "replica".to_string(),
        "2".to_string(),
        format!("{}:{}", nodes[1].addr(), nodes[1].bricks()[2].display()),
        format!("{}:{}", nodes[2].addr(), nodes[2].bricks()[2].display()),
    ];
    admin::volume_create(&meta, "r2", &spec).await.unwrap();
    meta.write(MetaOp::StartVolume { name: "r2".into() })
        .await
        .unwrap();
    let quick = MetaClient::new(
        vec![nodes[0].addr()],
        MetaClientOptions {
            deadline: Duration::from_secs(2),
            ..MetaClientOptions::default()
        },
    );
    let vol = VolumeClient::open(quick, client(), "r2").await.unwrap();
    let fh = vol.create(ROOT, "f", 0o644, true).await.unwrap();
    vol.write(&fh, 0, pattern(5, 0, 100_000)).await.unwrap();
    vol.set_retry_window(Duration::from_millis(500));

    nodes[0].sigstop().unwrap();
    struct Thaw<'a>(&'a Brickd);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            let _ = self.0.sigcont();
        }
    }
    let thaw = Thaw(&nodes[0]);
    let err = must_wait_for("the lease to lapse", Duration::from_secs(30), || async {
        vol.write(&fh, 0, pattern(6, 0, 1000)).await.err()
    })
    .await;
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");
    assert!(err.to_string().contains("lease"), "{err}");
    // No member serves a read either (each of the two would be stale once the group moved on).
    let err = vol.read(&fh, 0, 1000).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");
    assert!(err.to_string().contains("lease"), "{err}");
    drop(thaw);
    must_wait_for(
        "writes after the group is back",
        Duration::from_secs(30),
        || async { vol.write(&fh, 0, pattern(7, 0, 1000)).await.ok() },
    )
    .await;
    let got = vol.read(&fh, 0, 1000).await.unwrap();
    assert!(got == pattern(7, 0, 1000));
}

/// Objects larger than a frame heal: a 48 MiB file on the replica-3 and disperse 2+1 volumes
/// (whole objects of 48 MiB and fragment objects of 24 MiB, above the 16 MiB frame limit),
/// one node stopped past down-after, 1 MiB overwritten in the middle, the node resumed: its
/// members heal in bounded time, and every member then holds exactly what the set should
/// (replica copies byte for byte, disperse fragments equal to the model's encoding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_larger_than_a_frame_heal_after_a_member_missed_a_version() {
    let (_dir, nodes, mut vols) = must_failure_cluster().await;
    const SIZE: usize = 48 << 20;
    for (i, (vol, fh, model)) in vols.iter_mut().enumerate() {
        let mut off = 0;
        while off < SIZE {
            let data = pattern(500 + i as u64, off as u64, 4 << 20);
            vol.write(fh, off as u64, data.clone()).await.unwrap();
            apply(model, off, &data);
            off += data.len();
        }
        vol.fsync(fh).await.unwrap();
    }
    nodes[2].sigstop().unwrap();
    // The writes wait until the stopped node's members leave their sets.
    for (i, (vol, fh, model)) in vols.iter_mut().enumerate() {
        let off = 20 << 20;
        let data = pattern(600 + i as u64, off as u64, 1 << 20);
        vol.write(fh, off as u64, data.clone()).await.unwrap();
        apply(model, off as usize, &data);
        vol.fsync(fh).await.unwrap();
        assert_eq!(vol.sets()[0].in_sync.len(), 2, "{:?}", vol.sets()[0]);
    }
    nodes[2].sigcont().unwrap();
    must_wait_for(
        "the resumed node's members to heal",
        Duration::from_secs(120),
        || {
            let vols: Vec<_> = vols.iter().map(|(v, _, _)| v.clone()).collect();
            async move {
                for v in &vols {
                    v.refresh().await.ok()?;
                    if v.sets()[0].in_sync.len() != 3 {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    let bc = client();
    for (vol, fh, model) in &vols {
        let rec = vol.record();
        let set = &rec.sets[0];
        let key = brickfs_proto::ObjectKey {
            volume: rec.id,
            ino: fh.attr.ino,
            column: 0,
        };
        // What each member must hold: the file (replica) or its fragment (disperse).
        let expect: Vec<Vec<u8>> = if rec.disperse_data > 0 {
            let (k, m) = (rec.disperse_data as usize, rec.disperse_redundancy as usize);
            let codec = brickfs_erasure::ReedSolomonCodec::new(k, m).unwrap();
            let f = brickfs_layout::DISPERSE_FRAGMENT_BYTES as usize;
            brickfs_erasure::encode_stripes(&codec, model, f).unwrap()
        } else {
            vec![model.clone(); set.members.len()]
        };
        let mut versions = Vec::new();
        for (i, b) in set.members.iter().enumerate() {
            let addr = node_addr(rec, *b);
            let (st, got) = must_read_object(&bc, addr, *b, key).await;
            versions.push((st.version, st.tag, st.len_bytes));
            assert_eq!(
                got.len(),
                expect[i].len(),
                "{}: member {i} length",
                rec.name
            );
            assert!(
                got == expect[i],
                "{}: member {i} holds other bytes",
                rec.name
            );
        }
        assert!(
            versions.windows(2).all(|w| w[0] == w[1]),
            "{}: members disagree on the version: {versions:?}",
            rec.name
        );
    }
}

/// A member stopped past down-after and resumed never serves the bytes it holds from before
/// to a reader whose view of the set still counts it (a read-only client never re-reads the
/// sets): the metadata group's answer to its first heartbeat says it is out of sync, and it
/// refuses client reads until it is healed. Every read matches a version the file had while
/// the read ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_member_never_serves_old_bytes_to_a_reader() {
    let (_dir, nodes, vols) = must_failure_cluster().await;
    let (vol, fh, _) = &vols[0];
    const SIZE: u64 = 1 << 20;
    let first = pattern(700, 0, SIZE as usize);
    vol.write(fh, 0, first.clone()).await.unwrap();
    vol.fsync(fh).await.unwrap();
    // The versions the file has had, in order; the reader checks against a window of them.
    let versions = Arc::new(std::sync::Mutex::new(vec![first]));
    let meta = MetaClient::new(vec![nodes[0].addr()], MetaClientOptions::default());
    let reader_vol = VolumeClient::open(meta, client(), "r3").await.unwrap();
    let rfh = brickfs_client::FileHandle::in_group(&fh.attr, fh.group(), SIZE);
    // The last version whose write was acknowledged (versions may be pushed before).
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let (versions, stop, acked) = (versions.clone(), stop.clone(), acked.clone());
        let done = done.clone();
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && reads < 200_000 {
                let from = acked.load(std::sync::atomic::Ordering::SeqCst);
                let got = reader_vol.read(&rfh, 0, SIZE).await.expect("read");
                let v = versions.lock().unwrap();
                let ok = v[from..].contains(&got);
                assert!(
                    ok,
                    "read {reads} returned bytes of no version current while it ran (of {})",
                    v.len()
                );
                reads += 1;
                done.store(reads, std::sync::atomic::Ordering::SeqCst);
            }
            reads
        })
    };
    nodes[2].sigstop().unwrap();
    // The write waits until the stopped node's member leaves the set.
    let second = pattern(701, 0, SIZE as usize);
    // A read that runs while the write does may see either version.
    versions.lock().unwrap().push(second.clone());
    vol.write(fh, 0, second).await.unwrap();
    vol.fsync(fh).await.unwrap();
    acked.store(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(vol.sets()[0].in_sync.len(), 2);
    nodes[2].sigcont().unwrap();
    // Read on while the member comes back, is healed and rejoins.
    must_wait_for(
        "the resumed member to rejoin",
        Duration::from_secs(60),
        || {
            let vol = vol.clone();
            async move {
                vol.refresh().await.ok()?;
                (vol.sets()[0].in_sync.len() == 3).then_some(())
            }
        },
    )
    .await;
    // And some more reads once it is back.
    let target = done.load(std::sync::atomic::Ordering::SeqCst) + 50;
    must_wait_for("50 more reads", Duration::from_secs(30), || {
        let n = done.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= target).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.await.expect("the reader saw only current bytes");
    assert!(reads > 10, "the reader read {reads} times");
}

/// A node killed (an unclean stop, which may lose acknowledged writes not yet synced) and
/// started again before down-after does not come back as in sync: its bricks leave their sets
/// for a full heal and rejoin after it. A clean stop and start keeps them in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brick_back_from_an_unclean_stop_is_healed_before_it_counts() {
    let (_dir, mut nodes, mut vols) = must_failure_cluster().await;
    for (i, (vol, fh, model)) in vols.iter_mut().enumerate() {
        let data = pattern(800 + i as u64, 0, 300_000);
        vol.write(fh, 0, data.clone()).await.unwrap();
        apply(model, 0, &data);
        vol.fsync(fh).await.unwrap();
    }
    let epochs = |vols: &[(Arc<VolumeClient>, brickfs_client::FileHandle, Vec<u8>)]| {
        vols.iter()
            .map(|(v, _, _)| v.sets()[0].epoch)
            .collect::<Vec<_>>()
    };
    let before = epochs(&vols);
    // A clean stop: back in sync at once, nothing changes.
    nodes[1].sigterm_and_wait(Duration::from_secs(20)).unwrap();
    nodes[1].restart().unwrap();
    must_serve_reads(nodes[1].addr()).await;
    for (vol, fh, model) in &vols {
        assert!(vol.read(fh, 0, model.len() as u64).await.unwrap() == model[..]);
        vol.refresh().await.unwrap();
    }
    assert_eq!(epochs(&vols), before, "a clean restart changed the sets");
    // An unclean one: out of sync, healed, back.
    nodes[1].sigkill().unwrap();
    nodes[1].restart().unwrap();
    must_wait_for(
        "the restarted node's bricks to be healed and rejoin",
        Duration::from_secs(60),
        || {
            let vols: Vec<_> = vols.iter().map(|(v, _, _)| v.clone()).collect();
            let before = before.clone();
            async move {
                for (v, e) in vols.iter().zip(&before) {
                    v.refresh().await.ok()?;
                    let s = &v.sets()[0];
                    // Out (one epoch), healed and back (another).
                    if s.in_sync.len() != 3 || s.epoch.0 < e.0 + 2 {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
    let log = std::fs::read_to_string(nodes[1].log_path()).unwrap();
    assert_eq!(
        log.matches("bricks opened after an unclean stop: reported")
            .count(),
        1,
        "only the unclean start reports"
    );
    for (vol, fh, model) in &vols {
        assert!(vol.read(fh, 0, model.len() as u64).await.unwrap() == model[..]);
    }
    // The rejoined bricks serve client reads again once their node's next heartbeat says so.
    let rec = vols[0].0.record().clone();
    let brick = rec.sets[0]
        .members
        .iter()
        .copied()
        .find(|b| node_addr(&rec, *b) == nodes[1].addr())
        .unwrap();
    let key = brickfs_proto::ObjectKey {
        volume: rec.id,
        ino: vols[0].1.attr.ino,
        column: 0,
    };
    let addr = nodes[1].addr();
    must_wait_for(
        "the rejoined brick to serve reads",
        Duration::from_secs(10),
        || async move {
            client()
                .read(addr, brick, key, 0, 10)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    for (vol, _, _) in &vols {
        must_have_identical_replicas(vol).await;
    }
}

/// Grows `filler` until its file system has at most 256 KiB free.
fn top_up(filler: &std::path::Path) {
    use std::io::Write as _;
    let dir = filler.parent().unwrap();
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    if free <= 256 << 10 {
        return;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    let _ = f.write_all(&vec![1u8; (free - (256 << 10)) as usize]);
    let _ = f.sync_all();
}

/// A disperse write that lands on fewer than K members leaves the previous version readable:
/// a 4+2 volume on six small file systems, a 16 MiB file written and synced, three of the six
/// bricks (not the primary) filled up and kept full; a 4 MiB append, a 1 MiB overwrite in
/// place and a truncate each fail with ENOSPC (each reached three members, fewer than the four
/// data fragments), and everything acknowledged reads back whole, at once and after the space
/// returns, when appends go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disperse_write_torn_below_k_leaves_the_old_version_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut guards = Vec::new();
    for i in 0..6 {
        let b = dir.path().join(format!("b{i}"));
        std::fs::create_dir_all(&b).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &b,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=48m"),
        )
        .unwrap();
        guards.push(TmpfsGuard(b));
    }
    let (node, _source, meta) =
        must_one_node_volume(dir.path(), "disperse 6 redundancy 2", 6, &[]).await;
    let vol = VolumeClient::open(meta.clone(), client(), "vol")
        .await
        .unwrap();
    vol.set_retry_window(Duration::from_secs(2));
    let fh = vol.create(ROOT, "f", 0o644, true).await.unwrap();
    let model = pattern(900, 0, 16 << 20);
    vol.write(&fh, 0, model.clone()).await.unwrap();
    vol.fsync(&fh).await.unwrap();
    // Three bricks other than the primary fill up.
    let rec = vol.record();
    let primary = rec.sets[0].primary;
    let mut fillers = Vec::new();
    for (i, b) in rec.sets[0].members.iter().enumerate() {
        if *b == primary || fillers.len() == 3 {
            continue;
        }
        let root = &node.bricks()[rec.bricks.iter().position(|x| x.brick == *b).unwrap()];
        let _ = i;
        let path = root.join("filler");
        top_up(&path);
        fillers.push(path);
    }
    assert_eq!(fillers.len(), 3);
    // The fillers stay topped up, without pause: the bricks' databases free space in the
    // background (preallocated log space given back), which would let the append through.
    // Bounded: until told to stop, at most a minute.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let hog = {
        let fillers = fillers.clone();
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < until {
                for f in &fillers {
                    top_up(f);
                }
                match stopped.try_recv() {
                    Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
                    _ => break,
                }
            }
        })
    };
    // An append reaches the three bricks with room and fails on the full ones. Space the
    // databases give back can let one through now and then: then it is simply acknowledged
    // (and in the model), and the next append tries again.
    let mut model = model.to_vec();
    let mut failed = None;
    for a in 0..8 {
        let end = model.len() as u64;
        let data = pattern(901 + a, end, 4 << 20);
        match vol.write(&fh, end, data.clone()).await {
            Ok(()) => model.extend_from_slice(&data),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("eight appends onto three full bricks of six all found room");
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "{err}");
    let got = vol
        .read(&fh, 0, model.len() as u64)
        .await
        .expect("the old version reads back");
    assert!(got == model[..], "the acknowledged bytes read back changed");
    // An overwrite in place needs no new space on the full bricks' file systems: only their
    // databases' reserve refuses it, which must happen before the bytes change.
    let mut failed = None;
    for a in 0..8u64 {
        let at = (1 << 20) + a * (256 << 10);
        let data = pattern(910 + a, at, 1 << 20);
        match vol.write(&fh, at, data.clone()).await {
            Ok(()) => model[at as usize..at as usize + data.len()].copy_from_slice(&data),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("eight overwrites on three full bricks of six all found room");
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "{err}");
    let got = vol.read(&fh, 0, model.len() as u64).await.unwrap();
    assert!(
        got == model[..],
        "a torn overwrite changed acknowledged bytes"
    );
    // A truncate (to whole stripes) reaches the three bricks with room: they keep what they
    // cut off and go back on it.
    let mut failed = None;
    for a in 0..8u64 {
        let len = (12 << 20) - a * (1 << 20);
        match vol.truncate(&fh, len).await {
            Ok(_) => model.truncate(len as usize),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("eight truncates on three full bricks of six all found room");
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "{err}");
    let got = vol.read(&fh, 0, model.len() as u64).await.unwrap();
    assert!(
        got == model[..],
        "a torn truncate lost acknowledged bytes ({} read of {})",
        got.len(),
        model.len()
    );
    drop(stop);
    hog.join().unwrap();
    for f in &fillers {
        std::fs::remove_file(f).unwrap();
    }
    let end = model.len() as u64;
    let more = pattern(902, end, 4 << 20);
    vol.write(&fh, end, more.clone()).await.unwrap();
    vol.fsync(&fh).await.unwrap();
    model.extend_from_slice(&more);
    let fresh = VolumeClient::open(meta, client(), "vol").await.unwrap();
    let fh2 = brickfs_client::FileHandle::in_group(&fh.attr, fh.group(), model.len() as u64);
    let got = fresh.read(&fh2, 0, model.len() as u64).await.unwrap();
    assert!(
        got == model[..],
        "everything acknowledged, the last append too"
    );
}

/// Every file under `dir` (the brick's index database aside) that holds `marker`.
fn files_holding(dir: &std::path::Path, marker: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if e.file_name() != "db" {
                    todo.push(p);
                }
            } else if std::fs::read(&p)
                .is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker))
            {
                found.push(p);
            }
        }
    }
    found
}

/// Deleting a volume removes its objects from every brick (the metadata leader's node does it
/// in the background, the volume listed as deleted meanwhile) before its bricks are free; a
/// new volume made on the same bricks then finds nothing of the old one: no object listed, no
/// byte of the old files in any file under the bricks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_volumes_leave_nothing_on_their_bricks() {
    let c = must_cluster().await;
    let places = [(0, 0), (1, 0), (2, 0)];
    let old = must_volume(&c, "old", "stripe 3", &places).await;
    let old_id = old.record().id;
    let marker = b"the old volume's secret, which must not outlive it";
    let big: Vec<u8> = marker.iter().copied().cycle().take(3 << 20).collect();
    let fh = old.create(ROOT, "big", 0o644, true).await.unwrap();
    old.write(&fh, 0, Bytes::from(big)).await.unwrap();
    old.fsync(&fh).await.unwrap();
    for i in 0..20 {
        let fh = old
            .create(ROOT, &format!("small{i}"), 0o644, true)
            .await
            .unwrap();
        old.write(&fh, 0, Bytes::from_static(marker)).await.unwrap();
        old.fsync(&fh).await.unwrap();
    }
    let dirs: Vec<std::path::PathBuf> = places
        .iter()
        .map(|&(n, i)| c.nodes[n].bricks()[i].to_path_buf())
        .collect();
    for d in &dirs {
        assert!(
            !files_holding(d, marker).is_empty(),
            "{} holds none of the old files before the delete",
            d.display()
        );
    }
    let rec = old.record().clone();
    drop((fh, old));

    let meta = c.nodes[0].addr().to_string();
    must_ok(&["--meta", &meta, "volume", "stop", "old"]);
    let out = must_ok(&["--meta", &meta, "volume", "delete", "old"]);
    assert!(out.contains("in the background"), "{out}");
    // The bricks are taken until the old objects are gone; then a new volume gets them.
    let spec: Vec<String> = ["stripe", "3"]
        .into_iter()
        .map(String::from)
        .chain(places.iter().map(|&(n, i)| c.brick(n, i)))
        .collect();
    must_wait_for(
        "the deleted volume's bricks to be free",
        Duration::from_secs(90),
        || async {
            match admin::volume_create(&c.meta, "new", &spec).await {
                Ok(_) => Some(()),
                Err(e) => {
                    let text = e.to_string();
                    assert!(text.contains("deleted volume \"old\""), "{text}");
                    None
                }
            }
        },
    )
    .await;
    let listed = must_ok(&["--meta", &meta, "volume", "list"]);
    assert!(
        listed.contains("new") && !listed.contains("old"),
        "{listed}"
    );

    let bc = client();
    for b in &rec.bricks {
        let (objects, more) = bc
            .list(node_addr(&rec, b.brick), b.brick, None, 10_000)
            .await
            .unwrap();
        assert!(!more);
        let left: Vec<_> = objects.iter().filter(|o| o.key.volume == old_id).collect();
        assert!(left.is_empty(), "brick {} still lists {left:?}", b.addr);
    }
    // Large removed objects are cut down in the brick's trash in the background.
    must_wait_for(
        "no byte of the old files under the bricks",
        Duration::from_secs(60),
        || async {
            let left: Vec<_> = dirs.iter().flat_map(|d| files_holding(d, marker)).collect();
            left.is_empty().then_some(())
        },
    )
    .await;
    must_ok(&["--meta", &meta, "volume", "start", "new"]);
    let new = VolumeClient::open(c.meta.clone(), client(), "new")
        .await
        .unwrap();
    assert_ne!(new.record().id, old_id);
    match new
        .meta()
        .read(MetaRead::ReadDir {
            volume: new.record().id,
            ino: ROOT,
            after: None,
            limit: 100,
        })
        .await
        .unwrap()
    {
        MetaReply::Entries { entries, more } => {
            assert!(entries.is_empty() && !more, "{entries:?}")
        }
        other => panic!("{other:?}"),
    }
}
