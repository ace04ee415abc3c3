//! Readahead for one open handle, as a state machine with no I/O: the caller asks `step`
//! what a read of `size` bytes at `offset` needs (serve from the window, wait for the fetch
//! already ahead, or fetch), does it, and reports back (`ahead_done`, `fetched`); then
//! `prefetch` says where the next window's fetch starts, if one should, and `set_ahead` keeps
//! its task. `T` is that task (the mount's aborts its fetch when dropped).
//!
//! A read is sequential when it starts at 0 or where the last one ended, or inside the
//! window or the fetch ahead of it: the kernel sends a sequential reader's requests several
//! at a time, and they do not always arrive in order (the window before the current one is
//! kept for latecomers). A sequential read that misses the window fetches `READAHEAD_BYTES`
//! at once and keeps the rest as the window; a read at the window's end takes the fetch
//! ahead as the new window. Other reads fetch what they ask and forget the window. Which
//! windows a write, a truncate or a lock invalidates is the caller's business (it drops the
//! whole machine).

use bytes::Bytes;

/// How much a sequential reader fetches ahead in one request (the kernel asks 128 KiB at a
/// time).
pub const READAHEAD_BYTES: u64 = 4 << 20;

/// How many requests past the last one's end a read may start and still continue the run.
const RUN_SLACK_REQUESTS: u64 = 4;

/// Bytes fetched at `start`, and the fetch of the bytes after them.
struct Window<T> {
    start: u64,
    bytes: Bytes,
    ahead: Option<(u64, T)>,
}

impl<T> Window<T> {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn covers(&self, offset: u64, size: u64) -> bool {
        offset >= self.start && offset + size <= self.end()
    }
}

/// What a read does next.
#[derive(Debug)]
pub enum Step<T> {
    /// Answer with these bytes.
    Serve(Bytes),
    /// Wait for the fetch ahead, which started at `.0`; then `ahead_done`, and `step` again.
    Await(u64, T),
    /// Fetch `want` bytes at the read's offset; then `fetched`.
    Fetch { want: u64 },
}

/// The readahead state of one handle.
pub struct Readahead<T> {
    window: Option<Window<T>>,
    /// Where the next sequential read starts (None: at 0, nothing read yet or forgotten).
    next: Option<u64>,
    /// The window before this one (start and bytes), for the run's requests that arrive
    /// after a later one moved the window on.
    behind: Option<(u64, Bytes)>,
}

impl<T> Default for Readahead<T> {
    fn default() -> Self {
        Readahead {
            window: None,
            next: None,
            behind: None,
        }
    }
}

impl<T> Readahead<T> {
    /// Whether a read of `size` bytes at `offset` continues the run: at 0, at most a few
    /// requests past where the last one ended (the kernel's requests of one run arrive a few
    /// at a time, not always in order), or inside the window or the fetch ahead of it.
    fn sequential(&self, offset: u64, size: u64) -> bool {
        // A read at 0 starts a run (a reader starting over) whatever came before.
        if offset == 0 {
            return true;
        }
        if let Some(next) = self.next
            && offset >= next
            && offset - next <= RUN_SLACK_REQUESTS * size
        {
            return true;
        }
        self.window.as_ref().is_some_and(|w| {
            let end = w
                .ahead
                .as_ref()
                .map_or(w.end(), |(at, _)| at + READAHEAD_BYTES);
            offset >= w.start && offset <= end
        })
    }

    /// Whether a read at `offset` lies behind the window (a request of the run that came
    /// late, or a reread): it is fetched alone and leaves the run as it is.
    fn behind_window(&self, offset: u64) -> bool {
        self.window.as_ref().is_some_and(|w| offset < w.start)
    }

    fn advance(&mut self, end: u64) {
        self.next = Some(self.next.map_or(end, |n| n.max(end)));
    }

    /// What a read of `size` bytes at `offset` needs.
    pub fn step(&mut self, offset: u64, size: u64) -> Step<T> {
        if let Some((start, bytes)) = &self.behind
            && offset >= *start
            && offset + size <= start + bytes.len() as u64
        {
            let at = (offset - start) as usize;
            return Step::Serve(bytes.slice(at..at + size as usize));
        }
        let sequential = self.sequential(offset, size);
        if let Some(w) = &mut self.window {
            if sequential
                && offset >= w.end()
                && let Some((at, task)) = w.ahead.take()
            {
                return Step::Await(at, task);
            }
            if w.covers(offset, size) {
                let at = (offset - w.start) as usize;
                let bytes = w.bytes.slice(at..at + size as usize);
                self.advance(offset + size);
                return Step::Serve(bytes);
            }
        }
        let want = if sequential {
            size.max(READAHEAD_BYTES)
        } else {
            size
        };
        Step::Fetch { want }
    }

