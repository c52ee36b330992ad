"""Our own LLaMA-family forward (gpt-fast style) over elastic linears and a paged KV cache.

One forward runs a flat batch of token rows from several sequences (prefill chunks and decode
steps together). Each row carries its own precision: `StepWidths` gives every linear either one
width for all rows or the rows grouped by width (`quept.precision.segments`), so uniform and
per-layer mixed plans share a batch. Callers go through `quept.model.runner.ModelRunner`, which
builds the layout and the widths once per step. Transformers is used only for configs and as the
reference in tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quept.backends.base import ElasticBackend, ElasticWeights
from quept.errors import SourceModelError
from quept.model.args import ModelArgs, linear_names
from quept.model.kv_cache import KVCache
from quept.model.layer_ops import TorchLayerOps, rope_inv_freq
from quept.model.layout import BatchLayout
from quept.precision.segments import StepWidths, WidthSegments


class ElasticLinear(nn.Module):
    """A linear whose weights are nested codes + per-width affines + cascaded adapters."""

    def __init__(self, weights: ElasticWeights, backend: ElasticBackend, plan_index: int) -> None:
        super().__init__()
        self.weights = weights
        self.backend = backend
        self.prepared = backend.prepare(weights)
        self.plan_index = plan_index  # position of this linear in a plan's widths

    def forward(self, x: torch.Tensor, widths: int | WidthSegments) -> torch.Tensor:
        return self.backend.forward(self.prepared, x, widths)


class DenseLinear(nn.Module):
    """A plain fp32 linear with the ElasticLinear call signature (unquantized and RTN baselines)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan_index: int) -> None:
        super().__init__()
        self.weight = weight.float()
        self.bias = None if bias is None else bias.float()
        self.plan_index = plan_index

    def forward(self, x: torch.Tensor, widths: int | WidthSegments) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ElasticModel(nn.Module):
    def __init__(self, args: ModelArgs, dense: dict[str, torch.Tensor], linears: dict[str, nn.Module],
                 ops: Any = None) -> None:
        super().__init__()
        self.args = args
        self.linear_names = linear_names(args.n_layers)
        self.embed = dense["model.embed_tokens.weight"]  # fp16/fp32 [V, D]; rows read per token
        self.norms = [
            (dense[f"model.layers.{i}.input_layernorm.weight"].float(),
             dense[f"model.layers.{i}.post_attention_layernorm.weight"].float())
            for i in range(args.n_layers)
        ]
        self.final_norm = dense["model.norm.weight"].float()
        self.linears = [linears[n] for n in self.linear_names]
        self.inv_freq = rope_inv_freq(args).to(self.embed.device)
        self.ops = ops or TorchLayerOps()  # a backend may bring fused ones (the native CPU kernels do)

    @property
    def ops(self) -> Any:
        """The elementwise layer ops (and, for ops that have it, the one-call decoder layer)."""
        return self._ops

    @ops.setter
    def ops(self, ops: Any) -> None:
        # Layer ops that run a whole decoder layer in one call (the native ones) get each layer's 7
        # linears in their form; None: the op-by-op loop of `forward` (the reference), also when set to None.
        self._ops = ops
        layer_linears = getattr(ops, "layer_linears", None)
        self.fused_layers = layer_linears(self.linears[: 7 * self.args.n_layers]) if layer_linears else None

    @property
    def device(self) -> torch.device:
        """Where the weights, the KV cache and every tensor of a forward live."""
        return self.embed.device

    @property
    def n_linears(self) -> int:
        return len(self.linear_names)

    def new_kv_cache(self, budget_bytes: int, block_size: int = 16) -> KVCache:
        """As many blocks as `budget_bytes` holds (K and V together), at least one."""
        a = self.args
        return KVCache.with_budget(a.n_layers, a.n_kv_heads, a.head_dim, budget_bytes, block_size, self.ops.kv_dtype,
                                   self.device)

    def new_kv_cache_blocks(self, num_blocks: int, block_size: int = 16) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, num_blocks, block_size, self.ops.kv_dtype, self.device)

    def _attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layout: BatchLayout
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the new rows; returns [T, Hq * D]."""
        a = self.args
        k_flat = cache.k_cache[layer].view(-1, a.n_kv_heads, a.head_dim)  # [slots, Hkv, D]
        v_flat = cache.v_cache[layer].view(-1, a.n_kv_heads, a.head_dim)
        self.ops.write_kv(k_flat, v_flat, layout.write_slots, k, v)
        if self.ops.attention_in_place:  # every row, decoding or prefilling, in one call
            return self.ops.paged_attention(q, k_flat, v_flat, *layout.row_spans).view(q.shape[0], -1)
        out = q.new_empty(q.shape[0], a.n_heads, a.head_dim)
        seqs = layout.seqs
        g = layout.decode
        if g is not None:  # all decode rows in one call instead of one call per sequence
            n = g.rows.numel()
            qd = q.index_select(0, g.rows)  # [B, Hq, D]
            if n == 1:
                od = self.ops.paged_attention(qd, k_flat, v_flat, g.slots, g.offsets[:-1], g.offsets[1:])
            else:
                # the G = Hq / Hkv query heads of a KV head act as G query positions: no K/V expansion for GQA
                p = g.padded
                group = a.n_heads // a.n_kv_heads
                qd = qd.view(n, a.n_kv_heads, group, a.head_dim)  # [B, Hkv, G, D]
                # whole blocks are gathered (contiguous copies), then viewed as [B, Hkv, Lmax, D]
                kd = cache.k_cache[layer].index_select(0, p.blocks).view(n, p.max_len, a.n_kv_heads, a.head_dim)
                vd = cache.v_cache[layer].index_select(0, p.blocks).view(n, p.max_len, a.n_kv_heads, a.head_dim)
                kd, vd = kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype)
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=p.mask)  # [B, Hkv, G, D]
            out.index_copy_(0, g.rows, od.reshape(n, a.n_heads, a.head_dim))  # [B, Hq, D]
            seqs = [s for s in seqs if s.length != 1]
        for s in seqs:
            ks = k_flat.index_select(0, s.ctx_slots).transpose(0, 1).to(q.dtype)  # [Hkv, Lk, D]
            vs = v_flat.index_select(0, s.ctx_slots).transpose(0, 1).to(q.dtype)
            qs = q[s.start : s.start + s.length].transpose(0, 1)  # [Hq, Lq, D]
            q_pos = torch.arange(s.length, device=q.device).unsqueeze(1) + s.context_before  # [Lq, 1]
            mask = torch.arange(s.ctx_slots.numel(), device=q.device).unsqueeze(0) <= q_pos  # [Lq, Lk] causal
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)
            out[s.start : s.start + s.length] = o.transpose(0, 1)
        return out.view(q.shape[0], a.n_heads * a.head_dim)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        layout: BatchLayout,
        widths: StepWidths,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions: [T]. Returns logits [L, V] for `logits_rows` [L] (every row if None);
        `widths.head` describes those L rows."""
        a = self.args
        bits = widths.linears
        ops, eps = self.ops, a.rms_norm_eps
        h = self.embed.index_select(0, tokens).float()  # [T, D] residual stream (a fresh tensor: ops may update it)
        freqs = positions.float().unsqueeze(1) * self.inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, D]
        cos, sin = emb.cos(), emb.sin()
        t = tokens.shape[0]
        mlp_out = None  # the previous layer's MLP output, added to h by the next norm
        fused = self.fused_layers
        spans = layout.row_spans if fused is not None else None
        for i in range(a.n_layers):
            b = bits[7 * i : 7 * i + 7]
            attn_norm, mlp_norm = self.norms[i]
            if fused is not None:  # the same ops as below in one call; h updated in place
                k_flat = cache.k_cache[i].view(-1, a.n_kv_heads, a.head_dim)  # [slots, Hkv, D]
                v_flat = cache.v_cache[i].view(-1, a.n_kv_heads, a.head_dim)
                mlp_out = ops.decoder_layer(fused[i], h, mlp_out, b, attn_norm, mlp_norm, cos, sin, k_flat, v_flat,
                                            layout.write_slots, spans, a.n_heads, a.n_kv_heads, a.head_dim, eps)
                continue
            q_proj, k_proj, v_proj, o_proj, gate, up, down = self.linears[7 * i : 7 * i + 7]
            h, x = ops.add_rms_norm(h, mlp_out, attn_norm, eps)
            q = ops.rope(q_proj(x, b[0]).view(t, a.n_heads, a.head_dim), cos, sin)  # [T, Hq, D]
            k = ops.rope(k_proj(x, b[1]).view(t, a.n_kv_heads, a.head_dim), cos, sin)  # [T, Hkv, D]
            v = v_proj(x, b[2]).view(t, a.n_kv_heads, a.head_dim)
            h, x = ops.add_rms_norm(h, o_proj(self._attention(i, q, k, v, cache, layout), b[3]), mlp_norm, eps)
            mlp_out = down(ops.silu_mul(gate(x, b[4]), up(x, b[5])), b[6])
        h, x = ops.add_rms_norm(h, mlp_out, self.final_norm, eps)
        if logits_rows is not None:
            if logits_rows.numel() == 0:  # no row samples this step (prefill chunks): the head does not run
                return x.new_empty(0, a.vocab_size)
            x = x.index_select(0, logits_rows)  # [L, D]
        return self.linears[-1](x, widths.head)


def elastic_model_from_checkpoint(ckpt: Any, backend: ElasticBackend) -> ElasticModel:
    """Build the runtime model from a loaded `ElasticCheckpoint` with the given backend."""
    args = ModelArgs.from_hf_config(ckpt.hf_config)
    names = linear_names(args.n_layers)
    missing = [n for n in names if n not in ckpt.elastic]
    if missing:
        raise SourceModelError(f"checkpoint {ckpt.path} lacks elastic linears {missing[:3]}")
    linears = {n: ElasticLinear(ckpt.elastic[n], backend, j) for j, n in enumerate(names)}
    return ElasticModel(args, ckpt.dense, linears, backend.layer_ops())


def dense_model(args: ModelArgs, state: dict[str, torch.Tensor]) -> ElasticModel:
    """The same forward over plain fp32 weights (`state` in Hugging Face names)."""
    names = linear_names(args.n_layers)
    linears = {n: DenseLinear(state[f"{n}.weight"], state.get(f"{n}.bias"), j) for j, n in enumerate(names)}
    return ElasticModel(args, state, linears)
