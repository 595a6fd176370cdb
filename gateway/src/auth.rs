//! Authentication at the edge: bearer API keys, looked up by their SHA-256 digest.
//! Keys are never logged and never stored; only their digest and a short key id are.
//!
//! The accepted keys are the bootstrap admin key plus every `apikey` config document,
//! rebuilt into a [`KeyRing`] whenever the config snapshot changes. Expiry is checked
//! on every request, so an expired key is refused the moment it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use axum::http::HeaderMap;
use crewmesh_kit::config_cache::Snapshot;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::settings::Secret;
use crewmesh_proto::config::v1::{Document, Kind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::problem::Problem;

/// The tenant the bootstrap key acts in. Admins of this tenant are platform admins:
/// they may manage the keys of every tenant.
pub const DEFAULT_TENANT: &str = "default";

/// Prefix of every API key the gateway issues.
pub const KEY_PREFIX: &str = "cm_";

/// A known API key, stored as its digest.
#[derive(Clone)]
pub struct KeyEntry {
    pub id: String,
    digest: [u8; 32],
    pub principal: Arc<Principal>,
    pub expires_at: Option<OffsetDateTime>,
    /// Requests per minute allowed to this key (None: only the tenant's limit).
    pub rpm: Option<u64>,
    /// Tokens per minute allowed to this key.
    pub tpm: Option<u64>,
    /// Spend allowed to this key per calendar month (UTC), besides the tenant's budget.
    pub budget_usd_month: Option<f64>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("tenant", &self.principal.tenant)
            .finish_non_exhaustive()
    }
}

/// The body of an `apikey` config document. Only the key's digest is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeySpec {
    /// Lowercase hex SHA-256 of the key.
    pub key_sha256: String,
    pub tenant: String,
    pub roles: Vec<String>,
    /// RFC 3339, or null for a key that does not expire.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Spend limit of the key per calendar month (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd_month: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh key: `cm_` and 32 random bytes in hex.
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// Why an `apikey` document cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeySpecError {
    #[error("the body is not an apikey document: {0}")]
    Json(String),
    #[error("key_sha256 must be 64 lowercase hex characters")]
    Digest,
    #[error("tenant `{body}` does not match the document's tenant `{doc}`")]
    Tenant { body: String, doc: String },
    #[error("{0}")]
    Principal(String),
    #[error("roles must not be empty")]
    NoRoles,
    #[error("expires_at `{0}` is not an RFC 3339 time")]
    Expiry(String),
}

impl KeyEntry {
    /// Checks an `apikey` document into a key entry.
    pub fn from_document(doc: &Document) -> Result<Self, KeySpecError> {
        let spec: ApiKeySpec =
            serde_json::from_str(&doc.spec_json).map_err(|e| KeySpecError::Json(e.to_string()))?;
        if spec.tenant != doc.tenant {
            return Err(KeySpecError::Tenant {
                body: spec.tenant,
                doc: doc.tenant.clone(),
            });
        }
        let tenant =
            TenantId::parse(&doc.tenant).map_err(|e| KeySpecError::Principal(e.to_string()))?;
        let raw = hex::decode(&spec.key_sha256).map_err(|_| KeySpecError::Digest)?;
        let digest: [u8; 32] = raw.try_into().map_err(|_| KeySpecError::Digest)?;
        if spec.key_sha256 != spec.key_sha256.to_ascii_lowercase() {
            return Err(KeySpecError::Digest);
        }
        let roles = spec
            .roles
            .iter()
            .map(|r| Role::parse(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| KeySpecError::Principal(e.to_string()))?;
        if roles.is_empty() {
            return Err(KeySpecError::NoRoles);
        }
        let expires_at = spec
            .expires_at
            .as_deref()
            .map(|t| OffsetDateTime::parse(t, &Rfc3339).map_err(|_| KeySpecError::Expiry(t.into())))
            .transpose()?;
        Ok(Self {
            id: doc.name.clone(),
            digest,
            principal: Arc::new(Principal {
                tenant,
                subject: format!("key:{}", doc.name),
                roles,
            }),
            expires_at,
            rpm: spec.rpm,
            tpm: spec.tpm,
            budget_usd_month: spec.budget_usd_month,
        })
    }
}

/// Changes this gateway made itself (a key created or revoked through it), applied on
/// top of config snapshots older than the change so that they take effect at once.
#[derive(Debug, Default, Clone)]
pub struct LocalChanges {
    /// (tenant, id) -> (store revision of the change, entry; None when revoked).
    changes: HashMap<(String, String), (i64, Option<KeyEntry>)>,
}

impl LocalChanges {
    pub fn created(&mut self, revision: i64, entry: KeyEntry) {
        let k = (entry.principal.tenant.as_str().to_owned(), entry.id.clone());
        self.changes.insert(k, (revision, Some(entry)));
    }

