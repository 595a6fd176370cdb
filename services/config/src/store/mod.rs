//! Where documents live. [`ConfigStore`] has etcd semantics — one global revision
//! that every write increments, a document's version is the revision of its last
//! change, writes are compare-and-set on that version — and two implementations:
//! [`EtcdStore`] for production and [`EmbeddedStore`] (SQLite) for `crewmesh up`.
//! Both pass the same test suite.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::document::{DocKey, DocKind, DocValue, Owner, StoredDoc};
use crate::error::{ConfigServiceError, Result};

mod embedded;
mod etcd;

#[cfg(test)]
mod suite;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// Page size when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page the stores return.
pub const MAX_PAGE_SIZE: usize = 1000;
/// A page stops growing once its documents hold this many bytes, so that a listing
/// of large documents stays well under gRPC message limits.
pub const PAGE_BYTE_BUDGET: usize = 3 * 1024 * 1024;

/// Which documents a listing covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// One owner, or every owner (`None`).
    pub owner: Option<Owner>,
    /// One kind, or every kind (`None`).
    pub kind: Option<DocKind>,
}

/// A request for one page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub filter: ListFilter,
    /// Empty for the first page, else the previous page's `next_page_token`.
    pub page_token: String,
    /// 0 means [`DEFAULT_PAGE_SIZE`]; capped at [`MAX_PAGE_SIZE`].
    pub page_size: usize,
}

/// One page of a listing, in key order.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub documents: Vec<StoredDoc>,
    /// `None` on the last page.
    pub next_page_token: Option<String>,
    /// The store revision the page was read at.
    pub revision: i64,
}

/// A document store with etcd semantics. Object safe: services hold an
/// `Arc<dyn ConfigStore>`.
pub trait ConfigStore: Send + Sync + 'static {
    /// `etcd` or `embedded`, for logs and errors.
    fn backend(&self) -> &'static str;

    /// The key prefix documents live under (e.g. `/crewmesh/v1`).
    fn prefix(&self) -> &str;

    fn get<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<Option<StoredDoc>>>;

    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<ListPage>>;

    /// Creates or replaces a document. `expected_version`: `None` writes
    /// unconditionally, `Some(0)` only if the document does not exist, `Some(n)` only
    /// if its version is `n`; otherwise [`ConfigServiceError::Conflict`] naming the
    /// current version.
    fn put<'a>(
        &'a self,
        key: &'a DocKey,
        value: &'a DocValue,
        expected_version: Option<i64>,
    ) -> BoxFuture<'a, Result<StoredDoc>>;

    /// Deletes a document and returns the store revision of the deletion.
    /// [`ConfigServiceError::NotFound`] if it does not exist;
    /// [`ConfigServiceError::Conflict`] if `expected_version` is given and stale.
    fn delete<'a>(
        &'a self,
        key: &'a DocKey,
        expected_version: Option<i64>,
    ) -> BoxFuture<'a, Result<i64>>;

    /// The store's current revision.
    fn current_revision(&self) -> BoxFuture<'_, Result<i64>>;

    /// Every change after `after_revision`, in revision order, then every later
    /// change as it happens. The stream ends with an error when the store goes away
    /// ([`ConfigServiceError::Unavailable`]) or when changes after `after_revision` are
    /// no longer kept ([`ConfigServiceError::Compacted`]: take a new snapshot).
    /// Batches with no changes report progress: everything up to their revision has
    /// been delivered.
    fn watch(&self, after_revision: i64) -> BoxFuture<'_, Result<ChangeStream>>;

    /// Earlier and current versions of one document, newest first, kept apart from
    /// the store's own revision history so that they survive etcd compaction.
    /// `before`: only versions older than this one (the previous page's last
    /// version); 0 for the first page.
    fn history<'a>(
        &'a self,
        key: &'a DocKey,
        before: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<StoredDoc>>>;

    /// Several puts and deletes in one transaction: every condition holds and all
    /// are written at one revision, or nothing is written. Keys must be distinct.
    fn apply<'a>(&'a self, ops: &'a [ApplyOp]) -> BoxFuture<'a, Result<ApplyOutcome>>;
}

/// Every document `filter` covers, read page by page, and the lowest store revision
/// the pages were read at (a listing longer than one page is not one snapshot).
pub async fn list_all(
    store: &dyn ConfigStore,
    filter: ListFilter,
) -> Result<(i64, Vec<StoredDoc>)> {
    let mut documents = Vec::new();
    let mut revision = i64::MAX;
    let mut page_token = String::new();
    loop {
        let page = store
            .list(&ListQuery {
                filter: filter.clone(),
                page_token,
                page_size: MAX_PAGE_SIZE,
            })
            .await?;
        revision = revision.min(page.revision);
        documents.extend(page.documents);
        match page.next_page_token {
            Some(next) => page_token = next,
            None => return Ok((revision, documents)),
        }
    }
}

