//! brickfs-meta: the metadata group — openraft on RocksDB holding the cluster map, volumes, the
//! namespace, sessions and locks.
//!
//! - [`types`]: the openraft type configuration and the log's command record.
//! - [`sm`]: the state machine's deterministic logic (namespace rules, sessions, exactly-once).
//! - [`kv`]: the key-value view that logic runs on.
//! - [`acl`]: POSIX ACLs in their xattr format and how they follow the mode.
//! - [`locks`]: POSIX byte-range locks and flock over one file's lock table.
//! - [`store`]: the Raft log and state machine in RocksDB column families.
//! - [`network`]: Raft RPCs over the brickfs protocol.
//! - [`node`]: one member: the Raft instance, its service for clients, its housekeeping.
//!
//! It must never read the wall clock inside the state machine (the leader stamps commands) and
//! never acknowledge a log entry before it is durable. Read `sm.rs` next.

pub mod acl;
pub mod kv;
pub mod locks;
pub mod network;
pub mod node;
pub mod sm;
pub mod store;
pub mod types;
