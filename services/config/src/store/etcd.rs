//! The production store: etcd v3. A document's version is its key's `mod_revision`;
//! compare-and-set is one `Txn` comparing it (`create_revision == 0` for "must not
//! exist"). Listings are key-ordered ranges read at one revision.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;

use super::{ConfigStore, ListPage, ListPlan, ListQuery, RawEntry, check_expected};
use crate::document::{DocKey, DocValue, StoredDoc};
use crate::error::{ConfigServiceError, Result};
use crate::settings::EtcdConfig;

/// Largest etcd response the store accepts (a page of large documents).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// etcd-backed [`ConfigStore`].
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
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
        let txn = match expected {
            None => Txn::new().and_then(vec![put]),
            Some(0) => Txn::new()
                .when(vec![Compare::create_revision(
                    path.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![put])
                .or_else(vec![TxnOp::get(path, None)]),
            Some(n) => Txn::new()
                .when(vec![Compare::mod_revision(
                    path.clone(),
                    CompareOp::Equal,
                    n,
                )])
                .and_then(vec![put])
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
}
