"""The OpenAI-compatible API through the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL, LiveServer

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def metric(server: LiveServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search("^" + pattern + "$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_completion_usage_and_precision_header(client, server):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="hello world", max_tokens=6, **GREEDY)
    out = raw.parse()
    assert raw.headers["x-precision"] == "w8"  # the server default
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert isinstance(out.choices[0].text, str) and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.usage.total_tokens == out.usage.prompt_tokens + 6


def test_chat_completion(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be brief"},
                                                                {"role": "user", "content": "hi"}],
                                         max_tokens=5, **GREEDY)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content is not None and out.usage.completion_tokens == 5


def test_streaming_equals_non_streaming_with_usage(client):
    kw = dict(model=MODEL, max_tokens=8, **GREEDY)
    whole = client.completions.create(prompt="The capital of France is", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="The capital of France is", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    msgs = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens == 8
    plain = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert all(c.usage is None for c in plain)


def test_models_lists_aliases_and_alias_selects_precision(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == MODEL and {f"{MODEL}@w{b}" for b in (8, 6, 5, 4, 3, 2)} <= set(ids)
    kw = dict(prompt="hello world", max_tokens=6, **GREEDY)
    alias = client.completions.with_raw_response.create(model=f"{MODEL}@w2", **kw)
    header = client.completions.with_raw_response.create(model=MODEL, extra_headers={"X-Precision": "w2"}, **kw)
    assert alias.headers["x-precision"] == header.headers["x-precision"] == "w2"
    assert alias.parse().choices[0].text == header.parse().choices[0].text
    assert alias.parse().model == f"{MODEL}@w2"


def test_precision_precedence_header_then_body_then_alias(client):
    def used(**extra) -> str:
        return client.completions.with_raw_response.create(prompt="hi", max_tokens=1, temperature=0,
                                                           **extra).headers["x-precision"]

    body = {"precision": "w4"}
    assert used(model=f"{MODEL}@w2", extra_body=body, extra_headers={"X-Precision": "w6"}) == "w6"
    assert used(model=f"{MODEL}@w2", extra_body=body) == "w4"
    assert used(model=f"{MODEL}@w2") == "w2"
    assert used(model=MODEL, extra_body={"precision": "auto;max=w5"}) == "w5"


def test_precisions_endpoint(server):
    out = httpx.get(server.url + "/v1/precisions", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert out["default"] == "w8" and out["policy"] == "fixed"
    assert [w["name"] for w in out["widths"]] == ["w8", "w6", "w5", "w4", "w3", "w2"]


def test_precisions_says_what_is_known(server, make_server, tmp_path):
    """Trained adapters report their ranks; an uncalibrated build's zero adapters report rank 0; no
    measured perplexity is said so, not left as a bare null."""
    from quept.model.loader import load_model
    from tests.tiny import tiny_checkpoint

    trained = httpx.get(server.url + "/v1/precisions", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert trained["adapters"] == "trained" and any(w["adapter_rank"] for w in trained["widths"])
    plain = load_model(tiny_checkpoint(tmp_path / "plain"), backend="torch-fp32")
    out = httpx.get(make_server(loaded=plain).url + "/v1/precisions").json()
    assert out["adapters"].startswith("all zero") and all(w["adapter_rank"] == 0 for w in out["widths"])
    assert all(w["perplexity"] is None for w in out["widths"]) and "not measured" in out["perplexity_source"]


def test_concurrent_mixed_widths_match_each_alone(client, server):
    """Greedy requests at w8, w4 and w2 in one batch return exactly the tokens each returns alone."""
    prompts = {"w8": "hello world", "w4": "The quick brown fox", "w2": "Elastic precision lets"}
    kw = dict(model=MODEL, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    alone = {p: client.completions.create(prompt=t, extra_headers={"X-Precision": p}, **kw).choices[0].text
             for p, t in prompts.items()}

    seen: list[int] = []
    metrics = server.state.metrics
    on_step = metrics.on_step
    metrics.on_step = lambda stats, rows, s: (seen.append(stats.num_running), on_step(stats, rows, s))
    front, engine = server.state.engine, server.engine
    step, gate = engine.step, threading.Event()

    def gated_step():  # hold the first step until all three requests have reached the engine
        deadline = time.monotonic() + 10
        while not gate.is_set() and front.num_waiting + front.num_running < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        gate.set()
        return step()

    engine.step = gated_step
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

    async def together() -> list[str]:
        outs = await asyncio.gather(*(aclient.completions.create(prompt=t, extra_headers={"X-Precision": p}, **kw)
                                      for p, t in prompts.items()))
        return [o.choices[0].text for o in outs]

    try:
        batched = asyncio.run(together())
    finally:
        del metrics.on_step
        del engine.step
    assert max(seen) == 3, f"the three requests never ran in one batch (running per step: {seen})"
    assert dict(zip(prompts, batched)) == alone


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="hello", max_tokens=8, temperature=0.8, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "top_k": 40})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_stop_string_ends_with_finish_reason_stop(client):
    kw = dict(model=MODEL, prompt="hello world", max_tokens=12, **GREEDY)
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = client.completions.create(stop=[stop], **kw).choices[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
