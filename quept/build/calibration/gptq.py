"""Nested GPTQ: master codes chosen column by column with second-order error compensation, every width at once.

GPTQ (Frantar et al.) quantizes a linear's input columns in order and spreads each column's rounding error over
the columns not yet quantized, through the inverse Hessian of the layer's reconstruction loss `||(W - Q) X||^2`
(H = X Xᵀ over the calibration inputs). Here one 8-bit master code serves every width through its top bits,
but each width has its own error, so each width `b` keeps its own compensated target `T_b` (the original
weights plus the compensation of width b's earlier errors) and the code of a weight minimises

    cost(c) = sum_b  lam_b * (T_b - (scale_b * (c >> (8 - b)) + min_b))^2

over a few candidates: the 8-bit nearest code and its neighbours, and for each width the code nearest the 8-bit
target inside that width's nearest bin (so that a low width can take its own rounding decision at a small
cost to the wide ones). Width b's error then updates only T_b. With `lam_b` in absolute weight units the
low widths, whose errors are largest, decide the top bits, and the wide widths correct the bits below within
the bins those leave them. The per-width affines are fixed (fitted before, as GPTQ's static groups).

`nested_gptq_reference` is the plain column loop the blocked `nested_gptq` is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_DAMP = 0.01


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H = hessian [K, K] damped by `damp` x its mean diagonal): fp32 [K, K].

    A column no input ever reached (zero diagonal) gets a unit diagonal, so its weights round on their own."""
    h = hessian.double().clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True).float()


def _choose(
    t: torch.Tensor, s: torch.Tensor, m: torch.Tensor, per_bin: torch.Tensor, top: torch.Tensor, lam: torch.Tensor,
    i8: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column: targets t, scales s, mins m [W, N] -> codes [N] (float) and their dequantized values [W, N]."""
    u = (t - m) / s  # [W, N] position of each width's target in its own steps
    c8 = torch.round(u[i8]).clamp(0, 255)  # [N]
    lo = torch.round(u).clamp(min=0).minimum(top) * per_bin  # [W, N] first 8-bit code of each width's nearest bin
    own = torch.minimum(torch.maximum(c8.unsqueeze(0), lo), lo + per_bin - 1)  # [W, N]
    cand = torch.cat([(c8 + d).clamp(0, 255).unsqueeze(0) for d in (-1, 0, 1)] + [own])  # [C, N]
    q = torch.floor(cand.unsqueeze(0) / per_bin.unsqueeze(-1))  # [W, C, N] nested slices c >> (8 - b)
    deq = q * s.unsqueeze(1) + m.unsqueeze(1)  # [W, C, N]
    cost = (lam.view(-1, 1, 1) * (t.unsqueeze(1) - deq) ** 2).sum(0)  # [C, N]
    best = cost.argmin(0)  # [N]
    code = cand.gather(0, best.unsqueeze(0))[0]
    chosen = deq.gather(1, best.view(1, 1, -1).expand(deq.shape[0], 1, -1))[:, 0]  # [W, N]
    return code, chosen


def _setup(w: torch.Tensor, widths: Sequence[int], importance: dict[int, float] | None):
    widths = tuple(widths)
    per_bin = torch.tensor([2.0 ** (8 - b) for b in widths]).view(-1, 1)  # [W, 1]
    top = torch.tensor([2.0**b - 1 for b in widths]).view(-1, 1)
    lam = torch.tensor([float((importance or {}).get(b, 1.0)) for b in widths])
    targets = w.float().unsqueeze(0).repeat(len(widths), 1, 1)  # [W, N, K]
    return per_bin, top, lam, targets, widths.index(8)


def nested_gptq(
    w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, widths: Sequence[int],
    group_size: int, importance: dict[int, float] | None = None, damp: float = DEFAULT_DAMP, block: int = 128,
) -> torch.Tensor:
    """Master codes uint8 [N, K] for w [N, K], inputs' Hessian [K, K], fixed affines scales, mins [W, N, K/G].

    Lazy batch updates as in GPTQ: inside a block of `block` columns the errors update only the block's
    columns; the rest of the targets are updated once per block with one matmul."""
    n, k = w.shape
    u_fac = inverse_hessian_factor(hessian, damp)  # [K, K]
    per_bin, top, lam, targets, i8 = _setup(w, widths, importance)
    codes = torch.empty(n, k)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        tb = targets[:, :, b0:b1].clone()  # [W, N, B] the block's targets
        errs = torch.zeros_like(tb)
        for jj in range(b1 - b0):
            j = b0 + jj
            g = j // group_size
            code, chosen = _choose(tb[:, :, jj], scales[:, :, g], mins[:, :, g], per_bin, top, lam, i8)
            codes[:, j] = code
            err = (tb[:, :, jj] - chosen) / u_fac[j, j]  # [W, N]
            tb[:, :, jj:] -= err.unsqueeze(-1) * u_fac[j, j:b1]
            errs[:, :, jj] = err
        if b1 < k:
            targets[:, :, b1:] -= torch.matmul(errs, u_fac[b0:b1, b1:])  # [W, N, B] @ [B, K - b1]
    return codes.to(torch.uint8)


def nested_gptq_reference(
    w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, widths: Sequence[int],
    group_size: int, importance: dict[int, float] | None = None, damp: float = DEFAULT_DAMP,
) -> torch.Tensor:
    """`nested_gptq` without lazy batching: every column's error updates all later columns at once."""
    n, k = w.shape
    u_fac = inverse_hessian_factor(hessian, damp)
    per_bin, top, lam, targets, i8 = _setup(w, widths, importance)
    codes = torch.empty(n, k)
    for j in range(k):
        g = j // group_size
        code, chosen = _choose(targets[:, :, j], scales[:, :, g], mins[:, :, g], per_bin, top, lam, i8)
        codes[:, j] = code
        err = (targets[:, :, j] - chosen) / u_fac[j, j]
        targets[:, :, j:] -= err.unsqueeze(-1) * u_fac[j, j:]
    return codes.to(torch.uint8)


def output_error(
    w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor,
) -> float:
    """tr((W - Q) H (W - Q)ᵀ): the summed squared output error over the inputs whose Hessian is H."""
    e = (w.float() - deq.float()).double()
    return float(torch.einsum("nk,kl,nl->", e, hessian.double(), e))
