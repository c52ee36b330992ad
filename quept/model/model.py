"""Our own LLaMA-family forward (gpt-fast style) over elastic linears and a paged KV cache.

One forward runs a flat batch of token rows from several sequences (prefill chunks and decode
steps together). Each row carries its own precision: `row_bits` is either one width for every
row and every linear, or an int tensor [T, n_linears] (a width per row per linear, so uniform
and per-layer mixed plans share a batch). Transformers is used only for configs and as the
reference in tests.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quept.backends.base import ElasticBackend, ElasticWeights
from quept.errors import SourceModelError
from quept.model.kv_cache import PagedKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelArgs:
    """The architecture numbers our forward needs, read from a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SourceModelError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        n_heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 folds theta and scaling here
            params = cfg["rope_parameters"]
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = params
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "llama3"):
                raise SourceModelError(f"rope scaling {kind!r} is not supported (supported: default, llama3)")
            scaling = None if kind == "default" else tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
        )


def linear_names(n_layers: int) -> list[str]:
    """Every elastic linear in plan order: the 7 per block, then the lm_head."""
    return [f"model.layers.{i}.{n}" for i in range(n_layers) for n in LINEAR_NAMES] + ["lm_head"]


class ElasticLinear(nn.Module):
    """A linear whose weights are nested codes + per-width affines + cascaded adapters."""

    def __init__(self, weights: ElasticWeights, backend: ElasticBackend, plan_index: int) -> None:
        super().__init__()
        self.weights = weights
        self.backend = backend
        self.prepared = backend.prepare(weights)
        self.plan_index = plan_index  # column of this linear in a [T, n_linears] row_bits tensor

    def forward(self, x: torch.Tensor, row_bits: torch.Tensor | int) -> torch.Tensor:
        return self.backend.forward(self.prepared, x, row_bits)