    /// The fetch ahead that started at `at` ended, with its bytes if it succeeded: they are
    /// the window if the read at `offset` starts in them.
    pub fn ahead_done(&mut self, offset: u64, at: u64, got: Option<Bytes>) {
        let old = self.window.take();
        self.window = match got {
            Some(bytes) if offset >= at && offset < at + bytes.len() as u64 => Some(Window {
                start: at,
                bytes,
                ahead: None,
            }),
            _ => None,
        };
        self.behind = match (&self.window, old) {
            (Some(_), Some(w)) => Some((w.start, w.bytes)),
            _ => None,
        };
    }

    /// The fetch for a read of `size` bytes at `offset` returned `bytes` (short at the end
    /// of the file): the read's answer. A sequential read keeps the rest as its window; a
    /// jump forward forgets the window, and the next read that starts where it ended is
    /// sequential; a read behind the window changes nothing. (The mount fetches a read that
    /// is not sequential without holding the state: by the time it is back, a window may
    /// cover it.)
    pub fn fetched(&mut self, offset: u64, size: u64, bytes: Bytes) -> Bytes {
        let n = (size as usize).min(bytes.len());
        let answer = bytes.slice(..n);
        let end = offset + n as u64;
        if self.sequential(offset, size) {
            if bytes.len() > n {
                self.behind = None;
                self.window = Some(Window {
                    start: offset,
                    bytes,
                    ahead: None,
                });
                self.next = Some(end);
            } else {
                self.advance(end);
            }
        } else if !self.behind_window(offset) {
            // A jump: the run is over; the next read that starts where this one ended
            // begins a new one.
            self.behind = None;
            self.window = None;
            self.next = Some(end);
        }
        answer
    }

    /// Where the fetch of the next window should start, when there is a window, nothing is
    /// fetched ahead yet and the file (`file_size` bytes) goes on past the window.
    pub fn prefetch(&self, file_size: u64) -> Option<u64> {
        let w = self.window.as_ref()?;
        (w.ahead.is_none() && w.end() < file_size).then(|| w.end())
    }

    /// Keeps the task fetching ahead from `at` (what `prefetch` said).
    pub fn set_ahead(&mut self, at: u64, task: T) {
        if let Some(w) = &mut self.window {
            w.ahead = Some((at, task));
        }
    }

