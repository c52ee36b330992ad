"""`quept serve --policy load|entropy` on the tiny model: cost model in /v1/precisions, bounds per request,
policy metrics (default plan gauge, tokens per width, switches by reason)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.server.conftest import MODEL


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" ([0-9.e+-]+|NaN)"
    m = re.search(pattern, text)
    assert m, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


def complete(url: str, precision: str | None = None, n: int = 4) -> httpx.Response:
    headers = {"X-Precision": precision} if precision else {}
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": MODEL, "prompt": "hello world", "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def load_server(make_server):
    return make_server(policy="load", slo_itl_ms=10_000, profile_batches="1,2", load_dwell_s=0)


def test_load_policy_reports_its_cost_model(load_server):
    body = httpx.get(load_server.url + "/v1/precisions").json()
    ctl = body["controller"]
    assert body["policy"] == "load" and body["default"] == "w8" == ctl["default"]
    assert ctl["ladder"] == ["w8", "w6", "w5", "w4"] and ctl["slo_itl_ms"] == 10_000
    cm = ctl["cost_model"]
    assert set(cm["profiled_ms"]) == {"w8", "w6", "w5", "w4"}
    assert all(set(row) == {"1", "2"} and min(row.values()) > 0 for row in cm["profiled_ms"].values())
    assert set(cm["predicted_ms"]["w4"]) >= {"1", "2"}


def test_load_policy_respects_bounds_per_request(load_server):
    url = load_server.url
    assert complete(url).headers["X-Precision"] == "w8"
    assert complete(url, "auto").headers["X-Precision"] == "w8"
    assert complete(url, "auto;max=w5").headers["X-Precision"] == "w5"
    assert complete(url, "auto;min=w6;max=w6").headers["X-Precision"] == "w6"
    assert complete(url, "w2").headers["X-Precision"] == "w2"
    text = httpx.get(url + "/metrics").text
    assert metric(text, "quept:default_precision_bits") == 8.0
    assert metric(text, "quept:predicted_inter_token_latency_seconds") > 0
    assert metric(text, "quept:generation_tokens_by_width_total", 'width="5"') >= 4
    assert metric(text, "quept:generation_tokens_by_width_total", 'width="2"') >= 4
    body = httpx.get(url + "/v1/precisions").json()
    assert body["controller"]["cost_model"]["live_steps"] > 0  # live steps keep the model current


def test_entropy_policy_switches_are_counted(make_server):
    srv = make_server(policy="entropy", entropy_threshold=0.0, entropy_window=2)  # every token is "unsure"
    r = complete(srv.url, n=6)
    assert r.headers["X-Precision"] == "w4"  # starts low, steps up after the first token
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "quept:precision_switches_total", 'policy="entropy",reason="entropy_high"') >= 1
    assert metric(text, "quept:generation_tokens_by_width_total", 'width="8"') >= 4
    ctl = httpx.get(srv.url + "/v1/precisions").json()["controller"]
    assert ctl["policy"] == "entropy" and ctl["threshold_source"] == "given" and ctl["tokens_observed"] >= 6
