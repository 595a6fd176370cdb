//! A bounded, batching, asynchronous sender: request paths hand it items without
//! waiting; a background task sends them in batches with retries. Used by the audit
//! and usage clients.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// Batching parameters.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub capacity: usize,
    pub max_batch: usize,
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_batch: 256,
            max_delay: Duration::from_millis(50),
        }
    }
}

type SendFn<T> = Arc<
    dyn Fn(Vec<T>) -> Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>> + Send + Sync,
>;

/// Counters a client exposes for tests and metrics.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub failed_attempts: AtomicU64,
}

enum Msg<T> {
    Item(T),
    Flush(oneshot::Sender<()>),
}

/// The sending half; cheap to clone.
pub struct Batcher<T> {
    tx: mpsc::Sender<Msg<T>>,
    stats: Arc<BatchStats>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<T: Clone + Send + 'static> Batcher<T> {
    /// Starts the background task. `send` delivers one batch; failed batches are
    /// retried with exponential backoff (capped at 5 s) until they succeed or the
    /// batcher is flushed at shutdown with the destination still down.
    pub fn spawn<F, Fut>(name: &'static str, config: BatchConfig, send: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        let send: SendFn<T> = Arc::new(move |b| Box::pin(send(b)));
        let (tx, rx) = mpsc::channel(config.capacity);
        let stats = Arc::new(BatchStats::default());
        tokio::spawn(run(name, config, rx, send, stats.clone()));
        Self { tx, stats }
    }

    /// Queues an item without waiting. Returns false (and counts a drop) when the
    /// queue is full or closed.
    pub fn submit(&self, item: T) -> bool {
        match self.tx.try_send(Msg::Item(item)) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Waits until everything queued before this call has been sent (or `timeout`).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(done_tx)).await.is_err() {
            return false;
        }
        tokio::time::timeout(timeout, done_rx)
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }
}

async fn run<T: Clone + Send + 'static>(
    name: &'static str,
    config: BatchConfig,
    mut rx: mpsc::Receiver<Msg<T>>,
    send: SendFn<T>,
    stats: Arc<BatchStats>,
) {
    let mut batch = Vec::with_capacity(config.max_batch);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // Wait for the first item (or a flush), then gather more until the batch is
        // full or max_delay has passed.
        let first = match rx.recv().await {
            Some(m) => m,
            None => break,
        };
        let deadline = tokio::time::Instant::now() + config.max_delay;
        let mut msg = Some(first);
        loop {
            match msg.take() {
                Some(Msg::Item(item)) => batch.push(item),
                Some(Msg::Flush(w)) => {
                    waiters.push(w);
                    break;
                }
                None => {}
            }
            if batch.len() >= config.max_batch {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => msg = Some(m),
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let items = std::mem::take(&mut batch);
            deliver(name, items, &send, &stats).await;
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// Failures worth another attempt: the destination was unreachable or busy, or
/// failed inside (e.g. its database restarting). Anything else is a refusal of the
/// batch itself. Shared by the in-memory batcher and the spool.
pub(crate) fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Internal
    )
}

/// Attempts per batch before it is counted as dropped.
const MAX_ATTEMPTS: u32 = 6;

async fn deliver<T: Clone>(
    name: &'static str,
    items: Vec<T>,
    send: &SendFn<T>,
    stats: &BatchStats,
) {
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=MAX_ATTEMPTS {
        match send(items.clone()).await {
            Ok(()) => {
                stats.sent.fetch_add(items.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(status) if !is_transient(status.code()) => {
                // The destination refused the batch itself: resending cannot help.
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                stats
                    .dropped
                    .fetch_add(items.len() as u64, Ordering::Relaxed);
                tracing::error!(client = name, code = ?status.code(), message = status.message(), items = items.len(), "batch refused; dropped");
                return;
            }
            Err(status) => {
                stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = name, attempt, code = ?status.code(), message = status.message(), "batch delivery failed");
                if attempt < MAX_ATTEMPTS {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    stats
        .dropped
        .fetch_add(items.len() as u64, Ordering::Relaxed);
    tracing::error!(
        client = name,
        items = items.len(),
        "batch dropped after retries"
    );
}
