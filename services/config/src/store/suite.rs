//! The one test suite every [`ConfigStore`] passes, run against the embedded store
//! (a temporary SQLite file) and etcd (a real server, isolated by key prefix, plain
//! and over mutual TLS).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crewmesh_kit::principal::TenantId;
use crewmesh_kit::status::{ErrorClass, ServiceError};
use serde_json::json;

use super::*;
use crate::document::{DocName, DocValue};
use crate::settings::EtcdConfig;

fn tenant(t: &str) -> Owner {
    Owner::Tenant(TenantId::parse(t).unwrap())
}

fn key(owner: &Owner, kind: DocKind, name: &str) -> DocKey {
    DocKey::new(owner.clone(), kind, DocName::parse(name).unwrap())
}

fn value(n: i64) -> DocValue {
    let spec = json!({
        "deployments": [{"provider": "sim", "model": format!("sim-{n}"), "weight": n}],
        "nested": {"list": [1, "two", null, {"deep": true}]},
    });
    DocValue {
        spec: spec.as_object().cloned().unwrap(),
        updated_by: format!("key:writer-{n}"),
        updated_at_micros: 1_700_000_000_000_000 + n,
    }
}

fn names(page: &ListPage) -> Vec<String> {
    page.documents.iter().map(|d| d.key.to_string()).collect()
}

/// Every store behaves like etcd: CAS semantics, versions are store revisions,
/// deletes check versions, listings page in key order.
pub(crate) async fn run_suite(store: &dyn ConfigStore) {
    get_missing_is_none(store).await;
    compare_and_set(store).await;
    delete_with_version(store).await;
    list_pages_in_key_order(store).await;
    revisions_increase(store).await;
    concurrent_creates_have_one_winner(store).await;
    watch_replays_and_follows(store).await;
    history_keeps_every_version(store).await;
    apply_is_all_or_nothing(store).await;
}

async fn history_keeps_every_version(store: &dyn ConfigStore) {
    let k = key(&tenant("hist"), DocKind::Model, "m");
    assert_eq!(store.history(&k, 0, 10).await.unwrap(), vec![]);
    let v1 = store.put(&k, &value(1), Some(0)).await.unwrap();
    let v2 = store.put(&k, &value(2), Some(v1.version)).await.unwrap();
    store.delete(&k, None).await.unwrap();
    let v3 = store.put(&k, &value(3), Some(0)).await.unwrap();
    // Another document's versions are not mixed in.
    store
        .put(&key(&tenant("hist"), DocKind::Model, "m2"), &value(9), None)
        .await
        .unwrap();
    let got = |docs: Vec<StoredDoc>| -> Vec<(i64, DocValue, i64)> {
        docs.into_iter()
            .map(|d| (d.version, d.value, d.create_version))
            .collect()
    };
    assert_eq!(
        got(store.history(&k, 0, 10).await.unwrap()),
        vec![
            (v3.version, value(3), 0),
            (v2.version, value(2), 0),
            (v1.version, value(1), 0),
        ]
    );
    // Pages: newest first, continued from the last version seen.
    assert_eq!(
        got(store.history(&k, 0, 2).await.unwrap()),
        vec![(v3.version, value(3), 0), (v2.version, value(2), 0)]
    );
    assert_eq!(
        got(store.history(&k, v2.version, 2).await.unwrap()),
        vec![(v1.version, value(1), 0)]
    );
}

