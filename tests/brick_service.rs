//! The brick service against a real `brickd` process over TCP: round trips, concurrency, large
//! objects, durability across kill -9, checksum damage, bad input, and a disperse set whose
//! fragments disagree after a primary died in the middle of a write.

mod common;

use brickfs_erasure::{ReedSolomonCodec, decode_stripes, encode_stripes};
use brickfs_proto::msg::{
    DisperseGeometry, DisperseWrite, HealObjects, MemberRef, MemberWrite, SetRef, SetWrite,
};
use brickfs_proto::rpc::Outcome;
use brickfs_proto::{Epoch, ErrorCode, Message, ObjectKey, ObjectVersion, VolumeId};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use common::*;
use std::time::Duration;

/// Write, read, truncate down and up, and delete an object; every answer matches a byte model
/// and versions step by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_truncate_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (node, brick) = must_start_single(dir.path()).await;
    let c = client();
    let addr = node.addr();
    let k = key(10, 0);

    let missing = c.read(addr, brick, k, 0, 10).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound));
    assert_eq!(c.stat(addr, brick, k).await.unwrap(), None);

    let first = pattern(1, 0, 300_000);
    let st = c
        .write(addr, brick, k, 0, first.clone(), false)
        .await
        .unwrap();
    assert_eq!((st.version.0, st.len_bytes), (1, 300_000));
    let (st, got) = c.read(addr, brick, k, 0, 400_000).await.unwrap();
    assert_eq!(st.len_bytes, 300_000);
    assert_eq!(got, first);

    // An overwrite across block boundaries, then a write past the end leaving a hole.
    let mid = pattern(2, 65_000, 70_000);
    c.write(addr, brick, k, 65_000, mid.clone(), false)
        .await
        .unwrap();
    let tail = pattern(3, 500_000, 1000);
    let st = c
        .write(addr, brick, k, 500_000, tail.clone(), true)
        .await
        .unwrap();
    assert_eq!((st.version.0, st.len_bytes), (3, 501_000));
    let mut model = first.to_vec();
    model[65_000..135_000].copy_from_slice(&mid);
    model.resize(500_000, 0);
    model.extend_from_slice(&tail);
    let (_, got) = c.read(addr, brick, k, 0, 600_000).await.unwrap();
    assert_eq!(&got[..], &model[..]);

    let st = c.truncate(addr, brick, k, 100_001, false).await.unwrap();
    assert_eq!((st.version.0, st.len_bytes), (4, 100_001));
    model.truncate(100_001);
    let st = c.truncate(addr, brick, k, 200_000, true).await.unwrap();
    assert_eq!(st.len_bytes, 200_000);
    model.resize(200_000, 0);
    let (_, got) = c.read(addr, brick, k, 0, 1 << 20).await.unwrap();
    assert_eq!(&got[..], &model[..]);
    let (_, got) = c.read(addr, brick, k, 150_000, 10).await.unwrap();
    assert_eq!(&got[..], &[0u8; 10]);

    let st = c.fsync(addr, brick, k).await.unwrap();
    assert_eq!(st.version.0, 5);
    let (objects, more) = c.list(addr, brick, None, 100).await.unwrap();
    assert_eq!((objects.len(), more), (1, false));
    assert_eq!(objects[0].key, k);
    assert!(c.delete(addr, brick, k).await.unwrap());
    assert!(!c.delete(addr, brick, k).await.unwrap());
    assert_eq!(c.stat(addr, brick, k).await.unwrap(), None);
    assert_eq!(node.error_lines(), 0, "{}", node.log_tail(20));
}

