//! A model-checking random-operation tester in the spirit of fsx: one seed drives writes at
//! random offsets (past the end too, some larger than every write-behind buffer), reads,
//! truncates up and down, fallocate modes, mmap reads and writes, fsync, close and reopen,
//! rename-over and unlink while open, and hand-overs between two mounts of one volume (by
//! close-to-open, or with both descriptors open and a lock passed between them). Every read
//! and every size is checked against an in-memory model of the file. Mid-run it SIGKILLs the
//! mountd it is writing through, remounts, and checks that every fsynced byte survived (bytes
//! written after the last fsync may be old or new, never anything else; a write that was on
//! its way to a set when mountd died may still complete after that check, so such a byte may
//! read as either until it is written again).
//!
//! `BRICKFS_FSX_SEED` replays a run (the seed is printed first); `BRICKFS_FSX_SECS` bounds
//! it (default 40 s of operations); the volume type follows from the seed.

mod common;

use common::mount::Mount;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The largest file the run makes.
const FILE_MAX: usize = 24 << 20;

/// Which mount a descriptor is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// The run's state: the model of the inode the current descriptor reaches, the descriptors,
/// and what the name "f" holds if it no longer names that inode.
struct Run {
    rng: StdRng,
    seed: u64,
    mounts: [Mount; 2],
    sources: String,
    model: Vec<u8>,
    /// Open descriptors of the modelled inode, per mount.
    fds: [Option<File>; 2],
    current: Side,
    /// Whether the current descriptor holds the hand-over lock (both open at once).
    locked: bool,
    /// Whether "f" still names the modelled inode (false after rename-over or unlink).
    named: bool,
    /// The file "f" names when it is not the modelled inode (after a rename over it).
    name_model: Option<Vec<u8>>,
    /// Bytes a killed mountd wrote after its last fsync, not yet overwritten: a write that
    /// was on its way to a set when the process died may still complete after the crash
    /// check read the file (from a member it had not reached yet), so a read may return
    /// either the model's byte or this one.
    late: std::collections::BTreeMap<usize, u8>,
    log: Vec<String>,
}

fn idx(s: Side) -> usize {
    match s {
        Side::A => 0,
        Side::B => 1,
    }
}

impl Run {
    fn path(&self, s: Side, name: &str) -> PathBuf {
        self.mounts[idx(s)].path.join(name)
    }

    fn fd(&self) -> &File {
        self.fds[idx(self.current)].as_ref().expect("current open")
    }

    fn note(&mut self, what: String) {
        self.log.push(what);
    }

