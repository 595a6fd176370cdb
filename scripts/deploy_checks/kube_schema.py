"""Validates rendered manifests against Kubernetes' OpenAPI schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import kubernetes_validate
from kubernetes_validate import utils as kv_utils

from .chart import Rendered, strip_internal
from .report import Report

# Custom resources: kubernetes-validate ships only the built-in API's schemas.
# Their content is checked by the mesh consistency checks (Certificates) or not at all.
CRD_KINDS = {
    "Certificate": "cert-manager.io",
    "Issuer": "cert-manager.io",
    "ClusterIssuer": "cert-manager.io",
    "ServiceMonitor": "monitoring.coreos.com",
    "PrometheusRule": "monitoring.coreos.com",
    "HTTPRoute": "gateway.networking.k8s.io",
}


def supported_versions(wanted: list[str]) -> list[str]:
    latest = kv_utils.latest_version()
    out = []
    for v in wanted:
        v = latest if v == "latest" else v
        if v not in out:
            out.append(v)
    return out


def validate(renders: list[Rendered], report: Report, versions: list[str]) -> None:
    report.section("Kubernetes schemas (kubernetes-validate, strict)")
    versions = supported_versions(versions)
    skipped: dict[str, int] = {}
    for r in renders:
        for version in versions:
            with report.check(f"kubernetes-validate --strict -k {version} [{r.name}]") as d:
                errors = []
                count = 0
                for obj in r.objects:
                    kind = obj["kind"]
                    if kind in CRD_KINDS:
                        if version == versions[0]:
                            skipped[kind] = skipped.get(kind, 0) + 1
                        continue
                    name = f"{kind}/{obj['metadata'].get('name')}"
                    try:
                        kubernetes_validate.validate(strip_internal(obj), version, strict=True)
                        count += 1
                    except kubernetes_validate.ValidationError as e:
                        path = ".".join(str(p) for p in e.path)
                        errors.append(f"{name}: {path}: {e.message}")
                    except kubernetes_validate.SchemaNotFoundError as e:
                        errors.append(f"{name}: {e.message}")
                if errors:
                    raise AssertionError("\n".join(errors))
                d.append(f"{count} objects")
    if skipped:
        report.note(
            "not schema-validated (custom resources, no schema in kubernetes-validate): "
            + ", ".join(f"{k} ({CRD_KINDS[k]}) x{n}" for k, n in sorted(skipped.items()))
        )
