//! The metadata group with real brickd processes on loopback: a 3-voter group keeps every
//! acknowledged write and applies none twice across kill -9 of its leader; a restarted voter
//! catches up; a lagging voter is brought up by snapshot; a minority commits nothing; the
//! membership changes online under load.

mod common;

use brickfs_client::{MetaClient, MetaClientOptions, MetaError};
use brickfs_proto::meta::{AdminOp, GroupStatus, MetaOp, MetaRead, MetaReply, RenameFlags};
use brickfs_proto::{ErrorCode, Ino, NodeId, VolumeId};
use brickfs_testkit::Brickd;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

const ROOT: Ino = Ino(1);

struct Group {
    nodes: Vec<Brickd>,
    ids: Vec<NodeId>,
    _dir: tempfile::TempDir,
}

impl Group {
    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr()).collect()
    }

    fn client(&self, deadline: Duration) -> MetaClient {
        MetaClient::new(
            self.addrs(),
            MetaClientOptions {
                deadline,
                client_name: "test".into(),
                ..MetaClientOptions::default()
            },
        )
    }

    async fn status(&self, i: usize) -> Option<GroupStatus> {
        self.client(Duration::from_secs(2))
            .status_of(self.nodes[i].addr())
            .await
            .ok()
    }

    /// The index of the node every live member agrees leads.
    async fn must_leader(&self, live: &[usize]) -> usize {
        must_wait_for("a leader", Duration::from_secs(30), || async {
            let mut seen = None;
            for &i in live {
                let st = self.status(i).await?;
                let l = st.leader?;
                if seen.is_some_and(|s| s != l) {
                    return None;
                }
                seen = Some(l);
            }
            self.ids
                .iter()
                .position(|id| Some(*id) == seen)
                .filter(|p| live.contains(p))
        })
        .await
    }
}

/// Starts `n` brickd processes with metadata members and forms one group of voters.
async fn must_start_group(n: usize, extra: &[&str]) -> Group {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--meta"];
    args.extend_from_slice(extra);
    let mut nodes = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let node_dir = dir.path().join(format!("n{i}"));
        let node =
            Brickd::start(&brickd_bin(), &node_dir, &[node_dir.join("brick")], &args).unwrap();
        ids.push(client().ping(node.addr()).await.unwrap());
        nodes.push(node);
    }
    let g = Group {
        nodes,
        ids,
        _dir: dir,
    };
    let admin = g.client(Duration::from_secs(30));
    MetaClient::new(vec![g.nodes[0].addr()], MetaClientOptions::default())
        .admin(AdminOp::Init)
        .await
        .unwrap();
    for i in 1..n {
        admin
            .admin(AdminOp::AddMember {
                id: g.ids[i],
                addr: g.nodes[i].addr().to_string(),
                voter: true,
            })
            .await
            .unwrap();
    }
    g
}

/// Registers node 0 and creates a one-brick volume on its brick.
async fn must_volume(g: &Group, c: &MetaClient, name: &str) -> VolumeId {
    let (node, bricks) = brickfs_client::admin::peer_add(c, &client(), g.nodes[0].addr())
        .await
        .unwrap();
    let spec = vec![format!("{}:{}", node.addr, bricks[0].path)];
    brickfs_client::admin::volume_create(c, name, &spec)
        .await
        .unwrap()
        .id
}

fn create(volume: VolumeId, parent: Ino, name: &str) -> MetaOp {
    MetaOp::create_file(volume, parent, name, 0o644, true)
}

async fn must_attr(c: &MetaClient, op: MetaOp) -> brickfs_proto::meta::Attr {
    match c.write(op).await.unwrap() {
        MetaReply::Attr(a) => a,
        other => panic!("unexpected {other:?}"),
    }
}

