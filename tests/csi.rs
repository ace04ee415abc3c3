//! The CSI driver as the kubelet and the CSI sidecars use it: the real `brickfs-csi` program
//! over its unix socket, with real brickd nodes and the mountd daemons it starts. The checks
//! a CSI sanity suite makes (idempotent and conflicting creates, deletes of unknown volumes,
//! capability validation, pagination), stage → publish → unpublish → unstage on two node
//! plugins with files crossing between them, read-only publishes, quotas as capacities,
//! expansion then stats, and staged mounts that outlive a SIGKILLed plugin.

mod common;

use brickfs_csi::pb;
use brickfs_csi::pb::controller_client::ControllerClient;
use brickfs_csi::pb::identity_client::IdentityClient;
use brickfs_csi::pb::node_client::NodeClient;
use brickfs_csi::pb::volume_capability::access_mode::Mode;
use brickfs_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use brickfs_csi::tonic::{Code, transport::Channel};
use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A brickfs-csi process, stopped by pid when dropped (its staged mounts are not: see
/// [`Mounts`]).
struct Plugin {
    child: Option<Child>,
    socket: PathBuf,
}

impl Plugin {
    async fn start(c: &Cluster, dir: &Path, name: &str, controller: bool) -> Plugin {
        Self::start_with(c.nodes[0].addr(), dir, name, controller, &[]).await
    }

    async fn start_with(
        meta: std::net::SocketAddr,
        dir: &Path,
        name: &str,
        controller: bool,
        extra: &[&str],
    ) -> Plugin {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_brickfs-csi"));
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--meta")
            .arg(meta.to_string())
            .arg("--node-id")
            .arg(name)
            .arg("--state-dir")
            .arg(dir.join(format!("{name}-state")))
            .arg("--mountd")
            .arg(env!("CARGO_BIN_EXE_mountd"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if controller {
            cmd.arg("--controller");
        }
        cmd.args(extra);
        // Its own process group, so that `kill` takes the plugin and every child it left in
        // its group, as a container's end does.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("start brickfs-csi");
        let p = Plugin {
            child: Some(child),
            socket,
        };
        must_wait_for("the plugin's Probe", Duration::from_secs(30), || async {
            let ch = brickfs_csi::connect(&p.socket).await.ok()?;
            let r = IdentityClient::new(ch)
                .probe(pb::ProbeRequest {})
                .await
                .ok()?;
            (r.into_inner().ready == Some(true)).then_some(())
        })
        .await;
        p
    }

    async fn channel(&self) -> Channel {
        brickfs_csi::connect(&self.socket).await.unwrap()
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// SIGKILL to the plugin's process group (the plugin and the children in its group).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every mount under a test folder and the mountd daemons serving them: unmounted and
/// stopped (by pid) when dropped, failures included.
struct Mounts(PathBuf);

/// The mount points under `dir`, deepest last.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Pids of mountd processes whose command line names a path under `dir`.
fn mountd_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let needle = dir.to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("mountd") && cmd.contains(&needle) && !cmd.contains("brickfs-csi") {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in mounts_under(&self.0).iter().rev() {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
        for pid in mountd_pids(&self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn cap(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn rwx() -> pb::VolumeCapability {
    cap(Mode::MultiNodeMultiWriter)
}

fn range(req: i64, lim: i64) -> Option<pb::CapacityRange> {
    Some(pb::CapacityRange {
        required_bytes: req,
        limit_bytes: lim,
    })
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create_req(name: &str, size: i64, p: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![rwx()],
        parameters: params(p),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, brickfs_csi::tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => s.code(),
    }
}

async fn stage(n: &mut NodeClient<Channel>, id: &str, staging: &Path) {
    n.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwx()),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn publish(
    n: &mut NodeClient<Channel>,
    id: &str,
    staging: &Path,
    target: &Path,
    read_only: bool,
) -> Result<(), brickfs_csi::tonic::Status> {
    n.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwx()),
        readonly: read_only,
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn unpublish(n: &mut NodeClient<Channel>, id: &str, target: &Path) {
    n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
}

async fn unstage(
    n: &mut NodeClient<Channel>,
    id: &str,
    staging: &Path,
) -> Result<(), brickfs_csi::tonic::Status> {
    n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .map(|_| ())
}

/// Bytes (total, used) as NodeGetVolumeStats reports them.
async fn stats(n: &mut NodeClient<Channel>, id: &str, path: &Path) -> (i64, i64) {
    let r = n
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let b = r
        .usage
        .iter()
        .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
        .expect("a bytes usage");
    (b.total, b.used)
}

async fn must_shared_volume(c: &Cluster, name: &str) {
    let spec = vec![c.brick(1, 0)];
    let v = brickfs_client::admin::volume_create(&c.meta, name, &spec)
        .await
        .unwrap();
    c.meta
        .write(brickfs_proto::meta::MetaOp::StartVolume { name: v.name })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_answers_as_the_spec_says() {
    let c = must_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let _mounts = Mounts(dir.path().to_path_buf());
    let p = Plugin::start(&c, dir.path(), "n1", true).await;
    let mut id = IdentityClient::new(p.channel().await);
    let info = id
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.brickfs.io");
    let caps = id
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 2, "{caps:?}");
    let mut ctl = p.controller().await;
    let ccaps = ctl
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ccaps.capabilities.len(), 4);

    must_shared_volume(&c, "shared").await;
    // A volume made by hand and never started, of another layout, is not adopted as a claim
    // whose create was cut off.
    brickfs_client::admin::volume_create(&c.meta, "pvc-hand", &[c.brick(2, 0)])
        .await
        .unwrap();
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-hand", 1 << 20, &[("type", "replicate-3")]))
                .await
        ),
        Code::AlreadyExists
    );
    // A whole volume per claim: idempotent by name, refused when the size conflicts.
    let mib = 1i64 << 20;
    let made = ctl
        .create_volume(create_req("pvc-a", 8 * mib, &[("type", "replicate-3")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(made.volume_id, "v/pvc-a");
    assert_eq!(made.capacity_bytes, 8 * mib);
    let again = ctl
        .create_volume(create_req("pvc-a", 8 * mib, &[("type", "replicate-3")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, made);
    let rec = brickfs_client::admin::volume_info(&c.meta, "pvc-a")
        .await
        .unwrap();
    assert_eq!((rec.replica, rec.bricks.len()), (3, 3));
    // Striped: files cut across two sets.
    let striped = ctl
        .create_volume(create_req(
            "pvc-s",
            2 * mib,
            &[("type", "distribute"), ("stripe", "2")],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let rec = brickfs_client::admin::volume_info(&c.meta, "pvc-s")
        .await
        .unwrap();
    assert_eq!((rec.stripe, rec.bricks.len()), (2, 2), "{}", rec.type_name);
    // The same name with other parameters is another claim: refused.
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-a", 8 * mib, &[("type", "distribute")]))
                .await
        ),
        Code::AlreadyExists
    );
    // What the driver did not make is never taken over: not the shared volume, not a
    // volume made by hand with files in it; deleting its id leaves it alone.
    assert_eq!(
        code(
            ctl.create_volume(create_req("shared", mib, &[("type", "distribute")]))
                .await
        ),
        Code::AlreadyExists
    );
    let shared_id = brickfs_client::admin::volume_info(&c.meta, "shared")
        .await
        .unwrap()
        .id;
    let root_quota = |q: Vec<brickfs_proto::meta::QuotaInfo>| q.iter().any(|q| q.path == "/");
    let quotas = match c
        .meta
        .read(brickfs_proto::meta::MetaRead::Quotas { volume: shared_id })
        .await
        .unwrap()
    {
        brickfs_proto::meta::MetaReply::Quotas(q) => q,
        other => panic!("{other:?}"),
    };
    assert!(!root_quota(quotas), "a quota was put on the shared volume");
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "v/shared".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        brickfs_client::admin::volume_info(&c.meta, "shared")
            .await
            .is_ok(),
        "deleting an id the driver never gave deleted a volume"
    );
    let mut bigger = create_req("pvc-a", 16 * mib, &[("type", "replicate-3")]);
    bigger.capacity_range = range(16 * mib, 16 * mib);
    assert_eq!(code(ctl.create_volume(bigger).await), Code::AlreadyExists);

    // Bad requests, each refused with the spec's code and nothing made.
    assert_eq!(
        code(ctl.create_volume(create_req("", mib, &[])).await),
        Code::InvalidArgument
    );
    let mut no_caps = create_req("pvc-x", mib, &[]);
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(ctl.create_volume(no_caps).await),
        Code::InvalidArgument
    );
    let mut block = create_req("pvc-x", mib, &[]);
    block.volume_capabilities = vec![pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }];
    assert_eq!(code(ctl.create_volume(block).await), Code::InvalidArgument);
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-x", mib, &[("tpye", "distribute")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-x", mib, &[("type", "disperse-8+4")]))
                .await
        ),
        Code::ResourceExhausted
    );
    let mut upside_down = create_req("pvc-x", 2 * mib, &[]);
    upside_down.capacity_range = range(2 * mib, mib);
    assert_eq!(code(ctl.create_volume(upside_down).await), Code::OutOfRange);
    assert!(
        brickfs_client::admin::volume_info(&c.meta, "pvc-x")
            .await
            .is_err(),
        "a refused create made a volume"
    );

    // A directory per claim in a shared volume (made before any claim took its brick), its
    // quota the capacity.
    let dp = [("mode", "directory"), ("volume", "shared")];
    let d = ctl
        .create_volume(create_req("pvc-d", 4 * mib, &dp))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (d.volume_id.as_str(), d.capacity_bytes),
        ("d/shared/pvc-d", 4 * mib)
    );
    assert_eq!(
        ctl.create_volume(create_req("pvc-d", 4 * mib, &dp))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        d
    );
    assert_eq!(
        code(
            ctl.create_volume(create_req(
                "pvc-e",
                mib,
                &[("mode", "directory"), ("volume", "nosuch")]
            ))
            .await
        ),
        Code::InvalidArgument
    );
    // A directory made by hand (with a file) is not taken over either.
    let user = brickfs_client::admin::volume_info(&c.meta, "shared")
        .await
        .unwrap();
    let dir = match c
        .meta
        .write(brickfs_proto::meta::MetaOp::Mkdir {
            volume: user.id,
            parent: brickfs_proto::Ino(1),
            name: "userdata".into(),
            mode: 0o755,
            umask: 0,
            uid: 0,
            gid: 0,
        })
        .await
        .unwrap()
    {
        brickfs_proto::meta::MetaReply::Attr(a) => a.ino,
        other => panic!("{other:?}"),
    };
    c.meta
        .write(brickfs_proto::meta::MetaOp::Create {
            volume: user.id,
            parent: dir,
            name: "keep".into(),
            kind: brickfs_proto::meta::FileKind::File,
            mode: 0o644,
            umask: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        })
        .await
        .unwrap();
    assert_eq!(
        code(ctl.create_volume(create_req("userdata", mib, &dp)).await),
        Code::AlreadyExists
    );
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "d/shared/userdata".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        c.meta
            .read(brickfs_proto::meta::MetaRead::Lookup {
                volume: user.id,
                parent: dir,
                name: "keep".into(),
            })
            .await
            .is_ok(),
        "deleting a directory the driver did not make removed its files"
    );
    // Nor an empty one.
    c.meta
        .write(brickfs_proto::meta::MetaOp::Mkdir {
            volume: user.id,
            parent: brickfs_proto::Ino(1),
            name: "emptydir".into(),
            mode: 0o755,
            umask: 0,
            uid: 0,
            gid: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        code(ctl.create_volume(create_req("emptydir", mib, &dp)).await),
        Code::AlreadyExists
    );
    // A directory claim is no larger than its shared volume.
    assert_eq!(
        code(
            ctl.create_volume(create_req("pvc-huge", i64::MAX / 2, &dp))
                .await
        ),
        Code::OutOfRange
    );
    // A claim's volume is no shared volume for directory claims.
    assert_eq!(
        code(
            ctl.create_volume(create_req(
                "pvc-in",
                mib,
                &[("mode", "directory"), ("volume", "pvc-a")]
            ))
            .await
        ),
        Code::InvalidArgument
    );
    // A CO name that is no volume name maps to a stable one.
    let odd = ctl
        .create_volume(create_req("sanity test/Ü", mib, &dp))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(odd.volume_id.starts_with("d/shared/csi-"), "{odd:?}");
    // Another CO name that is the digest's text is another claim, not this one.
    let digest_name = odd.volume_id.trim_start_matches("d/shared/").to_string();
    assert_eq!(
        code(ctl.create_volume(create_req(&digest_name, mib, &dp)).await),
        Code::AlreadyExists
    );

    // Capabilities.
    let validate =
        |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    let ok = ctl
        .validate_volume_capabilities(validate(
            "v/pvc-a",
            vec![rwx(), cap(Mode::MultiNodeReaderOnly)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = ctl
        .validate_volume_capabilities(validate(
            "d/shared/pvc-d",
            vec![pb::VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume {
                    fs_type: "ext4".into(),
                    ..Default::default()
                })),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("v/nope", vec![rwx()]))
                .await
        ),
        Code::NotFound
    );
    let mut other_params = validate("d/shared/pvc-d", vec![rwx()]);
    other_params.parameters = params(&[("type", "distribute")]);
    let no = ctl
        .validate_volume_capabilities(other_params)
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none(), "{no:?}");
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("v/pvc-a", vec![]))
                .await
        ),
        Code::InvalidArgument
    );

    // Expansion grows the quota; a smaller size changes nothing.
    let grown = ctl
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: d.volume_id.clone(),
            capacity_range: range(6 * mib, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 6 * mib);
    let same = ctl
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: d.volume_id.clone(),
            capacity_range: range(mib, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.capacity_bytes, 6 * mib);
    assert_eq!(
        code(
            ctl.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: d.volume_id.clone(),
                capacity_range: range(i64::MAX / 2, 0),
                ..Default::default()
            })
            .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            ctl.controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: "v/nope".into(),
                capacity_range: range(mib, 0),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );

    // Pagination: pages of one cover every claim once, with its capacity.
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = ctl
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 1,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        seen.extend(page.entries.into_iter().map(|e| {
            let v = e.volume.unwrap();
            (v.volume_id, v.capacity_bytes)
        }));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    seen.sort();
    let mut want = vec![
        ("d/shared/pvc-d".to_string(), 6 * mib),
        (odd.volume_id.clone(), mib),
        ("v/pvc-a".to_string(), 8 * mib),
        (striped.volume_id.clone(), 2 * mib),
    ];
    want.sort();
    assert_eq!(seen, want);
    assert_eq!(
        code(
            ctl.list_volumes(pb::ListVolumesRequest {
                max_entries: 1,
                starting_token: "not-a-token".into(),
            })
            .await
        ),
        Code::Aborted
    );
    // A claim deleted between pages shifts nothing: the next page starts after a name.
    let first = ctl
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let gone = first.entries[1].volume.as_ref().unwrap().volume_id.clone();
    let extra = ctl
        .create_volume(create_req("pvc-zz", mib, &dp))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: gone.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rest = ctl
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 0,
            starting_token: first.next_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut after: Vec<String> = first
        .entries
        .iter()
        .chain(rest.entries.iter())
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .filter(|i| *i != gone)
        .collect();
    after.sort();
    let mut left: Vec<String> = want
        .iter()
        .map(|(i, _)| i.clone())
        .filter(|i| *i != gone)
        .chain([extra.clone()])
        .collect();
    left.sort();
    assert_eq!(after, left);
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: extra,
        ..Default::default()
    })
    .await
    .unwrap();

    let cap_free = ctl
        .get_capacity(pb::GetCapacityRequest {
            parameters: params(&[("type", "distribute")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap_free.available_capacity > 0, "{cap_free:?}");
    let cap_none = ctl
        .get_capacity(pb::GetCapacityRequest {
            parameters: params(&[("type", "disperse-8+4")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cap_none.available_capacity, 0, "12 bricks asked of 9");

    // Deletes: unknown ids succeed, a missing id does not; a deleted claim is gone.
    let delete = |id: &str| pb::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    ctl.delete_volume(delete("v/nope")).await.unwrap();
    ctl.delete_volume(delete("not an id of ours"))
        .await
        .unwrap();
    assert_eq!(
        code(ctl.delete_volume(delete("")).await),
        Code::InvalidArgument
    );
    for v in [
        "v/pvc-a",
        "v/pvc-s",
        "d/shared/pvc-d",
        odd.volume_id.as_str(),
        gone.as_str(),
    ] {
        ctl.delete_volume(delete(v)).await.unwrap();
        ctl.delete_volume(delete(v)).await.unwrap();
    }
    let left = ctl
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(left.entries.is_empty(), "{left:?}");
    assert!(
        brickfs_client::admin::volume_info(&c.meta, "pvc-a")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_staged_and_published_on_two_nodes() {
    let c = must_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let _mounts = Mounts(dir.path().to_path_buf());
    let p1 = Plugin::start(&c, dir.path(), "n1", true).await;
    let p2 = Plugin::start(&c, dir.path(), "n2", false).await;
    must_shared_volume(&c, "shared").await;
    let mib = 1i64 << 20;
    let mut ctl = p1.controller().await;
    let id = ctl
        .create_volume(create_req(
            "pvc-web",
            4 * mib,
            &[("mode", "directory"), ("volume", "shared")],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let other = ctl
        .create_volume(create_req(
            "pvc-other",
            4 * mib,
            &[("mode", "directory"), ("volume", "shared")],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (mut n1, mut n2) = (p1.node().await, p2.node().await);
    let info = n2
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "n2");

    let (s1, s2) = (dir.path().join("n1-staging"), dir.path().join("n2-staging"));
    let (t1, t2, t2ro) = (
        dir.path().join("pod-a/mnt"),
        dir.path().join("pod-b/mnt"),
        dir.path().join("pod-c/mnt"),
    );
    // Publishing before staging is refused; publishing what does not exist is NOT_FOUND.
    assert_eq!(
        code(publish(&mut n1, &id, &s1, &t1, false).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(publish(&mut n1, "v/nosuch", &s1, &t1, false).await),
        Code::NotFound
    );
    stage(&mut n1, &id, &s1).await;
    stage(&mut n1, &id, &s1).await; // idempotent
    stage(&mut n2, &id, &s2).await;
    assert_eq!(mountd_pids(&s1).len(), 1, "one mountd per staged claim");
    publish(&mut n1, &id, &s1, &t1, false).await.unwrap();
    publish(&mut n1, &id, &s1, &t1, false).await.unwrap(); // idempotent
    assert_eq!(
        code(publish(&mut n1, &id, &s1, &t1, true).await),
        Code::AlreadyExists,
        "the same target read-only is another publish"
    );
    publish(&mut n2, &id, &s2, &t2, false).await.unwrap();
    publish(&mut n2, &id, &s2, &t2ro, true).await.unwrap();

    // Paths a mount must not be made at: through a symbolic link (it once covered /etc),
    // a file, a relative path, inside the staging path, inside another claim's mount.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for bad in [
        link.clone(),
        link.join("below"),
        file.clone(),
        PathBuf::from("relative/path"),
        s1.join("inner"),
        t1.join("nested"),
    ] {
        assert_eq!(
            code(publish(&mut n1, &id, &s1, &bad, false).await),
            Code::InvalidArgument,
            "{}",
            bad.display()
        );
    }
    assert!(mounts_under(&elsewhere).is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    assert_eq!(
        code(
            n1.node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: link.display().to_string(),
                volume_capability: Some(rwx()),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    // Not at a path with `.` in it, nor inside a brickfs mount (a claim's staging path).
    for bad in [dir.path().join("st/./x"), s1.join("x")] {
        assert_eq!(
            code(
                n1.node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: other.clone(),
                    staging_target_path: bad.display().to_string(),
                    volume_capability: Some(rwx()),
                    ..Default::default()
                })
                .await
            ),
            Code::InvalidArgument,
            "{}",
            bad.display()
        );
    }
    // Another claim of the same shared volume cannot use this claim's staging path, nor
    // unstage, unpublish or read the stats of this claim's mounts.
    assert_eq!(
        code(publish(&mut n1, &other, &s1, &dir.path().join("pod-x/mnt"), false).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            n1.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: other.clone(),
                target_path: t1.display().to_string(),
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(unstage(&mut n1, &other, &s1).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            n1.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: other.clone(),
                volume_path: s1.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
        ),
        Code::NotFound
    );
    assert!(mountd::is_mounted(&t1) && mountd::is_mounted(&s1));
    // A read-only mount flag publishes read-only too.
    let t1ro = dir.path().join("pod-d/mnt");
    n1.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: s1.display().to_string(),
        target_path: t1ro.display().to_string(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                mount_flags: vec!["ro".into()],
                ..Default::default()
            })),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeMultiWriter as i32,
            }),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = std::fs::write(t1ro.join("nope"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}");
    unpublish(&mut n1, &id, &t1ro).await;
    // Calls naming one claim do not act on another's mount, nor report a plain folder.
    assert_eq!(
        code(
            n2.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: elsewhere.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            n2.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: "v/another".into(),
                target_path: t2.display().to_string(),
            })
            .await
        ),
        Code::FailedPrecondition
    );

    // A file written through one pod's path is there through the other node's.
    let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 7 % 251) as u8).collect();
    std::fs::write(t1.join("index.html"), &data).unwrap();
    assert_eq!(std::fs::read(t2.join("index.html")).unwrap(), data);
    assert_eq!(std::fs::read(t2ro.join("index.html")).unwrap(), data);
    // The claim is its directory: the shared volume's root is not visible.
    assert!(s2.join("pvc-web").join("index.html").exists());
    assert!(!t1.join("pvc-web").exists());
    // Read-only refuses writes.
    let e = std::fs::write(t2ro.join("nope"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}");

    // The capacity is a quota: stats show it, writes past it fail, expansion raises it.
    let (total, used) = stats(&mut n1, &id, &t1).await;
    assert_eq!(total, 4 * mib);
    // `df` in the pod shows the claim, not the shared volume.
    let fs = nix::sys::statvfs::statvfs(&t2).unwrap();
    assert_eq!(
        fs.blocks() * fs.fragment_size(),
        4 << 20,
        "df of the pod path"
    );
    assert!(used >= mib, "used {used}");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(t1.join("big"))
        .unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut refused = None;
    for _ in 0..6 {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("writes past the claim's 4 MiB quota were all accepted");
    assert_eq!(refused.raw_os_error(), Some(nix::libc::EDQUOT), "{refused}");
    // The bytes under the limit are kept, and the file is usable again: it can be shrunk.
    let kept = std::fs::metadata(t1.join("big")).unwrap().len();
    assert!(kept >= 2 << 20, "kept {kept}");
    f.set_len(1 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let back = std::fs::read(t1.join("big")).unwrap();
    assert!(back.len() == 1 << 20 && back.iter().all(|b| *b == 1));
    std::fs::remove_file(t1.join("big")).unwrap();
    // Many small appends past the limit, none synced (write-behind holds them): the close
    // tells EDQUOT, and what fit is there, whole.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(t1.join("appended"))
        .unwrap();
    let piece = vec![2u8; 64 << 10];
    let mut told = None;
    for _ in 0..200 {
        if let Err(e) = f.write_all(&piece) {
            told = Some(e);
            break;
        }
    }
    let told = told.or_else(|| f.sync_all().err());
    drop(f);
    let told = told.expect("appends past the claim's quota were all accepted");
    assert_eq!(told.raw_os_error(), Some(nix::libc::EDQUOT), "{told}");
    let back = std::fs::read(t1.join("appended")).unwrap();
    assert!(back.len() >= 2 << 20, "kept {}", back.len());
    assert!(back.iter().all(|b| *b == 2));
    std::fs::remove_file(t1.join("appended")).unwrap();
    ctl.controller_expand_volume(pb::ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: range(16 * mib, 0),
        ..Default::default()
    })
    .await
    .unwrap();
    let grown = n2
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: t2.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 16 * mib);
    assert_eq!(stats(&mut n2, &id, &t2).await.0, 16 * mib);
    let fs = nix::sys::statvfs::statvfs(&t1).unwrap();
    assert_eq!(
        fs.blocks() * fs.fragment_size(),
        16 << 20,
        "df after the expansion"
    );
    assert_eq!(
        n2.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: dir.path().join("nowhere").display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .map(|_| ())
        .unwrap_err()
        .code(),
        Code::NotFound
    );

    // Unstaging while pods still see it is refused; after the unpublishes it unmounts.
    assert_eq!(
        code(unstage(&mut n2, &id, &s2).await),
        Code::FailedPrecondition
    );
    for (on_first, t) in [(true, &t1), (false, &t2), (false, &t2ro)] {
        let n = if on_first { &mut n1 } else { &mut n2 };
        unpublish(n, &id, t).await;
        unpublish(n, &id, t).await; // idempotent
        assert!(!t.exists(), "{} left behind", t.display());
    }
    unstage(&mut n1, &id, &s1).await.unwrap();
    unstage(&mut n2, &id, &s2).await.unwrap();
    unstage(&mut n2, &id, &s2).await.unwrap(); // idempotent
    assert!(
        mounts_under(dir.path()).is_empty(),
        "{:?}",
        mounts_under(dir.path())
    );
    must_wait_for(
        "the mountd daemons to exit",
        Duration::from_secs(30),
        || async { mountd_pids(dir.path()).is_empty().then_some(()) },
    )
    .await;
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_mounts_outlive_a_killed_plugin() {
    let c = must_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let _mounts = Mounts(dir.path().to_path_buf());
    let mut p = Plugin::start(&c, dir.path(), "n1", true).await;
    let mut ctl = p.controller().await;
    let id = ctl
        .create_volume(create_req("pvc-db", 64 << 20, &[("type", "distribute")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = (dir.path().join("staging"), dir.path().join("pod/mnt"));
    let mut n = p.node().await;
    stage(&mut n, &id, &staging).await;
    publish(&mut n, &id, &staging, &target, false)
        .await
        .unwrap();
    let daemons = mountd_pids(&staging);
    assert_eq!(daemons.len(), 1);

    // A pod holds a file open across the plugin's death.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(target.join("log"))
        .unwrap();
    f.write_all(b"before\n").unwrap();
    // And another writes a file larger than every buffer and frame (40 MiB against 8 MiB
    // write-behind runs and 16 MiB frames), across the kill.
    let big = target.join("big");
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let mut g = std::fs::File::create(&big).unwrap();
        for i in 0..40u64 {
            g.write_all(&pattern(9, i << 20, 1 << 20)).unwrap();
            if i == 8 {
                tx.send(()).unwrap();
            }
        }
        g.sync_all().unwrap();
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    drop(n);
    drop(ctl);
    p.kill(); // SIGKILL, the big write half done
    writer.join().unwrap();
    let back = std::fs::read(target.join("big")).unwrap();
    assert_eq!(back.len(), 40 << 20);
    assert!(
        back.as_slice() == &pattern(9, 0, 40 << 20)[..],
        "the big file's bytes differ"
    );
    f.write_all(b"while the plugin is gone\n").unwrap();
    f.sync_all().unwrap();
    std::fs::write(target.join("new"), b"made while the plugin is gone").unwrap();
    drop(f);
    let mut text = String::new();
    std::fs::File::open(target.join("log"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "before\nwhile the plugin is gone\n");

    // The next plugin adopts the mount: staging again starts no second mountd.
    let p = Plugin::start(&c, dir.path(), "n1", true).await;
    let mut n = p.node().await;
    stage(&mut n, &id, &staging).await;
    publish(&mut n, &id, &staging, &target, false)
        .await
        .unwrap();
    assert_eq!(mountd_pids(&staging), daemons, "the same mountd serves");
    let (total, used) = stats(&mut n, &id, &target).await;
    assert_eq!(total, 64 << 20);
    assert!(used > 0);
    unpublish(&mut n, &id, &target).await;
    unstage(&mut n, &id, &staging).await.unwrap();
    must_wait_for("mountd to exit", Duration::from_secs(30), || async {
        mountd_pids(&staging).is_empty().then_some(())
    })
    .await;
    assert!(mounts_under(dir.path()).is_empty());

    // A mountd killed under a staged claim: staging again replaces the dead mount.
    stage(&mut n, &id, &staging).await;
    let first = mountd_pids(&staging);
    assert_eq!(first.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    must_wait_for(
        "the killed mountd to be gone",
        Duration::from_secs(30),
        || async { mountd_pids(&staging).is_empty().then_some(()) },
    )
    .await;
    assert_eq!(
        nix::sys::statvfs::statvfs(&staging).map(|_| ()),
        Err(nix::errno::Errno::ENOTCONN)
    );
    stage(&mut n, &id, &staging).await;
    let second = mountd_pids(&staging);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    assert_eq!(
        std::fs::read(staging.join("new")).unwrap(),
        b"made while the plugin is gone"
    );
    // Published, its mountd killed: publishing again (all the kubelet does for a pod that
    // restarts) stages it again and replaces the dead bind.
    publish(&mut n, &id, &staging, &target, false)
        .await
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    must_wait_for(
        "the killed mountd to be gone",
        Duration::from_secs(30),
        || async { mountd_pids(&staging).is_empty().then_some(()) },
    )
    .await;
    publish(&mut n, &id, &staging, &target, false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("new")).unwrap(),
        b"made while the plugin is gone"
    );
    unpublish(&mut n, &id, &target).await;
    // Unstaged and staged again at once (a pod restarting on the node): the old mountd
    // leaves, the new mount is the only one, and it serves.
    let before = mountd_pids(&staging);
    unstage(&mut n, &id, &staging).await.unwrap();
    stage(&mut n, &id, &staging).await;
    let after = mountd_pids(&staging);
    let fresh: Vec<i32> = after
        .iter()
        .filter(|p| !before.contains(p))
        .copied()
        .collect();
    assert_eq!(fresh.len(), 1, "before {before:?}, after {after:?}");
    must_wait_for(
        "the unstaged mountd to leave",
        Duration::from_secs(30),
        || async { (mountd_pids(&staging) == fresh).then_some(()) },
    )
    .await;
    assert_eq!(
        std::fs::read(staging.join("new")).unwrap(),
        b"made while the plugin is gone"
    );
    unstage(&mut n, &id, &staging).await.unwrap();
    assert!(mounts_under(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_cluster_gives_each_node_a_client_credential() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let _mounts = Mounts(dir.path().to_path_buf());
    let (node, key, admin) =
        must_keyed_node(dir.path(), "Y3NpLWRyaXZlci10ZXN0LWtleS0xMjM0NTY3OA==\n");
    let at = node.addr().to_string();
    let k = key.to_str().unwrap();
    let a = admin.to_str().unwrap();
    must_ok(&["--credential-file", a, "--meta", &at, "peer", "add", &at]);
    let ca = dir.path().join("ca.pem");
    must_ok(&[
        "--credential-file",
        k,
        "cluster",
        "ca",
        "--out",
        ca.to_str().unwrap(),
    ]);
    let ca_s = ca.to_str().unwrap();
    let mut p = Plugin::start_with(
        node.addr(),
        dir.path(),
        "n1",
        true,
        &["--credential-file", a, "--ca-file", ca_s],
    )
    .await;
    let id = p
        .controller()
        .await
        .create_volume(create_req("pvc-k", 8 << 20, &[("type", "distribute")]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging, target) = (dir.path().join("staging"), dir.path().join("pod/mnt"));
    let mut n = p.node().await;
    // A stage secret may hold the volume's client credential, never more.
    for (what, text) in [
        (
            "the admin credential",
            std::fs::read_to_string(&admin).unwrap(),
        ),
        ("the cluster key", std::fs::read_to_string(&key).unwrap()),
    ] {
        let r = n
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(rwx()),
                secrets: [("credential".to_string(), text)].into_iter().collect(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{what}");
    }
    assert!(mounts_under(dir.path()).is_empty());
    stage(&mut n, &id, &staging).await;
    publish(&mut n, &id, &staging, &target, false)
        .await
        .unwrap();
    std::fs::write(target.join("f"), b"through a client credential").unwrap();
    assert_eq!(
        std::fs::read(target.join("f")).unwrap(),
        b"through a client credential"
    );
    // The mount holds the volume's own client credential, not the admin's, kept 0600.
    let cred = dir.path().join("n1-state/credentials/pvc-k.cred");
    let text = std::fs::read_to_string(&cred).unwrap();
    assert!(text.starts_with("brickfs-client-1:"), "{text}");
    assert_eq!(
        std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mountd_cmd = std::fs::read(format!("/proc/{}/cmdline", mountd_pids(&staging)[0])).unwrap();
    assert!(
        String::from_utf8_lossy(&mountd_cmd).contains("pvc-k.cred"),
        "mountd was not given the client credential"
    );
    let listed = |p: &str| {
        must_ok(&[
            "--credential-file",
            a,
            "--meta",
            &at,
            "volume",
            "credential",
            p,
            "list",
        ])
        .lines()
        .filter(|l| l.contains("csi node n1"))
        .count()
    };
    assert_eq!(listed("pvc-k"), 1);

    // A restarted plugin stages again with the credential it was given: no second one.
    drop(n);
    p.kill();
    let p = Plugin::start_with(
        node.addr(),
        dir.path(),
        "n1",
        true,
        &["--credential-file", a, "--ca-file", ca_s],
    )
    .await;
    let mut n = p.node().await;
    stage(&mut n, &id, &staging).await;
    let target_ro = dir.path().join("pod-ro/mnt");
    publish(&mut n, &id, &staging, &target_ro, true)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target_ro.join("f")).unwrap(),
        b"through a client credential"
    );
    assert_eq!(listed("pvc-k"), 1);
    // Unstaged and staged again after a restart: the kept credential is used again.
    unpublish(&mut n, &id, &target).await;
    unpublish(&mut n, &id, &target_ro).await;
    unstage(&mut n, &id, &staging).await.unwrap();
    assert_eq!(listed("pvc-k"), 0, "revoked once nothing of it is staged");
    stage(&mut n, &id, &staging).await;
    assert_eq!(listed("pvc-k"), 1, "a new one for the new stage");
    publish(&mut n, &id, &staging, &target, false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("f")).unwrap(),
        b"through a client credential"
    );
    unpublish(&mut n, &id, &target).await;
    unstage(&mut n, &id, &staging).await.unwrap();
    // Nothing of the volume staged here any more: the node's credential is revoked.
    assert_eq!(listed("pvc-k"), 0);
    assert!(!cred.exists());
}

/// The manifests in deploy/kubernetes name this driver and only flags the program has.
#[test]
fn the_manifests_match_the_program() {
    let help = Command::new(env!("CARGO_BIN_EXE_brickfs-csi"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut flags = 0;
    for f in ["controller.yaml", "node.yaml"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let start = text
            .find("args: [\"brickfs-csi\"")
            .unwrap_or_else(|| panic!("{f} does not run brickfs-csi"));
        let args = &text[start..start + text[start..].find(']').unwrap()];
        for flag in args.split('"').filter(|t| t.starts_with("--")) {
            assert!(
                help.contains(flag),
                "{f} passes {flag}, which brickfs-csi does not take"
            );
            flags += 1;
        }
    }
    assert!(flags >= 8, "only {flags} flags found");
    let driver = std::fs::read_to_string(root.join("csidriver.yaml")).unwrap();
    assert!(driver.contains(&format!("name: {}", brickfs_csi::DRIVER_NAME)));
    let classes = std::fs::read_to_string(root.join("storageclasses.yaml")).unwrap();
    assert_eq!(
        classes
            .matches(&format!("provisioner: {}", brickfs_csi::DRIVER_NAME))
            .count(),
        3
    );
}
