//! The Controller service: claims made, grown, listed and removed through the metadata group.

use crate::cluster::{self, ROOT};
use crate::pb;
use crate::spec::{self, Provision, VolumeRef};
use brickfs_client::MetaClient;
use serde_json::{Value, json};
use std::collections::HashMap;
use tonic::{Request, Response, Status};

pub struct Controller {
    meta: MetaClient,
    /// Serialises creates, expansions and deletes: two calls for the same claim (a CO's retry
    /// while the first is still running) must not both make it.
    busy: tokio::sync::Mutex<()>,
}

impl Controller {
    pub fn new(meta: MetaClient) -> Controller {
        Controller {
            meta,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// The provisioning API's answer to one request, in process.
    async fn api(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let from = self
            .meta
            .leader()
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        brickd::api::route(&self.meta, from, method, path, &body).await
    }
}

/// Whether `v` has the layout of `class` striped `stripe` ways (a cut-off create's volume).
fn layout_is(v: &brickfs_proto::meta::VolumeRecord, class: &str, stripe: u32) -> bool {
    let Ok((_, width, share)) = brickd::api::class(class) else {
        return false;
    };
    let disperse = class.starts_with("disperse-");
    v.set_width() == width
        && (v.disperse_data as usize == if disperse { share } else { 0 })
        && v.group_width() == stripe.max(1) as usize
        && v.bricks.len() == width * stripe.max(1) as usize
}

/// What the shared volume `v` holds in all (its bricks' capacity over its layout) and what it
/// has free now (as `df` on it shows).
async fn shared_space(
    meta: &MetaClient,
    v: &brickfs_proto::meta::VolumeRecord,
) -> Result<u64, Status> {
    let all = match meta.read(brickfs_proto::meta::MetaRead::ListBricks).await {
        Ok(brickfs_proto::meta::MetaReply::Bricks(b)) => b,
        Ok(_) => return Err(Status::internal("unexpected answer to ListBricks")),
        Err(e) => return Err(cluster::status("read the cluster map", e)),
    };
    let raw: u64 = all
        .iter()
        .filter(|b| v.bricks.iter().any(|x| x.brick == b.id))
        .map(|b| b.capacity_bytes)
        .sum();
    Ok(raw / v.set_width().max(1) as u64 * u64::from(v.disperse_data.max(1)))
}

/// An API refusal as a gRPC status.
fn api_status(code: u16, body: &Value) -> Status {
    let msg = body["error"].as_str().unwrap_or("refused").to_string();
    match code {
        400 => Status::invalid_argument(msg),
        404 => Status::not_found(msg),
        409 => Status::already_exists(msg),
        507 => Status::resource_exhausted(msg),
        403 => Status::permission_denied(msg),
        _ => Status::unavailable(msg),
    }
}

fn volume_of(r: &VolumeRef, capacity: u64) -> pb::Volume {
    let mut context = HashMap::new();
    context.insert("volume".to_string(), r.volume().to_string());
    match r {
        VolumeRef::Whole { .. } => {
            context.insert("mode".to_string(), "volume".to_string());
        }
        VolumeRef::Dir { dir, .. } => {
            context.insert("mode".to_string(), "directory".to_string());
            context.insert("dir".to_string(), dir.clone());
        }
    }
    pb::Volume {
        capacity_bytes: capacity as i64,
        volume_id: r.id(),
        volume_context: context,
        content_source: None,
        accessible_topology: Vec::new(),
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        spec::check_capabilities(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "brickfs-csi makes empty volumes only (no snapshots or clones)",
            ));
        }
        let size = spec::capacity(req.capacity_range.as_ref()).map_err(Status::out_of_range)?;
        let how = spec::provision(&req.parameters).map_err(Status::invalid_argument)?;
        if let Some(fs) = req.parameters.get("csi.storage.k8s.io/fstype")
            && !matches!(fs.as_str(), "" | "brickfs" | "fuse.brickfs")
        {
            return Err(Status::invalid_argument(format!(
                "csi.storage.k8s.io/fstype {fs:?}: brickfs volumes are brickfs filesystems"
            )));
        }
        let name = spec::claim_name(&req.name);
        let r = match &how {
            Provision::Volume { .. } => VolumeRef::Whole {
                volume: name.clone(),
            },
            Provision::Directory { shared } => VolumeRef::Dir {
                volume: shared.clone(),
                dir: name.clone(),
            },
        };
        let _one = self.busy.lock().await;
        let mark = how.mark(&req.name);
        let taken = |what: String| {
            Status::already_exists(format!(
                "{what} exists and was not made by brickfs-csi for this claim; it is left alone"
            ))
        };
        // Find or make the claim's directory (a whole volume's root), marked as ours.
        let (v, dir) = match &how {
            Provision::Volume { class, stripe } => {
                let v = match cluster::volume(&self.meta, &name).await? {
                    Some(v) => v,
                    None => {
                        // Created, not started: it is marked as this driver's before anyone
                        // can use it, so an unmarked started volume is never one of ours.
                        let mut body = json!({"name": name, "size_bytes": size, "class": class, "start": false});
                        if *stripe > 1 {
                            body["stripe"] = json!(stripe);
                        }
                        let (code, body) = self.api("POST", "/v1/volumes", body).await;
                        if code != 201 {
                            return Err(api_status(code, &body));
                        }
                        cluster::volume(&self.meta, &name)
                            .await?
                            .ok_or_else(|| Status::aborted(format!("volume {name} went away")))?
                    }
                };
                (v, ROOT)
            }
            Provision::Directory { shared } => {
                let Some(v) = cluster::volume(&self.meta, shared).await? else {
                    return Err(Status::invalid_argument(format!(
                        "the StorageClass's shared volume {shared:?} does not exist (create it first)"
                    )));
                };
                if cluster::mark_of(&self.meta, v.id, ROOT).await?.is_some() {
                    return Err(Status::invalid_argument(format!(
                        "volume {shared:?} is a claim of its own, not a shared volume"
                    )));
                }
                let total = shared_space(&self.meta, &v).await?;
                if size > total {
                    return Err(Status::out_of_range(format!(
                        "{size} bytes asked; the shared volume {shared} holds {total} in all"
                    )));
                }
                let dir = match cluster::lookup_dir(&self.meta, v.id, &name).await? {
                    Some(d) => d,
                    None => cluster::make_claim_dir(&self.meta, v.id, &name, &mark).await?,
                };
                (v, dir)
            }
        };
        match cluster::mark_of(&self.meta, v.id, dir).await? {
            Some(m) if m.get("deleting").is_some() => {
                return Err(Status::aborted(format!(
                    "{} is being deleted; retry once its DeleteVolume is done",
                    r.id()
                )));
            }
            Some(m) if m.get("csi_name").and_then(|n| n.as_str()) != Some(req.name.as_str()) => {
                return Err(Status::already_exists(format!(
                    "{} belongs to another claim name ({})",
                    r.id(),
                    m.get("csi_name").cloned().unwrap_or_default()
                )));
            }
            Some(m) if !how.matches(&m) => {
                return Err(Status::already_exists(format!(
                    "{} exists, made with other parameters ({m})",
                    r.id()
                )));
            }
            Some(_) => {}
            // Unmarked: ours only if it is one a create cut off before marking it (a volume
            // never started; a directory still empty).
            None => {
                let quota = cluster::quota_of(&self.meta, v.id, &r.quota_path()).await?;
                let fresh = match (&r, &how) {
                    (VolumeRef::Whole { .. }, Provision::Volume { class, stripe }) => {
                        v.status == brickfs_proto::meta::VolumeStatus::Created
                            && layout_is(&v, class, *stripe)
                    }
                    // Directories are made marked (see `make_claim_dir`).
                    _ => false,
                };
                if !fresh || quota.is_some() || !cluster::is_empty(&self.meta, v.id, dir).await? {
                    return Err(taken(match &r {
                        VolumeRef::Whole { volume } => format!("volume {volume}"),
                        VolumeRef::Dir { volume, dir } => format!("/{dir} of volume {volume}"),
                    }));
                }
                cluster::set_mark(&self.meta, v.id, dir, &mark).await?;
            }
        }
        if v.status == brickfs_proto::meta::VolumeStatus::Created {
            self.meta
                .write(brickfs_proto::meta::MetaOp::StartVolume {
                    name: v.name.clone(),
                })
                .await
                .map_err(|e| cluster::status(&format!("start volume {}", v.name), e))?;
        }
        let limit = cluster::quota_of(&self.meta, v.id, &r.quota_path())
            .await?
            .map_or(0, |q| q.limit_bytes);
        if limit > 0 {
            // Made before: the same answer if it fits, ALREADY_EXISTS if not.
            if !spec::fits(limit, req.capacity_range.as_ref()) {
                return Err(Status::already_exists(format!(
                    "{} exists with {limit} bytes, which does not fit the capacity asked",
                    r.id()
                )));
            }
            return Ok(Response::new(pb::CreateVolumeResponse {
                volume: Some(volume_of(&r, limit)),
            }));
        }
        cluster::set_quota(&self.meta, v.id, dir, &r.quota_path(), Some(size)).await?;
        tracing::info!(csi_name = %req.name, id = %r.id(), size, "claim created");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(volume_of(&r, size)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        // An id this driver never made names nothing: deleting it succeeds (the spec).
        let Some(r) = VolumeRef::parse(&req.volume_id) else {
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        let _one = self.busy.lock().await;
        // Only what this driver made and marked is deleted; anything else is not one of its
        // claims, so there is nothing to delete (and a volume made by hand stays).
        let Some(c) = cluster::claim(&self.meta, &r).await? else {
            tracing::info!(id = %r.id(), "delete of a claim that does not exist (or is not this driver's): nothing to do");
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        match &r {
            VolumeRef::Whole { volume } => {
                let (code, body) = self
                    .api("DELETE", &format!("/v1/volumes/{volume}"), Value::Null)
                    .await;
                if code != 200 && code != 404 {
                    return Err(api_status(code, &body));
                }
            }
            VolumeRef::Dir { dir, .. } => {
                // Marked as going first: a delete cut off half way is not listed, and no
                // create hands out what is left of it.
                let mut mark = c.mark.clone();
                if mark.get("deleting").is_none() {
                    mark["deleting"] = json!(true);
                    cluster::set_mark(&self.meta, c.volume.id, c.dir, &mark).await?;
                }
                let removed = cluster::remove_claim_dir(&self.meta, c.volume.id, dir).await?;
                tracing::info!(id = %r.id(), removed, "claim directory removed");
            }
        }
        tracing::info!(id = %r.id(), "claim deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let r = VolumeRef::parse(&req.volume_id)
            .ok_or_else(|| Status::not_found(format!("no volume {}", req.volume_id)))?;
        let Some(c) = cluster::claim(&self.meta, &r).await? else {
            return Err(Status::not_found(format!("no volume {}", req.volume_id)));
        };
        // Parameters, when given, must be those the claim was made with.
        let params_ok = req.parameters.is_empty()
            || spec::provision(&req.parameters).is_ok_and(|how| how.matches(&c.mark));
        let verdict = if params_ok {
            spec::check_capabilities(&req.volume_capabilities)
        } else {
            Err(format!(
                "the claim was not made with these parameters (it was made with {})",
                c.mark
            ))
        };
        Ok(Response::new(match verdict {
            Ok(_) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = req.into_inner();
        if req.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        // Claims are the quotas this driver sets: on a volume's root (a whole volume) or on a
        // directory just under it (a directory claim).
        let volumes = self
            .meta
            .list_volumes()
            .await
            .map_err(|e| cluster::status("list volumes", e))?;
        let mut claims: Vec<(String, u64)> = Vec::new();
        for v in volumes {
            let quotas = cluster::quotas(&self.meta, v.id).await?;
            if cluster::mark_of(&self.meta, v.id, ROOT).await?.is_some() {
                let limit = quotas
                    .iter()
                    .find(|q| q.path == "/")
                    .map_or(0, |q| q.limit_bytes);
                claims.push((
                    VolumeRef::Whole {
                        volume: v.name.clone(),
                    }
                    .id(),
                    limit,
                ));
                continue;
            }
            for q in quotas {
                let Some(d) = q
                    .path
                    .strip_prefix('/')
                    .filter(|d| spec::brickfs_meta_name_ok(d))
                else {
                    continue;
                };
                if cluster::mark_of(&self.meta, v.id, q.dir)
                    .await?
                    .is_some_and(|m| m.get("deleting").is_none())
                {
                    let r = VolumeRef::Dir {
                        volume: v.name.clone(),
                        dir: d.to_string(),
                    };
                    claims.push((r.id(), q.limit_bytes));
                }
            }
        }
        claims.sort();
        let ids: Vec<String> = claims.iter().map(|(id, _)| id.clone()).collect();
        let (page, next_token) =
            spec::page(&ids, &req.starting_token, req.max_entries).map_err(Status::aborted)?;
        let entries = page
            .into_iter()
            .filter_map(|id| {
                let cap = claims.iter().find(|(i, _)| *i == id)?.1;
                let r = VolumeRef::parse(&id)?;
                Some(pb::list_volumes_response::Entry {
                    volume: Some(volume_of(&r, cap)),
                    status: None,
                })
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let req = req.into_inner();
        if !req.volume_capabilities.is_empty()
            && spec::check_capabilities(&req.volume_capabilities).is_err()
        {
            return Ok(Response::new(pb::GetCapacityResponse::default()));
        }
        let how = spec::provision(&req.parameters).map_err(Status::invalid_argument)?;
        let available = match how {
            // What free bricks would hold in that class: their capacity over the class's
            // bricks per unit of data.
            Provision::Volume { class, stripe } => {
                brickd::api::creatable(&self.meta, &class, u64::from(stripe))
                    .await
                    .map_err(|(code, body)| api_status(code, &body))?
            }
            // A directory claim may be as large as the shared volume; what is free is what
            // its claims have not used yet (claims may promise more than it holds).
            Provision::Directory { shared } => {
                let v = cluster::volume(&self.meta, &shared)
                    .await?
                    .ok_or_else(|| Status::invalid_argument(format!("no volume {shared:?}")))?;
                let used: u64 = cluster::quotas(&self.meta, v.id)
                    .await?
                    .iter()
                    .map(|q| q.used_bytes)
                    .sum();
                let total = shared_space(&self.meta, &v).await?;
                return Ok(Response::new(pb::GetCapacityResponse {
                    available_capacity: total.saturating_sub(used) as i64,
                    maximum_volume_size: Some(total as i64),
                    minimum_volume_size: None,
                }));
            }
        };
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: (available > 0).then_some(available as i64),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type, rpc};
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        let size = spec::capacity(Some(range)).map_err(Status::out_of_range)?;
        let r = VolumeRef::parse(&req.volume_id)
            .ok_or_else(|| Status::not_found(format!("no volume {}", req.volume_id)))?;
        let _one = self.busy.lock().await;
        let Some(c) = cluster::claim(&self.meta, &r).await? else {
            return Err(Status::not_found(format!("no volume {}", req.volume_id)));
        };
        let limit = c.limit;
        if limit >= size {
            // Already that big: nothing to do (an expansion never shrinks).
            return Ok(Response::new(pb::ControllerExpandVolumeResponse {
                capacity_bytes: limit as i64,
                node_expansion_required: false,
            }));
        }
        if let VolumeRef::Dir { volume, .. } = &r {
            let total = shared_space(&self.meta, &c.volume).await?;
            if size > total {
                return Err(Status::out_of_range(format!(
                    "{size} bytes asked; the shared volume {volume} holds {total} in all"
                )));
            }
        }
        if let VolumeRef::Whole { volume } = &r {
            // More bricks when the volume's own cannot hold the new size.
            let (code, body) = self
                .api(
                    "POST",
                    &format!("/v1/volumes/{volume}/expand"),
                    json!({ "size_bytes": size }),
                )
                .await;
            if code != 200 {
                return Err(api_status(code, &body));
            }
        }
        let (v, dir) = (c.volume, c.dir);
        cluster::set_quota(&self.meta, v.id, dir, &r.quota_path(), Some(size)).await?;
        tracing::info!(id = %r.id(), from = limit, to = size, "claim expanded");
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: false,
        }))
    }
}