async fn names(c: &MetaClient, volume: VolumeId, dir: Ino) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        match c
            .read(MetaRead::ReadDir {
                volume,
                ino: dir,
                after: after.clone(),
                limit: 100,
            })
            .await
            .unwrap()
        {
            MetaReply::Entries { entries, more } => {
                after = entries.last().map(|e| e.name.clone());
                out.extend(entries.into_iter().map(|e| e.name));
                if !more {
                    return out;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn code(e: &MetaError) -> Option<ErrorCode> {
    e.code()
}

/// The namespace rules through a one-voter group, each failure with its POSIX-shaped code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_voter_group_serves_the_namespace() {
    let g = must_start_group(1, &[]).await;
    let c = g.client(Duration::from_secs(20));
    let v = must_volume(&g, &c, "vol").await;
    assert_eq!(
        code(
            &c.write(MetaOp::CreateVolume {
                name: "vol".into(),
                spec: vec!["127.0.0.1:1:/x".into()]
            })
            .await
            .unwrap_err()
        ),
        Some(ErrorCode::Exists)
    );

    let d = must_attr(
        &c,
        MetaOp::Mkdir {
            volume: v,
            parent: ROOT,
            name: "d".into(),
            mode: 0o755,
            umask: 0,
            uid: 1,
            gid: 1,
        },
    )
    .await;
    let f = must_attr(&c, create(v, d.ino, "f")).await;
    assert_eq!(
        code(&c.write(create(v, d.ino, "f")).await.unwrap_err()),
        Some(ErrorCode::Exists)
    );
    assert_eq!(
        code(&c.write(create(v, f.ino, "x")).await.unwrap_err()),
        Some(ErrorCode::NotDir)
    );
    assert_eq!(
        code(
            &c.write(create(v, ROOT, &"n".repeat(256)))
                .await
                .unwrap_err()
        ),
        Some(ErrorCode::NameTooLong)
    );
    assert_eq!(
        code(&c.write(create(v, ROOT, "..")).await.unwrap_err()),
        Some(ErrorCode::InvalidPath)
    );
    assert_eq!(
        code(
            &c.write(MetaOp::Rmdir {
                volume: v,
                parent: ROOT,
                name: "d".into()
            })
            .await
            .unwrap_err()
        ),
        Some(ErrorCode::NotEmpty)
    );
    assert_eq!(
        code(
            &c.write(MetaOp::Unlink {
                volume: v,
                parent: ROOT,
                name: "d".into()
            })
            .await
            .unwrap_err()
        ),
        Some(ErrorCode::IsDir)
    );
    // Rename a directory below itself, and onto a non-empty directory.
    let sub = must_attr(
        &c,
        MetaOp::Mkdir {
            volume: v,
            parent: d.ino,
            name: "sub".into(),
            mode: 0o755,
            umask: 0,
            uid: 0,
            gid: 0,
        },
    )
    .await;
    let below = MetaOp::Rename {
        volume: v,
        parent: ROOT,
        name: "d".into(),
        new_parent: sub.ino,
        new_name: "x".into(),
        flags: RenameFlags::default(),
    };
    assert_eq!(
        code(&c.write(below).await.unwrap_err()),
        Some(ErrorCode::InvalidArgument)
    );
    must_attr(
        &c,
        MetaOp::Mkdir {
            volume: v,
            parent: ROOT,
            name: "e".into(),
            mode: 0o755,
            umask: 0,
            uid: 0,
            gid: 0,
        },
    )
    .await;
    let onto = MetaOp::Rename {
        volume: v,
        parent: ROOT,
        name: "e".into(),
        new_parent: ROOT,
        new_name: "d".into(),
        flags: RenameFlags::default(),
    };
    assert_eq!(
        code(&c.write(onto).await.unwrap_err()),
        Some(ErrorCode::NotEmpty)
    );
    // A file renamed over another replaces it; the old inode goes.
    let g2 = must_attr(&c, create(v, ROOT, "g")).await;
    let over = MetaOp::Rename {
        volume: v,
        parent: ROOT,
        name: "g".into(),
        new_parent: d.ino,
        new_name: "f".into(),
        flags: RenameFlags::default(),
    };
    c.write(over).await.unwrap();
    assert_eq!(names(&c, v, d.ino).await, vec!["f", "sub"]);
    match c
        .read(MetaRead::Lookup {
            volume: v,
            parent: d.ino,
            name: "f".into(),
        })
        .await
        .unwrap()
    {
        MetaReply::Attr(a) => assert_eq!(a.ino, g2.ino),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code(
            &c.read(MetaRead::GetAttr {
                volume: v,
                ino: f.ino
            })
            .await
            .unwrap_err()
        ),
        Some(ErrorCode::NotFound)
    );
    // Directory link counts follow mkdir and rmdir.
    let root_nlink = |r: MetaReply| match r {
        MetaReply::Attr(a) => a.nlink,
        o => panic!("{o:?}"),
    };
    assert_eq!(
        root_nlink(
            c.read(MetaRead::GetAttr {
                volume: v,
                ino: ROOT
            })
            .await
            .unwrap()
        ),
        4
    );
    c.write(MetaOp::Rmdir {
        volume: v,
        parent: ROOT,
        name: "e".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        root_nlink(
            c.read(MetaRead::GetAttr {
                volume: v,
                ino: ROOT
            })
            .await
            .unwrap()
        ),
        3
    );
    // Symlinks and xattrs.
    let l = must_attr(
        &c,
        MetaOp::Symlink {
            volume: v,
            parent: ROOT,
            name: "l".into(),
            target: "d/f".into(),
            uid: 0,
            gid: 0,
        },
    )
    .await;
    assert_eq!(
        c.read(MetaRead::ReadLink {
            volume: v,
            ino: l.ino
        })
        .await
        .unwrap(),
        MetaReply::Target("d/f".into())
    );
    c.write(MetaOp::SetXattr {
        volume: v,
        ino: l.ino,
        name: "user.a".into(),
        value: b"1".to_vec(),
        create_only: true,
        replace_only: false,
    })
    .await
    .unwrap();
    assert_eq!(
        c.read(MetaRead::GetXattr {
            volume: v,
            ino: l.ino,
            name: "user.a".into()
        })
        .await
        .unwrap(),
        MetaReply::Value(b"1".to_vec())
    );
    assert_eq!(
        code(
            &c.read(MetaRead::GetXattr {
                volume: v,
                ino: l.ino,
                name: "user.b".into()
            })
            .await
            .unwrap_err()
        ),
        Some(ErrorCode::NoData)
    );
}

/// kill -9 of the leader of a 3-voter group during a stream of writes: every write is
/// acknowledged once a new leader takes over, every acknowledged create is there, none was
/// applied twice (an exclusive create applied twice would answer Exists, and each link applied
/// twice would overcount nlink).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_writes_survive_leader_sigkill_and_apply_once() {
    let mut g = must_start_group(3, &[]).await;
    let c = g.client(Duration::from_secs(60));
    let v = must_volume(&g, &c, "vol").await;
    let target = must_attr(&c, create(v, ROOT, "target")).await;
    let leader = g.must_leader(&[0, 1, 2]).await;

    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..120 {
                let r = c.write(create(v, ROOT, &format!("f{i:03}"))).await;
                let l = c
                    .write(MetaOp::Link {
                        volume: v,
                        ino: target.ino,
                        new_parent: ROOT,
                        new_name: format!("l{i:03}"),
                    })
                    .await;
                results.push((r.map(|_| ()), l.map(|_| ())));
            }
            results
        })
    };
    // Kill the leader once the stream is under way.
    must_wait_for("writes under way", Duration::from_secs(30), || async {
        let st = g.status(leader).await?;
        (st.last_applied_index? > 40).then_some(())
    })
    .await;
    assert!(
        !writer.is_finished(),
        "the writes finished before the leader was killed"
    );
    g.nodes[leader].sigkill().unwrap();
    let results = writer.await.unwrap();
    for (i, (r, l)) in results.iter().enumerate() {
        assert!(r.is_ok(), "create {i}: {r:?}");
        assert!(l.is_ok(), "link {i}: {l:?}");
    }
    let all = names(&c, v, ROOT).await;
    for i in 0..120 {
        assert!(all.contains(&format!("f{i:03}")), "f{i:03} lost");
    }
    match c
        .read(MetaRead::GetAttr {
            volume: v,
            ino: target.ino,
        })
        .await
        .unwrap()
    {
        MetaReply::Attr(a) => assert_eq!(a.nlink, 121),
        other => panic!("{other:?}"),
    }

    // The killed voter restarts and catches up with the group.
    g.nodes[leader].restart().unwrap();
    let live: Vec<usize> = (0..3).collect();
    let new_leader = g.must_leader(&live).await;
    let target_index = g.status(new_leader).await.unwrap().last_log_index.unwrap();
    must_wait_for(
        "the restarted voter to catch up",
        Duration::from_secs(30),
        || async {
            let st = g.status(leader).await?;
            (st.last_applied_index? >= target_index).then_some(())
        },
    )
    .await;
}

