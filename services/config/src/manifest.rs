//! Document files for `crewmesh config apply|diff -f FILE_OR_DIR`, read the way
//! `kubectl apply -f` reads manifests: a file holds one document, a list of
//! documents, or (YAML) several documents separated by `---`; a directory is read
//! recursively, files in path order (`*.json`, `*.yaml`, `*.yml`; hidden entries
//! skipped). Each document is
//!
//! ```yaml
//! kind: model            # provider, model, agent, crew, tool, tenant, apikey, flag
//! name: gpt-4o
//! scope: global          # or tenant (the default): the API key's tenant
//! spec:
//!   deployments: [{provider: openai, model: gpt-4o}]
//! ```
//!
//! Also here: the line diff that `crewmesh config diff` prints.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::document::{DocKind, DocName};

/// A problem with a document file: where (file, and document number when the file
/// holds several) and what.
#[derive(Debug, thiserror::Error)]
#[error("{place}: {problem}")]
pub struct ManifestError {
    pub place: String,
    pub problem: String,
}

fn problem(place: impl Into<String>, problem: impl Into<String>) -> ManifestError {
    ManifestError {
        place: place.into(),
        problem: problem.into(),
    }
}

/// The scope a manifest document is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestScope {
    /// The caller's tenant.
    #[default]
    Tenant,
    /// `_global`.
    Global,
}

impl ManifestScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ManifestScope::Tenant => "tenant",
            ManifestScope::Global => "global",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoc {
    kind: String,
    name: String,
    #[serde(default)]
    scope: ManifestScope,
    spec: Value,
}

/// One document read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestDoc {
    /// `file` or `file (document N)`, for messages.
    pub source: String,
    pub kind: DocKind,
    pub name: String,
    pub scope: ManifestScope,
    pub spec: Map<String, Value>,
}

impl ManifestDoc {
    /// `kind/name`, with ` (global)` for global documents.
    pub fn label(&self) -> String {
        match self.scope {
            ManifestScope::Global => format!("{}/{} (global)", self.kind, self.name),
            ManifestScope::Tenant => format!("{}/{}", self.kind, self.name),
        }
    }
}

/// The format of a document file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "json" => Some(Format::Json),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

/// The document files under `path`: `path` itself if it is a file (any extension;
/// YAML unless it ends in `.json`), else every JSON or YAML file below it, in path
/// order.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| problem(path.display().to_string(), format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| problem(dir.display().to_string(), format!("cannot read: {e}")))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| problem(dir.display().to_string(), format!("cannot read: {e}")))?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                dirs.push(p);
            } else if Format::of(&p).is_some() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every document of a file or directory, in order; refuses a document that appears
/// twice (same kind, name and scope).
pub fn load(path: &Path) -> Result<Vec<ManifestDoc>, ManifestError> {
    let mut docs = Vec::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| problem(file.display().to_string(), format!("cannot read: {e}")))?;
        let format = Format::of(&file).unwrap_or(Format::Yaml);
        docs.extend(parse(&text, format, &file.display().to_string())?);
    }
    let mut seen = HashSet::new();
    for d in &docs {
        if !seen.insert((d.kind, d.name.clone(), d.scope)) {
            return Err(problem(
                d.source.clone(),
                format!("{} appears more than once", d.label()),
            ));
        }
    }
    Ok(docs)
}

/// A single JSON value from a file: YAML unless the file ends in `.json` (for
/// `crewmesh config put -f SPEC_FILE`).
pub fn read_value(path: &Path) -> Result<Value, ManifestError> {
    let place = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| problem(place.clone(), format!("cannot read: {e}")))?;
    match Format::of(path) {
        Some(Format::Json) => {
            serde_json::from_str(&text).map_err(|e| problem(place, format!("not valid JSON: {e}")))
        }
        _ => serde_yaml_ng::from_str(&text)
            .map_err(|e| problem(place, format!("not valid YAML: {e}"))),
    }
}

