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

from typing import Sequence

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
