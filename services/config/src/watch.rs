//! The `Watch` stream. With `start_revision` 0 it sends a snapshot of the documents
//! the caller may read (messages with `snapshot = true`), then one message with
//! `snapshot = false` and no events that marks the snapshot complete, then every
//! later change. With `start_revision` N it resumes with every change after N, so a
//! reconnecting client misses nothing; if the store no longer keeps those changes
//! the stream fails with `FAILED_PRECONDITION` telling the client to take a snapshot.
//!
//! While nothing changes the stream sends a heartbeat (no events, the revision
//! reached) every [`HEARTBEAT`], so a client can tell a quiet stream from a broken
//! one: see `crewmesh_kit::config_cache`.

use std::time::Duration;

use crewmesh_kit::status::to_status;
use crewmesh_proto::config::v1 as pb;
use futures::StreamExt;
use futures::stream::BoxStream;
use tonic::Status;

use crate::document::{DocKind, Owner};
use crate::error::{ConfigServiceError, Result};
use crate::service::{CallerInfo, ReadScope, read_scope};
use crate::store::{Change, ChangeBatch, ListFilter, SharedStore, list_all};

/// How often a quiet watch says it is still alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Documents per snapshot message.
const SNAPSHOT_CHUNK: usize = 500;

/// Which documents a watcher receives.
#[derive(Debug, Clone)]
struct WatchFilter {
    owner: Option<Owner>,
    kinds: Vec<DocKind>,
}

impl WatchFilter {
    fn matches(&self, change: &Change) -> bool {
        let key = change.key();
        self.owner.as_ref().is_none_or(|o| *o == key.owner)
            && (self.kinds.is_empty() || self.kinds.contains(&key.kind))
    }

    fn to_events(&self, batch: ChangeBatch) -> pb::WatchResponse {
        let events = batch
            .changes
            .into_iter()
            .filter(|c| self.matches(c))
            .map(event)
            .collect();
        pb::WatchResponse {
            revision: batch.revision,
            snapshot: false,
            events,
        }
    }
}

fn event(change: Change) -> pb::DocumentEvent {
    match change {
        Change::Put(doc) => pb::DocumentEvent {
            r#type: pb::EventType::Put as i32,
            document: Some(doc.to_proto()),
        },
        Change::Delete(key) => pb::DocumentEvent {
            r#type: pb::EventType::Delete as i32,
            document: Some(pb::Document {
                tenant: key.owner.as_str().to_owned(),
                kind: key.kind.to_proto() as i32,
                name: key.name.as_str().to_owned(),
                ..Default::default()
            }),
        },
    }
}

/// Checks the request, takes the snapshot if asked, and opens the store's watch.
#[tracing::instrument(skip_all, fields(scope = r.scope, start_revision = r.start_revision))]
pub async fn open(
    store: &SharedStore,
    caller: &CallerInfo,
    r: pb::WatchRequest,
) -> Result<BoxStream<'static, Result<pb::WatchResponse, Status>>> {
    let owner = match read_scope(r.scope, caller, true)? {
        ReadScope::One(owner) => Some(owner),
        ReadScope::All => None,
    };
    let mut kinds = Vec::with_capacity(r.kinds.len());
    for k in &r.kinds {
        let kind = DocKind::require(*k)?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    if r.start_revision < 0 {
        return Err(ConfigServiceError::InvalidArgument(format!(
            "start_revision must not be negative (got {}); 0 asks for a snapshot",
            r.start_revision
        )));
    }
    let filter = WatchFilter { owner, kinds };
    let mut first: Vec<pb::WatchResponse> = Vec::new();
    let after = if r.start_revision == 0 {
        let (revision, docs) = snapshot(store, &filter).await?;
        for chunk in docs.chunks(SNAPSHOT_CHUNK) {
            first.push(pb::WatchResponse {
                revision,
                snapshot: true,
                events: chunk.to_vec(),
            });
        }
        // Marks the end of the snapshot, also when it is empty.
        first.push(pb::WatchResponse {
            revision,
            snapshot: false,
            events: Vec::new(),
        });
        revision
    } else {
        r.start_revision
    };
    let changes = store.watch(after).await?;
    tracing::debug!(after, "watch opened");
    let filter_for_changes = filter.clone();
    let changes = changes.map(move |batch| match batch {
        Ok(batch) => Ok(filter_for_changes.to_events(batch)),
        Err(e) => {
            tracing::info!(error = %e, "watch ended by the store");
            Err(to_status(&e))
        }
    });
    Ok(with_heartbeats(
        futures::stream::iter(first.into_iter().map(Ok)).chain(changes),
        after,
    ))
}

/// Reads every document the filter covers. The revision returned is the oldest one
/// any page was read at: replaying changes from there converges on the store's
/// state even if pages were read at different revisions.
async fn snapshot(
    store: &SharedStore,
    filter: &WatchFilter,
) -> Result<(i64, Vec<pb::DocumentEvent>)> {
    let kinds: Vec<Option<DocKind>> = if filter.kinds.is_empty() {
        vec![None]
    } else {
        filter.kinds.iter().copied().map(Some).collect()
    };
    let mut revision = i64::MAX;
    let mut events = Vec::new();
    for kind in kinds {
        let filter = ListFilter {
            owner: filter.owner.clone(),
            kind,
        };
        let (read_at, documents) = list_all(&**store, filter).await?;
        revision = revision.min(read_at);
        events.extend(documents.into_iter().map(|d| event(Change::Put(d))));
    }
    Ok((revision, events))
}

/// Passes `inner` through and sends an empty message with the last revision sent
/// whenever nothing was sent for [`HEARTBEAT`]. Ends after the first error.
fn with_heartbeats(
    inner: impl futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static,
    start: i64,
) -> BoxStream<'static, Result<pb::WatchResponse, Status>> {
    struct State<S> {
        inner: std::pin::Pin<Box<S>>,
        revision: i64,
        done: bool,
    }
    let state = State {
        inner: Box::pin(inner),
        revision: start,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        match tokio::time::timeout(HEARTBEAT, st.inner.next()).await {
            Ok(Some(Ok(msg))) => {
                st.revision = st.revision.max(msg.revision);
                Some((Ok(msg), st))
            }
            Ok(Some(Err(status))) => {
                st.done = true;
                Some((Err(status), st))
            }
            Ok(None) => None,
            Err(_) => {
                let beat = pb::WatchResponse {
                    revision: st.revision,
                    snapshot: false,
                    events: Vec::new(),
                };
                Some((Ok(beat), st))
            }
        }
    }))
}
