"""Runs checkov on the rendered chart, the Terraform and the Dockerfile, offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import skips as skips_mod
from .chart import Rendered, strip_internal
from .report import Report

INLINE_SKIP = re.compile(r"checkov:skip|bridgecrew:skip", re.IGNORECASE)


def checkov_binary() -> str:
    candidate = Path(sys.executable).with_name("checkov")
    return str(candidate) if candidate.exists() else (shutil.which("checkov") or "checkov")


def no_inline_skips(root: Path, report: Report) -> None:
    with report.check("no inline checkov skips outside deploy/checkov-skips.yaml"):
        found = []
        for base in ("helm", "terraform", "Dockerfile", "docker-compose.yml", "deploy"):
            p = root / base
            files = [p] if p.is_file() else ([f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [])
            for f in files:
                if f.name == skips_mod.SKIPS_FILE.name:
                    continue
                try:
                    text = f.read_text()
                except UnicodeDecodeError:
                    continue
                if INLINE_SKIP.search(text):
                    found.append(str(f.relative_to(root)))
        assert not found, "inline skip annotations in: " + ", ".join(found)


def run(root: Path, renders: list[Rendered], workdir: Path, report: Report) -> None:
    report.section("checkov (offline, --skip-download)")
    no_inline_skips(root, report)
    try:
        skips = skips_mod.load(root)
    except Exception as e:  # noqa: BLE001
        report.fail(f"{skips_mod.SKIPS_FILE} is well-formed", str(e))
        return
    report.ok(f"{skips_mod.SKIPS_FILE} is well-formed", f"{len(skips)} skipped checks, each with a reason")
    for s in skips:
        report.note(f"checkov skips {s.id} ({s.scope}): {s.reason}")

    rendered_dir = workdir / "rendered"
    rendered_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    for r in renders:
        safe = r.name.replace(":", "-")
        (rendered_dir / f"{safe}.yaml").write_text(
            yaml.safe_dump_all([strip_internal(o) for o in r.objects], sort_keys=False)
        )
    docker_dir = workdir / "docker"
    docker_dir.mkdir(exist_ok=True)
    shutil.copy(root / "Dockerfile", docker_dir / "Dockerfile")

    targets = [
        ("kubernetes", rendered_dir, "rendered chart"),
        ("terraform", root / "terraform", "terraform/"),
        ("dockerfile", docker_dir, "Dockerfile"),
    ]
    for framework, directory, label in targets:
        skip_ids = [s.id for s in skips if s.scope == framework]
        cmd = [
            checkov_binary(), "-d", str(directory), "--framework", framework,
            "--skip-download", "--quiet", "--compact", "--output", "cli",
        ]
        if skip_ids:
            cmd += ["--skip-check", ",".join(skip_ids)]
        with report.check(f"checkov {framework}: {label}") as d:
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            elapsed = time.monotonic() - start
            out = (proc.stdout + proc.stderr).strip()
            if proc.returncode != 0:
                raise AssertionError(f"checkov exited {proc.returncode}:\n{out[-8000:]}")
            d.append(f"no failed checks, {len(skip_ids)} skipped by the list, {elapsed:.1f}s")
