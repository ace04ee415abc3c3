//! brickfs-brick: the chunk store on local disk ([`store`]), the brick id file ([`ident`]) and
//! the brick service that answers chunk requests over the protocol ([`service`]).
//!
//! It owns the bytes on a brick and their checksums; it must never return a byte whose checksum
//! does not match, and never serve a folder without the right id file. It knows nothing of
//! volumes, sets or epochs beyond the keys it is given. Read `store.rs` next.

pub mod error;
pub mod ident;
pub mod pace;
pub mod service;
pub mod store;
pub mod trash;

pub use error::StoreError;
pub use service::BrickService;
pub use store::{BLOCK_BYTES, BrickStore, ObjectMeta, StoreOptions, VersionRule};
