//! brickfs-erasure: the Reed-Solomon codec behind a small trait, used by disperse volumes.
//!
//! Not built yet: issue 4 fills this crate. It must never do I/O or depend on another
//! workspace crate. Read `docs/architecture.md` § erasure.
