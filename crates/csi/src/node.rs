//! The Node service. The mount table is its state: a staged claim is a `fuse.brickfs` mount at
//! the staging path served by its own `mountd --daemon` process (not a child of the plugin, so
//! a killed or upgraded plugin leaves it serving and the next one finds it there); a published
//! claim is a bind mount of it (or of the claim's directory in it) at the pod's path.

use crate::cluster;
use crate::pb;
use crate::spec::{self, VolumeRef};
use brickfs_client::MetaClient;
use brickfs_proto::cred::Credential;
use std::path::{Path, PathBuf};
use tonic::{Request, Response, Status};

pub struct NodeService {
    meta: MetaClient,
    node_id: String,
    state_dir: PathBuf,
    mountd: PathBuf,
    credential_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    /// One stage, publish or unpublish at a time on this node: they read and change the mount
    /// table.
    busy: tokio::sync::Mutex<()>,
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug)]
pub struct MountEntry {
    /// `major:minor` of the filesystem: every bind mount of one FUSE mount shares it.
    pub dev: String,
    /// The directory of the filesystem this mount shows (`/` or a claim's `/DIR`).
    pub root: String,
    pub mount_point: PathBuf,
    pub read_only: bool,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let g: Vec<&str> = post.split(' ').collect();
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                read_only: f.get(5)?.split(',').any(|o| o == "ro"),
                fs_type: g.first()?.to_string(),
                source: unescape(g.get(1)?),
            })
        })
        .collect()
}

fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// The last mount at `path` (the one a lookup of the path sees).
fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

fn staged_source(volume: &str) -> String {
    format!("brickfs:{volume}")
}

fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

fn volume_ref(id: &str) -> Result<VolumeRef, Status> {
    VolumeRef::parse(id).ok_or_else(|| Status::not_found(format!("no volume {id}")))
}

fn io_status(what: String, e: std::io::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// Refuses a staging or target path that is relative, has `.` or `..` in it, passes through a
/// symbolic link, or exists as anything but a directory: a mount is made exactly there and
/// nowhere a link would send it.
fn check_path(p: &Path, what: &str) -> Result<(), Status> {
    use std::path::Component;
    let raw = p.as_os_str().as_encoded_bytes();
    if !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || raw.windows(3).any(|w| w == b"/./")
        || raw.ends_with(b"/.")
    {
        return Err(Status::invalid_argument(format!(
            "{what} {} is not an absolute path without . or ..",
            p.display()
        )));
    }
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if m.file_type().is_symlink() {
            return Err(Status::invalid_argument(format!(
                "{what} {} is a symbolic link",
                p.display()
            )));
        }
        if !m.is_dir() {
            return Err(Status::invalid_argument(format!(
                "{what} {} exists and is not a directory",
                p.display()
            )));
        }
    }
    let mut existing = p;
    while std::fs::symlink_metadata(existing).is_err() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    match std::fs::canonicalize(existing) {
        Ok(real) if real == existing => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "{what} {} passes through a symbolic link",
            p.display()
        ))),
    }
}

/// The mount that holds `path` (the last mount whose mount point is `path` or above it).
fn mount_holding(path: &Path) -> Option<MountEntry> {
    mounts()
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

/// Whether the FUSE mount at `path` has lost its daemon (ENOTCONN).
fn dead(path: &Path) -> bool {
    matches!(
        nix::sys::statvfs::statvfs(path),
        Err(nix::errno::Errno::ENOTCONN)
    )
}

/// A short digest of a path, for file names in the state folder.
fn path_digest(p: &Path) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(p.as_os_str().as_encoded_bytes());
    d[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the record of which claim is staged at `staging` is kept: every directory claim of
/// one shared volume stages the same filesystem, so the mount table alone cannot tell them
/// apart.
fn stage_record(state_dir: &Path, staging: &Path) -> PathBuf {
    state_dir
        .join("staged")
        .join(format!("{}.claim", path_digest(staging)))
}

/// The claim id recorded as staged at `staging`.
fn staged_claim(state_dir: &Path, staging: &Path) -> Option<String> {
    std::fs::read_to_string(stage_record(state_dir, staging))
        .ok()
        .map(|t| t.trim().to_string())
}

fn record_stage(state_dir: &Path, staging: &Path, id: &str) -> Result<(), Status> {
    let path = stage_record(state_dir, staging);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| io_status(format!("make {}", d.display()), e))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, id)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| io_status(format!("write {}", path.display()), e))
}

