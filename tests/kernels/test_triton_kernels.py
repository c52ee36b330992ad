"""Triton kernels against their plain-torch references, on the CPU through TRITON_INTERPRET=1.

Every launch writes into buffers poisoned with NaN, so an element a kernel forgets to write fails.
Shapes are small and odd (not multiples of the block sizes) because the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates our kernels

import pytest
import torch

pytest.importorskip("triton")

from quept.kernels import triton_elastic as te  # noqa: E402
from quept.kernels import triton_ops  # noqa: E402
from quept.kernels.reference import (  # noqa: E402
    elastic_linear_ref,
    lora_expand_ref,
    lora_shrink_ref,
    nested_slice,
    pack_bitplanes_ref,
    row_ranks_ref,
    unpack_bitplanes_ref,
)

WIDTHS = (8, 6, 5, 4, 3, 2)
RANKS = (0, 4, 8, 8, 16, 20)  # cascaded: grows as the width drops, none at 8 bits
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def make_layer(n: int, k: int, g: int, ranks: tuple[int, ...] = RANKS, seed: int = 0, bias: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    r = max(ranks)
    scales = torch.stack([(torch.rand(n, k // g, generator=gen) + 0.5) * (0.4 / 2**b) for b in WIDTHS])
    mins = torch.stack([-0.2 + 0.02 * torch.randn(n, k // g, generator=gen) for _ in WIDTHS])
    return dict(
        codes=torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen),
        scales=scales.half(),  # [W, N, K/G]
        mins=mins.half(),
        lora_a=(0.1 * torch.randn(r, k, generator=gen)).half(),  # [R, K]
        lora_b=(0.1 * torch.randn(n, r, generator=gen)).half(),  # [N, R]
        bias=torch.randn(n, generator=gen) if bias else None,
        ranks=ranks, g=g,
    )


def mixed_bits(m: int, seed: int = 0) -> torch.Tensor:
    """Every width, row by row, in a shuffled order."""
    bits = torch.tensor([WIDTHS[i % len(WIDTHS)] for i in range(m)])
    return bits[torch.randperm(m, generator=torch.Generator().manual_seed(seed))]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN elements in the output"
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def run_linear(layer: dict, x: torch.Tensor, row_bits: torch.Tensor | int, path: str, planes: torch.Tensor | None = None,
               split_k: int | None = None, meta: dict | None = None, shrink_meta: dict | None = None) -> torch.Tensor:
    wbits, wranks, lut = triton_ops.width_tables(WIDTHS, layer["ranks"], "cpu")
    row_widx = triton_ops.row_width_index(row_bits, x.shape[0], WIDTHS, lut)
    if planes is None:
        planes = pack_bitplanes_ref(layer["codes"])
    out = torch.full((x.shape[0], layer["codes"].shape[0]), float("nan"), dtype=x.dtype)
    r = max(layer["ranks"])
    return triton_ops.elastic_linear_planes(
        x, planes, layer["scales"], layer["mins"], layer["lora_a"][:r], layer["lora_b"][:, :r], layer["bias"],
        row_widx, wbits, wranks, layer["g"], isinstance(row_bits, int), out=out, path=path, split_k=split_k,
        meta=meta, shrink_meta=shrink_meta)


def reference(layer: dict, x: torch.Tensor, row_bits: torch.Tensor | int) -> torch.Tensor:
    return elastic_linear_ref(x, layer["codes"], layer["scales"], layer["mins"], layer["lora_a"], layer["lora_b"],
                              row_bits, WIDTHS, layer["ranks"], layer["g"], layer["bias"])


# ---------------------------------------------------------------------------------- references


def test_reference_pack_unpack_roundtrip() -> None:
    codes = torch.randint(0, 256, (7, 96), dtype=torch.uint8)
    planes = pack_bitplanes_ref(codes)
    assert planes.shape == (8, 7, 3) and planes.dtype == torch.int32
    for b in range(1, 9):
        assert torch.equal(unpack_bitplanes_ref(planes, b), nested_slice(codes, b))


def test_reference_shrink_expand_compose_to_adapter_term() -> None:
    x, a, b = torch.randn(6, 64), torch.randn(10, 64), torch.randn(9, 10)
    ranks = torch.tensor([0, 3, 10, 5, 1, 10])
    t = lora_shrink_ref(x, a, ranks)
    for i, r in enumerate(ranks.tolist()):
        assert torch.all(t[i, r:] == 0)
        want = (x[i] @ a[:r].t()) @ b[:, :r].t()
        torch.testing.assert_close(lora_expand_ref(t, b)[i], want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("n,k", [(37, 96), (5, 384), (64, 32)])
def test_pack_kernel(n: int, k: int) -> None:
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    out = torch.full((8, n, k // 32), -7, dtype=torch.int32)  # poison
    assert torch.equal(te.pack_bitplanes(codes, out=out), pack_bitplanes_ref(codes))


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_kernel_per_row_rank(dtype: torch.dtype) -> None:
    m, k = 19, 96  # neither a multiple of the blocks (16 rows, 64 columns)
    layer = make_layer(8, k, 32)
    x = torch.randn(m, k).to(dtype)
    bits = mixed_bits(m)
    wbits, wranks, lut = triton_ops.width_tables(WIDTHS, RANKS, "cpu")
    out = torch.full((m, max(RANKS)), float("nan"))
    te.lora_shrink(x, layer["lora_a"], triton_ops.row_width_index(bits, m, WIDTHS, lut), wranks, out)
    ref = lora_shrink_ref(x, layer["lora_a"], row_ranks_ref(bits, m, WIDTHS, RANKS))
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 3])
def test_decode_partials(split_k: int) -> None:
    """Raw decode-kernel outputs: summed over K splits, the quantized matmul and the (unmasked) shrink."""
    m, n, k, g = 3, 37, 224, 32  # 7 words, not divisible by 3 splits or by 2-word blocks
    layer = make_layer(n, k, g)
    x = torch.randn(m, k)
    bits = torch.tensor([2, 8, 5])
    wbits, wranks, lut = triton_ops.width_tables(WIDTHS, RANKS, "cpu")
    r = max(RANKS)
    y_ws = torch.full((split_k, m, n), float("nan"))
    t_ws = torch.full((split_k, m, r), float("nan"))
    te.decode_partials(x, pack_bitplanes_ref(layer["codes"]), layer["scales"], layer["mins"], layer["lora_a"],
                       triton_ops.row_width_index(bits, m, WIDTHS, lut), wbits, wranks, g, split_k, y_ws, t_ws)
    no_adapter = dict(layer, ranks=(0,) * len(WIDTHS), bias=None)
    assert rel_err(y_ws.sum(0), reference(no_adapter, x, bits)) < 1e-4
    assert rel_err(t_ws.sum(0), lora_shrink_ref(x, layer["lora_a"])) < 1e-4  # row ranks reach max(RANKS)


@pytest.mark.parametrize("path,m", [("decode", 6), ("prefill", 23)])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_all_widths(path: str, m: int, g: int, dtype: torch.dtype) -> None:
    """One launch, every width row by row, against the reference."""
    n, k = 45, 2 * g if g > 32 else 96
    layer = make_layer(n, k, g, seed=g)
    x = torch.randn(m, k).to(dtype)
    bits = mixed_bits(m, seed=m)
    out = run_linear(layer, x, bits, path, split_k=2 if path == "decode" else None)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, reference(layer, x, bits)) < TOL[dtype]


@pytest.mark.parametrize("i", range(len(te.DECODE_CONFIGS)))
def test_decode_gpu_configs(i: int) -> None:
    """Every block shape the GPU autotuner may pick, on odd sizes (7 words of K, N=45)."""
    layer = make_layer(45, 224, 32, seed=i)
    x = torch.randn(7, 224)
    bits = mixed_bits(7, seed=i)
    out = run_linear(layer, x, bits, "decode", split_k=1 + i % 3, meta=te.DECODE_CONFIGS[i][2])
    assert rel_err(out, reference(layer, x, bits)) < TOL[torch.float32]


@pytest.mark.parametrize("i", range(len(te.PREFILL_CONFIGS)))
def test_prefill_gpu_configs(i: int) -> None:
    layer = make_layer(45, 224, 32, seed=i)
    m = 37 if i % 2 else 150
    x = torch.randn(m, 224, dtype=torch.float16)
    bits = mixed_bits(m, seed=i)
    out = run_linear(layer, x, bits, "prefill", meta=te.PREFILL_CONFIGS[i][2],
                     shrink_meta=te.SHRINK_CONFIGS[i % len(te.SHRINK_CONFIGS)][2])
    assert rel_err(out, reference(layer, x, bits)) < TOL[torch.float16]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("path,m", [("decode", 1), ("decode", 5), ("prefill", 17)])
def test_uniform_width(bits: int, path: str, m: int) -> None:
    n, k, g = 33, 128, 64
    layer = make_layer(n, k, g, seed=bits)
    x = torch.randn(m, k)
    assert rel_err(run_linear(layer, x, bits, path), reference(layer, x, bits)) < TOL[torch.float32]


@pytest.mark.parametrize("path,m", [("decode", 4), ("prefill", 20)])
@pytest.mark.parametrize("ranks", [(0, 0, 0, 0, 0, 0), (16, 16, 16, 16, 16, 16), (0, 1, 2, 3, 17, 33)])
def test_ranks(path: str, m: int, ranks: tuple[int, ...]) -> None:
    layer = make_layer(35, 64, 32, ranks=ranks, bias=False)
    x = torch.randn(m, 64)
    bits = mixed_bits(m)
    assert rel_err(run_linear(layer, x, bits, path), reference(layer, x, bits)) < TOL[torch.float32]


@pytest.mark.parametrize("path,m", [("decode", 3), ("prefill", 18)])
def test_planes_below_width_are_not_read(path: str, m: int) -> None:
    """At width b, garbage in planes b..7 (the less significant bits) leaves the output unchanged."""
    n, k, g = 21, 64, 32
    layer = make_layer(n, k, g, seed=3)
    x = torch.randn(m, k)
    planes = pack_bitplanes_ref(layer["codes"])
    for b in WIDTHS:
        clean = run_linear(layer, x, b, path, planes=planes)
        dirty_planes = planes.clone()
        dirty_planes[b:] = torch.randint(-2**31, 2**31 - 1, dirty_planes[b:].shape, dtype=torch.int32)
        dirty = run_linear(layer, x, b, path, planes=dirty_planes)
        assert torch.equal(clean, dirty), f"width {b} read planes it does not need"
        assert rel_err(dirty, reference(layer, x, b)) < TOL[torch.float32]
    # a mixed batch reads planes up to its widest row
    bits = torch.tensor([4, 2, 3] * (m // 3))
    dirty_planes = planes.clone()
    dirty_planes[4:] = -1
    out = run_linear(layer, x, bits, path, planes=dirty_planes)
    assert rel_err(out, reference(layer, x, bits)) < TOL[torch.float32]


def test_dispatch_by_row_count_and_empty_batch() -> None:
    layer = make_layer(16, 64, 64)
    for m in (0, 1, triton_ops.DECODE_MAX_ROWS, triton_ops.DECODE_MAX_ROWS + 1):
        x = torch.randn(m, 64)
        out = run_linear(layer, x, 4, "auto")
        assert out.shape == (m, 16)
        if m:
            assert rel_err(out, reference(layer, x, 4)) < TOL[torch.float32]


def test_bad_widths_and_groups_are_named() -> None:
    _, _, lut = triton_ops.width_tables(WIDTHS, RANKS, "cpu")
    with pytest.raises(ValueError, match="stored widths are"):
        triton_ops.row_width_index(7, 2, WIDTHS, lut)
    with pytest.raises(ValueError, match=r"\[7\] are not stored"):
        triton_ops.row_width_index(torch.tensor([8, 7]), 2, WIDTHS, lut)
    layer = dict(make_layer(8, 64, 32), g=16)
    with pytest.raises(ValueError, match="multiple of 32"):
        run_linear(layer, torch.randn(2, 64), 8, "auto")
