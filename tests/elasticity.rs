//! Elasticity end to end on real brickd processes, through the CLI: `add-brick` grows a volume
//! by whole stripe groups, `rebalance start` moves files to their new homes while a writer
//! keeps appending to an open file and handles opened before the moves keep reading and
//! writing, `remove-brick start|status|commit` drains a group and frees its bricks. Every
//! file is compared byte for byte with what was written; old copies are sealed (`Moved`).

mod common;

use brickfs_client::rebalance::Placement;
use brickfs_client::{FileHandle, VolumeClient};
use brickfs_proto::meta::{BrickRecord, MetaRead, MetaReply, VolumeRecord};
use brickfs_proto::{ErrorCode, Ino, ObjectKey};
use bytes::Bytes;
use common::mount::Mount;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const ROOT: Ino = Ino(1);
const UNIT: u64 = 16 << 10;
const FILES: u64 = 24;

fn size_of(i: u64) -> u64 {
    // Empty, small, around unit and stripe boundaries, a few hundred KiB.
    [0, 1, 5000, UNIT - 1, UNIT + 1, 3 * UNIT, 200_000, 400_017][i as usize % 8]
}

async fn must_record(c: &Cluster, name: &str) -> VolumeRecord {
    match c
        .meta
        .read(MetaRead::VolumeByName { name: name.into() })
        .await
        .unwrap()
    {
        MetaReply::Volume(v) => v,
        other => panic!("{other:?}"),
    }
}

async fn must_bricks(c: &Cluster) -> Vec<BrickRecord> {
    match c.meta.read(MetaRead::ListBricks).await.unwrap() {
        MetaReply::Bricks(b) => b,
        other => panic!("{other:?}"),
    }
}

/// Every file's (inode, group) in inode order.
async fn must_files(c: &Cluster, v: &VolumeRecord) -> Vec<brickfs_proto::meta::FileSpot> {
    match c
        .meta
        .read(MetaRead::Files {
            volume: v.id,
            after: Ino(0),
            limit: 4096,
        })
        .await
        .unwrap()
    {
        MetaReply::Files { files, next: None } => files,
        other => panic!("{other:?}"),
    }
}

/// Reads a whole file through a fresh handle and compares it with its pattern.
async fn must_match(vol: &VolumeClient, name: &str, seed: u64, len: u64) {
    let fh = vol.open_file(ROOT, name).await.unwrap();
    assert_eq!(fh.size(), len, "{name}: size");
    let got = vol.read(&fh, 0, len + 10).await.unwrap();
    assert_eq!(got.len() as u64, len, "{name}: length read");
    assert!(
        got == pattern(seed, 0, len as usize),
        "{name}: bytes differ from what was written"
    );
}

/// Waits (bounded) for `brickfs ... status --json` to say the rebalance is done with nothing
/// left to move; returns the status.
async fn must_finish(args: &[String]) -> serde_json::Value {
    must_wait_for("the rebalance to finish", Duration::from_secs(180), || {
        let out = must_ok(args);
        async move {
            let st: serde_json::Value = serde_json::from_str(&out).unwrap();
            (st["state"] == "done" && st["files_left"] == 0).then_some(st)
        }
    })
    .await
}

/// Appends to one open file until told to stop; returns how many bytes it wrote. Every write
/// must succeed: the moves under it are invisible to it.
fn spawn_appender(
    vol: Arc<VolumeClient>,
    fh: Arc<FileHandle>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut at = 0u64;
        // Paced, so that the moves happen between writes as well as during them.
        let mut pace = tokio::time::interval(Duration::from_millis(5));
        // Bounded: at most 2,000 writes of 3 KiB.
        for _ in 0..2_000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let chunk = pattern(99, at, 3000);
            vol.write(&fh, at, chunk)
                .await
                .expect("append during a move");
            at += 3000;
            written.store(at, Ordering::SeqCst);
            if at.is_multiple_of(30_000) {
                vol.fsync(&fh).await.expect("fsync during a move");
            }
            pace.tick().await;
        }
        vol.close(Arc::try_unwrap(fh).ok().expect("one owner"))
            .await
            .unwrap();
    })
}