/// Where the stage secret's credential of the claim staged at `staging` is kept.
fn secret_file(state_dir: &Path, staging: &Path) -> PathBuf {
    state_dir
        .join("credentials")
        .join(format!("stage-{}.secret", path_digest(staging)))
}

impl NodeService {
    pub fn new(meta: MetaClient, node_id: String, cfg: &crate::Config) -> NodeService {
        // Mounts outlive the plugin (and, in a container, the secret volume the CA came
        // from): they read a copy in the state folder.
        let ca_file = cfg.ca_file.as_ref().map(|ca| {
            let copy = cfg.state_dir.join("ca.pem");
            match std::fs::copy(ca, &copy) {
                Ok(_) => copy,
                Err(e) => {
                    tracing::warn!(error = %e, ca = %ca.display(), "cannot copy the CA to the state folder; mounts read it where it is");
                    ca.clone()
                }
            }
        });
        NodeService {
            meta,
            node_id,
            state_dir: cfg.state_dir.clone(),
            mountd: cfg.mountd.clone(),
            credential_file: cfg.credential_file.clone(),
            ca_file,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// Logs the staged mounts a previous plugin left: they keep serving, and the calls that
    /// name them find them in the mount table.
    pub fn adopt(&self) {
        for m in mounts().iter().filter(|m| m.fs_type == "fuse.brickfs") {
            tracing::info!(
                at = %m.mount_point.display(),
                source = %m.source,
                root = %m.root,
                "found a brickfs mount already serving"
            );
        }
    }

    /// The client credential file a mount of `volume` presents, or `None` in a cluster
    /// without keys. A credential given in the stage call's secrets wins; otherwise a client
    /// credential is issued for this node with the driver's admin credential (once, kept
    /// 0600 in the state folder and reused while the volume lists it).
    async fn credential_for(
        &self,
        volume: &brickfs_proto::meta::VolumeRecord,
        secrets: &std::collections::HashMap<String, String>,
        staging: &Path,
    ) -> Result<Option<PathBuf>, Status> {
        let dir = self.state_dir.join("credentials");
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_status(format!("make {}", dir.display()), e))?;
        let write = |path: &Path, text: &str| -> Result<(), Status> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io_status(format!("write {}", tmp.display()), e))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| io_status(format!("write {}", tmp.display()), e))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| io_status(format!("rename to {}", path.display()), e))
        };
        if let Some(c) = secrets.get("credential") {
            // Only a client credential of this very volume: a mount never holds more.
            match Credential::parse(c.as_bytes()) {
                Ok(Credential::Client { volume: v, .. }) if v == volume.id => {}
                Ok(Credential::Client { .. }) => {
                    return Err(Status::invalid_argument(format!(
                        "the stage secret's credential is a client credential of another volume, not of {}",
                        volume.name
                    )));
                }
                Ok(_) => {
                    return Err(Status::invalid_argument(
                        "the stage secret's credential must be a client credential of the volume, not the admin credential or the cluster key",
                    ));
                }
                Err(e) => {
                    return Err(Status::invalid_argument(format!(
                        "the stage secret's credential: {e}"
                    )));
                }
            }
            let path = secret_file(&self.state_dir, staging);
            write(&path, c)?;
            return Ok(Some(path));
        }
        match brickfs_proto::rpc::credential().as_deref() {
            None => return Ok(None),
            Some(Credential::Client { .. }) => return Ok(self.credential_file.clone()),
            Some(_) => {}
        }
        let path = dir.join(format!("{}.cred", volume.name));
        if let Ok(Credential::Client { volume: v, id, .. }) = Credential::load(&path)
            && v == volume.id
            && volume.credentials.iter().any(|c| c.id == id)
        {
            return Ok(Some(path));
        }
        let client = brickfs_client::BrickClient::new(brickfs_proto::rpc::ClientOptions {
            peer_name: format!("brickfs-csi:{}", self.node_id),
            conns_per_peer: 1,
            ..Default::default()
        });
        let req = brickfs_proto::msg::IssueCredential {
            volume: volume.name.clone(),
            label: format!("csi node {}", self.node_id),
            replace: false,
        };
        let mut last = String::from("no metadata member to ask");
        for addr in self.meta_members() {
            match client.issue_credential(addr, req.clone()).await {
                Ok(c) => {
                    write(&path, &c.credential)?;
                    tracing::info!(volume = %volume.name, id = %format!("{:x}", c.id), "client credential issued for this node");
                    return Ok(Some(path));
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(Status::unavailable(format!(
            "could not get a client credential of volume {}: {last}",
            volume.name
        )))
    }

    fn meta_members(&self) -> Vec<std::net::SocketAddr> {
        let mut m = self.meta.members();
        if let Some(l) = self.meta.leader() {
            m.retain(|a| *a != l);
            m.insert(0, l);
        }
        m
    }

    /// Starts `mountd --daemon` for `volume` at `staging` and waits until it is mounted.
    async fn start_mount(
        &self,
        volume: &str,
        staging: &Path,
        credential: Option<PathBuf>,
    ) -> Result<(), Status> {
        std::fs::create_dir_all(staging)
            .map_err(|e| io_status(format!("make {}", staging.display()), e))?;
        let members: Vec<String> = self.meta_members().iter().map(|a| a.to_string()).collect();
        let mut cmd = tokio::process::Command::new(&self.mountd);
        cmd.arg(format!("{}/{volume}", members.join(",")))
            .arg(staging)
            .arg("--daemon")
            .stdin(std::process::Stdio::null());
        if let Some(c) = credential {
            cmd.arg("--credential-file").arg(c);
        }
        if let Some(ca) = &self.ca_file {
            cmd.arg("--ca-file").arg(ca);
        }
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| Status::deadline_exceeded("mountd did not mount within 60 s"))?
            .map_err(|e| io_status(format!("start {}", self.mountd.display()), e))?;
        if !out.status.success() {
            return Err(Status::internal(format!(
                "mountd failed to mount {volume} at {}: {}",
                staging.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        tracing::info!(
            volume,
            at = %staging.display(),
            mountd = %String::from_utf8_lossy(&out.stdout).trim(),
            "staged"
        );
        Ok(())
    }

    /// Revokes and forgets the client credential this node was issued for `volume` once no
    /// claim of that volume is staged here any more: a credential nobody holds for a reason
    /// is not left valid. A failure is logged; the next stage reuses or replaces it.
    async fn retire_credential(&self, volume: &str) {
        let still_staged = std::fs::read_dir(self.state_dir.join("staged"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|id| VolumeRef::parse(id.trim()))
            .any(|r| r.volume() == volume);
        if still_staged {
            return;
        }
        let path = self
            .state_dir
            .join("credentials")
            .join(format!("{volume}.cred"));
        let Ok(Credential::Client { id, .. }) = Credential::load(&path) else {
            return;
        };
        match self
            .meta
            .write(brickfs_proto::meta::MetaOp::RevokeCredential {
                name: volume.to_string(),
                id,
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Some(brickfs_proto::ErrorCode::NotFound) => {}
            Err(e) => {
                tracing::warn!(volume, error = %e, "could not revoke this node's client credential; it stays until the next unstage");
                return;
            }
        }
        let _ = std::fs::remove_file(&path);
        tracing::info!(volume, id = %format!("{id:x}"), "this node's client credential revoked: no claim of the volume is staged here");
    }

    /// NOT_FOUND unless `path` is a staged or published mount of the claim `r`.
    fn must_be_mount_of(&self, r: &VolumeRef, path: &Path) -> Result<(), Status> {
        let root = r.quota_path();
        match mount_at(path) {
            Some(m)
                if m.fs_type == "fuse.brickfs"
                    && m.source == staged_source(r.volume())
                    && (m.root == root
                        || m.root == "/"
                            && staged_claim(&self.state_dir, path).as_deref()
                                == Some(r.id().as_str())) =>
            {
                Ok(())
            }
            _ => Err(Status::not_found(format!(
                "{} is not a mount of {}",
                path.display(),
                r.id()
            ))),
        }
    }

    /// What the claim's quota says: (limit, used), when it has one.
    async fn usage(&self, r: &VolumeRef) -> Result<Option<(u64, u64)>, Status> {
        let Some(v) = cluster::volume(&self.meta, r.volume()).await? else {
            return Err(Status::not_found(format!("no volume {}", r.id())));
        };
        Ok(cluster::quota_of(&self.meta, v.id, &r.quota_path())
            .await?
            .map(|q| (q.limit_bytes, q.used_bytes)))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        spec::check_capability(cap).map_err(Status::invalid_argument)?;
        let r = volume_ref(id)?;
        check_path(&staging, "staging_target_path")?;
        let _one = self.busy.lock().await;
        // A staged mount whose mountd died answers nothing (ENOTCONN): it goes, and the
        // claim is staged again below (pods that still see the old one through a publish
        // need it published again).
        if mount_at(&staging).is_some_and(|m| m.fs_type == "fuse.brickfs") && dead(&staging) {
            tracing::warn!(at = %staging.display(), "the staged mount's mountd is gone; staging again");
            let _ = nix::mount::umount2(&staging, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(m) = mount_at(&staging) {
            if m.fs_type == "fuse.brickfs" && m.source == staged_source(r.volume()) {
                match staged_claim(&self.state_dir, &staging) {
                    // Staged before (perhaps by an earlier plugin): it is still serving.
                    Some(other) if other == r.id() => {
                        return Ok(Response::new(pb::NodeStageVolumeResponse {}));
                    }
                    // A mount of this volume that no record names: one an earlier plugin
                    // made before it could write the record.
                    None => {
                        record_stage(&self.state_dir, &staging, &r.id())?;
                        return Ok(Response::new(pb::NodeStageVolumeResponse {}));
                    }
                    Some(other) => {
                        return Err(Status::already_exists(format!(
                            "{} stages {other}, not {}",
                            staging.display(),
                            r.id()
                        )));
                    }
                }
            }
            return Err(Status::already_exists(format!(
                "{} is a mount of {} ({}), not of {}",
                staging.display(),
                m.source,
                m.fs_type,
                r.id()
            )));
        }
        if let Some(parent) = staging.parent()
            && let Some(holder) = mount_holding(parent)
            && holder.fs_type == "fuse.brickfs"
        {
            return Err(Status::invalid_argument(format!(
                "staging_target_path {} is inside the brickfs mount at {}",
                staging.display(),
                holder.mount_point.display()
            )));
        }
        let Some(c) = cluster::claim(&self.meta, &r).await? else {
            return Err(Status::not_found(format!("no volume {id}")));
        };
        let credential = self
            .credential_for(&c.volume, &req.secrets, &staging)
            .await?;
        if let Err(e) = self.start_mount(r.volume(), &staging, credential).await {
            let _ = std::fs::remove_file(secret_file(&self.state_dir, &staging));
            return Err(e);
        }
        record_stage(&self.state_dir, &staging, &r.id())?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let r = volume_ref(required(&req.volume_id, "volume_id")?)?;
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        check_path(&staging, "staging_target_path")?;
        let _one = self.busy.lock().await;
        let Some(m) = mount_at(&staging) else {
            let _ = std::fs::remove_file(secret_file(&self.state_dir, &staging));
            return Ok(Response::new(pb::NodeUnstageVolumeResponse {}));
        };
        let recorded = staged_claim(&self.state_dir, &staging);
        if m.fs_type != "fuse.brickfs"
            || m.source != staged_source(r.volume())
            || recorded.as_ref().is_some_and(|c| *c != r.id())
        {
            return Err(Status::failed_precondition(format!(
                "{} is a mount of {} ({}{}), not of {}: left alone",
                staging.display(),
                m.source,
                m.fs_type,
                recorded.map_or(String::new(), |c| format!(", staging {c}")),
                r.id()
            )));
        }
        // Pods still see it through these: unmounting now would cut them off.
        let published: Vec<String> = mounts()
            .into_iter()
            .filter(|o| o.dev == m.dev && o.mount_point != staging)
            .map(|o| o.mount_point.display().to_string())
            .collect();
        if !published.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{} is still published at {}",
                staging.display(),
                published.join(", ")
            )));
        }
        nix::mount::umount2(&staging, nix::mount::MntFlags::empty())
            .map_err(|e| Status::internal(format!("unmount {}: {e}", staging.display())))?;
        let _ = std::fs::remove_file(secret_file(&self.state_dir, &staging));
        let _ = std::fs::remove_file(stage_record(&self.state_dir, &staging));
        self.retire_credential(r.volume()).await;
        tracing::info!(at = %staging.display(), "unstaged");
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let staging = PathBuf::from(required(&req.staging_target_path, "staging_target_path")?);
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let flags_ro = matches!(
            &cap.access_type,
            Some(pb::volume_capability::AccessType::Mount(m)) if m.mount_flags.iter().any(|f| f == "ro")
        );
        let read_only = spec::check_capability(cap).map_err(Status::invalid_argument)?
            || req.readonly
            || flags_ro;
        let r = volume_ref(id)?;
        let root = r.quota_path();
        check_path(&staging, "staging_target_path")?;
        check_path(&target, "target_path")?;
        if target.starts_with(&staging) || staging.starts_with(&target) {
            return Err(Status::invalid_argument(format!(
                "target_path {} and staging_target_path {} nest",
                target.display(),
                staging.display()
            )));
        }
        let _one = self.busy.lock().await;
        // A staged mount whose mountd died is staged again here (the kubelet does not stage
        // a claim it thinks staged), and a dead publish at the target is replaced.
        if mount_at(&staging)
            .is_some_and(|m| m.fs_type == "fuse.brickfs" && m.source == staged_source(r.volume()))
            && dead(&staging)
            && staged_claim(&self.state_dir, &staging).is_none_or(|c| c == r.id())
        {
            tracing::warn!(at = %staging.display(), "the staged mount's mountd is gone; staging again");
            let _ = nix::mount::umount2(&staging, nix::mount::MntFlags::MNT_DETACH);
            let Some(c) = cluster::claim(&self.meta, &r).await? else {
                return Err(Status::not_found(format!("no volume {id}")));
            };
            let secret = secret_file(&self.state_dir, &staging);
            let credential = if secret.exists() {
                Some(secret)
            } else {
                self.credential_for(&c.volume, &Default::default(), &staging)
                    .await?
            };
            self.start_mount(r.volume(), &staging, credential).await?;
        }
        if mount_at(&target).is_some_and(|m| m.fs_type == "fuse.brickfs") && dead(&target) {
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        }
        match mount_at(&staging) {
            Some(m)
                if m.fs_type == "fuse.brickfs"
                    && m.source == staged_source(r.volume())
                    && staged_claim(&self.state_dir, &staging).is_none_or(|c| c == r.id()) => {}
            _ => {
                if cluster::volume(&self.meta, r.volume()).await?.is_none() {
                    return Err(Status::not_found(format!("no volume {id}")));
                }
                return Err(Status::failed_precondition(format!(
                    "{id} is not staged at {}",
                    staging.display()
                )));
            }
        }
        if let Some(m) = mount_at(&target) {
            if m.source == staged_source(r.volume()) && m.root == root && m.read_only == read_only {
                return Ok(Response::new(pb::NodePublishVolumeResponse {}));
            }
            return Err(Status::already_exists(format!(
                "{} is already a mount of {}{} ({})",
                target.display(),
                m.source,
                m.root,
                if m.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        // Not inside another brickfs mount (a pod's path in another claim): unmounting that
        // claim would leave this one dead.
        if let Some(parent) = target.parent()
            && let Some(holder) = mount_holding(parent)
            && holder.fs_type == "fuse.brickfs"
        {
            return Err(Status::invalid_argument(format!(
                "target_path {} is inside the brickfs mount at {}",
                target.display(),
                holder.mount_point.display()
            )));
        }
        let from = match &r {
            VolumeRef::Whole { .. } => staging.clone(),
            VolumeRef::Dir { dir, .. } => staging.join(dir),
        };
        if !from.is_dir() {
            return Err(Status::not_found(format!(
                "{id}: {} is not in the volume",
                root
            )));
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| io_status(format!("make {}", target.display()), e))?;
        use nix::mount::{MsFlags, mount};
        mount(
            Some(&from),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            Status::internal(format!(
                "bind {} at {}: {e}",
                from.display(),
                target.display()
            ))
        })?;
        if read_only
            && let Err(e) = mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        {
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
            return Err(Status::internal(format!(
                "make {} read-only: {e}",
                target.display()
            )));
        }
        tracing::info!(id, at = %target.display(), read_only, "published");
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let r = volume_ref(required(&req.volume_id, "volume_id")?)?;
        let target = PathBuf::from(required(&req.target_path, "target_path")?);
        check_path(&target, "target_path")?;
        let _one = self.busy.lock().await;
        if let Some(m) = mount_at(&target) {
            if m.fs_type != "fuse.brickfs"
                || m.source != staged_source(r.volume())
                || m.root != r.quota_path()
            {
                return Err(Status::failed_precondition(format!(
                    "{} is a mount of {}{} ({}), not of {}: left alone",
                    target.display(),
                    m.source,
                    m.root,
                    m.fs_type,
                    r.id()
                )));
            }
            nix::mount::umount2(&target, nix::mount::MntFlags::empty())
                .map_err(|e| Status::internal(format!("unmount {}: {e}", target.display())))?;
        }
        // The target folder is the plugin's to remove (the spec); gone already is fine.
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_status(format!("remove {}", target.display()), e)),
        }
        tracing::info!(at = %target.display(), "unpublished");
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let r = volume_ref(id)?;
        if !path.exists() {
            return Err(Status::not_found(format!(
                "{} does not exist",
                path.display()
            )));
        }
        self.must_be_mount_of(&r, &path)?;
        let fs = nix::sys::statvfs::statvfs(&path)
            .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
        let frsize = fs.fragment_size();
        let free = fs.blocks_available() * frsize;
        let (total, used) = match self.usage(&r).await? {
            Some((limit, used)) => (limit, used),
            None => {
                let total = fs.blocks() * frsize;
                (total, total.saturating_sub(fs.blocks_free() * frsize))
            }
        };
        let bytes = pb::VolumeUsage {
            // No more than the volume has left, whatever the quota allows.
            available: total.saturating_sub(used).min(free) as i64,
            total: total as i64,
            used: used as i64,
            unit: pb::volume_usage::Unit::Bytes as i32,
        };
        let inodes = pb::VolumeUsage {
            available: fs.files_available() as i64,
            total: fs.files() as i64,
            used: fs.files().saturating_sub(fs.files_free()) as i64,
            unit: pb::volume_usage::Unit::Inodes as i32,
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage: vec![bytes, inodes],
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let r = volume_ref(id)?;
        if !path.exists() {
            return Err(Status::not_found(format!(
                "{} does not exist",
                path.display()
            )));
        }
        self.must_be_mount_of(&r, &path)?;
        // The capacity is a quota the controller already raised: nothing grows on the node.
        let limit = self.usage(&r).await?.map_or(0, |(l, _)| l);
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: limit as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type, rpc};
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text = "36 35 0:52 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.brickfs.io/abc/globalmount rw,nosuid,nodev,relatime shared:1 - fuse.brickfs brickfs:pvc-1 rw,user_id=0\n\
                    37 36 0:52 /pvc-2 /var/lib/kubelet/pods/p/volumes/x\\040y ro,relatime - fuse.brickfs brickfs:shared rw\n\
                    38 1 8:1 / / rw - ext4 /dev/sda1 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].dev, "0:52");
        assert_eq!(m[0].source, "brickfs:pvc-1");
        assert!(!m[0].read_only);
        assert_eq!(m[1].root, "/pvc-2");
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p/volumes/x y")
        );
        assert!(m[1].read_only);
        assert_eq!(m[2].fs_type, "ext4");
    }
}