/// Eight clients, each with its own connections, write and read their own objects at once;
/// every object reads back exactly what its writer wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_different_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (node, brick) = must_start_single(dir.path()).await;
    let addr = node.addr();
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        tasks.push(tokio::spawn(async move {
            let c = client();
            let k = key(100 + writer, writer as u32);
            let chunk = 200_000usize;
            for i in 0..10u64 {
                let off = i * chunk as u64;
                c.write(addr, brick, k, off, pattern(writer, off, chunk), false)
                    .await
                    .unwrap();
            }
            let (_, got) = c.read(addr, brick, k, 0, 2_000_000).await.unwrap();
            assert_eq!(got, pattern(writer, 0, 2_000_000), "writer {writer}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (objects, _) = client().list(addr, brick, None, 100).await.unwrap();
    assert_eq!(objects.len(), 8);
}

/// A 256 MiB object written with 1 MiB requests, 8 in flight, reads back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_of_256_mib_round_trips() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let (node, brick) = must_start_single(dir.path()).await;
    let addr = node.addr();
    let c = client();
    let k = key(7, 0);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..CHUNKS {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let off = i * CHUNK as u64;
            c.write(addr, brick, k, off, pattern(7, off, CHUNK), false)
                .await
                .unwrap();
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let st = c.fsync(addr, brick, k).await.unwrap();
    assert_eq!(st.len_bytes, CHUNKS * CHUNK as u64);
    assert_eq!(st.version.0, CHUNKS);
    for i in 0..CHUNKS {
        let off = i * CHUNK as u64;
        let (_, got) = c.read(addr, brick, k, off, CHUNK as u32).await.unwrap();
        assert!(got == pattern(7, off, CHUNK), "chunk {i} differs");
    }
}

/// Data acknowledged by fsync (and by a sync write) is there after kill -9 and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsynced_data_survives_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, brick) = must_start_single(dir.path()).await;
    let addr = node.addr();
    let c = client();
    let a = key(1, 0);
    let b = key(2, 0);
    c.write(addr, brick, a, 0, pattern(11, 0, 3_000_000), false)
        .await
        .unwrap();
    c.truncate(addr, brick, a, 2_500_000, false).await.unwrap();
    let synced = c.fsync(addr, brick, a).await.unwrap();
    c.write(addr, brick, b, 4096, pattern(12, 4096, 100_000), true)
        .await
        .unwrap();

    node.sigkill().unwrap();
    // A pooled connection may not have seen the close yet (its ping is then lost, an unknown
    // outcome); a fresh connection to a dead daemon is refused outright.
    c.pool().forget(addr).await;
    let err = c.ping(addr).await.unwrap_err();
    assert_eq!(err.outcome(), Outcome::Rejected, "{err}");
    node.restart().unwrap();
    c.pool().forget(addr).await;

    let st = c
        .stat(addr, brick, a)
        .await
        .unwrap()
        .expect("object a survives");
    assert_eq!(st, synced);
    let (_, got) = c.read(addr, brick, a, 0, 3_000_000).await.unwrap();
    assert!(got == pattern(11, 0, 2_500_000));
    let (st, got) = c.read(addr, brick, b, 0, 200_000).await.unwrap();
    assert_eq!(st.len_bytes, 104_096);
    assert_eq!(&got[..4096], &[0u8; 4096][..]);
    assert!(got.slice(4096..) == pattern(12, 4096, 100_000));
}

/// A byte flipped in a brick file on disk is a checksum error, never the damaged bytes; the
/// undamaged blocks of the object still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_on_disk_returns_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let (node, brick) = must_start_single(dir.path()).await;
    let addr = node.addr();
    let c = client();
    let k = key(3, 1);
    let data = pattern(5, 0, 1 << 20);
    c.write(addr, brick, k, 0, data.clone(), true)
        .await
        .unwrap();

    let objects = dir.path().join("brick0").join("objects");
    let file = find_object_file(&objects, "0000000000000003-00000001").expect("object file");
    let mut raw = std::fs::read(&file).unwrap();
    raw[700_000] ^= 0x20;
    std::fs::write(&file, &raw).unwrap();

    let err = c.read(addr, brick, k, 0, 1 << 20).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChecksumMismatch), "{err}");
    let err = c.read(addr, brick, k, 699_000, 10).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChecksumMismatch), "{err}");
    let (_, head) = c.read(addr, brick, k, 0, 600_000).await.unwrap();
    assert!(head == data.slice(..600_000));
}

