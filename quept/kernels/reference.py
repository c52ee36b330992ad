"""Plain-torch references for the elastic linear: the contract every backend is tested against.

The elastic linear computes, for one token row `x` at bit-width `b`:

    y = x · deq_b(W)ᵀ + (x · A[:r_b]ᵀ) · B[:, :r_b]ᵀ  (+ bias)

where `deq_b(W)[n, k] = (codes[n, k] >> (8 - b)) * scales[i_b, n, k // G] + mins[i_b, n, k // G]`
(`i_b` is the position of `b` in the stored widths) and `r_b` is the adapter rank of width `b`.
Every row of one call may use a different width (per-row widths).

Tensor roles (names used across the code base):
    codes   uint8 [N, K]          nested master codes, the b-bit code is the top b bits
    scales  fp16  [W, N, K // G]  per-width, per-group scale
    mins    fp16  [W, N, K // G]  per-width, per-group offset
    lora_a  fp16  [R, K]          cascaded adapter, width b uses rows [:r_b]
    lora_b  fp16  [N, R]          cascaded adapter, width b uses columns [:r_b]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_WIDTHS: tuple[int, ...] = (8, 6, 5, 4, 3, 2)


def nested_slice(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The b-bit code of every weight: the `bits` most significant bits of the 8-bit code."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return codes >> (8 - bits)


def dequantize(
    codes: torch.Tensor, scales_b: torch.Tensor, mins_b: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """fp32 weights [N, K] of one width. `scales_b`, `mins_b`: [N, K // G] of that width."""
    n, k = codes.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide K={k}")
    q = nested_slice(codes, bits).float().view(n, k // group_size, group_size)  # [N, K/G, G]
    w = q * scales_b.float().unsqueeze(-1) + mins_b.float().unsqueeze(-1)
    return w.view(n, k)


def width_index(widths: Sequence[int], bits: int) -> int:
    """Position of `bits` in the stored widths, with an error naming the allowed ones."""
    try:
        return list(widths).index(int(bits))
    except ValueError:
        raise ValueError(f"width {bits} is not stored; stored widths are {list(widths)}") from None


def elastic_linear_ref(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    row_bits: torch.Tensor | int,
    widths: Sequence[int],
    ranks: Sequence[int],
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference elastic linear. x: [M, K]; row_bits: int or int tensor [M]; returns [M, N] in x.dtype.

    Computed in fp32, one width at a time, with the adapter applied beside the quantized matmul.
    """
    m = x.shape[0]
    if isinstance(row_bits, int):
        row_bits = torch.full((m,), row_bits, dtype=torch.int64)
    row_bits = row_bits.to(torch.int64).cpu()
    xf = x.float()
    out = torch.empty(m, codes.shape[0], dtype=torch.float32, device=x.device)
    for bits in torch.unique(row_bits).tolist():
        i = width_index(widths, bits)
        rows = (row_bits == bits).nonzero().flatten().to(x.device)
        w = dequantize(codes, scales[i], mins[i], bits, group_size)  # [N, K]
        xs = xf.index_select(0, rows)  # [m_b, K]
        y = xs @ w.t()
        r = int(ranks[i])
        if r > 0:
            y = y + (xs @ lora_a[:r].float().t()) @ lora_b[:, :r].float().t()
        out.index_copy_(0, rows, y)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# --- references for the Triton kernels (kernels/triton_elastic.py) ------------------------------
#
# Bit-plane layout (what the GPU backend repacks the master codes into at load):
#     planes  int32 [8, N, K // 32]   plane p holds bit (7 - p) of every code (plane 0 = MSB);
#                                     bit j of word w is column k = 32 * w + j
# so the b-bit nested code is  sum_{p < b} bit_p << (b - 1 - p)  and width b reads planes 0..b-1.

PLANE_BITS = 32  # columns per int32 word of a bit-plane


def pack_bitplanes_ref(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K a multiple of 32) -> int32 bit-planes [8, N, K // 32]."""
    n, k = codes.shape
    if k % PLANE_BITS:
        raise ValueError(f"K={k} must be a multiple of {PLANE_BITS} to pack bit-planes")
    c = codes.to(torch.int64).view(n, k // PLANE_BITS, PLANE_BITS)  # [N, K/32, 32]
    shifts = torch.arange(PLANE_BITS, device=codes.device, dtype=torch.int64)  # [32]
    planes = []
    for p in range(8):
        bits = (c >> (7 - p)) & 1  # [N, K/32, 32]
        word = (bits << shifts).sum(-1)  # [N, K/32], in 0 .. 2^32 - 1
        planes.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
    return torch.stack(planes)  # [8, N, K/32]


def unpack_bitplanes_ref(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 bit-planes [8, N, K // 32] -> the `bits`-bit nested codes uint8 [N, K], reading planes 0..bits-1."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    _, n, kw = planes.shape
    shifts = torch.arange(PLANE_BITS, device=planes.device, dtype=torch.int64)  # [32]
    code = torch.zeros(n, kw, PLANE_BITS, dtype=torch.int64, device=planes.device)  # [N, K/32, 32]
    for p in range(bits):
        code = (code << 1) | ((planes[p].to(torch.int64).unsqueeze(-1) >> shifts) & 1)
    return code.view(n, kw * PLANE_BITS).to(torch.uint8)  # [N, K]


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, row_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Adapter shrink with a rank per row: t[m, r] = x[m] · A[r] for r < row_ranks[m], else 0.

    x: [M, K]; lora_a: [R, K]; row_ranks: int [M] or None (every row uses all R). Returns fp32 [M, R].
    """
    t = x.float() @ lora_a.float().t()  # [M, R]
    if row_ranks is not None:
        cols = torch.arange(lora_a.shape[0], device=x.device)
        t = t * (cols.unsqueeze(0) < row_ranks.to(x.device).unsqueeze(1))
    return t


def lora_expand_ref(t: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Adapter expand: t [M, R] (already masked per row) times B[:, :R]ᵀ -> fp32 [M, N]."""
    r = t.shape[1]
    return t.float() @ lora_b[:, :r].float().t()


def row_ranks_ref(row_bits: torch.Tensor | int, m: int, widths: Sequence[int], ranks: Sequence[int]) -> torch.Tensor:
    """The adapter rank of every row, int64 [M]."""
    if isinstance(row_bits, int):
        return torch.full((m,), int(ranks[width_index(widths, row_bits)]), dtype=torch.int64)
    return torch.tensor([int(ranks[width_index(widths, int(b))]) for b in row_bits.tolist()], dtype=torch.int64)