async fn apply_is_all_or_nothing(store: &dyn ConfigStore) {
    let a = key(&tenant("apply"), DocKind::Model, "a");
    let b = key(&tenant("apply"), DocKind::Model, "b");
    let c = key(&tenant("apply"), DocKind::Provider, "c");
    let old_c = store.put(&c, &value(1), None).await.unwrap();
    let before = store.current_revision().await.unwrap();
    let put = |k: &DocKey, n: i64, expected: Option<i64>| ApplyOp::Put {
        key: k.clone(),
        value: value(n),
        expected_version: expected,
    };
    // One stale condition: nothing is written.
    let err = store
        .apply(&[put(&a, 1, Some(0)), put(&b, 2, Some(7))])
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict, "{err}");
    assert!(err.to_string().contains("apply/model/b"), "{err}");
    assert_eq!(store.get(&a).await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), before);
    // Deleting a missing document fails the whole apply too.
    let err = store
        .apply(&[
            put(&a, 1, None),
            ApplyOp::Delete {
                key: b.clone(),
                expected_version: None,
            },
        ])
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::NotFound, "{err}");
    assert_eq!(store.get(&a).await.unwrap(), None);
    // Everything holds: one revision for all.
    let done = store
        .apply(&[
            put(&a, 1, Some(0)),
            put(&b, 2, None),
            ApplyOp::Delete {
                key: c.clone(),
                expected_version: Some(old_c.version),
            },
        ])
        .await
        .unwrap();
    assert!(done.revision > before);
    assert_eq!(
        done.documents
            .iter()
            .map(|d| (d.key.clone(), d.version, d.create_version))
            .collect::<Vec<_>>(),
        vec![
            (a.clone(), done.revision, done.revision),
            (b.clone(), done.revision, done.revision)
        ]
    );
    assert_eq!(store.get(&a).await.unwrap().unwrap().version, done.revision);
    assert_eq!(store.get(&c).await.unwrap(), None);
    assert_eq!(store.current_revision().await.unwrap(), done.revision);
    // Requests that no store should see.
    for bad in [
        vec![],
        vec![put(&a, 1, None), put(&a, 2, None)],
        vec![put(&a, 1, Some(-1))],
    ] {
        let err = store.apply(&bad).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::InvalidArgument, "{err}");
    }
    // An updated document keeps its create version.
    let again = store
        .apply(&[put(&a, 3, Some(done.revision))])
        .await
        .unwrap();
    assert_eq!(again.documents[0].create_version, done.revision);
}

/// Collects the changes to `key` from `stream` until one at `until` or later arrives.
async fn changes_of(stream: &mut ChangeStream, key: &DocKey, until: i64) -> Vec<Change> {
    use futures::StreamExt;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = tokio::time::timeout(left, stream.next())
            .await
            .expect("the watch delivers within 10s")
            .expect("the watch stays open")
            .expect("the watch has no error");
        for c in batch.changes {
            if c.key() == key {
                seen.push(c);
            }
        }
        if batch.revision >= until {
            return seen;
        }
    }
}

async fn watch_replays_and_follows(store: &dyn ConfigStore) {
    let k = key(&tenant("watcher"), DocKind::Flag, "w1");
    let start = store.current_revision().await.unwrap();
    let a = store.put(&k, &value(1), None).await.unwrap();
    // Opened after the first write: it is replayed.
    let mut from_start = store.watch(start).await.unwrap();
    let b = store.put(&k, &value(2), None).await.unwrap();
    let deleted = store.delete(&k, None).await.unwrap();
    let seen = changes_of(&mut from_start, &k, deleted).await;
    assert_eq!(
        seen,
        vec![
            Change::Put(a.clone()),
            Change::Put(b.clone()),
            Change::Delete(k.clone()),
        ]
    );
    // Resuming from a revision sends only what came after it.
    let mut resumed = store.watch(a.version).await.unwrap();
    let seen = changes_of(&mut resumed, &k, deleted).await;
    assert_eq!(seen, vec![Change::Put(b), Change::Delete(k.clone())]);
}

async fn get_missing_is_none(store: &dyn ConfigStore) {
    let k = key(&Owner::Global, DocKind::Model, "missing");
    assert_eq!(store.get(&k).await.unwrap(), None);
}

