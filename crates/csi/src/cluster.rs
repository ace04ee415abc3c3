//! What the driver asks of the metadata group: volumes, claim directories, their quotas, and
//! the removal of a directory claim's tree.

use brickfs_client::MetaClient;
use brickfs_proto::meta::{FileKind, MetaOp, MetaRead, MetaReply, QuotaInfo, VolumeRecord};
use brickfs_proto::{ErrorCode, Ino, VolumeId};
use tonic::Status;

/// The root directory of every volume.
pub const ROOT: Ino = Ino(1);

/// A metadata failure as a gRPC status: what does not exist is NOT_FOUND, refusals are
/// INVALID_ARGUMENT or FAILED_PRECONDITION, an unreachable group is UNAVAILABLE (the CO
/// retries).
pub fn status(what: &str, e: brickfs_client::MetaError) -> Status {
    let msg = format!("{what}: {e}");
    match e.code() {
        Some(ErrorCode::NotFound) => Status::not_found(msg),
        Some(ErrorCode::Exists) => Status::already_exists(msg),
        Some(ErrorCode::InvalidArgument) => Status::invalid_argument(msg),
        Some(ErrorCode::PermissionDenied) => Status::permission_denied(msg),
        Some(ErrorCode::NoSpace) | Some(ErrorCode::QuotaExceeded) => {
            Status::resource_exhausted(msg)
        }
        Some(ErrorCode::Busy) | None => Status::unavailable(msg),
        Some(_) => Status::failed_precondition(msg),
    }
}

/// The volume called `name`, `None` when there is none.
pub async fn volume(meta: &MetaClient, name: &str) -> Result<Option<VolumeRecord>, Status> {
    match meta
        .read(MetaRead::VolumeByName {
            name: name.to_string(),
        })
        .await
    {
        Ok(MetaReply::Volume(v)) => Ok(Some(v)),
        Ok(other) => Err(Status::internal(format!(
            "unexpected answer to VolumeByName: {other:?}"
        ))),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(status(&format!("read volume {name}"), e)),
    }
}

/// The quotas of a volume.
pub async fn quotas(meta: &MetaClient, volume: VolumeId) -> Result<Vec<QuotaInfo>, Status> {
    match meta.read(MetaRead::Quotas { volume }).await {
        Ok(MetaReply::Quotas(q)) => Ok(q),
        Ok(other) => Err(Status::internal(format!(
            "unexpected answer to Quotas: {other:?}"
        ))),
        Err(e) => Err(status("read quotas", e)),
    }
}

/// The quota on `path` of `volume`, if it has one.
pub async fn quota_of(
    meta: &MetaClient,
    volume: VolumeId,
    path: &str,
) -> Result<Option<QuotaInfo>, Status> {
    Ok(quotas(meta, volume)
        .await?
        .into_iter()
        .find(|q| q.path == path))
}

/// Sets the quota of directory `dir` (at `path`) to `limit` bytes.
pub async fn set_quota(
    meta: &MetaClient,
    volume: VolumeId,
    dir: Ino,
    path: &str,
    limit: Option<u64>,
) -> Result<(), Status> {
    meta.write(MetaOp::SetQuota {
        volume,
        dir,
        path: path.to_string(),
        limit_bytes: limit,
    })
    .await
    .map(|_| ())
    .map_err(|e| status(&format!("set the quota of {path}"), e))
}

/// The directory `name` under the root, if there is one (`Err` when it is not a directory).
pub async fn lookup_dir(
    meta: &MetaClient,
    volume: VolumeId,
    name: &str,
) -> Result<Option<Ino>, Status> {
    match meta
        .read(MetaRead::Lookup {
            volume,
            parent: ROOT,
            name: name.to_string(),
        })
        .await
    {
        Ok(MetaReply::Attr(a)) if a.kind == FileKind::Dir => Ok(Some(a.ino)),
        Ok(MetaReply::Attr(_)) => Err(Status::already_exists(format!(
            "/{name} exists in the volume and is not a directory"
        ))),
        Ok(other) => Err(Status::internal(format!(
            "unexpected answer to Lookup: {other:?}"
        ))),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(status(&format!("look up /{name}"), e)),
    }
}

