//! Authorisation: what each role may do. Every route of the API needs one
//! [`Permission`] ([`required`]); a principal holds it when one of its roles grants it
//! ([`grants`]). The matrix is documented in docs/security.md; a test keeps the two in
//! step.

use axum::http::Method;
use crewmesh_kit::principal::{Principal, Role};

/// One thing a caller may do through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// `GET /v1/models`.
    ModelsRead,
    /// `POST /v1/chat/completions`.
    ModelsInvoke,
    /// Read agents, runs and crews.
    RunsRead,
    /// Start, cancel and approve runs and crews; change agents.
    RunsWrite,
    /// Read config documents and flags.
    ConfigRead,
    /// Change config documents and flags.
    ConfigWrite,
    /// Evaluate flags (OFREP).
    FlagsEvaluate,
    /// Read the audit trail.
    AuditRead,
    /// Read usage and spend.
    UsageRead,
    /// List API keys (never their secrets or digests).
    KeysRead,
    /// Create and revoke API keys.
    KeysWrite,
}

impl Permission {
    pub const ALL: [Permission; 11] = [
        Permission::ModelsRead,
        Permission::ModelsInvoke,
        Permission::RunsRead,
        Permission::RunsWrite,
        Permission::ConfigRead,
        Permission::ConfigWrite,
        Permission::FlagsEvaluate,
        Permission::AuditRead,
        Permission::UsageRead,
        Permission::KeysRead,
        Permission::KeysWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ModelsRead => "models:read",
            Permission::ModelsInvoke => "models:invoke",
            Permission::RunsRead => "runs:read",
            Permission::RunsWrite => "runs:write",
            Permission::ConfigRead => "config:read",
            Permission::ConfigWrite => "config:write",
            Permission::FlagsEvaluate => "flags:evaluate",
            Permission::AuditRead => "audit:read",
            Permission::UsageRead => "usage:read",
            Permission::KeysRead => "keys:read",
            Permission::KeysWrite => "keys:write",
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The permission matrix.
pub fn role_grants(role: Role, perm: Permission) -> bool {
    use Permission as P;
    match role {
        Role::Admin => true,
        Role::Operator => !matches!(perm, P::AuditRead | P::KeysWrite),
        Role::Developer => matches!(
            perm,
            P::ModelsRead
                | P::ModelsInvoke
                | P::RunsRead
                | P::RunsWrite
                | P::ConfigRead
                | P::FlagsEvaluate
                | P::UsageRead
        ),
        Role::Auditor => matches!(
            perm,
            P::ModelsRead | P::RunsRead | P::ConfigRead | P::AuditRead | P::UsageRead | P::KeysRead
        ),
        Role::Viewer => matches!(
            perm,
            P::ModelsRead | P::RunsRead | P::ConfigRead | P::FlagsEvaluate | P::UsageRead
        ),
    }
}

/// Whether any of the principal's roles grants `perm`.
pub fn grants(principal: &Principal, perm: Permission) -> bool {
    principal.roles.iter().any(|r| role_grants(*r, perm))
}

/// The permission a route needs, from its method, matched path template and actual
/// path. `None` for paths outside the API (answered 404 without authentication).
/// API key documents are keys: reading or changing them through the config routes
/// needs the key permissions, so an operator cannot mint an admin key.
pub fn required(method: &Method, route: &str, path: &str) -> Option<Permission> {
    use Permission as P;
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let under = |prefix: &str| {
        route
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let perm = if route == "/v1/chat/completions" {
        P::ModelsInvoke
    } else if under("/v1/models") {
        P::ModelsRead
    } else if under("/v1/keys") {
        if read { P::KeysRead } else { P::KeysWrite }
    } else if under("/v1/usage") {
        P::UsageRead
    } else if under("/v1/audit") {
        P::AuditRead
    } else if under("/ofrep/v1") {
        P::FlagsEvaluate
    } else if path == "/v1/config/apikey" || path.starts_with("/v1/config/apikey/") {
        if read { P::KeysRead } else { P::KeysWrite }
    } else if under("/v1/config") || under("/v1/flags") {
        if read { P::ConfigRead } else { P::ConfigWrite }
    } else if under("/v1/runs") || under("/v1/agents") || under("/v1/crews") {
        if read { P::RunsRead } else { P::RunsWrite }
    } else if route.starts_with("/v1/") {
        // Any API route not listed above is for admins until it is classified.
        P::KeysWrite
    } else {
        return None;
    };
    Some(perm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_matches_the_documented_table() {
        // The table in docs/security.md, row by row: Y = granted.
        let doc = include_str!("../../docs/security.md");
        let mut rows = 0;
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 8 {
                continue;
            }
            let Some(perm) = Permission::ALL
                .into_iter()
                .find(|p| cells[1] == format!("`{}`", p.as_str()))
            else {
                continue;
            };
            rows += 1;
            for (i, role) in Role::ALL.into_iter().enumerate() {
                let documented = cells[2 + i] == "Y";
                assert_eq!(
                    documented,
                    role_grants(role, perm),
                    "{perm} for {}",
                    role.as_str()
                );
            }
        }
        assert_eq!(rows, Permission::ALL.len());
    }

    #[test]
    fn routes_map_to_permissions() {
        let cases = [
            (
                Method::POST,
                "/v1/chat/completions",
                Some(Permission::ModelsInvoke),
            ),
            (Method::GET, "/v1/models", Some(Permission::ModelsRead)),
            (Method::GET, "/v1/keys", Some(Permission::KeysRead)),
            (Method::POST, "/v1/keys", Some(Permission::KeysWrite)),
            (Method::DELETE, "/v1/keys/{id}", Some(Permission::KeysWrite)),
            (Method::GET, "/v1/usage", Some(Permission::UsageRead)),
            (Method::GET, "/v1/audit/events", Some(Permission::AuditRead)),
            (
                Method::POST,
                "/ofrep/v1/evaluate/flags",
                Some(Permission::FlagsEvaluate),
            ),
            (
                Method::GET,
                "/v1/config/{kind}",
                Some(Permission::ConfigRead),
            ),
            (
                Method::PUT,
                "/v1/config/{kind}/{name}",
                Some(Permission::ConfigWrite),
            ),
            (Method::POST, "/v1/runs", Some(Permission::RunsWrite)),
            (Method::GET, "/v1/runs/{id}", Some(Permission::RunsRead)),
            (
                Method::POST,
                "/v1/something-new",
                Some(Permission::KeysWrite),
            ),
            (Method::GET, "/v1/keysmith", Some(Permission::KeysWrite)),
            (Method::GET, "/healthz", None),
        ];
        for (m, route, want) in cases {
            assert_eq!(required(&m, route, route), want, "{m} {route}");
        }
        let config = "/v1/config/{kind}/{name}";
        assert_eq!(
            required(&Method::PUT, config, "/v1/config/apikey/k1"),
            Some(Permission::KeysWrite)
        );
        assert_eq!(
            required(&Method::GET, "/v1/config/{kind}", "/v1/config/apikey"),
            Some(Permission::KeysRead)
        );
        assert_eq!(
            required(&Method::PUT, config, "/v1/config/model/m1"),
            Some(Permission::ConfigWrite)
        );
    }

    #[test]
    fn only_admins_manage_keys() {
        for role in Role::ALL {
            assert_eq!(
                role_grants(role, Permission::KeysWrite),
                role == Role::Admin,
                "{}",
                role.as_str()
            );
        }
    }
}
