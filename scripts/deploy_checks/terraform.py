"""Terraform checks that need no provider download: formatting, and the shape of the module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from .report import CheckFailed, Report

RESOURCE_REF = re.compile(r"\b(?:kubernetes_\w+|random_password|helm_release)\.\w+(?:\[\d+\])?(?:\.\w+(?:\[\d+\])?)*")

# Inputs the module's validation blocks must refuse: (variable assignments, what the error names).
BAD_INPUTS = [
    ('namespace = "Not_A_Label"', "namespace"),
    ('trust_domain = "Bad Domain"', "trust_domain"),
    ('etcd = { replicas = 2 }', "etcd.replicas"),
    ('etcd = { bundled = false, endpoints = ["http://etcd:2379"] }', "etcd.endpoints"),
    ('etcd = { bundled = false }', "etcd.endpoints"),
    ('database = { host = "db", ssl_mode = "sometimes" }', "ssl_mode"),
    ('image = { digest = "latest" }', "image.digest"),
    ('ingress = { enabled = true }', "ingress.host"),
    ('database_password = "short"', "database_password"),
    ('cert_manager_issuer = { name = "ca", kind = "Vault" }', "cert_manager_issuer.kind"),
]


def terraform_binary() -> str | None:
    return os.environ.get("TERRAFORM") or shutil.which("terraform") or (
        "/usr/local/bin/terraform" if Path("/usr/local/bin/terraform").exists() else None
    )


def blocks(text: str, kind: str) -> dict[str, str]:
    """Top-level `kind "name" { ... }` blocks of an HCL file, by name (brace matching)."""
    out = {}
    for m in re.finditer(rf'^{kind}\s+"([^"]+)"\s*\{{', text, re.MULTILINE):
        depth, i = 0, m.end() - 1
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        out[m.group(1)] = text[m.end(): i]
    return out


def _tf_env() -> dict[str, str]:
    return {**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1",
            "NO_COLOR": "1"}


def _scratch_module(root: Path, workdir: Path, tf: str) -> Path:
    """A provider-free copy of the module: its variables and locals, with references to
    resources replaced by strings, so that `terraform console` can evaluate the Helm
    values it builds without downloading any provider."""
    module = root / "terraform" / "modules" / "crewmesh"
    scratch = workdir / "tf-module-values"
    scratch.mkdir(parents=True, exist_ok=True)
    main = (module / "main.tf").read_text()
    m = re.search(r"^locals \{.*?^\}\n", main, re.DOTALL | re.MULTILINE)
    if not m:
        raise CheckFailed("modules/crewmesh/main.tf has no locals block")
    (scratch / "locals.tf").write_text(RESOURCE_REF.sub('"stub"', m.group(0)))
    shutil.copy(module / "variables.tf", scratch / "variables.tf")
    proc = subprocess.run([tf, "init", "-input=false", "-no-color", "-backend=false"], cwd=scratch,
                          capture_output=True, text=True, timeout=120, env=_tf_env())
    if proc.returncode != 0:
        raise CheckFailed(f"terraform init of the scratch module failed:\n{proc.stdout}{proc.stderr}")
    return scratch


def _console(tf: str, scratch: Path, tfvars: str, expr: str) -> subprocess.CompletedProcess[str]:
    varfile = scratch / "input.tfvars"
    varfile.write_text(tfvars)
    return subprocess.run([tf, "console", "-no-color", f"-var-file={varfile}"], cwd=scratch, input=expr,
                          capture_output=True, text=True, timeout=120, env=_tf_env())


def _plan(tf: str, scratch: Path, tfvars: str) -> subprocess.CompletedProcess[str]:
    """`terraform plan` of the resource-free scratch module: runs the variables' validation blocks."""
    varfile = scratch / "input.tfvars"
    varfile.write_text(tfvars)
    return subprocess.run([tf, "plan", "-no-color", "-input=false", "-lock=false", "-refresh=false", f"-var-file={varfile}"],
                          cwd=scratch, capture_output=True, text=True, timeout=120, env=_tf_env())


