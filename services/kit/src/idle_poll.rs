//! Idle polling: a runtime's worker keeps polling its sockets for a while after its
//! last piece of work instead of going to sleep at once.
//!
//! A worker with nothing to do parks in `epoll_wait` and its CPU goes idle. Waking an
//! idle CPU takes time, and the next request runs slower than one that finds the CPU
//! busy, as with caches gone cold (an idle virtual CPU's core runs other work; on bare
//! metal, deep C-states flush the caches). On the 2-core
//! machine of docs/performance.md, the data plane spent about 1.7x the CPU per model
//! call at 1,000 req/s that it spends on back-to-back calls. Seastar's reactor polls
//! the same way by default (`--idle-poll-time-us`).
//!
//! The cost is CPU: while polling, the worker uses its whole CPU, so a data plane
//! that gets a request at least every window never sleeps, and whatever else needs
//! that CPU (the service's own background work, other processes) waits for it more
//! often. Under a CPU quota (a container's CPU limit) the polling is taken from the
//! quota.
//!
//! The window adapts, the way the kernel's halt polling does for an idle virtual CPU
//! (`haltpoll`): polling only pays when the next piece of work comes within the
//! window. Each time a worker wakes up, the hook takes how long it was idle (the
//! window it polled without work, then its sleep): idle time within the longest
//! window, `max`, means a longer poll would have caught the work, and the window
//! doubles (from `max / 16` up to `max`); a longer idle time means polling would not
//! have paid, and the window halves (to zero below `max / 16`). Requests that come
//! further apart than `max` thus cost no polling at all, and a steady stream that
//! comes closer together keeps the worker awake.
//!
//! How: [`IdlePoll::on_park`] and [`IdlePoll::on_unpark`] go into the runtime
//! builder's `on_thread_park` and `on_thread_unpark` hooks, and
//! [`IdlePoll::spawn_pollers`] starts one poller task per worker thread. When a
//! worker wakes up from its park with a window to poll, the hook wakes a poller,
//! which then yields in a loop: each yield makes tokio's worker look at its sockets
//! without blocking (`epoll_wait` with a zero timeout) and run whatever became ready
//! before the poller's next turn. The poller stops after a whole window in which its
//! thread made no write system call, and the worker parks as usual.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Idle polling for one runtime; cheap to clone.
#[derive(Clone, Debug)]
pub struct IdlePoll {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    wake: Notify,
    /// The window now, in nanoseconds (see [`adapt`]).
    window_ns: AtomicU64,
    max: Duration,
}

thread_local! {
    /// When this worker thread last parked.
    static PARKED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
    /// How long this worker thread polled without work before it last parked.
    static POLLED_IDLE: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

impl IdlePoll {
    /// Polls for up to `max` after the last work before letting the worker park; the
    /// window starts at `max` and adapts (see the module's documentation).
    pub fn new(max: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                wake: Notify::new(),
                window_ns: AtomicU64::new(nanos(max)),
                max,
            }),
        }
    }

    /// The window a worker polls for now.
    pub fn window(&self) -> Duration {
        self.shared.window()
    }

    /// The runtime builder's `on_thread_park` hook: a worker goes to sleep.
    pub fn on_park(&self) -> impl Fn() + Send + Sync + 'static {
        || PARKED_AT.with(|at| at.set(Some(Instant::now())))
    }

    /// The runtime builder's `on_thread_unpark` hook: a worker woke up with work. It
    /// adapts the window to how long the worker was idle and, if the window is not
    /// zero, wakes a poller.
    pub fn on_unpark(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || {
            let window = match PARKED_AT.with(Cell::take) {
                Some(parked) => {
                    let idle = POLLED_IDLE.with(Cell::take) + parked.elapsed();
                    let adapted = adapt(shared.window(), shared.max, idle);
                    shared.window_ns.store(nanos(adapted), Ordering::Relaxed);
                    adapted
                }
                None => shared.window(),
            };
            if !window.is_zero() {
                shared.wake.notify_one();
            }
        }
    }

    /// Starts one poller per worker thread on the runtime whose builder got
    /// [`on_park`](Self::on_park) and [`on_unpark`](Self::on_unpark). They run until
    /// the runtime shuts down.
    pub fn spawn_pollers(&self, runtime: &tokio::runtime::Handle) {
        for _ in 0..runtime.metrics().num_workers() {
            runtime.spawn(self.clone().run());
        }
    }

    async fn run(self) {
        loop {
            self.shared.wake.notified().await;
            self.poll_until_idle().await;
        }
    }

    /// Yields until a whole window has passed in which the thread wrote nothing.
    ///
    /// Every piece of a service's work ends in a write (an answer, a spool record, a
    /// frame to another service), so a window without writes is idle. Counting the
    /// thread's CPU time instead would not do: interrupts charge it too, often
    /// enough that the poller would rarely stop.
    async fn poll_until_idle(&self) {
        let mut writes = thread_writes();
        let mut window_start = Instant::now();
        loop {
            tokio::task::yield_now().await;
            if window_start.elapsed() >= self.window() {
                let now = thread_writes();
                if now.is_none() || now == writes {
                    POLLED_IDLE.with(|idle| idle.set(window_start.elapsed()));
                    return;
                }
                writes = now;
                window_start = Instant::now();
            }
        }
    }
}