/// Appends through a FUSE mount (4 KiB and an fdatasync per write) until told to stop;
/// returns the bytes written. Every write must succeed while files move under the mount.
fn spawn_mount_appender(
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .expect("create through the mount");
        let mut at = 0u64;
        // Bounded: at most 3,000 writes.
        for _ in 0..3_000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            f.write_all(&pattern(77, at, 4096))
                .expect("write through the mount");
            f.sync_data().expect("fdatasync through the mount");
            at += 4096;
        }
        drop(f);
        at
    })
}

/// One volume type through grow, rebalance, drain and shrink.
async fn must_grow_and_shrink(head: &str, per_group: &[&[(usize, usize)]]) {
    let c = must_cluster().await;
    let meta = c.nodes[0].addr().to_string();
    let cli = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--meta".to_string(), meta.clone()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let words = |group: &[(usize, usize)]| -> Vec<String> {
        group.iter().map(|(n, i)| c.brick(*n, *i)).collect()
    };
    let vol = must_volume_with_unit(&c, "grow", head, per_group[0], UNIT).await;
    for i in 0..FILES {
        let fh = vol
            .create(ROOT, &format!("f{i}"), 0o644, true)
            .await
            .unwrap();
        let len = size_of(i);
        if len > 0 {
            vol.write(&fh, 0, pattern(i, 0, len as usize))
                .await
                .unwrap();
        }
        vol.close(fh).await.unwrap();
    }
    // Handles opened before anything moves: one reads later, one writes later.
    let stale_reader = vol.open_file(ROOT, "f6").await.unwrap();
    let stale_writer = vol.open_file(ROOT, "f7").await.unwrap();
    let live = Arc::new(vol.create(ROOT, "live", 0o644, true).await.unwrap());
    // And a mount whose open file is written all along.
    let mnt = Mount::start(
        &format!("{}/grow", c.nodes[0].addr()),
        &c.dir.path().join("mnt"),
    )
    .await;
    let mount_stop = Arc::new(AtomicBool::new(false));
    let mount_appender = spawn_mount_appender(mnt.path.join("viafuse"), mount_stop.clone());

    // Grow by whole groups; a partial group is refused with the reason.
    let partial = words(&per_group[1][..1]);
    let (code, _, err) = brickfs(&cli(&["volume", "add-brick", "grow", &partial[0]]));
    if per_group[1].len() > 1 {
        assert_ne!(code, 0);
        assert!(err.contains("whole stripe groups"), "{err}");
    }
    let mut add: Vec<String> = vec!["volume".into(), "add-brick".into(), "grow".into()];
    add.extend(words(per_group[1]));
    add.extend(words(per_group[2]));
    let out = must_ok(&cli(&add.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(out.contains("bricks added"), "{out}");
    let rec = must_record(&c, "grow").await;
    assert_eq!(rec.groups(), 3);
    assert!(
        rec.type_name.starts_with("distributed"),
        "{}",
        rec.type_name
    );

    // Rebalance while a writer appends to an open file.
    let (stop, written) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let appender = spawn_appender(vol.clone(), live.clone(), stop.clone(), written.clone());
    drop(live);
    must_ok(&cli(&["volume", "rebalance", "grow", "start"]));
    let st = must_finish(&cli(&["--json", "volume", "rebalance", "grow", "status"])).await;
    assert!(st["moved"].as_u64().unwrap() > 0, "{st}");
    let status = must_ok(&cli(&["volume", "status", "grow"]));
    assert!(status.contains("Rebalance: Done"), "{status}");
    let text = must_ok(&cli(&["volume", "rebalance", "grow", "status"]));
    assert!(
        text.contains("rebalance done") && text.contains("100% done"),
        "{text}"
    );
    let rec = must_record(&c, "grow").await;
    let bricks = must_bricks(&c).await;
    let files = must_files(&c, &rec).await;
    let placement = Placement::new(&rec, &bricks);
    for f in &files {
        assert_eq!(placement.destination(false, f), None, "{f:?} not at home");
    }
    assert!(
        (0..3).all(|g| files.iter().any(|f| f.group == g)),
        "{files:?}"
    );

    // The mover's lines carry the fixed span fields: the node, the volume and the file.
    let log = std::fs::read_to_string(c.nodes[0].log_path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("file moved"))
        .expect("the leader's node logs each move");
    for field in ["brickd{node=", "rebalance{volume=grow}", "move{ino="] {
        assert!(line.contains(field), "{field} missing from {line}");
    }

    // Handles from before the moves follow their files.
    let want6 = pattern(6, 0, size_of(6) as usize);
    assert!(vol.read(&stale_reader, 0, 1 << 20).await.unwrap() == want6);
    let tail = Bytes::from_static(b"written through a handle older than the move");
    vol.write(&stale_writer, size_of(7), tail.clone())
        .await
        .unwrap();
    vol.close(stale_writer).await.unwrap();

    // Every file started in group 0: the old copy of each one that moved is sealed there, its
    // brick refuses it with Moved.
    let old_member = rec.sets[0].members[0];
    let moved: Vec<_> = files.iter().filter(|f| f.group != 0).collect();
    for f in &moved {
        let key = ObjectKey {
            volume: rec.id,
            ino: f.ino,
            column: 0,
        };
        match client()
            .read(node_addr(&rec, old_member), old_member, key, 0, 1)
            .await
        {
            Err(e) if e.code() == Some(ErrorCode::Moved) => {}
            other => panic!("inode {} read on its old brick: {other:?}", f.ino),
        }
    }

    // Drain group 0 while the writer goes on; commit only when it is empty.
    let mut rm: Vec<String> = vec!["volume".into(), "remove-brick".into(), "grow".into()];
    rm.extend(words(&per_group[0][..1]));
    rm.push("start".into());
    let rm_args: Vec<&str> = rm.iter().map(String::as_str).collect();
    if per_group[0].len() > 1 {
        let (code, _, err) = brickfs(&cli(&rm_args));
        assert_ne!(code, 0);
        assert!(err.contains("whole stripe groups"), "{err}");
    }
    let (code, _, err) = brickfs(&cli(&["volume", "remove-brick", "grow", "commit"]));
    assert_ne!(code, 0);
    assert!(err.contains("no remove-brick in progress"), "{err}");
    let mut rm: Vec<String> = vec!["volume".into(), "remove-brick".into(), "grow".into()];
    rm.extend(words(per_group[0]));
    rm.push("start".into());
    must_ok(&cli(&rm.iter().map(String::as_str).collect::<Vec<_>>()));
    let status = must_ok(&cli(&["volume", "status", "grow"]));
    assert!(
        status.contains("Draining groups (remove-brick): [0]"),
        "{status}"
    );
    let st = must_finish(&cli(&[
        "--json",
        "volume",
        "remove-brick",
        "grow",
        "status",
    ]))
    .await;
    assert_eq!(st["draining_groups"], serde_json::json!([0]), "{st}");
    stop.store(true, Ordering::SeqCst);
    appender.await.unwrap();
    mount_stop.store(true, Ordering::SeqCst);
    let via_fuse = mount_appender.join().expect("the mount's writer");
    assert!(via_fuse > 0);
    let out = must_ok(&cli(&["volume", "remove-brick", "grow", "commit"]));
    assert!(out.contains("the removed bricks are free"), "{out}");
    let rec = must_record(&c, "grow").await;
    assert!(!moved.is_empty());
    assert!(rec.retired(0) && !rec.retired(1) && !rec.retired(2));
    assert_eq!(rec.bricks.len(), per_group[1].len() + per_group[2].len());
    assert!(must_files(&c, &rec).await.iter().all(|f| f.group != 0));

    // Every byte is where it should be, read by a client opened now.
    let fresh = VolumeClient::open(c.meta.clone(), client(), "grow")
        .await
        .unwrap();
    for i in 0..FILES {
        if i == 7 {
            continue;
        }
        must_match(&fresh, &format!("f{i}"), i, size_of(i)).await;
    }
    let f7 = fresh.open_file(ROOT, "f7").await.unwrap();
    let got = fresh.read(&f7, 0, 1 << 20).await.unwrap();
    assert_eq!(got.len() as u64, size_of(7) + tail.len() as u64);
    assert!(got.slice(..size_of(7) as usize) == pattern(7, 0, size_of(7) as usize));
    assert!(got.slice(size_of(7) as usize..) == tail);
    must_match(&fresh, "live", 99, written.load(Ordering::SeqCst)).await;
    must_match(&fresh, "viafuse", 77, via_fuse).await;
    // The mount still sees every file, and reads a moved one right.
    let names = std::fs::read_dir(&mnt.path).unwrap().count() as u64;
    assert_eq!(names, FILES + 2);
    let f6 = std::fs::read(mnt.path.join("f6")).unwrap();
    assert!(f6 == pattern(6, 0, size_of(6) as usize));
    drop(mnt);

    // The freed bricks make a new volume.
    let mut spec: Vec<String> = vec!["volume".into(), "create".into(), "again".into()];
    spec.extend(words(&per_group[0][..1]));
    must_ok(&cli(&spec.iter().map(String::as_str).collect::<Vec<_>>()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_volume_grows_rebalances_and_shrinks_online() {
    must_grow_and_shrink(
        "replica 2",
        &[&[(0, 0), (1, 0)], &[(1, 1), (2, 0)], &[(2, 1), (0, 1)]],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispersed_volume_grows_rebalances_and_shrinks_online() {
    must_grow_and_shrink(
        "disperse 3 redundancy 1",
        &[
            &[(0, 0), (1, 0), (2, 0)],
            &[(0, 1), (1, 1), (2, 1)],
            &[(0, 2), (1, 2), (2, 2)],
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn striped_volume_grows_rebalances_and_shrinks_online() {
    must_grow_and_shrink(
        "stripe 2",
        &[&[(0, 0), (1, 0)], &[(1, 1), (2, 1)], &[(2, 2), (0, 2)]],
    )
    .await;
}

/// A mover that died in the middle of a move (recorded, source frozen) leaves nothing stuck:
/// the leader's node abandons the move, thaws the source and forgets it, and a write that was
/// waiting on the frozen file goes through, in the file's old place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_left_by_a_dead_mover_is_undone() {
    use brickfs_proto::meta::{FileMove, MetaOp};
    use brickfs_proto::msg::SealAction;
    let c = must_cluster().await;
    let vol = must_volume_with_unit(
        &c,
        "stuck",
        "replica 2",
        &[(0, 0), (1, 0), (1, 1), (2, 0)],
        UNIT,
    )
    .await;
    let fh = vol.create(ROOT, "f", 0o644, true).await.unwrap();
    vol.write(&fh, 0, pattern(8, 0, 50_000)).await.unwrap();
    vol.fsync(&fh).await.unwrap();
    let rec = must_record(&c, "stuck").await;
    let file = FileMove {
        ino: fh.attr.ino,
        from: fh.group(),
        to: 1 - fh.group(),
    };
    // What a mover does before it dies: record the move, freeze the source.
    c.meta
        .write(MetaOp::BeginMove {
            volume: rec.id,
            file,
        })
        .await
        .unwrap();
    let set = &rec.sets[file.from as usize];
    let key = ObjectKey {
        volume: rec.id,
        ino: file.ino,
        column: 0,
    };
    for b in &set.members {
        client()
            .seal(node_addr(&rec, *b), *b, key, SealAction::Freeze)
            .await
            .unwrap();
    }
    let e = client()
        .write(
            node_addr(&rec, set.primary),
            set.primary,
            key,
            0,
            Bytes::from_static(b"x"),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Moved), "{e}");
    // A client's write waits on the frozen file, then goes through once the move is undone.
    vol.write(&fh, 50_000, pattern(8, 50_000, 1000))
        .await
        .unwrap();
    vol.close(fh).await.unwrap();
    must_wait_for(
        "the move to be forgotten",
        Duration::from_secs(30),
        || async {
            match c
                .meta
                .read(MetaRead::Moves { volume: rec.id })
                .await
                .unwrap()
            {
                MetaReply::Moves {
                    moving,
                    abandoned,
                    dropping,
                } => {
                    (moving.is_empty() && abandoned.is_empty() && dropping.is_empty()).then_some(())
                }
                other => panic!("{other:?}"),
            }
        },
    )
    .await;
    let fresh = VolumeClient::open(c.meta.clone(), client(), "stuck")
        .await
        .unwrap();
    must_match(&fresh, "f", 8, 51_000).await;
    assert_eq!(fresh.open_file(ROOT, "f").await.unwrap().group(), file.from);
    let log = std::fs::read_to_string(c.nodes[0].log_path()).unwrap();
    assert!(
        log.contains("move abandoned"),
        "the leader's node says what it undid"
    );
}
