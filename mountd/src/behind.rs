//! Write-behind for one open file: the kernel's writes (1 MiB at most) are gathered into
//! contiguous runs and sent when a run fills `CHUNK_BYTES` (cut at a whole stripe), while the
//! writer goes on; at most `INFLIGHT` runs per file are on the wire. Runs that overlap are
//! never in flight together, so writes land in the order they were made.
//!
//! A write that fails in the background fails every later write, flush, fsync and close of
//! the file with its errno (as NFS does); EDQUOT and ENOSPC are told once, by the next such
//! call, and then the file is usable again (a program that hit its quota can shrink the file
//! or write inside it). A run refused for the quota lands in pieces up to the limit: the
//! bytes that fit are kept. Flush, fsync, close, reads, truncates and locks
//! drain first, so close-to-open, read-your-writes and lock hand-over see every byte. Files
//! opened O_SYNC or O_DSYNC write through.

use brickfs_client::{FileHandle, VolumeClient};
use bytes::{Bytes, BytesMut};
use fuser::Errno;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// How many bytes a run gathers before it is sent.
pub const CHUNK_BYTES: usize = 8 << 20;
/// Runs of one file on the wire at once.
pub const INFLIGHT: usize = 4;

/// A run sent and not yet answered: its byte range and what is sending it.
struct Sent<T> {
    start: u64,
    end: u64,
    task: T,
}

/// The state machine of one file's write-behind, with no I/O: runs gathered, runs on the
/// wire (`T` sends one), the first failure. The caller (`Open`) sends and waits; this says
/// what to send and what to wait for first, and keeps the rules: runs that overlap are never
/// on the wire together, at most `INFLIGHT` are, a failure is sticky.
pub struct Runs<T> {
    /// Bytes accepted and not yet sent, contiguous from `.0`.
    run: Option<(u64, BytesMut)>,
    sent: VecDeque<Sent<T>>,
    error: Option<Errno>,
    /// Runs on the wire at once (`INFLIGHT`; 1 on a volume with quotas, so that a run refused
    /// for the quota is never followed by a later one that lands past a hole).
    pub max_inflight: usize,
}

impl<T> Default for Runs<T> {
    fn default() -> Self {
        Runs {
            run: None,
            sent: VecDeque::new(),
            error: None,
            max_inflight: INFLIGHT,
        }
    }
}

impl<T> Runs<T> {
    /// The first failure, if any.
    pub fn error(&self) -> Option<Errno> {
        self.error
    }

    /// Keeps a failure (the first one stays).
    pub fn fail(&mut self, e: Errno) {
        self.error.get_or_insert(e);
    }

    /// The failure to tell the caller, if any: EDQUOT and ENOSPC are told once (the bytes
    /// past the limit are gone, the file is fine), every other failure stays.
    pub fn report(&mut self) -> Option<Errno> {
        let e = self.error?;
        if space_error(e) {
            self.error = None;
        }
        Some(e)
    }

    /// Whether bytes are waiting or on the wire.
    pub fn pending(&self) -> bool {
        self.run.is_some() || !self.sent.is_empty()
    }

    /// Whether a write at `offset` extends the waiting run (false with none waiting).
    pub fn extends(&self, offset: u64) -> bool {
        matches!(&self.run, Some((start, run)) if start + run.len() as u64 == offset)
    }

    /// Adds a write: to the waiting run, which it must extend (`extends`), or as a new run
    /// when none waits (the caller sends a run it does not extend first).
    pub fn append(&mut self, offset: u64, data: &[u8]) {
        match &mut self.run {
            Some((start, run)) => {
                debug_assert_eq!(*start + run.len() as u64, offset);
                run.extend_from_slice(data);
            }
            None => self.run = Some((offset, BytesMut::from(data))),
        }
    }

