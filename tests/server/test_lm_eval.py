"""lm-evaluation-harness's own `local-completions` model, unmodified, against a real server: the
tasks of benchmarks/lm_eval_widths.py on a few items, at two widths through the model alias."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, LiveServer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_eval_widths.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("lm_eval_widths", BENCH)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(BENCH.parent))
    spec.loader.exec_module(module)
    return module


def prefill_rows(url: str) -> float:
    return float(re.search(r"^quept:prefill_tokens_total (\S+)$", httpx.get(url + "/metrics").text, re.M).group(1))


def test_local_completions_scores_two_widths(server: LiveServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    bench = bench_module()
    bench.write_tasks(tmp_path, docs=1, mc_items=4)
    items = (tmp_path / "next_sentence.jsonl").read_text().splitlines()
    assert len(items) == 4
    args = type("Args", (), {"max_length": 200, "api_key": API_KEY, "batch_size": 2})()
    rows = {}
    for precision in ("w8", "w2"):
        before = prefill_rows(server.url)
        rows[precision] = bench.evaluate(server.url, MODEL, precision, tmp_path, args)
        assert prefill_rows(server.url) > before  # lm-eval's requests ran through this server
    for row in rows.values():
        assert math.isfinite(row["word_perplexity"]) and row["word_perplexity"] > 1
        assert row["bits_per_byte"] == pytest.approx(math.log2(row["byte_perplexity"]), rel=1e-6)
        assert 0 <= row["acc"] <= 1
    assert rows["w8"]["word_perplexity"] != rows["w2"]["word_perplexity"]  # the alias picked the width