/// A voter that missed more entries than the log keeps is brought up by a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_voter_is_brought_up_by_snapshot() {
    let mut g = must_start_group(3, &["--meta-snapshot-logs", "20"]).await;
    let c = g.client(Duration::from_secs(30));
    let v = must_volume(&g, &c, "vol").await;
    let leader = g.must_leader(&[0, 1, 2]).await;
    let lagging = (leader + 1) % 3;
    g.nodes[lagging].sigkill().unwrap();
    for i in 0..150 {
        c.write(create(v, ROOT, &format!("f{i}"))).await.unwrap();
    }
    g.nodes[lagging].restart().unwrap();
    let target = g.status(leader).await.unwrap().last_applied_index.unwrap();
    must_wait_for(
        "the lagging voter to catch up",
        Duration::from_secs(60),
        || async {
            let st = g.status(lagging).await?;
            (st.last_applied_index? >= target).then_some(())
        },
    )
    .await;
    let log = std::fs::read_to_string(g.nodes[lagging].log_path()).unwrap();
    assert!(
        log.contains("installed metadata snapshot"),
        "no snapshot was installed:\n{}",
        g.nodes[lagging].log_tail(40)
    );
    // The caught-up voter serves the state once it leads: stop the others' leadership by
    // asking it directly for a local view through the group.
    assert_eq!(names(&c, v, ROOT).await.len(), 150);
}

