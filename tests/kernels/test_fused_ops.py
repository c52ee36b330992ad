"""The native fused elementwise ops (kernels/csrc/fused_ops.cpp) against the plain-torch layer ops."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from quept.kernels.native import find_compiler
from quept.model.layer_ops import TorchLayerOps

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler: the native kernels cannot be built")
SEED = random.randrange(1 << 30)  # fresh inputs every run; in the failure message


@pytest.fixture(scope="module")
def ops():
    from quept.backends import get_backend

    return get_backend("native").layer_ops()


def _isas() -> list[str]:
    if find_compiler() is None:
        return []
    from quept.kernels.native import load_native

    return list(load_native().available_isas())


@pytest.fixture(params=_isas())
def isa(request: pytest.FixtureRequest):
    """Run the test on each SIMD path this CPU has (the ops with a SIMD path dispatch on it)."""
    from quept.kernels.native import load_native

    native = load_native()
    best = native.current_isa()
    native.set_isa(request.param)
    yield request.param
    native.set_isa(best)


@pytest.mark.parametrize("t,d", [(1, 576), (7, 96), (3, 33)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(ops, t: int, d: int, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(SEED + t * d)
    h = torch.randn(t, d, generator=g) * 3
    delta = torch.randn(t, d, generator=g) if with_delta else None
    w = torch.randn(d, generator=g)
    ref_h, ref_x = TorchLayerOps.add_rms_norm(h.clone(), delta, w, 1e-5)
    got_h, got_x = ops.add_rms_norm(h, delta, w, 1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-6, atol=1e-6, msg=lambda m: f"seed {SEED}: {m}")
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {SEED}: {m}")


@pytest.mark.parametrize("t,heads,dh", [(1, 9, 64), (5, 3, 64), (2, 4, 8)])
def test_rope_in_place(ops, t: int, heads: int, dh: int) -> None:
    g = torch.Generator().manual_seed(SEED + t + heads)
    x = torch.randn(t, heads, dh, generator=g)
    angles = torch.rand(t, dh // 2, generator=g) * 100
    emb = torch.cat((angles, angles), -1).unsqueeze(1)  # [T, 1, Dh]
    cos, sin = emb.cos(), emb.sin()
    ref = TorchLayerOps.rope(x.clone(), cos, sin)
    got = ops.rope(x, cos, sin)
    assert got.data_ptr() == x.data_ptr()  # in place
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"seed {SEED}: {m}")


@pytest.mark.parametrize("shape", [(1, 1536), (6, 97), (3, 5)])
def test_silu_mul(ops, isa: str, shape) -> None:
    g = torch.Generator().manual_seed(SEED + shape[1])
    gate, up = torch.randn(shape, generator=g) * 4, torch.randn(shape, generator=g)
    gate.view(-1)[:4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])[: gate.numel()]  # past exp's fp32 range
    torch.testing.assert_close(ops.silu_mul(gate, up), TorchLayerOps.silu_mul(gate, up), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"seed {SEED}, {isa}: {m}")


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,hkv,d", [(1, 3, 64), (5, 2, 8)])
def test_write_kv_scatters_and_converts(ops, kv_dtype: torch.dtype, t: int, hkv: int, d: int) -> None:
    g = torch.Generator().manual_seed(SEED + t)
    k, v = torch.randn(t, hkv, d, generator=g) * 10, torch.randn(t, hkv, d, generator=g)
    slots = torch.randperm(40, generator=g)[:t]
    k_cache, v_cache = (torch.randn(40, hkv, d, generator=g).to(kv_dtype) for _ in range(2))
    ref, got = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
    TorchLayerOps.write_kv(*ref, slots, k, v)
    ops.write_kv(*got, slots, k, v)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=0, atol=0, msg=lambda m: f"seed {SEED}: {m}")
    with pytest.raises(RuntimeError, match="slot 40 outside the cache"):
        ops.write_kv(*got, torch.tensor([40] * t), k, v)
    with pytest.raises(RuntimeError, match="k and v must be contiguous fp32"):
        ops.write_kv(*got, slots, k.double(), v)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,lengths", [(9, 3, 64, [1]), (9, 3, 64, [200]), (4, 4, 16, [17, 1, 40]),
                                               (8, 2, 8, [33, 5]), (9, 3, 64, [7, 130, 64, 1, 99, 16, 3, 250]),
                                               (20, 2, 32, [19, 3]), (6, 2, 24, [9, 31])])
def test_paged_attention_of_decoding_rows(ops, isa: str, hq: int, hkv: int, d: int, lengths: list[int],
                                          kv_dtype: torch.dtype) -> None:
    """One row per sequence over its whole context, each context scattered over the cache."""
    g = torch.Generator().manual_seed(SEED + hq * sum(lengths))
    k_flat = torch.randn(1024, hkv, d, generator=g).to(kv_dtype)  # the cache in the type it is stored in
    v_flat = torch.randn(1024, hkv, d, generator=g).to(kv_dtype)
    slots = torch.randperm(1024, generator=g)[: sum(lengths)]  # as paged blocks are; sequences share none
    offsets = torch.tensor([0, *itertools.accumulate(lengths)])
    q = torch.randn(len(lengths), hq, d, generator=g) * 2
    spans = (slots, offsets[:-1], offsets[1:])
    ref = TorchLayerOps.paged_attention(q, k_flat, v_flat, *spans)
    torch.testing.assert_close(ops.paged_attention(q, k_flat, v_flat, *spans), ref, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"seed {SEED}, {isa}: {m}")


@pytest.mark.parametrize("context_before,rows", [(0, 13), (21, 5), (40, 64)])
def test_paged_attention_of_a_causal_prefill_chunk(ops, isa: str, context_before: int, rows: int) -> None:
    """The rows of a prefill chunk share a start; each sees one key more (what the model passes)."""
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(SEED + context_before + rows)
    hq, hkv, d = 9, 3, 64
    n = context_before + rows
    k_flat, v_flat = torch.randn(256, hkv, d, generator=g).half(), torch.randn(256, hkv, d, generator=g).half()
    slots = torch.randperm(256, generator=g)[:n]
    q = torch.randn(rows, hq, d, generator=g)
    starts = torch.zeros(rows, dtype=torch.int64)
    ends = torch.arange(context_before + 1, n + 1)
    got = ops.paged_attention(q, k_flat, v_flat, slots, starts, ends)
    # reference: causal sdpa over the gathered keys, K/V heads repeated for the query heads
    ks = k_flat[slots].float().repeat_interleave(hq // hkv, 1).transpose(0, 1)  # [Hq, n, D]
    vs = v_flat[slots].float().repeat_interleave(hq // hkv, 1).transpose(0, 1)
    mask = torch.arange(n).unsqueeze(0) < ends.unsqueeze(1)  # [rows, n]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), ks, vs, attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {SEED}, {isa}: {m}")


def test_paged_attention_refuses_bad_slots_and_spans(ops) -> None:
    k = torch.randn(8, 2, 4)
    q = torch.randn(1, 4, 4)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="slot 8 outside the cache"):
        ops.paged_attention(q, k, k, torch.tensor([0, 8]), one, torch.tensor([2]))
    with pytest.raises(RuntimeError, match=r"starts and ends must be contiguous int64 \[R\] with R=1"):
        ops.paged_attention(q, k, k, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="row 0 spans slots \\[0, 3\\) of 2"):
        ops.paged_attention(q, k, k, torch.tensor([0, 1]), one, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="a span must be non-empty"):
        ops.paged_attention(q, k, k, torch.tensor([0, 1]), one, one)
    with pytest.raises(RuntimeError, match="k_flat and v_flat must be contiguous fp32 or fp16"):
        ops.paged_attention(q, k, k.half(), torch.tensor([0, 1]), one, torch.tensor([2]))


def test_other_dtypes_are_refused_by_name(ops) -> None:
    h = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="h must be contiguous fp32"):
        ops.add_rms_norm(h, None, torch.randn(16), 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous fp32"):
        ops.rope(torch.randn(1, 2, 8).half(), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    with pytest.raises(RuntimeError, match="x must be contiguous fp32"):
        ops.rope(torch.randn(1, 8, 2).transpose(1, 2), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
    with pytest.raises(RuntimeError, match="gate and up must be fp32"):
        ops.silu_mul(torch.randn(2, 4).bfloat16(), torch.randn(2, 4))


def test_bad_shapes_are_named(ops) -> None:
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.add_rms_norm(torch.randn(2, 8), None, torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rope(torch.randn(2, 3, 8), torch.randn(2, 1, 4), torch.randn(2, 1, 4))


def test_model_with_fused_ops_matches_plain_ops(tiny_ckpt) -> None:
    from quept.engine.generate import generate
    from quept.model.loader import load_model
    from quept.precision.plan import PrecisionPlan
    from tests.tiny import prefill_then_decode

    lm = load_model(tiny_ckpt, backend="native")
    assert type(lm.model.ops).__name__ == "NativeLayerOps"
    ids = torch.tensor(lm.encode_chat("hello world, fused"))
    fused, logits = lm.model.ops, []
    plain = TorchLayerOps()
    plain.kv_dtype = fused.kv_dtype  # like for like: the native ops keep K/V in fp16
    for ops in (fused, plain):
        lm.model.ops = ops
        logits.append(prefill_then_decode(lm.model, ids, 4, n_prefill=len(ids) - 2, block_size=16))  # decode rows too
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    lm.model.ops = fused
    assert len(generate(lm.model, ids.tolist(), PrecisionPlan.uniform(8), 3).tokens) == 3
