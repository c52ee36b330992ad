"""Step 2 of calibration: block-wise reconstruction with a multi-width loss (docs/architecture.md §3.2).

A decoder layer at a time: its seven linears become `FakeQuantLinear`s (codes fixed after the
master-code search; trainable per-width affines and cascaded prefix-rank adapters), and Adam
minimises, per step, the sum over width groups ({8,6}, {5,4}, {3}, {2}; one width sampled per
group) of the MSE between the quantized block at that width (fed the MB-ToMe stream) and the
full-precision block (fed the full-precision stream), each group's loss divided by its value at
the start so that every width counts by its relative improvement. Plain fp32 torch; the codes
are constants, so `deq_b = q_b * scale_b + min_b` is differentiable in the affines without a
straight-through estimator.

A step runs the sampled widths as one batch (`multi_width_mse`, `FakeQuantLinear.forward_widths`):
about 3.4x fewer torch ops per step than one forward/backward per group, which matters more than the
flops when the cores are shared (every op of a multi-threaded run waits for its slowest thread).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quept.backends.base import ElasticWeights
from quept.build.quantizer import quantize_independent
from quept.model.args import LINEAR_NAMES, ModelArgs
from quept.model.checkpoint import STORE_DTYPE
from quept.model.layer_ops import apply_rope, rms_norm

from .master_codes import fit_affine, fit_all_affines, master_code_search

log = logging.getLogger(__name__)


class _DequantMatmul(torch.autograd.Function):
    """y[u] = x[u] @ W[u]ᵀ with W[u] = q[u] * s[u] + m[u] per group; gradients for x, s and m (q is constant).

    Plain autograd would get dL/dW as the transposed view bmm's backward returns and reduce it to the
    group affines through broadcasting backward passes over that strided tensor (measured 3x slower than
    the matmul it follows); here dL/dW = gᵀ x comes out contiguous [U, N, K] and is reduced in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # x [U, M, K]; q [U, N, K/G, G]; s, m [U, N, K/G]
        u, n = q.shape[:2]
        w = torch.addcmul(m.unsqueeze(-1), q, s.unsqueeze(-1)).view(u, n, -1)  # [U, N, K]
        ctx.save_for_backward(x, q, w)
        return torch.bmm(x, w.transpose(1, 2))  # [U, M, N]

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor, torch.Tensor]:
        x, q, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None  # [U, M, K]
        gw = torch.bmm(g.transpose(1, 2), x).view_as(q)  # dL/dW [U, N, K/G, G]
        gm = gw.sum(-1)  # [U, N, K/G]
        gs = gw.mul_(q).sum(-1)
        return gx, None, gs, gm


