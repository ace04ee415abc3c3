//! Placement math. A file's bytes are cut into stripe units of U bytes; unit u goes to column
//! `u mod S` at row `u div S`, so column c holds units c, c+S, c+2S, … back to back in its own
//! object. In a disperse set, a column object is cut into stripes of K fragments of F bytes:
//! byte b of the column lies in stripe `b div (K·F)`, data fragment `(b mod K·F) div F`.

/// The column holding file offset `offset`, and the offset inside that column's object.
pub fn column_of(offset: u64, unit_bytes: u64, stripe: u64) -> (u64, u64) {
    let unit = offset / unit_bytes;
    let column = unit % stripe;
    let row = unit / stripe;
    (column, row * unit_bytes + offset % unit_bytes)
}

/// The file offset of byte `column_offset` of column `column` (the inverse of [`column_of`]).
pub fn file_offset(column: u64, column_offset: u64, unit_bytes: u64, stripe: u64) -> u64 {
    let row = column_offset / unit_bytes;
    (row * stripe + column) * unit_bytes + column_offset % unit_bytes
}

/// The fragment size of disperse sets: a stripe holds K fragments of this many bytes.
pub const DISPERSE_FRAGMENT_BYTES: u32 = 64 << 10;

/// How many bytes column `column` holds of a file of `file_len` bytes.
pub fn column_len(file_len: u64, column: u64, unit_bytes: u64, stripe: u64) -> u64 {
    let row_bytes = unit_bytes * stripe;
    let rows = file_len / row_bytes;
    let rem = file_len % row_bytes;
    rows * unit_bytes + rem.saturating_sub(column * unit_bytes).min(unit_bytes)
}

/// One contiguous piece of a file range inside one column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub column: u64,
    pub column_offset: u64,
    /// Where the piece starts in the caller's buffer.
    pub buf_offset: u64,
    pub len: u64,
}

/// Cuts `[offset, offset+len)` into per-column pieces at stripe-unit boundaries, in file order.
pub fn split_range(offset: u64, len: u64, unit_bytes: u64, stripe: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let at = offset + done;
        let (column, column_offset) = column_of(at, unit_bytes, stripe);
        let n = (unit_bytes - at % unit_bytes).min(len - done);
        out.push(Piece {
            column,
            column_offset,
            buf_offset: done,
            len: n,
        });
        done += n;
    }
    out
}

/// Joins consecutive pieces that continue each other in the same column and in the buffer
/// (all of them when the stripe count is 1), up to `max_len` bytes per piece: fewer, larger
/// requests for unstriped sets.
pub fn merge_contiguous(pieces: Vec<Piece>, max_len: u64) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        if let Some(last) = out.last_mut()
            && last.column == p.column
            && last.column_offset + last.len == p.column_offset
            && last.buf_offset + last.len == p.buf_offset
            && last.len + p.len <= max_len
        {
            last.len += p.len;
            continue;
        }
        out.push(p);
    }
    out
}

/// Where byte `column_offset` of a column lives in a K+M disperse set with fragments of
/// `fragment_bytes`: (stripe index, data fragment index, offset inside the fragment).
pub fn fragment_of(column_offset: u64, data: u64, fragment_bytes: u64) -> (u64, u64, u64) {
    let stripe_bytes = data * fragment_bytes;
    let within = column_offset % stripe_bytes;
    (
        column_offset / stripe_bytes,
        within / fragment_bytes,
        within % fragment_bytes,
    )
}