class DenseLinear(nn.Module):
    """A plain fp32 linear with the ElasticLinear call signature (unquantized and RTN baselines)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan_index: int) -> None:
        super().__init__()
        self.weight = weight.float()
        self.bias = None if bias is None else bias.float()
        self.plan_index = plan_index

    def forward(self, x: torch.Tensor, row_bits: torch.Tensor | int) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with llama3 scaling where the config asks for it."""
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_scaling is None:
        return inv.float()
    s = dict(args.rope_scaling)
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, D] (rotate-half convention of Hugging Face Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class SeqSlice:
    """One sequence's rows in a flat batch."""

    start: int  # first row in the flat batch
    length: int  # rows of this sequence in the batch (prefill chunk or 1 for decode)
    context_before: int  # tokens of this sequence already in the KV cache before this batch
    ctx_slots: torch.Tensor  # flat cache slot ids of all context_before + length tokens


@dataclass
class DecodeGroup:
    """The single-row (decode) sequences of a batch, attended together in one call."""

    rows: torch.Tensor  # [B] row of each decoding sequence in the flat batch
    slots: torch.Tensor  # [sum L] the cache slots of every sequence's context, concatenated
    offsets: torch.Tensor  # [B + 1] sequence b's slots are slots[offsets[b] : offsets[b + 1]]
    tables: list[list[int]]  # each sequence's KV block ids
    block_size: int

    @cached_property
    def padded(self) -> "PaddedBlocks":
        """The block tables padded to one length, for one masked sdpa call over gathered blocks."""
        n_blocks = max(len(t) for t in self.tables)
        blocks = torch.tensor([t + [0] * (n_blocks - len(t)) for t in self.tables], dtype=torch.int64)  # [B, NB]
        lens = self.offsets.diff()  # [B]
        max_len = n_blocks * self.block_size
        mask = (torch.arange(max_len).unsqueeze(0) < lens.unsqueeze(1)).view(len(self.tables), 1, 1, max_len)
        return PaddedBlocks(blocks.view(-1), mask, max_len)


@dataclass
class PaddedBlocks:
    blocks: torch.Tensor  # [B * NB] KV block ids of each sequence, padded to NB blocks with block 0
    mask: torch.Tensor  # [B, 1, 1, Lmax] bool, True where the key is real (Lmax = NB * block_size)
    max_len: int  # Lmax


@dataclass
class BatchLayout:
    """Where each row's K/V goes and which rows attend to which cache slots."""

    write_slots: torch.Tensor  # [T] flat cache slot of each row
    seqs: list[SeqSlice]
    tables: list[list[int]]  # each sequence's KV block ids
    block_size: int

    # Derived on first use, per attention path: layer ops that attend in place read `row_spans`, the
    # others `decode` (a step builds only what its model's attention reads).
    @cached_property
    def decode(self) -> DecodeGroup | None:
        """The sequences that decode one row, if any."""
        return decode_group(self.seqs, self.tables, self.block_size)

    @cached_property
    def row_spans(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, starts, ends): every sequence's context slots concatenated [n], and for each row
        [T] the span of them it attends to (a prefill chunk's rows are causal: each one slot more)."""
        slots = torch.cat([s.ctx_slots for s in self.seqs]) if len(self.seqs) > 1 else self.seqs[0].ctx_slots
        starts, ends, base = [], [], 0
        for s in self.seqs:
            starts += [base] * s.length
            ends += range(base + s.context_before + 1, base + s.context_before + s.length + 1)
            base += s.ctx_slots.numel()
        return slots, torch.tensor(starts, dtype=torch.int64), torch.tensor(ends, dtype=torch.int64)


def resolve_row_bits(row_bits: torch.Tensor | int, n_linears: int) -> list[torch.Tensor | int]:
    """Per linear: one int when all rows agree (the fast path), else the [T] column."""
    if isinstance(row_bits, int):
        return [row_bits] * n_linears
    lo, hi = row_bits.amin(0).tolist(), row_bits.amax(0).tolist()  # [n_linears] each
    return [int(a) if a == b else row_bits[:, j] for j, (a, b) in enumerate(zip(lo, hi))]


class TorchLayerOps:
    """The elementwise ops around the linears, in plain torch (the reference; any device)."""

    @staticmethod
    def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rms_norm(h + delta)); h [T, D]."""
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, eps)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    # True: paged_attention takes every row of a batch (decoding rows and prefill chunks) in one call.
    # Here (False) it takes a lone decoding row; more rows go to sdpa over gathered keys.
    attention_in_place = False
    kv_dtype = torch.float32  # what the KV cache stores (the ops read it; the model writes it)

    @staticmethod
    def write_kv(k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> None:
        """k_flat[slots] = k, v_flat[slots] = v (in the cache's type); k, v: [T, Hkv, D]."""
        k_flat.index_copy_(0, slots, k.to(k_flat.dtype))
        v_flat.index_copy_(0, slots, v.to(v_flat.dtype))

    @staticmethod
    def paged_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                        starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Query rows q [R, Hq, D], row r over the cache rows slots[starts[r]:ends[r]] of k_flat/v_flat
        [slots, Hkv, D] -> [R, Hq, D]. The G query heads of a KV head act as G positions, no mask (about
        3x faster than sdpa's enable_gqa K/V expansion at these sizes, measured 20 vs 60 us per call)."""
        r, hq, d = q.shape
        hkv = k_flat.shape[1]
        out = q.new_empty(r, hq, d)
        for i, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist())):
            ks = k_flat.index_select(0, slots[lo:hi]).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hkv, L, D]
            vs = v_flat.index_select(0, slots[lo:hi]).transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(q[i].view(1, hkv, hq // hkv, d), ks, vs)  # [1, Hkv, G, D]
            out[i] = o.view(hq, d)
        return out


class ElasticModel(nn.Module):
    def __init__(self, args: ModelArgs, dense: dict[str, torch.Tensor], linears: dict[str, nn.Module],
                 ops: Any = None) -> None:
        super().__init__()
        self.args = args
        self.ops = ops or TorchLayerOps()  # a backend may bring fused ones (the native CPU kernels do)
        self.linear_names = linear_names(args.n_layers)
        self.embed = dense["model.embed_tokens.weight"]  # fp16/fp32 [V, D]; rows read per token
        self.norms = [
            (dense[f"model.layers.{i}.input_layernorm.weight"].float(),
             dense[f"model.layers.{i}.post_attention_layernorm.weight"].float())
            for i in range(args.n_layers)
        ]
        self.final_norm = dense["model.norm.weight"].float()
        self.linears = [linears[n] for n in self.linear_names]
        self.inv_freq = rope_inv_freq(args)

    @property
    def n_linears(self) -> int:
        return len(self.linear_names)

    def new_kv_cache(self, budget_bytes: int, block_size: int = 16) -> PagedKVCache:
        a = self.args
        return PagedKVCache.with_budget(a.n_layers, a.n_kv_heads, a.head_dim, budget_bytes, block_size,
                                        self.ops.kv_dtype)

    def new_kv_cache_for(self, tokens: int, block_size: int = 16) -> PagedKVCache:
        """A cache of just the blocks `tokens` tokens of one sequence need."""
        a = self.args
        return PagedKVCache(a.n_layers, a.n_kv_heads, a.head_dim, -(-tokens // block_size), block_size,
                            self.ops.kv_dtype)

    def _attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, layout: BatchLayout
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
            q_pos = torch.arange(s.length).unsqueeze(1) + s.context_before  # [Lq, 1]
            mask = torch.arange(s.ctx_slots.numel()).unsqueeze(0) <= q_pos  # [Lq, Lk] causal
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)
            out[s.start : s.start + s.length] = o.transpose(0, 1)
        return out.view(q.shape[0], a.n_heads * a.head_dim)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        layout: BatchLayout,
        row_bits: torch.Tensor | int,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions: [T]; row_bits: int or [T, n_linears]. Returns logits [L, V] for `logits_rows` (all if None)."""
        a = self.args
        bits = resolve_row_bits(row_bits, self.n_linears)
        ops, eps = self.ops, a.rms_norm_eps
        h = self.embed.index_select(0, tokens).float()  # [T, D] residual stream (a fresh tensor: ops may update it)
        freqs = positions.float().unsqueeze(1) * self.inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, D]
        cos, sin = emb.cos(), emb.sin()
        t = tokens.shape[0]
        mlp_out = None  # the previous layer's MLP output, added to h by the next norm
        for i in range(a.n_layers):
            q_proj, k_proj, v_proj, o_proj, gate, up, down = self.linears[7 * i : 7 * i + 7]
            b = bits[7 * i : 7 * i + 7]
            attn_norm, mlp_norm = self.norms[i]
            h, x = ops.add_rms_norm(h, mlp_out, attn_norm, eps)
            q = ops.rope(q_proj(x, b[0]).view(t, a.n_heads, a.head_dim), cos, sin)  # [T, Hq, D]
            k = ops.rope(k_proj(x, b[1]).view(t, a.n_kv_heads, a.head_dim), cos, sin)  # [T, Hkv, D]
            v = v_proj(x, b[2]).view(t, a.n_kv_heads, a.head_dim)
            h, x = ops.add_rms_norm(h, o_proj(self._attention(i, q, k, v, cache, layout), b[3]), mlp_norm, eps)
            mlp_out = down(ops.silu_mul(gate(x, b[4]), up(x, b[5])), b[6])
        h, x = ops.add_rms_norm(h, mlp_out, self.final_norm, eps)
        if logits_rows is not None:
            x = x.index_select(0, logits_rows)
            last = bits[-1]
            bits_head = last if isinstance(last, int) else last.index_select(0, logits_rows)
        else:
            bits_head = bits[-1]
        return self.linears[-1](x, bits_head)


def build_layout(cache: PagedKVCache, seqs: Sequence[tuple[Any, int]]) -> BatchLayout:
    """Reserve cache slots for each (SequenceBlocks, new_rows) and describe the flat batch."""
    slices, writes, tables, start = [], [], [], 0
    for blocks, n_new in seqs:
        before = blocks.num_tokens
        writes.append(cache.reserve(blocks, n_new))
        slices.append(SeqSlice(start, n_new, before, cache.slots(blocks, 0, before + n_new)))
        tables.append(blocks.block_table)
        start += n_new
    return BatchLayout(torch.cat(writes), slices, tables, cache.block_size)


def decode_group(slices: Sequence[SeqSlice], tables: Sequence[list[int]], block_size: int) -> DecodeGroup | None:
    """The single-row sequences of a batch with their concatenated context slots, if any."""
    dec = [(s, t) for s, t in zip(slices, tables) if s.length == 1]
    if not dec:
        return None
    lens = [s.ctx_slots.numel() for s, _ in dec]
    offsets = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64)
    slots = dec[0][0].ctx_slots if len(dec) == 1 else torch.cat([s.ctx_slots for s, _ in dec])
    return DecodeGroup(torch.tensor([s.start for s, _ in dec]), slots, offsets, [t for _, t in dec], block_size)


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
