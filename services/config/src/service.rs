//! The `crewmesh.config.v1.ConfigService` handlers: request checking, who may read
//! and write which scope, and audit records of every change.
//!
//! The mesh authorisation layer has already checked the caller's identity against the
//! per-RPC allow-list; the rules here decide what an allowed caller may touch:
//!
//! | scope | read (Get, List) | write (Put, Delete) |
//! |---|---|---|
//! | `SCOPE_TENANT` | the principal's tenant | principal with role admin or operator |
//! | `SCOPE_GLOBAL` | anyone | principal with role admin, or the `cli` identity without a principal |
//! | `SCOPE_ALL` | List only, callers without a principal (mesh services) | never |

use std::time::SystemTime;

use crewmesh_kit::authz::Caller;
use crewmesh_kit::clients::AuditClient;
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::principal::{Principal, Role, principal_of};
use crewmesh_kit::status::{not_implemented, to_status};
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::config::v1 as pb;
use crewmesh_proto::config::v1::Scope;
use crewmesh_proto::config::v1::config_service_server::ConfigService;
use crewmesh_proto::types::v1::Outcome;
use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

use crate::document::{DocKey, DocKind, DocName, DocValue, Owner};
use crate::error::{ConfigServiceError, Result};
use crate::spec::parse_spec;
use crate::store::{ListFilter, ListQuery, SharedStore};

/// The workload name of the operator CLI's certificate.
pub const CLI_IDENTITY: &str = "cli";

/// Who is calling: the end user the call acts for (if any) and the calling workload.
#[derive(Debug, Clone, Default)]
pub struct CallerInfo {
    pub principal: Option<Principal>,
    pub identity: Option<SpiffeId>,
}

impl CallerInfo {
    pub fn of<T>(req: &Request<T>) -> Self {
        Self {
            principal: principal_of(req).cloned(),
            identity: req.extensions().get::<Caller>().map(|c| c.0.clone()),
        }
    }
}

/// The documents a read covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadScope {
    One(Owner),
    All,
}

/// Resolves the scope of a read. `SCOPE_ALL` only where `allow_all` (List).
pub fn read_scope(scope: i32, caller: &CallerInfo, allow_all: bool) -> Result<ReadScope> {
    match parse_scope(scope)? {
        Scope::Tenant => caller
            .principal
            .as_ref()
            .map(|p| ReadScope::One(Owner::Tenant(p.tenant.clone())))
            .ok_or_else(|| {
                ConfigServiceError::Unauthenticated(
                    "SCOPE_TENANT reads the caller's tenant: send the principal metadata"
                        .to_owned(),
                )
            }),
        Scope::Global => Ok(ReadScope::One(Owner::Global)),
        Scope::All if !allow_all => Err(ConfigServiceError::InvalidArgument(
            "SCOPE_ALL is only valid for List; address one document with SCOPE_TENANT or SCOPE_GLOBAL"
                .to_owned(),
        )),
        Scope::All if caller.principal.is_some() => Err(ConfigServiceError::InvalidArgument(
            "SCOPE_ALL is for mesh services reading every tenant; a call on behalf of an end user uses SCOPE_TENANT or SCOPE_GLOBAL"
                .to_owned(),
        )),
        Scope::All => Ok(ReadScope::All),
        // parse_scope refuses SCOPE_UNSPECIFIED.
        Scope::Unspecified => Err(ConfigServiceError::InvalidArgument(
            "scope is required".to_owned(),
        )),
    }
}

/// The owner a write goes to, and who is writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub owner: Owner,
    /// The principal's subject, or the calling workload's SPIFFE id.
    pub actor: String,
}

