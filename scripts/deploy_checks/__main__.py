"""Entry point: ``python -m deploy_checks --bin PATH/TO/crewmesh [--root REPO]``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import chart, checkov_scan, compose, dockerfile, kube_schema, mesh, terraform
from .report import Report

# Kubernetes versions the rendered manifests are validated against: the oldest the
# chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.31.0", "latest"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy_checks", description=__doc__)
    parser.add_argument("--bin", required=True, help="the crewmesh binary (mesh-policy, check-config)")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2]), help="repository root")
    parser.add_argument("--skip-checkov", action="store_true", help="for quick local iterations only")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    binary = os.path.abspath(args.bin)
    report = Report()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crewmesh-deploy-checks-") as tmp:
        module_values = terraform.module_values(root, Path(tmp), report)
        renders = chart.lint_and_render(root, report, KUBE_VERSIONS[0], module_values)
        for vs in chart.values_sets(root):
            if vs.primary and not any(r.values_set.name == vs.name for r in renders):
                report.fail(f"render [{vs.name}] available for later checks", "the chart did not render")
        kube_schema.validate(renders, report, KUBE_VERSIONS)
        policy = mesh.check_all(renders, binary, report)
        compose.check(root, policy, binary, report)
        dockerfile.check(root, report)
        terraform.check(root, report)
        if args.skip_checkov:
            report.note("checkov skipped (--skip-checkov)")
        else:
            checkov_scan.run(root, renders, Path(tmp), report)
    print(f"\n(took {time.monotonic() - started:.1f}s)")
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