    pub fn revoked(&mut self, revision: i64, tenant: &str, id: &str) {
        self.changes
            .insert((tenant.to_owned(), id.to_owned()), (revision, None));
    }

    /// Forgets the changes a snapshot at `revision` already contains.
    pub fn prune(&mut self, revision: i64) {
        self.changes.retain(|_, (rev, _)| *rev > revision);
    }
}

/// The keys the gateway accepts.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: HashMap<[u8; 32], KeyEntry>,
}

impl KeyRing {
    /// A ring with the bootstrap admin key (tenant `default`, role admin).
    pub fn with_bootstrap(key: Option<&Secret>) -> Self {
        let mut ring = Self::default();
        if let Some(key) = key {
            ring.insert(bootstrap_entry(key));
        }
        ring
    }

    fn insert(&mut self, entry: KeyEntry) {
        self.keys.insert(entry.digest, entry);
    }

    /// The bootstrap key plus every usable `apikey` document of `snapshot`, with this
    /// gateway's own newer changes on top. Unusable documents are skipped and logged.
    pub fn build(bootstrap: Option<&Secret>, snapshot: &Snapshot, local: &LocalChanges) -> Self {
        let mut ring = Self::with_bootstrap(bootstrap);
        for doc in snapshot.of_kind(Kind::Apikey) {
            let k = (doc.tenant.clone(), doc.name.clone());
            if local
                .changes
                .get(&k)
                .is_some_and(|(rev, _)| *rev > snapshot.revision)
            {
                continue;
            }
            match KeyEntry::from_document(doc) {
                Ok(entry) => ring.insert(entry),
                Err(e) => tracing::warn!(
                    tenant = %doc.tenant,
                    key_id = %doc.name,
                    error = %e,
                    "ignoring an unusable apikey document"
                ),
            }
        }
        for (rev, entry) in local.changes.values() {
            if *rev > snapshot.revision
                && let Some(entry) = entry
            {
                ring.insert(entry.clone());
            }
        }
        ring
    }

    /// Number of keys, the bootstrap key included.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Authenticates a request by its `Authorization: Bearer <key>` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&KeyEntry, Problem> {
        let key = bearer(headers)?;
        self.lookup(key, OffsetDateTime::now_utc())
    }

    /// The entry of `key` if it is known and not expired at `now`. The lookup is by
    /// digest, so its timing says nothing about the key itself.
    pub fn lookup(&self, key: &str, now: OffsetDateTime) -> Result<&KeyEntry, Problem> {
        let entry = self
            .keys
            .get(&digest(key))
            .ok_or_else(|| Problem::unauthenticated("the API key is not valid"))?;
        if let Some(exp) = entry.expires_at
            && exp <= now
        {
            return Err(Problem::unauthenticated(format!(
                "the API key `{}` expired at {}",
                entry.id,
                exp.format(&Rfc3339).unwrap_or_default()
            )));
        }
        Ok(entry)
    }
}

