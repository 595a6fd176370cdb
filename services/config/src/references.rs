//! References between documents, checked on every write: a model's deployments name
//! providers, its fallbacks name models, its `flag` names a flag; an agent names a
//! model and tools; a crew's tasks name agents. A reference from a tenant's document
//! resolves to the tenant's own document of that kind and name, else to the
//! `_global` one (the way the router and the agent runtime look them up); a
//! reference from a `_global` document resolves only to `_global` documents.
//!
//! A Put, Rollback or Apply whose documents hold a reference that does not resolve is
//! refused with every dangling reference listed by path (INVALID_ARGUMENT), and a
//! Delete (or an Apply's delete) that would leave another document with a dangling
//! reference is refused with the list of referrers (FAILED_PRECONDITION), like a
//! Kubernetes finalizer. An Apply is checked as a whole: its own puts and deletes
//! count, in any order.
//!
//! A model's `flag` must also fit its `variants`: every value of the flag must be a
//! string naming one of the model's variants, checked both when the model and when
//! the flag is written.
//!
//! Not checked, on purpose: an apikey's `tenant` and a tenant's `allowed_models`
//! (tenants exist without a `tenant` document, which only sets quotas, and an allowed
//! model that does not exist yet grants nothing). The checks read the store before
//! the write, so two concurrent writers can still race past them; the router and the
//! agent runtime keep treating a missing document as an error of that one request.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::document::{DocKey, DocKind, DocName, Owner};
use crate::error::Result;
use crate::spec::SpecProblem;
use crate::store::{ConfigStore, ListFilter, list_all};

/// One reference held by a document body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// JSON path of the referencing field, e.g. `deployments[1].provider`.
    pub path: String,
    pub kind: DocKind,
    pub name: String,
}

fn push_strings(out: &mut Vec<Reference>, value: Option<&Value>, path: &str, kind: DocKind) {
    for (i, v) in value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(name) = v.as_str() {
            out.push(Reference {
                path: format!("{path}[{i}]"),
                kind,
                name: name.to_owned(),
            });
        }
    }
}

fn push_deployments(out: &mut Vec<Reference>, value: Option<&Value>, path: &str) {
    for (i, d) in value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(name) = d.get("provider").and_then(Value::as_str) {
            out.push(Reference {
                path: format!("{path}[{i}].provider"),
                kind: DocKind::Provider,
                name: name.to_owned(),
            });
        }
    }
}

/// Every reference a body of `kind` holds, in document order.
pub fn references(kind: DocKind, spec: &Map<String, Value>) -> Vec<Reference> {
    let mut out = Vec::new();
    match kind {
        DocKind::Model => {
            push_deployments(&mut out, spec.get("deployments"), "deployments");
            if let Some(Value::Object(variants)) = spec.get("variants") {
                for (name, v) in variants {
                    push_deployments(
                        &mut out,
                        v.get("deployments"),
                        &format!("variants.{name}.deployments"),
                    );
                }
            }
            push_strings(
                &mut out,
                spec.get("fallback_models"),
                "fallback_models",
                DocKind::Model,
            );
            if let Some(flag) = spec.get("flag").and_then(Value::as_str) {
                out.push(Reference {
                    path: "flag".to_owned(),
                    kind: DocKind::Flag,
                    name: flag.to_owned(),
                });
            }
        }
        DocKind::Agent => {
            if let Some(model) = spec.get("model").and_then(Value::as_str) {
                out.push(Reference {
                    path: "model".to_owned(),
                    kind: DocKind::Model,
                    name: model.to_owned(),
                });
            }
            push_strings(&mut out, spec.get("tools"), "tools", DocKind::Tool);
        }
        DocKind::Crew => {
            for (i, t) in spec
                .get("tasks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if let Some(agent) = t.get("agent").and_then(Value::as_str) {
                    out.push(Reference {
                        path: format!("tasks[{i}].agent"),
                        kind: DocKind::Agent,
                        name: agent.to_owned(),
                    });
                }
            }
        }
        DocKind::Provider | DocKind::Tool | DocKind::Tenant | DocKind::ApiKey | DocKind::Flag => {}
    }
    out
}

