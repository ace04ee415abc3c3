//! A dispersed set's decisions: the geometry bounds, the stripe plan of a write, settling a
//! mutation's fan-out, and reconciling fragments that disagree. Fragment *indices* are the
//! positions of the members in the set; a *taker* is an in-sync member (it takes fragments).

use crate::{Held, Refusal};

/// The most members a disperse geometry may name (the layout's `DISPERSE_MAX`).
pub const MEMBERS_MAX: usize = 64;
/// The largest fragment a geometry may name (volumes use 64 KiB).
pub const FRAGMENT_MAX_BYTES: u64 = 64 << 10;

/// Checks a geometry from the network: `k` data and `m` parity fragments of `f` bytes on
/// `members` members. Bounded so that no request makes a primary allocate more than a few
/// stripes of 4 MiB.
pub fn check_geometry(k: usize, m: usize, f: u64, members: usize) -> Result<(), String> {
    if members != k + m
        || k == 0
        || k + m > MEMBERS_MAX
        || f == 0
        || f > FRAGMENT_MAX_BYTES
        || !f.is_power_of_two()
    {
        return Err(format!(
            "bad disperse geometry {k}+{m} x {f} with {members} members"
        ));
    }
    Ok(())
}

/// How a write of `len` bytes at `offset` runs (all in stripes of `k × f` bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The first and last stripe the write touches.
    pub first: u64,
    pub last: u64,
    /// Stripes the write covers only in part, which are read back first (read-modify-write).
    pub partial: Vec<u64>,
    /// Stripes `first..kept_end` exist now and are read before the write, to be put back on
    /// the members that applied it should it reach fewer than K.
    pub kept_end: u64,
}

/// The plan of a write, on a column the primary holds at `have` with fragments of
/// `frag_len` bytes. `len > 0`.
pub fn plan_write(k: u64, f: u64, offset: u64, len: u64, have: Held, frag_len: u64) -> Plan {
    assert!(len > 0 && k > 0 && f > 0);
    let sb = k * f;
    let end = offset + len;
    let (first, last) = (offset / sb, (end - 1) / sb);
    let partial_stripe = |j: u64| !(offset <= j * sb && (j + 1) * sb <= end);
    let mut partial = Vec::new();
    // An object the primary has never written holds only zeros.
    if have != crate::ABSENT {
        if partial_stripe(first) {
            partial.push(first);
        }
        if last != first && partial_stripe(last) {
            partial.push(last);
        }
    }
    Plan {
        first,
        last,
        partial,
        kept_end: (last + 1).min(frag_len / f),
    }
}

/// What to do once every taker answered a mutation at version `wrote`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle<E> {
    /// Every taker applied it: acknowledge.
    Ack,
    /// Put the old fragments back on `roll_back` (the members that applied it, when fewer
    /// than K did and the old bytes were kept), then fail with `error`.
    Fail { roll_back: Vec<usize>, error: E },
    /// Some refused the version and fewer than K applied it: roll back as above, then
    /// reconcile the fragments and try again.
    Reconcile { roll_back: Vec<usize> },
    /// At least K applied it: rebuild the fragments of `to` (which refused) from `from`,
    /// then acknowledge, or fail with `error` when a member failed (a member left behind
    /// would count as in sync while holding nothing the set can decode).
    Repair {
        from: Vec<usize>,
        to: Vec<usize>,
        error: Option<E>,
    },
}

/// Settles a mutation's fan-out: `outcomes` are `(fragment index, answer)` per taker; `kept`
/// says whether the old fragments were kept (a write), so that a mutation that reached fewer
/// than K can be undone. It is undone only when fewer than K applied it *even counting the
/// members that did not answer* (they may have applied it): rolling back a write that K
/// hold, some silently, would leave neither version on K.
pub fn settle<E>(
    k: usize,
    outcomes: Vec<(usize, Result<(), Refusal<E>>)>,
    kept: bool,
) -> Settle<E> {
    let mut applied = Vec::new();
    let mut refused = Vec::new();
    let mut unknown = 0;
    let mut failed = None;
    for (i, r) in outcomes {
        match r {
            Ok(()) => applied.push(i),
            Err(Refusal::Gap) => refused.push(i),
            Err(Refusal::Failed(e)) => {
                failed.get_or_insert(e);
            }
            Err(Refusal::Unknown(e)) => {
                unknown += 1;
                failed.get_or_insert(e);
            }
        }
    }
    let torn = (failed.is_some() || !refused.is_empty()) && applied.len() + unknown < k;
    // Fewer than K hold the new version: neither it nor the old one would decode. The
    // members that applied it go back to the old one, which the others still hold.
    let roll_back = if torn && kept {
        applied.clone()
    } else {
        Vec::new()
    };
    if applied.len() >= k && !refused.is_empty() {
        return Settle::Repair {
            from: applied,
            to: refused,
            error: failed,
        };
    }
    if let Some(error) = failed {
        return Settle::Fail { roll_back, error };
    }
    if refused.is_empty() {
        return Settle::Ack;
    }
    Settle::Reconcile { roll_back }
}

