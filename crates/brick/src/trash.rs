//! Large files leave a brick a slice at a time. Unlinking a file of hundreds of MiB whose
//! pages are cached stalls every other sync on the same filesystem while the kernel drops
//! the pages and frees the extents (ext4 on this project's machines: six files of 170 MiB
//! unlinked at once held a 4 KiB write + fdatasync loop up to 604 ms; cut 8 MiB at a time with
//! 2 ms between cuts, 9.5 ms). So a removed object's file, when large, is renamed into the
//! brick's `trash` folder (one rename: the object is gone at once) and a thread of the brick
//! cuts it down and unlinks it in the background; whatever a stop left there is emptied after
//! the next open. Small files are unlinked at once.
//!
//! Objects written out of order have many extents, and one cut of them took 75-115 ms under
//! strace in brickd: so one cut runs at a time in the process (the bricks of a node often
//! share a disk), and after each the cutter rests as background work does (`pace`): barely
//! on an idle node, and while requests keep coming until they pause, for up to nine times
//! as long as the cut took.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The trash folder's name under the brick's root.
pub const TRASH_DIR: &str = "trash";

/// How much one cut takes off a file; files no larger are unlinked at once.
pub const CUT_BYTES: u64 = 4 << 20;

/// One cut at a time in the process, whichever brick it is for.
static CUTTING: Mutex<()> = Mutex::new(());

/// A brick's trash: where large removed files wait to be cut down.
pub struct Trash {
    dir: PathBuf,
    /// Wakes the emptier; dropping it (with the store) stops the emptier.
    wake: Mutex<mpsc::Sender<()>>,
    seq: AtomicU64,
    /// Bytes still in the trash (as far as this run has put there or found).
    pending: Arc<AtomicU64>,
    /// Set when the store closes: the emptier stops between two cuts (what is left goes
    /// after the next open).
    stop: Arc<Stop>,
    emptier: Option<std::thread::JoinHandle<()>>,
}

/// The emptier's stop signal, which its rests between cuts wait on.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    /// Rests after a cut that took `took` unless stopped first; false once stopped.
    fn rest(&self, took: Duration) -> bool {
        crate::pace::rest_blocking(took, &self.stopped, &self.cv)
    }

    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

impl Drop for Trash {
    /// Stops the emptier between two cuts and waits for it (one cut at most).
    fn drop(&mut self) {
        self.stop.set();
        let _ = self.wake.lock().unwrap_or_else(|p| p.into_inner()).send(());
        if let Some(t) = self.emptier.take() {
            let _ = t.join();
        }
    }
}

impl Trash {
    /// Opens (or makes) `root/trash` and starts its emptier, which first empties what an
    /// earlier run left.
    pub fn open(root: &Path, brick: String) -> std::io::Result<Trash> {
        let dir = root.join(TRASH_DIR);
        fs::create_dir_all(&dir)?;
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(Stop::default());
        let (d, p, st) = (dir.clone(), pending.clone(), stop.clone());
        let emptier = std::thread::Builder::new()
            .name(format!("trash {brick}"))
            .spawn(move || {
                loop {
                    if !empty(&d, &p, &st) {
                        return;
                    }
                    // Several discards while emptying make one more pass.
                    match rx.recv() {
                        Ok(()) => while rx.try_recv().is_ok() {},
                        Err(_) => return,
                    }
                    if st.is_set() {
                        return;
                    }
                }
            })?;
        Ok(Trash {
            dir,
            wake: Mutex::new(tx),
            seq: AtomicU64::new(0),
            pending,
            stop,
            emptier: Some(emptier),
        })
    }