    /// Whether the waiting run is big enough to send.
    pub fn full(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|(_, r)| r.len() >= CHUNK_BYTES)
    }

    /// Takes the waiting run to send: with `align`, only up to its last multiple of `align`
    /// (a whole stripe) when it holds one past its start, keeping the rest waiting. Its
    /// start and bytes.
    pub fn take_run(&mut self, align: Option<u64>) -> Option<(u64, Bytes)> {
        let (start, mut run) = self.run.take()?;
        let end = start + run.len() as u64;
        let cut = match align {
            Some(a) if end / a * a > start => end / a * a,
            _ => end,
        };
        if cut < end {
            let rest = run.split_off((cut - start) as usize);
            self.run = Some((cut, rest));
        }
        Some((start, run.freeze()))
    }

    /// What must be waited for before a run over `start..end` goes on the wire: the oldest
    /// sent run, while one overlaps it or `INFLIGHT` are out. The caller waits for it (and
    /// keeps its failure), then asks again.
    pub fn before_send(&mut self, start: u64, end: u64) -> Option<(u64, u64, T)> {
        let overlaps = self.sent.iter().any(|s| s.start < end && start < s.end);
        if overlaps || self.sent.len() >= self.max_inflight.max(1) {
            let s = self.sent.pop_front()?;
            return Some((s.start, s.end, s.task));
        }
        None
    }

    /// Records a run put on the wire.
    pub fn sent(&mut self, start: u64, end: u64, task: T) {
        self.sent.push_back(Sent { start, end, task });
    }

    /// The oldest run on the wire, to wait for (draining).
    pub fn oldest(&mut self) -> Option<(u64, u64, T)> {
        self.sent.pop_front().map(|s| (s.start, s.end, s.task))
    }
}

type Task = JoinHandle<Result<(), Errno>>;

/// Who is asking, when a drain or publish finds a failure: the handle's own call (EDQUOT and
/// ENOSPC are told to it once, then forgotten), another handle's fsync of the same file (told
/// too, Linux tells every descriptor, but kept for the owner), or a read, truncate or lock
/// that the quota must not block (only other failures are told).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tell {
    Owner,
    Other,
    Quiet,
}

fn space_error(e: Errno) -> bool {
    e == Errno::EDQUOT || e == Errno::ENOSPC
}

/// An open file on this mount: the client library's handle and its write-behind.
pub struct Open {
    pub h: Arc<FileHandle>,
    behind: Mutex<Runs<Task>>,
    /// The end of the furthest byte accepted from the kernel, sent or not.
    accepted_end: AtomicU64,
    /// O_SYNC / O_DSYNC: every write is on the bricks before it is answered.
    write_through: bool,
    /// Runs are cut at multiples of this (a whole stripe of the file's layout).
    stripe_bytes: u64,
    /// Whether a read through this handle already considered updating atime (relatime).
    pub atime_checked: std::sync::atomic::AtomicBool,
    /// Whether the keeper was told this handle has writes that are not durable (see
    /// `journal`); held while a write is taken in.
    pub noted_dirty: Mutex<bool>,
}

impl Open {
    pub fn new(h: FileHandle, write_through: bool, stripe_bytes: u64) -> Open {
        Open {
            accepted_end: AtomicU64::new(h.size()),
            h: Arc::new(h),
            behind: Mutex::new(Runs::default()),
            write_through,
            stripe_bytes: stripe_bytes.max(1),
            atime_checked: std::sync::atomic::AtomicBool::new(false),
            noted_dirty: Mutex::new(false),
        }
    }

    /// Whether this handle has bytes behind or writes whose size and time are uncommitted.
    pub fn pending_or_dirty(&self) -> bool {
        Self::pending_locked(&self.lock(), &self.h)
    }

    fn pending_locked(b: &Runs<Task>, h: &FileHandle) -> bool {
        b.pending() || h.dirty()
    }

