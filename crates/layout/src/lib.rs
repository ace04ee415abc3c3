//! brickfs-layout: volume specs (`[stripe S] [replica R] [disperse N redundancy M] BRICK...`,
//! in GlusterFS order) and the placement math — file → stripe group, offset → column, column
//! offset → disperse stripe and fragment — as pure functions.
//!
//! It must never do I/O or depend on another workspace crate: everything here is arithmetic on
//! numbers the callers pass in, property-tested to map every byte to exactly one place and back.
//! Read [`spec`] for the grammar and [`place`] for the math.

pub mod place;
pub mod spec;

pub use place::{
    DISPERSE_FRAGMENT_BYTES, Piece, column_len, column_of, file_offset, merge_contiguous,
    split_range,
};
pub use spec::{BrickAddr, Redundancy, SpecError, VolumeSpec, VolumeType, parse_size};
