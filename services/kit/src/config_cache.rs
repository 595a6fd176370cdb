//! The config documents a service reads, kept current in memory.
//!
//! The cache opens a `Watch` on the config service: it receives a snapshot of the
//! kinds the service needs, swaps it in atomically, then applies every change as it
//! arrives (a new immutable [`Snapshot`] per change, published through a
//! `tokio::sync::watch` channel). When the stream breaks it reconnects with
//! exponential backoff and resumes from the last revision it applied, so nothing is
//! missed; if the store no longer keeps those changes it takes a fresh snapshot.
//!
//! On any failure it keeps serving the last-known-good snapshot. A broken watch is
//! never silent: the config service sends a heartbeat on a quiet stream, a stream
//! without a message for [`SILENCE_LIMIT`] counts as broken, and the seconds since the
//! last confirmed sync are reported in the `crewmesh_config_staleness_seconds` metric
//! and in the `config` check of `/readyz` (which stays ready on stale-but-present
//! config and names the staleness in its detail).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::config::v1::{Document, EventType, Kind, Scope, WatchRequest, WatchResponse};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::admin::Readiness;
use crate::clients::MeshChannel;
use crate::observe::MetricsRegistry;
use crate::tasks::AbortOnDrop;

/// Key of a document: (kind, tenant or `_global`, name).
pub type DocKey = (i32, String, String);

/// A consistent set of documents.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The store revision the snapshot is current to (0 before the first load).
    pub revision: i64,
    pub documents: BTreeMap<DocKey, Document>,
}

impl Snapshot {
    /// Documents of one kind.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Document> {
        let k = kind as i32;
        self.documents
            .range((k, String::new(), String::new())..)
            .take_while(move |((dk, _, _), _)| *dk == k)
            .map(|(_, d)| d)
    }
}

/// A stream that sends nothing for this long is treated as broken (the config service
/// sends a heartbeat every 2 s).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(7);
/// The longest wait between two reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

const READY_CHECK: &str = "config";

/// Handle to the cache; cheap to clone. The watch runs while a handle lives: dropping
/// the last one stops it (receivers from [`ConfigCache::subscribe`] then see the end).
#[derive(Clone)]
pub struct ConfigCache {
    rx: watch::Receiver<Arc<Snapshot>>,
    sync: Arc<Mutex<SyncState>>,
    _tasks: Arc<[AbortOnDrop; 2]>,
}

/// When the cache last knew it was current.
#[derive(Debug, Default)]
struct SyncState {
    last_confirmed: Option<Instant>,
    /// The store revision confirmed at `last_confirmed`.
    confirmed_revision: i64,
    last_error: Option<String>,
}

