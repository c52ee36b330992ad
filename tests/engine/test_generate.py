"""quept.engine.generate: the KV cache it allocates, and its tokens against a roomy cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from quept.engine.generate import generate
from quept.errors import ContextLengthError
from quept.model.loader import load_model
from quept.precision.plan import PrecisionPlan


@pytest.fixture(scope="module")
def lm(tiny_ckpt: Path):
    return load_model(tiny_ckpt, backend="torch-fp32")


def spy_caches(model, monkeypatch) -> list:
    caches = []
    make = model.new_kv_cache_blocks

    def recording(*args, **kwargs):
        caches.append(make(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(model, "new_kv_cache_blocks", recording)
    return caches


BLOCK = 16  # the default block size of ModelRunner.scratch


@pytest.mark.parametrize("prompt_len,max_tokens", [(1, 1), (BLOCK - 1, BLOCK + 2), (2 * BLOCK, 3 * BLOCK)])
def test_default_cache_holds_just_prompt_plus_max_tokens(lm, monkeypatch, prompt_len: int, max_tokens: int) -> None:
    ids = [(7 * i + 3) % lm.model.args.vocab_size for i in range(prompt_len)]
    roomy = generate(lm.model, ids, PrecisionPlan.uniform(4), max_tokens, kv_budget_bytes=64 << 20).tokens
    caches = spy_caches(lm.model, monkeypatch)
    got = generate(lm.model, ids, PrecisionPlan.uniform(4), max_tokens).tokens
    assert got == roomy and len(got) == max_tokens  # no early stop: every step found a block
    assert caches[0].num_blocks == -(-(prompt_len + max_tokens) // BLOCK)  # not a fixed budget of hundreds of MiB


def test_a_budget_too_small_is_an_error_not_a_silent_truncation(lm) -> None:
    with pytest.raises(ContextLengthError, match="80 tokens need 5 KV blocks; a budget of 1 bytes holds 1"):
        generate(lm.model, list(range(40)), PrecisionPlan.uniform(8), 40, kv_budget_bytes=1)


def test_prompt_over_the_context_is_refused(lm) -> None:
    n = lm.model.args.max_position_embeddings
    with pytest.raises(ContextLengthError):
        generate(lm.model, [1] * n, PrecisionPlan.uniform(8), 4)
