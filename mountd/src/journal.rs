//! What a mount's serving process (the worker) tells its keeper, so that another worker can
//! answer for the mount's open files after this one is gone: the metadata session and the
//! bounds of its sequence numbers and file handle ids, each open file handle, the files held
//! open in the metadata group, the files with POSIX locks, and which handles have writes
//! acknowledged to applications that are not yet durable.
//!
//! Each note is one line of JSON on a unix socket to the keeper, written before what it
//! announces is relied on (a handle's first write past a durable point is noted before it is
//! acknowledged): a note written before the worker died is read by the keeper after.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Mutex;

/// A note from the worker to its keeper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Note {
    /// The metadata session and a bound above every sequence number it has sent.
    Session { id: u64, seq_below: u64 },
    /// Every file handle id handed out lies below this.
    FhBelow(u64),
    /// A file handle was opened (`flags` as open(2) gave them).
    Opened { fh: u64, ino: u64, flags: i32 },
    /// A file handle was released.
    Closed { fh: u64 },
    /// The handle has writes acknowledged that are not durable yet.
    Dirty { fh: u64 },
    /// Everything the handle wrote is durable and its size committed.
    Clean { fh: u64 },
    /// The mount's hold of these files in the metadata group was released.
    Released { inos: Vec<u64> },
    /// A POSIX lock was taken on the file (closes must release locks there).
    Locked { ino: u64 },
    /// The loss of a handle's writes was reported to the application.
    Reported { fh: u64 },
    /// The worker serves requests.
    Serving,
    /// The worker stopped reading requests, answered every one it took (lock waits aside,
    /// which the kernel sends again), made every handle's writes durable and is exiting:
    /// what the keeper holds now is exact.
    Quiesced,
}

/// A handle as the keeper carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedHandle {
    pub ino: u64,
    pub flags: i32,
    /// Writes acknowledged and not durable (as last noted).
    pub dirty: bool,
    /// A worker died while the handle was dirty: the next fsync or close reports EIO.
    pub lost: bool,
}

/// What a new worker needs to serve a mount's open files: built by the keeper from the notes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// The metadata session (id, sequence number to continue at).
    pub session: Option<(u64, u64)>,
    /// The next file handle id.
    pub fh_below: u64,
    pub handles: BTreeMap<u64, CarriedHandle>,
    /// Files the session holds open in the metadata group.
    pub held: BTreeSet<u64>,
    /// Files with POSIX locks taken through this mount.
    pub locked: BTreeSet<u64>,
}

impl Carried {
    /// Takes one note in.
    pub fn apply(&mut self, note: &Note) {
        match note {
            Note::Session { id, seq_below } => self.session = Some((*id, *seq_below)),
            Note::FhBelow(n) => self.fh_below = self.fh_below.max(*n),
            Note::Opened { fh, ino, flags } => {
                self.handles.insert(
                    *fh,
                    CarriedHandle {
                        ino: *ino,
                        flags: *flags,
                        ..CarriedHandle::default()
                    },
                );
                self.held.insert(*ino);
            }
            Note::Closed { fh } => {
                self.handles.remove(fh);
            }
            Note::Dirty { fh } => {
                if let Some(h) = self.handles.get_mut(fh) {
                    h.dirty = true;
                }
            }
            Note::Clean { fh } => {
                if let Some(h) = self.handles.get_mut(fh) {
                    h.dirty = false;
                }
            }
            Note::Reported { fh } => {
                if let Some(h) = self.handles.get_mut(fh) {
                    h.lost = false;
                }
            }
            Note::Released { inos } => {
                for ino in inos {
                    if !self.handles.values().any(|h| h.ino == *ino) {
                        self.held.remove(ino);
                    }
                }
            }
            Note::Locked { ino } => {
                self.locked.insert(*ino);
            }
            Note::Serving | Note::Quiesced => {}
        }
    }

    /// The worker died without quiescing: the writes of every dirty handle may be lost.
    pub fn worker_died(&mut self) {
        for h in self.handles.values_mut() {
            if h.dirty {
                h.dirty = false;
                h.lost = true;
            }
        }
    }

    /// Files held in the metadata group with no handle open here any more (their release was
    /// lost with a worker): the next worker releases them.
    pub fn unheld(&self) -> Vec<u64> {
        let open: BTreeSet<u64> = self.handles.values().map(|h| h.ino).collect();
        self.held.difference(&open).copied().collect()
    }
}

/// The worker's end of the notes.
pub struct Journal {
    out: Mutex<Option<std::os::unix::net::UnixStream>>,
}

impl Journal {
    pub fn new(out: Option<std::os::unix::net::UnixStream>) -> Journal {
        Journal {
            out: Mutex::new(out),
        }
    }

    /// Writes `note` (blocking until the socket takes it). A keeper that is gone is told
    /// nothing more; the mount serves on without crash survival.
    pub fn note(&self, note: &Note) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = out.as_mut() else { return };
        let mut line = serde_json::to_vec(note).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = s.write_all(&line) {
            tracing::warn!(error = %e, "the mount's keeper is gone: a crash of this process now loses the mount");
            *out = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_rebuild_what_a_new_worker_needs() {
        let mut c = Carried::default();
        for n in [
            Note::Session {
                id: 7,
                seq_below: 100,
            },
            Note::FhBelow(10),
            Note::Opened {
                fh: 1,
                ino: 50,
                flags: 2,
            },
            Note::Opened {
                fh: 2,
                ino: 51,
                flags: 0,
            },
            Note::Opened {
                fh: 3,
                ino: 52,
                flags: 1,
            },
            Note::Dirty { fh: 1 },
            Note::Dirty { fh: 3 },
            Note::Clean { fh: 3 },
            Note::Locked { ino: 50 },
            Note::Closed { fh: 2 },
            Note::FhBelow(5),
        ] {
            c.apply(&n);
        }
        assert_eq!(c.session, Some((7, 100)));
        assert_eq!(c.fh_below, 10, "the bound never goes down");
        assert_eq!(
            c.unheld(),
            vec![51],
            "closed here, its release not yet sent"
        );
        c.apply(&Note::Released { inos: vec![51, 50] });
        assert!(c.unheld().is_empty());
        assert!(
            c.held.contains(&50),
            "a release of a file still open here keeps it held"
        );
        c.worker_died();
        assert!(c.handles[&1].lost && !c.handles[&1].dirty);
        assert!(!c.handles[&3].lost, "clean at the crash: nothing lost");
        c.worker_died();
        assert!(c.handles[&1].lost, "lost stays lost until reported");
        c.apply(&Note::Reported { fh: 1 });
        assert!(!c.handles[&1].lost);
        assert_eq!(c.locked.iter().copied().collect::<Vec<_>>(), vec![50]);
    }
}