    /// Removes the file at `path`: unlinked at once when small, else moved to the trash to
    /// be cut down. Absent is not an error.
    pub fn discard(&self, path: &Path) -> std::io::Result<()> {
        let len = match fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if len <= CUT_BYTES {
            return match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let to = self.dir.join(format!(
            "{nanos}-{}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::rename(path, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        self.pending.fetch_add(len, Ordering::Relaxed);
        let _ = self.wake.lock().unwrap_or_else(|p| p.into_inner()).send(());
        Ok(())
    }

    /// Bytes waiting in the trash.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// Cuts down and unlinks every file in `dir`; false when stopped first.
fn empty(dir: &Path, pending: &AtomicU64, stop: &Stop) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return !stop.is_set();
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(cut) = cut_down(&path, stop) else {
            return false;
        };
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "trash: cannot remove a file");
        }
        // Files found at open were never counted: do not go below zero.
        let _ = pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
            Some(p.saturating_sub(cut))
        });
    }
    !stop.is_set()
}

/// Cuts `path` down to nothing, `CUT_BYTES` at a time; returns the length it had, or None
/// when stopped before the end (the file stays for the next open).
fn cut_down(path: &Path, stop: &Stop) -> Option<u64> {
    let Ok(f) = OpenOptions::new().write(true).open(path) else {
        return Some(0);
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return Some(0);
    };
    let mut left = len;
    while left > CUT_BYTES {
        left -= CUT_BYTES;
        let took = {
            let _one = CUTTING.lock().unwrap_or_else(|p| p.into_inner());
            let start = Instant::now();
            if let Err(e) = f.set_len(left) {
                tracing::debug!(path = %path.display(), error = %e, "trash: cut failed; unlinking");
                break;
            }
            start.elapsed()
        };
        // Background work: the foreground goes first; a closing store ends the rest early.
        if !stop.rest(took) {
            return None;
        }
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `dir` is empty.
    fn emptied(dir: &Path) -> bool {
        for _ in 0..500 {
            if fs::read_dir(dir).unwrap().next().is_none() {
                return true;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
        false
    }

    /// A large file leaves its path at once and the trash soon after; a small one is
    /// unlinked at once; an absent one is fine; what a stop left in the trash goes after
    /// the next open.
    #[test]
    fn large_files_go_through_the_trash_and_leftovers_go_at_open() {
        let root = tempfile::tempdir().unwrap();
        let trash = Trash::open(root.path(), "t".into()).unwrap();
        let big = root.path().join("big");
        let f = fs::File::create(&big).unwrap();
        f.set_len(5 * CUT_BYTES + 17).unwrap();
        drop(f);
        let small = root.path().join("small");
        fs::write(&small, b"x").unwrap();
        trash.discard(&big).unwrap();
        trash.discard(&small).unwrap();
        trash.discard(&root.path().join("absent")).unwrap();
        assert!(!big.exists() && !small.exists());
        let dir = root.path().join(TRASH_DIR);
        assert!(emptied(&dir), "the trash was not emptied");
        assert_eq!(trash.pending_bytes(), 0);
        drop(trash);
        // A leftover, as a crash would leave it.
        let left = dir.join("left");
        let f = fs::File::create(&left).unwrap();
        f.set_len(3 * CUT_BYTES).unwrap();
        drop(f);
        let _trash = Trash::open(root.path(), "t".into()).unwrap();
        assert!(emptied(&dir), "a leftover stayed");
    }

    /// Closing the store stops a long cut-down between two cuts: the drop returns with the
    /// file still partly there, and the next open finishes it.
    #[test]
    fn closing_stops_the_cutter_and_the_next_open_finishes() {
        let root = tempfile::tempdir().unwrap();
        let trash = Trash::open(root.path(), "t".into()).unwrap();
        let huge = root.path().join("huge");
        // Sparse: hundreds of cuts at the least pause each take a second or more.
        let f = fs::File::create(&huge).unwrap();
        f.set_len(1000 * CUT_BYTES).unwrap();
        drop(f);
        trash.discard(&huge).unwrap();
        let dir = root.path().join(TRASH_DIR);
        drop(trash);
        let left: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "the drop waited for the whole cut-down");
        assert!(left[0].metadata().unwrap().len() > 0);
        let _trash = Trash::open(root.path(), "t".into()).unwrap();
        assert!(emptied(&dir), "the next open did not finish the cut-down");
    }
}
