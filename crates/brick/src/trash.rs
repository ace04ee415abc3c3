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
//! share a disk), and after each the cutter rests three times as long as the cut took, which
//! leaves the disk to other work at least three quarters of the time.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// The trash folder's name under the brick's root.
pub const TRASH_DIR: &str = "trash";

/// How much one cut takes off a file; files no larger are unlinked at once.
pub const CUT_BYTES: u64 = 4 << 20;

/// The least pause between two cuts.
const CUT_PAUSE: Duration = Duration::from_millis(2);

/// How many times a cut's own duration the cutter rests after it.
const REST_FACTOR: u32 = 3;

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
}

impl Trash {
    /// Opens (or makes) `root/trash` and starts its emptier, which first empties what an
    /// earlier run left.
    pub fn open(root: &Path, brick: String) -> std::io::Result<Trash> {
        let dir = root.join(TRASH_DIR);
        fs::create_dir_all(&dir)?;
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(AtomicU64::new(0));
        let (d, p) = (dir.clone(), pending.clone());
        std::thread::Builder::new()
            .name(format!("trash {brick}"))
            .spawn(move || {
                loop {
                    empty(&d, &p);
                    // Several discards while emptying make one more pass.
                    match rx.recv() {
                        Ok(()) => while rx.try_recv().is_ok() {},
                        Err(_) => return,
                    }
                }
            })?;
        Ok(Trash {
            dir,
            wake: Mutex::new(tx),
            seq: AtomicU64::new(0),
            pending,
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

/// Cuts down and unlinks every file in `dir`.
fn empty(dir: &Path, pending: &AtomicU64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let cut = cut_down(&path);
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
}

/// Cuts `path` down to nothing, `CUT_BYTES` at a time; returns the length it had.
fn cut_down(path: &Path) -> u64 {
    let Ok(f) = OpenOptions::new().write(true).open(path) else {
        return 0;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return 0;
    };
    let mut left = len;
    while left > CUT_BYTES {
        left -= CUT_BYTES;
        let took = {
            let _one = CUTTING.lock().unwrap_or_else(|p| p.into_inner());
            let start = std::time::Instant::now();
            if let Err(e) = f.set_len(left) {
                tracing::debug!(path = %path.display(), error = %e, "trash: cut failed; unlinking");
                break;
            }
            start.elapsed()
        };
        std::thread::sleep(CUT_PAUSE.max(took * REST_FACTOR));
    }
    len
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
}