    fn fail(&self, what: &str) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(40).collect();
        panic!(
            "fsx seed {} failed after {} operations: {what}\nlast operations, newest first:\n{}\n\
             replay: BRICKFS_FSX_SEED={} cargo test --test fsx",
            self.seed,
            self.log.len(),
            tail.iter()
                .map(|s| format!("  {s}"))
                .collect::<Vec<_>>()
                .join("\n"),
            self.seed
        );
    }

    fn check(&self, what: &str, got: &[u8], off: usize) {
        let want_end = (off + got.len()).min(self.model.len());
        let want = &self.model[off.min(self.model.len())..want_end];
        if got.len() != want.len() {
            self.fail(&format!(
                "{what}: read {} bytes at {off}, the model has {}",
                got.len(),
                want.len()
            ));
        }
        if let Some(i) = got
            .iter()
            .zip(want)
            .enumerate()
            .position(|(i, (g, w))| g != w && self.late.get(&(off + i)) != Some(g))
        {
            self.fail(&format!(
                "{what}: byte {} differs: read {:#04x}, wrote {:#04x}",
                off + i,
                got[i],
                want[i]
            ));
        }
    }

    fn check_size(&self, what: &str) {
        let len = self.fd().metadata().unwrap().len() as usize;
        if len != self.model.len() {
            self.fail(&format!(
                "{what}: size {len}, the model {}",
                self.model.len()
            ));
        }
    }

    fn random_range(&mut self) -> (usize, usize) {
        let len = match self.rng.random_range(0..100) {
            0..=59 => self.rng.random_range(1..=64 << 10),
            60..=89 => self.rng.random_range(1..=1 << 20),
            _ => self.rng.random_range(1..=9 << 20),
        };
        let end_max = (self.model.len() + (1 << 20)).min(FILE_MAX);
        let off = self.rng.random_range(0..end_max.saturating_sub(len).max(1));
        (off, len.min(FILE_MAX - off))
    }

    /// A random write; its range.
    fn write(&mut self) -> (usize, usize) {
        let (off, len) = self.random_range();
        let data = pattern(self.rng.random(), off as u64, len);
        self.note(format!("write {off} {len} on {:?}", self.current));
        if let Err(e) = self.fd().write_all_at(&data, off as u64) {
            self.fail(&format!("write {off} {len}: {e}"));
        }
        if self.model.len() < off + len {
            self.model.resize(off + len, 0);
        }
        self.model[off..off + len].copy_from_slice(&data);
        self.settled(off, off + len);
        (off, len)
    }

    /// Bytes `from..to` were written again: no late write shows there any more.
    fn settled(&mut self, from: usize, to: usize) {
        let gone: Vec<usize> = self.late.range(from..to).map(|(i, _)| *i).collect();
        for i in gone {
            self.late.remove(&i);
        }
    }

    fn read(&mut self) {
        let (off, len) = self.random_range();
        self.note(format!("read {off} {len} on {:?}", self.current));
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.fd().read_at(&mut buf[got..], (off + got) as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => self.fail(&format!("read {off} {len}: {e}")),
            }
        }
        self.check("read", &buf[..got], off);
    }

    fn truncate(&mut self) {
        let len = match self.rng.random_range(0..3) {
            0 => self.rng.random_range(0..=self.model.len()),
            1 => 0,
            _ => self.rng.random_range(0..FILE_MAX),
        };
        self.note(format!("truncate {len} on {:?}", self.current));
        if let Err(e) = self.fd().set_len(len as u64) {
            self.fail(&format!("truncate {len}: {e}"));
        }
        self.model.resize(len, 0);
        self.settled(len, usize::MAX);
        self.check_size("after truncate");
    }

    fn fallocate(&mut self) {
        use nix::fcntl::FallocateFlags as F;
        let modes = [
            F::empty(),
            F::FALLOC_FL_KEEP_SIZE,
            F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
            F::FALLOC_FL_ZERO_RANGE,
            F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE,
        ];
        let mode = modes[self.rng.random_range(0..modes.len())];
        let (off, len) = self.random_range();
        self.note(format!(
            "fallocate {mode:?} {off} {len} on {:?}",
            self.current
        ));
        if let Err(e) = nix::fcntl::fallocate(self.fd(), mode, off as i64, len as i64) {
            self.fail(&format!("fallocate {mode:?} {off} {len}: {e}"));
        }
        let end = off + len;
        if !mode.contains(F::FALLOC_FL_KEEP_SIZE) && end > self.model.len() {
            self.model.resize(end, 0);
        }
        if mode.intersects(F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_ZERO_RANGE) {
            let stop = end.min(self.model.len());
            if off < stop {
                self.model[off..stop].fill(0);
            }
            self.settled(off, stop.max(off));
        }
        self.check_size("after fallocate");
    }

    /// Maps the file's current length, reads or writes a random range through the mapping,
    /// syncs and unmaps it.
    #[allow(unsafe_code)]
    fn mmap(&mut self) {
        use nix::sys::mman::{MapFlags, MsFlags, ProtFlags, mmap, msync, munmap};
        let len = self.model.len();
        if len == 0 {
            return;
        }
        let write = self.rng.random_bool(0.5);
        let off = self.rng.random_range(0..len);
        let n = self.rng.random_range(1..=(len - off).min(256 << 10));
        self.note(format!(
            "mmap {} {off} {n} on {:?}",
            if write { "write" } else { "read" },
            self.current
        ));
        let size = std::num::NonZeroUsize::new(len).expect("not empty");
        // SAFETY: a fresh shared mapping of the file's current length, used only inside this
        // function through the slice below, which stays within it, and unmapped before
        // returning; the file is not truncated while it is mapped.
        let bytes = unsafe {
            let ptr = mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                self.fd(),
                0,
            )
            .unwrap_or_else(|e| self.fail(&format!("mmap: {e}")));
            let slice = std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<u8>(), len);
            if write {
                let data = pattern(self.rng.random(), off as u64, n);
                slice[off..off + n].copy_from_slice(&data);
                self.model[off..off + n].copy_from_slice(&data);
                self.late.retain(|i, _| *i < off || *i >= off + n);
                msync(ptr, len, MsFlags::MS_SYNC)
                    .unwrap_or_else(|e| self.fail(&format!("msync: {e}")));
            }
            let got = slice[off..off + n].to_vec();
            munmap(ptr, len).unwrap_or_else(|e| self.fail(&format!("munmap: {e}")));
            got
        };
        self.check("mmap read", &bytes, off);
    }

    fn fsync(&mut self) {
        self.note(format!("fsync on {:?}", self.current));
        if let Err(e) = self.fd().sync_all() {
            self.fail(&format!("fsync: {e}"));
        }
    }

    fn open(&self, s: Side) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(s, "f"))
            .unwrap_or_else(|e| self.fail(&format!("open on {s:?}: {e}")))
    }

    fn lock(&self, f: &File, typ: i32) {
        if let Err(e) = nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETLKW(&lock_range(typ, 0, 0)))
        {
            self.fail(&format!("lock {typ}: {e}"));
        }
    }

    /// Makes "f" name the modelled inode again when it does not (a new file with the
    /// model's bytes, written through the other mount): the run goes on with that file.
    fn rename_back(&mut self) {
        if self.named {
            return;
        }
        let s = self.current.other();
        let tmp = self.path(s, "f.back");
        std::fs::write(&tmp, &self.model).unwrap_or_else(|e| self.fail(&format!("{e}")));
        std::fs::rename(&tmp, self.path(s, "f")).unwrap_or_else(|e| self.fail(&format!("{e}")));
        self.named = true;
        self.name_model = None;
        self.note(format!("rename back on {s:?}"));
    }

    /// Moves to the other mount: with both descriptors open, by passing a lock; otherwise by
    /// closing here and opening there (close-to-open).
    fn switch(&mut self) {
        let next = self.current.other();
        if self.fds[idx(next)].is_some() {
            self.note(format!("hand over by lock to {next:?}"));
            if self.locked {
                self.lock(self.fd(), nix::libc::F_UNLCK);
            }
            let f = self.fds[idx(next)].take().expect("open");
            self.lock(&f, nix::libc::F_WRLCK);
            self.fds[idx(next)] = Some(f);
            self.locked = true;
        } else {
            self.note(format!("close, open on {next:?}"));
            if self.locked {
                self.lock(self.fd(), nix::libc::F_UNLCK);
                self.locked = false;
            }
            self.fds[idx(self.current)] = None;
            if let Some(m) = self.name_model.take() {
                // "f" names the file renamed over the closed one: the run goes on with it.
                self.model = m;
                self.late.clear();
                self.named = true;
            }
            self.rename_back();
            self.fds[idx(next)] = Some(self.open(next));
        }
        self.current = next;
        self.check_size("after the switch");
    }

    /// Opens a second descriptor on the other mount (both stay open: switches then pass a
    /// lock), or closes it.
    fn second(&mut self) {
        let other = self.current.other();
        if self.fds[idx(other)].is_some() {
            self.note(format!("close the descriptor on {other:?}"));
            self.fds[idx(other)] = None;
        } else if self.named {
            self.note(format!("open a descriptor on {other:?}"));
            if !self.locked {
                self.lock(self.fd(), nix::libc::F_WRLCK);
                self.locked = true;
            }
            self.fds[idx(other)] = Some(self.open(other));
        }
    }

    /// Renames a new file over "f" (or unlinks it) through the other mount while the
    /// modelled inode stays open here.
    fn replace(&mut self) {
        if !self.named || self.fds[idx(self.current.other())].is_some() {
            return;
        }
        let s = self.current.other();
        if self.rng.random_bool(0.5) {
            let n = self.rng.random_range(0..1 << 20);
            let data = pattern(self.rng.random(), 0, n).to_vec();
            let tmp = self.path(s, "f.new");
            std::fs::write(&tmp, &data).unwrap_or_else(|e| self.fail(&format!("{e}")));
            std::fs::rename(&tmp, self.path(s, "f"))
                .unwrap_or_else(|e| self.fail(&format!("rename over: {e}")));
            self.note(format!("rename a {n}-byte file over f on {s:?}"));
            self.name_model = Some(data);
        } else {
            std::fs::remove_file(self.path(s, "f"))
                .unwrap_or_else(|e| self.fail(&format!("unlink: {e}")));
            self.note(format!("unlink f on {s:?}"));
            self.name_model = None;
        }
        self.named = false;
    }

    /// fsync, a few writes after it, SIGKILL of the current mount's mountd, a new mountd:
    /// every fsynced byte must read back; bytes written after the fsync may be old or new.
    /// Whether it ran (it waits for a state with one descriptor, no lock, and "f" naming
    /// the modelled inode).
    async fn crash(&mut self) -> bool {
        if self.locked || self.fds[idx(self.current.other())].is_some() || !self.named {
            return false;
        }
        self.fsync();
        let synced = self.model.clone();
        // The writes after the fsync: each byte may hold what any of them wrote there.
        let mut after: Vec<(usize, Vec<u8>)> = Vec::new();
        for _ in 0..self.rng.random_range(0..4) {
            let (off, len) = self.write();
            after.push((off, self.model[off..off + len].to_vec()));
        }
        let s = self.current;
        self.note(format!("SIGKILL mountd of {s:?} and remount"));
        // The descriptor stays open through the kill: nothing is flushed or closed first.
        let open = self.fds[idx(s)].take();
        let path = self.mounts[idx(s)].path.clone();
        {
            let m = &mut self.mounts[idx(s)];
            if let Some(mut child) = m.child.take() {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            if mountd::is_mounted(&path) {
                nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH).unwrap();
            }
        }
        drop(open);
        // The old guard must not unmount its successor at the same path when it drops.
        self.mounts[idx(s)].path = PathBuf::new();
        self.mounts[idx(s)] = Mount::start(&self.sources, &path).await;
        let got = std::fs::read(self.path(s.other(), "f"))
            .unwrap_or_else(|e| self.fail(&format!("read after the crash: {e}")));
        let written = |i: usize, g: u8| {
            after
                .iter()
                .any(|(off, data)| i >= *off && i < off + data.len() && data[i - off] == g)
        };
        if got.len() < synced.len() || got.len() > self.model.len().max(synced.len()) {
            self.fail(&format!(
                "after the crash the size is {}; fsynced {}, written {}",
                got.len(),
                synced.len(),
                self.model.len()
            ));
        }
        for (i, &g) in got.iter().enumerate() {
            let old = synced.get(i).copied().unwrap_or(0);
            let new = self.model.get(i).copied().unwrap_or(0);
            let ok = g == old || written(i, g);
            if !ok {
                self.fail(&format!(
                    "after the crash byte {i} is {g:#04x}: fsynced {old:#04x}, written {new:#04x}"
                ));
            }
        }
        // What survived is the file now, but for writes still on their way.
        for (off, data) in &after {
            for (j, b) in data.iter().enumerate() {
                if got.get(off + j) != Some(b) {
                    self.late.insert(off + j, *b);
                }
            }
        }
        self.model = got;
        self.current = s.other();
        self.fds[idx(self.current)] = Some(self.open(self.current));
        true
    }
}

