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

use std::sync::Arc;
use std::time::SystemTime;

use crewmesh_kit::authz::Caller;
use crewmesh_kit::clients::AuditClient;
use crewmesh_kit::identity::SpiffeId;
use crewmesh_kit::principal::{Principal, Role, principal_of};
use crewmesh_kit::status::to_status;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::config::v1 as pb;
use crewmesh_proto::config::v1::Scope;
use crewmesh_proto::config::v1::config_service_server::ConfigService;
use crewmesh_proto::types::v1::Outcome;
use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

use crate::document::{DocKey, DocKind, DocName, DocValue, Owner};
use crate::error::{ConfigServiceError, Result};
use crate::references::View;
use crate::secrets::{Reveal, SecretsKey, present, seal_inline};
use crate::spec::parse_spec;
use crate::store::{ApplyOp, ListFilter, ListQuery, SharedStore, list_all};

/// Versions per History page when the caller asks for 0.
pub const DEFAULT_HISTORY_PAGE: usize = 20;
/// Largest History page.
pub const MAX_HISTORY_PAGE: usize = 100;

/// The workload name of the operator CLI's certificate.
pub const CLI_IDENTITY: &str = "cli";
/// The workload that may read provider secrets decrypted.
pub const ROUTER_IDENTITY: &str = "router";

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

