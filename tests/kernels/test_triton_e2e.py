"""End to end: the tiny random model on the `triton` backend (TRITON_INTERPRET=1) gives the torch backend's tokens."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates our kernels

import pytest
import torch

pytest.importorskip("triton")

from quept.engine.generate import generate  # noqa: E402
from quept.engine.sampler import SamplingParams  # noqa: E402
from quept.model.loader import load_model  # noqa: E402
from quept.model.runner import ModelRunner, SeqRows, StepBatch  # noqa: E402
from quept.precision.plan import PrecisionPlan  # noqa: E402

PROMPT = [5, 77, 190, 3, 41, 250, 12]
WIDTHS = (8, 6, 5, 4, 3, 2)


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
        gen = torch.Generator().manual_seed(3)

        def random_plan(name: str, n: int = model.n_linears, gen: torch.Generator = gen) -> PrecisionPlan:
            return PrecisionPlan(name, per_linear=tuple(WIDTHS[i] for i in torch.randint(0, 6, (n,), generator=gen).tolist()))

        lens = (6, 1, 2)
        runner, tables = ModelRunner.scratch(model, len(lens), 8, block_size=4)
        prompts = [torch.randint(0, model.args.vocab_size, (k,), generator=gen).tolist() for k in lens]
        prefill = [SeqRows(ids, 0, t, random_plan(f"p{i}")) for i, (ids, t) in enumerate(zip(prompts, tables))]
        out = [runner.execute(StepBatch(prefill, all_logits=True))]  # [9, V]
        step = [SeqRows([int(torch.randint(0, model.args.vocab_size, (1,), generator=gen))], k, t, random_plan(f"d{i}"))
                for i, (k, t) in enumerate(zip(lens, tables))]
        out.append(runner.execute(StepBatch(step)))  # [3, V]
        logits.append(torch.cat(out))  # [12, V]
    want, got = logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
