//! The provisioning API (`--api-listen`): HTTP/JSON for a Kubernetes provisioner or a CSI
//! driver to create, list, inspect and delete volumes by size and durability class, and to
//! learn how to mount them.
//!
//! - `GET /v1/volumes`: every volume (name, type, status, bricks).
//! - `POST /v1/volumes` `{"name": "pvc-1", "size_bytes": 1073741824, "class": "replicate-3"}`:
//!   picks free registered bricks (spread over nodes, most free space first) for the class —
//!   `distribute`, `replicate-N` (2–5) or `disperse-K+M` — checks they hold `size_bytes`,
//!   creates and starts the volume: 201 with the volume and its mount. `"stripe": S` (2–256,
//!   not with disperse) makes it striped: S sets of the class per stripe group; `"start": false`
//!   leaves it created but not started.
//! - `GET /v1/volumes/NAME`: the volume and its mount; `DELETE /v1/volumes/NAME`: stops and
//!   deletes it (its data goes).
//! - `POST /v1/volumes/NAME/expand` `{"size_bytes": N}`: grows the volume to hold at least N
//!   bytes by adding whole stripe groups of free bricks (picked as for create), then starts a
//!   rebalance: 200 with the volume, its mount and the bricks added.
//!
//! - In a cluster with a key, a created volume's reply carries its first client credential
//!   (`"credential"`, shown this once), and `GET /v1/volumes/NAME/credentials` lists the
//!   volume's credentials (ids, labels, when made), `POST` to it `{"label": "...", "replace":
//!   false}` makes one (201 with `id` and `credential`; `replace: true` rotates: the others
//!   are revoked, listed in `revoked`), `DELETE /v1/volumes/NAME/credentials/ID` revokes one.
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 404, 409 (exists), 507 (not enough
//! free bricks or space), 502 (the metadata group failed).

use brickfs_client::{MetaClient, admin};
use brickfs_proto::ErrorCode;
use brickfs_proto::meta::{BrickRecord, MetaOp, MetaRead, MetaReply, NodeRecord, VolumeRecord};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

/// Bodies larger than this are refused.
const BODY_MAX: usize = 64 << 10;

/// Serves the API on `listener` until the task is dropped; `mount_from` names the metadata
/// members a mount should be given.
pub async fn serve(listener: tokio::net::TcpListener, meta: MetaClient, mount_from: SocketAddr) {
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            continue;
        };
        let meta = meta.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(conn, &meta, mount_from).await {
                tracing::debug!(%peer, error = %e, "provisioning API request failed");
            }
        });
    }
}

async fn connection(
    conn: tokio::net::TcpStream,
    meta: &MetaClient,
    mount_from: SocketAddr,
) -> std::io::Result<()> {
    use brickfs_proto::http;
    let req = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut conn, tls) = http::accept(conn).await?;
        let req = http::read_request(&mut conn, BODY_MAX).await?;
        Ok::<_, std::io::Error>((conn, tls, req))
    })
    .await;
    let (mut conn, tls, req) = match req {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let mut extra = Vec::new();
    let (status, body) = match req {
        None => (400, json!({"error": "malformed HTTP request"})),
        Some(req) => match http::authorize(&req, tls, "api") {
            Err((status, why)) => {
                tracing::warn!(status, why = %why, "provisioning API request refused");
                error(status, why)
            }
            Ok(add) => {
                extra = add;
                route(meta, mount_from, &req.method, &req.path, &req.body).await
            }
        },
    };
    http::reply(
        &mut conn,
        status,
        "application/json",
        &extra,
        &body.to_string(),
    )
    .await
}

fn error(status: u16, msg: impl std::fmt::Display) -> (u16, Value) {
    (status, json!({ "error": msg.to_string() }))
}

/// The JSON type a request field must have.
#[derive(Clone, Copy)]
enum Field {
    Str,
    Bool,
    Count,
}

/// Refuses (400) a body that is not an object, names a field not in `allowed`, or gives one
/// of another type: a misspelt or mistyped field (`"replace": "yes"`) is an error, never
/// quietly the default.
fn check_fields(req: &Value, allowed: &[(&str, Field)]) -> Result<(), (u16, Value)> {
    let Some(fields) = req.as_object() else {
        return Err(error(400, "the body must be a JSON object"));
    };
    for (key, value) in fields {
        let Some((_, kind)) = allowed.iter().find(|(name, _)| name == key) else {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            return Err(error(
                400,
                format!(
                    "unknown field {key:?} (this request takes {})",
                    names.join(", ")
                ),
            ));
        };
        let fits = match kind {
            Field::Str => value.is_string(),
            Field::Bool => value.is_boolean(),
            Field::Count => value.is_u64(),
        };
        if !fits {
            let want = match kind {
                Field::Str => "a string",
                Field::Bool => "true or false",
                Field::Count => "a whole number",
            };
            return Err(error(
                400,
                format!("field {key:?} must be {want}, not {value}"),
            ));
        }
    }
    Ok(())
}