/// Resolves the scope of a write and checks the caller may write there.
pub fn write_scope(scope: i32, caller: &CallerInfo) -> Result<Writer> {
    let scope = parse_scope(scope)?;
    if scope == Scope::All {
        return Err(ConfigServiceError::InvalidArgument(
            "a write addresses one document: use SCOPE_TENANT or SCOPE_GLOBAL, not SCOPE_ALL"
                .to_owned(),
        ));
    }
    match (&caller.principal, &caller.identity) {
        (Some(p), _) => {
            if !(p.has_role(Role::Admin) || p.has_role(Role::Operator)) {
                return Err(ConfigServiceError::PermissionDenied(
                    "changing config needs the admin or operator role".to_owned(),
                ));
            }
            let owner = if scope == Scope::Global {
                if !p.has_role(Role::Admin) {
                    return Err(ConfigServiceError::PermissionDenied(
                        "changing _global documents needs the admin role".to_owned(),
                    ));
                }
                Owner::Global
            } else {
                Owner::Tenant(p.tenant.clone())
            };
            Ok(Writer {
                owner,
                actor: p.subject.clone(),
            })
        }
        (None, Some(id)) if id.name() == CLI_IDENTITY => {
            if scope == Scope::Global {
                Ok(Writer {
                    owner: Owner::Global,
                    actor: id.uri(),
                })
            } else {
                Err(ConfigServiceError::PermissionDenied(
                    "without a principal the cli identity may only change _global documents (SCOPE_GLOBAL)"
                        .to_owned(),
                ))
            }
        }
        (None, _) => Err(ConfigServiceError::PermissionDenied(
            "changing config needs a principal with the admin or operator role".to_owned(),
        )),
    }
}

fn parse_scope(scope: i32) -> Result<Scope> {
    match Scope::try_from(scope) {
        Ok(Scope::Unspecified) => Err(ConfigServiceError::InvalidArgument(
            "scope is required: SCOPE_TENANT, SCOPE_GLOBAL or SCOPE_ALL".to_owned(),
        )),
        Ok(s) => Ok(s),
        Err(_) => Err(ConfigServiceError::InvalidArgument(format!(
            "scope {scope} is not a known scope"
        ))),
    }
}

fn now_micros() -> i64 {
    crewmesh_proto::time::to_micros(&crewmesh_proto::time::to_timestamp(SystemTime::now()))
}

/// The gRPC service.
#[derive(Clone)]
pub struct ConfigApi {
    store: SharedStore,
    audit: Option<AuditClient>,
}

impl ConfigApi {
    pub fn new(store: SharedStore, audit: Option<AuditClient>) -> Self {
        Self { store, audit }
    }

    #[tracing::instrument(skip_all, fields(kind = r.kind, name = %r.name))]
    async fn get_doc(&self, caller: CallerInfo, r: pb::GetRequest) -> Result<pb::GetResponse> {
        let kind = DocKind::require(r.kind)?;
        let name = DocName::parse(&r.name)?;
        let ReadScope::One(owner) = read_scope(r.scope, &caller, false)? else {
            return Err(ConfigServiceError::InvalidArgument(
                "SCOPE_ALL is only valid for List".to_owned(),
            ));
        };
        let key = DocKey::new(owner, kind, name);
        match self.store.get(&key).await? {
            Some(doc) => Ok(pb::GetResponse {
                document: Some(doc.to_proto()),
            }),
            None => Err(ConfigServiceError::NotFound(key.to_string())),
        }
    }

    #[tracing::instrument(skip_all, fields(scope = r.scope, kind = r.kind))]
    async fn list_docs(&self, caller: CallerInfo, r: pb::ListRequest) -> Result<pb::ListResponse> {
        let owner = match read_scope(r.scope, &caller, true)? {
            ReadScope::One(owner) => Some(owner),
            ReadScope::All => None,
        };
        let kind = DocKind::from_proto(r.kind)?;
        let page = r.page.unwrap_or_default();
        let query = ListQuery {
            filter: ListFilter { owner, kind },
            page_token: page.page_token,
            page_size: usize::try_from(page.page_size).unwrap_or(usize::MAX),
        };
        let page = self.store.list(&query).await?;
        Ok(pb::ListResponse {
            documents: page.documents.iter().map(|d| d.to_proto()).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            revision: page.revision,
        })
    }

