//! POSIX byte-range locks and flock, as pure functions over one file's lock table.
//!
//! Rules (fcntl(2), flock(2)): locks belong to an owner `(session, lock owner)`. Two locks
//! conflict when their owners differ, their ranges overlap and at least one is a write lock.
//! Setting a lock replaces the owner's own locks in its range (splitting them), and merges with
//! the owner's adjacent or overlapping locks of the same kind; unlocking removes the range
//! from the owner's locks, splitting them. flock holds whole files: shared or exclusive, one
//! hold per owner, converted in place.

use brickfs_proto::meta::{HeldLock, LockKind, LockSpec, SessionId};
use serde::{Deserialize, Serialize};

/// The locks on one file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTable {
    pub posix: Vec<HeldLock>,
    pub flock: Vec<(SessionId, u64, LockKind)>,
}

fn overlaps(a: &LockSpec, start: u64, end: u64) -> bool {
    a.start < end && start < a.end
}

fn same_owner(h: &HeldLock, session: SessionId, owner: u64) -> bool {
    h.session == session && h.lock.owner == owner
}

impl LockTable {
    pub fn is_empty(&self) -> bool {
        self.posix.is_empty() && self.flock.is_empty()
    }

    /// The first lock of another owner that conflicts with `want`.
    pub fn conflict(&self, session: SessionId, want: &LockSpec) -> Option<&HeldLock> {
        if want.kind == LockKind::Unlock {
            return None;
        }
        self.posix.iter().find(|h| {
            !same_owner(h, session, want.owner)
                && overlaps(&h.lock, want.start, want.end)
                && (h.lock.kind == LockKind::Write || want.kind == LockKind::Write)
        })
    }

    /// Sets or clears a byte-range lock; `Err` carries the conflicting lock.
    pub fn set(&mut self, session: SessionId, want: LockSpec) -> Result<(), HeldLock> {
        if want.start >= want.end {
            return Ok(());
        }
        if let Some(c) = self.conflict(session, &want) {
            return Err(c.clone());
        }
        // Cut the range out of the owner's locks.
        let mut kept = Vec::with_capacity(self.posix.len() + 1);
        for h in self.posix.drain(..) {
            if !same_owner(&h, session, want.owner) || !overlaps(&h.lock, want.start, want.end) {
                kept.push(h);
                continue;
            }
            if h.lock.start < want.start {
                let mut left = h.clone();
                left.lock.end = want.start;
                kept.push(left);
            }
            if h.lock.end > want.end {
                let mut right = h;
                right.lock.start = want.end;
                kept.push(right);
            }
        }
        self.posix = kept;
        if want.kind == LockKind::Unlock {
            return Ok(());
        }
        // Merge with the owner's touching locks of the same kind.
        let mut merged = HeldLock {
            session,
            lock: want,
        };
        self.posix.retain(|h| {
            let touch = same_owner(h, session, merged.lock.owner)
                && h.lock.kind == merged.lock.kind
                && h.lock.start <= merged.lock.end
                && merged.lock.start <= h.lock.end;
            if touch {
                merged.lock.start = merged.lock.start.min(h.lock.start);
                merged.lock.end = merged.lock.end.max(h.lock.end);
            }
            !touch
        });
        self.posix.push(merged);
        self.posix
            .sort_by_key(|h| (h.lock.start, h.session, h.lock.owner));
        Ok(())
    }

    /// flock: take, convert or release the owner's whole-file hold; false on a conflict.
    pub fn flock(&mut self, session: SessionId, owner: u64, kind: LockKind) -> bool {
        if kind != LockKind::Unlock
            && self.flock.iter().any(|(s, o, k)| {
                (*s, *o) != (session, owner) && (*k == LockKind::Write || kind == LockKind::Write)
            })
        {
            return false;
        }
        self.flock.retain(|(s, o, _)| (*s, *o) != (session, owner));
        if kind != LockKind::Unlock {
            self.flock.push((session, owner, kind));
        }
        true
    }