/// The documents of one file's text. `source` names the file in messages.
pub fn parse(text: &str, format: Format, source: &str) -> Result<Vec<ManifestDoc>, ManifestError> {
    let values: Vec<Value> = match format {
        Format::Json => vec![
            serde_json::from_str(text)
                .map_err(|e| problem(source, format!("not valid JSON: {e}")))?,
        ],
        Format::Yaml => {
            let mut out = Vec::new();
            for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
                let v = Value::deserialize(doc).map_err(|e| {
                    problem(
                        format!("{source} (document {})", i + 1),
                        format!("not valid YAML: {e}"),
                    )
                })?;
                out.push(v);
            }
            out
        }
    };
    // A list is several documents; an empty YAML document (`---` at the end) is none.
    let items: Vec<Value> = values
        .into_iter()
        .flat_map(|v| match v {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            one => vec![one],
        })
        .collect();
    let many = items.len() > 1;
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let place = if many {
                format!("{source} (document {})", i + 1)
            } else {
                source.to_owned()
            };
            let raw: RawDoc = serde_json::from_value(v).map_err(|e| {
                problem(
                    place.clone(),
                    format!("{e} (a document is {{kind, name, scope, spec}})"),
                )
            })?;
            let kind = DocKind::from_segment(&raw.kind).ok_or_else(|| {
                problem(
                    place.clone(),
                    format!(
                        "kind {:?} is not a config kind; use one of {}",
                        raw.kind,
                        DocKind::ALL.map(DocKind::as_str).join(", ")
                    ),
                )
            })?;
            DocName::parse(&raw.name).map_err(|e| problem(place.clone(), e.to_string()))?;
            let Value::Object(spec) = raw.spec else {
                return Err(problem(place, "spec must be an object"));
            };
            Ok(ManifestDoc {
                source: place,
                kind,
                name: raw.name,
                scope: raw.scope,
                spec,
            })
        })
        .collect()
}

/// One line of a diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    Same(&'a str),
    Removed(&'a str),
    Added(&'a str),
}

/// The line diff of two texts (longest common subsequence; config documents are
/// small).
pub fn line_diff<'a>(old: &'a str, new: &'a str) -> Vec<Line<'a>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(Line::Same(a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Removals first, as diff(1) prints them.
            out.push(Line::Removed(a[i]));
            i += 1;
        } else {
            out.push(Line::Added(b[j]));
            j += 1;
        }
    }
    out
}