async fn compare_and_set(store: &dyn ConfigStore) {
    let k = key(&tenant("acme"), DocKind::Model, "gpt-4o-mini");
    let before = store.current_revision().await.unwrap();

    // Create: Some(0) means "must not exist".
    let v1 = store.put(&k, &value(1), Some(0)).await.unwrap();
    assert!(v1.version > before, "{} > {before}", v1.version);
    assert_eq!(v1.create_version, v1.version);
    assert_eq!(v1.key, k);
    assert_eq!(v1.value, value(1));
    assert_eq!(store.get(&k).await.unwrap(), Some(v1.clone()));

    // Creating again loses and names the current version.
    let err = store.put(&k, &value(9), Some(0)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict);
    assert_eq!(
        err.to_string(),
        format!(
            "version conflict on acme/model/gpt-4o-mini: expected the document to be absent, but the current version is {}",
            v1.version
        )
    );

    // Update at the current version.
    let v2 = store.put(&k, &value(2), Some(v1.version)).await.unwrap();
    assert!(v2.version > v1.version);
    assert_eq!(v2.create_version, v1.version);

    // A stale update loses and changes nothing.
    let err = store
        .put(&k, &value(9), Some(v1.version))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict);
    assert_eq!(
        err.to_string(),
        format!(
            "version conflict on acme/model/gpt-4o-mini: expected version {}, but the current version is {}",
            v1.version, v2.version
        )
    );
    assert_eq!(store.get(&k).await.unwrap(), Some(v2.clone()));

    // Expecting a version of a document that does not exist.
    let absent = key(&tenant("acme"), DocKind::Model, "absent");
    let err = store
        .put(&absent, &value(1), Some(v2.version))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict);
    assert!(
        err.to_string().ends_with("but the document does not exist"),
        "{err}"
    );
    assert_eq!(store.get(&absent).await.unwrap(), None);

    // Unconditional writes keep the create version.
    let v3 = store.put(&k, &value(3), None).await.unwrap();
    assert!(v3.version > v2.version);
    assert_eq!(v3.create_version, v1.version);
    assert_eq!(store.get(&k).await.unwrap(), Some(v3));

    let err = store.put(&k, &value(4), Some(-1)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidArgument);

    // The same name under another owner or kind is another document.
    let other = key(&Owner::Global, DocKind::Model, "gpt-4o-mini");
    assert_eq!(store.get(&other).await.unwrap(), None);
    let other_kind = key(&tenant("acme"), DocKind::Provider, "gpt-4o-mini");
    assert_eq!(store.get(&other_kind).await.unwrap(), None);
}

async fn delete_with_version(store: &dyn ConfigStore) {
    let k = key(&Owner::Global, DocKind::Flag, "new-ui");
    let v1 = store.put(&k, &value(1), Some(0)).await.unwrap();
    let v2 = store.put(&k, &value(2), Some(v1.version)).await.unwrap();

    let err = store.delete(&k, Some(v1.version)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Conflict);
    assert_eq!(
        err.to_string(),
        format!(
            "version conflict on _global/flag/new-ui: expected version {}, but the current version is {}",
            v1.version, v2.version
        )
    );
    assert_eq!(store.get(&k).await.unwrap(), Some(v2.clone()));

    let err = store.delete(&k, Some(0)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidArgument);

    let revision = store.delete(&k, Some(v2.version)).await.unwrap();
    assert!(revision > v2.version);
    assert_eq!(store.get(&k).await.unwrap(), None);

    let err = store.delete(&k, None).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::NotFound);
    assert_eq!(err.to_string(), "document _global/flag/new-ui not found");
    let err = store.delete(&k, Some(revision)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::NotFound);

    // Re-creating starts a new life: a new create version.
    let again = store.put(&k, &value(3), Some(0)).await.unwrap();
    assert!(again.create_version > revision);
    let gone = store.delete(&k, None).await.unwrap();
    assert!(gone > again.version);
}

