//! The end user on whose behalf a call is made. The gateway authenticates users and
//! passes their principal to services in gRPC metadata; services accept it only from
//! callers allowed to assert it (see [`crate::mesh::Service::principal_asserters`]).

use tonic::metadata::{MetadataMap, MetadataValue};

pub const TENANT_HEADER: &str = "x-crewmesh-tenant";
pub const SUBJECT_HEADER: &str = "x-crewmesh-subject";
pub const ROLES_HEADER: &str = "x-crewmesh-roles";

/// A tenant id: 1-63 characters of `[a-z0-9-_]`, starting with a letter or digit.
/// `_global` is reserved for shared documents and is not a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrincipalError {
    #[error(
        "invalid tenant id `{0}`: use 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit"
    )]
    Tenant(String),
    #[error("invalid subject: it must be 1-256 printable ASCII characters")]
    Subject,
    #[error("invalid role `{0}`")]
    Role(String),
    #[error("principal metadata is incomplete: {0} is missing")]
    Missing(&'static str),
}

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, PrincipalError> {
        let ok = (1..=63).contains(&s.len())
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(PrincipalError::Tenant(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The roles of the authorisation model, most powerful first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Admin,
    Operator,
    Developer,
    Auditor,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Operator,
        Role::Developer,
        Role::Auditor,
        Role::Viewer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Developer => "developer",
            Role::Auditor => "auditor",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Result<Self, PrincipalError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PrincipalError::Role(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: TenantId,
    /// Who: an API key id (`key:<id>`) or an OIDC subject (`oidc:<sub>`).
    pub subject: String,
    pub roles: Vec<Role>,
}

impl Principal {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Writes the principal into outgoing gRPC metadata.
    pub fn insert_into(&self, md: &mut MetadataMap) {
        let roles = self
            .roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",");
        // All three are validated ASCII, so they are valid metadata values.
        if let Ok(v) = MetadataValue::try_from(self.tenant.as_str()) {
            md.insert(TENANT_HEADER, v);
        }
        if let Ok(v) = MetadataValue::try_from(self.subject.as_str()) {
            md.insert(SUBJECT_HEADER, v);
        }
        if let Ok(v) = MetadataValue::try_from(roles.as_str()) {
            md.insert(ROLES_HEADER, v);
        }
    }

    /// Reads a principal from HTTP/2 headers. `Ok(None)` when no principal header is
    /// present; an error when one is present but the set is incomplete or invalid.
    pub fn from_headers(h: &http::HeaderMap) -> Result<Option<Self>, PrincipalError> {
        // Names built at compile time: a `&str` name is parsed on every lookup.
        const TENANT: http::HeaderName = http::HeaderName::from_static(TENANT_HEADER);
        const SUBJECT: http::HeaderName = http::HeaderName::from_static(SUBJECT_HEADER);
        const ROLES: http::HeaderName = http::HeaderName::from_static(ROLES_HEADER);
        let get = |name| h.get(name).and_then(|v| v.to_str().ok());
        let (tenant, subject, roles) = (get(&TENANT), get(&SUBJECT), get(&ROLES));
        if tenant.is_none() && subject.is_none() && roles.is_none() {
            return Ok(None);
        }
        let tenant = TenantId::parse(tenant.ok_or(PrincipalError::Missing(TENANT_HEADER))?)?;
        let subject = subject.ok_or(PrincipalError::Missing(SUBJECT_HEADER))?;
        if subject.is_empty()
            || subject.len() > 256
            || !subject.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(PrincipalError::Subject);
        }
        let roles = roles
            .unwrap_or("")
            .split(',')
            .filter(|r| !r.is_empty())
            .map(Role::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self {
            tenant,
            subject: subject.to_owned(),
            roles,
        }))
    }
}

/// The principal of a request, as accepted by the authorisation layer.
pub fn principal_of<T>(req: &tonic::Request<T>) -> Option<&Principal> {
    req.extensions().get::<Principal>()
}

/// The principal of a request, or `UNAUTHENTICATED` when the caller sent none.
#[allow(clippy::result_large_err)]
pub fn require_principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    principal_of(req).cloned().ok_or_else(no_principal)
}

/// [`require_principal`] for a request taken apart (`tonic::Request::into_parts`):
/// moves the principal out of its extensions instead of copying it.
#[allow(clippy::result_large_err)]
pub fn take_principal(extensions: &mut tonic::Extensions) -> Result<Principal, tonic::Status> {
    extensions.remove::<Principal>().ok_or_else(no_principal)
}

fn no_principal() -> tonic::Status {
    tonic::Status::unauthenticated("this RPC acts for an end user: send the principal metadata")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_metadata() {
        let p = Principal {
            tenant: TenantId::parse("acme").unwrap(),
            subject: "key:abc".into(),
            roles: vec![Role::Admin, Role::Viewer],
        };
        let mut md = MetadataMap::new();
        p.insert_into(&mut md);
        let headers = md.into_headers();
        assert_eq!(Principal::from_headers(&headers).unwrap(), Some(p));
    }

    #[test]
    fn rejects_partial_or_bad_principals() {
        let mut h = http::HeaderMap::new();
        assert_eq!(Principal::from_headers(&h).unwrap(), None);
        h.insert(TENANT_HEADER, "acme".parse().unwrap());
        assert_eq!(
            Principal::from_headers(&h),
            Err(PrincipalError::Missing(SUBJECT_HEADER))
        );
        h.insert(SUBJECT_HEADER, "u".parse().unwrap());
        h.insert(ROLES_HEADER, "root".parse().unwrap());
        assert_eq!(
            Principal::from_headers(&h),
            Err(PrincipalError::Role("root".into()))
        );
        assert!(TenantId::parse("_global").is_err());
        assert!(TenantId::parse("Acme").is_err());
        assert!(TenantId::parse(&"a".repeat(64)).is_err());
    }
}
