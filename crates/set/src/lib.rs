//! The set protocol as a pure core: state plus an input gives outputs, with no clock, no
//! sockets and no disk. `brickfs-brick`'s service and store drive it (they run the disk
//! operations and the RPCs it asks for and feed their results back); the simulator in
//! [`sim`] drives the same code with simulated networks, disks, crashes and metadata epochs
//! and checks every read against what was acknowledged.
//!
//! Words as in docs/architecture.md: a *set* is the bricks (members) that hold copies or
//! fragments of the same objects; its *primary* orders every mutation of an object and gives
//! it a version (one more than the last) and a *tag* (which mutation made the version); the
//! metadata group's *epoch* of the set changes whenever its in-sync members or its primary
//! change, and a member *fences* it: it refuses mutations of an older epoch.

pub mod disperse;
pub mod heal;
pub mod lease;
pub mod member;
pub mod quorum;
pub mod replica;
pub mod sim;

/// What one copy of an object holds: `(version, tag)`. `(0, 0)` is no object at all; tag 0
/// is also the tag of objects written outside any set.
pub type Held = (u64, u64);

/// No object.
pub const ABSENT: Held = (0, 0);

/// Why a member did not apply a mutation, as its primary sees it: a refused version (the
/// member missed an earlier one or holds another mutation's, so it needs a whole copy), a
/// failure the member answered with (`Failed`: stale epoch, disk full — it did not apply),
/// or no answer (`Unknown`: timed out, connection lost — it may have applied, or still
/// will). Every one but `Gap` fails the mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal<E> {
    Gap,
    Failed(E),
    Unknown(E),
}