/// SIGTERM stops the daemon cleanly: exit status 0 and a final log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, brick) = must_start_single(dir.path()).await;
    let c = client();
    c.write(node.addr(), brick, key(1, 0), 0, pattern(1, 0, 1000), false)
        .await
        .unwrap();
    let status = node.sigterm_and_wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}\n{}", node.log_tail(20));
    // The log's last lines reach its file through a tee thread: wait for them (bounded).
    must_wait_for("the final log line", Duration::from_secs(10), || async {
        node.log_tail(5).contains("brickd stopped").then_some(())
    })
    .await;
    assert_eq!(node.error_lines(), 0, "{}", node.log_tail(20));
}

/// Three single-brick daemons as one disperse 2+1 set, driven through its primary (member 0).
struct Disperse21 {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<brickfs_testkit::Brickd>,
    members: Vec<MemberRef>,
    set: SetRef,
}

const FRAG: u32 = 4096;

impl Disperse21 {
    async fn start() -> Disperse21 {
        let mut out = Disperse21 {
            _dirs: Vec::new(),
            nodes: Vec::new(),
            members: Vec::new(),
            set: SetRef {
                volume: VolumeId(1),
                set: 0,
                epoch: Epoch(1),
            },
        };
        for _ in 0..3 {
            let d = tempfile::tempdir().unwrap();
            let (n, brick) = must_start_single(d.path()).await;
            out.members.push(MemberRef {
                brick,
                addr: n.addr().to_string(),
            });
            out.nodes.push(n);
            out._dirs.push(d);
        }
        out
    }

    fn geometry(&self) -> DisperseGeometry {
        DisperseGeometry {
            data_fragments: 2,
            parity_fragments: 1,
            fragment_bytes: FRAG,
            members: self.members.clone(),
            in_sync: Vec::new(),
        }
    }

    async fn write(&self, k: ObjectKey, offset_bytes: u64, data: Bytes) {
        let msg = Message::DisperseWrite(DisperseWrite {
            brick: self.members[0].brick,
            set: self.set,
            key: k,
            offset_bytes,
            sync: false,
            geometry: self.geometry(),
        });
        let r = client().pool().call(self.nodes[0].addr(), msg, data).await;
        assert!(r.is_ok(), "{r:?}\n{}", self.nodes[0].log_tail(20));
    }

    /// What a write the primary died in the middle of left on `members`: their fragments of
    /// `data` at `version`, under a tag no live primary uses.
    async fn torn(&self, k: ObjectKey, version: u64, data: &[u8], members: &[usize]) {
        let codec = ReedSolomonCodec::new(2, 1).unwrap();
        let frags = encode_stripes(&codec, data, FRAG as usize).unwrap();
        for &i in members {
            // The dead primary's write followed what the member held.
            let parent_tag = match client()
                .stat(self.nodes[i].addr(), self.members[i].brick, k)
                .await
            {
                Ok(st) => st.map_or(0, |st| st.tag),
                Err(_) => 0,
            };
            let msg = Message::MemberWrite(MemberWrite {
                brick: self.members[i].brick,
                set: self.set,
                key: k,
                offset_bytes: 0,
                version: ObjectVersion(version),
                tag: 0xDEAD_0000 + version,
                parent_tag,
                sync: false,
                degraded: false,
                undo: true,
            });
            client()
                .pool()
                .call(self.nodes[i].addr(), msg, Bytes::from(frags[i].clone()))
                .await
                .unwrap();
        }
    }