class FakeQuantLinear(nn.Module):
    """Differentiable elastic linear: fixed codes, trainable affines (relative) and adapters."""

    def __init__(
        self, codes: torch.Tensor | None, qf: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
        bias: torch.Tensor | None, widths: Sequence[int], ranks: Sequence[int], group_size: int, seed: int = 0,
    ) -> None:
        super().__init__()
        w_count, n, k = qf.shape
        self.codes = codes  # uint8 [N, K] (None for independent-code ablation)
        self.register_buffer("qf", qf)  # fp32 [W, N, K] nested (or independent) codes per width
        self.register_buffer("s0", scales.float())  # [W, N, K/G]
        self.register_buffer("m0", mins.float())
        # ds is scaled per width by 2^(2-b): a relative scale change moves code q by ds*q steps, so the
        # same Adam step must be 64x smaller at 8 bits than at 2 bits
        self.register_buffer("ds_mult", torch.tensor([2.0 ** (2 - b) for b in widths]).view(-1, 1, 1))
        self.ds = nn.Parameter(torch.zeros_like(self.s0))
        self.dm = nn.Parameter(torch.zeros_like(self.m0))
        r = max(ranks) if ranks else 0
        g = torch.Generator().manual_seed(seed)
        self.lora_a = nn.Parameter(torch.randn(r, k, generator=g) / k**0.5)  # [R, K]
        self.lora_b = nn.Parameter(torch.zeros(n, r))  # [N, R]; zero: the adapter starts as a no-op
        self.bias = None if bias is None else bias.float()
        self.widths, self.ranks, self.group_size = tuple(widths), tuple(ranks), group_size

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.ds * self.ds_mult)

    def mins(self) -> torch.Tensor:
        return self.m0 + self.s0 * self.dm

    def weight(self, i: int) -> torch.Tensor:
        """Dequantized fp32 [N, K] of width index i (differentiable in the affines)."""
        _, n, k = self.qf.shape
        q = self.qf[i].view(n, k // self.group_size, self.group_size)  # [N, K/G, G]
        s = (self.s0[i] * (1 + self.ds[i] * self.ds_mult[i])).unsqueeze(-1)
        m = (self.m0[i] + self.s0[i] * self.dm[i]).unsqueeze(-1)
        return (q * s + m).view(n, k)

    def effective_weight(self, i: int) -> torch.Tensor:
        """deq_b(W) + B[:, :r] A[:r]: the dense weight the elastic linear computes at width index i."""
        w = self.weight(i)
        r = self.ranks[i]
        return w + self.lora_b[:, :r] @ self.lora_a[:r] if r else w

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        y = F.linear(x, self.weight(i), self.bias)
        r = self.ranks[i]
        if r:
            y = y + F.linear(F.linear(x, self.lora_a[:r]), self.lora_b[:, :r])
        return y

    def forward_widths(self, x: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """x [U, M, K], slice u at width index idx[u] -> [U, M, N]: `forward` of every slice in one batched call.

        One bmm per matmul instead of one mm per width (a few large ops instead of many small ones), and the
        weight gradient is reduced straight to the group affines (`_DequantMatmul`). Adapter prefixes of
        different ranks share one product with A[:r_max]; the columns beyond a slice's own rank are multiplied
        by 0 before B, so each slice sees exactly its prefix (and those rows/columns get no gradient)."""
        w_count, n, k = self.qf.shape
        ix = torch.tensor(list(idx))
        q = self.qf.index_select(0, ix).view(len(ix), n, k // self.group_size, self.group_size)  # [U, N, K/G, G]
        s0 = self.s0.index_select(0, ix)  # [U, N, K/G]
        s = s0 * (1 + self.ds.index_select(0, ix) * self.ds_mult.index_select(0, ix))
        m = self.m0.index_select(0, ix) + s0 * self.dm.index_select(0, ix)
        y = _DequantMatmul.apply(x, q, s, m)  # [U, M, N]
        if self.bias is not None:
            y = y + self.bias
        ranks = [self.ranks[i] for i in idx]
        r = max(ranks)
        if r:
            mask = (torch.arange(r) < torch.tensor(ranks).unsqueeze(1)).to(x.dtype).unsqueeze(1)  # [U, 1, r]
            u = torch.matmul(x, self.lora_a[:r].t()) * mask  # [U, M, r]
            y = y + torch.matmul(u, self.lora_b[:, :r].t())
        return y

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """Snap the trained parameters to what the checkpoint stores (fp16), so later blocks see that."""
        s = self.scales().to(STORE_DTYPE).float()
        m = self.mins().to(STORE_DTYPE).float()
        self.s0.copy_(s)
        self.m0.copy_(m)
        self.ds.zero_()
        self.dm.zero_()
        self.lora_a.copy_(self.lora_a.to(STORE_DTYPE).float())
        self.lora_b.copy_(self.lora_b.to(STORE_DTYPE).float())

    def to_elastic(self) -> ElasticWeights:
        if self.codes is None:
            raise ValueError("independent-code ablation layers cannot be stored in the nested format")
        return ElasticWeights(
            codes=self.codes, scales=self.scales().detach().clone(), mins=self.mins().detach().clone(),
            lora_a=self.lora_a.detach().clone(), lora_b=self.lora_b.detach().clone(),
            bias=self.bias, widths=self.widths, ranks=self.ranks, group_size=self.group_size,
        )


def make_fake_quant(
    w: torch.Tensor, bias: torch.Tensor | None, widths: Sequence[int], ranks: Sequence[int], group_size: int,
    col_weight: torch.Tensor | None = None, codes_mode: str = "nested", importance: dict[int, float] | None = None,
    seed: int = 0, search: bool = True, plain_widths: Sequence[int] = (), align_source_grid: bool = False,
    anchor_bits: int | None = None,
) -> FakeQuantLinear:
    """Master-code search (nested; `search=False`: nested RTN codes) or per-width RTN codes (independent
    ablation), LS affines (`plain_widths` without column weights), fresh adapters."""
    n, k = w.shape
    if codes_mode == "nested":
        codes, scales, mins = master_code_search(w, widths, group_size, col_weight, iters=int(search),
                                                 importance=importance, plain_widths=plain_widths,
                                                 align_source_grid=align_source_grid, anchor_bits=anchor_bits)
        c = codes.to(torch.int64)
        qf = torch.stack([(c >> (8 - b)).float() for b in widths])  # [W, N, K]
        return FakeQuantLinear(codes, qf, scales, mins, bias, widths, ranks, group_size, seed)
    if codes_mode != "independent":
        raise ValueError(f"codes must be 'nested' or 'independent', got {codes_mode!r}")
    qs, ss, ms = [], [], []
    for b in widths:
        deq = quantize_independent(w, b, group_size)  # RTN on its own min-max grid
        wg = w.float().view(n, k // group_size, group_size)
        lo = wg.amin(-1)
        step = ((wg.amax(-1) - lo) / (2**b - 1)).clamp_min(1e-8)
        q = torch.round((deq.view_as(wg) - lo.unsqueeze(-1)) / step.unsqueeze(-1)).view(n, k)
        s, m = fit_affine(w, q, group_size, col_weight, step)
        qs.append(q)
        ss.append(s)
        ms.append(m)
    return FakeQuantLinear(None, torch.stack(qs), torch.stack(ss), torch.stack(ms), bias, widths, ranks, group_size, seed)


def rope_tables(args: ModelArgs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from quept.model.layer_ops import rope_inv_freq

    freqs = torch.arange(seq_len).float().unsqueeze(1) * rope_inv_freq(args)  # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [L, 1, D]
    return emb.cos(), emb.sin()


def block_forward(
    h: torch.Tensor, lin: Callable[[int, torch.Tensor], torch.Tensor], norms: tuple[torch.Tensor, torch.Tensor],
    args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """One decoder layer on a batch h [S, L, D] (every sequence from position 0, causal). `lin(j, x)`: linear j."""
    s, l, _ = h.shape
    attn_norm, mlp_norm = norms
    x = rms_norm(h, attn_norm, args.rms_norm_eps)
    q = apply_rope(lin(0, x).view(s, l, args.n_heads, args.head_dim), cos, sin)  # [S, L, Hq, Dh]
    k = apply_rope(lin(1, x).view(s, l, args.n_kv_heads, args.head_dim), cos, sin)  # [S, L, Hkv, Dh]
    v = lin(2, x).view(s, l, args.n_kv_heads, args.head_dim)
    rep = args.n_heads // args.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # [S, L, Hq, Dh]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    h = h + lin(3, o.transpose(1, 2).reshape(s, l, args.n_heads * args.head_dim))
    x = rms_norm(h, mlp_norm, args.rms_norm_eps)
    return h + lin(6, F.silu(lin(4, x)) * lin(5, x))


def dense_lin(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda j, x: F.linear(x, weights[j], biases[j])


def quant_lin(layers: Sequence[FakeQuantLinear], width_index: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda j, x: layers[j](x, width_index)


def stacked_quant_lin(
    layers: Sequence[FakeQuantLinear], idx: Sequence[int]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Linears for a batch [U*S, L, K] whose u-th slice of S sequences runs at width index idx[u]."""
    u = len(idx)

    def lin(j: int, x: torch.Tensor) -> torch.Tensor:
        y = layers[j].forward_widths(x.reshape(u, -1, x.shape[-1]), idx)  # [U, S*L, N]
        return y.view(*x.shape[:-1], y.shape[-1])  # [U*S, L, N]
    return lin


def input_col_weight(x: torch.Tensor) -> torch.Tensor:
    """Mean squared activation per input column of x [..., K] (activation-aware fitting weights)."""
    return x.reshape(-1, x.shape[-1]).pow(2).mean(0) + 1e-8


def block_col_weights(
    h: torch.Tensor, dense_w: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    norms: tuple[torch.Tensor, torch.Tensor], args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor,
) -> list[torch.Tensor]:
    """Column weights of the seven linears' inputs, from one full-precision pass over h [S, L, D]."""
    seen: dict[int, torch.Tensor] = {}

    def lin(j: int, x: torch.Tensor) -> torch.Tensor:
        seen.setdefault(j, input_col_weight(x))
        return F.linear(x, dense_w[j], biases[j])

    with torch.no_grad():
        block_forward(h, lin, norms, args, cos, sin)
    return [seen[j] for j in range(len(LINEAR_NAMES))]


def multi_width_mse(
    layers: Sequence[FakeQuantLinear], xb: torch.Tensor, yb: torch.Tensor, wi: Sequence[int],
    norms: tuple[torch.Tensor, torch.Tensor], args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor,
) -> torch.Tensor:
    """MSE of the quantized block at each width index wi[u] against yb: [U], differentiable.

    The same values as one `block_forward(xb, quant_lin(layers, wi[u]), ...)` per width, computed as one
    batched forward of xb repeated U times [U*B, L, D] (a few large ops instead of U times as many small
    ones; one backward through the sum instead of U)."""
    u = len(wi)
    out = block_forward(xb.repeat(u, 1, 1), stacked_quant_lin(layers, wi), norms, args, cos, sin)  # [U*B, L, D]
    return (out.view(u, *xb.shape) - yb).pow(2).mean(dim=(1, 2, 3))


def train_block(
    layers: list[FakeQuantLinear], x_q: torch.Tensor, y_fp: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor],
    args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor, widths: Sequence[int],
    groups: Sequence[Sequence[int]], epochs: int, batch: int, lr_affine: float, lr_lora: float,
    rng: random.Random, on_step: Callable[[int, float], None] | None = None, x_ref: torch.Tensor | None = None,
) -> list[float]:
    """Adam over the block's affines and adapters; returns the mean normalised loss per epoch.

    x_ref: the full-precision stream's inputs of the block (y_fp's inputs), on which a width without adapters
    chooses between its trained and least-squares affines (`keep_better_unadapted_affines`); default x_q."""
    with torch.enable_grad():  # load_model() turns autograd off process-wide
        return _train_block(layers, x_q, y_fp, norms, args, cos, sin, widths, groups, epochs, batch,
                            lr_affine, lr_lora, rng, on_step, x_ref)


def _train_block(
    layers: list[FakeQuantLinear], x_q: torch.Tensor, y_fp: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor],
    args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor, widths: Sequence[int],
    groups: Sequence[Sequence[int]], epochs: int, batch: int, lr_affine: float, lr_lora: float,
    rng: random.Random, on_step: Callable[[int, float], None] | None = None, x_ref: torch.Tensor | None = None,
) -> list[float]:
    affine = [p for m in layers for p in (m.ds, m.dm)]
    lora = [p for m in layers for p in (m.lora_a, m.lora_b) if p.numel()]
    opt = torch.optim.Adam([{"params": affine, "lr": lr_affine}, {"params": lora, "lr": lr_lora}], fused=True)
    groups = [[b for b in g if b in widths] for g in groups]
    groups = [g for g in groups if g]
    base: dict[int, float] = {}  # initial loss per width (normalisation)
    history = []
    n = x_q.shape[0]
    for epoch in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        total, steps = 0.0, 0
        for start in range(0, n, batch):
            idx = torch.tensor(order[start : start + batch])
            xb, yb = x_q[idx], y_fp[idx]  # [B, L, D]
            opt.zero_grad(set_to_none=True)
            bits = [rng.choice(g) for g in groups]  # one width per group
            u = len(bits)
            losses = multi_width_mse(layers, xb, yb, [list(widths).index(b) for b in bits], norms, args, cos, sin)
            values = losses.detach().tolist()
            for b, v in zip(bits, values):
                base.setdefault(b, max(v, 1e-12))
            scale = torch.tensor([1.0 / (base[b] * u) for b in bits])
            (losses * scale).sum().backward()
            step_loss = sum(v / (base[b] * u) for b, v in zip(bits, values))
            opt.step()
            total, steps = total + step_loss, steps + 1
            if on_step is not None:
                on_step(epoch, step_loss)
        history.append(total / max(steps, 1))
    keep_better_unadapted_affines(layers, x_q if x_ref is None else x_ref, y_fp, widths, norms, args, cos, sin)
    for m in layers:
        m.round_to_storage()
    return history


@torch.no_grad()
def keep_better_unadapted_affines(
    layers: Sequence[FakeQuantLinear], x_q: torch.Tensor, y_fp: torch.Tensor, widths: Sequence[int],
    norms: tuple[torch.Tensor, torch.Tensor], args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor,
) -> list[int]:
    """A width without adapters keeps its least-squares affines (ds = dm = 0) where training made the
    block's output at that width worse; returns the widths restored.

    Training normalises each width's loss by its first value: where the least-squares fit is already
    exact (w8 on the groups of a Q4_1 source, loss ~1e-12) that turns rounding noise into unit-size
    gradients, and Adam walks the affines off the exact fit (block error 1e-12 -> 1e-6).

    Pass the full-precision stream as x (`train_block`'s x_ref): that is what a w8 model's block sees. On the
    MB-ToMe stream (low-width outputs mixed in) trained affines that correct the mixed-in error look better,
    and were kept in several blocks of the default model, off the exact fit of its Q4_1 weights."""
    restored = []
    for i, b in enumerate(widths):
        if any(m.ranks[i] for m in layers):
            continue
        trained = float(multi_width_mse(layers, x_q, y_fp, [i], norms, args, cos, sin)[0])
        saved = [(m.ds[i].clone(), m.dm[i].clone()) for m in layers]
        for m in layers:
            m.ds[i].zero_()
            m.dm[i].zero_()
        if float(multi_width_mse(layers, x_q, y_fp, [i], norms, args, cos, sin)[0]) <= trained:
            restored.append(b)
            continue
        for m, (ds, dm) in zip(layers, saved):
            m.ds[i].copy_(ds)
            m.dm[i].copy_(dm)
    return restored


@torch.no_grad()
def quant_block_output(
    layers: Sequence[FakeQuantLinear], x: torch.Tensor, width_index: int, norms: tuple[torch.Tensor, torch.Tensor],
    args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor, chunk: int = 4,
) -> torch.Tensor:
    """Block output at one width for x [S, L, D], in chunks of sequences (weights dequantized once)."""
    ws = [m.effective_weight(width_index) for m in layers]
    bs = [m.bias for m in layers]
    return torch.cat([block_forward(x[i : i + chunk], dense_lin(ws, bs), norms, args, cos, sin)
                      for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def dense_block_output(
    dense_w: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], x: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor], args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor, chunk: int = 4,
) -> torch.Tensor:
    return torch.cat([block_forward(x[i : i + chunk], dense_lin(dense_w, biases), norms, args, cos, sin)
                      for i in range(0, x.shape[0], chunk)])


__all__ = ["FakeQuantLinear", "make_fake_quant", "block_forward", "train_block", "multi_width_mse",
           "quant_block_output", "dense_block_output", "block_col_weights", "rope_tables", "fit_all_affines"]