impl Shared {
    fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }
}

/// The smallest window that is not zero, as a fraction of the largest.
const START_DIVISOR: u32 = 16;

/// The window (at most `max`) after a worker was `idle` between two pieces of work:
/// polling without work, then asleep.
fn adapt(window: Duration, max: Duration, idle: Duration) -> Duration {
    let start = max / START_DIVISOR;
    if idle <= max {
        // A longer poll would have caught this work.
        window.saturating_mul(2).clamp(start, max)
    } else if window / 2 < start {
        Duration::ZERO
    } else {
        window / 2
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Write system calls the calling thread has made (`syscw` of
/// `/proc/thread-self/io`), or `None` where the kernel does not say: the poller then
/// stops after one window.
///
/// It runs on the data plane's thread once per window, so it reads the file the thread
/// opened the first time (`thread-self` is resolved at open) from offset 0 into a
/// buffer on the stack: no open, close or allocation per read.
#[cfg(target_os = "linux")]
fn thread_writes() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    thread_local! {
        static IO: Option<std::fs::File> = std::fs::File::open("/proc/thread-self/io").ok();
    }
    IO.with(|io| {
        let mut buf = [0u8; 512];
        let n = io.as_ref()?.read_at(&mut buf, 0).ok()?;
        syscw(&buf[..n])
    })
}

#[cfg(not(target_os = "linux"))]
fn thread_writes() -> Option<u64> {
    None
}

/// The `syscw:` count of an `io` file of `/proc`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn syscw(io: &[u8]) -> Option<u64> {
    let line = io
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"syscw:"))?;
    std::str::from_utf8(line).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-worker runtime, with idle polling for `window` when given.
    fn runtime(window: Option<Duration>) -> tokio::runtime::Runtime {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).enable_all();
        let poll = window.map(IdlePoll::new);
        if let Some(poll) = &poll {
            builder
                .on_thread_park(poll.on_park())
                .on_thread_unpark(poll.on_unpark());
        }
        let runtime = builder.build().unwrap();
        if let Some(poll) = &poll {
            poll.spawn_pollers(runtime.handle());
        }
        runtime
    }

    /// Hands the worker one small task and returns its park count right after (a
    /// polling worker does not park again until its poller stops).
    fn give_work(runtime: &tokio::runtime::Runtime) -> u64 {
        runtime.block_on(async {
            tokio::spawn(async {}).await.unwrap();
        });
        runtime.metrics().worker_park_count(0)
    }

    /// `/dev/null`, open for writing: each write is one `write` system call.
    fn dev_null() -> std::fs::File {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap()
    }

    /// Waits up to 10 s for the worker to park more than `count` times.
    fn parks_after(runtime: &tokio::runtime::Runtime, count: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if runtime.metrics().worker_park_count(0) > count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_polling_worker_stays_awake_for_its_window_then_parks() {
        let rt = runtime(Some(Duration::from_secs(1)));
        // Let the runtime settle, then wake the worker with work.
        std::thread::sleep(Duration::from_millis(50));
        let parks = give_work(&rt);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            rt.metrics().worker_park_count(0),
            parks,
            "the worker parked inside its poll window"
        );
        assert!(
            parks_after(&rt, parks),
            "the worker never parked after its poll window"
        );
    }

    #[test]
    fn without_polling_the_worker_parks_as_soon_as_it_is_idle() {
        // The control for the test above: its park count does move when the worker
        // goes idle, so an unchanged count means the worker kept polling.
        let rt = runtime(None);
        std::thread::sleep(Duration::from_millis(50));
        let before = rt.metrics().worker_park_count(0);
        give_work(&rt);
        std::thread::sleep(Duration::from_millis(100));
        assert!(rt.metrics().worker_park_count(0) > before);
    }

    #[test]
    fn polling_runs_what_becomes_ready_meanwhile() {
        // Work that arrives while the worker polls (here, a timer and a task from
        // another thread) runs without the worker parking.
        let rt = runtime(Some(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(50));
        let parks = give_work(&rt);
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        let out = rt.block_on(async { tokio::spawn(async { 7 }).await.unwrap() });
        assert_eq!(out, 7);
        assert_eq!(rt.metrics().worker_park_count(0), parks);
    }

    #[test]
    fn writes_keep_the_worker_polling() {
        // A task that writes every 20 ms for 600 ms: each 200 ms window sees a write,
        // so the worker polls throughout (and its timers fire meanwhile), then parks.
        let rt = runtime(Some(Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(50));
        let parks = give_work(&rt);
        let writer = rt.spawn(async {
            use std::io::Write;
            let mut null = dev_null();
            for _ in 0..30 {
                null.write_all(b"x").unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            rt.metrics().worker_park_count(0),
            parks,
            "the worker parked while its tasks were writing"
        );
        rt.block_on(writer).unwrap();
        assert!(parks_after(&rt, parks));
    }

    #[test]
    fn the_window_grows_on_short_idle_times_and_shrinks_to_zero_on_long_ones() {
        let max = Duration::from_millis(16);
        let ms = Duration::from_millis;
        // Idle longer than `max`: polling would not have paid, the window halves, and
        // below max / 16 it is zero.
        let mut window = max;
        let mut seen = vec![];
        for _ in 0..6 {
            window = adapt(window, max, ms(50));
            seen.push(window);
        }
        assert_eq!(seen, [ms(8), ms(4), ms(2), ms(1), ms(0), ms(0)]);
        // Idle within `max`: a longer poll would have caught the work, the window
        // doubles from max / 16, up to `max`.
        seen.clear();
        for _ in 0..6 {
            window = adapt(window, max, ms(1));
            seen.push(window);
        }
        assert_eq!(seen, [ms(1), ms(2), ms(4), ms(8), ms(16), ms(16)]);
        // No overflow, however long the window.
        assert_eq!(adapt(Duration::MAX, Duration::MAX, ms(1)), Duration::MAX);
    }

    #[test]
    fn a_worker_that_sleeps_longer_than_the_window_stops_polling() {
        // Work that comes every 150 ms against a 40 ms window: after a few sleeps the
        // window is zero and the worker no longer polls.
        let max = Duration::from_millis(40);
        let poll = IdlePoll::new(max);
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(1)
            .enable_all()
            .on_thread_park(poll.on_park())
            .on_thread_unpark(poll.on_unpark());
        let rt = builder.build().unwrap();
        poll.spawn_pollers(rt.handle());
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(150));
            give_work(&rt);
        }
        assert_eq!(poll.window(), Duration::ZERO);
        // Work that comes within the window again makes it grow: while the worker
        // polls it does not park, so keep handing it work until the window has been
        // back at `max`.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut widest = Duration::ZERO;
        while widest < max && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            give_work(&rt);
            widest = widest.max(poll.window());
        }
        assert_eq!(widest, max);
    }

    #[test]
    fn a_thread_counts_its_writes() {
        use std::io::Write;
        let before = thread_writes().expect("the kernel counts a thread's writes");
        dev_null().write_all(b"x").unwrap();
        assert_eq!(thread_writes(), Some(before + 1));
        // Read again from the file kept open: the count is current, not the first one.
        dev_null().write_all(b"x").unwrap();
        dev_null().write_all(b"x").unwrap();
        assert_eq!(thread_writes(), Some(before + 3));
    }

    #[test]
    fn the_write_count_is_read_from_its_line() {
        let io = b"rchar: 10\nwchar: 20\nsyscr: 3\nsyscw: 42\nread_bytes: 0\n";
        assert_eq!(syscw(io), Some(42));
        assert_eq!(syscw(b"syscr: 3\n"), None);
        assert_eq!(syscw(b"syscw: many\n"), None);
    }
}