/// The kinds whose documents may reference a document of `kind`.
fn referrer_kinds(kind: DocKind) -> &'static [DocKind] {
    match kind {
        DocKind::Provider | DocKind::Flag => &[DocKind::Model],
        DocKind::Model => &[DocKind::Model, DocKind::Agent],
        DocKind::Tool => &[DocKind::Agent],
        DocKind::Agent => &[DocKind::Crew],
        DocKind::Crew | DocKind::Tenant | DocKind::ApiKey => &[],
    }
}

/// The documents as they would be after a write: the store, overlaid with the
/// write's own puts (`Some(body)`) and deletes (`None`).
pub struct View<'a> {
    store: &'a dyn ConfigStore,
    pending: HashMap<DocKey, Option<&'a Map<String, Value>>>,
}

impl<'a> View<'a> {
    pub fn new(
        store: &'a dyn ConfigStore,
        pending: impl IntoIterator<Item = (DocKey, Option<&'a Map<String, Value>>)>,
    ) -> Self {
        Self {
            store,
            pending: pending.into_iter().collect(),
        }
    }

    async fn exists(&self, key: &DocKey) -> Result<bool> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.is_some());
        }
        Ok(self.store.get(key).await?.is_some())
    }

    /// Whether `name` of `kind`, referenced from a document of `owner`, resolves.
    async fn resolves(&self, owner: &Owner, kind: DocKind, name: &DocName) -> Result<bool> {
        if self
            .exists(&DocKey::new(owner.clone(), kind, name.clone()))
            .await?
        {
            return Ok(true);
        }
        if *owner == Owner::Global {
            return Ok(false);
        }
        self.exists(&DocKey::new(Owner::Global, kind, name.clone()))
            .await
    }

    /// Every document of `kind` (of `owner`, or of every owner), as it would be
    /// after the write.
    async fn scan(
        &self,
        kind: DocKind,
        owner: Option<Owner>,
    ) -> Result<HashMap<DocKey, Map<String, Value>>> {
        let (_, listed) = list_all(
            self.store,
            ListFilter {
                owner: owner.clone(),
                kind: Some(kind),
            },
        )
        .await?;
        let mut docs: HashMap<DocKey, Map<String, Value>> =
            listed.into_iter().map(|d| (d.key, d.value.spec)).collect();
        for (key, body) in &self.pending {
            if key.kind != kind || owner.as_ref().is_some_and(|o| *o != key.owner) {
                continue;
            }
            match body {
                Some(b) => {
                    docs.insert(key.clone(), (*b).clone());
                }
                None => {
                    docs.remove(key);
                }
            }
        }
        Ok(docs)
    }

    /// A document's body as it would be after the write.
    async fn body(&self, key: &DocKey) -> Result<Option<Map<String, Value>>> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.cloned());
        }
        Ok(self.store.get(key).await?.map(|d| d.value.spec))
    }

    /// The document a reference from `owner` resolves to.
    async fn resolve_key(
        &self,
        owner: &Owner,
        kind: DocKind,
        name: &str,
    ) -> Result<Option<DocKey>> {
        let Ok(name) = DocName::parse(name) else {
            return Ok(None);
        };
        let own = DocKey::new(owner.clone(), kind, name.clone());
        if self.exists(&own).await? {
            return Ok(Some(own));
        }
        let global = DocKey::new(Owner::Global, kind, name);
        if *owner != Owner::Global && self.exists(&global).await? {
            return Ok(Some(global));
        }
        Ok(None)
    }

    /// The flag values a model's variants do not cover: every value of the flag a
    /// model names must be a string naming one of the model's variants.
    fn uncovered_values(
        model: &Map<String, Value>,
        flag: &Map<String, Value>,
    ) -> Vec<(String, String)> {
        let variants = model.get("variants").and_then(Value::as_object);
        let mut out = Vec::new();
        for (name, value) in flag
            .get("variants")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let covered = value
                .as_str()
                .is_some_and(|v| variants.is_some_and(|vs| vs.contains_key(v)));
            if !covered {
                out.push((name.clone(), value.to_string()));
            }
        }
        out
    }

    /// Problems between models and the flags that choose their variants: for a
    /// model, the values of its flag that name none of its variants; for a flag, the
    /// models using it whose variants miss one of its values.
    async fn flag_problems(
        &self,
        key: &DocKey,
        spec: &Map<String, Value>,
    ) -> Result<Vec<SpecProblem>> {
        let mut out = Vec::new();
        match key.kind {
            DocKind::Model => {
                let Some(flag) = spec.get("flag").and_then(Value::as_str) else {
                    return Ok(out);
                };
                let Some(fkey) = self.resolve_key(&key.owner, DocKind::Flag, flag).await? else {
                    return Ok(out);
                };
                let Some(fbody) = self.body(&fkey).await? else {
                    return Ok(out);
                };
                let names: Vec<&str> = spec
                    .get("variants")
                    .and_then(Value::as_object)
                    .map(|v| v.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                for (variant, value) in Self::uncovered_values(spec, &fbody) {
                    out.push(SpecProblem {
                        path: "flag".to_owned(),
                        problem: format!(
                            "flag {fkey} variant {variant:?} has the value {value}, which names no variant of this model (its variants: {})",
                            names.join(", ")
                        ),
                    });
                }
            }
            DocKind::Flag => {
                let owner = match &key.owner {
                    Owner::Global => None,
                    o => Some(o.clone()),
                };
                let models = self.scan(DocKind::Model, owner).await?;
                let mut keys: Vec<&DocKey> = models.keys().collect();
                keys.sort();
                for mkey in keys {
                    let model = &models[mkey];
                    if model.get("flag").and_then(Value::as_str) != Some(key.name.as_str()) {
                        continue;
                    }
                    if self
                        .resolve_key(&mkey.owner, DocKind::Flag, key.name.as_str())
                        .await?
                        .as_ref()
                        != Some(key)
                    {
                        continue;
                    }
                    for (variant, value) in Self::uncovered_values(model, spec) {
                        out.push(SpecProblem {
                            path: format!("variants.{variant}"),
                            problem: format!(
                                "the value {value} names no variant of model {mkey}, which this flag chooses variants for"
                            ),
                        });
                    }
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// The references of the body to be written at `key` that do not resolve, and
    /// the mismatches between models and the flags choosing their variants.
    pub async fn dangling(
        &self,
        key: &DocKey,
        spec: &Map<String, Value>,
    ) -> Result<Vec<SpecProblem>> {
        let mut out = Vec::new();
        for r in references(key.kind, spec) {
            let ok = match DocName::parse(&r.name) {
                Ok(name) => self.resolves(&key.owner, r.kind, &name).await?,
                Err(_) => false,
            };
            if !ok {
                let place = match &key.owner {
                    Owner::Global => "_global".to_owned(),
                    Owner::Tenant(t) => format!("tenant {t} or _global"),
                };
                out.push(SpecProblem {
                    path: r.path,
                    problem: format!("{} {:?} does not exist (in {place})", r.kind, r.name),
                });
            }
        }
        out.extend(self.flag_problems(key, spec).await?);
        Ok(out)
    }

    /// The documents that reference `deleted` and would no longer resolve the
    /// reference once the write is done, as `owner/kind/name (path)`.
    pub async fn referrers(&self, deleted: &DocKey) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if self.store.get(deleted).await?.is_none() {
            // Nothing to delete (the store says NotFound): nobody can lose it.
            return Ok(out);
        }
        for &kind in referrer_kinds(deleted.kind) {
            let owner = match &deleted.owner {
                Owner::Global => None,
                o => Some(o.clone()),
            };
            let docs = self.scan(kind, owner).await?;
            let mut keys: Vec<&DocKey> = docs.keys().collect();
            keys.sort();
            for key in keys {
                for r in references(kind, &docs[key]) {
                    if r.kind != deleted.kind || r.name != deleted.name.as_str() {
                        continue;
                    }
                    if !self.resolves(&key.owner, r.kind, &deleted.name).await? {
                        out.push(format!("{key} ({})", r.path));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::document::DocValue;
    use crate::store::EmbeddedStore;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn key(owner: &str, kind: DocKind, name: &str) -> DocKey {
        DocKey::new(
            Owner::parse(owner).unwrap(),
            kind,
            DocName::parse(name).unwrap(),
        )
    }

    async fn put(store: &EmbeddedStore, k: &DocKey, spec: Value) {
        let value = DocValue {
            spec: obj(spec),
            updated_by: "test".into(),
            updated_at_micros: 0,
        };
        store.put(k, &value, None).await.unwrap();
    }

    /// What `view` finds dangling in `body` (stored at `key`), as messages.
    async fn dangling(view: &View<'_>, key: &DocKey, body: &Map<String, Value>) -> Vec<String> {
        let found = view.dangling(key, body).await.unwrap();
        found.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_reference_is_found_with_its_path() {
        let model = obj(json!({
            "deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}],
            "variants": {"blue": {"deployments": [{"provider": "c", "model": "m"}]}},
            "fallback_models": ["small"],
            "flag": "model-ab",
        }));
        let found: Vec<(String, DocKind, String)> = references(DocKind::Model, &model)
            .into_iter()
            .map(|r| (r.path, r.kind, r.name))
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    "deployments[0].provider".into(),
                    DocKind::Provider,
                    "a".into()
                ),
                (
                    "deployments[1].provider".into(),
                    DocKind::Provider,
                    "b".into()
                ),
                (
                    "variants.blue.deployments[0].provider".into(),
                    DocKind::Provider,
                    "c".into()
                ),
                ("fallback_models[0]".into(), DocKind::Model, "small".into()),
                ("flag".into(), DocKind::Flag, "model-ab".into()),
            ]
        );
        let agent = obj(json!({"model": "m", "tools": ["search", "calc"]}));
        assert_eq!(
            references(DocKind::Agent, &agent)
                .iter()
                .map(|r| r.path.as_str())
                .collect::<Vec<_>>(),
            vec!["model", "tools[0]", "tools[1]"]
        );
        let crew = obj(json!({"tasks": [{"name": "t", "agent": "writer"}]}));
        assert_eq!(references(DocKind::Crew, &crew)[0].name, "writer");
        assert!(references(DocKind::Provider, &obj(json!({"type": "openai"}))).is_empty());
    }

    #[tokio::test]
    async fn dangling_references_and_referrers() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("c.db"), "/t")
            .await
            .unwrap();
        let global_sim = key("_global", DocKind::Provider, "sim");
        put(
            &store,
            &global_sim,
            json!({"type": "simulated", "base_url": "http://x/v1"}),
        )
        .await;
        let acme_model = key("acme", DocKind::Model, "m");
        let body = obj(
            json!({"deployments": [{"provider": "sim", "model": "x"}, {"provider": "own", "model": "x"}], "fallback_models": ["Bad Name"]}),
        );

        // The tenant model resolves `sim` through _global, not `own`.
        let view = View::new(&store, [(acme_model.clone(), Some(&body))]);
        let problems = dangling(&view, &acme_model, &body).await;
        assert_eq!(
            problems,
            vec![
                r#"deployments[1].provider: provider "own" does not exist (in tenant acme or _global)"#,
                r#"fallback_models[0]: model "Bad Name" does not exist (in tenant acme or _global)"#,
            ]
        );
        // A _global model cannot use a tenant's provider.
        let acme_own = key("acme", DocKind::Provider, "own");
        put(
            &store,
            &acme_own,
            json!({"type": "simulated", "base_url": "http://x/v1"}),
        )
        .await;
        let global_model = key("_global", DocKind::Model, "g");
        let gbody = obj(json!({"deployments": [{"provider": "own", "model": "x"}]}));
        let view = View::new(&store, [(global_model.clone(), Some(&gbody))]);
        assert_eq!(
            dangling(&view, &global_model, &gbody).await[0],
            r#"deployments[0].provider: provider "own" does not exist (in _global)"#
        );
        // A provider created in the same write counts.
        let view = View::new(
            &store,
            [
                (global_model.clone(), Some(&gbody)),
                (key("_global", DocKind::Provider, "own"), Some(&gbody)),
            ],
        );
        assert!(dangling(&view, &global_model, &gbody).await.is_empty());

        // Deleting the global provider a tenant model uses is refused...
        let mbody = obj(json!({"deployments": [{"provider": "sim", "model": "x"}]}));
        put(&store, &acme_model, Value::Object(mbody.clone())).await;
        let view = View::new(&store, [(global_sim.clone(), None)]);
        assert_eq!(
            view.referrers(&global_sim).await.unwrap(),
            vec!["acme/model/m (deployments[0].provider)"]
        );
        // ...unless the tenant has its own `sim`, or the model goes in the same write.
        let acme_sim = key("acme", DocKind::Provider, "sim");
        let pbody = obj(json!({"type": "simulated", "base_url": "http://y/v1"}));
        let view = View::new(
            &store,
            [(global_sim.clone(), None), (acme_sim.clone(), Some(&pbody))],
        );
        assert!(view.referrers(&global_sim).await.unwrap().is_empty());
        let view = View::new(
            &store,
            [(global_sim.clone(), None), (acme_model.clone(), None)],
        );
        assert!(view.referrers(&global_sim).await.unwrap().is_empty());
        // A tenant's provider is not referenced by other tenants' models.
        let view = View::new(&store, [(acme_own.clone(), None)]);
        assert!(view.referrers(&acme_own).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn flag_values_must_name_model_variants() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("c.db"), "/t")
            .await
            .unwrap();
        put(
            &store,
            &key("_global", DocKind::Provider, "sim"),
            json!({"type": "simulated", "base_url": "http://x/v1"}),
        )
        .await;
        let flag_key = key("_global", DocKind::Flag, "ab");
        let flag =
            obj(json!({"variants": {"a": "blue", "b": "green", "c": 3}, "default_variant": "a"}));
        put(&store, &flag_key, Value::Object(flag.clone())).await;
        let model_key = key("acme", DocKind::Model, "m");
        let model = obj(
            json!({"deployments": [{"provider": "sim", "model": "x"}], "flag": "ab",
            "variants": {"blue": {"deployments": [{"provider": "sim", "model": "b"}]}}}),
        );
        let view = View::new(&store, [(model_key.clone(), Some(&model))]);
        let problems = dangling(&view, &model_key, &model).await;
        assert_eq!(
            problems,
            vec![
                r#"flag: flag _global/flag/ab variant "b" has the value "green", which names no variant of this model (its variants: blue)"#,
                r#"flag: flag _global/flag/ab variant "c" has the value 3, which names no variant of this model (its variants: blue)"#,
            ]
        );
        // Once the model is stored, changing the flag to a value it lacks is refused.
        let good_flag = obj(json!({"variants": {"a": "blue"}, "default_variant": "a"}));
        put(&store, &flag_key, Value::Object(good_flag.clone())).await;
        put(&store, &model_key, Value::Object(model.clone())).await;
        let view = View::new(&store, [(flag_key.clone(), Some(&good_flag))]);
        assert!(dangling(&view, &flag_key, &good_flag).await.is_empty());
        let view = View::new(&store, [(flag_key.clone(), Some(&flag))]);
        let problems = dangling(&view, &flag_key, &flag).await;
        assert_eq!(
            problems,
            vec![
                r#"variants.b: the value "green" names no variant of model acme/model/m, which this flag chooses variants for"#,
                "variants.c: the value 3 names no variant of model acme/model/m, which this flag chooses variants for",
            ]
        );
        // A tenant flag of the same name shadows the global one for that tenant.
        let view = View::new(
            &store,
            [
                (flag_key.clone(), Some(&flag)),
                (key("acme", DocKind::Flag, "ab"), Some(&good_flag)),
            ],
        );
        assert!(dangling(&view, &flag_key, &flag).await.is_empty());
    }
}
