//! Write-behind for one open file: the kernel's writes (1 MiB at most) are gathered into
//! contiguous runs and sent when a run fills `CHUNK_BYTES` (cut at a whole stripe), while the
//! writer goes on; at most `INFLIGHT` runs per file are on the wire. Runs that overlap are
//! never in flight together, so writes land in the order they were made.
//!
//! A write that fails in the background fails every later write, flush, fsync and close of
//! the file with its errno (as NFS does). Flush, fsync, close, reads, truncates and locks
//! drain first, so close-to-open, read-your-writes and lock hand-over see every byte. Files
//! opened O_SYNC or O_DSYNC write through.

use brickfs_client::{FileHandle, VolumeClient};
use bytes::BytesMut;
use fuser::Errno;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// How many bytes a run gathers before it is sent.
pub const CHUNK_BYTES: usize = 8 << 20;
/// Runs of one file on the wire at once.
pub const INFLIGHT: usize = 4;

/// A run sent and not yet answered: its byte range and the task sending it.
struct Sent {
    start: u64,
    end: u64,
    task: JoinHandle<Result<(), Errno>>,
}

#[derive(Default)]
struct Behind {
    /// Bytes accepted and not yet sent, contiguous from `.0`.
    run: Option<(u64, BytesMut)>,
    sent: VecDeque<Sent>,
    /// The first background failure; sticky.
    error: Option<Errno>,
}

/// An open file on this mount: the client library's handle and its write-behind.
pub struct Open {
    pub h: Arc<FileHandle>,
    behind: Mutex<Behind>,
    /// The end of the furthest byte accepted from the kernel, sent or not.
    accepted_end: AtomicU64,
    /// O_SYNC / O_DSYNC: every write is on the bricks before it is answered.
    write_through: bool,
    /// Runs are cut at multiples of this (a whole stripe of the file's layout).
    stripe_bytes: u64,
    /// Whether a read through this handle already considered updating atime (relatime).
    pub atime_checked: std::sync::atomic::AtomicBool,
}

impl Open {
    pub fn new(h: FileHandle, write_through: bool, stripe_bytes: u64) -> Open {
        Open {
            accepted_end: AtomicU64::new(h.size()),
            h: Arc::new(h),
            behind: Mutex::new(Behind::default()),
            write_through,
            stripe_bytes: stripe_bytes.max(1),
            atime_checked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether this handle has bytes behind or writes whose size and time are uncommitted.
    pub fn pending_or_dirty(&self) -> bool {
        Self::pending_locked(&self.lock(), &self.h)
    }

    fn pending_locked(b: &Behind, h: &FileHandle) -> bool {
        b.run.is_some() || !b.sent.is_empty() || h.dirty()
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Behind> {
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
        if let Some(e) = b.error {
            return Err(e);
        }
        let contiguous = matches!(&b.run, Some((start, run)) if start + run.len() as u64 == offset);
        if !contiguous {
            self.send(rt, vol, &mut b, None)?;
        }
        match &mut b.run {
            Some((_, run)) => run.extend_from_slice(data),
            None => b.run = Some((offset, BytesMut::from(data))),
        }
        self.accepted_end
            .fetch_max(offset + data.len() as u64, Ordering::SeqCst);
        // mtime is the time the write was accepted (it shows at once; the commit at flush,
        // fsync or close makes it the file's).
        self.h.modified(brickfs_client::volume::now_ns());
        if self.write_through {
            return self.drain_locked(rt, vol, &mut b);
        }
        if b.run.as_ref().is_some_and(|(_, r)| r.len() >= CHUNK_BYTES) {
            self.send(rt, vol, &mut b, Some(self.stripe_bytes))?;
        }
        Ok(())
    }

    /// Drains, then commits this handle's size and mtime (close-to-open, lock hand-over).
    pub fn publish(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
    ) -> Result<(), Errno> {
        self.drain(rt, vol)?;
        rt.block_on(vol.commit_size(&self.h))
            .map_err(|e| crate::errno_of(&e))
    }

    /// Sends what is waiting and waits for everything on the wire; the first failure, if any.
    pub fn drain(&self, rt: &tokio::runtime::Handle, vol: &Arc<VolumeClient>) -> Result<(), Errno> {
        let mut b = self.lock();
        self.drain_locked(rt, vol, &mut b)
    }

    fn drain_locked(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        b: &mut Behind,
    ) -> Result<(), Errno> {
        self.send(rt, vol, b, None)?;
        while let Some(s) = b.sent.pop_front() {
            Self::reap(rt, b, s);
        }
        b.error.map_or(Ok(()), Err)
    }

    /// Waits for one sent run and keeps its failure.
    fn reap(rt: &tokio::runtime::Handle, b: &mut Behind, s: Sent) {
        let r = rt.block_on(s.task).unwrap_or(Err(Errno::EIO)).err();
        if let Some(e) = r {
            tracing::warn!(start = s.start, end = s.end, errno = ?e, "a write-behind run failed");
            b.error.get_or_insert(e);
        }
    }

    /// Sends the waiting run (with `align`, only up to its last whole stripe, keeping the
    /// rest), after making room on the wire and waiting out any overlapping run.
    fn send(
        &self,
        rt: &tokio::runtime::Handle,
        vol: &Arc<VolumeClient>,
        b: &mut Behind,
        align: Option<u64>,
    ) -> Result<(), Errno> {
        let Some((start, mut run)) = b.run.take() else {
            return Ok(());
        };
        let end = start + run.len() as u64;
        let cut = match align {
            Some(a) if end / a * a > start => end / a * a,
            _ => end,
        };
        if cut < end {
            let rest = run.split_off((cut - start) as usize);
            b.run = Some((cut, rest));
        }
        let overlaps = b.sent.iter().any(|s| s.start < cut && start < s.end);
        while !b.sent.is_empty() && (overlaps || b.sent.len() >= INFLIGHT) {
            let s = b.sent.pop_front().expect("not empty");
            Self::reap(rt, b, s);
        }
        if let Some(e) = b.error {
            return Err(e);
        }
        let (vol, h, data) = (vol.clone(), self.h.clone(), run.freeze());
        let task = rt.spawn(async move {
            vol.write(&h, start, data)
                .await
                .map_err(|e| crate::errno_of(&e))
        });
        b.sent.push_back(Sent {
            start,
            end: cut,
            task,
        });
        Ok(())
    }
}
