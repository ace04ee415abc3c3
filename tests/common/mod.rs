//! Helpers shared by the integration tests: a client, object keys, and data patterns whose
//! every byte depends on its offset (so a misplaced byte never compares equal).

#![allow(dead_code)]

pub mod mount;

use brickfs_client::{BrickClient, MetaClient, MetaClientOptions, VolumeClient};
use brickfs_proto::meta::AdminOp;
use brickfs_proto::rpc::ClientOptions;
use brickfs_proto::{BrickId, Ino, ObjectKey, VolumeId};
use brickfs_testkit::Brickd;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub fn brickd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_brickd"))
}

pub fn client() -> BrickClient {
    BrickClient::new(ClientOptions {
        request_timeout: Duration::from_secs(60),
        peer_name: "test".into(),
        ..ClientOptions::default()
    })
}

pub fn key(ino: u64, column: u32) -> ObjectKey {
    ObjectKey {
        volume: VolumeId(1),
        ino: Ino(ino),
        column,
    }
}

/// The byte at `offset` of pattern `seed`.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = (offset >> 3)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (x >> ((offset & 7) * 8)) as u8 ^ (x >> 56) as u8
}

pub fn pattern(seed: u64, offset: u64, len: usize) -> Bytes {
    Bytes::from(
        (0..len as u64)
            .map(|i| pattern_byte(seed, offset + i))
            .collect::<Vec<u8>>(),
    )
}

/// Starts one brickd with one brick in `dir` and returns it with the brick's id.
pub async fn must_start_single(dir: &std::path::Path) -> (Brickd, BrickId) {
    let node = Brickd::start(&brickd_bin(), &dir.join("data"), &[dir.join("brick0")], &[])
        .expect("start brickd");
    let bricks = client()
        .list_bricks(node.addr())
        .await
        .expect("list bricks");
    assert_eq!(bricks.len(), 1);
    (node, bricks[0].id)
}

/// Polls `check` every `every` until it returns `Some`, for at most `limit`; panics naming
/// `what` when it never does. This is a readiness check with a bound, not a sleep.
pub async fn must_wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
    }
}

/// The file of an object under a brick's `objects` folder, by the end of its name
/// (`{ino:016x}-{column:08x}`).
pub fn find_object_file(dir: &std::path::Path, suffix: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find_object_file(&path, suffix) {
                return Some(found);
            }
        } else if path.to_string_lossy().ends_with(suffix) {
            return Some(path);
        }
    }
    None
}

/// The node address serving brick `b` of a volume.
pub fn node_addr(rec: &brickfs_proto::meta::VolumeRecord, b: BrickId) -> std::net::SocketAddr {
    let vb = rec
        .bricks
        .iter()
        .find(|x| x.brick == b)
        .expect("a brick of the volume");
    brickfs_client::volume::brick_addr(vb).expect("a HOST:PORT brick address")
}

/// Runs the `brickfs` CLI: exit code, stdout, stderr.
pub fn brickfs<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_brickfs"))
        .args(args)
        .env_remove("BRICKFS_META")
        .env_remove("BRICKFS_CLUSTER_KEY_FILE")
        .output()
        .expect("run brickfs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the `brickfs` CLI and requires success: its stdout.
pub fn must_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let (code, out, err) = brickfs(args);
    assert_eq!(code, 0, "brickfs {args:?} failed:\n{out}\n{err}");
    out
}

/// Waits (bounded) until the node at `addr` serves reads: a node with a metadata group holds a
/// lease only once the group acknowledged its heartbeat (just after `peer add`), and refuses
/// reads (`Busy`) before.
pub async fn must_serve_reads(addr: std::net::SocketAddr) {
    must_serve_reads_with(addr, client()).await
}

