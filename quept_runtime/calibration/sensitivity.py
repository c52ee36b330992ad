"""Step 4 of calibration: per-linear, per-width KL sensitivity (DESIGN §3.4).

`kl[j][i]` = mean over tokens of KL(p_fp ‖ p_q) over the whole vocabulary when only linear `j`
runs at width `widths[i]` (its dequantized weight plus its adapter prefix) and every other linear
stays full precision. The full-precision hidden state entering each layer is computed once; each
linear then reruns only its own layer and the layers after it, with all widths batched together.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kernels.reference import dequantize
from quept_runtime.backends.base import ElasticWeights
from quept_runtime.model import LINEAR_NAMES, ModelArgs, linear_names, rms_norm

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


@torch.no_grad()
def kl_sensitivity(
    args: ModelArgs, state: dict[str, torch.Tensor], elastic: dict[str, ElasticWeights], tokens: torch.Tensor,
    widths: Sequence[int], progress: bool = True, on_linear: Callable[[str], None] | None = None,
) -> list[list[float]]:
    """KL table [n_linears][n_widths] in plan order for one token sequence tokens [T]."""
    names = linear_names(args.n_layers)
    t = tokens.shape[0]
    cos, sin = rope_tables(args, t)
    weights = {n: state[f"{n}.weight"].float() for n in names}
    biases = {n: state.get(f"{n}.bias") for n in names}
    norms = [(state[f"model.layers.{i}.input_layernorm.weight"].float(),
              state[f"model.layers.{i}.post_attention_layernorm.weight"].float()) for i in range(args.n_layers)]
    final_norm = state["model.norm.weight"].float()

    def layer_lin(i: int, override: dict[int, torch.Tensor] | None = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def lin(j: int, x: torch.Tensor) -> torch.Tensor:
            n = f"model.layers.{i}.{LINEAR_NAMES[j]}"
            if override and j in override:  # x [B, T, K], stacked weights [B, N, K]
                y = torch.einsum("btk,bnk->btn", x, override[j])
                return y if biases[n] is None else y + biases[n]
            return F.linear(x, weights[n], biases[n])
        return lin

    h = state["model.embed_tokens.weight"].index_select(0, tokens).float().unsqueeze(0)  # [1, T, D]
    inputs = []
    for i in range(args.n_layers):
        inputs.append(h)
        h = block_forward(h, layer_lin(i), norms[i], args, cos, sin)
    h_final = rms_norm(h, final_norm, args.rms_norm_eps)  # [1, T, D]
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