/// Two of three voters frozen with SIGSTOP: the remaining one commits nothing (the write
/// times out and is not there later); after SIGCONT the group carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_commits_nothing() {
    let g = must_start_group(3, &[]).await;
    let c = g.client(Duration::from_secs(30));
    let v = must_volume(&g, &c, "vol").await;
    let leader = g.must_leader(&[0, 1, 2]).await;
    let alone = (leader + 1) % 3;
    let frozen: Vec<usize> = (0..3).filter(|i| *i != alone).collect();
    for &i in &frozen {
        g.nodes[i].sigstop().unwrap();
    }
    let minority = MetaClient::new(
        vec![g.nodes[alone].addr()],
        MetaClientOptions {
            deadline: Duration::from_secs(4),
            client_name: "minority".into(),
            ..MetaClientOptions::default()
        },
    );
    let r = minority.write(create(v, ROOT, "split")).await;
    assert!(matches!(r, Err(MetaError::Unavailable { .. })), "{r:?}");
    for &i in &frozen {
        g.nodes[i].sigcont().unwrap();
    }
    // The group carries on, and the refused write never happened.
    must_attr(&c, create(v, ROOT, "after")).await;
    let all = names(&c, v, ROOT).await;
    assert!(
        !all.contains(&"split".to_string()),
        "a minority write was committed: {all:?}"
    );
}

/// Membership 3 → 5 → 3 while a client keeps writing: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_online_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = must_start_group(3, &[]).await;
    for i in 3..5 {
        let node_dir = dir.path().join(format!("n{i}"));
        let node = Brickd::start(
            &brickd_bin(),
            &node_dir,
            &[node_dir.join("brick")],
            &["--meta"],
        )
        .unwrap();
        g.ids.push(client().ping(node.addr()).await.unwrap());
        g.nodes.push(node);
    }
    let c = g.client(Duration::from_secs(60));
    let v = must_volume(&g, &c, "vol").await;
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                c.write(create(v, ROOT, &format!("f{i}"))).await.unwrap();
            }
        })
    };
    let admin = g.client(Duration::from_secs(60));
    for i in 3..5 {
        admin
            .admin(AdminOp::AddMember {
                id: g.ids[i],
                addr: g.nodes[i].addr().to_string(),
                voter: true,
            })
            .await
            .unwrap();
    }
    let st = g.status(0).await.unwrap();
    assert_eq!(st.members.iter().filter(|m| m.voter).count(), 5);
    for i in 0..2 {
        admin
            .admin(AdminOp::RemoveMember { id: g.ids[i] })
            .await
            .unwrap();
    }
    writer.await.unwrap();
    let st = must_wait_for("the new membership", Duration::from_secs(30), || async {
        let st = g.status(4).await?;
        (st.members.len() == 3).then_some(st)
    })
    .await;
    assert!(
        st.members
            .iter()
            .all(|m| m.voter && g.ids[2..].contains(&m.id)),
        "{st:?}"
    );
    let c2 = MetaClient::new(g.addrs()[2..].to_vec(), MetaClientOptions::default());
    assert_eq!(names(&c2, v, ROOT).await.len(), 150);
}

