"""Structured outputs and tool calling through the OpenAI client: every answer parses and validates, at
every width, streamed or not; every malformed or contradicting option is a 400 naming its field."""

from __future__ import annotations

import json
import random
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from quept.model.loader import load_model
from tests.server.conftest import API_KEY, MODEL, LiveServer
from tests.tiny import tiny_checkpoint

# bounded, so that the tiny random model ends it well inside max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"enum": ["cat", "dog"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "home": {"type": "object", "properties": {"wild": {"type": "boolean"}}, "required": ["wild"],
                 "additionalProperties": False},
    },
    "required": ["animal", "legs", "tags", "home"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "hello world"}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fox"]
    wild: bool


@pytest.fixture(scope="module")
def server(make_server, tmp_path_factory) -> LiveServer:
    """A tiny model with a context long enough for the tools prompt (the tiny tokenizer spends ~800 tokens on it)."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("long") / "ckpt", max_position_embeddings=2048)
    return make_server(api_key=API_KEY, checkpoint=path, loaded=load_model(path, backend="torch-fp32"))


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(server: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 60, **body}, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"})


@pytest.mark.parametrize("precision", ["w8", "w4", "w3", "w2"])
def test_json_schema_answers_validate_at_every_width(client, precision) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=80, n=2, temperature=1.0, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA}},
        extra_headers={"X-Precision": precision})
    assert r.precision == precision
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completions_json_object_and_streamed_schema(client) -> None:
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}, "max_tokens": 60})
    # the tiny model may run out of tokens inside an object; what it wrote must be a prefix of one
    text = r.choices[0].text
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}) if c.choices]
    jsonschema.validate(json.loads("".join(parts)), SCHEMA)


def test_parse_with_a_pydantic_model(client) -> None:
    parse = client.beta.chat.completions.parse if hasattr(client, "beta") and hasattr(client.beta, "chat") \
        else client.chat.completions.parse
    r = parse(model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=40)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
    ({"guided_regex": "[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch("[a-c]{3}-[0-9]{2}", t)),
    ({"guided_grammar": 'start: "(" start ")" | "x"'}, lambda t: re.fullmatch(r"(\(*)x(\)*)", t) and
     t.count("(") == t.count(")")),
    ({"guided_grammar": 'root ::= ("yes" | "no") "!"'}, lambda t: t in ("yes!", "no!")),  # GBNF
    ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"structured_outputs": {"regex": "ab+"}}, lambda t: re.fullmatch("ab+", t)),
])
def test_vllm_guided_fields(server, extra, check) -> None:
    for path, body in (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r = post(server, path, {**body, **extra, "max_tokens": 240})  # the schema's strings take bytes each
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice.get("text", choice.get("message", {}).get("content"))
        recursive = "start" in extra.get("guided_grammar", "")  # "(" start ")" may nest past max_tokens
        if not recursive:
            assert choice["finish_reason"] == "stop", choice
        if choice["finish_reason"] == "stop":
            assert check(text), text


def test_tool_choice_required_returns_calls_whose_arguments_parse(client) -> None:
    for parallel in (True, False):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], max_tokens=120,
                                           tool_choice="required", parallel_tool_calls=parallel)
        choice = r.choices[0]
        calls = choice.message.tool_calls
        if parallel:  # the random model may go on calling until max_tokens: the complete calls come back
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None and len(calls) == 1
        assert calls
        for call in calls:
            schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)
            assert call.id.startswith("call_") and call.type == "function"
        assert len({c.id for c in calls}) == len(calls)


def test_a_named_tool_is_called_streamed(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, CLOCK], max_tokens=120, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for tc in delta.tool_calls or []:
            got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            got["name"] += tc.function.name or ""
            got["arguments"] += tc.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_time"
    assert json.loads(calls[0]["arguments"])["zone"] in ("UTC", "CET")


def test_earlier_calls_and_tool_answers_render_into_the_prompt(server) -> None:
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Rome", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = post(server, "/tokenize", {"messages": history})  # /tokenize renders no tools; the chat call does
    assert r.status_code == 200
    r = post(server, "/v1/chat/completions", {"messages": history, "tools": [WEATHER], "tool_choice": "none",
                                              "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"].get("tool_calls") is None


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "needs json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_regex": "x{657444}"}, "guided_regex", "the grammar failed at output token 1"),  # a limit, mid-way
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar", "nowhere"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "both constrain"),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json", "both constrain"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters", "not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", ""),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
])
def test_bad_structured_options_are_400s_naming_the_field(server, body, param, words) -> None:
    r = post(server, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param or err["param"].startswith(param), err
    assert words in err["message"], err


def test_metrics_count_constrained_requests_and_compiles(server) -> None:
    def scrape() -> str:
        return httpx.get(server.url + "/metrics").text

    def value(text: str, name: str) -> float:
        m = re.search(rf"^quept:{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    before = scrape()
    regex = f"[xyz]{{{random.randrange(1, 10**3)}}}"  # a spec no other test compiled
    for _ in range(2):
        assert post(server, "/v1/completions", {"prompt": "hi", "guided_regex": regex, "max_tokens": 2}).status_code == 200
    after = scrape()
    assert value(after, 'structured_output_requests_total{kind="regex"}') - \
        value(before, 'structured_output_requests_total{kind="regex"}') == 2
    assert value(after, "grammar_compile_seconds_count") - value(before, "grammar_compile_seconds_count") == 1