/// Where the key ring comes from: the bootstrap key, the latest config snapshot and
/// this gateway's own changes. Every change rebuilds the ring and swaps it in.
pub struct KeySource {
    bootstrap: Option<Secret>,
    ring: Arc<ArcSwap<KeyRing>>,
    inner: Mutex<(Arc<Snapshot>, LocalChanges)>,
}

impl KeySource {
    pub fn new(bootstrap: Option<Secret>) -> Self {
        let ring = Arc::new(ArcSwap::from_pointee(KeyRing::with_bootstrap(
            bootstrap.as_ref(),
        )));
        Self {
            bootstrap,
            ring,
            inner: Mutex::new((Arc::new(Snapshot::default()), LocalChanges::default())),
        }
    }

    /// The ring in use; cheap to load on every request.
    pub fn ring(&self) -> &Arc<ArcSwap<KeyRing>> {
        &self.ring
    }

    fn rebuild(&self, f: impl FnOnce(&mut (Arc<Snapshot>, LocalChanges))) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner);
        let (snap, local) = &mut *inner;
        local.prune(snap.revision);
        let ring = KeyRing::build(self.bootstrap.as_ref(), snap, local);
        self.ring.store(Arc::new(ring));
    }

    /// A new config snapshot arrived.
    pub fn apply_snapshot(&self, snapshot: Arc<Snapshot>) {
        self.rebuild(|inner| inner.0 = snapshot);
    }

    /// This gateway stored a key at store `revision`.
    pub fn created(&self, revision: i64, entry: KeyEntry) {
        self.rebuild(|inner| inner.1.created(revision, entry));
    }

    /// This gateway deleted a key at store `revision`.
    pub fn revoked(&self, revision: i64, tenant: &str, id: &str) {
        self.rebuild(|inner| inner.1.revoked(revision, tenant, id));
    }
}

fn bootstrap_entry(key: &Secret) -> KeyEntry {
    KeyEntry {
        id: "bootstrap".into(),
        digest: digest(key.expose()),
        principal: Arc::new(Principal {
            tenant: TenantId::parse(DEFAULT_TENANT).expect("valid tenant"),
            subject: "key:bootstrap".into(),
            roles: vec![Role::Admin],
        }),
        expires_at: None,
        rpm: None,
        tpm: None,
        budget_usd_month: None,
    }
}

