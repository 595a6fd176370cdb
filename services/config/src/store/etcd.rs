//! The production store: etcd v3. A document's version is its key's `mod_revision`;
//! compare-and-set is one `Txn` comparing it (`create_revision == 0` for "must not
//! exist"). Listings are key-ordered ranges read at one revision.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KvClient, PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchClient, WatchOptions, WatchStream,
};
use futures::future::BoxFuture;

use super::{
    ApplyOp, ApplyOutcome, Change, ChangeBatch, ChangeStream, ConfigStore, ListPage, ListPlan,
    ListQuery, RawEntry, check_apply, check_expected,
};
use crate::document::{DocKey, DocValue, StoredDoc};
use crate::error::{ConfigServiceError, Result};
use crate::settings::EtcdConfig;

/// Largest etcd response the store accepts (a page of large documents).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// etcd-backed [`ConfigStore`].
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    prefix: String,
    timeout: Duration,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ConfigServiceError::ReadFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl EtcdStore {
    /// Connects to the cluster. Without authentication the connection is made lazily,
    /// so an unreachable cluster shows up as `UNAVAILABLE` on the first operation; with
    /// authentication the token is fetched here.
    #[tracing::instrument(skip_all, fields(endpoints = ?config.endpoints, prefix = %config.prefix))]
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // Fail fast when the member we reach has lost its leader.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let ca = read("etcd CA file", &tls.ca_file)?;
            let cert = read("etcd client certificate", &tls.cert_file)?;
            let key = read("etcd client key", &tls.key_file)?;
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key)),
            );
        }
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            options = options.with_user(user.clone(), password.expose().to_owned());
        }
        let endpoints = config.endpoints.join(",");
        let client = match tokio::time::timeout(
            config.timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(map_err(e, &endpoints)),
            Err(_) => {
                return Err(ConfigServiceError::Unavailable {
                    backend: "etcd",
                    reason: format!(
                        "no answer within {:?} while connecting (endpoints: {endpoints})",
                        config.timeout
                    ),
                });
            }
        };
        tracing::info!("etcd config store connected");
        Ok(Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            endpoints,
        })
    }

    fn error(&self, e: etcd_client::Error) -> ConfigServiceError {
        map_err(e, &self.endpoints)
    }

    /// Runs one operation under the store's timeout.
    async fn timed<T>(&self, op: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(r) => r,
            Err(_) => Err(ConfigServiceError::Unavailable {
                backend: "etcd",
                reason: format!(
                    "no answer within {:?} (endpoints: {})",
                    self.timeout, self.endpoints
                ),
            }),
        }
    }

    async fn get_impl(&self, key: &DocKey) -> Result<Option<StoredDoc>> {
        let path = key.path(&self.prefix);
        let mut resp = self
            .kv
            .clone()
            .get(path, None)
            .await
            .map_err(|e| self.error(e))?;
        resp.take_kvs()
            .into_iter()
            .next()
            .map(|kv| raw(kv).decode(key.clone()))
            .transpose()
    }

    async fn list_impl(&self, query: &ListQuery) -> Result<ListPage> {
        let mut plan = ListPlan::new(&self.prefix, query)?;
        let mut after = plan.start_after().to_owned();
        let end = plan.end().to_owned();
        let batch = plan.batch_size();
        let mut revision = 0;
        let mut kv = self.kv.clone();
        'scan: loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(i64::try_from(batch).unwrap_or(i64::MAX));
            if revision > 0 {
                // Every later batch reads the revision the first one saw.
                options = options.with_revision(revision);
            }
            // The first key after `after`.
            let mut resp = kv
                .get(format!("{after}\0"), Some(options))
                .await
                .map_err(|e| self.error(e))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            for kv in resp.take_kvs() {
                let entry = raw(kv);
                after.clone_from(&entry.key);
                if plan.push(entry) {
                    break 'scan;
                }
            }
            if !more {
                break;
            }
        }
        Ok(plan.finish(revision))
    }

    async fn put_impl(
        &self,
        key: &DocKey,
        value: &DocValue,
        expected: Option<i64>,
    ) -> Result<StoredDoc> {
        check_expected(expected, false)?;
        let path = key.path(&self.prefix);
        let put = TxnOp::put(
            path.clone(),
            value.to_bytes(),
            Some(PutOptions::new().with_prev_key()),
        );
        let put = vec![put, self.history_put(key, value)];
        let txn = match expected {
            None => Txn::new().and_then(put),
            Some(0) => Txn::new()
                .when(vec![Compare::create_revision(
                    path.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(put)
                .or_else(vec![TxnOp::get(path, None)]),
            Some(n) => Txn::new()
                .when(vec![Compare::mod_revision(
                    path.clone(),
                    CompareOp::Equal,
                    n,
                )])
                .and_then(put)
                .or_else(vec![TxnOp::get(path, None)]),
        };
        let resp = self.kv.clone().txn(txn).await.map_err(|e| self.error(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        if !resp.succeeded() {
            let current = current_of(&ops);
            return Err(ConfigServiceError::conflict(
                key,
                expected.unwrap_or_default(),
                current,
            ));
        }
        let created = ops.iter().find_map(|op| match op {
            TxnOpResponse::Put(p) => p.prev_key().map(|kv| kv.create_revision()),
            _ => None,
        });
        Ok(StoredDoc {
            key: key.clone(),
            value: value.clone(),
            version: revision,
            create_version: created.unwrap_or(revision),
        })
    }

    async fn delete_impl(&self, key: &DocKey, expected: Option<i64>) -> Result<i64> {
        check_expected(expected, true)?;
        let path = key.path(&self.prefix);
        let compare = match expected {
            None => Compare::create_revision(path.clone(), CompareOp::Greater, 0),
            Some(n) => Compare::mod_revision(path.clone(), CompareOp::Equal, n),
        };
        let txn = Txn::new()
            .when(vec![compare])
            .and_then(vec![TxnOp::delete(path.clone(), None)])
            .or_else(vec![TxnOp::get(path, None)]);
        let resp = self.kv.clone().txn(txn).await.map_err(|e| self.error(e))?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        match (current_of(&resp.op_responses()), expected) {
            (None, _) => Err(ConfigServiceError::NotFound(key.to_string())),
            (Some(current), Some(n)) => Err(ConfigServiceError::conflict(key, n, Some(current))),
            // The document exists, so `create_revision > 0` cannot have failed.
            (Some(current), None) => Err(ConfigServiceError::conflict(key, 0, Some(current))),
        }
    }

    async fn current_revision_impl(&self) -> Result<i64> {
        let resp = self
            .kv
            .clone()
            .get(
                self.prefix.clone(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }
}

impl EtcdStore {
    /// Where the versions of `key` are kept: outside the document range (so watches
    /// and listings never see them) and never compacted away, since each version is a
    /// live key. Every entry is written in the same transaction as the version it
    /// keeps, so its mod revision is that version.
    fn history_prefix(&self, key: &DocKey) -> String {
        format!(
            "{}-history/{}/{}/{}/",
            self.prefix, key.owner, key.kind, key.name
        )
    }

    fn history_put(&self, key: &DocKey, value: &DocValue) -> TxnOp {
        TxnOp::put(
            format!(
                "{}{}",
                self.history_prefix(key),
                uuid::Uuid::new_v4().simple()
            ),
            value.to_bytes(),
            None,
        )
    }

    async fn history_impl(
        &self,
        key: &DocKey,
        before: i64,
        limit: usize,
    ) -> Result<Vec<StoredDoc>> {
        let mut options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        if before > 0 {
            options = options.with_max_mod_revision(before - 1);
        }
        let mut resp = self
            .kv
            .clone()
            .get(self.history_prefix(key), Some(options))
            .await
            .map_err(|e| self.error(e))?;
        resp.take_kvs()
            .into_iter()
            .map(|kv| {
                let mut entry = raw(kv);
                // See the embedded store: history entries carry no create version.
                entry.create_revision = 0;
                entry.decode(key.clone())
            })
            .collect()
    }

    async fn apply_impl(&self, ops: &[ApplyOp]) -> Result<ApplyOutcome> {
        check_apply(ops)?;
        let mut compares = Vec::with_capacity(ops.len());
        let mut writes = Vec::with_capacity(ops.len() * 2);
        let mut reads = Vec::with_capacity(ops.len());
        for op in ops {
            let path = op.key().path(&self.prefix);
            reads.push(TxnOp::get(path.clone(), None));
            match op {
                ApplyOp::Put {
                    key,
                    value,
                    expected_version,
                } => {
                    match expected_version {
                        None => {}
                        Some(0) => compares.push(Compare::create_revision(
                            path.clone(),
                            CompareOp::Equal,
                            0,
                        )),
                        Some(n) => {
                            compares.push(Compare::mod_revision(path.clone(), CompareOp::Equal, *n))
                        }
                    }
                    writes.push(TxnOp::put(
                        path,
                        value.to_bytes(),
                        Some(PutOptions::new().with_prev_key()),
                    ));
                    writes.push(self.history_put(key, value));
                }
                ApplyOp::Delete {
                    expected_version, ..
                } => {
                    compares.push(match expected_version {
                        None => Compare::create_revision(path.clone(), CompareOp::Greater, 0),
                        Some(n) => Compare::mod_revision(path.clone(), CompareOp::Equal, *n),
                    });
                    writes.push(TxnOp::delete(path, None));
                }
            }
        }
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let resp = self.kv.clone().txn(txn).await.map_err(|e| self.error(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let responses = resp.op_responses();
        if !resp.succeeded() {
            // Name the first operation whose condition failed.
            for (op, read) in ops.iter().zip(&responses) {
                let current = current_of(std::slice::from_ref(read));
                match op {
                    ApplyOp::Put {
                        key,
                        expected_version: Some(n),
                        ..
                    } => {
                        let holds = if *n == 0 {
                            current.is_none()
                        } else {
                            current == Some(*n)
                        };
                        if !holds {
                            return Err(ConfigServiceError::conflict(key, *n, current));
                        }
                    }
                    ApplyOp::Delete {
                        key,
                        expected_version,
                    } => match (current, expected_version) {
                        (None, _) => return Err(ConfigServiceError::NotFound(key.to_string())),
                        (Some(cur), Some(n)) if cur != *n => {
                            return Err(ConfigServiceError::conflict(key, *n, Some(cur)));
                        }
                        _ => {}
                    },
                    ApplyOp::Put { .. } => {}
                }
            }
            return Err(ConfigServiceError::Unavailable {
                backend: "etcd",
                reason: "the apply transaction lost a race; retry it".to_owned(),
            });
        }
        let mut created = responses.iter().filter_map(|r| match r {
            TxnOpResponse::Put(p) => Some(p.prev_key().map(etcd_client::KeyValue::create_revision)),
            _ => None,
        });
        let mut documents = Vec::new();
        for op in ops {
            if let ApplyOp::Put { key, value, .. } = op {
                // The document put comes first, then its history put.
                let prev = created.next().flatten();
                created.next();
                documents.push(StoredDoc {
                    key: key.clone(),
                    value: value.clone(),
                    version: revision,
                    create_version: prev.unwrap_or(revision),
                });
            }
        }
        Ok(ApplyOutcome {
            revision,
            documents,
        })
    }

    async fn watch_impl(&self, after: i64) -> Result<ChangeStream> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1)
            .with_progress_notify();
        let mut stream = self
            .watch
            .clone()
            .watch(format!("{}/", self.prefix), Some(options))
            .await
            .map_err(|e| self.error(e))?;
        // The first answer says whether the watch was created or refused.
        let first = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(self.watch_ended()),
            Err(e) => return Err(self.error(e)),
        };
        if first.canceled() {
            return Err(self.watch_canceled(after, &first));
        }
        let state = EtcdWatch {
            stream,
            store: self.clone(),
            after,
            failed: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut st| async move {
                if st.failed {
                    return None;
                }
                let next = st.next_batch().await;
                if next.is_err() {
                    st.failed = true;
                }
                Some((next, st))
            },
        )))
    }

    fn watch_ended(&self) -> ConfigServiceError {
        ConfigServiceError::Unavailable {
            backend: "etcd",
            reason: format!("the watch stream ended (endpoints: {})", self.endpoints),
        }
    }

    fn watch_canceled(&self, after: i64, resp: &etcd_client::WatchResponse) -> ConfigServiceError {
        if resp.compact_revision() > 0 {
            ConfigServiceError::Compacted {
                requested: after,
                compacted: resp.compact_revision(),
            }
        } else {
            ConfigServiceError::Unavailable {
                backend: "etcd",
                reason: format!(
                    "the watch was canceled: {} (endpoints: {})",
                    resp.cancel_reason(),
                    self.endpoints
                ),
            }
        }
    }
}

/// An open etcd watch and how far it has delivered.
struct EtcdWatch {
    stream: WatchStream,
    store: EtcdStore,
    after: i64,
    failed: bool,
}

impl EtcdWatch {
    async fn next_batch(&mut self) -> Result<ChangeBatch> {
        let resp = match self.stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(self.store.watch_ended()),
            Err(e) => return Err(self.store.error(e)),
        };
        if resp.canceled() {
            return Err(self.store.watch_canceled(self.after, &resp));
        }
        let mut revision = resp.header().map_or(self.after, |h| h.revision());
        let mut changes = Vec::with_capacity(resp.events().len());
        let mut max_event = 0;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            max_event = max_event.max(kv.mod_revision());
            let entry = raw(kv.clone());
            let Some(key) = DocKey::from_path(&self.store.prefix, &entry.key) else {
                continue;
            };
            match event.event_type() {
                EventType::Delete => changes.push(Change::Delete(key)),
                EventType::Put => {
                    let path = entry.key.clone();
                    match entry.decode(key) {
                        Ok(doc) => changes.push(Change::Put(doc)),
                        Err(e) => {
                            tracing::error!(key = %path, error = %e, "skipping a corrupt config document in a watch");
                        }
                    }
                }
            }
        }
        if max_event > 0 {
            // Events of one response all belong to revisions up to the newest one.
            revision = max_event;
        }
        self.after = self.after.max(revision);
        Ok(ChangeBatch {
            revision: self.after,
            changes,
        })
    }
}

/// The mod revision a failed compare found, from the `else` branch's get.
fn current_of(ops: &[TxnOpResponse]) -> Option<i64> {
    ops.iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
        _ => None,
    })
}

