//! brickfs-layout: volume specs (`[stripe S] [replica R] [disperse N redundancy M] BRICK...`)
//! and the placement math (file → stripe group, offset → column, column → objects and
//! fragments), as pure functions.
//!
//! Not built yet: issue 4 fills this crate. It must never do I/O or depend on another
//! workspace crate. Read `docs/architecture.md` § layout.