def module_values(root: Path, workdir: Path, report: Report) -> list[tuple[str, dict]]:
    """The Helm values terraform/modules/crewmesh passes to the chart, for each
    scripts/deploy_checks/tfvars/*.tfvars; the chart checks then render them."""
    report.section("Terraform module: variable validation and the values it gives the chart")
    tf = terraform_binary()
    out: list[tuple[str, dict]] = []
    if not tf:
        report.fail("terraform module values", "terraform is not installed (set TERRAFORM to its path)")
        return out
    try:
        scratch = _scratch_module(root, workdir, tf)
    except CheckFailed as e:
        report.fail("terraform module values", str(e))
        return out
    minimal = (Path(__file__).parent / "tfvars" / "minimal.tfvars").read_text()
    for path in sorted((Path(__file__).parent / "tfvars").glob("*.tfvars")):
        with report.check(f"terraform console: module values with {path.name}") as d:
            plan = _plan(tf, scratch, path.read_text())
            assert plan.returncode == 0, f"terraform plan refused the inputs:\n{plan.stdout}{plan.stderr}"
            proc = _console(tf, scratch, path.read_text(), "nonsensitive(yamlencode(local.values))\n")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            text = proc.stdout.strip()
            # console prints a heredoc: <<EOT ... EOT
            text = re.sub(r"^<<EOT\n|\nEOT$", "", text)
            values = yaml.safe_load(text)
            assert isinstance(values, dict) and "services" in values, f"unexpected console output: {text[:300]}"
            out.append((f"terraform:{path.stem}", values))
            d.append(f"{len(values)} top-level keys")
    for assignment, needle in BAD_INPUTS:
        with report.check(f"terraform variable validation refuses {assignment}") as d:
            tfvars = minimal
            key = assignment.split("=", 1)[0].strip()
            tfvars = "\n".join(line for line in tfvars.splitlines() if not line.startswith(key + " ")) + "\n" + assignment + "\n"
            if key == "database":
                tfvars = assignment + '\ndatabase_password = "example-password-0123"\n'
            proc = _plan(tf, scratch, tfvars)
            assert proc.returncode != 0, f"accepted: {assignment}"
            message = proc.stdout + proc.stderr
            assert "Invalid value for variable" in message, message[-600:]
            assert needle.split(".")[0] in message, f"the error does not name {needle}: {message[-600:]}"
            d.append("refused")
    return out


def check(root: Path, report: Report) -> None:
    report.section("Terraform")
    tf_dir = root / "terraform"
    tf = terraform_binary()
    with report.check("terraform fmt -check -recursive terraform/") as d:
        assert tf, "terraform is not installed (set TERRAFORM to its path)"
        proc = subprocess.run([tf, "fmt", "-check", "-recursive", "-diff", "-no-color", str(tf_dir)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "CHECKPOINT_DISABLE": "1"})
        assert proc.returncode == 0, f"not formatted:\n{proc.stdout}{proc.stderr}"
        d.append(f"{sum(1 for _ in tf_dir.rglob('*.tf'))} files")

    module = tf_dir / "modules" / "crewmesh"
    text = "\n".join(p.read_text() for p in sorted(module.glob("*.tf")))
    with report.check("module variables are typed, described and validated") as d:
        variables = blocks(text, "variable")
        problems = []
        for name, body in variables.items():
            if not re.search(r"^\s*description\s*=", body, re.MULTILINE):
                problems.append(f"variable {name}: no description")
            if not re.search(r"^\s*type\s*=", body, re.MULTILINE):
                problems.append(f"variable {name}: no type")
        validated = [n for n, b in variables.items() if "validation {" in b]
        if len(validated) < len(variables) // 2:
            problems.append(f"only {len(validated)} of {len(variables)} variables have validation blocks")
        assert variables, "the module declares no variables"
        assert not problems, "\n".join(problems)
        d.append(f"{len(variables)} variables, {len(validated)} with validation blocks")
    with report.check("module outputs are described") as d:
        outputs = blocks(text, "output")
        missing = [n for n, b in outputs.items() if not re.search(r"^\s*description\s*=", b, re.MULTILINE)]
        assert outputs, "the module declares no outputs"
        assert not missing, f"outputs without description: {missing}"
        d.append(f"{len(outputs)} outputs")
    with report.check("examples compose the module") as d:
        found = []
        for example in ("aws", "gcp"):
            ex = tf_dir / "examples" / example
            ex_text = "\n".join(p.read_text() for p in sorted(ex.glob("*.tf")))
            assert re.search(r'source\s*=\s*"\.\./\.\./modules/crewmesh"', ex_text), f"examples/{example} does not use modules/crewmesh"
            found.append(example)
        d.append(", ".join(found))
