"""The sampler: greedy is argmax, top-k and top-p really cut, a seed repeats, bad parameters are refused."""

from __future__ import annotations

import math

import pytest
import torch

from quept.engine.sampler import SamplingParams, entropy, sample


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    gen = torch.Generator().manual_seed(1234)
    return {sample(logits, params, gen) for _ in range(n)}


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams()) == 1


def test_top_k_keeps_only_the_k_largest() -> None:
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7, 1.6, -5.0])  # near-uniform over the first five
    assert draws(logits, SamplingParams(temperature=1.0)) >= {0, 1, 2, 3, 4}  # without a cut all five appear
    assert draws(logits, SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, top_k=1)) == {0}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.1)) == {0}  # the top token always stays


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-300])
def test_a_top_p_below_float32_keeps_the_top_token(top_p: float) -> None:
    """Found by the API fuzzer: top_p 5e-324 is 0 in float32 and cut every token (multinomial failed)."""
    logits = torch.tensor([0.3, 2.0, 1.0])
    assert draws(logits, SamplingParams(temperature=1.0, top_p=top_p), n=20) == {1}


def test_low_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 0.0])
    hot = [sample(logits, SamplingParams(temperature=5.0), torch.Generator().manual_seed(s)) for s in range(300)]
    cold = [sample(logits, SamplingParams(temperature=0.05), torch.Generator().manual_seed(s)) for s in range(300)]
    assert hot.count(1) > 60 and cold.count(1) == 0


@pytest.mark.parametrize("temperature", [1e-164, 1e-30, 9e-6])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    """Found by the API fuzzer: logits / 1e-164 overflow and the softmax turned NaN (a 500)."""
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(0)) == 1


def test_a_seed_repeats_its_draws() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, params, g) for g in [params.generator()] for _ in range(20)]
    b = [sample(logits, params, g) for g in [params.generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
])
def test_bad_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_entropy_in_nats() -> None:
    assert entropy(torch.zeros(4)) == pytest.approx(math.log(4))
    assert entropy(torch.tensor([100.0, 0.0])) == pytest.approx(0.0, abs=1e-6)
