//! The authorisation layer of every gRPC server: the caller's SPIFFE identity must be
//! on the method's allow-list, and principal metadata is accepted only from callers
//! allowed to assert it. Deny by default.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use tower::{Layer, Service};

use crate::identity::{PeerInfo, SpiffeId};
use crate::mesh::{OPEN_GRPC_SERVICES, Service as MeshService};
use crate::principal::Principal;

/// The caller's verified identity, inserted into request extensions.
#[derive(Debug, Clone)]
pub struct Caller(pub SpiffeId);

#[derive(Debug)]
struct Policy {
    service: MeshService,
    trust_domain: String,
}

#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    pub fn new(service: MeshService, trust_domain: &str) -> Self {
        Self {
            policy: Arc::new(Policy {
                service,
                trust_domain: trust_domain.to_owned(),
            }),
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
}

/// Why a call was refused; becomes `PERMISSION_DENIED`.
fn check(
    policy: &Policy,
    path: &str,
    peer: Option<&PeerInfo>,
    headers: &http::HeaderMap,
) -> Result<Option<(SpiffeId, Option<Principal>)>, String> {
    let grpc_service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let identity = peer.and_then(|p| p.identity.as_ref());
    if OPEN_GRPC_SERVICES.contains(&grpc_service) {
        // Any certificate from the mesh CA (the handshake checked the chain).
        return Ok(identity.map(|id| (id.clone(), None)));
    }
    let Some(id) = identity else {
        return Err("the client certificate carries no SPIFFE identity".into());
    };
    if id.trust_domain() != policy.trust_domain {
        return Err(format!(
            "identity {id} is outside trust domain {}",
            policy.trust_domain
        ));
    }
    let allowed = policy
        .service
        .allow_list()
        .iter()
        .find(|(method, _)| *method == path)
        .is_some_and(|(_, callers)| callers.contains(&id.name()));
    if !allowed {
        return Err(format!("{id} may not call {path}"));
    }
    let principal = Principal::from_headers(headers).map_err(|e| e.to_string())?;
    if principal.is_some() && !policy.service.principal_asserters().contains(&id.name()) {
        return Err(format!("{id} may not act on behalf of an end user"));
    }
    Ok(Some((id.clone(), principal)))
}

impl<S, B> Service<Request<B>> for Authz<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        match check(
            &self.policy,
            &path,
            req.extensions().get::<PeerInfo>(),
            req.headers(),
        ) {
            Ok(found) => {
                if let Some((id, principal)) = found {
                    req.extensions_mut().insert(Caller(id));
                    if let Some(p) = principal {
                        req.extensions_mut().insert(p);
                    }
                }
                // Swap in the clone that was driven to readiness (tower's contract).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                inner.call(req).boxed()
            }
            Err(reason) => {
                tracing::warn!(method = %path, %reason, "permission denied");
                let status = tonic::Status::permission_denied(reason);
                futures::future::ready(Ok(status.into_http())).boxed()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> PeerInfo {
        PeerInfo {
            remote_addr: None,
            identity: Some(id.parse().unwrap()),
        }
    }

    #[test]
    fn enforces_allow_list_and_asserters() {
        let policy = Policy {
            service: MeshService::Audit,
            trust_domain: "crewmesh.local".into(),
        };
        let h = http::HeaderMap::new();
        let append = "/crewmesh.audit.v1.AuditService/Append";
        let query = "/crewmesh.audit.v1.AuditService/Query";
        assert!(
            check(
                &policy,
                append,
                Some(&peer("spiffe://crewmesh.local/router")),
                &h
            )
            .is_ok()
        );
        assert!(
            check(
                &policy,
                query,
                Some(&peer("spiffe://crewmesh.local/router")),
                &h
            )
            .is_err()
        );
        assert!(
            check(
                &policy,
                append,
                Some(&peer("spiffe://other.domain/router")),
                &h
            )
            .is_err()
        );
        assert!(
            check(
                &policy,
                "/crewmesh.audit.v1.AuditService/Nope",
                Some(&peer("spiffe://crewmesh.local/gateway")),
                &h
            )
            .is_err()
        );
        assert!(check(&policy, append, None, &h).is_err());
        assert!(check(&policy, "/grpc.health.v1.Health/Check", None, &h).is_ok());

        let mut with_principal = http::HeaderMap::new();
        with_principal.insert("x-crewmesh-tenant", "acme".parse().unwrap());
        with_principal.insert("x-crewmesh-subject", "key:1".parse().unwrap());
        assert!(
            check(
                &policy,
                query,
                Some(&peer("spiffe://crewmesh.local/gateway")),
                &with_principal
            )
            .is_ok()
        );
        assert!(
            check(
                &policy,
                append,
                Some(&peer("spiffe://crewmesh.local/router")),
                &with_principal
            )
            .is_err()
        );
    }
}
