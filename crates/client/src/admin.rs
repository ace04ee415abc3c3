//! Cluster administration shared by the CLI, the local cluster and tests: adding a node and
//! its bricks to the cluster map ("peer add"), creating and inspecting volumes.

use crate::brick::BrickClient;
use crate::meta::{MetaClient, MetaError};
use brickfs_proto::meta::{BrickRecord, MetaOp, MetaRead, MetaReply, NodeRecord, VolumeRecord};
use brickfs_proto::rpc::RpcError;
use brickfs_proto::{ErrorBody, ErrorCode};
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("failed to reach node {addr}: {source}")]
    Node {
        addr: SocketAddr,
        #[source]
        source: RpcError,
    },
    #[error("{0}")]
    Meta(#[from] MetaError),
}

fn unexpected(what: &str, reply: MetaReply) -> AdminError {
    AdminError::Meta(MetaError::Rejected(ErrorBody::new(
        ErrorCode::Internal,
        format!("unexpected answer to {what}: {reply:?}"),
    )))
}

/// Registers the node at `addr` and every brick it serves (with its capacity). Running it
/// again updates the records; it is how new bricks of a node become usable.
pub async fn peer_add(
    meta: &MetaClient,
    bricks: &BrickClient,
    addr: SocketAddr,
) -> Result<(NodeRecord, Vec<BrickRecord>), AdminError> {
    let node_err = |source| AdminError::Node { addr, source };
    let id = bricks.ping(addr).await.map_err(node_err)?;
    let served = bricks.list_bricks(addr).await.map_err(node_err)?;
    let node = NodeRecord {
        id,
        addr: addr.to_string(),
        last_heartbeat_ms: 0,
    };
    meta.write(MetaOp::RegisterNode { node: node.clone() })
        .await?;
    let mut records = Vec::new();
    for b in served {
        let st = bricks.statfs(addr, b.id).await.map_err(node_err)?;
        let rec = BrickRecord {
            id: b.id,
            node: id,
            path: b.path,
            capacity_bytes: st.total_bytes,
        };
        meta.write(MetaOp::RegisterBrick { brick: rec.clone() })
            .await?;
        records.push(rec);
    }
    Ok((node, records))
}

/// Creates a volume from spec words (`replica 3 HOST:PORT:/PATH ...`).
pub async fn volume_create(
    meta: &MetaClient,
    name: &str,
    spec: &[String],
) -> Result<VolumeRecord, AdminError> {
    match meta
        .write(MetaOp::CreateVolume {
            name: name.to_string(),
            spec: spec.to_vec(),
        })
        .await?
    {
        MetaReply::Volume(v) => Ok(v),
        other => Err(unexpected("CreateVolume", other)),
    }
}

/// A volume's record by name.
pub async fn volume_info(meta: &MetaClient, name: &str) -> Result<VolumeRecord, AdminError> {
    match meta
        .read(MetaRead::VolumeByName {
            name: name.to_string(),
        })
        .await?
    {
        MetaReply::Volume(v) => Ok(v),
        other => Err(unexpected("VolumeByName", other)),
    }
}