/// The bearer token of a request.
pub fn bearer(headers: &HeaderMap) -> Result<&str, Problem> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            Problem::unauthenticated("send an API key as `Authorization: Bearer <key>`")
        })?;
    let value = value
        .to_str()
        .map_err(|_| Problem::unauthenticated("the Authorization header is not valid ASCII"))?;
    Ok(value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            Problem::unauthenticated("the Authorization header must use the Bearer scheme")
        })?
        .trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(tenant: &str, name: &str, spec: serde_json::Value) -> Document {
        Document {
            tenant: tenant.into(),
            kind: Kind::Apikey as i32,
            name: name.into(),
            spec_json: spec.to_string(),
            ..Default::default()
        }
    }

    fn snapshot(revision: i64, docs: Vec<Document>) -> Snapshot {
        Snapshot {
            revision,
            documents: docs
                .into_iter()
                .map(|d| ((d.kind, d.tenant.clone(), d.name.clone()), d))
                .collect(),
        }
    }

    fn spec(key: &str, tenant: &str, roles: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "key_sha256": hex::encode(digest(key)),
            "tenant": tenant,
            "roles": roles,
            "expires_at": null,
        })
    }

    #[test]
    fn accepts_only_the_right_key() {
        let ring = KeyRing::with_bootstrap(Some(&Secret::new("cm_secret")));
        let mut h = HeaderMap::new();
        assert_eq!(ring.authenticate(&h).unwrap_err().status, 401);
        h.insert("authorization", "Bearer cm_wrong".parse().unwrap());
        assert_eq!(ring.authenticate(&h).unwrap_err().status, 401);
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(ring.authenticate(&h).unwrap_err().status, 401);
        h.insert("authorization", "Bearer cm_secret".parse().unwrap());
        let entry = ring.authenticate(&h).unwrap();
        assert_eq!(entry.principal.tenant.as_str(), "default");
        assert!(entry.principal.has_role(Role::Admin));
        assert!(!format!("{entry:?}").contains("cm_secret"));
    }

    #[test]
    fn builds_keys_from_documents_and_skips_bad_ones() {
        let snap = snapshot(
            5,
            vec![
                doc("acme", "k1", spec("cm_a", "acme", &["developer"])),
                // tenant in the body differs from the document's tenant
                doc("acme", "k2", spec("cm_b", "globex", &["admin"])),
                doc("acme", "k3", spec("cm_c", "acme", &["root"])),
                doc(
                    "acme",
                    "k4",
                    serde_json::json!({"key_sha256": "zz", "tenant": "acme", "roles": ["viewer"]}),
                ),
                doc("acme", "k5", spec("cm_e", "acme", &[])),
            ],
        );
        let ring = KeyRing::build(
            Some(&Secret::new("cm_bootstrap")),
            &snap,
            &LocalChanges::default(),
        );
        assert_eq!(ring.len(), 2);
        let now = OffsetDateTime::now_utc();
        let e = ring.lookup("cm_a", now).unwrap();
        assert_eq!(e.id, "k1");
        assert_eq!(e.principal.subject, "key:k1");
        assert_eq!(e.principal.tenant.as_str(), "acme");
        assert_eq!(e.principal.roles, vec![Role::Developer]);
        for bad in ["cm_b", "cm_c", "cm_e"] {
            assert_eq!(ring.lookup(bad, now).unwrap_err().status, 401, "{bad}");
        }
    }

    #[test]
    fn refuses_expired_keys_at_once() {
        let mut s = spec("cm_x", "acme", &["viewer"]);
        s["expires_at"] = "2030-01-01T00:00:00Z".into();
        let ring = KeyRing::build(
            None,
            &snapshot(1, vec![doc("acme", "kx", s)]),
            &LocalChanges::default(),
        );
        let before = OffsetDateTime::parse("2029-12-31T23:59:59Z", &Rfc3339).unwrap();
        let at = OffsetDateTime::parse("2030-01-01T00:00:00Z", &Rfc3339).unwrap();
        assert_eq!(ring.lookup("cm_x", before).unwrap().id, "kx");
        let p = ring.lookup("cm_x", at).unwrap_err();
        assert_eq!(p.status, 401);
        assert_eq!(p.detail, "the API key `kx` expired at 2030-01-01T00:00:00Z");
    }

    #[test]
    fn local_changes_win_over_older_snapshots_only() {
        let old = snapshot(
            10,
            vec![doc("acme", "k1", spec("cm_a", "acme", &["viewer"]))],
        );
        let mut local = LocalChanges::default();
        local.revoked(11, "acme", "k1");
        let created =
            KeyEntry::from_document(&doc("acme", "k2", spec("cm_b", "acme", &["viewer"]))).unwrap();
        local.created(12, created);
        let now = OffsetDateTime::now_utc();
        let ring = KeyRing::build(None, &old, &local);
        assert!(ring.lookup("cm_a", now).is_err(), "revoked locally");
        assert_eq!(ring.lookup("cm_b", now).unwrap().id, "k2");
        // A snapshot that has both changes makes them redundant.
        let new = snapshot(
            12,
            vec![doc("acme", "k2", spec("cm_b", "acme", &["viewer"]))],
        );
        local.prune(new.revision);
        let ring = KeyRing::build(None, &new, &local);
        assert!(ring.lookup("cm_a", now).is_err());
        assert_eq!(ring.lookup("cm_b", now).unwrap().id, "k2");
        assert_eq!(ring.len(), 1);
    }

    #[test]
    fn generated_keys_are_long_and_distinct() {
        let (a, b) = (generate_key(), generate_key());
        assert_eq!(a.len(), 3 + 64);
        assert!(a.starts_with("cm_"));
        assert_ne!(a, b);
    }
}