    /// Every member's `(version, tag)` of `k`, and the column decoded from all three.
    async fn read_all(&self, k: ObjectKey, len: usize) -> (Vec<(u64, u64)>, Vec<u8>) {
        let stripes = len.div_ceil(2 * FRAG as usize);
        let mut held = Vec::new();
        let mut frags = Vec::new();
        for (n, m) in self.nodes.iter().zip(&self.members) {
            let (st, bytes) = client()
                .read(n.addr(), m.brick, k, 0, stripes as u32 * FRAG)
                .await
                .unwrap();
            held.push((st.version.0, st.tag));
            frags.push(Some(((st.version.0, st.tag), bytes.to_vec())));
        }
        let codec = ReedSolomonCodec::new(2, 1).unwrap();
        let (_, mut data) = decode_stripes(&codec, &frags, FRAG as usize, stripes).unwrap();
        data.truncate(len);
        (held, data)
    }

    async fn version(&self, k: ObjectKey) -> u64 {
        client()
            .stat(self.nodes[0].addr(), self.members[0].brick, k)
            .await
            .unwrap()
            .map_or(0, |st| st.version.0)
    }
}

/// A disperse primary can die after some members applied a write and before it applied its own
/// fragment; later writes through it must neither fail forever nor combine fragments of two
/// different writes that carry one version number. Each case below leaves the members as such
/// a write would, then writes through the primary and checks that every member holds the same
/// version and tag and the column decodes to exactly what the model says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disperse_fragments_that_disagree_are_reconciled() {
    let s = Disperse21::start().await;
    let sb = 2 * FRAG as usize;
    let len = 3 * sb;
    let k = key(20, 0);
    let mut model = pattern(1, 0, len).to_vec();
    s.write(k, 0, model.clone().into()).await;

    // 1. The torn write reached K members (not the primary): it decodes, so it stands, and a
    //    partial write that follows lands on top of it.
    let lost = pattern(2, 0, len);
    s.torn(k, s.version(k).await + 1, &lost, &[1, 2]).await;
    model.copy_from_slice(&lost);
    let small = pattern(3, 100, 50);
    s.write(k, 100, small.clone()).await;
    model[100..150].copy_from_slice(&small);
    let (held, got) = s.read_all(k, len).await;
    assert!(held.iter().all(|h| *h == held[0]), "{held:x?}");
    assert!(
        got == model,
        "partial write after a torn write of K fragments"
    );

    // 2. The same, followed by a write of whole stripes (nothing read back first): before tags,
    //    members took it as a retry of the version they held and kept the other write's bytes.
    let lost = pattern(4, 0, len);
    s.torn(k, s.version(k).await + 1, &lost, &[1, 2]).await;
    let whole = pattern(5, 0, len);
    s.write(k, 0, whole.clone()).await;
    model.copy_from_slice(&whole);
    let (held, got) = s.read_all(k, len).await;
    assert!(held.iter().all(|h| *h == held[0]), "{held:x?}");
    assert!(
        got == model,
        "whole-stripe write after a torn write of K fragments"
    );

    // 3. The torn write reached one member, fewer than K: it never counts; the next write's
    //    fragment is rebuilt on that member.
    let lost = pattern(6, 0, len);
    s.torn(k, s.version(k).await + 1, &lost, &[2]).await;
    let small = pattern(7, sb as u64 + 10, 3000);
    s.write(k, sb as u64 + 10, small.clone()).await;
    model[sb + 10..sb + 3010].copy_from_slice(&small);
    let (held, got) = s.read_all(k, len).await;
    assert!(held.iter().all(|h| *h == held[0]), "{held:x?}");
    assert!(got == model, "write after a torn write below K");
    for n in &s.nodes {
        assert_eq!(n.error_lines(), 0, "{}", n.log_tail(20));
    }
}