/// A unified diff (`---`/`+++` header, `@@` hunks with `context` lines around each
/// change) of two texts; empty when they are equal.
pub fn unified_diff(
    old: &str,
    new: &str,
    old_label: &str,
    new_label: &str,
    context: usize,
) -> String {
    let lines = line_diff(old, new);
    let changed: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !matches!(l, Line::Same(_)))
        .map(|(i, _)| i)
        .collect();
    if changed.is_empty() {
        return String::new();
    }
    // Group changes whose contexts touch into hunks of line indexes.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &c in &changed {
        let start = c.saturating_sub(context);
        let end = (c + context + 1).min(lines.len());
        match hunks.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => hunks.push((start, end)),
        }
    }
    let mut out = format!("--- {old_label}\n+++ {new_label}\n");
    for (start, end) in hunks {
        // 1-based line numbers and lengths in the old and new texts.
        let (mut old_line, mut new_line) = (1, 1);
        for l in &lines[..start] {
            match l {
                Line::Same(_) => {
                    old_line += 1;
                    new_line += 1;
                }
                Line::Removed(_) => old_line += 1,
                Line::Added(_) => new_line += 1,
            }
        }
        let old_len = lines[start..end]
            .iter()
            .filter(|l| !matches!(l, Line::Added(_)))
            .count();
        let new_len = lines[start..end]
            .iter()
            .filter(|l| !matches!(l, Line::Removed(_)))
            .count();
        let at = |line: usize, len: usize| if len == 0 { line - 1 } else { line };
        out.push_str(&format!(
            "@@ -{},{old_len} +{},{new_len} @@\n",
            at(old_line, old_len),
            at(new_line, new_len)
        ));
        for l in &lines[start..end] {
            match l {
                Line::Same(s) => out.push_str(&format!(" {s}\n")),
                Line::Removed(s) => out.push_str(&format!("-{s}\n")),
                Line::Added(s) => out.push_str(&format!("+{s}\n")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_files_hold_several_documents() {
        let text = "\
kind: provider
name: openai
scope: global
spec: {type: openai, base_url: 'https://api.openai.com/v1'}
---
- kind: model
  name: gpt-4o
  spec:
    deployments:
      - {provider: openai, model: gpt-4o}
- kind: flag
  name: beta
  scope: tenant
  spec: {variants: {on: true, off: false}, default_variant: off}
---
";
        let docs = parse(text, Format::Yaml, "a.yaml").unwrap();
        let labels: Vec<(String, String)> =
            docs.iter().map(|d| (d.source.clone(), d.label())).collect();
        assert_eq!(
            labels,
            vec![
                (
                    "a.yaml (document 1)".into(),
                    "provider/openai (global)".into()
                ),
                ("a.yaml (document 2)".into(), "model/gpt-4o".into()),
                ("a.yaml (document 3)".into(), "flag/beta".into()),
            ]
        );
        assert_eq!(docs[1].spec["deployments"][0]["model"], "gpt-4o");
        // YAML 1.2: `on`/`off` are strings as keys and as values.
        assert_eq!(docs[2].spec["variants"]["on"], true);
        assert_eq!(docs[2].spec["default_variant"], "off");
    }

    #[test]
    fn bad_documents_say_where_and_what() {
        let err = |text: &str, format| parse(text, format, "f").unwrap_err().to_string();
        assert_eq!(
            err("kind: modle\nname: x\nspec: {}\n", Format::Yaml),
            r#"f: kind "modle" is not a config kind; use one of provider, model, agent, crew, tool, tenant, apikey, flag"#
        );
        assert_eq!(
            err(
                r#"[{"kind":"model","name":"ok","spec":{}},{"kind":"model","name":"Bad","spec":{}}]"#,
                Format::Json
            ),
            r#"f (document 2): invalid name "Bad": use 1-128 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"#
        );
        assert_eq!(
            err(r#"{"kind":"model","name":"x","spec":[1]}"#, Format::Json),
            "f: spec must be an object"
        );
        assert_eq!(
            err(
                r#"{"kind":"model","name":"x","spec":{},"scope":"everywhere"}"#,
                Format::Json
            ),
            "f: unknown variant `everywhere`, expected `tenant` or `global` (a document is {kind, name, scope, spec})"
        );
        assert_eq!(
            err(r#"{"kind":"model","name":"x","spce":{}}"#, Format::Json),
            "f: unknown field `spce`, expected one of `kind`, `name`, `scope`, `spec` (a document is {kind, name, scope, spec})"
        );
        assert!(err("{", Format::Json).starts_with("f: not valid JSON: "));
        assert!(err("a: [", Format::Yaml).starts_with("f (document 1): not valid YAML: "));
    }

    #[test]
    fn directories_are_read_recursively_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write("20-models/b.yml", "kind: model\nname: b\nspec: {}\n");
        write(
            "20-models/a.json",
            r#"{"kind":"model","name":"a","spec":{}}"#,
        );
        write("10-provider.yaml", "kind: provider\nname: p\nspec: {}\n");
        write("README.md", "not a document");
        write(".hidden/x.yaml", "kind: model\nname: hidden\nspec: {}\n");
        let names: Vec<String> = load(dir.path())
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, vec!["p", "a", "b"]);
        write("30-again.yaml", "kind: model\nname: a\nspec: {x: 1}\n");
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .ends_with("30-again.yaml: model/a appears more than once"),
        );
    }

    #[test]
    fn unified_diff_has_hunks_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\n";
        let new = "a\nB\nc\nd\ne\nf\ng\nh\ni\nj\n";
        assert_eq!(
            unified_diff(old, new, "live", "file", 1),
            "--- live\n+++ file\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n@@ -9,1 +9,2 @@\n i\n+j\n"
        );
        assert_eq!(unified_diff(old, old, "live", "file", 3), "");
        assert_eq!(
            unified_diff("", "x\n", "live", "file", 3),
            "--- live\n+++ file\n@@ -0,0 +1,1 @@\n+x\n"
        );
    }
}
