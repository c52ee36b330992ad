"""Bad input, row by row: the right status, an OpenAI error body, and a server that still serves."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CMPL = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
LONG_PROMPT = "hello world " * 200  # > 256 tokens, the tiny model's context

# name, path, body (dict, or raw bytes), extra headers, status, error code, words the message must contain
ROWS: list[tuple[str, str, Any, dict[str, str], int, str | None, tuple[str, ...]]] = [
    ("unknown precision (header)", CMPL, OK_CMPL, {"X-Precision": "w7"}, 400, "invalid_precision", ("w7", "w8, w6")),
    ("unknown precision (alias)", CMPL, {**OK_CMPL, "model": f"{MODEL}@w1"}, {}, 400, "invalid_precision", ("w1",)),
    ("malformed spec", CMPL, {**OK_CMPL, "precision": "fast"}, {}, 400, "invalid_precision", ("fast", "mixed:X")),
    ("bad auto bound", CHAT, {**OK_CHAT, "precision": "auto;min=w9"}, {}, 400, "invalid_precision", ("w9",)),
    ("mixed without profiles", CMPL, {**OK_CMPL, "precision": "mixed:3.5"}, {}, 400, "invalid_precision", ("mixed:3.5",)),
    ("negative max_tokens", CMPL, {**OK_CMPL, "max_tokens": -1}, {}, 400, None, ("max_tokens", "-1")),
    ("zero max_tokens", CHAT, {**OK_CHAT, "max_tokens": 0}, {}, 400, None, ("max_tokens",)),
    ("zero max_tokens without echo", CMPL, {**OK_CMPL, "max_tokens": 0}, {}, 400, None, ("max_tokens", "echo")),
    ("huge max_tokens", CMPL, {**OK_CMPL, "max_tokens": 10**9}, {}, 400, "context_length_exceeded", ("256",)),
    ("max_tokens of wrong type", CMPL, {**OK_CMPL, "max_tokens": "many"}, {}, 400, "invalid_value", ("max_tokens",)),
    ("temperature of wrong type", CHAT, {**OK_CHAT, "temperature": "hot"}, {}, 400, "invalid_value", ("temperature",)),
    ("temperature out of range", CHAT, {**OK_CHAT, "temperature": 5}, {}, 400, "invalid_value", ("temperature",)),
    ("stream of wrong type", CMPL, {**OK_CMPL, "stream": "yes"}, {}, 400, "invalid_value", ("stream",)),
    ("prompt of wrong type", CMPL, {**OK_CMPL, "prompt": 5}, {}, 400, "invalid_value", ("prompt",)),
    ("messages of wrong type", CHAT, {**OK_CHAT, "messages": "hi"}, {}, 400, "invalid_value", ("messages",)),
    ("unknown role", CHAT, {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, {}, 400, "invalid_value",
     ("role",)),
    ("missing prompt", CMPL, {"model": MODEL}, {}, 400, "invalid_value", ("prompt",)),
    ("invalid JSON", CMPL, b'{"model": "tiny", "prompt": ', {}, 400, "invalid_json", ("JSON",)),
    ("empty messages", CHAT, {**OK_CHAT, "messages": []}, {}, 400, None, ("messages",)),
    ("empty prompt", CMPL, {**OK_CMPL, "prompt": ""}, {}, 400, None, ("empty",)),
    ("token id outside the vocabulary", CMPL, {**OK_CMPL, "prompt": [1, 99999]}, {}, 400, None, ("99999",)),
    ("unknown model", CMPL, {**OK_CMPL, "model": "gpt-4"}, {}, 404, "model_not_found", ("gpt-4",)),
    ("stream_options without stream", CMPL, {**OK_CMPL, "stream_options": {"include_usage": True}}, {}, 400,
     "unsupported", ("stream_options",)),
    ("prompt over the context", CMPL, {**OK_CMPL, "prompt": LONG_PROMPT}, {}, 400, "context_length_exceeded",
     ("context",)),
    ("chat over the context", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": LONG_PROMPT}]}, {}, 400,
     "context_length_exceeded", ("context",)),
    ("missing API key", CMPL, OK_CMPL, {"Authorization": ""}, 401, "invalid_api_key", ("API key",)),
    ("wrong API key", CHAT, OK_CHAT, {"Authorization": "Bearer nope"}, 401, "invalid_api_key", ("API key",)),
    ("no API key on bad JSON", CMPL, b"{", {"Authorization": ""}, 401, "invalid_api_key", ("API key",)),
    # JSON may escape a lone surrogate ("\\ud800"); json.dumps writes the escape (httpx's json= cannot send it)
    ("lone surrogate in the prompt", CMPL, json.dumps({**OK_CMPL, "prompt": "hi \ud800"}).encode(), {}, 400, "invalid_value",
     ("prompt", "surrogate")),
    ("lone surrogate in a message", CHAT, json.dumps({**OK_CHAT, "messages": [{"role": "user", "content": "hi \udfff"}]}).encode(), {}, 400,
     "invalid_value", ("messages.0.content", "surrogate")),
    ("lone surrogate in a stop string", CMPL, json.dumps({**OK_CMPL, "stop": ["ok", "\ud83d"]}).encode(), {}, 400, "invalid_value",
     ("stop.1",)),
    ("zero max_completion_tokens", CHAT, {**OK_CHAT, "max_completion_tokens": 0}, {}, 400, None,
     ("max_completion_tokens", "at least 1")),
    ("seed over 64 bits", CMPL, {**OK_CMPL, "seed": 2**70}, {}, 400, "invalid_value", ("seed",)),
    ("very long precision", CMPL, OK_CMPL, {"X-Precision": "w" * 10_000}, 400, "invalid_precision",
     ("10000 characters",)),
]


# name, path, body, the field the 400 must name
FIELD_ROWS: list[tuple[str, str, dict[str, Any], str]] = [
    ("logprobs over 20", CMPL, {**OK_CMPL, "logprobs": 21}, "logprobs"),
    ("negative logprobs", CMPL, {**OK_CMPL, "logprobs": -1}, "logprobs"),
    ("logprobs of wrong type", CMPL, {**OK_CMPL, "logprobs": True}, "logprobs"),
    ("top_logprobs over 20", CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {**OK_CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("n over the limit", CMPL, {**OK_CMPL, "n": 17}, "n"),
    ("n zero", CHAT, {**OK_CHAT, "n": 0}, "n"),
    ("best_of below n", CMPL, {**OK_CMPL, "n": 3, "best_of": 2}, "best_of"),
    ("best_of over the limit", CMPL, {**OK_CMPL, "best_of": 40}, "best_of"),
    ("best_of streaming", CMPL, {**OK_CMPL, "best_of": 2, "stream": True}, "best_of"),
    ("echo in chat", CHAT, {**OK_CHAT, "echo": True}, "echo"),
    ("echo in streaming chat", CHAT, {**OK_CHAT, "echo": True, "stream": True}, "echo"),
    ("scoring with n > 1", CMPL, {**OK_CMPL, "max_tokens": 0, "echo": True, "n": 2}, "n"),
    ("suffix", CMPL, {**OK_CMPL, "suffix": "x"}, "suffix"),
    ("penalty", CHAT, {**OK_CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ("an empty prompt in a batch", CMPL, {**OK_CMPL, "prompt": ["hello", ""]}, "prompt"),
    ("too many prompts", CMPL, {**OK_CMPL, "prompt": ["a"] * 500}, "prompt"),
]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(http: httpx.Client, row) -> None:
    _, path, body, headers, status, code, words = row
    hdrs = {**AUTH, **headers}
    if not hdrs.get("Authorization"):
        hdrs.pop("Authorization")
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={**hdrs, "Content-Type": "application/json"})
    else:
        r = http.post(path, json=body, headers=hdrs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    for w in words:
        assert w in err["message"], err
    assert len(err["message"]) < 400, "an error quotes at most a short piece of what was sent"
    ok = http.post(CHAT if path == CHAT else CMPL, json=OK_CHAT if path == CHAT else OK_CMPL, headers=AUTH)
    assert ok.status_code == 200, ok.text  # still serving


@pytest.mark.parametrize("row", FIELD_ROWS, ids=[r[0] for r in FIELD_ROWS])
def test_bad_logprobs_n_echo_name_the_field(http: httpx.Client, row) -> None:
    _, path, body, field = row
    r = http.post(path, json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err
    assert http.post(path, json=OK_CHAT if path == CHAT else OK_CMPL, headers=AUTH).status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.get(CMPL, headers=AUTH)
    assert r.status_code == 405 and "message" in r.json()["error"]


def test_health_and_metrics_need_no_key(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/metrics").status_code == 200
    assert http.get("/v1/models").status_code == 401