/// A write torn below K while a member is away: one member holds a dead primary's write
/// (with what it overwrote kept), the primary the version before, the third is down and
/// out of sync. Neither version is on K among those that answer; the member goes back on
/// what it kept, and the next write lands on the version before. Before members kept what
/// they overwrote, reconcile found no version on K and the column could not be decoded
/// (`ReadOnly`) until the third came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_torn_below_k_goes_back_on_what_the_member_kept() {
    let mut s = Disperse21::start().await;
    let sb = 2 * FRAG as usize;
    let len = 3 * sb;
    let k = key(21, 0);
    let mut model = pattern(1, 0, len).to_vec();
    s.write(k, 0, model.clone().into()).await;
    let before = s.version(k).await;
    s.torn(k, before + 1, &pattern(2, 0, len), &[1]).await;
    s.nodes[2].sigkill().unwrap();
    // The group took member 2 out of sync: the primary's geometry says so.
    let mut g = s.geometry();
    g.in_sync = vec![s.members[0].brick, s.members[1].brick];
    let whole = pattern(3, 0, sb);
    let msg = Message::DisperseWrite(DisperseWrite {
        brick: s.members[0].brick,
        set: s.set,
        key: k,
        offset_bytes: 0,
        sync: false,
        geometry: g,
    });
    let r = client()
        .pool()
        .call(s.nodes[0].addr(), msg, whole.clone())
        .await;
    assert!(r.is_ok(), "{r:?}\n{}", s.nodes[0].log_tail(30));
    model[..sb].copy_from_slice(&whole);
    // Members 0 and 1 hold the same version, which decodes to the model.
    let stripes = len.div_ceil(sb);
    let mut held = Vec::new();
    let mut frags = Vec::new();
    for i in 0..2 {
        let (st, bytes) = client()
            .read(
                s.nodes[i].addr(),
                s.members[i].brick,
                k,
                0,
                stripes as u32 * FRAG,
            )
            .await
            .unwrap();
        held.push((st.version.0, st.tag));
        frags.push(Some(((st.version.0, st.tag), bytes.to_vec())));
    }
    frags.push(None);
    assert_eq!(held[0], held[1]);
    assert_eq!(held[0].0, before + 1, "the torn write never counted");
    let codec = ReedSolomonCodec::new(2, 1).unwrap();
    let (_, mut got) = decode_stripes(&codec, &frags, FRAG as usize, stripes).unwrap();
    got.truncate(len);
    assert!(got == model, "the column after a write torn below K");
    assert!(
        s.nodes[0].log_tail(200).contains("taking a fragment back"),
        "{}",
        s.nodes[0].log_tail(30)
    );
}

/// A replica primary journals what it writes while its set is degraded; a heal in journal
/// mode compares just those objects (a full heal compares all), copies what the member
/// missed; a pass since an earlier pass's mark compares only what was written after it; and
/// a write with every member in sync forgets the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_in_journal_mode_compares_only_what_was_written_while_degraded() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, ba) = must_start_single(da.path()).await;
    let (b, bb) = must_start_single(db.path()).await;
    let member = MemberRef {
        brick: bb,
        addr: b.addr().to_string(),
    };
    let set = SetRef {
        volume: VolumeId(1),
        set: 0,
        epoch: Epoch(1),
    };
    let c = client();
    let write = |k: ObjectKey, seed: u64, degraded: bool| {
        let msg = Message::SetWrite(SetWrite {
            brick: ba,
            set,
            key: k,
            offset_bytes: 0,
            sync: false,
            // Degraded: the member is away, the primary writes alone.
            members: if degraded {
                Vec::new()
            } else {
                vec![member.clone()]
            },
            degraded,
        });
        let c = c.clone();
        let addr = a.addr();
        async move {
            c.pool()
                .call(addr, msg, pattern(seed, 0, 10_000))
                .await
                .unwrap()
        }
    };
    let heal_since = |journal: bool, since: u64| {
        let msg = Message::HealObjects(HealObjects {
            brick: ba,
            set,
            target: member.clone(),
            geometry: None,
            after: None,
            limit: 1000,
            barrier: false,
            journal,
            since,
        });
        let c = c.clone();
        let addr = a.addr();
        async move {
            match c.pool().call(addr, msg, Bytes::new()).await.unwrap() {
                (Message::HealReply(h), _) => (h.scanned, h.copied, h.mark),
                other => panic!("{other:?}"),
            }
        }
    };
    let heal = |journal: bool| {
        let h = heal_since(journal, 0);
        async move {
            let (scanned, copied, _) = h.await;
            (scanned, copied)
        }
    };
    for i in 0..5 {
        write(key(100 + i, 0), i, false).await;
    }
    // The member is away: two objects change and one is created.
    for (i, seed) in [(101, 50), (103, 51), (105, 52)] {
        write(key(i, 0), seed, true).await;
    }
    assert_eq!(
        heal(true).await,
        (3, 3),
        "journal mode: the three written while degraded"
    );
    // A later pass since the mark of one before looks only at what was written after that
    // mark (a heal's barrier pass): one object changes while the member is still away.
    let (_, _, mark) = heal_since(true, 0).await;
    write(key(102, 0), 53, true).await;
    let (scanned, copied, _) = heal_since(true, mark).await;
    assert_eq!(
        (scanned, copied),
        (1, 1),
        "since a mark: the one object written after it"
    );
    assert_eq!(
        heal(false).await,
        (6, 0),
        "full: every object, all equal now"
    );
    for i in 100..106 {
        let (sa, da) = c.read(a.addr(), ba, key(i, 0), 0, 1 << 20).await.unwrap();
        let (sb, db) = c.read(b.addr(), bb, key(i, 0), 0, 1 << 20).await.unwrap();
        assert_eq!((sa, &da), (sb, &db), "object {i}");
    }
    // Everyone in sync again: the next write forgets the journal.
    write(key(100, 0), 60, false).await;
    assert_eq!(heal(true).await, (0, 0));
}

