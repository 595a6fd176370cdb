"""OpenFeature's Python SDK with its OFREP provider, pointed at the gateway: crewmesh as
the flag backend of any OpenFeature application."""

import json
import os
import urllib.error
import urllib.request

import pytest
from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import ErrorCode, Reason

BASE = os.environ["CREWMESH_GATEWAY_URL"]
KEY = os.environ["CREWMESH_API_KEY"]


def put_flag(name, spec):
    req = urllib.request.Request(
        f"{BASE}/v1/config/flag/{name}?scope=global", method="PUT"
    )
    req.add_header("Authorization", f"Bearer {KEY}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, json.dumps(spec).encode(), timeout=10) as resp:
        assert resp.status in (200, 201)


@pytest.fixture(scope="module")
def client():
    put_flag("py-dark-mode", {"variants": {"on": True, "off": False}, "default_variant": "off",
                              "rules": [{"when": {"attribute": "plan", "op": "in", "value": ["pro", "team"]},
                                         "variant": "on"}]})
    put_flag("py-banner", {"variants": {"a": "hello", "b": "bonjour"}, "default_variant": "a"})
    put_flag("py-limit", {"variants": {"low": 10, "high": 100}, "default_variant": "low",
                          "rules": [{"when": {"attribute": "app_version", "op": "semver_gte", "value": "2.0.0"},
                                     "variant": "high"}]})
    put_flag("py-ratio", {"variants": {"small": 0.25, "big": 0.75}, "default_variant": "small"})
    put_flag("py-theme", {"variants": {"dark": {"bg": "black"}, "light": {"bg": "white"}},
                          "default_variant": "light",
                          "rollout": [{"variant": "dark", "weight": 50}, {"variant": "light", "weight": 50}]})
    api.set_provider(OFREPProvider(BASE, headers_factory=lambda: {"Authorization": f"Bearer {KEY}"}))
    return api.get_client()


def test_boolean_flag_with_targeting(client):
    pro = client.get_boolean_details("py-dark-mode", False, EvaluationContext("u1", {"plan": "pro"}))
    assert (pro.value, pro.variant, pro.reason) == (True, "on", Reason.TARGETING_MATCH)
    free = client.get_boolean_details("py-dark-mode", True, EvaluationContext("u1", {"plan": "free"}))
    assert (free.value, free.variant, free.reason) == (False, "off", Reason.DEFAULT)


def test_string_integer_float_and_object_flags(client):
    banner = client.get_string_details("py-banner", "x")
    assert (banner.value, banner.reason) == ("hello", Reason.STATIC)
    assert client.get_integer_value("py-limit", 0, EvaluationContext("u", {"app_version": "2.1.0"})) == 100
    assert client.get_integer_value("py-limit", 0, EvaluationContext("u", {"app_version": "1.9.9"})) == 10
    assert client.get_float_value("py-ratio", 0.0) == 0.25
    theme = client.get_object_details("py-theme", {}, EvaluationContext("user-42"))
    assert theme.reason == Reason.SPLIT
    assert theme.value in ({"bg": "black"}, {"bg": "white"})
    # The same targeting key always lands in the same variant.
    for _ in range(5):
        assert client.get_object_value("py-theme", {}, EvaluationContext("user-42")) == theme.value


def test_errors_fall_back_to_the_default(client):
    missing = client.get_boolean_details("py-no-such-flag", True)
    assert (missing.value, missing.error_code, missing.reason) == (True, ErrorCode.FLAG_NOT_FOUND, Reason.ERROR)
    no_key = client.get_object_details("py-theme", {"bg": "none"})
    assert no_key.value == {"bg": "none"}
    assert no_key.error_code == ErrorCode.TARGETING_KEY_MISSING
    wrong_type = client.get_boolean_details("py-banner", False)
    assert (wrong_type.value, wrong_type.error_code) == (False, ErrorCode.TYPE_MISMATCH)


def test_bulk_evaluation_and_etag():
    req = urllib.request.Request(f"{BASE}/ofrep/v1/evaluate/flags", method="POST")
    req.add_header("Authorization", f"Bearer {KEY}")
    req.add_header("Content-Type", "application/json")
    body = json.dumps({"context": {"targetingKey": "user-42", "plan": "pro"}}).encode()
    with urllib.request.urlopen(req, body, timeout=10) as resp:
        etag = resp.headers["ETag"]
        flags = {f["key"]: f for f in json.loads(resp.read())["flags"]}
    assert flags["py-dark-mode"]["value"] is True
    assert flags["py-banner"]["reason"] == "STATIC"
    req.add_header("If-None-Match", etag)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, body, timeout=10)
    assert err.value.code == 304
