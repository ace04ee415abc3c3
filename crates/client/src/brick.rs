//! Typed calls to the brick service of a node. Each method sends one request through the
//! shared [`Pool`] and checks that the reply has the expected kind.

use brickfs_proto::msg::{
    BrickInfo, Delete, Fsync, List, ListBricks, ListedObject, ObjectState, OpenBrick, Ping, Read,
    Stat, Statfs, StatfsReply, Truncate, Write,
};
use brickfs_proto::rpc::{ClientOptions, Pool, RpcError};
use brickfs_proto::{BrickId, ErrorCode, Message, NodeId, ObjectKey};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

pub type BrickError = RpcError;

/// A client for the bricks of many nodes, sharing one connection pool.
#[derive(Clone)]
pub struct BrickClient {
    pool: Arc<Pool>,
}

macro_rules! expect {
    ($reply:expr, $request:literal, $variant:ident) => {
        match $reply {
            (Message::$variant(body), data) => Ok((body, data)),
            (other, _) => Err(RpcError::UnexpectedReply {
                request: $request,
                got: other.name(),
            }),
        }
    };
}

impl BrickClient {
    pub fn new(opts: ClientOptions) -> BrickClient {
        BrickClient {
            pool: Arc::new(Pool::new(opts)),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn call(
        &self,
        addr: SocketAddr,
        msg: Message,
        data: Bytes,
    ) -> Result<(Message, Bytes), RpcError> {
        self.pool.call(addr, msg, data).await
    }

    /// Checks that the node answers; returns its id.
    pub async fn ping(&self, addr: SocketAddr) -> Result<NodeId, RpcError> {
        let reply = self
            .call(addr, Message::Ping(Ping {}), Bytes::new())
            .await?;
        Ok(expect!(reply, "Ping", Pong)?.0.node)
    }

    /// Asks the node at `addr` for a client credential of `volume` (see
    /// `Message::IssueCredential`; administrators of a keyed cluster only).
    pub async fn issue_credential(
        &self,
        addr: SocketAddr,
        req: brickfs_proto::msg::IssueCredential,
    ) -> Result<brickfs_proto::msg::CredentialIssued, RpcError> {
        let reply = self
            .call(addr, Message::IssueCredential(req), Bytes::new())
            .await?;
        Ok(expect!(reply, "IssueCredential", CredentialIssued)?.0)
    }

    pub async fn list_bricks(&self, addr: SocketAddr) -> Result<Vec<BrickInfo>, RpcError> {
        let reply = self
            .call(addr, Message::ListBricks(ListBricks {}), Bytes::new())
            .await?;
        Ok(expect!(reply, "ListBricks", BrickList)?.0.bricks)
    }

    /// Resolves the brick at `path` on the node (the `HOST:/PATH` of a volume spec).
    pub async fn open_brick(&self, addr: SocketAddr, path: &str) -> Result<BrickInfo, RpcError> {
        let msg = Message::OpenBrick(OpenBrick {
            path: path.to_string(),
        });
        let reply = self.call(addr, msg, Bytes::new()).await?;
        Ok(expect!(reply, "OpenBrick", BrickOpened)?.0)
    }

    pub async fn write(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
        offset_bytes: u64,
        data: Bytes,
        sync: bool,
    ) -> Result<ObjectState, RpcError> {
        let msg = Message::Write(Write {
            brick,
            key,
            offset_bytes,
            sync,
        });
        let reply = self.call(addr, msg, data).await?;
        Ok(expect!(reply, "Write", Written)?.0)
    }

    /// Reads up to `len_bytes`; the result is short at the end of the object.
    pub async fn read(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> Result<(ObjectState, Bytes), RpcError> {
        let msg = Message::Read(Read {
            brick,
            key,
            offset_bytes,
            len_bytes,
            repair: false,
        });
        let reply = self.call(addr, msg, Bytes::new()).await?;
        let (body, data) = expect!(reply, "Read", ReadData)?;
        Ok((body.state, data))
    }

    pub async fn truncate(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
        len_bytes: u64,
        sync: bool,
    ) -> Result<ObjectState, RpcError> {
        let msg = Message::Truncate(Truncate {
            brick,
            key,
            len_bytes,
            sync,
        });
        let reply = self.call(addr, msg, Bytes::new()).await?;
        Ok(expect!(reply, "Truncate", Truncated)?.0)
    }

    /// Deletes an object; returns whether it existed.
    pub async fn delete(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
    ) -> Result<bool, RpcError> {
        let reply = self
            .call(addr, Message::Delete(Delete { brick, key }), Bytes::new())
            .await?;
        Ok(expect!(reply, "Delete", Deleted)?.0.existed)
    }

    /// Seals, unseals or drops an object for a file moving between stripe groups.
    pub async fn seal(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
        action: brickfs_proto::msg::SealAction,
    ) -> Result<ObjectState, RpcError> {
        let reply = self
            .call(
                addr,
                Message::Seal(brickfs_proto::msg::Seal { brick, key, action }),
                Bytes::new(),
            )
            .await?;
        Ok(expect!(reply, "Seal", Sealed)?.0)
    }

    pub async fn fsync(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
    ) -> Result<ObjectState, RpcError> {
        let reply = self
            .call(addr, Message::Fsync(Fsync { brick, key }), Bytes::new())
            .await?;
        Ok(expect!(reply, "Fsync", Synced)?.0)
    }

    /// The object's state, or `None` when the brick does not hold it.
    pub async fn stat(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        key: ObjectKey,
    ) -> Result<Option<ObjectState>, RpcError> {
        match self
            .call(addr, Message::Stat(Stat { brick, key }), Bytes::new())
            .await
        {
            Ok(reply) => Ok(Some(expect!(reply, "Stat", StatReply)?.0)),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One page of the brick's objects in key order after `after`.
    pub async fn list(
        &self,
        addr: SocketAddr,
        brick: BrickId,
        after: Option<ObjectKey>,
        limit: u32,
    ) -> Result<(Vec<ListedObject>, bool), RpcError> {
        let msg = Message::List(List {
            brick,
            after,
            limit,
        });
        let reply = self.call(addr, msg, Bytes::new()).await?;
        let body = expect!(reply, "List", ListReply)?.0;
        Ok((body.objects, body.more))
    }

    pub async fn statfs(&self, addr: SocketAddr, brick: BrickId) -> Result<StatfsReply, RpcError> {
        let reply = self
            .call(addr, Message::Statfs(Statfs { brick }), Bytes::new())
            .await?;
        Ok(expect!(reply, "Statfs", StatfsReply)?.0)
    }

    /// What the brick's bitrot scrubber has done.
    pub async fn scrub_status(
        &self,
        addr: SocketAddr,
        brick: BrickId,
    ) -> Result<brickfs_proto::msg::ScrubReport, RpcError> {
        let msg = Message::ScrubStatus(brickfs_proto::msg::ScrubStatus { brick });
        let reply = self.call(addr, msg, Bytes::new()).await?;
        Ok(expect!(reply, "ScrubStatus", ScrubReply)?.0)
    }
}