/// Unmounts a tmpfs when dropped (failures included).
struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A brick whose disk another program filled refuses writes with `NoSpace` — plain writes,
/// member writes at ever newer epochs (each records its epoch first) — and keeps running:
/// its database never meets ENOSPC (RocksDB 7.8 aborts the process on the write after a WAL
/// append failed; the fault suite's seed 52818651 lost a node so). Once space returns,
/// writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brick_on_a_full_disk_refuses_writes_and_keeps_running() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &disk,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .unwrap();
    let _guard = TmpfsGuard(disk.clone());
    let node = Brickd::start(
        &brickd_bin(),
        &d.path().join("data"),
        &[disk.join("b0")],
        &[],
    )
    .expect("start brickd");
    let addr = node.addr();
    let brick = client().list_bricks(addr).await.unwrap()[0].id;
    client()
        .write(addr, brick, key(30, 0), 0, pattern(1, 0, 100_000), true)
        .await
        .unwrap();
    // Another program fills the disk.
    let filler = disk.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = 0;
    for i in 0..100u64 {
        let r = client()
            .write(
                addr,
                brick,
                key(31, i as u32),
                0,
                pattern(i, 0, 4096),
                i % 2 == 0,
            )
            .await;
        if let Err(e) = r {
            assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
            refused += 1;
        }
        let msg = Message::MemberWrite(MemberWrite {
            brick,
            set: SetRef {
                volume: VolumeId(9),
                set: 0,
                epoch: Epoch(2 + i),
            },
            key: key(32, i as u32),
            offset_bytes: 0,
            version: ObjectVersion(1),
            tag: 1000 + i,
            parent_tag: 0,
            sync: true,
            degraded: i % 3 == 0,
            undo: true,
        });
        let r = client().pool().call(addr, msg, pattern(i, 0, 4096)).await;
        if let Err(e) = r {
            assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
            refused += 1;
        }
    }
    assert!(
        refused >= 190,
        "the full disk took writes: {refused} of 200 refused"
    );
    client().ping(addr).await.expect("brickd still runs");
    std::fs::remove_file(&filler).unwrap();
    client()
        .write(addr, brick, key(33, 0), 0, pattern(3, 0, 100_000), true)
        .await
        .expect("a write once space returned");
    let (_, got) = client()
        .read(addr, brick, key(30, 0), 0, 100_000)
        .await
        .unwrap();
    assert!(
        got == pattern(1, 0, 100_000),
        "what was written before the disk filled"
    );
}