/// The HTTP status of a metadata refusal.
fn status_of(code: Option<ErrorCode>) -> u16 {
    match code {
        Some(ErrorCode::NotFound) => 404,
        Some(ErrorCode::Exists) => 409,
        Some(ErrorCode::InvalidArgument | ErrorCode::InvalidPath | ErrorCode::NameTooLong) => 400,
        Some(ErrorCode::PermissionDenied) => 403,
        _ => 502,
    }
}

/// An admin error as an HTTP status: what the group refused says why.
fn from_admin(e: admin::AdminError) -> (u16, Value) {
    let code = match &e {
        admin::AdminError::Meta(m) => m.code(),
        admin::AdminError::Node { .. } => None,
    };
    error(status_of(code), e)
}

fn describe(v: &VolumeRecord, mount_from: SocketAddr) -> Value {
    json!({
        "name": v.name,
        "type": v.type_name,
        "status": format!("{:?}", v.status),
        "spec": v.spec,
        "bricks": v.bricks.len(),
        "mount": {
            "source": format!("{mount_from}/{}", v.name),
            "command": format!("mountd {mount_from}/{} /mnt/{}", v.name, v.name),
            "fstab": format!("{mount_from}/{} /mnt/{} fuse.brickfs _netdev 0 0", v.name, v.name),
        },
    })
}

/// Answers one API request in process, as the HTTP endpoint would (the CSI driver's
/// controller provisions through this): the status code and the JSON body.
pub async fn route(
    meta: &MetaClient,
    mount_from: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Value) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["v1", "volumes"]) => match meta.list_volumes().await {
            Ok(vs) => (
                200,
                Value::Array(vs.iter().map(|v| describe(v, mount_from)).collect()),
            ),
            Err(e) => error(502, e),
        },
        ("POST", ["v1", "volumes"]) => create(meta, mount_from, body).await,
        ("GET", ["v1", "volumes", name]) => match admin::volume_info(meta, name).await {
            Ok(v) => (200, describe(&v, mount_from)),
            Err(e) => from_admin(e),
        },
        ("DELETE", ["v1", "volumes", name]) => {
            if let Err(e) = admin::volume_info(meta, name).await {
                return from_admin(e);
            }
            // Stopping a stopped volume is refused: only the delete's answer counts.
            let _ = meta
                .write(MetaOp::StopVolume {
                    name: name.to_string(),
                })
                .await;
            match meta
                .write(MetaOp::DeleteVolume {
                    name: name.to_string(),
                })
                .await
            {
                Ok(_) => (200, json!({ "deleted": name })),
                Err(e) => from_admin(e.into()),
            }
        }
        ("POST", ["v1", "volumes", name, "expand"]) => expand(meta, mount_from, name, body).await,
        ("GET", ["v1", "volumes", name, "credentials"]) => {
            match admin::volume_info(meta, name).await {
                Ok(v) => (
                    200,
                    Value::Array(
                        v.credentials
                            .iter()
                            .map(|c| {
                                json!({
                                    "id": format!("{:x}", c.id),
                                    "label": c.label,
                                    "created_ms": c.created_ms,
                                })
                            })
                            .collect(),
                    ),
                ),
                Err(e) => from_admin(e),
            }
        }
        ("POST", ["v1", "volumes", name, "credentials"]) => {
            let req = match body {
                [] => json!({}),
                b => match serde_json::from_slice::<Value>(b) {
                    Ok(v) => v,
                    Err(_) => {
                        return error(400, "the body must be JSON: {\"label\", \"replace\"}");
                    }
                },
            };
            if let Err(refused) =
                check_fields(&req, &[("label", Field::Str), ("replace", Field::Bool)])
            {
                return refused;
            }
            let label = req["label"].as_str().unwrap_or("");
            let replace = req["replace"].as_bool().unwrap_or(false);
            match issue(meta, name, label, replace).await {
                Ok(c) => (
                    201,
                    json!({
                        "id": format!("{:x}", c.id),
                        "credential": c.credential,
                        "revoked": c.revoked.iter().map(|i| format!("{i:x}")).collect::<Vec<_>>(),
                    }),
                ),
                Err(e) => e,
            }
        }
        ("DELETE", ["v1", "volumes", name, "credentials", id]) => {
            let Ok(raw) = u64::from_str_radix(id, 16) else {
                return error(
                    400,
                    format!("credential id {id:?} is not a 64-bit hex number"),
                );
            };
            match meta
                .write(MetaOp::RevokeCredential {
                    name: name.to_string(),
                    id: raw,
                })
                .await
            {
                Ok(_) => (200, json!({ "revoked": id })),
                Err(e) => from_admin(e.into()),
            }
        }
        (_, ["v1", "volumes", ..]) => error(405, format!("{method} is not allowed on {path}")),
        _ => error(404, format!("no such resource {path}")),
    }
}

