//! A replica set's primary ordering one mutation (a write or a truncate) of one object: it
//! applies the mutation to its own copy as the next version, forwards it to every other
//! in-sync member at exactly that version, sends its whole copy to members that refuse the
//! version, and acknowledges only when every member holds the version.

use crate::member::Rule;
use crate::{Held, Refusal};

/// What the driver must do next for a mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step<E> {
    /// Apply the mutation to the primary's own copy under `Rule::Next`, fenced at the set's
    /// epoch; answer with `Mutation::applied`.
    ApplyLocal(Rule),
    /// Send the mutation to other member `member` under `rule`; answer with `forwarded`.
    Forward { member: usize, rule: Rule },
    /// Send member `member` the primary's whole copy at `held`, replacing its own (it missed
    /// a version or holds another mutation's); answer with `replaced`.
    Replace { member: usize, held: Held },
    /// Answer the client: the version made, or why the mutation failed (its outcome is then
    /// unknown: some members may hold it).
    Reply(Result<Held, E>),
}

/// One mutation, from the primary's side. The driver runs the steps it returns, in any
/// order and concurrently, and feeds every result back exactly once.
#[derive(Debug)]
pub struct Mutation<E> {
    members: usize,
    made: Option<Held>,
    /// Per member: 0 waiting for its forward, 1 being repaired, 2 answered.
    state: Vec<u8>,
    pending: usize,
    failed: Option<E>,
    replied: bool,
}

impl<E: Clone> Mutation<E> {
    /// A mutation tagged `tag` (unique per primary and run, never 0) on a set whose other
    /// in-sync members number `members`.
    pub fn start(members: usize, tag: u64) -> (Self, Step<E>) {
        let m = Mutation {
            members,
            made: None,
            state: vec![0; members],
            pending: 0,
            failed: None,
            replied: false,
        };
        (m, Step::ApplyLocal(Rule::Next { tag }))
    }

    /// The primary's own copy: the version made and the tag of the version it replaced, or
    /// why it could not apply (nothing was changed anywhere).
    pub fn applied(&mut self, r: Result<(Held, u64), E>) -> Vec<Step<E>> {
        assert!(self.made.is_none() && !self.replied, "applied twice");
        let (made, parent) = match r {
            Ok(x) => x,
            Err(e) => return self.reply(Err(e)),
        };
        self.made = Some(made);
        self.pending = self.members;
        if self.members == 0 {
            return self.reply(Ok(made));
        }
        let rule = Rule::Exactly {
            version: made.0,
            tag: made.1,
            parent,
        };
        (0..self.members)
            .map(|member| Step::Forward { member, rule })
            .collect()
    }

    /// Member `member`'s answer to its forward. A second answer for the same member (a
    /// duplicated message, a timeout after the answer) is ignored.
    pub fn forwarded(&mut self, member: usize, r: Result<(), Refusal<E>>) -> Vec<Step<E>> {
        let made = self.made.expect("forwarded before applied");
        if self.state.get(member) != Some(&0) || self.replied {
            return Vec::new();
        }
        match r {
            Ok(()) => self.one_done(member),
            Err(Refusal::Gap) => {
                self.state[member] = 1;
                vec![Step::Replace { member, held: made }]
            }
            Err(Refusal::Failed(e) | Refusal::Unknown(e)) => {
                self.failed.get_or_insert(e);
                self.one_done(member)
            }
        }
    }

    /// Member `member`'s answer to the whole copy it was sent.
    pub fn replaced(&mut self, member: usize, r: Result<(), E>) -> Vec<Step<E>> {
        if self.state.get(member) != Some(&1) || self.replied {
            return Vec::new();
        }
        if let Err(e) = r {
            self.failed.get_or_insert(e);
        }
        self.one_done(member)
    }

    fn one_done(&mut self, member: usize) -> Vec<Step<E>> {
        assert!(self.pending > 0, "more answers than forwards");
        self.state[member] = 2;
        self.pending -= 1;
        if self.pending > 0 {
            return Vec::new();
        }
        let r = match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(self.made.expect("checked")),
        };
        self.reply(r)
    }

    fn reply(&mut self, r: Result<Held, E>) -> Vec<Step<E>> {
        assert!(!self.replied, "replied twice");
        self.replied = true;
        vec![Step::Reply(r)]
    }

    /// Whether the mutation has answered its client.
    pub fn done(&self) -> bool {
        self.replied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_only_when_every_member_holds_the_version() {
        let (mut m, first) = Mutation::<&str>::start(2, 9);
        assert_eq!(first, Step::ApplyLocal(Rule::Next { tag: 9 }));
        let fwd = m.applied(Ok(((4, 9), 3)));
        assert_eq!(fwd.len(), 2);
        assert_eq!(
            fwd[0],
            Step::Forward {
                member: 0,
                rule: Rule::Exactly {
                    version: 4,
                    tag: 9,
                    parent: 3
                }
            }
        );
        assert!(
            m.forwarded(1, Err(Refusal::Gap))
                == vec![Step::Replace {
                    member: 1,
                    held: (4, 9)
                }]
        );
        assert!(m.forwarded(0, Ok(())).is_empty());
        // A duplicate answer changes nothing.
        assert!(
            m.forwarded(0, Err(Refusal::Failed("late timeout")))
                .is_empty()
        );
        assert_eq!(m.replaced(1, Ok(())), vec![Step::Reply(Ok((4, 9)))]);
    }

    #[test]
    fn one_failed_member_fails_the_mutation() {
        let (mut m, _) = Mutation::start(2, 9);
        m.applied(Ok(((1, 9), 0)));
        assert!(m.forwarded(0, Err(Refusal::Failed("down"))).is_empty());
        assert_eq!(m.forwarded(1, Ok(())), vec![Step::Reply(Err("down"))]);
    }
}
