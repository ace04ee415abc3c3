//! Identifiers that cross crate boundaries. Every one is a newtype so that a brick id can never
//! be passed where an inode number is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty), $fmt:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

id_newtype!(
    /// A storage node (one brickd process).
    NodeId(u64), "n{:016x}"
);
id_newtype!(
    /// A brick: one directory on one node's disk, named by the id file in that directory.
    BrickId(u64), "b{:016x}"
);
id_newtype!(
    /// A volume.
    VolumeId(u64), "v{}"
);
id_newtype!(
    /// An inode number within a volume.
    Ino(u64), "{}"
);
id_newtype!(
    /// The version of one object on one brick; it steps by exactly one per mutation.
    ObjectVersion(u64), "{}"
);
id_newtype!(
    /// The configuration epoch of a set; it only grows.
    Epoch(u64), "e{}"
);
id_newtype!(
    /// A request id, unique among the requests in flight on one connection.
    RequestId(u64), "r{}"
);

impl BrickId {
    /// Parses the hexadecimal form written by `Display` (with or without the leading `b`).
    pub fn parse(text: &str) -> Option<BrickId> {
        let hex = text.strip_prefix('b').unwrap_or(text);
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(BrickId)
    }
}

/// The key of one object on a brick: a column of one file of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub volume: VolumeId,
    pub ino: Ino,
    pub column: u32,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.volume, self.ino, self.column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brick_id_display_parses_back() {
        for raw in [1u64, 0xdead_beef, u64::MAX] {
            let id = BrickId(raw);
            assert_eq!(BrickId::parse(&id.to_string()), Some(id));
        }
        assert_eq!(BrickId::parse("b"), None);
        assert_eq!(BrickId::parse("bzz"), None);
        assert_eq!(BrickId::parse("b00000000000000000"), None);
    }
}
