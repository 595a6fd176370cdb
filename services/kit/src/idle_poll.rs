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
//! that gets a request at least every `window` never sleeps, and whatever else needs
//! that CPU (the service's own background work, other processes) waits for it more
//! often. It pays where the data plane has a CPU of its own; under a CPU quota (a
//! container's CPU limit) the polling is taken from the quota. Hence it is off
//! unless asked for (`crewmesh up --data-plane-idle-poll`).
//!
//! How: [`IdlePoll::on_unpark`] goes into the runtime builder's `on_thread_unpark`
//! hook, and [`IdlePoll::spawn_pollers`] starts one poller task per worker thread.
//! When a worker wakes up from its park, the hook wakes a poller, which then yields
//! in a loop: each yield makes tokio's worker look at its sockets without blocking
//! (`epoll_wait` with a zero timeout) and run whatever became ready before the
//! poller's next turn. The poller stops after a whole `window` in which its thread
//! made no write system call, and the worker parks as usual.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Idle polling for one runtime; cheap to clone.
#[derive(Clone, Debug)]
pub struct IdlePoll {
    wake: Arc<Notify>,
    window: Duration,
}

impl IdlePoll {
    /// Polls for `window` after the last work before letting the worker park.
    pub fn new(window: Duration) -> Self {
        Self {
            wake: Arc::new(Notify::new()),
            window,
        }
    }

    /// The runtime builder's `on_thread_unpark` hook: a worker woke up with work.
    pub fn on_unpark(&self) -> impl Fn() + Send + Sync + 'static {
        let wake = self.wake.clone();
        move || wake.notify_one()
    }

    /// Starts one poller per worker thread on the runtime whose builder got
    /// [`on_unpark`](Self::on_unpark). They run until the runtime shuts down.
    pub fn spawn_pollers(&self, runtime: &tokio::runtime::Handle) {
        for _ in 0..runtime.metrics().num_workers() {
            runtime.spawn(self.clone().run());
        }
    }

    async fn run(self) {
        loop {
            self.wake.notified().await;
            self.poll_until_idle().await;
        }
    }

    /// Yields until a whole `window` has passed in which the thread wrote nothing.
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
            if window_start.elapsed() >= self.window {
                let now = thread_writes();
                if now.is_none() || now == writes {
                    return;
                }
                writes = now;
                window_start = Instant::now();
            }
        }
    }
}

/// Write system calls the calling thread has made (`syscw` of
/// `/proc/thread-self/io`), or `None` where the kernel does not say: the poller then
/// stops after one window.
fn thread_writes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("syscw:"))
        .and_then(|count| count.trim().parse().ok())
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
            builder.on_thread_unpark(poll.on_unpark());
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
        let rt = runtime(Some(Duration::from_millis(200)));
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
        // A task that writes every 40 ms for 600 ms: each 100 ms window sees a write,
        // so the worker polls throughout (and its timers fire meanwhile), then parks.
        let rt = runtime(Some(Duration::from_millis(100)));
        std::thread::sleep(Duration::from_millis(50));
        let parks = give_work(&rt);
        let writer = rt.spawn(async {
            use std::io::Write;
            let mut null = dev_null();
            for _ in 0..15 {
                null.write_all(b"x").unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
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
    fn a_thread_counts_its_writes() {
        use std::io::Write;
        let before = thread_writes().expect("the kernel counts a thread's writes");
        dev_null().write_all(b"x").unwrap();
        assert_eq!(thread_writes(), Some(before + 1));
    }
}
