//! Which files this mount holds open in the metadata group (`MetaOp::OpenFile`,
//! `CreateOpen`, `CloseFiles`). While a session holds a file, the group keeps its inode and
//! objects when its last name goes (unlink, rename over it) on any mount: open descriptors
//! outlive names, as POSIX asks.
//!
//! The group is told once per file, not per descriptor: the first open here holds, the last
//! close here queues a release. Releases go out in batches (`take_closing`), so a create,
//! write and close costs no extra round trip, and a file opened again before its release went
//! out keeps the hold it has. What this module must never let happen: a release applied after
//! a later hold of the same file, which would leave an open file unprotected. Holds and
//! releases therefore pass `gate` (the flusher keeps it while a batch is on the wire).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct Inner {
    /// Descriptors open here per file.
    open: HashMap<u64, usize>,
    /// Files closed here whose hold is still to be released.
    closing: BTreeSet<u64>,
}

/// The holds of one mount.
#[derive(Default)]
pub struct Holds {
    inner: Mutex<Inner>,
    /// Held while a hold or a release batch is on the wire.
    pub gate: tokio::sync::Mutex<()>,
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new descriptor of `ino`; whether the metadata group must be told (the first
    /// descriptor here of a file not already held).
    pub fn open(&self, ino: u64) -> bool {
        self.open_counted(ino).0
    }

    /// As `open`, and whether no other descriptor of `ino` is open here.
    pub fn open_counted(&self, ino: u64) -> (bool, bool) {
        let mut g = self.lock();
        let n = g.open.entry(ino).or_insert(0);
        *n += 1;
        let first = *n == 1;
        (first && !g.closing.remove(&ino), first)
    }

    /// Undoes `open` after the metadata group refused the hold.
    pub fn open_failed(&self, ino: u64) {
        let mut g = self.lock();
        if let Some(n) = g.open.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                g.open.remove(&ino);
            }
        }
    }

    /// Counts a closed descriptor; the last one here queues the release.
    pub fn close(&self, ino: u64) {
        let mut g = self.lock();
        let Some(n) = g.open.get_mut(&ino) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            g.open.remove(&ino);
            g.closing.insert(ino);
        }
    }

    /// Whether `ino` has descriptors open here.
    #[cfg(test)]
    pub fn is_open(&self, ino: u64) -> bool {
        self.lock().open.contains_key(&ino)
    }

    /// Up to `max` releases to send (the caller holds `gate` until they are applied).
    /// A file held by the session with no descriptor here (an earlier worker's release that
    /// never went out): released in the next batch.
    pub fn release_later(&self, ino: u64) {
        let mut g = self.lock();
        if !g.open.contains_key(&ino) {
            g.closing.insert(ino);
        }
    }

    pub fn take_closing(&self, max: usize) -> Vec<u64> {
        let mut g = self.lock();
        let take: Vec<u64> = g.closing.iter().take(max).copied().collect();
        for ino in &take {
            g.closing.remove(ino);
        }
        take
    }

    /// Puts back releases that could not be sent, except for files opened again since.
    pub fn retry_closing(&self, inos: Vec<u64>) {
        let mut g = self.lock();
        for ino in inos {
            if !g.open.contains_key(&ino) {
                g.closing.insert(ino);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group is told on the first open and released only after the last close; a reopen
    /// before the release went out keeps the hold without telling the group again.
    #[test]
    fn holds_count_descriptors_and_batch_releases() {
        let h = Holds::default();
        assert!(h.open(7), "first open holds");
        assert!(!h.open(7), "second descriptor needs no hold");
        h.close(7);
        assert!(h.take_closing(10).is_empty(), "one descriptor still open");
        h.close(7);
        assert!(
            !h.open(7),
            "reopened before the release went out: still held"
        );
        h.close(7);
        assert_eq!(h.take_closing(10), vec![7]);
        assert!(h.take_closing(10).is_empty());
        assert!(h.open(7), "after the release a new open holds again");
        h.open_failed(7);
        assert!(!h.is_open(7));
    }

    /// A release that failed goes back in the queue, unless the file was opened again.
    #[test]
    fn failed_releases_retry_unless_reopened() {
        let h = Holds::default();
        for ino in [1, 2] {
            assert!(h.open(ino));
            h.close(ino);
        }
        let batch = h.take_closing(10);
        assert_eq!(batch, vec![1, 2]);
        assert!(h.open(2), "taken for release: a new open must hold again");
        h.retry_closing(batch);
        assert_eq!(h.take_closing(1), vec![1]);
        assert!(h.take_closing(10).is_empty());
    }
}