/// Locks through the group: a write lock of one session blocks another session's overlapping
/// lock; unlocking part of the range splits it; when the holder's lease runs out (it stops
/// talking), its locks are released and the waiter gets the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_conflict_split_and_die_with_their_session() {
    use brickfs_proto::meta::{LockKind, LockSpec};
    let g = must_start_group(1, &[]).await;
    let holder = MetaClient::new(
        g.addrs(),
        MetaClientOptions {
            lease: Duration::from_millis(1500),
            client_name: "holder".into(),
            ..MetaClientOptions::default()
        },
    );
    let waiter = g.client(Duration::from_secs(10));
    let v = must_volume(&g, &waiter, "vol").await;
    let f = must_attr(&waiter, create(v, ROOT, "f")).await;
    let lock = |owner: u64, start: u64, end: u64, kind: LockKind| MetaOp::SetLock {
        volume: v,
        ino: f.ino,
        lock: LockSpec {
            owner,
            pid: 1,
            start,
            end,
            kind,
        },
    };
    holder
        .write(lock(1, 0, 100, LockKind::Write))
        .await
        .unwrap();
    let blocked = waiter
        .write(lock(2, 50, 60, LockKind::Read))
        .await
        .unwrap_err();
    assert_eq!(blocked.code(), Some(ErrorCode::WouldBlock), "{blocked}");
    // Unlock the middle: the holder keeps 0..40 and 70..100.
    holder
        .write(lock(1, 40, 70, LockKind::Unlock))
        .await
        .unwrap();
    waiter.write(lock(2, 50, 60, LockKind::Read)).await.unwrap();
    assert_eq!(
        waiter
            .write(lock(2, 30, 45, LockKind::Read))
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::WouldBlock)
    );
    let probe = MetaRead::GetLock {
        volume: v,
        ino: f.ino,
        session: waiter.session_id().unwrap(),
        lock: LockSpec {
            owner: 2,
            pid: 1,
            start: 75,
            end: 76,
            kind: LockKind::Write,
        },
    };
    match waiter.read(probe).await.unwrap() {
        MetaReply::Lock(Some(held)) => assert_eq!((held.lock.start, held.lock.end), (70, 100)),
        other => panic!("{other:?}"),
    }
    // flock: exclusive against shared.
    let fl = |owner: u64, kind: LockKind| MetaOp::Flock {
        volume: v,
        ino: f.ino,
        owner,
        kind,
    };
    holder.write(fl(1, LockKind::Read)).await.unwrap();
    assert_eq!(
        waiter
            .write(fl(2, LockKind::Write))
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::WouldBlock)
    );
    // The holder goes silent; its lease expires and its locks go with it.
    drop(holder);
    must_wait_for(
        "the expired holder's locks to go",
        Duration::from_secs(20),
        || async {
            waiter.write(lock(2, 0, 100, LockKind::Write)).await.ok()?;
            waiter.write(fl(2, LockKind::Write)).await.ok()
        },
    )
    .await;
}

/// A client idle past its lease gets a new session on its next write instead of an error;
/// a client that renews its lease keeps its session (and so its locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_reopen_their_session_and_keepalive_keeps_it() {
    let g = must_start_group(1, &[]).await;
    let short = |name: &str| {
        MetaClient::new(
            g.addrs(),
            MetaClientOptions {
                lease: Duration::from_millis(1200),
                client_name: name.into(),
                ..MetaClientOptions::default()
            },
        )
    };
    let idle = short("idle");
    let kept = short("kept");
    let v = must_volume(&g, &idle, "vol").await;
    must_attr(&kept, create(v, ROOT, "k0")).await;
    let _keepalive = kept.spawn_keepalive(Duration::from_millis(300));
    let first = idle.session_id().unwrap();
    let kept_id = kept.session_id().unwrap();
    let observer = g.client(Duration::from_secs(10));
    must_wait_for(
        "the idle session to expire",
        Duration::from_secs(20),
        || async {
            match observer.read(MetaRead::ListSessions).await.ok()? {
                MetaReply::Sessions(list) => (!list.iter().any(|s| s.id == first)).then_some(list),
                _ => None,
            }
        },
    )
    .await;
    must_attr(&idle, create(v, ROOT, "after-idle")).await;
    assert_ne!(
        idle.session_id().unwrap(),
        first,
        "a new session was opened"
    );
    must_attr(&kept, create(v, ROOT, "k1")).await;
    assert_eq!(
        kept.session_id().unwrap(),
        kept_id,
        "the renewed session was kept"
    );
}
