//! brickfs-meta: the metadata group (openraft on RocksDB) holding the cluster map, volumes,
//! the namespace, sessions and locks.
//!
//! Not built yet: issue 3 fills this crate. Read `docs/architecture.md` § meta.
