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
    /// What the write overwrites is kept by each member (`MemberWrite.undo`), not by the
    /// primary: a member can go back on its own, without the primary's help.
    pub partial: Vec<u64>,
}

/// The plan of a write, on a column the primary holds at `have`. `len > 0`.
pub fn plan_write(k: u64, f: u64, offset: u64, len: u64, have: Held) -> Plan {
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
    }
}

/// What to do once every taker answered a mutation at version `wrote`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle<E> {
    /// Every taker applied it: acknowledge.
    Ack,
    /// Take `roll_back` (the members that applied it, when fewer than K did and they kept
    /// what it overwrote) back to the version before, then fail with `error`.
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

impl<E> Settle<E> {
    /// Whether every taker holds the same version afterwards (as far as the primary
    /// knows): else the object is reconciled before its next mutation, so that none lands
    /// on top of a version that fewer than K hold.
    pub fn settled(&self) -> bool {
        matches!(self, Settle::Ack | Settle::Repair { error: None, .. })
    }
}

/// Settles a mutation's fan-out: `outcomes` are `(fragment index, answer)` per taker; `kept`
/// says whether the members kept what it overwrote (a write), so that it can be undone.
///
/// A mutation that fails is undone on the members that applied it, so that a failed write
/// (a full disk) leaves the object as it was rather than a version some members lack, when
/// that leaves the version before on K: the members that answered no (they hold it: a
/// member that lacks it refuses with a gap first) and those that applied it count. It is
/// also undone when fewer than K applied it *even counting the members that did not
/// answer* (they may have applied it). Otherwise it stays: rolling back a write that K
/// hold, some silently, would leave neither version on K.
pub fn settle<E>(
    k: usize,
    outcomes: Vec<(usize, Result<(), Refusal<E>>)>,
    kept: bool,
) -> Settle<E> {
    let mut applied = Vec::new();
    let mut refused = Vec::new();
    let (mut unknown, mut said_no) = (0, 0);
    let mut failed = None;
    for (i, r) in outcomes {
        match r {
            Ok(()) => applied.push(i),
            Err(Refusal::Gap) => refused.push(i),
            Err(Refusal::Failed(e)) => {
                said_no += 1;
                failed.get_or_insert(e);
            }
            Err(Refusal::Unknown(e)) => {
                unknown += 1;
                failed.get_or_insert(e);
            }
        }
    }
    let torn = failed.is_some() || !refused.is_empty();
    let below_k = applied.len() + unknown < k;
    let before_on_k = failed.is_some() && applied.len() + said_no >= k;
    let roll_back = if torn && kept && (below_k || before_on_k) {
        applied.clone()
    } else {
        Vec::new()
    };
    if let Some(error) = failed {
        if roll_back.is_empty() && applied.len() >= k && !refused.is_empty() {
            return Settle::Repair {
                from: applied,
                to: refused,
                error: Some(error),
            };
        }
        return Settle::Fail { roll_back, error };
    }
    if refused.is_empty() {
        return Settle::Ack;
    }
    if applied.len() >= k {
        return Settle::Repair {
            from: applied,
            to: refused,
            error: None,
        };
    }
    Settle::Reconcile { roll_back }
}

/// One taker's copy of a column, as reconcile sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    pub held: Held,
    /// Its fragment length.
    pub frag_len: u64,
    /// What it can go back to on its own (it kept what its last write overwrote): the
    /// version before, and its fragment length then.
    pub undo: Option<(Held, u64)>,
    /// An in-sync member (it takes fragments). Others (a member being healed) help decode
    /// a version that a taker holds, but prove nothing about what was acknowledged: they
    /// may have missed anything.
    pub taker: bool,
}

/// What reconciling a column's fragments does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconcile {
    /// The newest version that at least K takers hold, or can go back to: what the object
    /// is. Every write ever acknowledged is in it (an acknowledged write reached every
    /// taker); what others hold instead was never acknowledged.
    pub held: Held,
    /// The fragment length at that version (the longest such copy).
    pub frag_len: u64,
    /// The takers that go back to it on their own first (`MemberRollback`).
    pub undo: Vec<usize>,
    /// The takers that hold it (after `undo`): the sources of the rebuild.
    pub sources: Vec<usize>,
    /// The takers that answered with anything else: rebuilt from the sources (rolled back or
    /// forward).
    pub fix: Vec<usize>,
}