/// Makes `/name` (mode 0777: pods run as any user; an existing one is returned).
pub async fn make_dir(meta: &MetaClient, volume: VolumeId, name: &str) -> Result<Ino, Status> {
    match meta
        .write(MetaOp::Mkdir {
            volume,
            parent: ROOT,
            name: name.to_string(),
            mode: 0o777,
            umask: 0,
            uid: 0,
            gid: 0,
        })
        .await
    {
        Ok(MetaReply::Attr(a)) => Ok(a.ino),
        Ok(other) => Err(Status::internal(format!(
            "unexpected answer to Mkdir: {other:?}"
        ))),
        Err(e) if e.code() == Some(ErrorCode::Exists) => lookup_dir(meta, volume, name)
            .await?
            .ok_or_else(|| Status::aborted(format!("/{name} came and went; try again"))),
        Err(e) => Err(status(&format!("make /{name}"), e)),
    }
}

/// Makes the directory claim `/name` marked with `mark`: made as `/.csi-making-NAME`,
/// marked, then renamed into place (without replacing), so that an unmarked `/NAME` is never
/// one of this driver's. A temporary one a cut-off create left is reused.
pub async fn make_claim_dir(
    meta: &MetaClient,
    volume: VolumeId,
    name: &str,
    mark: &serde_json::Value,
) -> Result<Ino, Status> {
    let tmp = format!(".csi-making-{name}");
    let ino = make_dir(meta, volume, &tmp).await?;
    set_mark(meta, volume, ino, mark).await?;
    match meta
        .write(MetaOp::Rename {
            volume,
            parent: ROOT,
            name: tmp.clone(),
            new_parent: ROOT,
            new_name: name.to_string(),
            flags: brickfs_proto::meta::RenameFlags {
                noreplace: true,
                exchange: false,
            },
        })
        .await
    {
        Ok(_) => Ok(ino),
        Err(e) if e.code() == Some(ErrorCode::Exists) => {
            // Someone else's `/NAME` appeared meanwhile: leave it, drop ours.
            let _ = meta
                .write(MetaOp::Rmdir {
                    volume,
                    parent: ROOT,
                    name: tmp,
                })
                .await;
            Err(Status::already_exists(format!(
                "/{name} exists and was not made by brickfs-csi for this claim; it is left alone"
            )))
        }
        Err(e) => Err(status(&format!("rename {tmp} to {name}"), e)),
    }
}

/// Removes a directory claim: everything under `/name`, depth first, one page of entries at
/// a time (deleted files' objects go with the GC, as for any unlink), then its quota, then
/// the directory itself, so that a delete cut off half way is still listed and retried. Gone
/// already is success.
pub async fn remove_claim_dir(
    meta: &MetaClient,
    volume: VolumeId,
    name: &str,
) -> Result<u64, Status> {
    const PAGE: u32 = 512;
    let Some(top) = lookup_dir(meta, volume, name).await? else {
        return Ok(0);
    };
    let mut removed = 0u64;
    // (directory, its parent, its name): a directory is removed once it is empty.
    let mut stack = vec![(top, ROOT, name.to_string())];
    while let Some((dir, parent, dname)) = stack.last().cloned() {
        let entries = match meta
            .read(MetaRead::ReadDir {
                volume,
                ino: dir,
                after: None,
                limit: PAGE,
            })
            .await
        {
            Ok(MetaReply::Entries { entries, .. }) => entries,
            Ok(other) => {
                return Err(Status::internal(format!(
                    "unexpected answer to ReadDir: {other:?}"
                )));
            }
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                stack.pop();
                continue;
            }
            Err(e) => return Err(status("list a claim directory", e)),
        };
        let entries: Vec<_> = entries
            .into_iter()
            .filter(|e| e.name != "." && e.name != "..")
            .collect();
        if entries.is_empty() {
            if dir == top {
                set_quota(meta, volume, top, &format!("/{name}"), None).await?;
            }
            match meta
                .write(MetaOp::Rmdir {
                    volume,
                    parent,
                    name: dname.clone(),
                })
                .await
            {
                Ok(_) => removed += 1,
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                Err(e) => return Err(status(&format!("remove directory {dname}"), e)),
            }
            stack.pop();
            continue;
        }
        for e in entries {
            if e.kind == FileKind::Dir {
                stack.push((e.ino, dir, e.name));
                continue;
            }
            match meta
                .write(MetaOp::Unlink {
                    volume,
                    parent: dir,
                    name: e.name.clone(),
                })
                .await
            {
                Ok(_) => removed += 1,
                Err(err) if err.code() == Some(ErrorCode::NotFound) => {}
                Err(err) => return Err(status(&format!("remove {}", e.name), err)),
            }
        }
    }
    Ok(removed)
}

