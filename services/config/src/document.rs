//! Checked domain types for config documents: who owns a document, its kind and name,
//! the key it lives at, and the value stored there.

use std::fmt;

use crewmesh_kit::principal::TenantId;
use crewmesh_proto::config::v1::{self as pb, Kind};
use serde::{Deserialize, Serialize};

use crate::error::ConfigServiceError;

/// The owner segment of documents shared by every tenant.
pub const GLOBAL: &str = "_global";

/// The key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "/crewmesh/v1";

/// Longest document name.
pub const MAX_NAME_LEN: usize = 128;

/// Who a document belongs to: one tenant, or every tenant (`_global`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Global,
    Tenant(TenantId),
}

impl Owner {
    /// `_global` or a tenant id.
    pub fn parse(s: &str) -> Result<Self, ConfigServiceError> {
        if s == GLOBAL {
            return Ok(Owner::Global);
        }
        TenantId::parse(s)
            .map(Owner::Tenant)
            .map_err(|e| ConfigServiceError::InvalidArgument(e.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Owner::Global => GLOBAL,
            Owner::Tenant(t) => t.as_str(),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A document kind (the proto `Kind` without `KIND_UNSPECIFIED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocKind {
    Provider,
    Model,
    Agent,
    Crew,
    Tool,
    Tenant,
    ApiKey,
    Flag,
}

impl DocKind {
    pub const ALL: [DocKind; 8] = [
        DocKind::Provider,
        DocKind::Model,
        DocKind::Agent,
        DocKind::Crew,
        DocKind::Tool,
        DocKind::Tenant,
        DocKind::ApiKey,
        DocKind::Flag,
    ];

    /// The key segment, e.g. `model`.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Provider => "provider",
            DocKind::Model => "model",
            DocKind::Agent => "agent",
            DocKind::Crew => "crew",
            DocKind::Tool => "tool",
            DocKind::Tenant => "tenant",
            DocKind::ApiKey => "apikey",
            DocKind::Flag => "flag",
        }
    }

    pub fn from_segment(s: &str) -> Option<Self> {
        DocKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn to_proto(self) -> Kind {
        match self {
            DocKind::Provider => Kind::Provider,
            DocKind::Model => Kind::Model,
            DocKind::Agent => Kind::Agent,
            DocKind::Crew => Kind::Crew,
            DocKind::Tool => Kind::Tool,
            DocKind::Tenant => Kind::Tenant,
            DocKind::ApiKey => Kind::Apikey,
            DocKind::Flag => Kind::Flag,
        }
    }

    /// `Ok(None)` for `KIND_UNSPECIFIED`; an error for a number no kind has.
    pub fn from_proto(kind: i32) -> Result<Option<Self>, ConfigServiceError> {
        match Kind::try_from(kind) {
            Ok(Kind::Unspecified) => Ok(None),
            Ok(Kind::Provider) => Ok(Some(DocKind::Provider)),
            Ok(Kind::Model) => Ok(Some(DocKind::Model)),
            Ok(Kind::Agent) => Ok(Some(DocKind::Agent)),
            Ok(Kind::Crew) => Ok(Some(DocKind::Crew)),
            Ok(Kind::Tool) => Ok(Some(DocKind::Tool)),
            Ok(Kind::Tenant) => Ok(Some(DocKind::Tenant)),
            Ok(Kind::Apikey) => Ok(Some(DocKind::ApiKey)),
            Ok(Kind::Flag) => Ok(Some(DocKind::Flag)),
            Err(_) => Err(ConfigServiceError::InvalidArgument(format!(
                "kind {kind} is not a known document kind"
            ))),
        }
    }

    /// Like [`DocKind::from_proto`], but the kind is required.
    pub fn require(kind: i32) -> Result<Self, ConfigServiceError> {
        Self::from_proto(kind)?.ok_or_else(|| {
            ConfigServiceError::InvalidArgument(
                "kind is required: KIND_UNSPECIFIED does not name a document kind".to_owned(),
            )
        })
    }
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A document name: 1-128 characters of `[a-z0-9._-]`, starting with a letter or digit
/// (model aliases such as `gpt-4o-mini` or `sim.small`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocName(String);

impl DocName {
    pub fn parse(s: &str) -> Result<Self, ConfigServiceError> {
        let ok = (1..=MAX_NAME_LEN).contains(&s.len())
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            let shown: String = s.chars().take(MAX_NAME_LEN + 1).collect();
            Err(ConfigServiceError::InvalidArgument(format!(
                "invalid name {shown:?}: use 1-{MAX_NAME_LEN} characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a document lives: owner, kind and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocKey {
    pub owner: Owner,
    pub kind: DocKind,
    pub name: DocName,
}

impl DocKey {
    pub fn new(owner: Owner, kind: DocKind, name: DocName) -> Self {
        Self { owner, kind, name }
    }

    /// The store key under `prefix`.
    pub fn path(&self, prefix: &str) -> String {
        document_key(prefix, &self.owner, self.kind, &self.name)
    }

    /// Parses a store key under `prefix`; `None` when it is not a document key.
    pub fn from_path(prefix: &str, path: &str) -> Option<Self> {
        let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let (owner, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            owner: Owner::parse(owner).ok()?,
            kind: DocKind::from_segment(kind)?,
            name: DocName::parse(name).ok()?,
        })
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.owner, self.kind, self.name)
    }
}

/// The store key of a document: `<prefix>/<tenant or _global>/<kind>/<name>`.
pub fn document_key(prefix: &str, owner: &Owner, kind: DocKind, name: &DocName) -> String {
    format!("{prefix}/{owner}/{kind}/{name}")
}

/// The value stored at a document's key, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocValue {
    pub spec: serde_json::Map<String, serde_json::Value>,
    pub updated_by: String,
    pub updated_at_micros: i64,
}

impl DocValue {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A map of JSON values always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(key: &str, bytes: &[u8]) -> Result<Self, ConfigServiceError> {
        serde_json::from_slice(bytes).map_err(|e| ConfigServiceError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// A document as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDoc {
    pub key: DocKey,
    pub value: DocValue,
    /// The store revision of the document's last change.
    pub version: i64,
    /// The store revision that created the document.
    pub create_version: i64,
}

impl StoredDoc {
    pub fn to_proto(&self) -> pb::Document {
        pb::Document {
            tenant: self.key.owner.as_str().to_owned(),
            kind: self.key.kind.to_proto() as i32,
            name: self.key.name.as_str().to_owned(),
            spec_json: serde_json::Value::Object(self.value.spec.clone()).to_string(),
            version: self.version,
            create_version: self.create_version,
            updated_at: Some(crewmesh_proto::time::from_micros(
                self.value.updated_at_micros,
            )),
            updated_by: self.value.updated_by.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_aliases_and_reject_the_rest() {
        for ok in ["gpt-4o-mini", "sim.small", "a", "0x_y", &"a".repeat(128)] {
            assert_eq!(DocName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "a/b",
            "a b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(DocName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn keys_round_trip() {
        let key = DocKey::new(
            Owner::Tenant(TenantId::parse("acme").unwrap()),
            DocKind::Model,
            DocName::parse("gpt-4o-mini").unwrap(),
        );
        let path = key.path("/crewmesh/v1");
        assert_eq!(path, "/crewmesh/v1/acme/model/gpt-4o-mini");
        assert_eq!(DocKey::from_path("/crewmesh/v1", &path), Some(key));
        let global = DocKey::new(
            Owner::Global,
            DocKind::ApiKey,
            DocName::parse("k1").unwrap(),
        );
        assert_eq!(global.path("/p"), "/p/_global/apikey/k1");
        assert_eq!(
            DocKey::from_path("/p", "/p/_global/apikey/k1"),
            Some(global)
        );
        for bad in [
            "/p/_global/apikey",
            "/p/_global/apikey/k1/x",
            "/p/_global/nokind/k1",
            "/px/_global/apikey/k1",
            "/p/Acme/model/m",
        ] {
            assert_eq!(DocKey::from_path("/p", bad), None, "{bad}");
        }
    }

    #[test]
    fn kinds_map_to_proto_and_back() {
        for kind in DocKind::ALL {
            assert_eq!(
                DocKind::from_proto(kind.to_proto() as i32).unwrap(),
                Some(kind)
            );
            assert_eq!(DocKind::from_segment(kind.as_str()), Some(kind));
        }
        assert_eq!(DocKind::from_proto(0).unwrap(), None);
        assert!(DocKind::require(0).is_err());
        assert!(DocKind::from_proto(99).is_err());
    }
}
