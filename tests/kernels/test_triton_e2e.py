"""End to end: the tiny random model on the `triton` backend (TRITON_INTERPRET=1) gives the torch backend's tokens."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates our kernels

import pytest
import torch

pytest.importorskip("triton")

from quept.engine.generate import generate  # noqa: E402
from quept.model.kv_cache import SequenceBlocks  # noqa: E402
from quept.model.loader import load_model  # noqa: E402
from quept.model.model import build_layout  # noqa: E402
from quept.precision.plan import PrecisionPlan  # noqa: E402
from quept.engine.sampler import SamplingParams  # noqa: E402

PROMPT = [5, 77, 190, 3, 41, 250, 12]


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return load_model(tiny_ckpt, backend="torch-fp32"), load_model(tiny_ckpt, backend="triton")


@pytest.mark.parametrize("bits", [8, 3])
def test_greedy_tokens_match_torch_backend(models, bits: int) -> None:
    torch_lm, triton_lm = models
    assert triton_lm.backend.name == "triton"
    plan = PrecisionPlan.uniform(bits)
    want = generate(torch_lm.model, PROMPT, plan, max_tokens=5, params=SamplingParams()).tokens
    got = generate(triton_lm.model, PROMPT, plan, max_tokens=5, params=SamplingParams()).tokens
    assert got == want


def test_mixed_rows_and_layers_match_torch_backend(models) -> None:
    """Three sequences in one batch, every row at its own width per linear: a prefill step of 9 rows
    (prefill kernel), then a decode step of 3 rows (decode kernel)."""
    logits = []
    for lm in models:
        model = lm.model
        n = model.n_linears
        gen = torch.Generator().manual_seed(3)
        widths = torch.tensor([8, 6, 5, 4, 3, 2], dtype=torch.int16)
        lens = (6, 1, 2)
        seqs = [SequenceBlocks() for _ in lens]
        cache = model.new_kv_cache(1 << 20, block_size=4)
        tokens = torch.randint(0, model.args.vocab_size, (sum(lens),), generator=gen)
        positions = torch.cat([torch.arange(k) for k in lens])
        row_bits = widths[torch.randint(0, 6, (sum(lens), n), generator=gen)]  # [T, n_linears]
        out = [model(tokens, positions, cache, build_layout(cache, list(zip(seqs, lens))), row_bits)]  # [9, V]
        tokens = torch.randint(0, model.args.vocab_size, (3,), generator=gen)
        row_bits = widths[torch.randint(0, 6, (3, n), generator=gen)]
        out.append(model(tokens, torch.tensor(lens), cache, build_layout(cache, [(s, 1) for s in seqs]), row_bits))
        logits.append(torch.cat(out))  # [12, V]
    want, got = logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