/// What reconciling a column's fragments does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconcile {
    /// The newest version that at least K takers hold: what the object is. Every write ever
    /// acknowledged is in it (an acknowledged write reached every taker); what others hold
    /// instead was never acknowledged.
    pub held: Held,
    /// The fragment length at that version (the longest such copy).
    pub frag_len: u64,
    /// The takers that hold it: the sources of the rebuild.
    pub sources: Vec<usize>,
    /// The takers that answered with anything else: rebuilt from the sources (rolled back or
    /// forward).
    pub fix: Vec<usize>,
}

/// Reconciles from the takers' stats (`None`: no answer), indexed as the result's indices
/// are. `None` when no version is held by K takers: the column cannot be decoded.
pub fn reconcile(k: usize, stats: &[(usize, Option<(Held, u64)>)]) -> Option<Reconcile> {
    let mut counts: std::collections::BTreeMap<Held, (usize, u64)> = Default::default();
    for (h, len) in stats.iter().filter_map(|(_, s)| *s) {
        let e = counts.entry(h).or_default();
        e.0 += 1;
        e.1 = e.1.max(len);
    }
    let (&held, &(_, frag_len)) = counts.iter().rev().find(|(_, (n, _))| *n >= k)?;
    let sources = stats
        .iter()
        .filter(|(_, s)| s.is_some_and(|(h, _)| h == held))
        .map(|(i, _)| *i)
        .collect();
    let fix = stats
        .iter()
        .filter(|(_, s)| s.is_some_and(|(h, _)| h != held))
        .map(|(i, _)| *i)
        .collect();
    Some(Reconcile {
        held,
        frag_len,
        sources,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_torn_below_k_is_rolled_back() {
        let ok = |i| (i, Ok(()));
        // 4+2: four applied and one refused: the refuser is rebuilt from the four.
        let out = vec![ok(0), ok(1), ok(2), ok(3), (4, Err(Refusal::Gap)), ok(5)];
        assert_eq!(
            settle::<&str>(4, out, true),
            Settle::Repair {
                from: vec![0, 1, 2, 3, 5],
                to: vec![4],
                error: None
            }
        );
        // Four applied, one refused, one failed: the refuser is still rebuilt.
        let out = vec![
            ok(0),
            ok(1),
            ok(2),
            ok(3),
            (4, Err(Refusal::Gap)),
            (5, Err(Refusal::Failed("down"))),
        ];
        assert_eq!(
            settle(4, out, true),
            Settle::Repair {
                from: vec![0, 1, 2, 3],
                to: vec![4],
                error: Some("down")
            }
        );
        // Four applied, one failed: the write fails but stays (it decodes).
        let out = vec![
            ok(0),
            ok(1),
            ok(2),
            ok(3),
            (4, Err(Refusal::Failed("full"))),
        ];
        assert_eq!(
            settle(4, out, true),
            Settle::Fail {
                roll_back: vec![],
                error: "full"
            }
        );
        // Three applied: they go back to the old fragments.
        let out = vec![ok(0), ok(1), ok(2), (3, Err(Refusal::Failed("full")))];
        assert_eq!(
            settle(4, out.clone(), true),
            Settle::Fail {
                roll_back: vec![0, 1, 2],
                error: "full"
            }
        );
        assert_eq!(
            settle(4, out, false),
            Settle::Fail {
                roll_back: vec![],
                error: "full"
            }
        );
        let out = vec![ok(0), (1, Err(Refusal::Gap))];
        assert_eq!(
            settle::<&str>(4, out, true),
            Settle::Reconcile { roll_back: vec![0] }
        );
        // Two applied and two did not answer: they may hold it, so nothing is undone.
        let out = vec![
            ok(0),
            ok(1),
            (2, Err(Refusal::Unknown("timeout"))),
            (3, Err(Refusal::Unknown("timeout"))),
            (4, Err(Refusal::Failed("full"))),
        ];
        assert_eq!(
            settle(4, out, true),
            Settle::Fail {
                roll_back: vec![],
                error: "timeout"
            }
        );
    }

    #[test]
    fn reconcile_takes_the_newest_version_on_k() {
        let st = [
            (0, Some(((3, 1), 8))),
            (1, Some(((3, 1), 8))),
            (2, Some(((4, 2), 8))),
            (3, None),
        ];
        let r = reconcile(2, &st).expect("decodable");
        assert_eq!(r.held, (3, 1));
        assert_eq!(r.sources, vec![0, 1]);
        assert_eq!(r.fix, vec![2]);
        assert!(reconcile(3, &st).is_none());
    }

    #[test]
    fn the_plan_reads_back_partial_stripes_only_of_existing_columns() {
        // k=2, f=4: stripes of 8 bytes; a write of 10 at 3 touches stripes 0..=1.
        let p = plan_write(2, 4, 3, 10, (2, 1), 8);
        assert_eq!(
            (p.first, p.last, p.partial.clone(), p.kept_end),
            (0, 1, vec![0, 1], 2)
        );
        let fresh = plan_write(2, 4, 3, 10, crate::ABSENT, 0);
        assert!(fresh.partial.is_empty());
        assert_eq!(fresh.kept_end, 0);
        assert!(check_geometry(4, 2, 65536, 6).is_ok());
        assert!(check_geometry(4, 2, 65536 * 2, 6).is_err());
        assert!(check_geometry(60, 10, 4096, 70).is_err());
    }
}