impl ConfigCache {
    /// Starts watching `kinds` (every tenant and `_global`). `interval` is the first
    /// reconnection delay; it doubles on each failure up to [`MAX_BACKOFF`]. The
    /// service is not ready until the first snapshot has loaded.
    pub fn spawn(
        client: ConfigServiceClient<MeshChannel>,
        kinds: Vec<Kind>,
        interval: Duration,
        readiness: Readiness,
        metrics: &MetricsRegistry,
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let staleness = Gauge::<i64, AtomicI64>::default();
        let revision = Gauge::<i64, AtomicI64>::default();
        metrics.register(
            "config_staleness_seconds",
            "Seconds since this process last confirmed its config snapshot is current (-1 before the first snapshot)",
            staleness.clone(),
        );
        metrics.register(
            "config_revision",
            "Store revision of the config snapshot in use",
            revision.clone(),
        );
        staleness.set(-1);
        readiness.set_not_ready(READY_CHECK, "waiting for the first config snapshot");
        let sync = Arc::new(Mutex::new(SyncState::default()));
        let watcher = Watcher {
            client,
            kinds,
            base_backoff: interval.max(Duration::from_millis(10)),
            tx,
            sync: sync.clone(),
            revision,
            readiness: readiness.clone(),
        };
        let tasks = [
            AbortOnDrop(tokio::spawn(watcher.run())),
            AbortOnDrop(tokio::spawn(report_staleness(
                rx.clone(),
                sync.clone(),
                staleness,
                readiness,
            ))),
        ];
        Self {
            rx,
            sync,
            _tasks: Arc::new(tasks),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes on every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }

    /// How long ago the cache last confirmed it is current; `None` before the first
    /// snapshot.
    pub fn staleness(&self) -> Option<Duration> {
        lock(&self.sync).last_confirmed.map(|t| t.elapsed())
    }

    /// The store revision this cache last confirmed it is current to: every change up
    /// to it, of every kind, has been seen (those of the watched kinds applied). It
    /// moves with heartbeats and with changes to kinds it does not keep, so it is the
    /// revision of the process's last confirmed config sync; 0 before the first
    /// snapshot. Kept while the config service is unreachable (see [`Self::staleness`]).
    pub fn confirmed_revision(&self) -> i64 {
        lock(&self.sync).confirmed_revision
    }
}

fn lock(sync: &Mutex<SyncState>) -> std::sync::MutexGuard<'_, SyncState> {
    sync.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a watch stream ended.
enum StreamEnd {
    /// Start over from a snapshot (the store compacted the revisions we need).
    Resnapshot(String),
    /// Reconnect and resume from the last applied revision.
    Retry(String),
    /// Every handle to the cache was dropped.
    Closed,
}

struct Watcher {
    client: ConfigServiceClient<MeshChannel>,
    kinds: Vec<Kind>,
    base_backoff: Duration,
    tx: watch::Sender<Arc<Snapshot>>,
    sync: Arc<Mutex<SyncState>>,
    revision: Gauge<i64, AtomicI64>,
    readiness: Readiness,
}

impl Watcher {
    async fn run(mut self) {
        // 0 until a snapshot is applied; afterwards the revision to resume from.
        let mut resume_from = 0;
        let mut backoff = self.base_backoff;
        loop {
            let started = Instant::now();
            let end = self.follow(&mut resume_from).await;
            let reason = match end {
                StreamEnd::Closed => return,
                StreamEnd::Resnapshot(reason) => {
                    resume_from = 0;
                    reason
                }
                StreamEnd::Retry(reason) => reason,
            };
            tracing::warn!(%reason, resume_from, "config watch broken; serving last-known-good config");
            lock(&self.sync).last_error = Some(reason);
            if started.elapsed() > SILENCE_LIMIT {
                // The stream worked for a while: this is a fresh failure.
                backoff = self.base_backoff;
            }
            let jitter = rand::random_range(0.8..1.2);
            tokio::select! {
                () = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                () = self.tx.closed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Opens one watch and applies what it sends until it ends.
    async fn follow(&mut self, resume_from: &mut i64) -> StreamEnd {
        let mut req = tonic::Request::new(WatchRequest {
            scope: Scope::All as i32,
            kinds: self.kinds.iter().map(|k| *k as i32).collect(),
            start_revision: *resume_from,
        });
        req.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let opened = tokio::select! {
            r = tokio::time::timeout(SILENCE_LIMIT, self.client.watch(req)) => r,
            () = self.tx.closed() => return StreamEnd::Closed,
        };
        let mut stream = match opened {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => return ended_by(&status),
            Err(_) => {
                return StreamEnd::Retry(format!(
                    "the config service did not open the watch within {SILENCE_LIMIT:?}"
                ));
            }
        };
        // A fresh stream (start_revision 0) opens with snapshot messages (none if
        // nothing matches) and then a marker without `snapshot`; they are collected
        // here and swapped in at the marker.
        let mut pending: Option<BTreeMap<DocKey, Document>> =
            (*resume_from == 0).then(BTreeMap::new);
        loop {
            let next = tokio::select! {
                r = tokio::time::timeout(SILENCE_LIMIT, stream.message()) => r,
                () = self.tx.closed() => return StreamEnd::Closed,
            };
            let msg = match next {
                Ok(Ok(Some(msg))) => msg,
                Ok(Ok(None)) => {
                    return StreamEnd::Retry("the config service ended the watch".to_owned());
                }
                Ok(Err(status)) => return ended_by(&status),
                Err(_) => {
                    return StreamEnd::Retry(format!(
                        "no message on the config watch for {SILENCE_LIMIT:?}"
                    ));
                }
            };
            if msg.snapshot {
                let Some(docs) = pending.as_mut() else {
                    return StreamEnd::Resnapshot(
                        "the config watch sent a snapshot on a resumed stream".to_owned(),
                    );
                };
                apply_events(docs, &msg);
                continue;
            }
            if let Some(docs) = pending.take() {
                self.publish(Snapshot {
                    revision: msg.revision,
                    documents: docs,
                });
            }
            if !msg.events.is_empty() {
                let mut next = Snapshot::clone(&self.tx.borrow());
                apply_events(&mut next.documents, &msg);
                next.revision = msg.revision;
                self.publish(next);
            }
            // Progress without changes for our kinds moves only the resume point.
            *resume_from = (*resume_from).max(msg.revision);
            let mut sync = lock(&self.sync);
            sync.last_confirmed = Some(Instant::now());
            sync.confirmed_revision = *resume_from;
            sync.last_error = None;
            drop(sync);
            self.readiness.set_ready(READY_CHECK);
        }
    }

    fn publish(&self, snap: Snapshot) {
        tracing::debug!(
            revision = snap.revision,
            documents = snap.documents.len(),
            "config snapshot updated"
        );
        self.revision.set(snap.revision);
        self.tx.send_replace(Arc::new(snap));
    }
}

fn ended_by(status: &tonic::Status) -> StreamEnd {
    let reason = format!("{:?}: {}", status.code(), status.message());
    if status.code() == tonic::Code::FailedPrecondition {
        StreamEnd::Resnapshot(reason)
    } else {
        StreamEnd::Retry(reason)
    }
}

/// Applies the events of one message to `docs`.
fn apply_events(docs: &mut BTreeMap<DocKey, Document>, msg: &WatchResponse) {
    for event in &msg.events {
        let Some(doc) = &event.document else { continue };
        let key = (doc.kind, doc.tenant.clone(), doc.name.clone());
        if event.r#type == EventType::Delete as i32 {
            docs.remove(&key);
        } else if docs.get(&key).is_none_or(|cur| cur.version <= doc.version) {
            // A replayed change older than what we hold is skipped.
            docs.insert(key, doc.clone());
        }
    }
}

/// Keeps the staleness metric and the readiness detail current, once a second.
async fn report_staleness(
    rx: watch::Receiver<Arc<Snapshot>>,
    sync: Arc<Mutex<SyncState>>,
    staleness: Gauge<i64, AtomicI64>,
    readiness: Readiness,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if rx.has_changed().is_err() {
            return; // the watcher is gone
        }
        let state = lock(&sync);
        let Some(confirmed) = state.last_confirmed else {
            if let Some(e) = &state.last_error {
                readiness.set_not_ready(READY_CHECK, format!("no config snapshot yet: {e}"));
            }
            continue;
        };
        let age = confirmed.elapsed();
        staleness.set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
        if let Some(e) = &state.last_error {
            // Stale-but-present config keeps the service ready; the check's detail
            // says how stale and why.
            let detail = format!(
                "serving last-known-good config (revision {}), {}s stale: {e}",
                rx.borrow().revision,
                age.as_secs()
            );
            drop(state);
            readiness.set_ready_noting(READY_CHECK, detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_watch_stops_with_the_last_handle() {
        // Nothing listens there: the watcher keeps retrying until it is stopped.
        let channel = crate::telemetry::InjectTrace::new(crate::transport::PeerChannel::plaintext(
            "127.0.0.1:1",
        ));
        let cache = ConfigCache::spawn(
            ConfigServiceClient::new(channel),
            vec![Kind::Flag],
            Duration::from_millis(10),
            Readiness::new(),
            &MetricsRegistry::new(),
        );
        let mut rx = cache.subscribe();
        let other = cache.clone();
        drop(cache);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.changed())
                .await
                .is_err(),
            "the watch runs while a handle lives"
        );
        drop(other);
        let ended = tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the watch ends when the last handle is dropped");
        assert!(ended.is_err());
    }

    fn doc(kind: Kind, name: &str, version: i64) -> Document {
        Document {
            tenant: "_global".into(),
            kind: kind as i32,
            name: name.into(),
            spec_json: "{}".into(),
            version,
            ..Default::default()
        }
    }

    fn put(d: Document) -> crewmesh_proto::config::v1::DocumentEvent {
        crewmesh_proto::config::v1::DocumentEvent {
            r#type: EventType::Put as i32,
            document: Some(d),
        }
    }

    #[test]
    fn events_apply_in_order_and_replays_do_not_go_back() {
        let mut docs = BTreeMap::new();
        let msg = WatchResponse {
            revision: 5,
            snapshot: false,
            events: vec![
                put(doc(Kind::Model, "a", 3)),
                put(doc(Kind::Model, "b", 4)),
                put(doc(Kind::Provider, "p", 5)),
            ],
        };
        apply_events(&mut docs, &msg);
        let replay = WatchResponse {
            revision: 5,
            snapshot: false,
            events: vec![
                put(doc(Kind::Model, "a", 2)),
                crewmesh_proto::config::v1::DocumentEvent {
                    r#type: EventType::Delete as i32,
                    document: Some(doc(Kind::Model, "b", 0)),
                },
            ],
        };
        apply_events(&mut docs, &replay);
        let snap = Snapshot {
            revision: 5,
            documents: docs,
        };
        let models: Vec<(String, i64)> = snap
            .of_kind(Kind::Model)
            .map(|d| (d.name.clone(), d.version))
            .collect();
        assert_eq!(models, vec![("a".to_owned(), 3)]);
        assert_eq!(snap.of_kind(Kind::Provider).count(), 1);
        assert_eq!(snap.of_kind(Kind::Agent).count(), 0);
    }
}