    #[tracing::instrument(skip_all, fields(kind = r.kind, name = %r.name, expected_version = ?r.expected_version))]
    async fn put_doc(
        &self,
        caller: CallerInfo,
        request_id: String,
        r: pb::PutRequest,
    ) -> Result<pb::PutResponse> {
        let writer = write_scope(r.scope, &caller)?;
        let kind = DocKind::require(r.kind)?;
        let name = DocName::parse(&r.name)?;
        let spec = parse_spec(kind, &r.spec_json)?;
        let key = DocKey::new(writer.owner.clone(), kind, name);
        let value = DocValue {
            spec,
            updated_by: writer.actor.clone(),
            updated_at_micros: now_micros(),
        };
        let doc = self.store.put(&key, &value, r.expected_version).await?;
        tracing::info!(key = %key, version = doc.version, actor = %writer.actor, "config document written");
        self.record("config.put", &writer, &key, doc.version, request_id);
        Ok(pb::PutResponse {
            document: Some(doc.to_proto()),
        })
    }

    #[tracing::instrument(skip_all, fields(kind = r.kind, name = %r.name, expected_version = ?r.expected_version))]
    async fn delete_doc(
        &self,
        caller: CallerInfo,
        request_id: String,
        r: pb::DeleteRequest,
    ) -> Result<pb::DeleteResponse> {
        let writer = write_scope(r.scope, &caller)?;
        let kind = DocKind::require(r.kind)?;
        let name = DocName::parse(&r.name)?;
        let key = DocKey::new(writer.owner.clone(), kind, name);
        let revision = self.store.delete(&key, r.expected_version).await?;
        tracing::info!(key = %key, revision, actor = %writer.actor, "config document deleted");
        self.record("config.delete", &writer, &key, revision, request_id);
        Ok(pb::DeleteResponse { revision })
    }