async fn list_pages_in_key_order(store: &dyn ConfigStore) {
    let acme = tenant("list-acme");
    let beta = tenant("list-beta");
    // Written out of order; listings come back in key order.
    let mut last = 0;
    for n in [3, 1, 5, 2, 4] {
        let doc = store
            .put(
                &key(&acme, DocKind::Model, &format!("m{n}")),
                &value(n),
                Some(0),
            )
            .await
            .unwrap();
        last = doc.version;
    }
    store
        .put(&key(&acme, DocKind::Provider, "openai"), &value(6), None)
        .await
        .unwrap();
    store
        .put(&key(&beta, DocKind::Model, "b1"), &value(7), None)
        .await
        .unwrap();
    let newest = store
        .put(&key(&Owner::Global, DocKind::Model, "g1"), &value(8), None)
        .await
        .unwrap();
    assert!(newest.version > last);

    // One owner, one kind: page_size 2 over 5 documents.
    let mut query = ListQuery {
        filter: ListFilter {
            owner: Some(acme.clone()),
            kind: Some(DocKind::Model),
        },
        page_token: String::new(),
        page_size: 2,
    };
    let p1 = store.list(&query).await.unwrap();
    assert_eq!(names(&p1), vec!["list-acme/model/m1", "list-acme/model/m2"]);
    assert!(
        p1.revision >= newest.version,
        "{} >= {}",
        p1.revision,
        newest.version
    );
    assert_eq!(p1.documents[0].value, value(1));
    query.page_token = p1.next_page_token.clone().expect("a second page");
    let p2 = store.list(&query).await.unwrap();
    assert_eq!(names(&p2), vec!["list-acme/model/m3", "list-acme/model/m4"]);
    query.page_token = p2.next_page_token.clone().expect("a third page");
    let p3 = store.list(&query).await.unwrap();
    assert_eq!(names(&p3), vec!["list-acme/model/m5"]);
    assert_eq!(p3.next_page_token, None);

    // Exactly page_size documents left: no empty extra page.
    query.page_token = String::new();
    query.page_size = 5;
    let all = store.list(&query).await.unwrap();
    assert_eq!(all.documents.len(), 5);
    assert_eq!(all.next_page_token, None);

    // One owner, every kind.
    let every_kind = ListQuery {
        filter: ListFilter {
            owner: Some(acme.clone()),
            kind: None,
        },
        page_token: String::new(),
        page_size: 0,
    };
    let page = store.list(&every_kind).await.unwrap();
    assert_eq!(
        names(&page),
        vec![
            "list-acme/model/m1",
            "list-acme/model/m2",
            "list-acme/model/m3",
            "list-acme/model/m4",
            "list-acme/model/m5",
            "list-acme/provider/openai",
        ]
    );

    // Every owner, one kind, paged: the kind filter skips the provider.
    let mut across = ListQuery {
        filter: ListFilter {
            owner: None,
            kind: Some(DocKind::Model),
        },
        page_token: String::new(),
        page_size: 3,
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = store.list(&across).await.unwrap();
        pages += 1;
        seen.extend(names(&page));
        match page.next_page_token {
            Some(t) => across.page_token = t,
            None => break,
        }
    }
    // The suite's other documents (acme/model/gpt-4o-mini) are listed too.
    assert_eq!(
        seen,
        vec![
            "_global/model/g1",
            "acme/model/gpt-4o-mini",
            "list-acme/model/m1",
            "list-acme/model/m2",
            "list-acme/model/m3",
            "list-acme/model/m4",
            "list-acme/model/m5",
            "list-beta/model/b1",
        ]
    );
    assert_eq!(pages, 3);

    // A token from another listing is refused.
    let wrong = ListQuery {
        page_token: p1.next_page_token.unwrap(),
        ..every_kind.clone()
    };
    let wrong = ListQuery {
        filter: ListFilter {
            owner: Some(beta),
            kind: None,
        },
        ..wrong
    };
    let err = store.list(&wrong).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidArgument);

    // An empty listing.
    let empty = ListQuery {
        filter: ListFilter {
            owner: Some(tenant("nobody")),
            kind: None,
        },
        ..Default::default()
    };
    let page = store.list(&empty).await.unwrap();
    assert!(page.documents.is_empty());
    assert_eq!(page.next_page_token, None);
    assert!(page.revision >= newest.version);
}