/// The kinds of volume a seed chooses from: (words before the bricks, bricks).
const KINDS: [(&str, usize); 4] = [
    ("", 2),
    ("replica 3", 3),
    ("disperse 3", 3),
    ("stripe 2", 2),
];

/// Random operations on one file through two mounts, each read and size checked against the
/// model, with a mountd SIGKILL in the middle (see the module's doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_match_the_model_across_two_mounts_and_a_crash() {
    let seed: u64 = std::env::var("BRICKFS_FSX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("BRICKFS_FSX_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut rng = StdRng::seed_from_u64(seed);
    let (kind, n) = KINDS[rng.random_range(0..KINDS.len())];
    eprintln!("fsx: seed {seed}, {secs} s, volume {kind:?} over {n} bricks");
    let dir = tempfile::tempdir().unwrap();
    // A small stripe unit, so that writes cross columns.
    let unit = (64 << 10).to_string();
    let (_node, source, _meta) =
        must_one_node_volume(dir.path(), kind, n, &[("stripe-unit", &unit)]).await;
    let a = Mount::start(&source, &dir.path().join("mnt-a")).await;
    let b = Mount::start(&source, &dir.path().join("mnt-b")).await;
    std::fs::write(a.path.join("f"), b"").unwrap();
    let mut run = Run {
        rng,
        seed,
        mounts: [a, b],
        sources: source,
        model: Vec::new(),
        fds: [None, None],
        current: Side::A,
        locked: false,
        named: true,
        name_model: None,
        late: std::collections::BTreeMap::new(),
        log: Vec::new(),
    };
    run.fds[0] = Some(run.open(Side::A));
    let start = Instant::now();
    let limit = Duration::from_secs(secs);
    let mut crashed = false;
    let mut ops = 0u64;
    while start.elapsed() < limit && ops < 100_000 {
        ops += 1;
        if !crashed && start.elapsed() > limit / 2 && run.crash().await {
            crashed = true;
            continue;
        }
        match run.rng.random_range(0..100) {
            0..=29 => {
                run.write();
            }
            30..=54 => run.read(),
            55..=61 => run.truncate(),
            62..=68 => run.fallocate(),
            69..=75 => run.mmap(),
            76..=81 => run.fsync(),
            82..=89 => run.switch(),
            90..=94 => run.second(),
            _ => run.replace(),
        }
    }
    // The end: everything on the current descriptor, then by name through both mounts.
    run.check_size("at the end");
    let len = run.model.len();
    let mut buf = vec![0u8; len];
    run.fd().read_exact_at(&mut buf, 0).unwrap();
    run.check("final read", &buf, 0);
    if run.locked {
        run.lock(run.fd(), nix::libc::F_UNLCK);
    }
    run.fds = [None, None];
    if let Some(m) = run.name_model.take() {
        run.model = m;
        run.named = true;
    }
    run.rename_back();
    for s in [Side::A, Side::B] {
        let got = std::fs::read(run.path(s, "f")).unwrap();
        run.check("final read by name", &got, 0);
        if got.len() != run.model.len() {
            run.fail("final size by name");
        }
    }
    eprintln!(
        "fsx: seed {seed}: {ops} operations, crash {}",
        if crashed { "done" } else { "skipped" }
    );
    assert!(crashed, "the run reached its crash step");
}
