//! Authentication at the edge: bearer API keys, compared by SHA-256 digest in
//! constant time. Keys are never logged; only a short key id is.

use axum::http::HeaderMap;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::settings::Secret;
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// The tenant the bootstrap key acts in.
pub const DEFAULT_TENANT: &str = "default";

/// A known API key, stored as its digest.
#[derive(Clone)]
pub struct KeyEntry {
    pub id: String,
    digest: [u8; 32],
    pub principal: Principal,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The keys the gateway accepts.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: Vec<KeyEntry>,
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl KeyRing {
    /// A ring with the bootstrap admin key (tenant `default`, role admin).
    pub fn with_bootstrap(key: Option<&Secret>) -> Self {
        let mut ring = Self::default();
        if let Some(key) = key {
            ring.keys.push(KeyEntry {
                id: "bootstrap".into(),
                digest: digest(key.expose()),
                principal: Principal {
                    tenant: TenantId::parse(DEFAULT_TENANT).expect("valid tenant"),
                    subject: "key:bootstrap".into(),
                    roles: vec![Role::Admin],
                },
            });
        }
        ring
    }

    /// Authenticates a request by its `Authorization: Bearer <key>` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&KeyEntry, Problem> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Problem::unauthenticated("send an API key as `Authorization: Bearer <key>`")
            })?;
        let value = value
            .to_str()
            .map_err(|_| Problem::unauthenticated("the Authorization header is not valid ASCII"))?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                Problem::unauthenticated("the Authorization header must use the Bearer scheme")
            })?
            .trim();
        let d = digest(key);
        let mut found = None;
        // Compare against every key so timing does not reveal which one matched.
        for entry in &self.keys {
            if constant_time_eq(&entry.digest, &d) {
                found = Some(entry);
            }
        }
        found.ok_or_else(|| Problem::unauthenticated("the API key is not valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
