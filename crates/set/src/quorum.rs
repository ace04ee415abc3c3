//! Whether a set's primary takes a mutation: the metadata group tells each node, with every
//! heartbeat answer, each of its sets' epoch, how many members are in sync at that epoch
//! and the volume's write quorum. A primary refuses a mutation at an epoch the group says
//! is below quorum, whatever the client believes (a client checks too, but a client's
//! view is its own). Of an epoch the primary has not heard of yet it cannot say: the
//! group has moved on and the members' epoch fences decide.

/// What the group last said of one set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    pub epoch: u64,
    pub in_sync: usize,
    pub quorum: usize,
}

/// The least in-sync members a set needs to take writes: `option` (the volume's `quorum`,
/// clamped to 1..=width) when set, else a majority of a replica set, K+1 of a disperse set
/// (at most its width), 1 for a set of one.
pub fn write_quorum(
    option: Option<usize>,
    replica: usize,
    data_fragments: usize,
    width: usize,
) -> usize {
    let width = width.max(1);
    if let Some(q) = option {
        return q.clamp(1, width);
    }
    if data_fragments > 0 {
        (data_fragments + 1).min(width)
    } else if replica > 1 {
        replica / 2 + 1
    } else {
        1
    }
}

/// `Err` (why) when the group said the mutation's epoch leaves the set below its quorum.
pub fn admit(known: Option<Known>, epoch: u64) -> Result<(), String> {
    match known {
        Some(k) if k.epoch == epoch && k.in_sync < k.quorum => Err(format!(
            "{} members in sync at epoch {epoch}, below the quorum of {}: read-only until they heal",
            k.in_sync, k.quorum
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_defaults_and_option() {
        assert_eq!(write_quorum(None, 3, 0, 3), 2);
        assert_eq!(write_quorum(None, 2, 0, 2), 2);
        assert_eq!(write_quorum(None, 0, 4, 6), 5);
        assert_eq!(write_quorum(None, 0, 0, 1), 1);
        assert_eq!(write_quorum(Some(9), 3, 0, 3), 3);
        assert_eq!(write_quorum(Some(0), 3, 0, 3), 1);
    }

    #[test]
    fn below_quorum_at_the_known_epoch_is_refused() {
        let k = Known {
            epoch: 7,
            in_sync: 1,
            quorum: 2,
        };
        assert!(admit(Some(k), 7).is_err());
        // A newer epoch than the primary knows: the group moved on; the fences decide.
        assert!(admit(Some(k), 8).is_ok());
        assert!(admit(Some(Known { in_sync: 2, ..k }), 7).is_ok());
        assert!(admit(None, 7).is_ok());
    }
}
