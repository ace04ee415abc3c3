//! brickfs-client: the one library everything that reads or writes files uses.
//!
//! Today it holds the typed brick client ([`brick`]): chunk operations on one brick of one
//! node over a pooled, multiplexed connection; and the metadata client ([`meta`]): leader
//! finding, redirects, retries with backoff and a deadline, exactly-once writes through a
//! session, linearizable reads; the volume data path ([`volume`]: replicate, stripe,
//! disperse, with set refresh and quorum); self-heal ([`heal`]); administration ([`admin`]).
//! It must never touch a disk itself.

pub mod admin;
pub mod brick;
pub mod heal;
pub mod meta;
pub mod rebalance;
pub mod volume;

pub use brick::{BrickClient, BrickError};
pub use meta::{MetaClient, MetaClientOptions, MetaError};
pub use volume::{FileHandle, VolumeClient, VolumeError, VolumeSpace};