/// One operation of [`ConfigStore::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOp {
    Put {
        key: DocKey,
        value: DocValue,
        expected_version: Option<i64>,
    },
    Delete {
        key: DocKey,
        expected_version: Option<i64>,
    },
}

impl ApplyOp {
    pub fn key(&self) -> &DocKey {
        match self {
            ApplyOp::Put { key, .. } | ApplyOp::Delete { key, .. } => key,
        }
    }
}

/// What a successful [`ConfigStore::apply`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome {
    pub revision: i64,
    /// The documents written by the puts, in operation order.
    pub documents: Vec<StoredDoc>,
}

/// Most operations in one apply (etcd's default transaction limit is 128 operations,
/// and every put also writes a history entry).
pub const MAX_APPLY_OPS: usize = 60;

/// Checks an apply request before any store sees it.
pub(crate) fn check_apply(ops: &[ApplyOp]) -> Result<()> {
    if ops.is_empty() {
        return Err(ConfigServiceError::InvalidArgument(
            "apply needs at least one operation".to_owned(),
        ));
    }
    if ops.len() > MAX_APPLY_OPS {
        return Err(ConfigServiceError::InvalidArgument(format!(
            "apply takes at most {MAX_APPLY_OPS} operations (got {}); split the change",
            ops.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, op) in ops.iter().enumerate() {
        if !seen.insert(op.key()) {
            return Err(ConfigServiceError::InvalidArgument(format!(
                "operations[{i}]: {} appears more than once; an apply changes each document at most once",
                op.key()
            )));
        }
        match op {
            ApplyOp::Put {
                expected_version, ..
            } => check_expected(*expected_version, false)?,
            ApplyOp::Delete {
                expected_version, ..
            } => check_expected(*expected_version, true)?,
        }
    }
    Ok(())
}

/// One change to one document.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put(StoredDoc),
    /// The document was deleted at the batch's revision.
    Delete(DocKey),
}

impl Change {
    pub fn key(&self) -> &DocKey {
        match self {
            Change::Put(doc) => &doc.key,
            Change::Delete(key) => key,
        }
    }
}

/// Changes up to and including `revision`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeBatch {
    pub revision: i64,
    pub changes: Vec<Change>,
}

/// What [`ConfigStore::watch`] returns.
pub type ChangeStream = BoxStream<'static, Result<ChangeBatch>>;

/// Shared handle to a store.
pub type SharedStore = Arc<dyn ConfigStore>;

/// Checks an `expected_version` argument.
pub(crate) fn check_expected(expected: Option<i64>, for_delete: bool) -> Result<()> {
    match expected {
        Some(v) if v < 0 => Err(ConfigServiceError::InvalidArgument(format!(
            "expected_version must not be negative (got {v})"
        ))),
        Some(0) if for_delete => Err(ConfigServiceError::InvalidArgument(
            "expected_version 0 means \"must not exist\", which a delete cannot expect; give the current version or omit it"
                .to_owned(),
        )),
        _ => Ok(()),
    }
}

/// The first key after `prefix` and everything that starts with it (etcd's prefix end).
pub(crate) fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            // Keys are ASCII, so this stays valid UTF-8.
            return String::from_utf8(bytes).unwrap_or_default();
        }
    }
    // Only reachable for an empty prefix; "\u{7f}" sorts after every ASCII key.
    "\u{7f}".to_owned()
}

/// A stored key and value before decoding.
pub(crate) struct RawEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

impl RawEntry {
    pub(crate) fn decode(self, key: DocKey) -> Result<StoredDoc> {
        let value = DocValue::from_bytes(&self.key, &self.value)?;
        Ok(StoredDoc {
            key,
            value,
            version: self.mod_revision,
            create_version: self.create_revision,
        })
    }
}

/// The key range of one listing and the page being filled. Both stores scan keys in
/// order from [`ListPlan::start_after`] (exclusive) to [`ListPlan::end`] (exclusive)
/// in batches, feed every entry to [`ListPlan::push`] until it says the page is full,
/// and then call [`ListPlan::finish`].
pub(crate) struct ListPlan<'a> {
    prefix: &'a str,
    start_after: String,
    end: String,
    kind: Option<DocKind>,
    page_size: usize,
    docs: Vec<StoredDoc>,
    bytes: usize,
    over_budget: bool,
}

