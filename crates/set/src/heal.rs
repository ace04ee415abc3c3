//! Heal decisions: which objects a returning member needs, and the parts a copy travels in.

use crate::Held;

/// Whether the target's copy (`None`: it has none) differs from the primary's.
pub fn needs_copy(mine: (Held, u64), theirs: Option<(Held, u64)>) -> bool {
    theirs != Some(mine)
}

/// The parts `(offset, len)` of a copy of `total` bytes, each at most `part` bytes: an empty
/// copy is one empty part, so that the target still gets the object.
pub fn parts(total: u64, part: u64) -> Vec<(u64, u64)> {
    assert!(part > 0);
    if total == 0 {
        return vec![(0, 0)];
    }
    (0..total.div_ceil(part))
        .map(|i| (i * part, part.min(total - i * part)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_copy_once() {
        assert_eq!(parts(0, 8), vec![(0, 0)]);
        assert_eq!(parts(8, 8), vec![(0, 8)]);
        assert_eq!(parts(17, 8), vec![(0, 8), (8, 8), (16, 1)]);
        assert!(!needs_copy(((3, 1), 10), Some(((3, 1), 10))));
        assert!(needs_copy(((3, 1), 10), Some(((3, 2), 10))));
        assert!(needs_copy(((3, 1), 10), None));
    }
}
