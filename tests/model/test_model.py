"""Logit parity of our forward against transformers on the same dequantized weights."""

from __future__ import annotations

import pytest
import torch

from quept.kernels.reference import dequantize
from quept.model.args import linear_names
from quept.model.loader import load_model
from quept.model.runner import ModelRunner, SeqRows, StepBatch
from quept.precision.plan import PrecisionPlan
from tests.tiny import prefill_then_decode, tiny_checkpoint, tiny_hf_model

WIDTHS = (8, 6, 5, 4, 3, 2)


def effective_weight(w, bits: int) -> torch.Tensor:
    i = w.widths.index(bits)
    dense = dequantize(w.codes, w.scales[i], w.mins[i], bits, w.group_size)
    r = w.ranks[i]
    if r:
        dense = dense + w.lora_b[:, :r].float() @ w.lora_a[:r].float()
    return dense


def hf_reference(model_type: str, lm, bits: int):
    """transformers model carrying exactly the weights our runtime uses at `bits`."""
    hf = tiny_hf_model(model_type)
    state = {k: v.float() for k, v in lm.ckpt.dense.items()}
    for name in linear_names(lm.model.args.n_layers):
        state[f"{name}.weight"] = effective_weight(lm.ckpt.elastic[name], bits)
    if hf.config.tie_word_embeddings:  # HF ties lm_head to the embedding; untie to hold the quantized head
        hf.config.tie_word_embeddings = False
        hf.lm_head.weight = torch.nn.Parameter(state["lm_head.weight"].clone())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    return hf.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request, tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "c", model_type=request.param, random_adapters=True)
    return request.param, load_model(path, backend="torch-fp32")


@pytest.mark.parametrize("bits", WIDTHS)
def test_prefill_and_decode_match_transformers(loaded, bits):
    model_type, lm = loaded
    hf = hf_reference(model_type, lm, bits)
    gen = torch.Generator().manual_seed(1000 + bits)
    ids = torch.randint(0, lm.model.args.vocab_size, (1, 13), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits[0]  # [13, V]
    ours = prefill_then_decode(lm.model, ids[0], bits, n_prefill=9)  # then step-by-step decode through the cache
    assert rel_err(ours, ref) < 1e-4


def test_mixed_batch_rows_match_rows_alone(loaded):
    """Three sequences at w8, w4, w2 in one forward give the logits each gives alone."""
    _, lm = loaded
    model = lm.model
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in (5, 8, 3)]
    plans = [PrecisionPlan.uniform(b) for b in (8, 4, 2)]
    alone = [prefill_then_decode(model, p, plan, n_prefill=len(p)) for p, plan in zip(prompts, plans)]
    runner, tables = ModelRunner.scratch(model, len(prompts), 8)
    batch = StepBatch([SeqRows(p.tolist(), 0, t, plan) for p, t, plan in zip(prompts, tables, plans)], all_logits=True)
    mixed = runner.execute(batch)
    for got, want in zip(mixed.split([len(p) for p in prompts]), alone):
        assert rel_err(got, want) < 1e-5


def test_per_layer_plan_differs_from_uniform(loaded):
    """A per-linear plan actually changes the widths used (not silently uniform)."""
    _, lm = loaded
    model = lm.model
    ids = torch.arange(6)
    per_linear = tuple([8, 2] * (model.n_linears // 2) + [8] * (model.n_linears % 2))
    outs = [prefill_then_decode(model, ids, plan, n_prefill=6)
            for plan in (PrecisionPlan.uniform(8), PrecisionPlan("alternating", per_linear=per_linear))]
    assert rel_err(outs[0], outs[1]) > 1e-3


def test_fp16_kv_cache_stays_close_to_fp32(loaded):
    """Layer ops that keep K/V in fp16 (the native ones) change the logits by rounding alone: on the
    continuous fp32 reference, well under a percent of their largest value."""
    from quept.model.layer_ops import TorchLayerOps

    _, lm = loaded
    model = lm.model
    ids = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(7))
    outs = []
    for kv_dtype in (torch.float32, torch.float16):
        ops = TorchLayerOps()
        ops.kv_dtype = kv_dtype
        model.ops = ops
        assert model.new_kv_cache_blocks(1).k_cache.dtype == kv_dtype
        outs.append(prefill_then_decode(model, ids, 4, n_prefill=12))
    model.ops = TorchLayerOps()
    err = rel_err(outs[1], outs[0])
    assert 0 < err < 5e-3  # it is rounded (not silently fp32), and only rounded
