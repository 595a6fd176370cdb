"""Checks the rendered chart against the mesh the binary enforces.

`crewmesh mesh-policy` prints each service's identity, ports and the callers on its
allow-lists. The chart must agree: Certificates carry exactly those identities, the
Services and containers expose those ports, NetworkPolicies admit exactly those
callers to each gRPC port (and the callers' egress reaches it), and every rendered
config file passes `crewmesh check-config`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chart import Rendered
from .report import CheckFailed, Report

COMPONENT = "app.kubernetes.io/component"
INSTANCE = "app.kubernetes.io/instance"
# Workloads of the chart that are not mesh services.
SUPPORT_COMPONENTS = {"etcd", "simulated-upstream"}
CLI = "cli"  # the operator's client certificate: a caller, but no pod
CONFIG_PATH = "/etc/crewmesh/config/crewmesh.toml"
TLS_DIR = "/etc/crewmesh/tls"
TRUST_DIR = "/etc/crewmesh/trust"


@dataclass
class ServicePolicy:
    name: str
    identity: str
    admin_port: int
    grpc_port: int | None
    http_port: int | None
    callers: set[str]

    @property
    def pod_callers(self) -> set[str]:
        return self.callers - {CLI}


@dataclass
class MeshPolicy:
    trust_domain: str
    services: dict[str, ServicePolicy]

    def callees_of(self, name: str) -> set[str]:
        return {s.name for s in self.services.values() if name in s.callers}


def load_policy(binary: str, trust_domain: str | None = None) -> MeshPolicy:
    cmd = [binary, "mesh-policy"] + (["--trust-domain", trust_domain] if trust_domain else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise CheckFailed(f"`crewmesh mesh-policy` exited {proc.returncode}: {proc.stderr.strip()}")
    raw = json.loads(proc.stdout)
    services = {}
    for name, s in raw["services"].items():
        services[name] = ServicePolicy(
            name=name,
            identity=s["identity"],
            admin_port=int(s["admin_port"]),
            grpc_port=int(s["grpc_port"]) if s.get("grpc_port") is not None else None,
            http_port=int(s["http_port"]) if s.get("http_port") is not None else None,
            callers=set(s.get("callers", [])),
        )
    return MeshPolicy(raw["trust_domain"], services)


# ---------------------------------------------------------------- object helpers


def labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def selector_matches(selector: dict[str, Any] | None, pod_labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics; an empty selector matches everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if pod_labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in pod_labels
        if op == "In" and not (present and pod_labels[key] in values):
            return False
        if op == "NotIn" and present and pod_labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


class Workloads:
    """The pods of a render, by component."""

    def __init__(self, r: Rendered) -> None:
        self.by_component: dict[str, dict[str, Any]] = {}
        for o in r.objects:
            if o["kind"] in ("Deployment", "StatefulSet"):
                self.by_component[labels(o).get(COMPONENT, o["metadata"]["name"])] = o

    def pod_labels(self, component: str) -> dict[str, str]:
        return self.by_component[component]["spec"]["template"]["metadata"]["labels"]

    def matching(self, selector: dict[str, Any] | None) -> set[str]:
        return {c for c in self.by_component if selector_matches(selector, self.pod_labels(c))}

    def container(self, component: str) -> dict[str, Any]:
        return self.by_component[component]["spec"]["template"]["spec"]["containers"][0]

    def named_port(self, component: str, name: str) -> int | None:
        for p in self.container(component).get("ports", []):
            if p.get("name") == name:
                return int(p["containerPort"])
        return None


def port_matches(rule_ports: list[dict[str, Any]] | None, port: int, w: Workloads, component: str) -> bool:
    """Does a NetworkPolicy rule's port list cover `port` on `component`'s pods?"""
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        value = p.get("port")
        if value is None:
            return True
        if isinstance(value, str):
            value = w.named_port(component, value)
        if value is None:
            continue
        end = p.get("endPort", value)
        if int(value) <= port <= int(end):
            return True
    return False


def policies_selecting(r: Rendered, w: Workloads, component: str, policy_type: str) -> list[dict[str, Any]]:
    out = []
    for np in r.of_kind("NetworkPolicy"):
        spec = np["spec"]
        types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])
        if policy_type in types and selector_matches(spec.get("podSelector"), w.pod_labels(component)):
            out.append(np)
    return out


def admitted_sources(r: Rendered, w: Workloads, target: str, port: int) -> tuple[set[str], list[str]]:
    """Components whose pods the NetworkPolicies let reach `target`'s `port`, and problems
    (sources outside the release, or rules open to any source)."""
    admitted: set[str] = set()
    problems: list[str] = []
    nps = policies_selecting(r, w, target, "Ingress")
    if not nps:
        return set(), [f"no NetworkPolicy restricts ingress to {target}: every source is admitted"]
    for np in nps:
        for i, rule in enumerate(np["spec"].get("ingress") or []):
            if not port_matches(rule.get("ports"), port, w, target):
                continue
            where = f"NetworkPolicy {np['metadata']['name']} ingress[{i}]"
            peers = rule.get("from") or []
            if not peers:
                problems.append(f"{where} admits any source to port {port}")
                continue
            for peer in peers:
                if "ipBlock" in peer or "namespaceSelector" in peer:
                    problems.append(f"{where} admits a source outside the release to port {port}: {peer}")
                    continue
                matched = w.matching(peer.get("podSelector"))
                sel = peer.get("podSelector") or {}
                if INSTANCE not in (sel.get("matchLabels") or {}):
                    problems.append(f"{where}: podSelector {sel} is not scoped to the release (no {INSTANCE})")
                if not matched:
                    problems.append(f"{where}: podSelector {sel} matches no pod of the release")
                admitted |= matched
    return admitted, problems


def egress_allowed(r: Rendered, w: Workloads, source: str, target: str, port: int) -> bool:
    nps = policies_selecting(r, w, source, "Egress")
    if not nps:
        return True
    for np in nps:
        for rule in np["spec"].get("egress") or []:
            if not port_matches(rule.get("ports"), port, w, target):
                continue
            peers = rule.get("to") or []
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    return True
                if "namespaceSelector" in peer:
                    continue  # other namespaces only (the release is in one namespace)
                if target in w.matching(peer.get("podSelector")):
                    return True
    return False


def config_toml(r: Rendered, component: str) -> str:
    for cm in r.of_kind("ConfigMap"):
        if labels(cm).get(COMPONENT) == component and "crewmesh.toml" in (cm.get("data") or {}):
            return cm["data"]["crewmesh.toml"]
    raise CheckFailed(f"no ConfigMap with crewmesh.toml for {component}")


def addr_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts") or []}


def volume(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for v in pod_spec.get("volumes") or []:
        if v["name"] == name:
            return v
    raise CheckFailed(f"volume {name} is not defined")


def covering_mount(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    best = None
    for mp, m in mounts(container).items():
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    return best


# ---------------------------------------------------------------- the checks


def check_certificate(r: Rendered, w: Workloads, svc: ServicePolicy, td: str, policy: MeshPolicy) -> list[str]:
    problems = []
    expected = svc.identity  # from `crewmesh mesh-policy --trust-domain <the render's trustDomain>`
    if policy.trust_domain != td:
        problems.append(f"the policy is for trust domain {policy.trust_domain}, the render uses {td}")
    pod = w.by_component[svc.name]["spec"]["template"]["spec"]
    tls_mount = mounts(w.container(svc.name)).get(TLS_DIR)
    if tls_mount is None:
        return [f"{svc.name}: nothing is mounted at {TLS_DIR}"]
    mounted_secret = volume(pod, tls_mount["name"]).get("secret", {}).get("secretName")
    if r.values["tls"]["source"] == "certManager":
        certs = [c for c in r.of_kind("Certificate") if labels(c).get(COMPONENT) == svc.name]
        if len(certs) != 1:
            return [f"{svc.name}: expected one Certificate, found {len(certs)}"]
        spec = certs[0]["spec"]
        if spec.get("uris") != [expected]:
            problems.append(f"{svc.name}: Certificate URI SANs {spec.get('uris')} != [{expected}]")
        for usage in ("server auth", "client auth"):
            if usage not in (spec.get("usages") or []):
                problems.append(f"{svc.name}: Certificate lacks usage {usage!r}")
        if spec.get("secretName") != mounted_secret:
            problems.append(f"{svc.name}: Certificate writes {spec.get('secretName')} but the pod mounts {mounted_secret}")
    else:
        key = "".join(p if i == 0 else p.title() for i, p in enumerate(svc.name.split("-")))
        wanted = r.values["tls"]["existingSecrets"].get(key)
        if mounted_secret != wanted:
            problems.append(f"{svc.name}: mounts Secret {mounted_secret}, values name {wanted}")
    return problems


def check_ports(r: Rendered, w: Workloads, svc: ServicePolicy) -> list[str]:
    problems = []
    services = [s for s in r.of_kind("Service") if labels(s).get(COMPONENT) == svc.name]
    if len(services) != 1:
        return [f"{svc.name}: expected one Service, found {len(services)}"]
    sports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    expected = {"admin": svc.admin_port}
    if svc.grpc_port is not None:
        expected["grpc"] = svc.grpc_port
    if svc.http_port is not None:
        expected["http"] = svc.http_port
    for name, port in expected.items():
        sp = sports.get(name)
        if sp is None:
            problems.append(f"{svc.name}: Service has no port named {name}")
            continue
        if int(sp["port"]) != port:
            problems.append(f"{svc.name}: Service port {name} is {sp['port']}, policy says {port}")
        target = sp.get("targetPort", sp["port"])
        target = w.named_port(svc.name, target) if isinstance(target, str) else int(target)
        if target != port:
            problems.append(f"{svc.name}: Service port {name} targets {target}, policy says {port}")
        if w.named_port(svc.name, name) != port:
            problems.append(f"{svc.name}: container port {name} is {w.named_port(svc.name, name)}, policy says {port}")
    extra = set(sports) - set(expected)
    if extra:
        problems.append(f"{svc.name}: Service exposes ports the policy does not list: {sorted(extra)}")
    if svc.grpc_port is None and "grpc" in sports:
        problems.append(f"{svc.name}: has no gRPC port in the policy but the Service exposes one")
    return problems


def check_network_policy(r: Rendered, w: Workloads, svc: ServicePolicy, policy: MeshPolicy) -> list[str]:
    problems = []
    if svc.grpc_port is not None:
        admitted, p = admitted_sources(r, w, svc.name, svc.grpc_port)
        problems += p
        expected = svc.pod_callers
        if admitted != expected:
            missing = sorted(expected - admitted)
            extra = sorted(admitted - expected)
            problems.append(
                f"{svc.name}: gRPC port {svc.grpc_port} admits {sorted(admitted)}; policy callers {sorted(expected)}"
                + (f"; missing {missing}" if missing else "") + (f"; extra {extra}" if extra else "")
            )
        reach = {c for c in policy.services if c in w.by_component and egress_allowed(r, w, c, svc.name, svc.grpc_port)}
        if reach != expected:
            problems.append(
                f"{svc.name}: egress to gRPC port {svc.grpc_port} is allowed from {sorted(reach)}; policy callers {sorted(expected)}"
            )
    if svc.http_port is not None:
        if not any(
            port_matches(rule.get("ports"), svc.http_port, w, svc.name)
            for np in policies_selecting(r, w, svc.name, "Ingress")
            for rule in np["spec"].get("ingress") or []
        ):
            problems.append(f"{svc.name}: no NetworkPolicy admits traffic to the HTTP port {svc.http_port}")
    if not any(
        port_matches(rule.get("ports"), svc.admin_port, w, svc.name) and rule.get("ports")
        for np in policies_selecting(r, w, svc.name, "Ingress")
        for rule in np["spec"].get("ingress") or []
    ):
        problems.append(f"{svc.name}: no NetworkPolicy admits scrapes of the admin port {svc.admin_port}")
    return problems


def check_config_file(r: Rendered, w: Workloads, svc: ServicePolicy, policy: MeshPolicy) -> tuple[list[str], dict[str, Any]]:
    problems = []
    cfg = tomllib.loads(config_toml(r, svc.name))
    server = cfg.get("server", {})
    if svc.grpc_port is not None:
        if "grpc_addr" not in server or addr_port(server["grpc_addr"]) != svc.grpc_port:
            problems.append(f"{svc.name}: server.grpc_addr {server.get('grpc_addr')} does not listen on {svc.grpc_port}")
    elif "grpc_addr" in server:
        problems.append(f"{svc.name}: server.grpc_addr is set but the service has no gRPC port")
    if addr_port(server.get("admin_addr", "0.0.0.0:9090")) != svc.admin_port:
        problems.append(f"{svc.name}: server.admin_addr {server.get('admin_addr')} != port {svc.admin_port}")
    if svc.http_port is not None:
        http_addr = cfg.get("gateway", {}).get("http_addr", "")
        if not http_addr or addr_port(http_addr) != svc.http_port:
            problems.append(f"{svc.name}: gateway.http_addr {http_addr!r} does not listen on {svc.http_port}")
    # Peers: exactly the services this one may call, at their Service names and gRPC ports.
    svc_names = {labels(s).get(COMPONENT): s["metadata"]["name"] for s in r.of_kind("Service")}
    peers = cfg.get("peers", {})
    wanted = {c.replace("-", "_") for c in policy.callees_of(svc.name)}
    if set(peers) != wanted:
        problems.append(f"{svc.name}: [peers] lists {sorted(peers)}; it may call {sorted(wanted)}")
    for key, addr in peers.items():
        callee = key.replace("_", "-")
        if callee not in policy.services or policy.services[callee].grpc_port is None:
            continue
        host, port = addr.rsplit(":", 1)
        if host != svc_names.get(callee) or int(port) != policy.services[callee].grpc_port:
            problems.append(
                f"{svc.name}: peers.{key} = {addr!r}, expected {svc_names.get(callee)}:{policy.services[callee].grpc_port}"
            )
    # Every file the config names is inside a mounted volume.
    c = w.container(svc.name)
    files = [cfg["tls"][k] for k in ("ca_file", "cert_file", "key_file")]
    files += [v for v in (cfg.get("database", {}).get("password_file"), cfg.get("gateway", {}).get("bootstrap_api_key_file")) if v]
    etcd = cfg.get("store", {}).get("etcd", {})
    files += [etcd[k] for k in ("ca_file", "cert_file", "key_file", "password_file") if k in etcd]
    for f in files:
        if covering_mount(c, f) is None:
            problems.append(f"{svc.name}: {f} is named in the config but no volume is mounted there")
    for key in ("cert_file", "key_file"):
        if not str(cfg["tls"][key]).startswith(TLS_DIR + "/"):
            problems.append(f"{svc.name}: tls.{key} {cfg['tls'][key]} is outside {TLS_DIR}")
    bundle = r.values["tls"].get("trustBundle", {}).get("configMap")
    ca_dir = TRUST_DIR if bundle else TLS_DIR
    if not str(cfg["tls"]["ca_file"]).startswith(ca_dir + "/"):
        problems.append(f"{svc.name}: tls.ca_file {cfg['tls']['ca_file']} is outside {ca_dir}")
    if cfg.get("trust_domain", policy.trust_domain) != r.values["trustDomain"]:
        problems.append(f"{svc.name}: trust_domain {cfg.get('trust_domain')} != values trustDomain {r.values['trustDomain']}")
    args = c.get("args") or []
    if args != ["serve", svc.name, "--config", CONFIG_PATH]:
        problems.append(f"{svc.name}: container args {args}")
    if covering_mount(c, CONFIG_PATH) is None:
        problems.append(f"{svc.name}: {CONFIG_PATH} is not mounted")
    return problems, cfg


# Fields naming files that a pod gets from Secrets, which check-config reads. Outside
# the pod they do not exist: each is pointed at a placeholder file through its
# CREWMESH_* environment override; every other field is checked as rendered.
SECRET_FILE_FIELDS = {
    ("gateway", "bootstrap_api_key_file"): "CREWMESH_GATEWAY__BOOTSTRAP_API_KEY_FILE",
    ("store", "etcd", "password_file"): "CREWMESH_STORE__ETCD__PASSWORD_FILE",
    ("database", "password_file"): "CREWMESH_DATABASE__PASSWORD_FILE",
}


def run_check_config(binary: str, service: str, text: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix=f"crewmesh-{service}-") as tmp:
        path = Path(tmp) / "crewmesh.toml"
        path.write_text(text)
        env = {"PATH": "/usr/bin:/bin"}  # no CREWMESH_* overrides from the caller's environment
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            cfg = {}
        for keys, var in SECRET_FILE_FIELDS.items():
            node = cfg
            for k in keys:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, str):
                placeholder = Path(tmp) / f"secret-{keys[-1]}"
                placeholder.write_text("placeholder-secret-for-check-config-0123456789\n")
                env[var] = str(placeholder)
        proc = subprocess.run(
            [binary, "check-config", "--service", service, "--config", str(path)],
            capture_output=True, text=True, timeout=60, env=env,
        )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def check_hardening(r: Rendered) -> list[str]:
    problems = []
    for o in r.objects:
        if o["kind"] == "ServiceAccount" and o.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount {o['metadata']['name']}: automountServiceAccountToken is not false")
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        name = f"{o['kind']} {o['metadata']['name']}"
        pod = o["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken is not false")
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod runAsNonRoot is not true")
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            csc = c.get("securityContext") or {}
            where = f"{name} container {c['name']}"
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities are not all dropped")
            if (csc.get("capabilities") or {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                problems.append(f"{where}: seccomp profile is {seccomp}, not RuntimeDefault")
            if csc.get("runAsNonRoot") is False or csc.get("runAsUser") == 0:
                problems.append(f"{where}: may run as root")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r_ in ("cpu", "memory"):
                    if r_ not in (res.get(kind) or {}):
                        problems.append(f"{where}: no {kind}.{r_}")
            for m in c.get("volumeMounts") or []:
                if m.get("subPath") and "secret" in volume(pod, m["name"]):
                    problems.append(f"{where}: Secret mounted with subPath at {m['mountPath']}: rotation would not reach it")
            if labels(o).get(COMPONENT) in ("gateway", "router", "agent-runtime", "audit", "config", "metrics"):
                for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                    got = (c.get(probe) or {}).get("httpGet") or {}
                    if got.get("path") != path or got.get("port") != "admin":
                        problems.append(f"{where}: {probe} is not HTTP GET {path} on the admin port")
                for path in ("/tmp", "/var/lib/crewmesh/spool"):
                    m = mounts(c).get(path)
                    if m is None or "emptyDir" not in volume(pod, m["name"]):
                        problems.append(f"{where}: no emptyDir mounted at {path} (the root filesystem is read-only)")
    return problems


def check_scaling(r: Rendered, w: Workloads, policy: MeshPolicy) -> list[str]:
    problems = []
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in r.of_kind("HorizontalPodAutoscaler")}
    for name in policy.services:
        deploy = w.by_component[name]
        dname = deploy["metadata"]["name"]
        hpa = hpas.get(dname)
        if hpa is not None and "replicas" in deploy["spec"]:
            problems.append(f"{name}: Deployment sets replicas although HPA {hpa['metadata']['name']} scales it")
        if hpa is not None and hpa["spec"]["minReplicas"] > hpa["spec"]["maxReplicas"]:
            problems.append(f"{name}: HPA minReplicas > maxReplicas")
        if r.values["autoscaling"]["enabled"] and hpa is None:
            svc_values = r.values["services"]["".join(p if i == 0 else p.title() for i, p in enumerate(name.split("-")))]
            if str(svc_values.get("autoscaling", {}).get("enabled", "")).lower() != "false":
                problems.append(f"{name}: autoscaling is enabled but no HPA targets {dname}")
        if r.values["podDisruptionBudget"]["enabled"]:
            pdbs = [p for p in r.of_kind("PodDisruptionBudget") if selector_matches(p["spec"]["selector"], w.pod_labels(name))]
            if len(pdbs) != 1:
                problems.append(f"{name}: {len(pdbs)} PodDisruptionBudgets select its pods (want 1)")
    for dname in hpas:
        if dname not in {d["metadata"]["name"] for d in r.of_kind("Deployment")}:
            problems.append(f"HPA targets a Deployment that is not rendered: {dname}")
    return problems


def check_render(r: Rendered, policy: MeshPolicy, binary: str, report: Report) -> None:
    w = Workloads(r)
    td = r.values["trustDomain"]
    with report.check(f"every policy service has a Deployment [{r.name}]"):
        missing = sorted(set(policy.services) - set(w.by_component))
        unknown = sorted(set(w.by_component) - set(policy.services) - SUPPORT_COMPONENTS)
        assert not missing, f"no Deployment for {missing}"
        assert not unknown, f"workloads the binary does not know: {unknown}"
    np_enabled = bool(r.of_kind("NetworkPolicy"))
    if not np_enabled and r.values_set.primary:
        report.fail(f"NetworkPolicies rendered [{r.name}]", "no NetworkPolicy rendered")
    for name, svc in sorted(policy.services.items()):
        if name not in w.by_component:
            continue
        report.expect(f"{name}: certificate identity {'cert-manager' if r.values['tls']['source'] == 'certManager' else 'Secret'} [{r.name}]",
                      check_certificate(r, w, svc, td, policy))
        report.expect(f"{name}: Service and container ports [{r.name}]", check_ports(r, w, svc))
        if np_enabled:
            report.expect(f"{name}: NetworkPolicy admits exactly its callers [{r.name}]",
                          check_network_policy(r, w, svc, policy),
                          ", ".join(sorted(svc.pod_callers)) or "no gRPC port")
        with report.check(f"{name}: config file matches the mesh [{r.name}]"):
            problems, _ = check_config_file(r, w, svc, policy)
            assert not problems, "\n".join(problems)
        with report.check(f"{name}: crewmesh check-config [{r.name}]"):
            code, out = run_check_config(binary, name, config_toml(r, name))
            assert code == 0, f"exit {code}: {out}"
    if not np_enabled and not r.values_set.primary:
        report.note(f"{r.name}: networkPolicy.enabled is false, NetworkPolicy checks do not apply")
    report.expect(f"pods are hardened [{r.name}]", check_hardening(r))
    report.expect(f"autoscaling and disruption budgets [{r.name}]", check_scaling(r, w, policy))


def negative_controls(r: Rendered, policy: MeshPolicy, binary: str, report: Report) -> None:
    """The checks above must catch a broken chart: break a copy and expect problems."""
    router = policy.services.get("router")
    audit = policy.services.get("audit")
    if router is None or audit is None:
        report.fail("negative controls", "the policy has no router or audit service")
        return

    def broken(mutate) -> Rendered:
        objects = copy.deepcopy(r.objects)
        mutate(objects)
        return Rendered(r.values_set, r.values, objects, r.notes)

    def drop_gateway_from_router(objs):
        for o in objs:
            if o["kind"] == "NetworkPolicy" and labels(o).get(COMPONENT) == "router":
                for rule in o["spec"]["ingress"]:
                    rule["from"] = [p for p in rule.get("from", []) if "gateway" not in json.dumps(p)] or rule.get("from")

    def open_audit_to_namespace(objs):
        for o in objs:
            if o["kind"] == "NetworkPolicy" and labels(o).get(COMPONENT) == "audit":
                o["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})

    def wrong_san(objs):
        for o in objs:
            if o["kind"] == "Certificate" and labels(o).get(COMPONENT) == "router":
                o["spec"]["uris"] = [f"spiffe://{r.values['trustDomain']}/gateway"]

    def wrong_port(objs):
        for o in objs:
            if o["kind"] == "Service" and labels(o).get(COMPONENT) == "audit":
                o["spec"]["ports"][0]["port"] = 7999

    cases = [
        ("a NetworkPolicy missing a caller", drop_gateway_from_router, lambda b: check_network_policy(b, Workloads(b), router, policy)),
        ("a NetworkPolicy open to another namespace", open_audit_to_namespace, lambda b: check_network_policy(b, Workloads(b), audit, policy)),
        ("a Certificate with another identity", wrong_san, lambda b: check_certificate(b, Workloads(b), router, r.values["trustDomain"], policy)),
        ("a Service on the wrong port", wrong_port, lambda b: check_ports(b, Workloads(b), audit)),
    ]
    for title, mutate, run in cases:
        with report.check(f"negative: consistency check catches {title}") as d:
            problems = run(broken(mutate))
            assert problems, "the broken render passed"
            d.append(problems[0][:120])
    with report.check("negative: crewmesh check-config refuses an unknown field (exit 64)") as d:
        code, out = run_check_config(binary, "router", config_toml(r, "router") + "\nbogus_field = 1\n")
        assert code == 64, f"exit {code}: {out}"
        assert "bogus_field" in out, f"the message does not name the field: {out}"
        d.append("exit 64")


def check_all(renders: list[Rendered], binary: str, report: Report) -> MeshPolicy | None:
    report.section("Mesh consistency (crewmesh mesh-policy vs the rendered chart)")
    try:
        policy = load_policy(binary)
    except Exception as e:  # noqa: BLE001
        report.fail("crewmesh mesh-policy", str(e))
        return None
    report.ok("crewmesh mesh-policy", f"trust domain {policy.trust_domain}, services {', '.join(sorted(policy.services))}")
    report.note("check-config runs on each rendered file as is, except that the files a pod gets from "
                "Secrets (bootstrap API key, etcd and database passwords) are placeholders, set through "
                "their CREWMESH_* overrides")
    by_domain = {policy.trust_domain: policy}
    for r in renders:
        td = r.values["trustDomain"]
        if td not in by_domain:
            with report.check(f"crewmesh mesh-policy --trust-domain {td}"):
                by_domain[td] = load_policy(binary, td)
                assert by_domain[td].services.keys() == policy.services.keys(), "the services differ by trust domain"
        if td in by_domain:
            check_render(r, by_domain[td], binary, report)
    default = next((r for r in renders if r.name == "default"), None)
    if default is not None:
        negative_controls(default, policy, binary, report)
    return policy
