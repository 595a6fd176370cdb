"""A plain HTTP client (the standard library) against the gateway: what any language
without an SDK sees."""

import json
import os
import urllib.error
import urllib.request

BASE = os.environ["CREWMESH_GATEWAY_URL"]
KEY = os.environ["CREWMESH_API_KEY"]


def call(method, path, body=None, key=KEY):
    req = urllib.request.Request(BASE + path, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_models_lists_the_simulated_aliases():
    status, _, body = call("GET", "/v1/models")
    assert status == 200
    ids = {m["id"] for m in body["data"]}
    assert {"sim-small", "sim-large"} <= ids


def test_chat_completion_round_trip():
    status, headers, body = call(
        "POST",
        "/v1/chat/completions",
        {"model": "sim-small", "messages": [{"role": "user", "content": "from python"}]},
    )
    assert status == 200
    assert headers["x-crewmesh-simulated"] == "true"
    assert body["choices"][0]["message"]["content"] == "[simulated] echo: from python"


def test_errors_are_problem_documents():
    status, headers, body = call("GET", "/v1/models", key=None)
    assert status == 401
    assert headers["content-type"] == "application/problem+json"
    assert body["status"] == 401 and body["type"].endswith("/unauthenticated")