/// A client credential of `volume` (see `issue_credential`): 400 in a cluster without a key.
async fn issue(
    meta: &MetaClient,
    volume: &str,
    label: &str,
    replace: bool,
) -> Result<brickfs_proto::msg::CredentialIssued, Refusal> {
    let Some(key) = brickfs_proto::rpc::cluster_key() else {
        return Err(error(
            400,
            "this cluster has no key, so it has no client credentials",
        ));
    };
    crate::issue_credential(meta, &key, volume, label, replace)
        .await
        .map_err(|body| error(status_of(body.kind()), body.detail))
}

/// A durability class: the spec words before the bricks, bricks needed, and what fraction of
/// the smallest brick's capacity times the brick count holds data.
pub fn class(text: &str) -> Result<(Vec<String>, usize, usize), String> {
    if text == "distribute" {
        return Ok((Vec::new(), 1, 1));
    }
    if let Some(n) = text.strip_prefix("replicate-") {
        let n: usize = n.parse().map_err(|_| format!("bad class {text:?}"))?;
        if !(2..=5).contains(&n) {
            return Err(format!("replicate-N takes N from 2 to 5, not {n}"));
        }
        return Ok((vec!["replica".into(), n.to_string()], n, 1));
    }
    if let Some(km) = text.strip_prefix("disperse-") {
        let (k, m) = km
            .split_once('+')
            .and_then(|(k, m)| Some((k.parse::<usize>().ok()?, m.parse::<usize>().ok()?)))
            .ok_or_else(|| format!("bad class {text:?} (disperse-K+M, e.g. disperse-4+2)"))?;
        if k < 2 || m < 1 || k + m > 20 {
            return Err(format!(
                "disperse-K+M takes K ≥ 2, M ≥ 1, K+M ≤ 20, not {k}+{m}"
            ));
        }
        let spec = vec![
            "disperse".into(),
            (k + m).to_string(),
            "redundancy".into(),
            m.to_string(),
        ];
        return Ok((spec, k + m, k));
    }
    Err(format!(
        "unknown class {text:?}: distribute, replicate-N or disperse-K+M"
    ))
}