/// The extended attribute that marks a claim's directory (a whole volume's root, or a
/// directory claim's directory) as made by this driver, with what it was made with (JSON:
/// `csi_name`, `mode`, `type`, `stripe`). Only marked claims are listed, staged, grown or
/// deleted: a volume or directory made by hand is never taken over.
pub const MARK: &str = "trusted.brickfs.csi-claim";

/// The claim mark of `ino`, if it has one.
pub async fn mark_of(
    meta: &MetaClient,
    volume: VolumeId,
    ino: Ino,
) -> Result<Option<serde_json::Value>, Status> {
    match meta
        .read(MetaRead::GetXattr {
            volume,
            ino,
            name: MARK.to_string(),
        })
        .await
    {
        Ok(MetaReply::Value(v)) => Ok(Some(
            serde_json::from_slice(&v).unwrap_or(serde_json::Value::Null),
        )),
        Ok(other) => Err(Status::internal(format!(
            "unexpected answer to GetXattr: {other:?}"
        ))),
        Err(e)
            if matches!(
                e.code(),
                Some(ErrorCode::NoData) | Some(ErrorCode::NotFound)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(status("read a claim's mark", e)),
    }
}

/// Marks `ino` as a claim made with `mark`.
pub async fn set_mark(
    meta: &MetaClient,
    volume: VolumeId,
    ino: Ino,
    mark: &serde_json::Value,
) -> Result<(), Status> {
    meta.write(MetaOp::SetXattr {
        volume,
        ino,
        name: MARK.to_string(),
        value: mark.to_string().into_bytes(),
        create_only: false,
        replace_only: false,
    })
    .await
    .map(|_| ())
    .map_err(|e| status("mark a claim", e))
}

/// Whether directory `ino` holds nothing.
pub async fn is_empty(meta: &MetaClient, volume: VolumeId, ino: Ino) -> Result<bool, Status> {
    match meta
        .read(MetaRead::ReadDir {
            volume,
            ino,
            after: None,
            limit: 4,
        })
        .await
    {
        Ok(MetaReply::Entries { entries, .. }) => {
            Ok(entries.iter().all(|e| e.name == "." || e.name == ".."))
        }
        Ok(other) => Err(Status::internal(format!(
            "unexpected answer to ReadDir: {other:?}"
        ))),
        Err(e) => Err(status("list a directory", e)),
    }
}

/// A claim as the metadata group holds it.
pub struct Claim {
    pub volume: VolumeRecord,
    /// The claim's directory: the volume's root, or the claim's directory.
    pub dir: Ino,
    pub mark: serde_json::Value,
    /// Its quota (limit, used); (0, 0) before the quota is set.
    pub limit: u64,
    pub used: u64,
}

/// The claim `r` names, when it exists and carries this driver's mark.
pub async fn claim(meta: &MetaClient, r: &crate::spec::VolumeRef) -> Result<Option<Claim>, Status> {
    use crate::spec::VolumeRef;
    let Some(v) = volume(meta, r.volume()).await? else {
        return Ok(None);
    };
    let dir = match r {
        VolumeRef::Whole { .. } => ROOT,
        VolumeRef::Dir { dir, .. } => match lookup_dir(meta, v.id, dir).await {
            Ok(Some(ino)) => ino,
            Ok(None) | Err(_) => return Ok(None),
        },
    };
    let Some(mark) = mark_of(meta, v.id, dir).await? else {
        return Ok(None);
    };
    let (limit, used) = quota_of(meta, v.id, &r.quota_path())
        .await?
        .map_or((0, 0), |q| (q.limit_bytes, q.used_bytes));
    Ok(Some(Claim {
        volume: v,
        dir,
        mark,
        limit,
        used,
    }))
}
