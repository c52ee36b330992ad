"""Numeric contract of the native CPU kernel, in plain torch.

The native kernel quantizes the activations of each row to int8, per block of 32 columns (as
llama.cpp's Q8_0 activations), and multiplies them with the integer codes exactly in integers:

    dx_c  = max_{k in c} |x_k| / 127                         (fp32)
    xq_k  = round_half_even(x_k * (1 / dx_c)), in [-127, 127]
    c     = 2^(b-1)                                          (codes enter centred)
    y_n   = sum_g scale_g * sum_{c in g} dx_c * sum_{k in c} (q_k - c) * xq_k   (the code term)
          + sum_g (min_g + c * scale_g) * sum_{k in g} x_k                     (fp32 x: exact)
          + sum_j B[n, j] * (sum_k A[j, k] * x_k)                           (fp32 x: exact)
          + bias_n

so its only departure from `kernels.reference.elastic_linear_ref` is the centred code term seen
through the rounded activations: per output, |y - y_ref| <= sum_k |scale_g(k) * (q_k - c)| * dx_c(k) / 2.

Rows at width 8 (unless `refine_w8=False`, the kernel's set_w8_refine(False)) take two int8 terms:

    r_k   = x_k - xq_k * dx_c                                (fp32: rounded product, then difference)
    dx2_c = max_{k in c} |r_k| / 127,  xq2_k = round_half_even(r_k * (1 / dx2_c))
    code term with xq_k dx_c + xq2_k dx2_c in place of xq_k dx_c

so the bound above holds with dx2 in place of dx: about 127 times tighter. Width 8 is where the
weights are finest and one int8 activation term was the larger error (on the default model a
0.3-0.6 logit shift that flipped a near-tied greedy answer); narrower widths keep one term, since
their weight error dwarfs it.
Centring makes that error about a third of what plain codes give for bell-shaped weights (on the
default model, perplexity with int8 activations is within about 1% of fp32 activations at w8/w4;
see the report in benchmarks/results/cpu_decode.json). `elastic_linear_emulated` reproduces the kernel up to fp32 summation order
(tests hold the kernel to 1e-5 of the magnitude against it) and `error_bound` gives the bound above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quept.kernels.reference import nested_slice, width_index

CHUNK = 32  # columns per activation block


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 32) -> (xq int8-valued int32 [M, K], dx fp32 [M, K/32]) as the kernel does."""
    m, k = x.shape
    if k % CHUNK:
        raise ValueError(f"K={k} is not a multiple of {CHUNK}")
    xb = x.float().reshape(m, k // CHUNK, CHUNK)  # [M, K/32, 32]
    dx = xb.abs().amax(dim=-1) / 127.0  # [M, K/32] fp32 division, as the kernel
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    xq = torch.round(xb * inv.unsqueeze(-1)).clamp_(-127, 127)  # round half to even
    return xq.to(torch.int32).reshape(m, k), dx


def activation_terms(x: torch.Tensor, refine: bool) -> torch.Tensor:
    """The activations the code term sees, float64 [M, K]: xq dx, plus xq2 dx2 when `refine`."""
    m, k = x.shape
    xq, dx = quantize_activations(x)
    step = dx.repeat_interleave(CHUNK, dim=1)  # [M, K] fp32
    xhat = xq.double() * step.double()
    if refine:
        r = x.float() - xq.float() * step  # fp32, as the kernel
        xq2, dx2 = quantize_activations(r)
        xhat = xhat + xq2.double() * dx2.double().repeat_interleave(CHUNK, dim=1)
    return xhat


def _per_row(row_bits: torch.Tensor | int, m: int) -> torch.Tensor:
    if isinstance(row_bits, int):
        return torch.full((m,), row_bits, dtype=torch.int64)
    return row_bits.to(torch.int64).cpu()


def elastic_linear_emulated(
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
    refine_w8: bool = True,
) -> torch.Tensor:
    """The native kernel's arithmetic in float64 (int8 activations in the code term). Returns fp32 [M, N]."""
    m, k = x.shape
    n = codes.shape[0]
    row_bits = _per_row(row_bits, m)
    xd = x.double()
    out = torch.empty(m, n, dtype=torch.float64)
    for bits in torch.unique(row_bits).tolist():
        i = width_index(widths, bits)
        rows = (row_bits == bits).nonzero().flatten()
        xhat = activation_terms(x[rows], refine_w8 and bits == 8)  # [rows, K]
        centre = float(1 << (bits - 1))
        q = nested_slice(codes, bits).double().view(n, k // group_size, group_size) - centre  # [N, K/G, G]
        wq = (q * scales[i].double().unsqueeze(-1)).view(n, k)  # centred code term weights [N, K]
        wm = (mins[i].double() + centre * scales[i].double()).repeat_interleave(group_size, dim=1)  # [N, K]
        y = xhat @ wq.t() + xd[rows] @ wm.t()
        r = int(ranks[i])
        if r > 0:
            y = y + (xd[rows] @ lora_a[:r].double().t()) @ lora_b[:, :r].double().t()
        out[rows] = y
    if bias is not None:
        out = out + bias.double()
    return out.float()


def error_bound(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    row_bits: torch.Tensor | int,
    widths: Sequence[int],
    group_size: int,
    refine_w8: bool = True,
) -> torch.Tensor:
    """Per-output bound [M, N] on |kernel - elastic_linear_ref| from the rounded activations (fp64)."""
    m, k = x.shape
    n = codes.shape[0]
    row_bits = _per_row(row_bits, m)
    xq, dx = quantize_activations(x)
    out = torch.empty(m, n, dtype=torch.float64)
    for bits in torch.unique(row_bits).tolist():
        i = width_index(widths, bits)
        rows = (row_bits == bits).nonzero().flatten()
        step = dx[rows]
        if refine_w8 and bits == 8:
            r = x[rows].float() - xq[rows].float() * dx[rows].repeat_interleave(CHUNK, dim=1)
            step = quantize_activations(r)[1]
        half_step = (step.double() / 2).repeat_interleave(CHUNK, dim=1)  # [rows, K]
        q = nested_slice(codes, bits).double().view(n, k // group_size, group_size) - float(1 << (bits - 1))
        wabs = (q.abs() * scales[i].double().abs().unsqueeze(-1)).view(n, k)  # |scale * (q - c)| [N, K]
        out[rows] = half_step @ wabs.t()
    return out


def magnitude(
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
    """Sum of absolute terms per output [M, N]: the scale against which fp32 rounding is judged."""
    return elastic_linear_emulated(
        x.abs(), codes, scales.abs(), mins.abs(), lora_a.abs(), lora_b.abs(), row_bits, widths, ranks, group_size,
        None if bias is None else bias.abs(),
    ).double()