async fn create(meta: &MetaClient, mount_from: SocketAddr, body: &[u8]) -> (u16, Value) {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(
            400,
            "the body must be JSON: {\"name\", \"size_bytes\", \"class\"}",
        );
    };
    if let Err(refused) = check_fields(
        &req,
        &[
            ("name", Field::Str),
            ("size_bytes", Field::Count),
            ("class", Field::Str),
            ("stripe", Field::Count),
            ("start", Field::Bool),
        ],
    ) {
        return refused;
    }
    let (Some(name), Some(size), Some(cls)) = (
        req["name"].as_str(),
        req["size_bytes"].as_u64(),
        req["class"].as_str(),
    ) else {
        return error(
            400,
            "name (string), size_bytes (number) and class (string) are required",
        );
    };
    if let Err(e) = brickfs_meta::sm::check_volume_name(name) {
        return error(400, e.detail);
    }
    let (mut spec, mut bricks_needed, mut data_share) = match class(cls) {
        Ok(c) => c,
        Err(e) => return error(400, e),
    };
    // Striped: S sets of the class per stripe group, files cut across them.
    let stripe = req["stripe"].as_u64().unwrap_or(1);
    if stripe > 1 {
        if cls.starts_with("disperse-") {
            return error(400, "stripe and disperse cannot be combined");
        }
        let max = u64::from(brickfs_layout::spec::STRIPE_MAX);
        if stripe > max {
            return error(400, format!("stripe takes 2 to {max}, not {stripe}"));
        }
        spec.splice(0..0, ["stripe".to_string(), stripe.to_string()]);
        bricks_needed *= stripe as usize;
        data_share *= stripe as usize;
    }
    if admin::volume_info(meta, name).await.is_ok() {
        return error(409, format!("volume {name:?} exists"));
    }
    let Bricks { nodes, free, .. } = match free_bricks(meta).await {
        Ok(f) => f,
        Err(e) => return e,
    };
    let picked = spread(free, bricks_needed);
    if picked.len() < bricks_needed {
        return error(
            507,
            format!(
                "class {cls} needs {bricks_needed} free bricks; the cluster has {}",
                picked.len()
            ),
        );
    }
    let smallest = picked.iter().map(|b| b.capacity_bytes).min().unwrap_or(0);
    let usable = smallest.saturating_mul(data_share as u64);
    if usable < size {
        return error(
            507,
            format!("{size} bytes asked, the free bricks for {cls} hold {usable}"),
        );
    }
    match spec_words(&nodes, &picked) {
        Ok(words) => spec.extend(words),
        Err(e) => return e,
    }
    let v = match admin::volume_create(meta, name, &spec).await {
        Ok(v) => v,
        Err(e) => return from_admin(e),
    };
    // `"start": false` leaves it created, not started (the CSI driver marks it first).
    if req["start"].as_bool().unwrap_or(true)
        && let Err(e) = meta
            .write(MetaOp::StartVolume {
                name: v.name.clone(),
            })
            .await
    {
        return from_admin(e.into());
    }
    tracing::info!(volume = %name, class = cls, size, "volume provisioned");
    let credential = if brickfs_proto::rpc::cluster_key().is_some() {
        match issue(meta, name, "made with the volume", false).await {
            Ok(c) => Some(c.credential),
            Err(e) => return e,
        }
    } else {
        None
    };
    match admin::volume_info(meta, name).await {
        Ok(v) => {
            let mut d = describe(&v, mount_from);
            d["class"] = json!(cls);
            d["size_bytes"] = json!(size);
            if let Some(c) = credential {
                d["credential"] = json!(c);
                d["mount"]["command"] = json!(format!(
                    "mountd {mount_from}/{name} /mnt/{name} --credential-file FILE-HOLDING-THE-CREDENTIAL"
                ));
            }
            (201, d)
        }
        Err(e) => from_admin(e),
    }
}

type Refusal = (u16, Value);

/// The size of the largest volume of `class` (striped over `stripe` sets) that a create could
/// make now from the free bricks, picked as `POST /v1/volumes` picks them (0 when there are
/// not enough): what a CSI GetCapacity reports.
pub async fn creatable(meta: &MetaClient, class_name: &str, stripe: u64) -> Result<u64, Refusal> {
    let (_, needed, share) = class(class_name).map_err(|e| error(400, e))?;
    let stripe = stripe.max(1) as usize;
    let Bricks { free, .. } = free_bricks(meta).await?;
    let picked = spread(free, needed * stripe);
    if picked.len() < needed * stripe {
        return Ok(0);
    }
    let smallest = picked.iter().map(|b| b.capacity_bytes).min().unwrap_or(0);
    Ok(smallest.saturating_mul((share * stripe) as u64))
}

/// The cluster map's bricks and what is free of them.
struct Bricks {
    nodes: Vec<NodeRecord>,
    all: Vec<BrickRecord>,
    /// The bricks in no volume, most capacity first.
    free: Vec<BrickRecord>,
}

/// Reads the cluster map's nodes and bricks, and which bricks are free.
async fn free_bricks(meta: &MetaClient) -> Result<Bricks, Refusal> {
    let (nodes, bricks, volumes) = match (
        meta.read(MetaRead::ListNodes).await,
        meta.read(MetaRead::ListBricks).await,
        meta.list_volumes().await,
    ) {
        (Ok(MetaReply::Nodes(n)), Ok(MetaReply::Bricks(b)), Ok(v)) => (n, b, v),
        _ => return Err(error(502, "could not read the cluster map")),
    };
    let mut free: Vec<_> = bricks
        .iter()
        .filter(|b| {
            !volumes
                .iter()
                .any(|v| v.bricks.iter().any(|x| x.brick == b.id))
        })
        .cloned()
        .collect();
    free.sort_by_key(|b| std::cmp::Reverse(b.capacity_bytes));
    Ok(Bricks {
        nodes,
        all: bricks,
        free,
    })
}

/// Up to `n` of `free`, taken round-robin over nodes so that the bricks of a set land on as
/// many nodes as there are.
fn spread(free: Vec<BrickRecord>, n: usize) -> Vec<BrickRecord> {
    let mut by_node: Vec<Vec<BrickRecord>> = Vec::new();
    for b in free {
        match by_node.iter_mut().find(|l| l[0].node == b.node) {
            Some(l) => l.push(b),
            None => by_node.push(vec![b]),
        }
    }
    let mut picked = Vec::new();
    for round in 0.. {
        let mut any = false;
        for l in &by_node {
            if let Some(b) = l.get(round) {
                any = true;
                if picked.len() < n {
                    picked.push(b.clone());
                }
            }
        }
        if !any || picked.len() == n {
            break;
        }
    }
    picked
}

