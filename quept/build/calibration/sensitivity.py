"""Step 4 of calibration: per-linear, per-width KL sensitivity (docs/architecture.md §3.4).

`kl[j][i]` = mean over tokens of KL(p_fp ‖ p_q) over the whole vocabulary when only linear `j`
runs at width `widths[i]` (its dequantized weight plus its adapter prefix) and every other linear
stays full precision. The full-precision hidden state entering each layer is computed once.

`kl_sensitivity` (used by the pipeline) runs the seven linears of a layer times every width as one
batch of 7*W variants through that layer and the layers after it (the same flops as one linear at a
time, in 7x fewer and larger ops), and takes the KL from the change of the logits,
`delta = (h_q - h_fp) W_lmᵀ`: `KL_t = log E_p[exp(delta - E_p delta)]`, with `E_p delta` from the
precomputed `p_fp W_lm` and `log1p(E_p[expm1(.)])` (`_kl_rows`), so no log-softmax of the
quantized logits is formed and the small KLs of the high widths do not drown in the rounding of
two log-probabilities of size ~10. `kl_sensitivity_plain` is the one-linear-at-a-time reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quept.backends.base import ElasticWeights
from quept.kernels.reference import dequantize
from quept.model.args import LINEAR_NAMES, ModelArgs, linear_names
from quept.model.layer_ops import rms_norm

from .blockwise import block_forward, rope_tables

log = logging.getLogger(__name__)


def effective_weight(w: ElasticWeights, bits: int) -> torch.Tensor:
    """fp32 [N, K] = deq_b(W) + B[:, :r_b] A[:r_b] (what the elastic linear computes at width b)."""
    i = w.widths.index(bits)
    deq = dequantize(w.codes, w.scales[i], w.mins[i], bits, w.group_size)
    r = w.ranks[i]
    return deq + w.lora_b[:, :r].float() @ w.lora_a[:r].float() if r else deq


def _kl(logp_fp: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """logp_fp [T, V]; logits_q [B, T, V] -> mean KL(p_fp ‖ p_q) per batch element [B]."""
    logp_q = F.log_softmax(logits_q.float(), dim=-1)
    return (logp_fp.exp() * (logp_fp - logp_q)).sum(-1).mean(-1)


def _kl_rows(p_fp: torch.Tensor, delta: torch.Tensor, mean_delta: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ softmax(logits_p + delta)) per row: delta [..., T, V] (overwritten), p_fp [T, V] -> [..., T].

    mean_delta [..., T] = E_p[delta] if known. KL = log sum_v p_v exp(delta_v) - E_p[delta]
    = log1p(sum_v p_v expm1(delta_v - E_p delta)) (p sums to 1): exact in real arithmetic, and the small KLs of
    high widths keep their digits (no difference of two log-probabilities of size ~10). Rows where the exponent
    overflows take the max-shifted form."""
    if mean_delta is None:
        mean_delta = (delta * p_fp).sum(-1)
    d = delta.sub_(mean_delta.unsqueeze(-1))  # [..., T, V] delta - E_p delta
    kl = torch.log1p((torch.expm1(d) * p_fp).sum(-1))  # [..., T]
    bad = ~torch.isfinite(kl)
    if bool(bad.any()):  # a logit rose by > ~88 nats: log sum p exp(d) = mx + log sum p exp(d - mx)
        db = d[bad]  # [n, V]
        mx = db.amax(-1, keepdim=True)
        kl[bad] = mx.squeeze(-1) + torch.log((p_fp.expand_as(d)[bad] * torch.exp(db - mx)).sum(-1))
    return kl


def _fp_tensors(args: ModelArgs, state: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor | None], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The full-precision weights and biases of `names`, each layer's two norms and the final norm."""
    weights = {n: state[f"{n}.weight"].float() for n in names}
    biases = {n: state.get(f"{n}.bias") for n in names}
    norms = [(state[f"model.layers.{i}.input_layernorm.weight"].float(),
              state[f"model.layers.{i}.post_attention_layernorm.weight"].float()) for i in range(args.n_layers)]
    return weights, biases, norms, state["model.norm.weight"].float()


