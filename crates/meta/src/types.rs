//! The openraft type configuration and the Raft log's application record.

use brickfs_proto::ErrorBody;
use brickfs_proto::meta::{MetaOp, MetaReply, SessionId};
use serde::{Deserialize, Serialize};

/// One command in the Raft log: a client's write, stamped by the leader with its clock so that
/// every member applies it the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// `SessionId(0)` for commands outside any session (opening one, leader housekeeping).
    pub session: SessionId,
    pub seq: u64,
    pub acked_below: u64,
    /// The leader's wall clock when it proposed the command, nanoseconds since the epoch.
    pub now_ns: i64,
    pub op: MetaOp,
}

/// What applying a command answered.
pub type CommandResult = Result<MetaReply, ErrorBody>;

openraft::declare_raft_types!(
    /// brickfs's Raft types: node ids are `NodeId.0`, nodes carry their protocol address.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