    /// Drops every lock of one owner, or of a whole session (`owner = None`).
    pub fn release(&mut self, session: SessionId, owner: Option<u64>) {
        let hit = |s: SessionId, o: u64| s == session && owner.is_none_or(|w| w == o);
        self.posix.retain(|h| !hit(h.session, h.lock.owner));
        self.flock.retain(|(s, o, _)| !hit(*s, *o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const LEN: u64 = 48;

    /// The model: for every byte, what each owner holds there.
    type Model = Vec<BTreeMap<(u64, u64), LockKind>>;

    fn model_conflict(m: &Model, who: (u64, u64), want: &LockSpec) -> bool {
        want.kind != LockKind::Unlock
            && (want.start..want.end.min(LEN)).any(|b| {
                m[b as usize].iter().any(|(o, k)| {
                    *o != who && (*k == LockKind::Write || want.kind == LockKind::Write)
                })
            })
    }

    fn model_set(m: &mut Model, who: (u64, u64), want: &LockSpec) {
        for b in want.start..want.end.min(LEN) {
            if want.kind == LockKind::Unlock {
                m[b as usize].remove(&who);
            } else {
                m[b as usize].insert(who, want.kind);
            }
        }
    }

    fn table_view(t: &LockTable) -> Model {
        let mut m: Model = vec![BTreeMap::new(); LEN as usize];
        for h in &t.posix {
            for b in h.lock.start..h.lock.end.min(LEN) {
                let prev = m[b as usize].insert((h.session.0, h.lock.owner), h.lock.kind);
                assert!(prev.is_none(), "one owner holds two locks on byte {b}");
            }
        }
        m
    }

    fn spec() -> impl Strategy<Value = (u64, u64, LockSpec)> {
        (0u64..3, 0u64..2, 0u64..LEN, 1u64..20, 0u8..3).prop_map(|(s, o, start, len, k)| {
            let kind = [LockKind::Read, LockKind::Write, LockKind::Unlock][k as usize];
            (
                s,
                o,
                LockSpec {
                    owner: o,
                    pid: 1,
                    start,
                    end: (start + len).min(LEN),
                    kind,
                },
            )
        })
    }

    proptest! {
        /// Byte-range locks agree byte for byte with a per-byte model: the same conflicts, the
        /// same holdings after every set, unlock and release, and no owner ever holds two locks
        /// on one byte (locks are split and merged correctly).
        #[test]
        fn posix_locks_match_the_byte_model(ops in proptest::collection::vec(spec(), 1..60), release_at in 0usize..60) {
            let mut t = LockTable::default();
            let mut m: Model = vec![BTreeMap::new(); LEN as usize];
            for (i, (s, o, want)) in ops.into_iter().enumerate() {
                if i == release_at {
                    t.release(SessionId(s), None);
                    for b in m.iter_mut() { b.retain(|(ms, _), _| *ms != s); }
                }
                let expect_conflict = model_conflict(&m, (s, o), &want);
                let got = t.set(SessionId(s), want.clone());
                prop_assert_eq!(got.is_err(), expect_conflict);
                if let Err(c) = got {
                    prop_assert!(c.session != SessionId(s) || c.lock.owner != o);
                } else {
                    model_set(&mut m, (s, o), &want);
                }
                prop_assert_eq!(table_view(&t), m.clone());
            }
        }

        /// flock: many shared or one exclusive holder at a time; conversions and releases.
        #[test]
        fn flock_matches_the_model(ops in proptest::collection::vec((0u64..3, 0u8..3), 1..40)) {
            let mut t = LockTable::default();
            let mut m: BTreeMap<u64, LockKind> = BTreeMap::new();
            for (who, k) in ops {
                let kind = [LockKind::Read, LockKind::Write, LockKind::Unlock][k as usize];
                let conflict = kind != LockKind::Unlock
                    && m.iter().any(|(o, h)| *o != who && (*h == LockKind::Write || kind == LockKind::Write));
                prop_assert_eq!(!t.flock(SessionId(who), 0, kind), conflict);
                if !conflict {
                    if kind == LockKind::Unlock { m.remove(&who); } else { m.insert(who, kind); }
                }
                let view: BTreeMap<u64, LockKind> = t.flock.iter().map(|(s, _, k)| (s.0, *k)).collect();
                prop_assert_eq!(view, m.clone());
            }
        }
    }
}
