//! brickfs-client: the one library everything that reads or writes files uses.
//!
//! Today it holds the typed brick client ([`brick`]): chunk operations on one brick of one
//! node over a pooled, multiplexed connection. The metadata client and the volume data path
//! (replicate, stripe, disperse) come with issues 3 and 4. It must never touch a disk itself.

pub mod brick;

pub use brick::{BrickClient, BrickError};