async fn revisions_increase(store: &dyn ConfigStore) {
    let k = key(&Owner::Global, DocKind::Tool, "search");
    let r0 = store.current_revision().await.unwrap();
    let a = store.put(&k, &value(1), None).await.unwrap();
    let r1 = store.current_revision().await.unwrap();
    let b = store.put(&k, &value(2), None).await.unwrap();
    let r2 = store.current_revision().await.unwrap();
    let d = store.delete(&k, None).await.unwrap();
    let r3 = store.current_revision().await.unwrap();
    assert!(
        r0 < a.version && a.version <= r1,
        "{r0} < {} <= {r1}",
        a.version
    );
    assert!(
        r1 < b.version && b.version <= r2,
        "{r1} < {} <= {r2}",
        b.version
    );
    assert!(r2 < d && d <= r3, "{r2} < {d} <= {r3}");
    // A failed compare-and-set writes nothing.
    let before = store.current_revision().await.unwrap();
    let fresh = key(&Owner::Global, DocKind::Tool, "fresh");
    let _ = store.put(&fresh, &value(1), Some(12345)).await.unwrap_err();
    assert_eq!(store.get(&fresh).await.unwrap(), None);
    assert!(store.current_revision().await.unwrap() >= before);
}

async fn concurrent_creates_have_one_winner(store: &dyn ConfigStore) {
    let k = key(&Owner::Global, DocKind::Crew, "race");
    let values: Vec<DocValue> = (1..=8).map(value).collect();
    let results = futures::future::join_all(values.iter().map(|v| store.put(&k, v, Some(0)))).await;
    let winners: Vec<&StoredDoc> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.class(), ErrorClass::Conflict, "{e}");
        }
    }
    assert_eq!(store.get(&k).await.unwrap().as_ref(), Some(winners[0]));
}

async fn embedded_store(dir: &tempfile::TempDir) -> EmbeddedStore {
    EmbeddedStore::open(&dir.path().join("state").join("config.db"), "/crewmesh/v1")
        .await
        .unwrap()
}

#[tokio::test]
async fn embedded_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    run_suite(&embedded_store(&dir).await).await;
}

#[tokio::test]
async fn etcd_store_passes_the_suite() {
    let etcd = crewmesh_testkit::etcd();
    let mut config = EtcdConfig::new(vec![etcd.endpoint()]);
    config.prefix = etcd.unique_prefix();
    run_suite(&EtcdStore::connect(&config).await.unwrap()).await;
}

#[tokio::test]
async fn etcd_compaction_keeps_history_and_a_watch_from_before_it_asks_for_a_snapshot() {
    // Compaction is cluster-wide: keep it away from the tests sharing the common etcd.
    let etcd = crewmesh_testkit::Etcd::dedicated();
    let mut config = EtcdConfig::new(vec![etcd.endpoint()]);
    config.prefix = etcd.unique_prefix();
    let store = EtcdStore::connect(&config).await.unwrap();
    let k = key(&Owner::Global, DocKind::Flag, "compacted");
    let first = store.put(&k, &value(1), None).await.unwrap();
    let second = store.put(&k, &value(2), None).await.unwrap();
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    client.compact(second.version, None).await.unwrap();
    // The kept versions are live keys: compaction leaves them alone.
    let versions: Vec<i64> = store
        .history(&k, 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.version)
        .collect();
    assert_eq!(versions, vec![second.version, first.version]);
    // etcd refuses either at once or as the first message of the watch.
    let err = match store.watch(first.version - 1).await {
        Ok(mut stream) => {
            use futures::StreamExt;
            match stream.next().await {
                Some(Err(e)) => e,
                other => panic!("a watch from a compacted revision delivered {other:?}"),
            }
        }
        Err(e) => e,
    };
    assert_eq!(err.class(), ErrorClass::FailedPrecondition, "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "changes after revision {} are no longer kept (compacted up to revision {}): watch again with start_revision 0 to take a fresh snapshot",
            first.version - 1,
            second.version
        )
    );
}

