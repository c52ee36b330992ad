"""Scoring and sampling through the API: logprobs, echo, max_tokens 0, prompt batches, n, best_of,
the tokenizer routes, through httpx and the official `openai` client against a real server."""

from __future__ import annotations

import json
import math
import re

import httpx
import openai
import pytest

from quept.data import eval_file
from quept.eval.perplexity import perplexity, token_windows
from quept.precision.plan import PrecisionPlan
from tests.server.conftest import API_KEY, MODEL, LiveServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def http(server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def prefill_rows(http: httpx.Client) -> float:
    m = re.search(r"^quept:prefill_tokens_total (\S+)$", http.get("/metrics").text, re.M)
    assert m, "quept:prefill_tokens_total not in /metrics"
    return float(m.group(1))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_echo_logprobs_perplexity_equals_quept_eval(http, server, tiny_loaded, bits):
    """The same windows scored by `quept eval` and by echo + logprobs + max_tokens 0: equal within 0.1 %."""
    windows = token_windows(tiny_loaded.tokenizer, eval_file(), 3, 64)
    want, _ = perplexity(tiny_loaded.model, windows, PrecisionPlan.uniform(bits), progress=False)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": windows.tolist(), "max_tokens": 0, "echo": True,
                                           "logprobs": 0, "temperature": 0}, headers={"X-Precision": f"w{bits}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-precision"] == f"w{bits}" and len(body["choices"]) == 3
    nll, count = 0.0, 0
    for choice, window in zip(sorted(body["choices"], key=lambda c: c["index"]), windows):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == window.shape[0] and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and choice["finish_reason"] == "length"
        nll -= sum(lp["token_logprobs"][1:])
        count += window.shape[0] - 1
    assert body["usage"] == {"prompt_tokens": 3 * 64, "completion_tokens": 0, "total_tokens": 3 * 64,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    got = math.exp(nll / count)
    assert abs(got - want) / want < 1e-3, (got, want)


def test_lm_eval_loglikelihood_request(http):
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts, max_tokens 1, echo, logprobs 1."""
    ids = http.post("/tokenize", json={"prompt": "The cat sat on the mat", "add_special_tokens": False}).json()["tokens"]
    body = {"model": MODEL, "prompt": [ids, ids[:3]], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for choice, prompt in zip(choices, (ids, ids[:3])):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1  # the prompt, then the one generated token
        for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert 1 <= len(top) <= 2 and tok <= max(top.values()) + 1e-6  # the token itself is in the dict
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        generated = lp["token_logprobs"][-1]
        assert generated == pytest.approx(max(lp["top_logprobs"][-1].values()))  # greedy: the top token
        assert choice["text"].startswith(http.post("/detokenize", json={"tokens": prompt}).json()["prompt"])


def test_openai_client_completion_logprobs_and_echo(client):
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4, logprobs=5, echo=True,
                                    temperature=0, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text.startswith("hello world")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    # five alternatives and the token itself, keyed by text: ids whose text is the same (bytes of a split
    # character all decode to "\ufffd") share one key, so a dict may hold fewer
    for tok, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 6 and tok <= max(top.values()) + 1e-6
    assert out.usage.completion_tokens == 4 and len(lp.tokens) == out.usage.prompt_tokens + 4


def test_openai_client_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                         logprobs=True, top_logprobs=3, temperature=0, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)  # greedy
        assert item.bytes == list(item.token.encode("utf-8"))
    assert "".join(i.token for i in content) == out.choices[0].message.content


def test_streaming_carries_logprobs_per_chunk(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=6, logprobs=2, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    assert "".join(c.choices[0].text for c in chunks) == whole.text

    echoed = list(client.completions.create(stream=True, echo=True, **kw))
    first = echoed[0].choices[0]
    assert first.text == "The capital of France is" and first.logprobs.token_logprobs[0] is None

    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                               logprobs=True, top_logprobs=1, stream=True, temperature=0,
                                               extra_body={"ignore_eos": True}))
    items = [i for c in chat if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert len(items) == 4 and all(len(i.top_logprobs) == 1 for i in items)


def test_n_sampled_share_one_prefill_and_greedy_copies_agree(http, client):
    prompt = "one two three four five six seven eight nine ten"
    n_prompt = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    before = prefill_rows(http)
    out = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=12, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
    assert prefill_rows(http) - before == n_prompt  # four completions, one prefill
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    tokens = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "n": 4, "max_tokens": 12,
                                                "temperature": 1.0, "seed": 7, "ignore_eos": True, "logprobs": 0})
    seqs = [tuple(c["logprobs"]["tokens"]) for c in tokens.json()["choices"]]
    assert len(set(seqs)) == 4, seqs  # four different completions
    assert [c["text"] for c in sorted(tokens.json()["choices"], key=lambda c: c["index"])] == texts  # seeded: again
    assert out.usage.completion_tokens == 48

    greedy = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert len({c.text for c in greedy.choices}) == 1 and len(greedy.choices) == 4


def test_n_in_chat_and_streams(client):
    msgs = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, n=3, max_tokens=5, temperature=1.0, seed=3,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, n=3, max_tokens=5, temperature=1.0,
                                                 seed=3, stream=True, extra_body={"ignore_eos": True}))
    text: dict[int, str] = {}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1, 2}
    assert [text[i] for i in range(3)] == [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]


def test_prompt_batch_and_best_of(http):
    body = {"model": MODEL, "prompt": ["hello", "the cat"], "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 1,
            "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1, 2, 3]
    assert r.json()["usage"]["completion_tokens"] == 12
    alone = http.post("/v1/completions", json={**body, "prompt": "the cat"}).json()["choices"]
    assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])][2:] == \
        [c["text"] for c in sorted(alone, key=lambda c: c["index"])]  # prompt 1's choices are 2 and 3

    best = http.post("/v1/completions", json={**body, "prompt": "hello", "n": 1, "best_of": 4, "logprobs": 0})
    assert best.status_code == 200, best.text
    [choice] = best.json()["choices"]
    every = http.post("/v1/completions", json={**body, "prompt": "hello", "n": 4, "logprobs": 0}).json()["choices"]
    sums = sorted(sum(c["logprobs"]["token_logprobs"]) for c in every)
    assert sum(choice["logprobs"]["token_logprobs"]) == pytest.approx(sums[-1], abs=1e-5)  # the most likely of 4


def test_tokenizer_routes(http, server):
    info = http.get("/tokenizer_info").json()
    assert {"eos_token", "bos_token", "pad_token", "chat_template", "model_max_length"} <= set(info)
    tok = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False, "return_token_strs": True})
    body = tok.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] > 0
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "hello world"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > body["count"] - 2  # the template adds its own tokens
    for path, payload, field in (("/detokenize", {"tokens": [10**7]}, "tokens"),
                                 ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt"),
                                 ("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": "abc"}, "tokens")):
        r = http.post(path, json=payload)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    bare = httpx.Client(base_url=server.url, timeout=10)
    assert bare.get("/tokenizer_info").status_code == 401 and bare.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert http.post("/tokenize", content=json.dumps({"prompt": "x" * (5 << 20)})).status_code == 413
