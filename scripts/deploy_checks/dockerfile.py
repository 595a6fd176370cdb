"""Dockerfile checks: hadolint, the shape of the stages, and the embedded health-check probe."""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .report import Report


def hadolint_binary() -> str | None:
    candidate = Path(sys.executable).with_name("hadolint")
    return str(candidate) if candidate.exists() else shutil.which("hadolint")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        code = 200 if self.path == "/readyz" else 503
        body = b"ok" if code == 200 else b"not ready"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the tcp probe hangs up without a request


def check(root: Path, report: Report) -> None:
    report.section("Dockerfile")
    text = (root / "Dockerfile").read_text()
    with report.check("Dockerfile: builder, runtime and user") as d:
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
        args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))

        def expand(s: str) -> str:
            return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)

        images = [expand(f[0]) for f in froms]
        assert len(images) >= 2, "not a multi-stage build"
        assert re.match(r"rust:1\.95(\.\d+)?-bookworm$", images[0]), f"builder is {images[0]}"
        final = images[-1]
        assert final.startswith(("debian:bookworm-slim", "gcr.io/distroless/cc")), f"runtime is {final}"
        assert "protobuf-compiler" in text, "the builder does not install protobuf-compiler"
        assert "ca-certificates" in text, "the runtime has no ca-certificates"
        users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
        assert users and users[-1].split(":")[0] == "65532", f"final USER is {users[-1] if users else None}"
        assert re.search(r'^ENTRYPOINT\s+\["/usr/local/bin/crewmesh"\]', text, re.MULTILINE), "ENTRYPOINT is not the crewmesh binary"
        d.append(f"{images[0]} -> {final}, USER {users[-1]}")

    hadolint = hadolint_binary()
    if hadolint:
        with report.check("hadolint Dockerfile"):
            proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(root / "Dockerfile")],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        report.fail("hadolint Dockerfile", "hadolint is not installed in the virtualenv")

    m = re.search(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+/usr/local/bin/crewmesh-healthcheck\s*$", text, re.MULTILINE)
    with report.check("Dockerfile: crewmesh-healthcheck probe works") as d:
        assert m, "the Dockerfile does not install /usr/local/bin/crewmesh-healthcheck"
        script = root / m.group(1)
        assert script.is_file(), f"{m.group(1)} does not exist"
        ignore = (root / ".dockerignore").read_text().splitlines()
        assert f"!{m.group(1)}" in ignore or not any(m.group(1).startswith(i.rstrip("/") + "/") for i in ignore), (
            f".dockerignore keeps {m.group(1)} out of the build context"
        )
        bash = shutil.which("bash")
        assert bash, "bash is not installed"
        with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
            f.write(script.read_text())
            f.flush()
            syntax = subprocess.run([bash, "-n", f.name], capture_output=True, text=True)
            assert syntax.returncode == 0, syntax.stderr
            server = _QuietServer(("127.0.0.1", 0), _Handler)
            port = server.server_address[1]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                closed = s.getsockname()[1]
            try:
                def probe(*argv: str) -> int:
                    return subprocess.run([bash, f.name, *argv], capture_output=True, timeout=20).returncode

                cases = [
                    ((str(port), "/readyz"), 0),
                    ((str(port), "/not-ready"), 1),
                    ((str(closed), "/readyz"), 1),
                    (("tcp", str(port)), 0),
                    (("tcp", str(closed)), 1),
                ]
                for argv, want in cases:
                    got = probe(*argv)
                    assert got == want, f"crewmesh-healthcheck {' '.join(argv)} exited {got}, want {want}"
            finally:
                server.shutdown()
        d.append(f"{len(cases)} cases against a loopback HTTP server")