#[tokio::test]
async fn embedded_revisions_count_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded_store(&dir).await;
    let k = key(&Owner::Global, DocKind::Model, "m");
    assert_eq!(store.current_revision().await.unwrap(), 1);
    let a = store.put(&k, &value(1), Some(0)).await.unwrap();
    assert_eq!((a.version, a.create_version), (2, 2));
    let b = store.put(&k, &value(2), Some(2)).await.unwrap();
    assert_eq!((b.version, b.create_version), (3, 2));
    // A lost compare-and-set does not consume a revision.
    store.put(&k, &value(3), Some(2)).await.unwrap_err();
    assert_eq!(store.current_revision().await.unwrap(), 3);
    assert_eq!(store.delete(&k, Some(3)).await.unwrap(), 4);
    assert_eq!(store.current_revision().await.unwrap(), 4);
}

#[tokio::test]
async fn embedded_store_keeps_documents_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&tenant("acme"), DocKind::Agent, "helper");
    let written = {
        let store = embedded_store(&dir).await;
        store.put(&k, &value(1), Some(0)).await.unwrap()
    };
    let store = embedded_store(&dir).await;
    assert_eq!(store.get(&k).await.unwrap(), Some(written.clone()));
    assert_eq!(store.current_revision().await.unwrap(), written.version);
}

#[tokio::test]
async fn etcd_down_is_unavailable() {
    let port = crewmesh_testkit::free_port();
    let mut config = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
    config.timeout = Duration::from_secs(1);
    let store = EtcdStore::connect(&config).await.unwrap();
    let k = key(&Owner::Global, DocKind::Model, "m");
    let err = store.get(&k).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
    assert!(
        err.to_string()
            .starts_with("the config store (etcd) is unavailable: ")
            && err
                .to_string()
                .ends_with(&format!(" (endpoints: http://127.0.0.1:{port})")),
        "{err}"
    );
    let err = store.put(&k, &value(1), Some(0)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
    let err = store.list(&ListQuery::default()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
}

/// An etcd that only accepts TLS clients with a certificate from the test CA.
struct TlsEtcd {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_etcd(pki: &crewmesh_testkit::TestPki) -> TlsEtcd {
    let server = pki.issue("etcd");
    let dir = tempfile::tempdir().unwrap();
    let port = crewmesh_testkit::free_port();
    let peer = format!("http://127.0.0.1:{}", crewmesh_testkit::free_port());
    let client = format!("https://127.0.0.1:{port}");
    let bin = std::env::var_os("CREWMESH_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"));
    let child = Command::new(bin)
        .args(["--name", "tls", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("tls={peer}")])
        .arg("--cert-file")
        .arg(&server.cert_file)
        .arg("--key-file")
        .arg(&server.key_file)
        .arg("--trusted-ca-file")
        .arg(&server.ca_file)
        .args(["--client-cert-auth", "--log-level", "error"])
        .env("ETCD_UNSUPPORTED_ARCH", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd (set CREWMESH_ETCD_BIN if it is not on PATH)");
    TlsEtcd {
        child,
        port,
        _dir: dir,
    }
}

#[tokio::test]
async fn etcd_store_over_mutual_tls_passes_the_suite() {
    crewmesh_testkit::init_crypto();
    let pki = crewmesh_testkit::TestPki::new();
    let etcd = start_tls_etcd(&pki);
    let mut config = EtcdConfig::new(vec![format!("https://127.0.0.1:{}", etcd.port)]);
    config.tls = Some(pki.files("config"));
    config.prefix = "/crewmesh/tls".to_owned();
    config.timeout = Duration::from_secs(2);
    let store = EtcdStore::connect(&config).await.unwrap();
    // Poll until the server is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.current_revision().await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for the tls etcd");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("tls etcd did not come up: {e}"),
        }
    }
    run_suite(&store).await;

    // Without a client certificate from the mesh CA the server refuses us.
    let other = crewmesh_testkit::TestPki::new();
    let mut stranger = config.clone();
    stranger.tls = Some(other.files("config"));
    let store = EtcdStore::connect(&stranger).await.unwrap();
    let err = store.current_revision().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
}
