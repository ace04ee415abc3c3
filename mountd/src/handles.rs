//! The mount's table of open files: FUSE file handle → `Open` (the client library's handle and
//! its write-behind), and the one rule that merges what several handles of one file know of
//! its size and mtime.

use crate::behind::Open;
use crate::journal::{Journal, Note};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Open files by FUSE file handle; directory handles draw their numbers here too.
pub struct Handles {
    map: Mutex<HashMap<u64, Arc<Open>>>,
    next: AtomicU64,
    /// Every id handed out lies below this, as noted to the keeper (a later worker starts
    /// here, so that no id the kernel still holds is handed out again).
    below: AtomicU64,
    journal: Arc<Journal>,
}

/// Handle ids noted to the keeper at a time.
const FH_BLOCK: u64 = 1 << 12;

impl Default for Handles {
    fn default() -> Self {
        Handles::new(Arc::new(Journal::new(None)))
    }
}

/// What the handles of one file add to its committed attributes.
#[derive(Debug, PartialEq, Eq)]
pub struct Merged {
    /// The size: the committed one, grown to the end of every pending write.
    pub size: u64,
    /// The time of the last write not committed yet, if any.
    pub modified: Option<i64>,
}

impl Handles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Open>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn new(journal: Arc<Journal>) -> Handles {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            below: AtomicU64::new(0),
            journal,
        }
    }

    /// Ids start at `first` (what an earlier worker noted as its bound).
    pub fn start_at(&self, first: u64) {
        self.next.fetch_max(first.max(1), Ordering::SeqCst);
    }

    /// A fresh handle number (files and directories).
    pub fn next_id(&self) -> u64 {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        if id >= self.below.load(Ordering::SeqCst) {
            // Noted before the bound moves: an id below a bound read here was noted.
            let bound = id + FH_BLOCK;
            self.journal.note(&Note::FhBelow(bound));
            self.below.fetch_max(bound, Ordering::SeqCst);
        }
        id
    }

    /// Takes a handle an earlier worker opened, under its id.
    pub fn insert_at(&self, fh: u64, open: Open) {
        self.lock().insert(fh, Arc::new(open));
    }

    /// Every open handle.
    pub fn all(&self) -> Vec<(u64, Arc<Open>)> {
        self.lock().iter().map(|(&fh, o)| (fh, o.clone())).collect()
    }

    /// The open handles of `ino`, with their ids.
    pub fn of_ino_fh(&self, ino: u64) -> Vec<(u64, Arc<Open>)> {
        self.lock()
            .iter()
            .filter(|(_, o)| o.h.attr.ino.0 == ino)
            .map(|(&fh, o)| (fh, o.clone()))
            .collect()
    }

    /// Adds an open file; its handle number.
    pub fn insert(&self, open: Open) -> u64 {
        let fh = self.next_id();
        self.lock().insert(fh, Arc::new(open));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Open>> {
        self.lock().get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Open>> {
        self.lock().remove(&fh)
    }

    /// The open handles of `ino`.
    pub fn of_ino(&self, ino: u64) -> Vec<Arc<Open>> {
        self.lock()
            .values()
            .filter(|o| o.h.attr.ino.0 == ino)
            .cloned()
            .collect()
    }

    /// Whether handle `fh` is open on `ino`.
    pub fn is_of(&self, fh: u64, ino: u64) -> bool {
        self.lock().get(&fh).is_some_and(|o| o.h.attr.ino.0 == ino)
    }

    /// Merges `committed` (the size the metadata group holds) with the handles of `ino`:
    /// handles with pending or uncommitted writes grow the size to their end and give the
    /// time of their last write; the others take the merged size (another mount may have cut
    /// or grown the file).
    pub fn merge(&self, ino: u64, committed: u64) -> Merged {
        let opens = self.of_ino(ino);
        let mut m = Merged {
            size: committed,
            modified: None,
        };
        for o in opens.iter().filter(|o| o.pending_or_dirty()) {
            m.size = m.size.max(o.size());
            if let Some(t) = o.h.modified_at() {
                m.modified = Some(m.modified.map_or(t, |have: i64| have.max(t)));
            }
        }
        for o in &opens {
            o.settle_size(m.size);
        }
        m
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use brickfs_client::FileHandle;
    use brickfs_proto::Ino;
    use brickfs_proto::meta::{Attr, FileKind};

    /// A regular file's attributes, for the tests of this crate.
    pub(crate) fn attr(ino: u64, size: u64) -> Attr {
        Attr {
            ino: Ino(ino),
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size_bytes: size,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            nlink: 1,
            rdev: 0,
            group: 0,
            unit_bytes: 1 << 20,
        }
    }

    #[test]
    fn pending_writes_grow_the_size_and_idle_handles_take_it() {
        let t = Handles::default();
        let writer = t.insert(Open::new(FileHandle::new(attr(5, 100)), false, 4096));
        let idle = t.insert(Open::new(FileHandle::new(attr(5, 100)), false, 4096));
        let other = t.insert(Open::new(FileHandle::new(attr(6, 7)), false, 4096));
        assert_ne!(writer, idle);
        // The writer wrote up to 900 at time 42, not committed yet.
        let w = t.get(writer).unwrap();
        w.h.set_size(900);
        w.h.modified(42);
        // Another mount cut the file to 10: the writer's end still counts.
        let m = t.merge(5, 10);
        assert_eq!(
            m,
            Merged {
                size: 900,
                modified: Some(42)
            }
        );
        assert_eq!(t.get(idle).unwrap().size(), 900, "the idle handle takes it");
        assert_eq!(t.get(other).unwrap().size(), 7, "other files are untouched");
        // With nothing pending anywhere, the committed size is the size, smaller or not.
        let i = t.get(idle).unwrap();
        assert_eq!(t.merge(6, 3).size, 3);
        assert_eq!(t.get(other).unwrap().size(), 3);
        drop(w);
        t.remove(writer);
        assert_eq!(
            t.merge(5, 10),
            Merged {
                size: 10,
                modified: None
            }
        );
        assert_eq!(i.size(), 10);
        assert!(t.is_of(idle, 5) && !t.is_of(idle, 6) && !t.is_of(writer, 5));
        assert_eq!(t.of_ino(5).len(), 1);
    }
}
