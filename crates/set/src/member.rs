//! A member's rules for applying a mutation: the epoch fence and the version rule.

use crate::Held;

/// Which version a mutation gives an object on one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The next one, made by the mutation tagged `tag` (a brick used on its own, or a set's
    /// primary applying to its own copy).
    Next { tag: u64 },
    /// Exactly `version` made by mutation `tag`, on top of version `version - 1` made by
    /// mutation `parent` (what the primary held before it). Anything else the member holds
    /// is refused as a gap, so a member never applies a mutation to a copy that differs from
    /// the primary's: a retry (the member holds `(version, tag)` already) is acknowledged
    /// without applying it again.
    Exactly { version: u64, tag: u64, parent: u64 },
}

impl Rule {
    pub fn tag(self) -> u64 {
        match self {
            Rule::Next { tag } | Rule::Exactly { tag, .. } => tag,
        }
    }
}

/// What to do with a mutation (`check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it; the object then holds this.
    Apply(Held),
    /// The object holds it already (a retry): acknowledge without applying.
    Retry,
}

/// A refused version: what the member holds and the version the mutation would give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub have: Held,
    pub want: u64,
}

/// Checks a mutation's rule against what the member holds.
pub fn check(held: Held, rule: Rule) -> Result<Verdict, Gap> {
    match rule {
        Rule::Next { tag } => Ok(Verdict::Apply((held.0 + 1, tag))),
        Rule::Exactly { version, tag, .. } if held == (version, tag) && version > 0 => {
            Ok(Verdict::Retry)
        }
        Rule::Exactly {
            version,
            tag,
            parent,
        } if version == held.0 + 1 && held.1 == parent => Ok(Verdict::Apply((version, tag))),
        Rule::Exactly { version, .. } => Err(Gap {
            have: held,
            want: version,
        }),
    }
}

/// The epoch fence: a mutation under `epoch` when the member has seen `recorded` for the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Same epoch: go on.
    Pass,
    /// A newer epoch: record it durably before applying anything under it.
    Record(u64),
}

/// An epoch older than the member has seen: refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale {
    pub have: u64,
    pub got: u64,
}

pub fn fence(recorded: u64, epoch: u64) -> Result<Fence, Stale> {
    if epoch < recorded {
        Err(Stale {
            have: recorded,
            got: epoch,
        })
    } else if epoch > recorded {
        Ok(Fence::Record(epoch))
    } else {
        Ok(Fence::Pass)
    }
}

/// What to do with a rollback of mutation `from` back to `to` (a disperse write that reached
/// fewer than K members).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undo {
    /// The member holds `to` already (a retry, or it never applied `from`).
    Done,
    /// The member holds `from` and kept what it overwrote: put the old bytes back.
    Apply,
}

/// A member holding `held`, which kept what its last write overwrote as `kept` (that write's
/// version and the version before it), asked to go back from `from` to `to`. It can only go
/// back on its own data: a copy it got whole (a heal, a repair) kept nothing (`Gap`: it
/// needs the version before as a copy).
pub fn rollback(held: Held, kept: Option<(Held, Held)>, from: Held, to: Held) -> Result<Undo, Gap> {
    if held == to {
        Ok(Undo::Done)
    } else if held == from && kept == Some((from, to)) {
        Ok(Undo::Apply)
    } else {
        Err(Gap {
            have: held,
            want: from.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_applies_only_on_top_of_the_primarys_copy() {
        let next = |v, tag, parent| Rule::Exactly {
            version: v,
            tag,
            parent,
        };
        assert_eq!(check((0, 0), next(1, 7, 0)), Ok(Verdict::Apply((1, 7))));
        assert_eq!(check((1, 7), next(2, 8, 7)), Ok(Verdict::Apply((2, 8))));
        assert_eq!(check((2, 8), next(2, 8, 7)), Ok(Verdict::Retry));
        // The same version number from another mutation (a deposed primary's): a gap.
        assert!(check((1, 9), next(2, 8, 7)).is_err());
        assert!(check((2, 9), next(2, 8, 7)).is_err());
        assert!(check((0, 0), next(2, 8, 7)).is_err());
        assert_eq!(
            check((4, 1), Rule::Next { tag: 3 }),
            Ok(Verdict::Apply((5, 3)))
        );
    }

    #[test]
    fn epochs_only_grow() {
        assert_eq!(fence(3, 3), Ok(Fence::Pass));
        assert_eq!(fence(3, 5), Ok(Fence::Record(5)));
        assert_eq!(fence(3, 2), Err(Stale { have: 3, got: 2 }));
    }

    #[test]
    fn a_rollback_undoes_only_the_mutation_it_names() {
        let kept = Some(((3, 1), (2, 5)));
        assert_eq!(rollback((3, 1), kept, (3, 1), (2, 5)), Ok(Undo::Apply));
        assert_eq!(rollback((2, 5), None, (3, 1), (2, 5)), Ok(Undo::Done));
        assert!(rollback((3, 2), kept, (3, 1), (2, 5)).is_err());
        // A copy of 3 got whole kept nothing; a record of another write does not fit.
        assert!(rollback((3, 1), None, (3, 1), (2, 5)).is_err());
        assert!(rollback((3, 1), Some(((3, 1), (2, 4))), (3, 1), (2, 5)).is_err());
    }
}
