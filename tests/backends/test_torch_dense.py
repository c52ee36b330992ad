"""The torch backend against the plain-torch reference: every width, odd sizes, per-row mixes."""

from __future__ import annotations

import random

import pytest
import torch

from quept.backends.base import ElasticWeights
from quept.backends.torch_dense import HALF_ROWS_MAX, TorchBackend
from quept.build.builder import quantize_linear
from quept.kernels.reference import elastic_linear_ref
from quept.precision.segments import segments_of

WIDTHS = (8, 6, 5, 4, 3, 2)


def random_layer(n: int, k: int, group: int, ranks: dict[int, int], seed: int, bias: bool) -> ElasticWeights:
    g = torch.Generator().manual_seed(seed)
    w = quantize_linear(torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None, WIDTHS, group, ranks)
    w.lora_a = (torch.randn(w.lora_a.shape, generator=g) * 0.1).half()
    w.lora_b = (torch.randn(w.lora_b.shape, generator=g) * 0.1).half()
    w.scales, w.mins = w.scales.half(), w.mins.half()
    return w


SEED = random.randrange(1 << 30)  # fresh inputs every run; printed on failure through the test id


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
@pytest.mark.parametrize("n,k,group,m", [(37, 64, 32, 1), (19, 192, 64, 5), (64, 128, 128, 13)])
@pytest.mark.parametrize("ranks", [{8: 0, 6: 8, 5: 8, 4: 16, 3: 24, 2: 32}, {b: 0 for b in WIDTHS}])
def test_matches_reference_every_width_and_mixed_rows(seed, n, k, group, m, ranks) -> None:
    layer = random_layer(n, k, group, ranks, seed, bias=seed % 2 == 0)
    backend = TorchBackend(max_cached_widths=2)
    prepared = backend.prepare(layer)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 7))
    for b in WIDTHS:
        ref = elastic_linear_ref(x, layer.codes, layer.scales, layer.mins, layer.lora_a, layer.lora_b, b,
                                 layer.widths, layer.ranks, group, layer.bias)
        torch.testing.assert_close(backend.forward(prepared, x, b), ref, rtol=1e-4, atol=1e-4)
    row_bits = torch.tensor([WIDTHS[i % 6] for i in range(m)])
    ref = elastic_linear_ref(x, layer.codes, layer.scales, layer.mins, layer.lora_a, layer.lora_b, row_bits,
                             layer.widths, layer.ranks, group, layer.bias)
    torch.testing.assert_close(backend.forward(prepared, x, segments_of(row_bits.tolist())), ref,
                               rtol=1e-4, atol=1e-4)
    assert len(prepared.dense) <= 2  # the LRU bound holds


@pytest.mark.parametrize("dtype,name", [(torch.float16, "torch"), (torch.bfloat16, "torch-bf16")])
def test_half_compute_is_close_to_reference_every_width_and_mixed_rows(dtype, name) -> None:
    layer = random_layer(53, 192, 64, {8: 0, 6: 8, 5: 8, 4: 16, 3: 24, 2: 32}, SEED + 2, bias=True)
    backend = TorchBackend(dtype=dtype)
    assert backend.name == name
    prepared = backend.prepare(layer)
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]  # 11- and 8-bit significands, fp32 accumulation
    for m in (1, HALF_ROWS_MAX, HALF_ROWS_MAX + 3):  # half-dtype GEMV, and the per-call upcast past it
        x = torch.randn(m, 192, generator=torch.Generator().manual_seed(SEED + 3 + m))
        row_bits = torch.tensor([WIDTHS[i % 6] for i in range(m)])
        for bits in (*WIDTHS, row_bits):
            ref = elastic_linear_ref(x, layer.codes, layer.scales, layer.mins, layer.lora_a, layer.lora_b, bits,
                                     layer.widths, layer.ranks, 64, layer.bias)
            out = backend.forward(prepared, x, bits if isinstance(bits, int) else segments_of(bits.tolist()))
            assert out.dtype == torch.float32 and all(d.dtype == dtype for d in prepared.dense.values())
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (m, bits, err)


def test_half_compute_falls_back_to_fp32_where_fp16_overflows() -> None:
    layer = random_layer(16, 64, 32, {b: 0 for b in WIDTHS}, 1, bias=False)
    half, full = TorchBackend(dtype=torch.float16), TorchBackend(dtype=torch.float32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(SEED + 4))
    x[1] *= 1e6  # past fp16's 65504: the cast alone would give inf
    for b in (8, 2):
        out = half.forward(half.prepare(layer), x, b)
        assert torch.isfinite(out).all()
        ref = full.forward(full.prepare(layer), x, b)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-3, atol=1e-3 * ref[1].abs().max().item())


def test_backend_names_pick_the_dtype() -> None:
    from quept.backends import get_backend

    assert get_backend("torch").dtype == torch.float16 and get_backend("torch-fp32").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        TorchBackend(dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown backend 'torch16'"):
        get_backend("torch16")


def test_unknown_width_is_named() -> None:
    layer = random_layer(8, 64, 32, {b: 0 for b in WIDTHS}, 0, bias=False)
    backend = TorchBackend()
    with pytest.raises(ValueError, match="width 7 is not stored"):
        backend.forward(backend.prepare(layer), torch.randn(1, 64), 7)


def test_cache_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_cached_widths"):
        TorchBackend(max_cached_widths=0)
