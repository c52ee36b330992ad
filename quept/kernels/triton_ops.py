"""Entry points of the Triton elastic linear: width tables, dispatch by row count, torch custom ops.

`elastic_linear_planes` picks the decode kernel (GEMV, split-K, shrink fused in the same launch,
expand fused in the split-K epilogue) for at most `DECODE_MAX_ROWS` rows and the prefill kernel
(`tl.dot` tiles, expand fused, shrink a separate `tl.dot` launch) above. The entry points are
registered as `torch.ops.quept.{pack_bitplanes, lora_shrink, elastic_linear}` with fake (meta)
implementations so that `torch.compile` can trace through them.

Importing this module imports triton (and, without CUDA, turns on its interpreter).
"""

import functools
import logging
from collections.abc import Sequence

import torch

from quept.kernels import triton_elastic as te

log = logging.getLogger(__name__)

DECODE_MAX_ROWS = 8  # up to this many rows the decode (GEMV) kernel runs; above it, prefill (tl.dot)
PATHS = ("auto", "decode", "prefill")


def width_tables(
    widths: Sequence[int], ranks: Sequence[int], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Device tables: wbits int32 [W] (bits of width i), wranks int32 [W], lut int32 [9] (bits -> i, or -1)."""
    if len(widths) != len(ranks):
        raise ValueError(f"{len(widths)} widths but {len(ranks)} ranks")
    lut = [-1] * 9
    for i, b in enumerate(widths):
        if not 1 <= int(b) <= 8:
            raise ValueError(f"width {b} is outside 1..8")
        lut[int(b)] = i
    wbits = torch.tensor([int(b) for b in widths], dtype=torch.int32, device=device)
    wranks = torch.tensor([int(r) for r in ranks], dtype=torch.int32, device=device)
    return wbits, wranks, torch.tensor(lut, dtype=torch.int32, device=device)


def row_width_index(
    row_bits: torch.Tensor | int, m: int, widths: Sequence[int], lut: torch.Tensor
) -> torch.Tensor:
    """int32 [M]: position in `widths` of every row's width. Raises (CPU) or asserts (CUDA) on unknown widths."""
    if isinstance(row_bits, int):
        if row_bits not in widths:
            raise ValueError(f"width {row_bits} is not stored; stored widths are {list(widths)}")
        return torch.full((m,), list(widths).index(row_bits), dtype=torch.int32, device=lut.device)
    if row_bits.shape != (m,):
        raise ValueError(f"row_bits must be an int or an int tensor [{m}], got shape {list(row_bits.shape)}")
    bits = row_bits.to(device=lut.device, dtype=torch.int64)
    if bits.device.type == "cpu":
        bad = (bits < 0) | (bits > 8)
        if bool(bad.any()) or bool((lut[bits.clamp(0, 8)] < 0).any()):
            wrong = sorted(set(bits.tolist()) - set(int(b) for b in widths))
            raise ValueError(f"widths {wrong} are not stored; stored widths are {list(widths)}")
    else:
        torch._assert_async(((bits >= 0) & (bits <= 8)).all(), "row width outside 1..8")
    idx = lut[bits.clamp(0, 8)]
    if bits.device.type != "cpu":
        torch._assert_async((idx >= 0).all(), "row width not stored")
    return idx


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_split_k(n: int, kw: int, device: torch.device) -> int:
    """K splits for the decode kernel: enough programs to fill the GPU twice (1 off the GPU)."""
    if device.type != "cuda":
        return 1
    tiles = -(-n // 64)
    want = -(-2 * _sm_count(device.index or 0) // tiles)
    return max(1, min(want, kw // 4, 32))


def elastic_linear_planes(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
    lora_a: torch.Tensor, lora_b: torch.Tensor, bias: torch.Tensor | None,
    row_widx: torch.Tensor, wbits: torch.Tensor, wranks: torch.Tensor, group_size: int, uniform: bool,
    *, out: torch.Tensor | None = None, path: str = "auto", split_k: int | None = None,
    meta: dict[str, int] | None = None, shrink_meta: dict[str, int] | None = None,
) -> torch.Tensor:
    """y = x·deq_b(W)ᵀ + (x·A[:r_b]ᵀ)·B[:, :r_b]ᵀ + bias, b per row; [M, N] in x.dtype.

    x [M, K]; planes int32 [8, N, K/32]; scales, mins fp16 [W, N, K/G]; lora_a [R, K]; lora_b [N, R];
    row_widx int32 [M] (position of each row's width in the widths); `uniform`: every row has the
    same width (no sort needed). `path`, `split_k`, `meta` (block sizes of the decode or prefill
    kernel) and `shrink_meta` override the automatic choices (tests).
    """
    if path not in PATHS:
        raise ValueError(f"path {path!r} unknown; choose one of {list(PATHS)}")
    if group_size % te.PLANE_BITS:
        raise ValueError(f"group size {group_size} must be a multiple of {te.PLANE_BITS} for the triton kernels")
    m = x.shape[0]
    n = planes.shape[1]
    r = lora_a.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if path == "auto":
        path = "decode" if m <= DECODE_MAX_ROWS else "prefill"
    if path == "decode":
        s = split_k or default_split_k(n, planes.shape[2], x.device)
        y_ws = torch.empty(s, m, n, dtype=torch.float32, device=x.device)  # partial sums per K split
        t_ws = torch.empty(s, m, r, dtype=torch.float32, device=x.device)
        te.decode_partials(x, planes, scales, mins, lora_a, row_widx, wbits, wranks, group_size, s, y_ws, t_ws, meta)
        te.decode_epilogue(y_ws, t_ws, lora_b, bias, row_widx, wranks, out)
        return out
    t = None
    if r > 0:
        t = torch.empty(m, r, dtype=torch.float32, device=x.device)
        te.lora_shrink(x, lora_a, row_widx, wranks, t, shrink_meta)
    perm = None
    widx = row_widx
    if not uniform:  # SGMV-style width segments: a stable device sort, no host sync
        widx, order = torch.sort(row_widx, stable=True)
        perm = order.to(torch.int32)
    te.prefill(x, planes, scales, mins, t, lora_b, bias, widx, perm, wbits, wranks, group_size, out, meta)
    return out


# --------------------------------------------------------------------- torch.library custom ops


@torch.library.custom_op("quept::pack_bitplanes", mutates_args=())
def pack_bitplanes_op(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 bit-planes [8, N, K/32]."""
    return te.pack_bitplanes(codes)


@pack_bitplanes_op.register_fake
def _pack_bitplanes_fake(codes: torch.Tensor) -> torch.Tensor:
    return codes.new_empty(te.N_PLANES, codes.shape[0], codes.shape[1] // te.PLANE_BITS, dtype=torch.int32)


@torch.library.custom_op("quept::lora_shrink", mutates_args=())
def lora_shrink_op(x: torch.Tensor, lora_a: torch.Tensor, row_widx: torch.Tensor, wranks: torch.Tensor) -> torch.Tensor:
    """fp32 [M, R] = x·A[:R]ᵀ, zero beyond each row's rank."""
    out = torch.empty(x.shape[0], lora_a.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0] and lora_a.shape[0]:
        te.lora_shrink(x, lora_a, row_widx, wranks, out)
    return out


@lora_shrink_op.register_fake
def _lora_shrink_fake(x: torch.Tensor, lora_a: torch.Tensor, row_widx: torch.Tensor, wranks: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)


@torch.library.custom_op("quept::elastic_linear", mutates_args=())
def elastic_linear_op(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, lora_a: torch.Tensor,
    lora_b: torch.Tensor, bias: torch.Tensor | None, row_widx: torch.Tensor, wbits: torch.Tensor,
    wranks: torch.Tensor, group_size: int, uniform: bool,
) -> torch.Tensor:
    """The elastic linear over bit-planes, [M, N] in x.dtype (see `elastic_linear_planes`)."""
    return elastic_linear_planes(x, planes, scales, mins, lora_a, lora_b, bias, row_widx, wbits, wranks,
                                 group_size, uniform)


@elastic_linear_op.register_fake
def _elastic_linear_fake(
    x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, lora_a: torch.Tensor,
    lora_b: torch.Tensor, bias: torch.Tensor | None, row_widx: torch.Tensor, wbits: torch.Tensor,
    wranks: torch.Tensor, group_size: int, uniform: bool,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], planes.shape[1])
