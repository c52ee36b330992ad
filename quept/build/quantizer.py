"""Nested round-to-nearest quantization (the uncalibrated starting point of every checkpoint).

Master codes are asymmetric 8-bit codes per group of `G` input columns. The b-bit model reads the
top `b` bits; its per-width affine starts at the centre of the 8-bit bin range each b-bit code
covers (docs/architecture.md §1), so `w ≈ q_b * scale_b + min_b` with

    scale_b = scale_8 * 2^(8-b),  min_b = min_8 + scale_8 * (2^(8-b) - 1) / 2.

Independent round-to-nearest (a separate b-bit grid per width) is kept here as the quality
baseline that nesting is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quept.kernels.reference import DEFAULT_WIDTHS

_EPS = 1e-8


def check_group_size(k: int, group_size: int, name: str = "weight") -> None:
    """Raise a clear error when `group_size` does not divide the input width `k`."""
    if group_size <= 0 or k % group_size:
        raise ValueError(
            f"group size {group_size} does not divide K={k} of {name}; "
            f"choose a group size that divides every K (e.g. a divisor of {k})"
        )


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """Validate stored widths: distinct, in 1..8, and 8 first (the master width)."""
    ws = tuple(int(w) for w in widths)
    if not ws or ws[0] != 8 or len(set(ws)) != len(ws) or any(not 1 <= w <= 8 for w in ws):
        raise ValueError(f"widths must be distinct values in 1..8 starting with 8, got {list(ws)}")
    return ws


def group_min_max(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of w [N, K]: two [N, K // G] tensors."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)  # [N, K/G, G]
    return wg.amin(-1), wg.amax(-1)


def quantize_nested(
    w: torch.Tensor, widths: Sequence[int] = DEFAULT_WIDTHS, group_size: int = 64, affine: str = "centre",
    anchor_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nested RTN: codes uint8 [N, K], scales and mins fp32 [W, N, K // G].

    affine: "centre" (centre of the 8-bit bin range each b-bit code covers) or "lsq" (the
    least-squares line through the group's weights against its b-bit codes, `fit_affines_lsq`).
    anchor_bits: codes from `anchored_nested_codes` (the independent RTN codes at that width in the top
    bits) instead of min/max RTN over 255 steps; needs "lsq" (the centre formula assumes min/max codes)."""
    if affine not in AFFINES:
        raise ValueError(f"affine must be one of {list(AFFINES)}, got {affine!r}")
    widths = check_widths(widths)
    n, k = w.shape
    check_group_size(k, group_size)
    if anchor_bits is not None:
        if affine != "lsq":
            raise ValueError("anchored codes need least-squares affines (affine='lsq'); the centre-of-bin "
                             "affines assume min/max codes")
        codes = anchored_nested_codes(w, group_size, anchor_bits)
        return codes, *fit_affines_lsq(w, codes, widths, group_size)
    lo, hi = group_min_max(w, group_size)  # [N, K/G]
    scale8 = ((hi - lo) / 255.0).clamp_min(_EPS)
    wg = w.float().view(n, k // group_size, group_size)  # [N, K/G, G]
    codes = torch.round((wg - lo.unsqueeze(-1)) / scale8.unsqueeze(-1)).clamp_(0, 255)
    codes = codes.to(torch.uint8).view(n, k)
    if affine == "lsq":
        return codes, *fit_affines_lsq(w, codes, widths, group_size)
    scales = torch.stack([scale8 * 2 ** (8 - b) for b in widths])  # [W, N, K/G]
    mins = torch.stack([lo + scale8 * (2 ** (8 - b) - 1) / 2 for b in widths])
    return codes, scales, mins


AFFINES = ("centre", "lsq")


def source_grid_codes(
    w: torch.Tensor, group_size: int, max_bits: int = 7, tol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Master codes aligned with a source's own b_src-bit grid, where a group lies on one.

    A group of a block-quantized source with an offset (GGUF Q4_1: w = d*q + m, q in 0..15 spanning the
    group) holds at most 2^b_src levels evenly spaced from its min to its max. Min/max stretch over 255 steps
    maps them to codes 17q: exact at 8 and 4 bits, but 17q >> 3 is not linear in q, so not at 5 or 6. The
    codes (q << (8 - b_src)) + 2^(7 - b_src) put q in the top b_src bits and the middle of the bins below:
    every width b >= b_src reads 2^(b - b_src) q + const, exact with its own affine, and every width below
    reads q >> (b_src - b), the same slices as 17q (for b_src = 4).

    A group is aligned at the smallest b_src <= max_bits for which every weight lies within tol (in steps)
    of the grid (hi - lo) / (2^b_src - 1); constant groups are not. Returns codes uint8 [N, K] (min/max
    round-to-nearest codes where no grid fits) and the per-group mask bool [N, K // G] of aligned groups."""
    n, k = w.shape
    rtn = quantize_nested(w, (8,), group_size)[0]  # [N, K] min/max round-to-nearest (checks the group size)
    codes = rtn.view(n, k // group_size, group_size).float()  # [N, K/G, G], replaced where a grid fits
    wg = w.float().view(n, k // group_size, group_size)  # [N, K/G, G]
    lo, hi = group_min_max(w, group_size)  # [N, K/G]
    span = hi - lo
    rel = (wg - lo.unsqueeze(-1)) / torch.where(span > 0, span, torch.ones_like(span)).unsqueeze(-1)  # [N, K/G, G] in 0..1
    found = torch.zeros(n, k // group_size, dtype=torch.bool)
    for b in range(1, max_bits + 1):
        levels = 2**b - 1
        t = rel * levels
        q = torch.round(t)
        fits = ((t - q).abs().amax(-1) <= tol) & (span > 0) & ~found  # [N, K/G]
        codes = torch.where(fits.unsqueeze(-1), q * 2 ** (8 - b) + 2 ** (7 - b), codes)
        found |= fits
    return codes.to(torch.uint8).view(n, k), found


def anchored_nested_codes(w: torch.Tensor, group_size: int, anchor_bits: int = 4) -> torch.Tensor:
    """Master codes whose top `anchor_bits` bits are the independent round-to-nearest codes at that width.

    Min/max RTN over 255 steps puts the b-bit bins (16 8-bit codes each at b = 4) where an 8-bit grid puts them,
    not where a b-bit grid of the group's own would (its min/max over 2^b - 1 steps): for a weight with no
    b-bit structure of its own (the default model's Q8_0 lm_head) the nested w4 then reads worse codes than
    independent RTN. Here the group's own b-bit RTN codes q come first and the bits below refine inside q's
    bin: with n = 2^(8-b) codes per bin, the low bits are n/2 + round(offset / (s_b / n)) for the weight's offset
    from its bin centre, clamped to the bin. The bin centre is a code (not a rounding tie between two), so a
    weight on the b-bit grid gets (q << (8-b)) + n/2, as `source_grid_codes` gives, exact at every width >= b;
    every width >= b reads q and a finer split of its bin; the 8-bit step is (hi - lo) / (16 * 15) at b = 4
    instead of / 255. Returns codes uint8 [N, K]."""
    if not 1 <= anchor_bits <= 8:
        raise ValueError(f"anchor_bits must be in 1..8, got {anchor_bits}")
    n, k = w.shape
    check_group_size(k, group_size)
    lo, hi = group_min_max(w, group_size)  # [N, K/G]
    top = 2**anchor_bits - 1
    per_bin = 2 ** (8 - anchor_bits)  # 8-bit codes per anchor bin
    step = ((hi - lo) / top).clamp_min(_EPS).unsqueeze(-1)  # [N, K/G, 1] anchor step
    wg = w.float().view(n, k // group_size, group_size)  # [N, K/G, G]
    q = torch.round((wg - lo.unsqueeze(-1)) / step).clamp_(0, top)
    offset = (wg - lo.unsqueeze(-1) - q * step) / (step / per_bin)  # [N, K/G, G] in fine steps, within +-per_bin/2
    low = (torch.round(offset) + per_bin // 2).clamp_(0, per_bin - 1)
    return (q * per_bin + low).to(torch.uint8).view(n, k)


def fit_affines_lsq(
    w: torch.Tensor, codes: torch.Tensor, widths: Sequence[int], group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per width and group, the least-squares affine of the nested codes: (scale_b, min_b) minimising
    sum (w - (q_b * scale_b + min_b))^2 over the group, q_b = codes >> (8 - b). Closed form (a line fit
    of w on q_b); never a larger squared error than the centre of the bin, which is one feasible affine.
    A group whose codes at width b are all equal gets scale_b = 0 and min_b = its mean.
    Returns fp32 scales, mins [W, N, K // G]."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)  # [N, K/G, G]
    w_mean = wg.mean(-1, keepdim=True)
    scales, mins = [], []
    for b in widths:
        q = (codes.view(n, k // group_size, group_size) >> (8 - b)).float()  # [N, K/G, G]
        q_mean = q.mean(-1, keepdim=True)
        dq = q - q_mean
        var = dq.pow(2).mean(-1)
        cov = (dq * (wg - w_mean)).mean(-1)
        scale = torch.where(var > 0, cov / var.clamp_min(_EPS), torch.zeros_like(var))
        scales.append(scale)
        mins.append(w_mean.squeeze(-1) - scale * q_mean.squeeze(-1))
    return torch.stack(scales), torch.stack(mins)


def quantize_independent(w: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """Independent asymmetric RTN at `bits` with its own grid; returns the dequantized fp32 [N, K]."""
    n, k = w.shape
    check_group_size(k, group_size)
    levels = 2**bits - 1
    lo, hi = group_min_max(w, group_size)
    scale = ((hi - lo) / levels).clamp_min(_EPS).unsqueeze(-1)  # [N, K/G, 1]
    wg = w.float().view(n, k // group_size, group_size)
    q = torch.round((wg - lo.unsqueeze(-1)) / scale).clamp_(0, levels)
    return (q * scale + lo.unsqueeze(-1)).view(n, k)
