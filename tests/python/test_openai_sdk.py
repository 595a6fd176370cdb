"""The official `openai` Python SDK, unchanged, against the running mesh.

Needs CREWMESH_GATEWAY_URL and CREWMESH_API_KEY (the Rust end-to-end test sets both).
The models are the simulated upstream's, whose replies are deterministic.
"""

import json
import os

import openai
import pytest

BASE_URL = os.environ["CREWMESH_GATEWAY_URL"].rstrip("/") + "/v1"
API_KEY = os.environ["CREWMESH_API_KEY"]

MESSAGES = [{"role": "user", "content": "hello from the openai sdk"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"input": {"type": "string"}},
                "required": ["input"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0)


def test_chat_completion(client):
    r = client.chat.completions.create(model="sim-small", messages=MESSAGES)
    assert r.object == "chat.completion"
    assert r.model == "sim-small"
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "[simulated] echo: hello from the openai sdk"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens > 0


def test_streamed_chat_completion(client):
    whole = client.chat.completions.create(model="sim-small", messages=MESSAGES)
    stream = client.chat.completions.create(
        model="sim-small",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_tool_calls(client):
    r = client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "weather in Paris"}],
        tools=TOOLS,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"input": "weather in Paris"}

    # The tool's answer goes back and the model replies with text.
    r2 = client.chat.completions.create(
        model="sim-small",
        messages=[
            {"role": "user", "content": "weather in Paris"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        tools=TOOLS,
    )
    assert r2.choices[0].message.content == "[simulated] tool result: sunny"


def test_streamed_tool_calls(client):
    stream = client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": "weather in Paris"}],
        tools=TOOLS,
        stream=True,
    )
    name, args, call_id = "", "", None
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call_id = call_id or tc.id
            name += tc.function.name or ""
            args += tc.function.arguments or ""
    assert call_id and call_id.startswith("call_")
    assert name == "get_weather"
    assert json.loads(args) == {"input": "weather in Paris"}


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.status_code == 404
    assert "no-such-model" in e.value.message


def test_bad_key_is_an_authentication_error():
    bad = openai.OpenAI(base_url=BASE_URL, api_key="cm_not_a_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "sim-small" in ids
    assert "sim-large" in ids


def test_a_stream_that_breaks_raises_instead_of_ending_cleanly(client):
    # An alias whose only deployment drops its streams after a few chunks.
    import time
    import urllib.request

    req = urllib.request.Request(
        os.environ["CREWMESH_GATEWAY_URL"].rstrip("/") + "/v1/config/model/sim-broken?scope=global",
        method="PUT",
        data=json.dumps({"deployments": [{"provider": "simulated", "model": "stream-break"}]}).encode(),
        headers={"Authorization": "Bearer " + API_KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.status in (200, 201)
    deadline = time.monotonic() + 10
    while "sim-broken" not in [m.id for m in client.models.list()]:
        assert time.monotonic() < deadline, "the router never saw sim-broken"
        time.sleep(0.05)

    stream = client.chat.completions.create(
        model="sim-broken",
        messages=[{"role": "user", "content": "a long answer please, long enough to break"}],
        stream=True,
    )
    received = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            received.append(chunk)
    assert received, "the stream started before it broke"
    assert e.value.message
