"""Step 1 of calibration: the nested master-code search (docs/architecture.md §3.1).

The 8-bit master code `c` of a weight serves every stored width `b` through its top `b` bits,
`q_b = c >> (8 - b)`, with a per-width, per-group affine `w ≈ q_b * scale_b + min_b`. Nested
round-to-nearest picks `c` for the 8-bit error alone; here `c` minimises the error summed over all
stored widths,

    cost(c) = sum_b  lam_b * (w - scale_b * (c >> (8 - b)) - min_b)^2 ,

over the 8-bit codes near the 8-bit optimum (exact for the default weights, see `search_codes`). Codes and
affines alternate: codes for fixed affines (search), then affines for fixed codes (weighted least
squares per group, column weights = mean squared input activation, as in AWQ/GPTQ-style
activation-aware fitting). `lam_b` puts every width in units of its own step (`1 / scale_b^2`),
times a per-width importance (the 8-bit width is weighted up so that w8 stays faithful).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quept.build.quantizer import anchored_nested_codes, quantize_nested, source_grid_codes

_EPS = 1e-10
DEFAULT_IMPORTANCE: dict[int, float] = {8: 4.0}  # others 1.0


def fit_affine(
    w: torch.Tensor, q: torch.Tensor, group_size: int, col_weight: torch.Tensor | None = None,
    prev_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares `w ≈ q * s + m` per group. w, q: [N, K]; col_weight: [K]. Returns s, m [N, K/G].

    Degenerate groups (all codes equal) keep `prev_scale` (or 1) and fit the offset only.
    """
    n, k = w.shape
    fit = _GroupFit(w, group_size, col_weight)
    return fit(q.float().view(n, k // group_size, group_size), prev_scale)


class _GroupFit:
    """`fit_affine` for one w and col_weight and any number of code sets: the terms that do not depend on the
    codes (sum h, sum h w) are computed once, and the products with the codes reduce in batched dot products
    (no [N, K] temporaries beyond h * q).

    The normal equations are accumulated in float64: the determinant `sum h * sum h q^2 - (sum h q)^2`
    cancels catastrophically in fp32 when one column's weight dominates its group (the default model's
    layer-11 down_proj has a column with 1.8e6x the median mean-squared activation; in fp32 its w8 fit,
    exact for the Q4_1 source, came out with a relative error of 3e-5 and the search then moved whole groups)."""

    def __init__(self, w: torch.Tensor, group_size: int, col_weight: torch.Tensor | None) -> None:
        n, k = w.shape
        g = k // group_size
        self.wg = w.double().view(n, g, group_size)  # [N, K/G, G]
        self.h = (torch.ones(g, group_size, dtype=torch.float64) if col_weight is None
                  else col_weight.double().view(g, group_size))  # [K/G, G]
        self.sw = self.h.sum(-1)  # [K/G]
        self.sy = (self.h * self.wg).sum(-1)  # [N, K/G]

    def __call__(self, qg: torch.Tensor, prev_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """qg: codes [N, K/G, G] -> fp32 s, m [N, K/G]."""
        sw, sy = self.sw, self.sy
        qg = qg.double()
        hq = self.h * qg  # [N, K/G, G]
        sq = hq.sum(-1)  # [N, K/G]
        sqq = torch.einsum("ngk,ngk->ng", hq, qg)
        sqy = torch.einsum("ngk,ngk->ng", hq, self.wg)
        det = sw * sqq - sq * sq
        ok = det > 1e-12 * (sw * sqq).clamp_min(_EPS)  # fp64: only (near-)constant codes fail
        s = torch.where(ok, (sw * sqy - sq * sy) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
        fallback = torch.ones_like(s) if prev_scale is None else prev_scale.double()
        s = torch.where(ok & (s > 0), s, fallback)
        m = (sy - s * sq) / sw
        return s.float(), m.float()


def search_codes(
    w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, widths: Sequence[int], group_size: int,
    importance: dict[int, float] | None = None, radius: int = 1, rows: int = 256,
) -> torch.Tensor:
    """Master codes uint8 [N, K] minimising the weighted error over all widths for fixed affines [W, N, K/G].

    Candidates are the 8-bit codes within `radius` of the 8-bit optimum: with the 8-bit width weighted
    `importance[8]` (default 4) in step units, moving the 8-bit code by d costs >= 4 d^2 while the other
    five widths can gain at most ~2.25 units each, so the exact optimum lies within |d| <= 2
    (radius 1, the default, is what fits the CPU time budget; it changes the errors by < 1%).
    """
    imp = {**DEFAULT_IMPORTANCE, **(importance or {})}
    n, k = w.shape
    g = k // group_size
    i8 = list(widths).index(8)
    out = torch.empty(n, k, dtype=torch.uint8)
    for r0 in range(0, n, rows):
        wg = w[r0 : r0 + rows].float().view(-1, g, group_size)  # [n, K/G, G]
        s = scales[:, r0 : r0 + rows].float().clamp_min(_EPS).unsqueeze(-1)  # [W, n, K/G, 1]
        u = (wg.unsqueeze(0) - mins[:, r0 : r0 + rows].float().unsqueeze(-1)) / s  # [W, n, K/G, G] position in steps
        c8 = torch.round(u[i8]).clamp_(0, 255)
        best, best_cost = c8, None
        for d in range(-radius, radius + 1):
            c = (c8 + d).clamp_(0, 255)
            cost = torch.zeros_like(c)
            for i, b in enumerate(widths):
                q = torch.floor(c * 2.0 ** (b - 8))  # nested slice c >> (8-b), exact in fp32
                cost += imp.get(b, 1.0) * (u[i] - q) ** 2
            if best_cost is None:
                best, best_cost = c, cost
            else:
                better = cost < best_cost
                best = torch.where(better, c, best)
                best_cost = torch.minimum(cost, best_cost)
        out[r0 : r0 + rows] = best.view(-1, k).to(torch.uint8)
    return out


def nested_codes_float(codes: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """q_b = codes >> (8-b) as fp32, stacked [W, N, K]."""
    c = codes.to(torch.int64)
    return torch.stack([(c >> (8 - b)).float() for b in widths])


def fit_all_affines(
    w: torch.Tensor, codes: torch.Tensor, widths: Sequence[int], group_size: int,
    col_weight: torch.Tensor | None = None, prev_scales: torch.Tensor | None = None,
    plain_widths: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine of every width for fixed codes: scales, mins [W, N, K/G].

    Widths in `plain_widths` are fitted without the column weights (plain least squares)."""
    n, k = codes.shape
    fit = _GroupFit(w, group_size, col_weight)
    plain = fit if col_weight is None or not plain_widths else _GroupFit(w, group_size, None)
    ss, ms = [], []
    for i, b in enumerate(widths):
        q = (codes >> (8 - b)).float().view(n, k // group_size, group_size)  # uint8 shift: no int64 copy
        s, m = (plain if b in plain_widths else fit)(q, None if prev_scales is None else prev_scales[i])
        ss.append(s)
        ms.append(m)
    return torch.stack(ss), torch.stack(ms)


def master_code_search(
    w: torch.Tensor, widths: Sequence[int], group_size: int, col_weight: torch.Tensor | None = None,
    iters: int = 1, importance: dict[int, float] | None = None, plain_widths: Sequence[int] = (),
    align_source_grid: bool = False, anchor_bits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternate affines (weighted LS) and codes (search). Returns codes uint8 [N,K], scales, mins fp32 [W,N,K/G].

    iters=0: nested round-to-nearest codes with least-squares affines (no search). `plain_widths`: see
    `fit_all_affines`. align_source_grid: start groups that lie on a source's b_src-bit grid from codes aligned
    with it (`source_grid_codes`: exact at every width >= b_src; the search never moves an exact code, since
    any move costs w8 a full step and gains nothing at the exact widths). anchor_bits: start from codes whose top
    `anchor_bits` bits are the independent RTN codes at that width (`anchored_nested_codes`)."""
    if align_source_grid and anchor_bits is not None:
        raise ValueError("align_source_grid and anchor_bits choose different starting codes; pass one")
    codes, scales, mins = quantize_nested(w, widths, group_size)  # centre-of-bin start
    if align_source_grid:
        codes = source_grid_codes(w, group_size)[0]  # the same RTN codes where no source grid fits
    elif anchor_bits is not None:
        codes = anchored_nested_codes(w, group_size, anchor_bits)
    scales, mins = fit_all_affines(w, codes, widths, group_size, col_weight, scales, plain_widths)
    for _ in range(iters):
        codes = search_codes(w, scales, mins, widths, group_size, importance)
        scales, mins = fit_all_affines(w, codes, widths, group_size, col_weight, scales, plain_widths)
    return codes, scales, mins


def reconstruction_mse(
    w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, widths: Sequence[int],
    group_size: int, col_weight: torch.Tensor | None = None,
) -> dict[int, float]:
    """Per width, the (column-weighted) mean squared weight error."""
    n, k = w.shape
    q = nested_codes_float(codes, widths).view(len(widths), n, k // group_size, group_size)
    deq = (q * scales.unsqueeze(-1) + mins.unsqueeze(-1)).view(len(widths), n, k)
    h = torch.ones(k) if col_weight is None else col_weight.float()
    err = ((deq - w.float()) ** 2 * h).mean(dim=(1, 2)) / h.mean()
    return {b: float(e) for b, e in zip(widths, err)}