def _fp_forward(args: ModelArgs, state: dict[str, torch.Tensor], tokens: torch.Tensor,
                lin: Callable[[int], Callable[[int, torch.Tensor], torch.Tensor]],
                norms: Sequence[tuple[torch.Tensor, torch.Tensor]], final_norm: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Full-precision forward of tokens [T]: every block's input [1, T, D] and the final-normed hidden [1, T, D]."""
    h = state["model.embed_tokens.weight"].index_select(0, tokens).float().unsqueeze(0)  # [1, T, D]
    inputs = []
    for i in range(args.n_layers):
        inputs.append(h)
        h = block_forward(h, lin(i), norms[i], args, cos, sin)
    return inputs, rms_norm(h, final_norm, args.rms_norm_eps)


@torch.no_grad()
def kl_sensitivity_plain(
    args: ModelArgs, state: dict[str, torch.Tensor], elastic: dict[str, ElasticWeights], tokens: torch.Tensor,
    widths: Sequence[int], progress: bool = True, on_linear: Callable[[str], None] | None = None,
) -> list[list[float]]:
    """Reference for `kl_sensitivity`: one linear at a time, KL from two log-softmaxes. Same table."""
    names = linear_names(args.n_layers)
    t = tokens.shape[0]
    cos, sin = rope_tables(args, t)
    weights, biases, norms, final_norm = _fp_tensors(args, state, names)

    def layer_lin(i: int, override: dict[int, torch.Tensor] | None = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def lin(j: int, x: torch.Tensor) -> torch.Tensor:
            n = f"model.layers.{i}.{LINEAR_NAMES[j]}"
            if override and j in override:  # x [B, T, K], stacked weights [B, N, K]
                y = torch.einsum("btk,bnk->btn", x, override[j])
                return y if biases[n] is None else y + biases[n]
            return F.linear(x, weights[n], biases[n])
        return lin

    inputs, h_final = _fp_forward(args, state, tokens, layer_lin, norms, final_norm, cos, sin)  # h_final [1, T, D]
    logp_fp = F.log_softmax(F.linear(h_final[0], weights["lm_head"]), dim=-1)  # [T, V]

    table: list[list[float]] = []
    for j_name in tqdm(names, desc="sensitivity", unit="linear", disable=not progress):
        stacked = torch.stack([effective_weight(elastic[j_name], b) for b in widths])  # [W, N, K]
        if j_name == "lm_head":
            logits = torch.einsum("td,bvd->btv", h_final[0], stacked)
            table.append([float(v) for v in _kl(logp_fp, logits)])
            continue
        layer = int(j_name.split(".")[2])
        j = LINEAR_NAMES.index(j_name.split(".", 3)[3])
        x = inputs[layer].expand(len(widths), -1, -1)  # [W, T, D]
        x = block_forward(x, layer_lin(layer, {j: stacked}), norms[layer], args, cos, sin)
        for i in range(layer + 1, args.n_layers):
            x = block_forward(x, layer_lin(i), norms[i], args, cos, sin)
        logits = F.linear(rms_norm(x, final_norm, args.rms_norm_eps), weights["lm_head"])  # [W, T, V]
        table.append([float(v) for v in _kl(logp_fp, logits)])
        if on_linear is not None:
            on_linear(j_name)
    return table


@torch.no_grad()
def kl_sensitivity(
    args: ModelArgs, state: dict[str, torch.Tensor], elastic: dict[str, ElasticWeights], tokens: torch.Tensor,
    widths: Sequence[int], progress: bool = True, on_linear: Callable[[str], None] | None = None,
    logit_rows: int = 576,
) -> list[list[float]]:
    """KL table [n_linears][n_widths] in plan order for one token sequence tokens [T].

    Per layer, the 7 linears x W widths run as one batch of variants (variant j*W + i: linear j at width i,
    the rest full precision) through the layer and the layers after it; the vocabulary-sized logit change is
    formed `logit_rows` token rows at a time (memory). Matches `kl_sensitivity_plain` (up to rounding)."""
    names = linear_names(args.n_layers)
    n_w, n_lin = len(widths), len(LINEAR_NAMES)
    t = tokens.shape[0]
    cos, sin = rope_tables(args, t)
    weights, biases, norms, final_norm = _fp_tensors(args, state, names)
    w_lm = weights["lm_head"]  # [V, D]

    def dense_lin(i: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def lin(j: int, x: torch.Tensor) -> torch.Tensor:
            n = f"model.layers.{i}.{LINEAR_NAMES[j]}"
            return F.linear(x, weights[n], biases[n])
        return lin

    def variant_lin(i: int, stacked: list[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """x [7W, T, K]: rows j*W .. j*W+W-1 run linear j at the W widths (stacked[j] [W, N, K]); others fp."""
        def lin(j: int, x: torch.Tensor) -> torch.Tensor:
            n = f"model.layers.{i}.{LINEAR_NAMES[j]}"
            y = F.linear(x, weights[n], biases[n])  # [7W, T, N]
            rows = slice(j * n_w, (j + 1) * n_w)
            yq = torch.bmm(x[rows], stacked[j].transpose(1, 2))  # [W, T, N]
            y[rows] = yq if biases[n] is None else yq + biases[n]
            return y
        return lin

    inputs, h_final = _fp_forward(args, state, tokens, dense_lin, norms, final_norm, cos, sin)
    h_final = h_final[0]  # [T, D]
    p_fp = F.softmax(F.linear(h_final, w_lm), dim=-1)  # [T, V]
    e_fp = p_fp @ w_lm  # [T, D]: E_p[delta_t] = (h_q,t - h_fp,t) . e_fp,t

    def kl_of_hidden(hq: torch.Tensor) -> list[float]:
        """hq [B, T, D] final-normed hidden states -> mean KL per variant [B], about `logit_rows` rows at a time."""
        dh = hq - h_final  # [B, T, D]
        step = max(1, logit_rows // t)
        out = []
        for b0 in range(0, dh.shape[0], step):
            delta = F.linear(dh[b0 : b0 + step], w_lm)  # [b, T, V] change of the logits
            mean = (dh[b0 : b0 + step] * e_fp).sum(-1)  # [b, T] E_p[delta]
            out += [float(v) for v in _kl_rows(p_fp, delta, mean).mean(-1)]
        return out

    table: list[list[float]] = []
    bar = tqdm(total=len(names), desc="sensitivity", unit="linear", disable=not progress)
    for i in range(args.n_layers):
        layer_names = names[i * n_lin : (i + 1) * n_lin]
        stacked = [torch.stack([effective_weight(elastic[n], b) for b in widths]) for n in layer_names]  # 7 x [W, N, K]
        x = inputs[i].expand(n_lin * n_w, -1, -1)  # [7W, T, D]
        x = block_forward(x, variant_lin(i, stacked), norms[i], args, cos, sin)
        del stacked
        for k in range(i + 1, args.n_layers):
            x = block_forward(x, dense_lin(k), norms[k], args, cos, sin)
        kls = kl_of_hidden(rms_norm(x, final_norm, args.rms_norm_eps))  # [7W]
        for j, n in enumerate(layer_names):
            table.append(kls[j * n_w : (j + 1) * n_w])
            if on_linear is not None:
                on_linear(n)
        bar.update(n_lin)
    # lm_head: delta = h_fp (W_b - W_fp)ᵀ, one width at a time
    row = []
    for b in widths:
        dw = effective_weight(elastic["lm_head"], b) - w_lm  # [V, D]
        delta = F.linear(h_final, dw)  # [T, V]
        row.append(float(_kl_rows(p_fp, delta).mean()))
    table.append(row)
    if on_linear is not None:
        on_linear("lm_head")
    bar.update(1)
    bar.close()
    return table
