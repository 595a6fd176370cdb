"""Structure checks of docker-compose.yml and its config files (no Docker engine needed)."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

from .mesh import MeshPolicy, run_check_config
from .report import CheckFailed, Report

REQUIRED = {"certs-init", "etcd", "postgres", "otel-collector", "simulated-upstream"}
TOP_LEVEL = {"name", "services", "networks", "volumes", "secrets", "configs"}


def _named_volumes(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, is_named_volume) of each short-syntax volume."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out.append((v.get("source", ""), v["target"], v.get("type") == "volume"))
            continue
        parts = v.split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, not source.startswith((".", "/", "~"))))
    return out


def _container_port(spec: str) -> int:
    return int(str(spec).split(":")[-1].split("/")[0])


def check(root: Path, policy: MeshPolicy | None, binary: str, report: Report) -> None:
    report.section("docker compose")
    path = root / "docker-compose.yml"
    try:
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no services mapping"
    except Exception as e:  # noqa: BLE001
        report.fail("docker-compose.yml parses", str(e))
        return
    report.ok("docker-compose.yml parses", f"{len(doc['services'])} services")
    services: dict[str, dict[str, Any]] = doc["services"]

    with report.check("compose: top-level keys, references and files") as d:
        problems = []
        unknown = {k for k in doc if k not in TOP_LEVEL and not k.startswith("x-")}
        if unknown:
            problems.append(f"unknown top-level keys {sorted(unknown)}")
        declared_volumes = set(doc.get("volumes") or {})
        declared_secrets = doc.get("secrets") or {}
        declared_networks = set(doc.get("networks") or {})
        for name, s in services.items():
            if "image" not in s and "build" not in s:
                problems.append(f"{name}: neither image nor build")
            for source, _target, named in _named_volumes(s):
                if named and source not in declared_volumes:
                    problems.append(f"{name}: volume {source} is not declared")
                if not named and not (root / source).exists():
                    problems.append(f"{name}: bind mount source {source} does not exist")
            for sec in s.get("secrets") or []:
                sec_name = sec if isinstance(sec, str) else sec["source"]
                if sec_name not in declared_secrets:
                    problems.append(f"{name}: secret {sec_name} is not declared")
            for net in s.get("networks") or []:
                if net not in declared_networks:
                    problems.append(f"{name}: network {net} is not declared")
            deps = s.get("depends_on") or {}
            for dep, cond in (deps.items() if isinstance(deps, dict) else ((x, {}) for x in deps)):
                if dep not in services:
                    problems.append(f"{name}: depends on unknown service {dep}")
                if cond.get("condition") == "service_healthy" and (services.get(dep, {}).get("healthcheck") or {}).get("disable"):
                    problems.append(f"{name}: waits for {dep} to be healthy but {dep} has no health check")
        for sec_name, sec in declared_secrets.items():
            if "file" in sec and not (root / sec["file"]).is_file():
                problems.append(f"secret {sec_name}: file {sec['file']} does not exist")
        missing = REQUIRED - set(services)
        if missing:
            problems.append(f"missing services {sorted(missing)}")
        assert not problems, "\n".join(problems)
        d.append(f"{len(declared_volumes)} volumes, {len(declared_secrets)} secrets")

    with report.check("compose: certs-init makes the mesh certificates once") as d:
        init = services.get("certs-init") or {}
        command = " ".join(init.get("command") or []) if isinstance(init.get("command"), list) else str(init.get("command"))
        assert "crewmesh certs init" in command, f"certs-init does not run `crewmesh certs init`: {command}"
        assert "--dir /etc/crewmesh/tls" in command, "certs-init does not write to /etc/crewmesh/tls"
        assert any(t == "/etc/crewmesh/tls" and named for _s, t, named in _named_volumes(init)), "certs-init has no certs volume"
        assert init.get("restart") in ("no", None), "certs-init must not restart"
        d.append("crewmesh certs init into the certs volume")

    if policy is None:
        report.fail("compose: mesh services", "no mesh policy (crewmesh mesh-policy failed)")
        return
    for svc_name, svc in sorted(policy.services.items()):
        s = services.get(svc_name)
        with report.check(f"compose: {svc_name} container"):
            assert s is not None, f"no compose service named {svc_name}"
            problems = []
            cmd = s.get("command") or []
            if cmd[:2] != ["serve", svc_name] or len(cmd) != 4 or cmd[2] != "--config":
                problems.append(f"command is {cmd}, want serve {svc_name} --config FILE")
            if str(s.get("user", "")).split(":")[0] != "65532":
                problems.append(f"user is {s.get('user')!r}, want 65532")
            if s.get("read_only") is not True:
                problems.append("read_only is not true")
            if "ALL" not in (s.get("cap_drop") or []):
                problems.append("capabilities are not dropped")
            hc = s.get("healthcheck") or {}
            if hc.get("disable") or not hc.get("test"):
                problems.append("no health check")
            deps = s.get("depends_on") or {}
            if (deps.get("certs-init") or {}).get("condition") != "service_completed_successfully":
                problems.append("does not wait for certs-init to complete")
            targets = {t for _s, t, _n in _named_volumes(s)}
            for needed in ("/etc/crewmesh/tls", "/var/lib/crewmesh/spool"):
                if needed not in targets:
                    problems.append(f"nothing mounted at {needed}")
            assert not problems, "\n".join(problems)
        with report.check(f"compose: {svc_name} config file matches the mesh and passes check-config"):
            cfg_path = s["command"][3]
            host_file = None
            for source, target, named in _named_volumes(s):
                if not named and cfg_path.startswith(target.rstrip("/") + "/"):
                    host_file = root / source / cfg_path[len(target.rstrip("/")) + 1:]
            if host_file is None or not host_file.is_file():
                raise CheckFailed(f"{cfg_path} is not a file of the repository mounted into the container")
            text = host_file.read_text()
            cfg = tomllib.loads(text)
            problems = []
            server = cfg.get("server", {})
            if svc.grpc_port is not None and not str(server.get("grpc_addr", "")).endswith(f":{svc.grpc_port}"):
                problems.append(f"server.grpc_addr {server.get('grpc_addr')} != port {svc.grpc_port}")
            if svc.http_port is not None and not cfg.get("gateway", {}).get("http_addr", "").endswith(f":{svc.http_port}"):
                problems.append(f"gateway.http_addr != port {svc.http_port}")
            if not str(server.get("admin_addr", ":9090")).endswith(f":{svc.admin_port}"):
                problems.append(f"server.admin_addr != port {svc.admin_port}")
            if cfg["tls"]["cert_file"] != f"/etc/crewmesh/tls/{svc_name}.pem" or cfg["tls"]["key_file"] != f"/etc/crewmesh/tls/{svc_name}-key.pem":
                problems.append(f"tls files {cfg['tls']} are not this service's certs-init files")
            wanted = {c.replace("-", "_") for c in policy.callees_of(svc_name)}
            peers = cfg.get("peers", {})
            if set(peers) != wanted:
                problems.append(f"[peers] lists {sorted(peers)}; it may call {sorted(wanted)}")
            for key, addr in peers.items():
                callee = key.replace("_", "-")
                host, port = addr.rsplit(":", 1)
                if host not in services:
                    problems.append(f"peers.{key}: host {host} is no compose service")
                elif callee in policy.services and int(port) != policy.services[callee].grpc_port:
                    problems.append(f"peers.{key}: port {port} != {policy.services[callee].grpc_port}")
            ports = [_container_port(p) for p in s.get("ports") or []]
            if svc.http_port is not None and svc.http_port not in ports:
                problems.append(f"the gateway's HTTP port {svc.http_port} is not published")
            otlp = cfg.get("telemetry", {}).get("otlp_endpoint", "")
            if otlp and otlp.split("//", 1)[-1].split(":")[0] not in services:
                problems.append(f"otlp_endpoint {otlp} is no compose service")
            code, out = run_check_config(binary, svc_name, text)
            if code != 0:
                problems.append(f"crewmesh check-config exit {code}: {out}")
            assert not problems, "\n".join(problems)

    with report.check("compose: otel collector config") as d:
        col = services["otel-collector"]
        src = next((s for s, t, n in _named_volumes(col) if not n), None)
        assert src, "the collector mounts no config file"
        conf = yaml.safe_load((root / src).read_text())
        grpc = conf["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        assert grpc.endswith(":4317"), f"OTLP gRPC receiver on {grpc}"
        for name, p in conf["service"]["pipelines"].items():
            for kind in ("receivers", "processors", "exporters"):
                for comp in p.get(kind, []):
                    assert comp in (conf.get(kind) or {}), f"pipeline {name} uses undefined {kind[:-1]} {comp}"
        d.append("OTLP on 4317, pipelines reference defined components")

    docker = shutil.which("docker")
    compose_ok = False
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        compose_ok = probe.returncode == 0
    if compose_ok:
        with report.check("docker compose config -q"):
            proc = subprocess.run([docker, "compose", "-f", str(path), "config", "-q"], capture_output=True, text=True, cwd=root)
            assert proc.returncode == 0, proc.stderr
    else:
        report.note("docker compose plugin not installed: the compose-spec validation (`docker compose config`) was not run")