    /// Whether it holds a window.
    #[cfg(test)]
    fn has_window(&self) -> bool {
        self.window.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 128 << 10;

    fn bytes_at(start: u64, len: u64) -> Bytes {
        (start..start + len).map(|i| (i % 251) as u8).collect()
    }

    fn served(step: Step<u32>) -> Bytes {
        match step {
            Step::Serve(b) => b,
            other => panic!("expected a serve, got {other:?}"),
        }
    }

    /// The file a reader reads, `size` bytes long: a fetch returns what exists.
    fn fetch(size: u64, at: u64, want: u64) -> Bytes {
        bytes_at(at, want.min(size.saturating_sub(at)))
    }

    #[test]
    fn a_sequential_reader_fetches_a_window_then_serves_from_it_then_moves_ahead() {
        let size = 10 << 20;
        let mut ra = Readahead::<u32>::default();
        let Step::Fetch { want } = ra.step(0, K) else {
            panic!("first read fetches")
        };
        assert_eq!(want, READAHEAD_BYTES, "the first read at 0 is sequential");
        let got = ra.fetched(0, K, fetch(size, 0, want));
        assert_eq!(got, bytes_at(0, K));
        assert_eq!(ra.prefetch(size), Some(READAHEAD_BYTES));
        ra.set_ahead(READAHEAD_BYTES, 7);
        assert_eq!(ra.prefetch(size), None, "one fetch ahead at a time");
        // The rest of the window is served without fetching.
        let mut at = K;
        while at < READAHEAD_BYTES {
            assert_eq!(served(ra.step(at, K)), bytes_at(at, K), "at {at}");
            at += K;
        }
        // At its end, the read waits for the fetch ahead, which becomes the window.
        match ra.step(at, K) {
            Step::Await(from, task) => assert_eq!((from, task), (READAHEAD_BYTES, 7)),
            other => panic!("expected to await the fetch ahead, got {other:?}"),
        }
        ra.ahead_done(at, READAHEAD_BYTES, Some(fetch(size, at, READAHEAD_BYTES)));
        assert_eq!(served(ra.step(at, K)), bytes_at(at, K));
        assert_eq!(ra.prefetch(size), Some(2 * READAHEAD_BYTES));
    }

    #[test]
    fn random_reads_fetch_only_what_they_ask_and_forget_the_window() {
        let size = 10 << 20;
        let mut ra = Readahead::<u32>::default();
        let Step::Fetch { want } = ra.step(5 << 20, 4096) else {
            panic!("fetches")
        };
        assert_eq!(want, 4096, "a first read away from 0 is not sequential");
        assert_eq!(
            ra.fetched(5 << 20, 4096, fetch(size, 5 << 20, want)).len(),
            4096
        );
        assert!(!ra.has_window() && ra.prefetch(size).is_none());
        // A sequential run, then a jump: the jump fetches its size and drops the window.
        let Step::Fetch { want } = ra.step(0, K) else {
            panic!("fetches")
        };
        assert_eq!(
            want, READAHEAD_BYTES,
            "a read at 0 after a forgotten window"
        );
        ra.fetched(0, K, fetch(size, 0, want));
        assert!(ra.has_window());
        let Step::Fetch { want } = ra.step(8 << 20, K) else {
            panic!("a read outside the window fetches")
        };
        assert_eq!(want, K);
        ra.fetched(8 << 20, K, fetch(size, 8 << 20, want));
        assert!(!ra.has_window());
        // A read inside an old window's range after the jump is not served from it.
        assert!(matches!(ra.step(K, K), Step::Fetch { want } if want == K));
    }

    #[test]
    fn a_failed_or_misplaced_fetch_ahead_is_dropped_and_the_read_fetches_a_window() {
        let size = 10 << 20;
        for got in [None, Some(Bytes::new()), Some(bytes_at(1, 10))] {
            let mut ra = Readahead::<u32>::default();
            let first = ra.fetched(0, READAHEAD_BYTES - K, fetch(size, 0, READAHEAD_BYTES));
            assert_eq!(first.len() as u64, READAHEAD_BYTES - K);
            served(ra.step(READAHEAD_BYTES - K, K));
            ra.set_ahead(READAHEAD_BYTES + 1, 1);
            let at = READAHEAD_BYTES;
            let Step::Await(from, _) = ra.step(at, K) else {
                panic!("awaits")
            };
            let placed = if got.is_some() { at + 1 } else { from };
            ra.ahead_done(at, placed, got.clone());
            match ra.step(at, K) {
                Step::Fetch { want } => assert_eq!(want, READAHEAD_BYTES, "still sequential"),
                other => panic!("expected a fetch, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_end_of_the_file_stops_readahead() {
        let size = READAHEAD_BYTES + K;
        let mut ra = Readahead::<u32>::default();
        ra.fetched(0, K, fetch(size, 0, READAHEAD_BYTES));
        assert_eq!(ra.prefetch(size), Some(READAHEAD_BYTES));
        ra.set_ahead(READAHEAD_BYTES, 2);
        let mut at = K;
        while at < READAHEAD_BYTES {
            served(ra.step(at, K));
            at += K;
        }
        let Step::Await(from, _) = ra.step(at, K) else {
            panic!("awaits")
        };
        ra.ahead_done(at, from, Some(fetch(size, from, READAHEAD_BYTES)));
        // The last window holds only the file's last K bytes: served, nothing further ahead.
        assert_eq!(served(ra.step(at, K)), bytes_at(at, K));
        assert_eq!(ra.prefetch(size), None);
        // A read past the end fetches, gets nothing and fetches nothing ahead.
        let Step::Fetch { want } = ra.step(size, K) else {
            panic!("fetches")
        };
        assert!(ra.fetched(size, K, fetch(size, size, want)).is_empty());
        assert_eq!(ra.prefetch(size), None);
    }

    /// The kernel's requests of one sequential reader, 1 MiB each, arriving out of order:
    /// every one is served from the window or the fetch ahead, never fetched on its own.
    #[test]
    fn reads_of_a_sequential_run_that_arrive_out_of_order_stay_in_the_run() {
        const M: u64 = 1 << 20;
        let size = 64 << 20;
        let mut ra = Readahead::<u32>::default();
        let mut fetches = 0;
        // In order but for swapped neighbours: the second and third request of every 4 MiB,
        // and its last with the next one's first (which lies past the window).
        let mut order: Vec<u64> = (0..size / M).map(|i| i * M).collect();
        for base in (0..order.len()).step_by(4) {
            order.swap(base + 1, base + 2);
            if base + 4 < order.len() {
                order.swap(base + 3, base + 4);
            }
        }
        for (i, at) in order.into_iter().enumerate() {
            let got = loop {
                match ra.step(at, M) {
                    Step::Serve(b) => break b,
                    Step::Await(from, _) => {
                        ra.ahead_done(at, from, Some(fetch(size, from, READAHEAD_BYTES)))
                    }
                    Step::Fetch { want } => {
                        fetches += 1;
                        assert_eq!(want, READAHEAD_BYTES, "request {i} at {at} fetched alone");
                        break ra.fetched(at, M, fetch(size, at, want));
                    }
                }
            };
            assert_eq!(got, bytes_at(at, M), "request {i} at {at}");
            if let Some(next) = ra.prefetch(size) {
                ra.set_ahead(next, 0);
            }
        }
        assert_eq!(
            fetches, 1,
            "one fetch, then every window came from the fetch ahead"
        );
    }

    /// The kernel's second request of a file overtakes its first: fetched on its own, and
    /// back only after the first made a window, it leaves that window in place.
    #[test]
    fn a_request_that_overtakes_the_first_does_not_break_the_run() {
        const M: u64 = 1 << 20;
        let size = 16 << 20;
        let mut ra = Readahead::<u32>::default();
        let Step::Fetch { want: alone } = ra.step(M, M) else {
            panic!("fetches")
        };
        assert_eq!(alone, M, "a first read away from 0 is not sequential");
        let Step::Fetch { want } = ra.step(0, M) else {
            panic!("fetches")
        };
        assert_eq!(ra.fetched(0, M, fetch(size, 0, want)), bytes_at(0, M));
        ra.set_ahead(READAHEAD_BYTES, 0);
        assert_eq!(ra.fetched(M, M, fetch(size, M, alone)), bytes_at(M, M));
        assert_eq!(served(ra.step(2 * M, M)), bytes_at(2 * M, M));
        assert_eq!(served(ra.step(3 * M, M)), bytes_at(3 * M, M));
        assert!(matches!(ra.step(4 * M, M), Step::Await(at, _) if at == READAHEAD_BYTES));
    }

    /// A request of the run that comes long after the window moved past it (seen: the one
    /// at 2 MiB after the one at 9 MiB) is fetched alone, and the run goes on undisturbed.
    #[test]
    fn a_request_far_behind_the_window_is_fetched_alone_and_the_run_goes_on() {
        const M: u64 = 1 << 20;
        let size = 64 << 20;
        let mut order: Vec<u64> = (0..24).map(|i| i * M).collect();
        let late = order.remove(2);
        order.insert(9, late);
        let mut ra = Readahead::<u32>::default();
        let mut alone = Vec::new();
        for at in order {
            let got = loop {
                match ra.step(at, M) {
                    Step::Serve(b) => break b,
                    Step::Await(from, _) => {
                        ra.ahead_done(at, from, Some(fetch(size, from, READAHEAD_BYTES)))
                    }
                    Step::Fetch { want } => {
                        if want == M {
                            alone.push(at);
                        }
                        break ra.fetched(at, M, fetch(size, at, want));
                    }
                }
            };
            assert_eq!(got, bytes_at(at, M), "request at {at}");
            if let Some(next) = ra.prefetch(size) {
                ra.set_ahead(next, 0);
            }
        }
        assert_eq!(alone, vec![2 * M], "only the latecomer is fetched alone");
    }

    /// A reader that lost its window picks the run up again at the next read that starts
    /// where the one before ended.
    #[test]
    fn a_run_resumes_after_a_read_fetched_alone() {
        const M: u64 = 1 << 20;
        let size = 64 << 20;
        let mut ra = Readahead::<u32>::default();
        let at = 20 * M;
        let Step::Fetch { want } = ra.step(at, M) else {
            panic!("fetches")
        };
        assert_eq!(want, M);
        ra.fetched(at, M, fetch(size, at, want));
        let Step::Fetch { want } = ra.step(at + M, M) else {
            panic!("fetches")
        };
        assert_eq!(want, READAHEAD_BYTES, "the read after it is sequential");
    }

    #[test]
    fn a_short_fetch_that_is_all_the_reader_asked_keeps_no_window() {
        let mut ra = Readahead::<u32>::default();
        let got = ra.fetched(0, K, bytes_at(0, 100));
        assert_eq!(got.len(), 100);
        assert!(!ra.has_window());
    }
}
