//! crewmesh-config: the config service (`crewmesh.config.v1.ConfigService`). It keeps
//! typed, versioned documents — providers, model aliases, agents, tenants, flags — at
//! `<prefix>/<tenant or _global>/<kind>/<name>` in etcd (or, for `crewmesh up`, an
//! embedded SQLite store with the same semantics), checks every write, makes writes
//! compare-and-set on the document version, and audits every change.
//!
//! - [`settings`]: the typed config and the TOML shape it is read from.
//! - [`document`]: checked owners, kinds, names, keys and stored values.
//! - [`spec`], [`schema`]: the checks a document body passes before it is written,
//!   and the JSON Schema of every kind.
//! - [`manifest`]: document files (JSON, multi-document YAML, directories) for
//!   `crewmesh config apply|diff`, and the diff it prints.
//! - [`references`]: references between documents, checked on every write and delete.
//! - [`secrets`]: envelope encryption of inline provider secrets.
//! - [`store`]: the [`store::ConfigStore`] trait and its etcd and embedded stores.
//! - [`service`]: the gRPC handlers and who may read and write which scope.
//! - [`watch`]: the `Watch` stream: a snapshot, then every change, with heartbeats.

#![forbid(unsafe_code)]

pub mod application;
pub mod document;
pub mod error;
pub mod manifest;
pub mod references;
pub mod schema;
pub mod secrets;
pub mod service;
pub mod settings;
pub mod spec;
pub mod store;
pub mod watch;

pub use application::{Application, open_store};
pub use document::{
    DEFAULT_PREFIX, DocKey, DocKind, DocName, DocValue, GLOBAL, Owner, StoredDoc, document_key,
};
pub use error::{ConfigServiceError, Result};
pub use settings::{ConfigServiceConfig, ConfigServiceSettings, EtcdConfig, StoreConfig};
pub use store::{ConfigStore, EmbeddedStore, EtcdStore, ListFilter, ListPage, ListQuery};

/// A document to create at first start if it does not exist yet.
#[derive(Debug, Clone)]
pub struct SeedDocument {
    pub key: DocKey,
    /// The document body; must be a JSON object that passes its kind's checks.
    pub spec: serde_json::Value,
}

/// Creates every seed document that does not exist yet; documents that exist (an
/// operator may have changed them) are left alone. Returns how many were created.
pub async fn seed(
    store: &dyn ConfigStore,
    documents: &[SeedDocument],
    updated_by: &str,
) -> Result<usize> {
    let mut created = 0;
    for doc in documents {
        let serde_json::Value::Object(spec) = &doc.spec else {
            return Err(ConfigServiceError::InvalidArgument(format!(
                "seed document {} is not a JSON object",
                doc.key
            )));
        };
        spec::check_spec(doc.key.kind, spec)?;
        let value = DocValue {
            spec: spec.clone(),
            updated_by: updated_by.to_owned(),
            updated_at_micros: crewmesh_proto::time::to_micros(
                &crewmesh_proto::time::to_timestamp(std::time::SystemTime::now()),
            ),
        };
        match store.put(&doc.key, &value, Some(0)).await {
            Ok(written) => {
                tracing::info!(key = %doc.key, version = written.version, "seeded config document");
                created += 1;
            }
            Err(ConfigServiceError::Conflict { .. }) => {
                tracing::debug!(key = %doc.key, "seed document exists; keeping it");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn seed_creates_only_missing_documents() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("config.db"), DEFAULT_PREFIX)
            .await
            .unwrap();
        let key = |kind, name| DocKey::new(Owner::Global, kind, DocName::parse(name).unwrap());
        let provider = SeedDocument {
            key: key(DocKind::Provider, "simulated"),
            spec: json!({"type": "simulated", "base_url": "http://127.0.0.1:8089/v1"}),
        };
        let model = SeedDocument {
            key: key(DocKind::Model, "sim-small"),
            spec: json!({"deployments": [{"provider": "simulated", "model": "sim-small"}]}),
        };
        let seeds = [provider.clone(), model];
        assert_eq!(seed(&store, &seeds, "crewmesh-up").await.unwrap(), 2);

        // An operator's change survives the next start.
        let current = store.get(&provider.key).await.unwrap().unwrap();
        let mut changed = current.value.clone();
        changed
            .spec
            .insert("base_url".into(), json!("https://llm.internal/v1"));
        store
            .put(&provider.key, &changed, Some(current.version))
            .await
            .unwrap();
        assert_eq!(seed(&store, &seeds, "crewmesh-up").await.unwrap(), 0);
        let kept = store.get(&provider.key).await.unwrap().unwrap();
        assert_eq!(kept.value.spec["base_url"], "https://llm.internal/v1");
        assert_eq!(
            document_key(
                DEFAULT_PREFIX,
                &Owner::Global,
                DocKind::Model,
                &DocName::parse("sim-small").unwrap()
            ),
            "/crewmesh/v1/_global/model/sim-small"
        );

        // Seeds pass the same checks as Put.
        let bad = SeedDocument {
            key: key(DocKind::Model, "bad"),
            spec: json!({"deployments": []}),
        };
        let err = seed(&store, &[bad], "crewmesh-up").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid model spec: deployments: must not be empty"
        );
    }
}
