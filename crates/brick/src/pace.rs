//! Background work yields to the foreground. A node's request handler marks each foreground
//! request (reads, writes, namespace operations) while it runs; background work (the GC's
//! removals, the trash's cuts) asks, after each unit of work, how long to rest: while no
//! foreground request ran in the last [`QUIET`] it rests only [`IDLE_REST`], so an idle node
//! collects at full speed; while foreground requests keep coming it rests until they pause for
//! [`QUIET`] but never longer than [`BUSY_FACTOR`] times the unit took, so the background still
//! gets a tenth of the time (a deleted file's space comes back even under constant load).
//!
//! The marks are per process: a brick daemon's cutter yields to the requests its own bricks
//! serve, and the GC (on the metadata leader's node) to the requests that node serves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long after the last foreground request the node counts as idle.
pub const QUIET: Duration = Duration::from_millis(20);

/// The rest between two units of background work on an idle node.
pub const IDLE_REST: Duration = Duration::from_millis(1);

/// Under foreground load, a unit that took `t` is followed by a rest of up to `BUSY_FACTOR × t`.
pub const BUSY_FACTOR: u32 = 9;

/// Foreground requests running now.
static RUNNING: AtomicU64 = AtomicU64::new(0);
/// When the last foreground request ended, in nanoseconds since `epoch()`.
static LAST_END: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// Marks a foreground request from its start to its drop.
#[must_use = "the request counts as running only while the mark lives"]
pub struct Foreground(());

/// Marks one foreground request as running (until the mark is dropped).
pub fn foreground() -> Foreground {
    // The epoch must precede every end stamp.
    let _ = epoch();
    RUNNING.fetch_add(1, Ordering::AcqRel);
    Foreground(())
}

impl Drop for Foreground {
    fn drop(&mut self) {
        LAST_END.fetch_max(nanos_since_epoch(Instant::now()), Ordering::AcqRel);
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long from `now` until the node has been quiet for [`QUIET`]; zero when it already has.
pub fn busy_for(now: Instant) -> Duration {
    if RUNNING.load(Ordering::Acquire) > 0 {
        return QUIET;
    }
    let last = LAST_END.load(Ordering::Acquire);
    if last == 0 {
        return Duration::ZERO;
    }
    let since = Duration::from_nanos(nanos_since_epoch(now).saturating_sub(last));
    QUIET.saturating_sub(since)
}

/// The plan of one rest after a unit of background work that took `took`: rest at least
/// [`IDLE_REST`]; then, while the foreground is busy, until it is quiet or the deadline.
#[derive(Debug, Clone, Copy)]
pub struct Rest {
    start: Instant,
    deadline: Instant,
}

impl Rest {
    /// Starts the rest after a unit that took `took`.
    pub fn after(took: Duration) -> Rest {
        let start = Instant::now();
        Rest {
            start,
            deadline: start + IDLE_REST.max(took * BUSY_FACTOR),
        }
    }

    /// How much longer to wait from `now`; zero when the rest is over.
    pub fn left(&self, now: Instant) -> Duration {
        let min_end = self.start + IDLE_REST;
        if now < min_end {
            return min_end - now;
        }
        if now >= self.deadline {
            return Duration::ZERO;
        }
        busy_for(now).min(self.deadline - now)
    }
}

/// Rests an async task after a unit of background work that took `took`.
pub async fn rest_async(took: Duration) {
    let rest = Rest::after(took);
    loop {
        let left = rest.left(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left).await;
    }
}

/// Rests a thread after a unit of background work that took `took`, waiting on `cv` (with
/// `stopped` under `lock`) so that a stop ends the rest at once; false once stopped.
pub fn rest_blocking(took: Duration, lock: &Mutex<bool>, cv: &Condvar) -> bool {
    let rest = Rest::after(took);
    let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if *stopped {
            return false;
        }
        let left = rest.left(Instant::now());
        if left.is_zero() {
            return true;
        }
        stopped = cv
            .wait_timeout(stopped, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The marks are process-wide: the tests that touch them run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Idle: a rest is the least one. A running request stretches it to the deadline (no
    /// longer); once requests stop, it ends a quiet period after the last one.
    #[test]
    fn rests_stretch_while_the_foreground_runs_and_never_past_the_deadline() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        let idle = Rest::after(Duration::from_millis(10));
        // No request has ended within QUIET of a point far ahead: idle there.
        assert_eq!(
            idle.left(t0 + IDLE_REST + QUIET * 10),
            Duration::ZERO,
            "an idle rest went past the least one"
        );

        let mark = foreground();
        let busy = Rest::after(Duration::from_millis(10));
        let start = busy.start;
        let mid = start + Duration::from_millis(50);
        assert_eq!(
            busy.left(mid),
            QUIET,
            "a running request did not stretch the rest"
        );
        let near_end = start + Duration::from_millis(85);
        assert_eq!(
            busy.left(near_end),
            Duration::from_millis(5),
            "the deadline was not kept"
        );
        assert_eq!(busy.left(start + Duration::from_millis(90)), Duration::ZERO);
        drop(mark);

        // Just after the last request ended: busy for (almost) a quiet period, then idle.
        let ended = Instant::now();
        let left = busy_for(ended);
        assert!(left > Duration::ZERO && left <= QUIET, "{left:?}");
        assert_eq!(busy_for(ended + QUIET), Duration::ZERO);
    }

    /// A stop ends a blocking rest at once even while the foreground keeps it busy.
    #[test]
    fn a_stop_ends_a_blocking_rest() {
        let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let _mark = foreground();
        let lock = Mutex::new(true);
        let cv = Condvar::new();
        assert!(!rest_blocking(Duration::from_secs(60), &lock, &cv));
    }
}
