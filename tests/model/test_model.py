"""Logit parity of our forward against transformers on the same dequantized weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quept.kernels.reference import dequantize
from quept.model.kv_cache import SequenceBlocks
from quept.model.loader import load_model
from quept.model.model import build_layout, linear_names
from tests.tiny import tiny_checkpoint, tiny_hf_model

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
    model = lm.model
    cache = model.new_kv_cache(1 << 20, block_size=4)
    seq = SequenceBlocks()
    n_prefill = 9
    layout = build_layout(cache, [(seq, n_prefill)])
    ours = [model(ids[0, :n_prefill], torch.arange(n_prefill), cache, layout, bits)]
    for t in range(n_prefill, 13):  # step-by-step decode through the paged cache
        layout = build_layout(cache, [(seq, 1)])
        ours.append(model(ids[0, t : t + 1], torch.tensor([t]), cache, layout, bits))
    ours_all = torch.cat(ours)
    assert rel_err(ours_all, ref) < 1e-4


def test_mixed_batch_rows_match_rows_alone(loaded):
    """Three sequences at w8, w4, w2 in one forward give the logits each gives alone."""
    _, lm = loaded
    model = lm.model
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=gen) for n in (5, 8, 3)]
    widths = (8, 4, 2)
    alone = []
    for p, b in zip(prompts, widths):
        cache = model.new_kv_cache(1 << 20)
        seq = SequenceBlocks()
        alone.append(model(p, torch.arange(len(p)), cache, build_layout(cache, [(seq, len(p))]), b))
    cache = model.new_kv_cache(1 << 20)
    seqs = [SequenceBlocks() for _ in prompts]
    layout = build_layout(cache, [(s, len(p)) for s, p in zip(seqs, prompts)])
    row_bits = torch.cat([torch.full((len(p), model.n_linears), b, dtype=torch.int16) for p, b in zip(prompts, widths)])
    mixed = model(torch.cat(prompts), torch.cat([torch.arange(len(p)) for p in prompts]), cache, layout, row_bits)
    for got, want in zip(mixed.split([len(p) for p in prompts]), alone):
        assert rel_err(got, want) < 1e-5


def test_per_layer_plan_differs_from_uniform(loaded):
    """A per-linear plan actually changes the widths used (not silently uniform)."""
    _, lm = loaded
    model = lm.model
    ids = torch.arange(6)
    outs = []
    for plan in (torch.full((6, model.n_linears), 8, dtype=torch.int16),
                 torch.tensor([8, 2] * (model.n_linears // 2) + [8] * (model.n_linears % 2), dtype=torch.int16).expand(6, -1)):
        cache = model.new_kv_cache(1 << 20)
        outs.append(model(ids, torch.arange(6), cache, build_layout(cache, [(SequenceBlocks(), 6)]), plan))
    assert rel_err(outs[0], outs[1]) > 1e-3


def test_fp16_kv_cache_stays_close_to_fp32(loaded):
    """Layer ops that keep K/V in fp16 (the native ones) change the logits by rounding alone: on the
    continuous fp32 reference, well under a percent of their largest value."""
    from quept.model.model import TorchLayerOps

    _, lm = loaded
    model = lm.model
    ids = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(7))
    outs = []
    for kv_dtype in (torch.float32, torch.float16):
        ops = TorchLayerOps()
        ops.kv_dtype = kv_dtype
        model.ops = ops
        cache = model.new_kv_cache(1 << 20, block_size=4)
        assert cache.k_cache.dtype == kv_dtype
        seq = SequenceBlocks()
        out = [model(ids[:12], torch.arange(12), cache, build_layout(cache, [(seq, 12)]), 4)]
        for t in range(12, 20):
            out.append(model(ids[t : t + 1], torch.tensor([t]), cache, build_layout(cache, [(seq, 1)]), 4))
        outs.append(torch.cat(out))
    model.ops = TorchLayerOps()
    err = rel_err(outs[1], outs[0])
    assert 0 < err < 5e-3  # it is rounded (not silently fp32), and only rounded
