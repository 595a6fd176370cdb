"""Lints and renders the Helm chart through the Helm v4 SDK (helm-python-sdk)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from .report import CheckFailed, Report

RELEASE = "crewmesh"
NAMESPACE = "crewmesh"


@dataclass
class ValuesSet:
    """One values file the chart is rendered with."""

    name: str
    path: Path | None  # None: the chart's defaults (or `inline`)
    # Default and production values: must render and pass every check. The other
    # sets add coverage of the chart's branches and of the Terraform module's values.
    primary: bool = False
    inline: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        if self.inline is not None:
            return copy.deepcopy(self.inline)
        if self.path is None:
            return None
        loaded = yaml.safe_load(self.path.read_text())
        return loaded or {}


@dataclass
class Rendered:
    values_set: ValuesSet
    values: dict[str, Any]  # the merged values
    objects: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""

    @property
    def name(self) -> str:
        return self.values_set.name

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def to_yaml(self) -> str:
        return yaml.safe_dump_all(self.objects, sort_keys=False)


def values_sets(root: Path, inline: list[tuple[str, dict[str, Any]]] | None = None) -> list[ValuesSet]:
    chart = root / "helm" / "crewmesh"
    sets = [
        ValuesSet("default", None, primary=True),
        ValuesSet("production", chart / "values-production.yaml", primary=True),
    ]
    extra = sorted((Path(__file__).parent / "values").glob("*.yaml"))
    sets += [ValuesSet(f"extra:{p.stem}", p) for p in extra]
    sets += [ValuesSet(name, None, inline=values) for name, values in inline or []]
    return sets


def parse_manifests(rendered: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    objects: list[dict[str, Any]] = []
    notes = ""
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
                raise CheckFailed(f"{template}: a rendered document is not a Kubernetes object: {doc!r:.200}")
            doc.setdefault("metadata", {})
            doc["metadata"]["_template"] = template
            objects.append(doc)
    return objects, notes


def strip_internal(obj: dict[str, Any]) -> dict[str, Any]:
    clean = copy.deepcopy(obj)
    clean["metadata"].pop("_template", None)
    return clean


def lint_and_render(root: Path, report: Report, kube_version: str,
                    inline: list[tuple[str, dict[str, Any]]] | None = None) -> list[Rendered]:
    chart_dir = root / "helm" / "crewmesh"
    report.section("Helm chart: lint and render (Helm v4 SDK)")
    results: list[Rendered] = []
    with helm.Chart.load(chart_dir) as chart:
        with report.check("chart metadata and values.schema.json load") as d:
            meta = chart.metadata
            if chart.schema is None:
                raise CheckFailed("the chart ships no values.schema.json")
            d.append(f"{meta['name']} {meta['version']}, appVersion {meta.get('appVersion')}")
        for vs in values_sets(root, inline):
            values = vs.load()
            with report.check(f"helm lint --strict [{vs.name}]") as d:
                lint = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
                problems = [f"{m['path']}: {m['error']}" for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
                problems += [e for e in lint.get("errors", []) if e not in " ".join(problems)]
                if problems:
                    raise CheckFailed("\n".join(problems))
                infos = [m["error"] for m in lint.get("messages", []) if m.get("severity") == 1]
                if infos:
                    d.append("info: " + ", ".join(infos))
            with report.check(f"helm template [{vs.name}]") as d:
                chart.validate_schema(values)
                merged = chart.merge_values(values)
                objects, notes = parse_manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))
                if not notes.strip():
                    raise CheckFailed("NOTES.txt rendered empty")
                kinds: dict[str, int] = {}
                for o in objects:
                    kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
                d.append(f"{len(objects)} objects: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
                results.append(Rendered(vs, merged, objects, notes))
            if vs.primary and not any(r.values_set is vs for r in results):
                report.note(f"{vs.name}: later checks of this values set are reported failed (render failed)")
        negative_cases(chart, report)
    return results


def negative_cases(chart: helm.Chart, report: Report) -> None:
    """The schema and the templates must refuse values that cannot work."""
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("schema refuses an unknown top-level key", {"replicaCount": 3}, "replicaCount"),
        ("schema refuses a non-integer port", {"services": {"router": {"grpcPort": "7001"}}}, "grpcPort"),
        ("schema refuses an even bundled etcd size", {"etcd": {"bundled": {"replicas": 2}}}, "replicas"),
        ("schema refuses a database URL with a password",
         {"services": {"audit": {"databaseUrl": "postgres://u:secret@db:5432/x"}}}, "databaseUrl"),
        ("render refuses external etcd without endpoints", {"etcd": {"bundled": {"enabled": False}}}, "etcd.external.endpoints"),
        ("render refuses existingSecrets TLS without Secret names", {"tls": {"source": "existingSecrets"}}, "tls.existingSecrets"),
        ("render refuses an HTTPRoute without parentRefs", {"httpRoute": {"enabled": True}}, "parentRefs"),
    ]
    for name, values, needle in cases:
        with report.check(f"negative: {name}") as d:
            try:
                chart.validate_schema(values)
                chart.render(values, name=RELEASE, namespace=NAMESPACE)
            except helm.HelmError as e:
                if needle not in str(e):
                    raise CheckFailed(f"refused, but the message does not name {needle!r}: {e}")
                d.append("refused")
            else:
                raise CheckFailed(f"values were accepted: {values}")