/// As `must_serve_reads`, asking with `c` (a client with its own credential).
#[allow(dead_code)]
pub async fn must_serve_reads_with(addr: std::net::SocketAddr, c: BrickClient) {
    let bricks = c.list_bricks(addr).await.expect("list bricks");
    let Some(b) = bricks.first() else { return };
    let probe = ObjectKey {
        volume: VolumeId(u64::MAX),
        ino: Ino(u64::MAX),
        column: 0,
    };
    must_wait_for("the node's lease", Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            match c.read(addr, b.id, probe, 0, 1).await {
                Err(e) if e.code() == Some(brickfs_proto::ErrorCode::Busy) => None,
                _ => Some(()),
            }
        }
    })
    .await;
}

/// Waits (bounded) for brickd to log `mark` (e.g. `metrics listening addr=`) and returns the
/// address that follows it.
pub async fn must_log_addr(node: &Brickd, mark: &str) -> std::net::SocketAddr {
    must_wait_for(mark, Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(node.log_path()).ok()?;
        let rest = log.split(mark).nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
    .await
}

/// Three brickd nodes with three bricks each; node 0 runs the metadata group.
pub struct Cluster {
    pub nodes: Vec<Brickd>,
    pub dir: tempfile::TempDir,
    pub meta: MetaClient,
}

impl Cluster {
    /// Brick `i` of node `n`, as a spec word.
    pub fn brick(&self, n: usize, i: usize) -> String {
        format!(
            "{}:{}",
            self.nodes[n].addr(),
            self.nodes[n].bricks()[i].display()
        )
    }
}

pub async fn must_cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Brickd> = Vec::new();
    for n in 0..3 {
        let node_dir = dir.path().join(format!("n{n}"));
        let bricks: Vec<_> = (0..3).map(|i| node_dir.join(format!("b{i}"))).collect();
        // Every node heartbeats to the metadata group (node 0), or its bricks would be taken
        // out of their sets as silent.
        let extra = match nodes.first() {
            None => vec!["--meta".to_string()],
            Some(first) => vec!["--meta-peers".to_string(), first.addr().to_string()],
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        nodes.push(Brickd::start(&brickd_bin(), &node_dir, &bricks, &extra).unwrap());
    }
    let meta = MetaClient::new(
        vec![nodes[0].addr()],
        MetaClientOptions {
            client_name: "test".into(),
            ..MetaClientOptions::default()
        },
    );
    meta.admin(AdminOp::Init).await.unwrap();
    for n in &nodes {
        brickfs_client::admin::peer_add(&meta, &client(), n.addr())
            .await
            .unwrap();
    }
    for n in &nodes {
        must_serve_reads(n.addr()).await;
    }
    Cluster { nodes, dir, meta }
}

/// Creates and starts volume `name` from `head` (the keywords) and bricks (node, brick index),
/// with stripe unit `unit`, and opens it.
pub async fn must_volume_with_unit(
    c: &Cluster,
    name: &str,
    head: &str,
    bricks: &[(usize, usize)],
    unit: u64,
) -> Arc<VolumeClient> {
    let mut spec: Vec<String> = head.split_whitespace().map(String::from).collect();
    spec.extend(bricks.iter().map(|(n, i)| c.brick(*n, *i)));
    brickfs_client::admin::volume_create(&c.meta, name, &spec)
        .await
        .unwrap();
    c.meta
        .write(brickfs_proto::meta::MetaOp::SetVolumeOption {
            name: name.into(),
            key: "stripe-unit".into(),
            value: unit.to_string(),
        })
        .await
        .unwrap();
    c.meta
        .write(brickfs_proto::meta::MetaOp::StartVolume { name: name.into() })
        .await
        .unwrap();
    VolumeClient::open(c.meta.clone(), client(), name)
        .await
        .unwrap()
}

/// One brickd with a metadata member and `n` bricks under `dir`, and a started volume "vol"
/// laid out as `head` (the words before the bricks, e.g. "replica 3"; "" distributes), with
/// the volume options `options` set before the start. The node, the mount source
/// (`ADDR/vol`) and a metadata client.
pub async fn must_one_node_volume(
    dir: &std::path::Path,
    head: &str,
    n: usize,
    options: &[(&str, &str)],
) -> (Brickd, String, MetaClient) {
    use brickfs_proto::meta::MetaOp;
    let bricks: Vec<_> = (0..n).map(|i| dir.join(format!("b{i}"))).collect();
    let node = Brickd::start(&brickd_bin(), &dir.join("node"), &bricks, &["--meta"]).unwrap();
    let meta = MetaClient::new(vec![node.addr()], MetaClientOptions::default());
    meta.admin(AdminOp::Init).await.unwrap();
    brickfs_client::admin::peer_add(&meta, &client(), node.addr())
        .await
        .unwrap();
    let mut spec: Vec<String> = head.split_whitespace().map(String::from).collect();
    spec.extend(
        bricks
            .iter()
            .map(|b| format!("{}:{}", node.addr(), b.display())),
    );
    brickfs_client::admin::volume_create(&meta, "vol", &spec)
        .await
        .unwrap();
    for (key, value) in options {
        meta.write(MetaOp::SetVolumeOption {
            name: "vol".into(),
            key: key.to_string(),
            value: value.to_string(),
        })
        .await
        .unwrap();
    }
    meta.write(MetaOp::StartVolume { name: "vol".into() })
        .await
        .unwrap();
    let source = format!("{}/vol", node.addr());
    (node, source, meta)
}

/// A `struct flock` for fcntl: `typ` (F_RDLCK, F_WRLCK, F_UNLCK) over `len` bytes at `start`
/// (`len` 0: to the end of the file).
pub fn lock_range(typ: i32, start: i64, len: i64) -> nix::libc::flock {
    nix::libc::flock {
        l_type: typ as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// Reads a member's whole object straight from its brick, in parts of 8 MiB (objects may be
/// larger than a frame). A brick that just rejoined its set refuses client reads until its
/// node's next heartbeat (StaleEpoch): that is waited out, within 10 s. The state is the
/// first part's.
pub async fn must_read_object(
    bc: &BrickClient,
    addr: std::net::SocketAddr,
    brick: BrickId,
    key: ObjectKey,
) -> (brickfs_proto::msg::ObjectState, Vec<u8>) {
    let mut out = Vec::new();
    let mut first = None;
    loop {
        let at = out.len() as u64;
        let (st, bytes) = must_wait_for(
            "a member to serve reads",
            Duration::from_secs(10),
            || async move {
                match bc.read(addr, brick, key, at, 8 << 20).await {
                    Ok(r) => Some(r),
                    Err(e) if e.code() == Some(brickfs_proto::ErrorCode::StaleEpoch) => None,
                    Err(e) => panic!("read {key} from {brick}: {e}"),
                }
            },
        )
        .await;
        let state = *first.get_or_insert(st);
        if bytes.is_empty() || out.len() as u64 + bytes.len() as u64 >= state.len_bytes {
            out.extend_from_slice(&bytes);
            return (state, out);
        }
        out.extend_from_slice(&bytes);
    }
}

/// A keyed single-node cluster with the metadata group and two bricks under `dir/n`,
/// initialised: the node, its key file and an admin credential file (`dir/admin.cred`).
#[allow(dead_code)]
pub fn must_keyed_node(
    dir: &std::path::Path,
    key_text: &str,
) -> (Brickd, std::path::PathBuf, std::path::PathBuf) {
    let key = dir.join("cluster.key");
    std::fs::write(&key, key_text).unwrap();
    let d = dir.join("n");
    let node = Brickd::start(
        &brickd_bin(),
        &d,
        &[d.join("b0"), d.join("b1")],
        &["--meta", "--cluster-key-file", key.to_str().unwrap()],
    )
    .unwrap();
    let at = node.addr().to_string();
    let k = key.to_str().unwrap();
    must_ok(&["--credential-file", k, "cluster", "init", &at]);
    let admin_text = must_ok(&["--credential-file", k, "cluster", "credential", "admin"]);
    assert!(admin_text.starts_with("brickfs-admin-1:"), "{admin_text}");
    let admin = dir.join("admin.cred");
    std::fs::write(&admin, &admin_text).unwrap();
    (node, key, admin)
}