/// `HOST:PORT:/PATH` of each brick.
fn spec_words(nodes: &[NodeRecord], bricks: &[BrickRecord]) -> Result<Vec<String>, Refusal> {
    bricks
        .iter()
        .map(|b| {
            let n = nodes
                .iter()
                .find(|n| n.id == b.node)
                .ok_or_else(|| error(502, format!("brick {} is on an unknown node", b.id)))?;
            Ok(format!("{}:{}", n.addr, b.path))
        })
        .collect()
}

/// What one stripe group of `v` made of `bricks` holds: S sets, each the smallest brick's
/// capacity times its data share (1, or K of a disperse set).
fn group_capacity(v: &VolumeRecord, smallest: u64) -> u64 {
    let share = if v.disperse_data > 0 {
        u64::from(v.disperse_data)
    } else {
        1
    };
    smallest
        .saturating_mul(share)
        .saturating_mul(v.group_width() as u64)
}

async fn expand(meta: &MetaClient, mount_from: SocketAddr, name: &str, body: &[u8]) -> Refusal {
    let Some(size) = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|r| r["size_bytes"].as_u64())
    else {
        return error(400, "the body must be JSON: {\"size_bytes\": N}");
    };
    let v = match admin::volume_info(meta, name).await {
        Ok(v) => v,
        Err(e) => return from_admin(e),
    };
    let Bricks { nodes, all, free } = match free_bricks(meta).await {
        Ok(f) => f,
        Err(e) => return e,
    };
    let capacity = |id| {
        all.iter()
            .find(|b| b.id == id)
            .map_or(0, |b| b.capacity_bytes)
    };
    let s = v.group_width();
    let mut have: u64 = (0..v.groups())
        .filter(|g| v.takes_files(*g))
        .map(|g| {
            let smallest = v.sets[g * s..(g + 1) * s]
                .iter()
                .flat_map(|x| x.members.iter())
                .map(|m| capacity(*m))
                .min()
                .unwrap_or(0);
            group_capacity(&v, smallest)
        })
        .sum();
    let before = have;
    let group_bricks = s * v.set_width();
    let mut pool = free;
    let mut added = Vec::new();
    while have < size {
        let picked = spread(pool.clone(), group_bricks);
        if picked.len() < group_bricks {
            return error(
                507,
                format!(
                    "{size} bytes asked, volume {name} holds {before}; the free bricks add only {} (groups of {group_bricks})",
                    have - before
                ),
            );
        }
        let smallest = picked.iter().map(|b| b.capacity_bytes).min().unwrap_or(0);
        have = have.saturating_add(group_capacity(&v, smallest));
        pool.retain(|b| !picked.iter().any(|p| p.id == b.id));
        added.extend(picked);
    }
    if !added.is_empty() {
        let words = match spec_words(&nodes, &added) {
            Ok(w) => w,
            Err(e) => return e,
        };
        if let Err(e) = meta
            .write(MetaOp::AddBricks {
                name: name.to_string(),
                bricks: words,
            })
            .await
        {
            return from_admin(e.into());
        }
        match meta
            .write(MetaOp::RebalanceStart {
                name: name.to_string(),
            })
            .await
        {
            Ok(_) => {}
            // One is running already: it picks the new groups up.
            Err(e) if e.code() == Some(ErrorCode::Exists) => {}
            Err(e) => return from_admin(e.into()),
        }
        tracing::info!(volume = %name, size, bricks = added.len(), "volume expanded; rebalancing");
    }
    match admin::volume_info(meta, name).await {
        Ok(v) => {
            let mut d = describe(&v, mount_from);
            d["size_bytes"] = json!(have);
            d["added_bricks"] = json!(added.len());
            (200, d)
        }
        Err(e) => from_admin(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_parse_and_refuse_nonsense() {
        assert_eq!(class("distribute").unwrap().1, 1);
        let (spec, n, share) = class("replicate-3").unwrap();
        assert_eq!(
            (spec, n, share),
            (vec!["replica".to_string(), "3".into()], 3, 1)
        );
        let (spec, n, share) = class("disperse-4+2").unwrap();
        assert_eq!(spec.join(" "), "disperse 6 redundancy 2");
        assert_eq!((n, share), (6, 4));
        for bad in [
            "",
            "replicate-1",
            "replicate-x",
            "disperse-4",
            "disperse-1+1",
            "raid5",
        ] {
            assert!(class(bad).is_err(), "{bad}");
        }
    }
}
