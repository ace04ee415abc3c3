//! brickfs-client: the one library everything that reads or writes files uses.
//!
//! Today it holds the typed brick client ([`brick`]): chunk operations on one brick of one
//! node over a pooled, multiplexed connection; and the metadata client ([`meta`]): leader
//! finding, redirects, retries with backoff and a deadline, exactly-once writes through a
//! session, linearizable reads. The volume data path (replicate, stripe, disperse) comes with
//! issue 4. It must never touch a disk itself.

pub mod admin;
pub mod brick;
pub mod meta;
pub mod volume;

pub use brick::{BrickClient, BrickError};
pub use meta::{MetaClient, MetaClientOptions, MetaError};
pub use volume::{FileHandle, VolumeClient, VolumeError};
