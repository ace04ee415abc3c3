//! The write lease of a primary: it orders mutations and serves reads only while the
//! metadata group acknowledged one of its heartbeats within the lease's length, counted from
//! when that heartbeat was *sent* (a reply that arrives late — a paused process, a slow
//! commit — must not stretch the lease past the moment the group may give its sets to
//! others). Times are milliseconds on the driver's monotonic clock.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    length_ms: u64,
    from_ms: Option<u64>,
}

impl Lease {
    pub fn new(length_ms: u64) -> Lease {
        Lease {
            length_ms,
            from_ms: None,
        }
    }

    /// The heartbeat sent at `sent_ms` was acknowledged.
    pub fn acknowledged(&mut self, sent_ms: u64) {
        self.from_ms = Some(self.from_ms.map_or(sent_ms, |t| t.max(sent_ms)));
    }

    pub fn held(&self, now_ms: u64) -> bool {
        self.from_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= self.length_ms)
    }

    pub fn length_ms(&self) -> u64 {
        self.length_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_reply_does_not_stretch_the_lease() {
        let mut l = Lease::new(3000);
        assert!(!l.held(0));
        l.acknowledged(1000);
        assert!(l.held(4000));
        assert!(!l.held(4001));
        // An older heartbeat's reply, arriving late, changes nothing.
        l.acknowledged(500);
        assert!(!l.held(4001));
    }
}