    /// Queues the audit event of a successful change (no document content: specs may
    /// name secrets).
    fn record(
        &self,
        action: &str,
        writer: &Writer,
        key: &DocKey,
        version: i64,
        request_id: String,
    ) {
        let Some(audit) = &self.audit else {
            return;
        };
        audit.record(audit::EventInput {
            tenant: key.owner.as_str().to_owned(),
            actor: Some(audit::Actor {
                subject: writer.actor.clone(),
                service: String::new(),
            }),
            action: action.to_owned(),
            resource: Some(audit::Resource {
                kind: key.kind.as_str().to_owned(),
                name: key.name.as_str().to_owned(),
            }),
            outcome: Outcome::Success as i32,
            request_id,
            details_json: serde_json::json!({ "version": version }).to_string(),
            ..Default::default()
        });
    }
}

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .unwrap_or_default()
        .to_owned()
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let caller = CallerInfo::of(&request);
        self.get_doc(caller, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = CallerInfo::of(&request);
        self.list_docs(caller, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let caller = CallerInfo::of(&request);
        let request_id = request_id(&request);
        self.put_doc(caller, request_id, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let caller = CallerInfo::of(&request);
        let request_id = request_id(&request);
        self.delete_doc(caller, request_id, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }

    async fn apply(
        &self,
        _request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        Err(not_implemented("crewmesh.config.v1.ConfigService/Apply"))
    }

    type WatchStream = BoxStream<'static, Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(not_implemented("crewmesh.config.v1.ConfigService/Watch"))
    }

    async fn history(
        &self,
        _request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        Err(not_implemented("crewmesh.config.v1.ConfigService/History"))
    }

    async fn rollback(
        &self,
        _request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        Err(not_implemented("crewmesh.config.v1.ConfigService/Rollback"))
    }

    async fn evaluate_flags(
        &self,
        _request: Request<pb::EvaluateFlagsRequest>,
    ) -> Result<Response<pb::EvaluateFlagsResponse>, Status> {
        Err(not_implemented(
            "crewmesh.config.v1.ConfigService/EvaluateFlags",
        ))
    }
}

#[cfg(test)]
mod tests {
    use crewmesh_kit::principal::TenantId;
    use crewmesh_kit::status::{ErrorClass, ServiceError};

    use super::*;

    fn user(roles: &[Role]) -> CallerInfo {
        CallerInfo {
            principal: Some(Principal {
                tenant: TenantId::parse("acme").unwrap(),
                subject: "key:k1".into(),
                roles: roles.to_vec(),
            }),
            identity: Some(SpiffeId::new("crewmesh.local", "gateway").unwrap()),
        }
    }

    fn service(name: &str) -> CallerInfo {
        CallerInfo {
            principal: None,
            identity: Some(SpiffeId::new("crewmesh.local", name).unwrap()),
        }
    }

    fn class<T: std::fmt::Debug>(r: Result<T>) -> ErrorClass {
        r.unwrap_err().class()
    }

    const T: i32 = Scope::Tenant as i32;
    const G: i32 = Scope::Global as i32;
    const A: i32 = Scope::All as i32;

    #[test]
    fn read_scopes() {
        let acme = Owner::Tenant(TenantId::parse("acme").unwrap());
        let viewer = user(&[Role::Viewer]);
        assert_eq!(read_scope(T, &viewer, true).unwrap(), ReadScope::One(acme));
        assert_eq!(
            read_scope(G, &viewer, false).unwrap(),
            ReadScope::One(Owner::Global)
        );
        assert_eq!(
            class(read_scope(A, &viewer, true)),
            ErrorClass::InvalidArgument
        );
        let router = service("router");
        assert_eq!(read_scope(A, &router, true).unwrap(), ReadScope::All);
        assert_eq!(
            class(read_scope(A, &router, false)),
            ErrorClass::InvalidArgument
        );
        assert_eq!(
            read_scope(G, &router, false).unwrap(),
            ReadScope::One(Owner::Global)
        );
        assert_eq!(
            class(read_scope(T, &router, true)),
            ErrorClass::Unauthenticated
        );
        assert_eq!(
            class(read_scope(0, &router, true)),
            ErrorClass::InvalidArgument
        );
        assert_eq!(
            class(read_scope(42, &router, true)),
            ErrorClass::InvalidArgument
        );
    }

    #[test]
    fn write_scopes() {
        let acme = Owner::Tenant(TenantId::parse("acme").unwrap());
        let operator = user(&[Role::Operator]);
        assert_eq!(
            write_scope(T, &operator).unwrap(),
            Writer {
                owner: acme.clone(),
                actor: "key:k1".into()
            }
        );
        assert_eq!(
            class(write_scope(G, &operator)),
            ErrorClass::PermissionDenied
        );
        let admin = user(&[Role::Viewer, Role::Admin]);
        assert_eq!(write_scope(G, &admin).unwrap().owner, Owner::Global);
        assert_eq!(write_scope(T, &admin).unwrap().owner, acme);
        for weak in [Role::Developer, Role::Viewer, Role::Auditor] {
            assert_eq!(
                class(write_scope(T, &user(&[weak]))),
                ErrorClass::PermissionDenied
            );
        }
        assert_eq!(class(write_scope(A, &admin)), ErrorClass::InvalidArgument);
        assert_eq!(class(write_scope(0, &admin)), ErrorClass::InvalidArgument);

        let cli = service("cli");
        assert_eq!(
            write_scope(G, &cli).unwrap(),
            Writer {
                owner: Owner::Global,
                actor: "spiffe://crewmesh.local/cli".into()
            }
        );
        assert_eq!(class(write_scope(T, &cli)), ErrorClass::PermissionDenied);
        assert_eq!(
            class(write_scope(G, &service("gateway"))),
            ErrorClass::PermissionDenied
        );
        assert_eq!(
            class(write_scope(G, &CallerInfo::default())),
            ErrorClass::PermissionDenied
        );
    }
}