/// Reconciles from the members' copies (`None`: no answer), indexed as the result's indices
/// are. The newest version held by K, one of them a taker, is the object: every taker's copy
/// holds every acknowledged write (that is what in sync means), so any version a taker holds
/// has them all. When none is, the members that hold a
/// write torn below K go back to the version before it, which they kept, if that gives K —
/// and only when the torn write cannot have been acknowledged: some taker that answered
/// holds a copy that cannot contain it (an acknowledged write is in every taker's copy), or
/// fewer than K hold it or anything newer even counting those that did not answer. `None` when neither gives
/// K: the column cannot be decoded (nothing is changed; a later attempt may find more).
pub fn reconcile(k: usize, stats: &[(usize, Option<Copy>)]) -> Option<Reconcile> {
    let answered: Vec<(usize, Copy)> = stats
        .iter()
        .filter_map(|(i, s)| s.map(|s| (*i, s)))
        .collect();
    let unknown = stats.len() - answered.len();
    let takers = || answered.iter().filter(|(_, c)| c.taker);
    let direct = |h: Held| answered.iter().filter(|(_, c)| c.held == h).count();
    let mut versions: Vec<Held> = takers().map(|(_, c)| c.held).collect();
    versions.sort();
    versions.dedup();
    let done = |held: Held, undo: Vec<usize>| {
        let sources: Vec<usize> = answered
            .iter()
            .filter(|(i, c)| c.held == held || undo.contains(i))
            .map(|(i, _)| *i)
            .collect();
        let frag_len = answered
            .iter()
            .filter_map(|(i, c)| {
                if c.held == held {
                    Some(c.frag_len)
                } else if undo.contains(i) {
                    c.undo.map(|(_, len)| len)
                } else {
                    None
                }
            })
            .max()
            .unwrap_or(0);
        let fix = answered
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| !sources.contains(i))
            .collect();
        Reconcile {
            held,
            frag_len,
            undo,
            sources,
            fix,
        }
    };
    if let Some(&held) = versions.iter().rev().find(|h| direct(**h) >= k) {
        return Some(done(held, Vec::new()));
    }
    // A write at `x` may be undone when it cannot have been acknowledged: a taker holds
    // something that is not `x` and cannot contain it (older, or another mutation's copy
    // of the same version), or too few hold `x` or something newer that may contain it.
    let undoable = |x: Held| {
        let without = takers().any(|(_, c)| c.held.0 < x.0 || (c.held.0 == x.0 && c.held != x));
        let with = answered
            .iter()
            .filter(|(_, c)| c.held == x || c.held.0 > x.0)
            .count();
        without || with + unknown < k
    };
    // A member being healed may go back freely: what was acknowledged is on the takers.
    let mut targets: Vec<Held> = answered
        .iter()
        .filter_map(|(_, c)| c.undo.map(|u| u.0))
        .collect();
    targets.sort();
    targets.dedup();
    for &to in targets.iter().rev() {
        let undo: Vec<usize> = answered
            .iter()
            .filter(|(_, c)| {
                c.held != to && c.undo.is_some_and(|u| u.0 == to) && (!c.taker || undoable(c.held))
            })
            .map(|(i, _)| *i)
            .collect();
        let a_taker = answered
            .iter()
            .any(|(i, c)| c.taker && (c.held == to || undo.contains(i)));
        if a_taker && direct(to) + undo.len() >= k {
            return Some(done(to, undo));
        }
    }
    None
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
        // Four applied, one refused, one failed: undone on the four (which, with the one
        // that failed, hold the version before on five).
        let out = vec![
            ok(0),
            ok(1),
            ok(2),
            ok(3),
            (4, Err(Refusal::Gap)),
            (5, Err(Refusal::Failed("full"))),
        ];
        assert_eq!(
            settle(4, out.clone(), true),
            Settle::Fail {
                roll_back: vec![0, 1, 2, 3],
                error: "full"
            }
        );
        // A truncate kept nothing: the refuser is rebuilt and the truncate fails.
        assert_eq!(
            settle(4, out, false),
            Settle::Repair {
                from: vec![0, 1, 2, 3],
                to: vec![4],
                error: Some("full")
            }
        );
        // Four applied and two did not answer: undone on the four, which then hold the
        // version before (the two may hold the failed write: reconcile undoes it there).
        let out = vec![
            ok(0),
            ok(1),
            ok(2),
            ok(3),
            (4, Err(Refusal::Unknown("timeout"))),
            (5, Err(Refusal::Unknown("timeout"))),
        ];
        assert_eq!(
            settle(4, out, true),
            Settle::Fail {
                roll_back: vec![0, 1, 2, 3],
                error: "timeout"
            }
        );
        // Three applied and three did not answer: it may be on all six, and undoing it on
        // three would leave the version before on three: it stays.
        let out = vec![
            ok(0),
            ok(1),
            ok(2),
            (3, Err(Refusal::Unknown("timeout"))),
            (4, Err(Refusal::Unknown("timeout"))),
            (5, Err(Refusal::Unknown("timeout"))),
        ];
        assert_eq!(
            settle(4, out, true),
            Settle::Fail {
                roll_back: vec![],
                error: "timeout"
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

    fn copy(held: Held, undo: Option<Held>) -> Option<Copy> {
        Some(Copy {
            held,
            frag_len: 8,
            undo: undo.map(|u| (u, 8)),
            taker: true,
        })
    }

    #[test]
    fn reconcile_takes_the_newest_version_on_k() {
        let st = [
            (0, copy((3, 1), None)),
            (1, copy((3, 1), None)),
            (2, copy((4, 2), None)),
            (3, None),
        ];
        let r = reconcile(2, &st).expect("decodable");
        assert_eq!(r.held, (3, 1));
        assert_eq!(r.sources, vec![0, 1]);
        assert_eq!(r.fix, vec![2]);
        assert!(r.undo.is_empty());
        assert!(reconcile(3, &st).is_none());
    }

    #[test]
    fn a_write_torn_below_k_goes_back_on_the_members_that_kept_the_version_before() {
        // 4+2: three hold the torn 52 (kept 51), two hold 51, one did not answer: 51 is
        // older, so 52 was never acknowledged; going back gives 51 on five.
        let st = [
            (0, copy((52, 9), Some((51, 7)))),
            (1, copy((51, 7), None)),
            (2, None),
            (3, copy((52, 9), Some((51, 7)))),
            (4, copy((51, 7), None)),
            (5, copy((52, 9), Some((51, 7)))),
        ];
        let r = reconcile(4, &st).expect("goes back");
        assert_eq!(r.held, (51, 7));
        assert_eq!(r.undo, vec![0, 3, 5]);
        assert_eq!(r.sources, vec![0, 1, 3, 4, 5]);
        assert!(r.fix.is_empty());
        // Three hold 52 and nobody answered older: 52 could be on the three that did not
        // answer too (K of them), so it is not undone.
        let st = [
            (0, copy((52, 9), Some((51, 7)))),
            (1, None),
            (2, None),
            (3, copy((52, 9), Some((51, 7)))),
            (4, None),
            (5, copy((52, 9), Some((51, 7)))),
        ];
        assert!(reconcile(4, &st).is_none());
        // A member that got 52 as a copy kept nothing to go back to.
        let st = [
            (0, copy((52, 9), Some((51, 7)))),
            (1, copy((51, 7), None)),
            (2, copy((52, 9), None)),
            (3, copy((52, 9), None)),
            (4, copy((51, 7), None)),
        ];
        assert!(reconcile(4, &st).is_none());
        // With the member being healed, which holds 52 too, 52 decodes: it is rebuilt on
        // the others.
        let mut st = st.to_vec();
        st.push((5, copy((52, 9), None).map(|c| Copy { taker: false, ..c })));
        let r = reconcile(4, &st).expect("decodes with the healed member");
        assert_eq!(r.held, (52, 9));
        assert_eq!(r.fix, vec![1, 4]);
    }

    #[test]
    fn the_plan_reads_back_partial_stripes_only_of_existing_columns() {
        // k=2, f=4: stripes of 8 bytes; a write of 10 at 3 touches stripes 0..=1.
        let p = plan_write(2, 4, 3, 10, (2, 1));
        assert_eq!((p.first, p.last, p.partial.clone()), (0, 1, vec![0, 1]));
        let fresh = plan_write(2, 4, 3, 10, crate::ABSENT);
        assert!(fresh.partial.is_empty());
        assert!(check_geometry(4, 2, 65536, 6).is_ok());
        assert!(check_geometry(4, 2, 65536 * 2, 6).is_err());
        assert!(check_geometry(60, 10, 4096, 70).is_err());
    }
}
