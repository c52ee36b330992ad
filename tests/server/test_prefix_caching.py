"""Prefix caching through the API: usage.prompt_tokens_details.cached_tokens, the vLLM-named counters,
per-precision keys, and `--no-prefix-caching`."""

from __future__ import annotations

import random
import re

import httpx
import openai
import pytest

from quept.cli import build_parser
from tests.server.conftest import API_KEY, MODEL, LiveServer


def counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^quept:{name} (\S+)$", text, re.M)
    assert m, f"quept:{name} not in /metrics"
    return float(m.group(1))


def system_prompt(seed: int) -> str:
    rng = random.Random(seed)  # text no other test sends, so nothing of it is cached before
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(30))


def ask(client: openai.OpenAI, system: str, user: str, precision: str):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=8, temperature=0, extra_headers={"X-Precision": precision})


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_a_repeated_system_prompt_is_read_from_the_cache_at_its_precision_only(client, server):
    system = system_prompt(1)
    queries0, hits0 = counter(server.url, "prefix_cache_queries_total"), counter(server.url, "prefix_cache_hits_total")
    first = ask(client, system, "hello", "w8")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = ask(client, system, "hello", "w8")
    cached = again.usage.prompt_tokens_details.cached_tokens
    block = server.engine.blocks.block_size
    assert cached == (again.usage.prompt_tokens - 1) // block * block  # every full block but the one to sample from
    assert again.choices[0].message.content == first.choices[0].message.content
    other = ask(client, system, "another question", "w8")  # the shared system prompt, a new user turn
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < cached
    low = ask(client, system, "hello", "w4")
    assert low.usage.prompt_tokens_details.cached_tokens == 0  # w8's K/V are not w4's
    queried = sum(r.usage.prompt_tokens for r in (first, again, other, low))
    assert counter(server.url, "prefix_cache_queries_total") - queries0 == queried
    hit = cached + other.usage.prompt_tokens_details.cached_tokens
    assert counter(server.url, "prefix_cache_hits_total") - hits0 == hit


def test_streamed_usage_reports_cached_tokens(client):
    system = system_prompt(2)
    ask(client, system, "hi", "w8")
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens > 0


def test_no_prefix_caching_computes_every_prompt(make_server):
    srv = make_server(api_key=API_KEY, prefix_caching=False)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    system = system_prompt(3)
    answers = [ask(client, system, "hello", "w8") for _ in range(2)]
    assert [a.usage.prompt_tokens_details.cached_tokens for a in answers] == [0, 0]
    assert counter(srv.url, "prefix_cache_hits_total") == 0 and counter(srv.url, "prefix_cache_queries_total") == 0
    assert srv.engine.blocks.num_cached_blocks == 0


@pytest.mark.parametrize(("argv", "expected"), [([], None), (["--no-prefix-caching"], False),
                                                (["--prefix-caching"], True)])
def test_the_serve_flag(argv, expected):
    parser, _ = build_parser()
    args = vars(parser.parse_args(["serve", *argv]))
    assert args.get("prefix_caching") == expected  # absent: the setting's default (on) or QUEPT_PREFIX_CACHING
