//! Raft RPCs between members over the brickfs protocol: a `RaftRpc` frame whose data section is
//! the bincode of the openraft request, answered by `RaftRpcReply` whose data is the bincode of
//! `Result<response, RaftError>`.

use crate::types::TypeConfig;
use brickfs_proto::Message;
use brickfs_proto::meta::{RaftRpc, RaftRpcKind};
use brickfs_proto::rpc::{Pool, RpcError};
use bytes::Bytes;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;

/// Creates a [`Peer`] per target member, sharing one connection pool.
#[derive(Clone)]
pub struct Network {
    pool: Arc<Pool>,
}

impl Network {
    pub fn new(pool: Arc<Pool>) -> Self {
        Network { pool }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.parse().ok(),
            raw_addr: node.addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// The way to one member.
pub struct Peer {
    target: u64,
    addr: Option<SocketAddr>,
    raw_addr: String,
    pool: Arc<Pool>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl Peer {
    async fn rpc<Req, Resp, E>(
        &self,
        kind: RaftRpcKind,
        req: &Req,
        option: RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(addr) = self.addr else {
            let e = TransportError(format!(
                "member {} has a bad address {:?}",
                self.target, self.raw_addr
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let data = Bytes::from(brickfs_proto::msg::encode_body(req));
        let call = self
            .pool
            .call(addr, Message::RaftRpc(RaftRpc { kind }), data);
        let reply = match tokio::time::timeout(option.hard_ttl(), call).await {
            Err(_) => {
                let e = TransportError(format!(
                    "no answer from member {} in {:?}",
                    self.target,
                    option.hard_ttl()
                ));
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Ok(r) => r,
        };
        match reply {
            Ok((Message::RaftRpcReply(_), data)) => {
                let result: Result<Resp, RaftError<u64, E>> =
                    brickfs_proto::msg::decode_body(&data).map_err(|e| {
                        RPCError::Network(NetworkError::new(&TransportError(e.to_string())))
                    })?;
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok((other, _)) => Err(RPCError::Network(NetworkError::new(&TransportError(
                format!("unexpected reply {} to a raft rpc", other.name()),
            )))),
            Err(
                e @ (RpcError::Connect { .. }
                | RpcError::Handshake { .. }
                | RpcError::Unauthorized { .. }
                | RpcError::Closed { .. }),
            ) => {
                self.pool.forget(addr).await;
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => {
                self.pool.forget(addr).await;
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(RaftRpcKind::AppendEntries, &rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.rpc(RaftRpcKind::InstallSnapshot, &rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(RaftRpcKind::Vote, &rpc, option).await
    }
}