/// API keys grant roles, so only an admin may write them: an operator must not be
/// able to mint a key with more power than its own.
pub fn kind_permission(kind: DocKind, caller: &CallerInfo) -> Result<()> {
    if kind == DocKind::ApiKey
        && let Some(p) = &caller.principal
        && !p.has_role(Role::Admin)
    {
        return Err(ConfigServiceError::PermissionDenied(
            "writing apikey documents needs the admin role".to_owned(),
        ));
    }
    Ok(())
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
    /// Encrypts inline provider secrets; `None`: they are refused.
    secrets: Option<Arc<SecretsKey>>,
    /// Becomes true when the service shuts down: open watches end so that the
    /// server can drain.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl ConfigApi {
    pub fn new(store: SharedStore, audit: Option<AuditClient>) -> Self {
        // A sender that is never used: watches end only with their clients.
        let (_, stopping) = tokio::sync::watch::channel(false);
        Self {
            store,
            audit,
            secrets: None,
            stopping,
        }
    }

    /// Accepts inline provider secrets, encrypted under `secrets`.
    pub fn with_secrets(mut self, secrets: Option<Arc<SecretsKey>>) -> Self {
        self.secrets = secrets;
        self
    }

    /// How stored secrets are shown to `caller`: decrypted only for the router's
    /// identity (it calls the providers), redacted for everyone else.
    fn reveal(&self, caller: &CallerInfo) -> Reveal<'_> {
        let router = caller.principal.is_none()
            && caller
                .identity
                .as_ref()
                .is_some_and(|id| id.name() == ROUTER_IDENTITY);
        if router {
            Reveal::Plain(self.secrets.as_deref())
        } else {
            Reveal::Redacted
        }
    }

    /// Ends open watches when `stopping` becomes true.
    pub fn with_stop_signal(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
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
        kind_permission(kind, &caller)?;
        let name = DocName::parse(&r.name)?;
        let mut spec = parse_spec(kind, &r.spec_json)?;
        let key = DocKey::new(writer.owner.clone(), kind, name);
        seal_inline(self.secrets.as_deref(), &key, &mut spec)?;
        self.check_references(&[(key.clone(), Some(&spec))]).await?;
        let value = DocValue {
            spec,
            updated_by: writer.actor.clone(),
            updated_at_micros: now_micros(),
        };
        let before = self.before(&key).await;
        let doc = self.store.put(&key, &value, r.expected_version).await?;
        tracing::info!(key = %key, version = doc.version, actor = %writer.actor, "config document written");
        self.record(
            "config.put",
            &writer,
            &key,
            doc.version,
            before.as_ref(),
            Some(&value),
            request_id,
        );
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
        kind_permission(kind, &caller)?;
        let name = DocName::parse(&r.name)?;
        let key = DocKey::new(writer.owner.clone(), kind, name);
        self.check_references(&[(key.clone(), None)]).await?;
        let before = self.before(&key).await;
        let revision = self.store.delete(&key, r.expected_version).await?;
        tracing::info!(key = %key, revision, actor = %writer.actor, "config document deleted");
        self.record(
            "config.delete",
            &writer,
            &key,
            revision,
            before.as_ref(),
            None,
            request_id,
        );
        Ok(pb::DeleteResponse { revision })
    }

    #[tracing::instrument(skip_all, fields(kind = r.kind, name = %r.name))]
    async fn history_of(
        &self,
        caller: CallerInfo,
        r: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse> {
        let kind = DocKind::require(r.kind)?;
        let name = DocName::parse(&r.name)?;
        let ReadScope::One(owner) = read_scope(r.scope, &caller, false)? else {
            return Err(ConfigServiceError::InvalidArgument(
                "SCOPE_ALL is only valid for List".to_owned(),
            ));
        };
        let page = r.page.unwrap_or_default();
        let before = if page.page_token.is_empty() {
            0
        } else {
            page.page_token
                .parse::<i64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    ConfigServiceError::InvalidArgument(
                        "invalid page_token: pass the next_page_token of the previous History page"
                            .to_owned(),
                    )
                })?
        };
        let size = match usize::try_from(page.page_size).unwrap_or(usize::MAX) {
            0 => DEFAULT_HISTORY_PAGE,
            n => n.min(MAX_HISTORY_PAGE),
        };
        let key = DocKey::new(owner, kind, name);
        let mut versions = self.store.history(&key, before, size + 1).await?;
        let next_page_token = if versions.len() > size {
            versions.truncate(size);
            versions
                .last()
                .map(|d| d.version.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::HistoryResponse {
            versions: versions.iter().map(|d| d.to_proto()).collect(),
            next_page_token,
        })
    }

    #[tracing::instrument(skip_all, fields(kind = r.kind, name = %r.name, to_version = r.to_version))]
    async fn rollback_doc(
        &self,
        caller: CallerInfo,
        request_id: String,
        r: pb::RollbackRequest,
    ) -> Result<pb::RollbackResponse> {
        let writer = write_scope(r.scope, &caller)?;
        let kind = DocKind::require(r.kind)?;
        kind_permission(kind, &caller)?;
        let name = DocName::parse(&r.name)?;
        if r.to_version <= 0 {
            return Err(ConfigServiceError::InvalidArgument(format!(
                "to_version must be a version from the document's History (got {})",
                r.to_version
            )));
        }
        let key = DocKey::new(writer.owner.clone(), kind, name);
        let old = self
            .store
            .history(&key, r.to_version + 1, 1)
            .await?
            .into_iter()
            .find(|d| d.version == r.to_version)
            .ok_or_else(|| {
                ConfigServiceError::NotFound(format!(
                    "version {} of {key} (see its History for the versions kept)",
                    r.to_version
                ))
            })?;
        // The old body must still pass today's checks, references included.
        crate::spec::check_spec(kind, &old.value.spec)?;
        self.check_references(&[(key.clone(), Some(&old.value.spec))])
            .await?;
        let value = DocValue {
            spec: old.value.spec,
            updated_by: writer.actor.clone(),
            updated_at_micros: now_micros(),
        };
        let before = self.before(&key).await;
        let doc = self.store.put(&key, &value, None).await?;
        tracing::info!(key = %key, version = doc.version, from = r.to_version, actor = %writer.actor, "config document rolled back");
        self.record(
            "config.rollback",
            &writer,
            &key,
            doc.version,
            before.as_ref(),
            Some(&value),
            request_id,
        );
        Ok(pb::RollbackResponse {
            document: Some(doc.to_proto()),
        })
    }

    #[tracing::instrument(skip_all, fields(operations = r.operations.len()))]
    async fn apply_docs(
        &self,
        caller: CallerInfo,
        request_id: String,
        r: pb::ApplyRequest,
    ) -> Result<pb::ApplyResponse> {
        let validate_only = r.validate_only;
        // Check every operation and report every problem before writing anything.
        let mut problems = Vec::new();
        let mut ops = Vec::with_capacity(r.operations.len());
        let mut writers = Vec::with_capacity(r.operations.len());
        for (i, op) in r.operations.into_iter().enumerate() {
            match check_operation(&caller, self.secrets.as_deref(), op) {
                Ok((writer, op)) => {
                    writers.push(writer);
                    ops.push(op);
                }
                Err(e) => problems.push(format!("operations[{i}]: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigServiceError::InvalidArgument(format!(
                "nothing was applied: {}",
                problems.join("; ")
            )));
        }
        crate::store::check_apply(&ops)?;
        let changes: Vec<(DocKey, Option<&serde_json::Map<String, serde_json::Value>>)> = ops
            .iter()
            .map(|op| match op {
                ApplyOp::Put { key, value, .. } => (key.clone(), Some(&value.spec)),
                ApplyOp::Delete { key, .. } => (key.clone(), None),
            })
            .collect();
        let found = self.reference_problems(&changes).await?;
        if !found.is_empty() {
            let dangling = found
                .iter()
                .any(|(_, e)| matches!(e, ConfigServiceError::InvalidSpec { .. }));
            let message = format!(
                "nothing was applied: {}",
                found
                    .iter()
                    .map(|(i, e)| format!("operations[{i}]: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            return Err(if dangling {
                ConfigServiceError::InvalidArgument(message)
            } else {
                ConfigServiceError::FailedPrecondition(message)
            });
        }
        if validate_only {
            return self.validate_versions(&ops).await;
        }
        let mut befores = Vec::with_capacity(ops.len());
        for op in &ops {
            befores.push(self.before(op.key()).await);
        }
        let outcome = self.store.apply(&ops).await?;
        for ((op, writer), before) in ops.iter().zip(&writers).zip(&befores) {
            let (action, after) = match op {
                ApplyOp::Put { value, .. } => ("config.put", Some(value)),
                ApplyOp::Delete { .. } => ("config.delete", None),
            };
            self.record(
                action,
                writer,
                op.key(),
                outcome.revision,
                before.as_ref(),
                after,
                request_id.clone(),
            );
        }
        tracing::info!(
            revision = outcome.revision,
            operations = ops.len(),
            "config apply written"
        );
        Ok(pb::ApplyResponse {
            revision: outcome.revision,
            documents: outcome.documents.iter().map(|d| d.to_proto()).collect(),
        })
    }

    /// Evaluates flags for the caller: `_global` flags, overridden by the principal's
    /// tenant's own flags of the same name.
    #[tracing::instrument(skip_all, fields(keys = r.keys.len()))]
    async fn evaluate(
        &self,
        caller: CallerInfo,
        r: pb::EvaluateFlagsRequest,
    ) -> Result<pb::EvaluateFlagsResponse> {
        let mut owners = vec![Owner::Global];
        if let Some(p) = &caller.principal {
            owners.push(Owner::Tenant(p.tenant.clone()));
        }
        let mut docs = Vec::new();
        for owner in owners {
            let filter = ListFilter {
                owner: Some(owner),
                kind: Some(DocKind::Flag),
            };
            docs.extend(list_all(&*self.store, filter).await?.1);
        }
        let bodies: Vec<(String, String)> = docs
            .iter()
            .map(|d| {
                (
                    d.key.name.as_str().to_owned(),
                    serde_json::Value::Object(d.value.spec.clone()).to_string(),
                )
            })
            .collect();
        let set = crewmesh_kit::flags::FlagSet::from_documents(
            bodies.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let ctx = r.context.unwrap_or_default();
        let ctx = crewmesh_kit::flags::EvaluationContext {
            targeting_key: Some(ctx.targeting_key).filter(|k| !k.is_empty()),
            attributes: ctx
                .attributes
                .as_ref()
                .map(crewmesh_kit::flags::wire::from_struct)
                .unwrap_or_default(),
        };
        let keys = if r.keys.is_empty() {
            set.keys()
        } else {
            r.keys
        };
        Ok(pb::EvaluateFlagsResponse {
            evaluations: keys
                .iter()
                .map(|k| evaluation_to_proto(set.evaluate(k, &ctx)))
                .collect(),
        })
    }

    /// Every reference problem of a write: for each put, its dangling references
    /// (as an invalid spec); for each delete of an existing document, the documents
    /// it would leave dangling. `changes` are the write's puts (`Some(body)`) and
    /// deletes (`None`), checked together.
    async fn reference_problems(
        &self,
        changes: &[(DocKey, Option<&serde_json::Map<String, serde_json::Value>>)],
    ) -> Result<Vec<(usize, ConfigServiceError)>> {
        let view = View::new(
            self.store.as_ref(),
            changes.iter().map(|(k, b)| (k.clone(), *b)),
        );
        let mut out = Vec::new();
        for (i, (key, body)) in changes.iter().enumerate() {
            match body {
                Some(spec) => {
                    let problems = view.dangling(key, spec).await?;
                    if !problems.is_empty() {
                        out.push((
                            i,
                            ConfigServiceError::InvalidSpec {
                                kind: key.kind.as_str(),
                                problems,
                            },
                        ));
                    }
                }
                None => {
                    let referrers = view.referrers(key).await?;
                    if !referrers.is_empty() {
                        out.push((
                            i,
                            ConfigServiceError::StillReferenced {
                                key: key.to_string(),
                                referrers,
                            },
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Refuses a single-document write that [`Self::reference_problems`] objects to.
    async fn check_references(
        &self,
        changes: &[(DocKey, Option<&serde_json::Map<String, serde_json::Value>>)],
    ) -> Result<()> {
        match self.reference_problems(changes).await?.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// The end of a `validate_only` Apply: every expected version is checked against
    /// the current documents as the store would, and nothing is written.
    async fn validate_versions(&self, ops: &[ApplyOp]) -> Result<pb::ApplyResponse> {
        let revision = self.store.current_revision().await?;
        for op in ops {
            let current = self.store.get(op.key()).await?.map(|d| d.version);
            match op {
                ApplyOp::Put {
                    key,
                    expected_version: Some(n),
                    ..
                } => {
                    let holds = match current {
                        Some(v) => *n == v,
                        None => *n == 0,
                    };
                    if !holds {
                        return Err(ConfigServiceError::conflict(key, *n, current));
                    }
                }
                ApplyOp::Put { .. } => {}
                ApplyOp::Delete {
                    key,
                    expected_version,
                } => match (current, expected_version) {
                    (None, _) => return Err(ConfigServiceError::NotFound(key.to_string())),
                    (Some(v), Some(n)) if v != *n => {
                        return Err(ConfigServiceError::conflict(key, *n, Some(v)));
                    }
                    _ => {}
                },
            }
        }
        tracing::info!(revision, operations = ops.len(), "config apply validated");
        Ok(pb::ApplyResponse {
            revision,
            documents: Vec::new(),
        })
    }

    /// Queues the audit event of a successful change (no document content: specs may
    /// name secrets).
    /// The current document, read before a change so that its audit event can show
    /// what was there (only when changes are audited).
    async fn before(&self, key: &DocKey) -> Option<crate::document::StoredDoc> {
        self.audit.as_ref()?;
        match self.store.get(key).await {
            Ok(doc) => doc,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot read the document before a change; its audit event has no before");
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        action: &str,
        writer: &Writer,
        key: &DocKey,
        version: i64,
        before: Option<&crate::document::StoredDoc>,
        after: Option<&DocValue>,
        request_id: String,
    ) {
        let Some(audit) = &self.audit else {
            return;
        };
        let shown = |spec: &serde_json::Map<String, serde_json::Value>| {
            let mut doc = pb::Document {
                tenant: key.owner.as_str().to_owned(),
                kind: key.kind.to_proto() as i32,
                name: key.name.as_str().to_owned(),
                spec_json: serde_json::Value::Object(spec.clone()).to_string(),
                ..Default::default()
            };
            present(&mut doc, Reveal::Redacted);
            serde_json::from_str::<serde_json::Value>(&doc.spec_json)
                .unwrap_or(serde_json::Value::Null)
        };
        let before =
            before.map(|d| serde_json::json!({"version": d.version, "spec": shown(&d.value.spec)}));
        let after = after.map(|v| shown(&v.spec));
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
            details_json:
                serde_json::json!({ "version": version, "before": before, "after": after })
                    .to_string(),
            ..Default::default()
        });
    }
}

/// The wire form of one evaluation.
pub fn evaluation_to_proto(e: crewmesh_kit::flags::Evaluation) -> pb::FlagEvaluation {
    use crewmesh_kit::flags::{ErrorCode, Reason};
    let reason = match e.reason {
        Reason::Static => pb::EvaluationReason::Static,
        Reason::Default => pb::EvaluationReason::Default,
        Reason::TargetingMatch => pb::EvaluationReason::TargetingMatch,
        Reason::Split => pb::EvaluationReason::Split,
        Reason::Disabled => pb::EvaluationReason::Disabled,
        Reason::Error => pb::EvaluationReason::Error,
    };
    let (code, message) = match e.error {
        None => (pb::EvaluationErrorCode::Unspecified, String::new()),
        Some((code, message)) => (
            match code {
                ErrorCode::FlagNotFound => pb::EvaluationErrorCode::FlagNotFound,
                ErrorCode::ParseError => pb::EvaluationErrorCode::ParseError,
                ErrorCode::TypeMismatch => pb::EvaluationErrorCode::TypeMismatch,
                ErrorCode::TargetingKeyMissing => pb::EvaluationErrorCode::TargetingKeyMissing,
                ErrorCode::InvalidContext => pb::EvaluationErrorCode::InvalidContext,
                ErrorCode::General => pb::EvaluationErrorCode::General,
            },
            message,
        ),
    };
    pb::FlagEvaluation {
        key: e.key,
        value: e.value.as_ref().map(crewmesh_kit::flags::wire::to_value),
        variant: e.variant.unwrap_or_default(),
        reason: reason as i32,
        error_code: code as i32,
        error_message: message,
    }
}

/// Checks one Apply operation as Put or Delete would.
fn check_operation(
    caller: &CallerInfo,
    secrets: Option<&SecretsKey>,
    op: pb::ApplyOperation,
) -> Result<(Writer, ApplyOp)> {
    match op.op {
        Some(pb::apply_operation::Op::Put(r)) => {
            let writer = write_scope(r.scope, caller)?;
            let kind = DocKind::require(r.kind)?;
            kind_permission(kind, caller)?;
            let name = DocName::parse(&r.name)?;
            let mut spec = parse_spec(kind, &r.spec_json)?;
            let key = DocKey::new(writer.owner.clone(), kind, name);
            seal_inline(secrets, &key, &mut spec)?;
            let value = DocValue {
                spec,
                updated_by: writer.actor.clone(),
                updated_at_micros: now_micros(),
            };
            Ok((
                writer,
                ApplyOp::Put {
                    key,
                    value,
                    expected_version: r.expected_version,
                },
            ))
        }
        Some(pb::apply_operation::Op::Delete(r)) => {
            let writer = write_scope(r.scope, caller)?;
            let kind = DocKind::require(r.kind)?;
            kind_permission(kind, caller)?;
            let name = DocName::parse(&r.name)?;
            let key = DocKey::new(writer.owner.clone(), kind, name);
            Ok((
                writer,
                ApplyOp::Delete {
                    key,
                    expected_version: r.expected_version,
                },
            ))
        }
        None => Err(ConfigServiceError::InvalidArgument(
            "op is required: put or delete".to_owned(),
        )),
    }
}

/// The response metadata key holding the store revision a List was read at or a
/// write was made at.
pub const REVISION_METADATA: &str = "x-crewmesh-config-revision";

/// A response carrying [`REVISION_METADATA`].
fn with_revision<T>(msg: T, revision: impl FnOnce(&T) -> i64) -> Response<T> {
    let revision = revision(&msg);
    let mut resp = Response::new(msg);
    resp.metadata_mut()
        .insert(REVISION_METADATA, revision.into());
    resp
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
        let reveal = self.reveal(&caller);
        self.get_doc(caller, request.into_inner())
            .await
            .map(|mut r| {
                r.document.iter_mut().for_each(|d| present(d, reveal));
                Response::new(r)
            })
            .map_err(|e| to_status(&e))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = CallerInfo::of(&request);
        let reveal = self.reveal(&caller);
        self.list_docs(caller, request.into_inner())
            .await
            .map(|mut r| {
                r.documents.iter_mut().for_each(|d| present(d, reveal));
                with_revision(r, |r| r.revision)
            })
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
            .map(|mut r| {
                r.document
                    .iter_mut()
                    .for_each(|d| present(d, Reveal::Redacted));
                with_revision(r, |r| r.document.as_ref().map_or(0, |d| d.version))
            })
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
            .map(|r| with_revision(r, |r| r.revision))
            .map_err(|e| to_status(&e))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let caller = CallerInfo::of(&request);
        let request_id = request_id(&request);
        self.apply_docs(caller, request_id, request.into_inner())
            .await
            .map(|mut r| {
                r.documents
                    .iter_mut()
                    .for_each(|d| present(d, Reveal::Redacted));
                with_revision(r, |r| r.revision)
            })
            .map_err(|e| to_status(&e))
    }

    type WatchStream = BoxStream<'static, Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = CallerInfo::of(&request);
        let secrets = self.secrets.clone();
        let reveal_plain = matches!(self.reveal(&caller), Reveal::Plain(_));
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            if stopping.wait_for(|s| *s).await.is_err() {
                // No stop signal: the watch ends only with its client.
                std::future::pending::<()>().await;
            }
        };
        crate::watch::open(&self.store, &caller, request.into_inner())
            .await
            .map(|stream| {
                let stream = futures::StreamExt::map(stream, move |msg| {
                    msg.map(|mut msg| {
                        let reveal = if reveal_plain {
                            Reveal::Plain(secrets.as_deref())
                        } else {
                            Reveal::Redacted
                        };
                        for e in &mut msg.events {
                            e.document.iter_mut().for_each(|d| present(d, reveal));
                        }
                        msg
                    })
                });
                let stream: Self::WatchStream =
                    Box::pin(futures::StreamExt::take_until(stream, Box::pin(stopped)));
                Response::new(stream)
            })
            .map_err(|e| to_status(&e))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let caller = CallerInfo::of(&request);
        self.history_of(caller, request.into_inner())
            .await
            .map(|mut r| {
                r.versions
                    .iter_mut()
                    .for_each(|d| present(d, Reveal::Redacted));
                Response::new(r)
            })
            .map_err(|e| to_status(&e))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let caller = CallerInfo::of(&request);
        let request_id = request_id(&request);
        self.rollback_doc(caller, request_id, request.into_inner())
            .await
            .map(|mut r| {
                r.document
                    .iter_mut()
                    .for_each(|d| present(d, Reveal::Redacted));
                with_revision(r, |r| r.document.as_ref().map_or(0, |d| d.version))
            })
            .map_err(|e| to_status(&e))
    }

    async fn evaluate_flags(
        &self,
        request: Request<pb::EvaluateFlagsRequest>,
    ) -> Result<Response<pb::EvaluateFlagsResponse>, Status> {
        let caller = CallerInfo::of(&request);
        self.evaluate(caller, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
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
        assert_eq!(
            class(kind_permission(DocKind::ApiKey, &operator)),
            ErrorClass::PermissionDenied
        );
        assert!(kind_permission(DocKind::ApiKey, &admin).is_ok());
        assert!(kind_permission(DocKind::Model, &operator).is_ok());
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
