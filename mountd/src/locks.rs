//! Blocking lock waits (fcntl F_SETLKW, flock without LOCK_NB) and their interrupts.
//!
//! A wait never holds a FUSE worker: the request's reply moves into a task on the mount's
//! runtime, which asks the metadata group's leader to hold a `WaitLock` read until the
//! conflicting lock goes (the leader wakes it when applied commands change the file's locks,
//! or answers after `LOCK_WAIT_MAX_MS`), then tries `SetLock` again. Any number of waiters are
//! tasks, not threads. Only `SetLock` grants a lock; the wait is a hint.
//!
//! A signal to the waiting process makes the kernel send FUSE_INTERRUPT naming the request
//! (the vendored fuser passes it to `Filesystem::interrupt`): a waiter between attempts ends
//! with EINTR and never takes the lock afterwards. An attempt already on the wire finishes;
//! if it granted, the process gets the lock and 0 (the signal came after the grant). A killed
//! process is interrupted the same way (the kernel waits for the reply before the process
//! exits), so it leaves no waiter and takes no lock; its close then drops what it held.
//! An interrupt can arrive before its request reached `register` (another FUSE worker read
//! it first): those are remembered, a bounded number of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Interrupts remembered for requests not seen yet.
const EARLY_MAX: usize = 1024;

#[derive(Default)]
struct Inner {
    waiting: HashMap<u64, Arc<Notify>>,
    early: VecDeque<u64>,
}

/// The waiting requests of one mount, by FUSE request id.
#[derive(Default)]
pub struct Waiters {
    inner: Mutex<Inner>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers request `unique` as waiting: what fires when it is interrupted, or `None`
    /// when it already was.
    pub fn register(&self, unique: u64) -> Option<Arc<Notify>> {
        let mut g = self.lock();
        if let Some(at) = g.early.iter().position(|&u| u == unique) {
            g.early.remove(at);
            return None;
        }
        let n = Arc::new(Notify::new());
        g.waiting.insert(unique, n.clone());
        Some(n)
    }

    /// The kernel interrupts request `unique`.
    /// Interrupts every wait (EINTR to each).
    pub fn interrupt_all(&self) {
        for n in self.lock().waiting.values() {
            n.notify_one();
        }
    }

    pub fn interrupt(&self, unique: u64) {
        let mut g = self.lock();
        match g.waiting.get(&unique) {
            // A permit is kept if the waiter is between awaits: it sees it at its next one.
            Some(n) => n.notify_one(),
            None => {
                if g.early.len() >= EARLY_MAX {
                    g.early.pop_front();
                }
                g.early.push_back(unique);
            }
        }
    }

    /// Request `unique` was answered.
    pub fn done(&self, unique: u64) {
        self.lock().waiting.remove(&unique);
    }

    /// How many requests wait now.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An interrupt reaches its waiter whether it comes while the waiter awaits or between
    /// its awaits; one that comes before the request registered makes the registration fail.
    #[tokio::test]
    async fn interrupts_reach_waiters_in_any_order() {
        let w = Waiters::default();
        let n = w.register(5).expect("not interrupted");
        w.interrupt(5);
        // The permit was stored: this completes at once.
        n.notified().await;
        w.done(5);
        assert_eq!(w.count(), 0);

        w.interrupt(9);
        assert!(w.register(9).is_none(), "interrupted before it registered");
        assert!(w.register(9).is_some(), "an early interrupt is used once");
        w.done(9);

        for u in 0..(EARLY_MAX as u64 + 10) {
            w.interrupt(1000 + u);
        }
        assert!(
            w.register(1000).is_some(),
            "the oldest early interrupts are forgotten first"
        );
        assert!(w.register(1000 + EARLY_MAX as u64 + 9).is_none());
    }
}