/// Picks the stripe group of a new file: a hash of its inode, spread evenly over the groups
/// with non-zero weight (free space), proportionally to their weight.
pub fn pick_group(ino: u64, weights: &[u64]) -> Option<usize> {
    // Scale the weights down until their sum fits in 64 bits, keeping every non-zero weight
    // non-zero, so that the product below fits in 128 bits.
    let raw_total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    let shift = (128 - raw_total.leading_zeros()).saturating_sub(63);
    let scaled: Vec<u128> = weights
        .iter()
        .map(|w| match *w {
            0 => 0,
            w => (u128::from(w) >> shift).max(1),
        })
        .collect();
    let total: u128 = scaled.iter().sum();
    if total == 0 {
        return None;
    }
    // SplitMix64 finalizer: consecutive inode numbers land far apart.
    let mut x = ino.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let mut point = (u128::from(x) * total) >> 64;
    for (i, w) in scaled.iter().enumerate() {
        if point < *w {
            return Some(i);
        }
        point -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every file byte maps to exactly one (column, column offset), and back.
        #[test]
        fn column_mapping_round_trips(offset in 0u64..1 << 40, unit in 1u64..(1 << 20), stripe in 1u64..16) {
            let (c, co) = column_of(offset, unit, stripe);
            prop_assert!(c < stripe);
            prop_assert_eq!(file_offset(c, co, unit, stripe), offset);
        }

        /// Within one column the mapping is dense and in order: consecutive column bytes are
        /// consecutive file bytes inside a unit.
        #[test]
        fn columns_are_dense(unit in 1u64..64, stripe in 1u64..6) {
            let mut seen = std::collections::HashSet::new();
            for off in 0..unit * stripe * 5 {
                prop_assert!(seen.insert(column_of(off, unit, stripe)));
            }
            for c in 0..stripe {
                for co in 0..unit * 5 {
                    prop_assert!(seen.contains(&(c, co)));
                }
            }
        }

        /// The pieces of a range cover it exactly once, in order, each inside one unit.
        #[test]
        fn split_range_covers_exactly(offset in 0u64..1 << 30, len in 0u64..(1 << 22), unit in 1u64..(1 << 20), stripe in 1u64..9) {
            let pieces = split_range(offset, len, unit, stripe);
            let mut next = 0;
            for p in &pieces {
                prop_assert_eq!(p.buf_offset, next);
                prop_assert!(p.len > 0 && p.len <= unit);
                prop_assert_eq!(column_of(offset + p.buf_offset, unit, stripe), (p.column, p.column_offset));
                let (c_end, co_end) = column_of(offset + p.buf_offset + p.len - 1, unit, stripe);
                prop_assert_eq!((c_end, co_end), (p.column, p.column_offset + p.len - 1));
                next += p.len;
            }
            prop_assert_eq!(next, len);
        }

        /// Merged pieces still cover the range exactly and map each byte to its column.
        #[test]
        fn merged_pieces_cover_exactly(offset in 0u64..1 << 30, len in 0u64..(1 << 22), unit in 1u64..(1 << 18), stripe in 1u64..4, max in 1u64..(1 << 23)) {
            let merged = merge_contiguous(split_range(offset, len, unit, stripe), max.max(unit));
            let mut next = 0;
            for p in &merged {
                prop_assert_eq!(p.buf_offset, next);
                for b in [0, p.len - 1] {
                    prop_assert_eq!(column_of(offset + p.buf_offset + b, unit, stripe), (p.column, p.column_offset + b));
                }
                next += p.len;
            }
            prop_assert_eq!(next, len);
            if stripe == 1 && len > 0 && len <= max.max(unit) {
                prop_assert_eq!(merged.len(), 1);
            }
        }

        /// Column lengths add up to the file length, and each column ends right after its last
        /// file byte.
        #[test]
        fn column_lengths_match_the_mapping(len in 0u64..100_000, unit in 1u64..5000, stripe in 1u64..6) {
            let total: u64 = (0..stripe).map(|c| column_len(len, c, unit, stripe)).sum();
            prop_assert_eq!(total, len);
            if len > 0 {
                let (c, co) = column_of(len - 1, unit, stripe);
                prop_assert_eq!(column_len(len, c, unit, stripe), co + 1);
            }
        }

        /// Every column byte of a disperse set is in exactly one (stripe, fragment, offset).
        #[test]
        fn fragment_mapping_is_a_bijection(data in 1u64..12, frag in 1u64..64) {
            let mut seen = std::collections::HashSet::new();
            for b in 0..data * frag * 3 {
                let (s, f, o) = fragment_of(b, data, frag);
                prop_assert!(f < data && o < frag);
                prop_assert_eq!((s * data + f) * frag + o, b);
                prop_assert!(seen.insert((s, f, o)));
            }
        }

        /// Groups are picked only among those with room, and every pick is stable.
        #[test]
        fn pick_group_respects_weights(ino in any::<u64>(), weights in proptest::collection::vec(prop_oneof![0u64..1000, Just(u64::MAX), Just(0)], 1..8)) {
            let got = pick_group(ino, &weights);
            match got {
                None => prop_assert!(weights.iter().all(|w| *w == 0)),
                Some(i) => {
                    prop_assert!(weights[i] > 0);
                    prop_assert_eq!(pick_group(ino, &weights), got);
                }
            }
        }
    }

    #[test]
    fn pick_group_spreads_evenly() {
        let mut counts = [0u32; 4];
        for ino in 0..40_000 {
            counts[pick_group(ino, &[1, 1, 1, 1]).unwrap()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