fn raw(kv: etcd_client::KeyValue) -> RawEntry {
    let (create_revision, mod_revision) = (kv.create_revision(), kv.mod_revision());
    let (key, value) = kv.into_key_value();
    RawEntry {
        // Keys this store writes are ASCII; anything else is skipped as a foreign key.
        key: String::from_utf8(key).unwrap_or_default(),
        value,
        create_revision,
        mod_revision,
    }
}

/// Connection trouble is `Unavailable` (retry later); anything else is internal.
fn map_err(e: etcd_client::Error, endpoints: &str) -> ConfigServiceError {
    use tonic::Code;
    let unavailable = |reason: String| ConfigServiceError::Unavailable {
        backend: "etcd",
        reason: format!("{reason} (endpoints: {endpoints})"),
    };
    match &e {
        etcd_client::Error::GRpcStatus(s)
            if matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ) =>
        {
            unavailable(s.message().to_owned())
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            unavailable(e.to_string())
        }
        _ => ConfigServiceError::Etcd(e),
    }
}

impl ConfigStore for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn get<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<Option<StoredDoc>>> {
        Box::pin(self.timed(self.get_impl(key)))
    }

    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<ListPage>> {
        Box::pin(self.timed(self.list_impl(query)))
    }

    fn put<'a>(
        &'a self,
        key: &'a DocKey,
        value: &'a DocValue,
        expected_version: Option<i64>,
    ) -> BoxFuture<'a, Result<StoredDoc>> {
        Box::pin(self.timed(self.put_impl(key, value, expected_version)))
    }

    fn delete<'a>(
        &'a self,
        key: &'a DocKey,
        expected_version: Option<i64>,
    ) -> BoxFuture<'a, Result<i64>> {
        Box::pin(self.timed(self.delete_impl(key, expected_version)))
    }

    fn current_revision(&self) -> BoxFuture<'_, Result<i64>> {
        Box::pin(self.timed(self.current_revision_impl()))
    }

    fn watch(&self, after_revision: i64) -> BoxFuture<'_, Result<ChangeStream>> {
        Box::pin(self.timed(self.watch_impl(after_revision)))
    }

    fn history<'a>(
        &'a self,
        key: &'a DocKey,
        before: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredDoc>>> {
        Box::pin(self.timed(self.history_impl(key, before, limit)))
    }

    fn apply<'a>(&'a self, ops: &'a [ApplyOp]) -> BoxFuture<'a, Result<ApplyOutcome>> {
        Box::pin(self.timed(self.apply_impl(ops)))
    }
}