    /// Takes `committed` as the file's size when this handle has nothing pending (no bytes
    /// behind, nothing uncommitted): another mount may have cut or grown the file. The caller
    /// passes the size the file has on this mount (committed, grown by other handles'
    /// pending writes). Whether it did.
    pub fn settle_size(&self, committed: u64) -> bool {
        let b = self.lock();
        if Self::pending_locked(&b, &self.h) {
            return false;
        }
        self.h.refresh_size(committed);
        self.accepted_end.store(committed, Ordering::SeqCst);
        true
    }

    /// The size as this handle knows it, bytes not yet sent included.
    pub fn size(&self) -> u64 {
        self.h.size().max(self.accepted_end.load(Ordering::SeqCst))
    }

    /// Records a truncate (made after draining).
    pub fn truncated(&self, len: u64) {
        self.h.set_size(len);
        self.accepted_end.store(len, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Runs<Task>> {
        self.behind.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts a write.
    pub fn write(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Errno> {
        let mut b = self.lock();
        if let Some(e) = b.report() {
            return Err(e);
        }
        if !b.extends(offset)
            && let Err(e) = self.send(rt, vol, &mut b, None)
        {
            b.report();
            return Err(e);
        }
        b.append(offset, data);
        self.accepted_end
            .fetch_max(offset + data.len() as u64, Ordering::SeqCst);
        // mtime is the time the write was accepted (it shows at once; the commit at flush,
        // fsync or close makes it the file's).
        self.h.modified(brickfs_client::volume::now_ns());
        if self.write_through {
            return self.drain_locked(rt, vol, &mut b, Tell::Owner);
        }
        if b.full()
            && let Err(e) = self.send(rt, vol, &mut b, Some(self.stripe_bytes))
        {
            b.report();
            return Err(e);
        }
        Ok(())
    }

    /// Drains, then commits this handle's size and mtime (close-to-open, lock hand-over).
    pub fn publish(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        tell: Tell,
    ) -> Result<(), Errno> {
        self.drain(rt, vol, tell)?;
        rt.block_on(vol.commit_size(&self.h))
            .map_err(|e| crate::errno_of(&e))
    }

    /// Sends what is waiting and waits for everything on the wire; the first failure, if any.
    pub fn drain(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        tell: Tell,
    ) -> Result<(), Errno> {
        let mut b = self.lock();
        self.drain_locked(rt, vol, &mut b, tell)
    }

    fn drain_locked(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        b: &mut Runs<Task>,
        tell: Tell,
    ) -> Result<(), Errno> {
        // A failure already kept stops the send; it is told below as `tell` says.
        let _ = self.send(rt, vol, b, None);
        while let Some(s) = b.oldest() {
            self.reap(rt, b, s);
        }
        let e = match tell {
            Tell::Owner => b.report(),
            Tell::Other => b.error(),
            Tell::Quiet => b.error().filter(|e| !space_error(*e)),
        };
        e.map_or(Ok(()), Err)
    }

    /// Waits for one sent run and keeps its failure.
    fn reap(
        &self,
        rt: &tokio::runtime::Handle,
        b: &mut Runs<Task>,
        (start, end, task): (u64, u64, Task),
    ) {
        let r = rt.block_on(task).unwrap_or(Err(Errno::EIO)).err();
        if let Some(e) = r {
            tracing::warn!(start, end, errno = ?e, "a write-behind run failed");
            if e == Errno::EDQUOT || e == Errno::ENOSPC {
                // What did not land is not the file's: its size is what did.
                self.accepted_end.store(self.h.size(), Ordering::SeqCst);
            }
            b.fail(e);
        }
    }

    /// Sends the waiting run (with `align`, only up to its last whole stripe, keeping the
    /// rest), after making room on the wire and waiting out any overlapping run.
    fn send(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        b: &mut Runs<Task>,
        align: Option<u64>,
    ) -> Result<(), Errno> {
        let Some((start, data)) = b.take_run(align) else {
            return Ok(());
        };
        let end = start + data.len() as u64;
        while let Some(s) = b.before_send(start, end) {
            self.reap(rt, b, s);
        }
        // After a failure nothing more goes, but for a run inside the file after a quota or
        // space failure: it grows nothing, so it cannot be refused for room.
        if let Some(e) = b.error()
            && !(space_error(e) && end <= self.h.size())
        {
            return Err(e);
        }
        b.max_inflight = if vol.quota_known() { 1 } else { INFLIGHT };
        let (vol, h) = (vol.clone(), self.h.clone());
        let task = rt.spawn(async move {
            match vol.write(&h, start, data.clone()).await {
                Ok(()) => Ok(()),
                Err(e) if crate::errno_of(&e) == Errno::EDQUOT => {
                    // Nothing of a run refused for the quota landed (the size is committed
                    // first): land it in pieces, in order, up to the first one refused.
                    // The longest prefix that fits, found by halving: what lies inside the
                    // file or under the limit lands, to the byte.
                    let (mut lo, mut hi) = (0usize, data.len());
                    while hi - lo > 1 {
                        let mid = lo + (hi - lo) / 2;
                        match vol.write(&h, start + lo as u64, data.slice(lo..mid)).await {
                            Ok(()) => lo = mid,
                            Err(e) if crate::errno_of(&e) == Errno::EDQUOT => hi = mid,
                            Err(e) => return Err(crate::errno_of(&e)),
                        }
                    }
                    if lo == data.len() {
                        Ok(())
                    } else {
                        Err(Errno::EDQUOT)
                    }
                }
                Err(e) => Err(crate::errno_of(&e)),
            }
        });
        b.sent(start, end, task);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn quota_and_space_failures_are_told_once_others_stay() {
        let mut r = Runs::<u32>::default();
        r.fail(Errno::EDQUOT);
        assert_eq!(r.report(), Some(Errno::EDQUOT));
        assert_eq!(r.report(), None);
        r.fail(Errno::ENOSPC);
        assert_eq!(r.report(), Some(Errno::ENOSPC));
        assert_eq!(r.report(), None);
        r.fail(Errno::EIO);
        assert_eq!(r.report(), Some(Errno::EIO));
        assert_eq!(r.report(), Some(Errno::EIO));
    }

    #[test]
    fn contiguous_writes_gather_into_one_run_cut_at_whole_stripes() {
        let mut r = Runs::<u32>::default();
        assert!(!r.extends(0) && !r.pending());
        r.append(100, &[1; 50]);
        assert!(r.extends(150) && !r.extends(149) && !r.extends(151));
        r.append(150, &[2; 60]);
        assert!(r.pending() && !r.full());
        // Cut at 192 (a multiple of 64 past the start): 100..192 goes, 192..210 waits.
        let (start, data) = r.take_run(Some(64)).unwrap();
        assert_eq!((start, data.len()), (100, 92));
        assert!(data[..50].iter().all(|b| *b == 1) && data[50..].iter().all(|b| *b == 2));
        assert!(r.extends(210));
        // No multiple of 1000 past its start: the whole run goes.
        let (start, data) = r.take_run(Some(1000)).unwrap();
        assert_eq!((start, data.len()), (192, 18));
        assert!(r.take_run(None).is_none() && !r.pending());
        r.append(0, &vec![0; CHUNK_BYTES]);
        assert!(r.full());
    }

    #[test]
    fn overlapping_runs_wait_for_each_other_and_at_most_inflight_are_out() {
        let mut r = Runs::<u32>::default();
        for i in 0..INFLIGHT as u64 {
            assert!(r.before_send(i * 10, i * 10 + 10).is_none());
            r.sent(i * 10, i * 10 + 10, i as u32);
        }
        // Full: the oldest is waited for first, whatever the range.
        assert_eq!(r.before_send(1000, 1010), Some((0, 10, 0)));
        assert!(r.before_send(1000, 1010).is_none());
        r.sent(1000, 1010, 9);
        // Overlapping the third run: the first and second (older) are waited out too,
        // in order, until nothing overlapping is out.
        assert_eq!(r.before_send(25, 26), Some((10, 20, 1)));
        assert_eq!(r.before_send(25, 26), Some((20, 30, 2)));
        assert!(r.before_send(25, 26).is_none());
        // Touching ends do not overlap.
        assert!(r.before_send(40, 1000).is_none());
        assert_eq!(r.oldest(), Some((30, 40, 3)));
        assert_eq!(r.oldest(), Some((1000, 1010, 9)));
        assert!(r.oldest().is_none() && !r.pending());
    }

    #[test]
    fn the_first_failure_sticks() {
        let mut r = Runs::<u32>::default();
        assert_eq!(r.error(), None);
        r.fail(Errno::ENOSPC);
        r.fail(Errno::EIO);
        assert_eq!(r.error(), Some(Errno::ENOSPC));
    }

    /// Random writes driven through the machine as `Open` drives it, with runs on the wire
    /// landing in any order the machine allows (any time before they are waited for): the
    /// file always ends as the writes, applied in order, made it, and no two runs on the
    /// wire ever overlap.
    #[test]
    fn writes_land_as_made_whatever_order_runs_on_the_wire_finish_in() {
        /// A run on the wire: its id, start and bytes (None once landed).
        type Wire = Vec<(usize, u64, u64, Option<Bytes>)>;
        fn land(file: &mut [u8], wire: &mut Wire, i: usize) {
            if let Some(data) = wire[i].3.take() {
                let at = wire[i].1 as usize;
                file[at..at + data.len()].copy_from_slice(&data);
            }
        }
        fn put(
            r: &mut Runs<usize>,
            wire: &mut Wire,
            file: &mut [u8],
            rng: &mut Rng,
            align: Option<u64>,
            seed: u64,
        ) {
            let Some((start, data)) = r.take_run(align) else {
                return;
            };
            let end = start + data.len() as u64;
            // Runs not waited for may land at any time: some do now.
            while !wire.is_empty() && rng.below(3) == 0 {
                let i = rng.below(wire.len() as u64) as usize;
                land(file, wire, i);
            }
            while let Some((_, _, id)) = r.before_send(start, end) {
                let i = wire.iter().position(|w| w.0 == id).expect("on the wire");
                land(file, wire, i);
                wire.remove(i);
            }
            for w in wire.iter() {
                assert!(
                    !(w.1 < end && start < w.2),
                    "seed {seed}: overlapping runs on the wire"
                );
            }
            let id = wire.iter().map(|w| w.0 + 1).max().unwrap_or(0) + 1000;
            r.sent(start, end, id);
            wire.push((id, start, end, Some(data)));
        }
        for seed in 1..300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut r = Runs::<usize>::default();
            let size = 4096usize;
            let (mut model, mut file) = (vec![0u8; size], vec![0u8; size]);
            let mut wire: Wire = Vec::new();
            let mut next = 0u64;
            for _ in 0..80 {
                let offset = if rng.below(2) == 0 {
                    next
                } else {
                    rng.below(size as u64 - 64)
                };
                let len = 1 + rng.below(63) as usize;
                if offset as usize + len > size {
                    next = 0;
                    continue;
                }
                next = offset + len as u64;
                let byte = (rng.next() % 255 + 1) as u8;
                let data = vec![byte; len];
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
                if !r.extends(offset) {
                    put(&mut r, &mut wire, &mut file, &mut rng, None, seed);
                }
                r.append(offset, &data);
                if rng.below(4) == 0 {
                    put(&mut r, &mut wire, &mut file, &mut rng, Some(16), seed);
                }
            }
            // Drain: send what waits, then everything lands, oldest first.
            put(&mut r, &mut wire, &mut file, &mut rng, None, seed);
            while let Some((_, _, id)) = r.oldest() {
                let i = wire.iter().position(|w| w.0 == id).expect("on the wire");
                land(&mut file, &mut wire, i);
                wire.remove(i);
            }
            assert!(wire.is_empty());
            assert!(
                file == model,
                "seed {seed}: the file differs from the writes made"
            );
        }
    }
}