impl<'a> ListPlan<'a> {
    pub(crate) fn new(prefix: &'a str, query: &ListQuery) -> Result<Self> {
        let range_prefix = match (&query.filter.owner, query.filter.kind) {
            (Some(owner), Some(kind)) => format!("{prefix}/{owner}/{kind}/"),
            (Some(owner), None) => format!("{prefix}/{owner}/"),
            (None, _) => format!("{prefix}/"),
        };
        let start_after = if query.page_token.is_empty() {
            range_prefix.clone()
        } else {
            decode_token(&query.page_token, &range_prefix)?
        };
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        Ok(Self {
            prefix,
            end: prefix_end(&range_prefix),
            // Only a listing across owners has to filter kinds by itself.
            kind: if query.filter.owner.is_none() {
                query.filter.kind
            } else {
                None
            },
            start_after,
            page_size,
            docs: Vec::new(),
            bytes: 0,
            over_budget: false,
        })
    }

    pub(crate) fn start_after(&self) -> &str {
        &self.start_after
    }

    pub(crate) fn end(&self) -> &str {
        &self.end
    }

    /// How many entries to read per batch.
    pub(crate) fn batch_size(&self) -> usize {
        if self.kind.is_some() {
            (self.page_size + 1).max(256)
        } else {
            self.page_size + 1
        }
    }

    /// Takes one entry; `true` when the page is full and scanning should stop.
    pub(crate) fn push(&mut self, entry: RawEntry) -> bool {
        let Some(key) = DocKey::from_path(self.prefix, &entry.key) else {
            tracing::warn!(key = %entry.key, "skipping a store key that is not a config document key");
            return false;
        };
        if self.kind.is_some_and(|k| k != key.kind) {
            return false;
        }
        let size = entry.value.len();
        let raw_key = entry.key.clone();
        match entry.decode(key) {
            Ok(doc) => {
                self.docs.push(doc);
                self.bytes += size;
            }
            Err(e) => {
                tracing::error!(key = %raw_key, error = %e, "skipping a corrupt config document");
                return false;
            }
        }
        if self.docs.len() > self.page_size {
            return true;
        }
        if self.bytes >= PAGE_BYTE_BUDGET {
            self.over_budget = true;
            return true;
        }
        false
    }

    pub(crate) fn finish(mut self, revision: i64) -> ListPage {
        let more = if self.docs.len() > self.page_size {
            self.docs.truncate(self.page_size);
            true
        } else {
            self.over_budget
        };
        let next_page_token = match (more, self.docs.last()) {
            (true, Some(last)) => Some(encode_token(&last.key.path(self.prefix))),
            _ => None,
        };
        ListPage {
            documents: self.docs,
            next_page_token,
            revision,
        }
    }
}

fn encode_token(last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(last_key.as_bytes())
}

fn decode_token(token: &str, range_prefix: &str) -> Result<String> {
    let invalid = || {
        ConfigServiceError::InvalidArgument(
            "invalid page_token: pass the next_page_token of the previous page of the same listing"
                .to_owned(),
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let key = String::from_utf8(bytes).map_err(|_| invalid())?;
    if !key.starts_with(range_prefix) || key.len() == range_prefix.len() {
        return Err(invalid());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/crewmesh/v1/"), "/crewmesh/v10");
        assert_eq!(prefix_end("/a/b"), "/a/c");
        assert_eq!(prefix_end(""), "\u{7f}");
    }

    #[test]
    fn expected_versions_are_checked() {
        assert!(check_expected(None, true).is_ok());
        assert!(check_expected(Some(0), false).is_ok());
        assert!(check_expected(Some(0), true).is_err());
        assert!(check_expected(Some(-1), false).is_err());
        assert!(check_expected(Some(3), true).is_ok());
    }

    #[test]
    fn tokens_are_bound_to_their_listing() {
        let global_models = ListQuery {
            filter: ListFilter {
                owner: Some(Owner::Global),
                kind: Some(DocKind::Model),
            },
            ..Default::default()
        };
        let plan = ListPlan::new("/p", &global_models).unwrap();
        assert_eq!(plan.start_after(), "/p/_global/model/");
        assert_eq!(plan.end(), "/p/_global/model0");

        let token = encode_token("/p/_global/model/b");
        let next = ListQuery {
            page_token: token.clone(),
            ..global_models.clone()
        };
        assert_eq!(
            ListPlan::new("/p", &next).unwrap().start_after(),
            "/p/_global/model/b"
        );
        // The same token on another listing, or garbage, is refused.
        let other = ListQuery {
            filter: ListFilter {
                owner: Some(Owner::Global),
                kind: Some(DocKind::Provider),
            },
            page_token: token,
            page_size: 0,
        };
        assert!(ListPlan::new("/p", &other).is_err());
        let garbage = ListQuery {
            page_token: "!!".into(),
            ..global_models
        };
        assert!(ListPlan::new("/p", &garbage).is_err());
    }
}
