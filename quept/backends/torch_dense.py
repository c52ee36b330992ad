"""The `torch` backend: correct for every width and every per-row mix, on any device.

It materialises, per layer, the dense effective weight of a width on first use,
`W_b = deq_b(W) + B[:, :r_b] · A[:r_b]` (the adapter folded in: the same product, computed once),
and keeps the most recently used `max_cached_widths` of them. A dense fp32 matmul is what a CPU
without hand-written kernels does fastest (torch's own int8/int4 CPU paths are slower here), so
this backend trades memory for speed; the `native` backend reads the codes directly instead.
The first use of a width pays its materialisation once (the measured switch cost).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from quept.backends.base import ElasticBackend, ElasticWeights
from quept.kernels.reference import dequantize, width_index
from quept.precision.segments import WidthSegments

HALF_ROWS_MAX = 4
NAMES = {torch.float16: "torch", torch.float32: "torch-fp32", torch.bfloat16: "torch-bf16"}  # compute dtype -> name


@dataclass
class TorchPrepared:
    weights: ElasticWeights
    dense: "OrderedDict[int, torch.Tensor]" = field(default_factory=OrderedDict)  # bits -> [N, K]


class TorchBackend(ElasticBackend):
    name = "torch"

    def __init__(self, max_cached_widths: int = 2, dtype: torch.dtype = torch.float32) -> None:
        if max_cached_widths < 1:
            raise ValueError(f"max_cached_widths must be >= 1, got {max_cached_widths}")
        if dtype not in NAMES:
            raise ValueError(f"torch backend dtype must be float32, float16 or bfloat16, got {dtype}")
        self.name = NAMES[dtype]
        self.max_cached_widths = max_cached_widths
        self.dtype = dtype

    def prepare(self, weights: ElasticWeights) -> TorchPrepared:
        return TorchPrepared(weights)

    def dense_weight(self, prepared: TorchPrepared, bits: int) -> torch.Tensor:
        """Effective dense weight [N, K] of one width (adapter folded), cached LRU."""
        cache = prepared.dense
        if bits in cache:
            cache.move_to_end(bits)
            return cache[bits]
        w = prepared.weights
        i = width_index(w.widths, bits)
        dense = dequantize(w.codes, w.scales[i], w.mins[i], bits, w.group_size)  # fp32 [N, K]
        r = w.ranks[i]
        if r > 0:
            dense.addmm_(w.lora_b[:, :r].float(), w.lora_a[:r].float())
        cache[bits] = dense.to(self.dtype)
        while len(cache) > self.max_cached_widths:
            cache.popitem(last=False)
        return cache[bits]

    def linear(self, prepared: TorchPrepared, x: torch.Tensor, bits: int) -> torch.Tensor:
        """x [M, K] at one width -> [M, N] in x's dtype, computed in the backend's dtype."""
        w = self.dense_weight(prepared, bits)
        bias = prepared.weights.bias
        if w.dtype == x.dtype:
            return torch.nn.functional.linear(x, w, bias)
        if x.shape[0] > HALF_ROWS_MAX:  # a GEMM: torch's fp16 GEMM is slow on CPUs without AVX512-FP16
            return torch.nn.functional.linear(x, w.to(x.dtype), bias)
        out = torch.nn.functional.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        if not torch.isfinite(out).all():  # fp16 overflow (or a non-finite input): redo in x's dtype
            return torch.nn.functional.linear(x, w.to(x.dtype), bias)
        return out.to(x.dtype)

    def forward(self, prepared: TorchPrepared, x: torch.Tensor, widths: int | WidthSegments) -> torch.Tensor:
        if isinstance(widths, int):
            return self.linear(prepared, x, widths)
        out = x.new_empty(x.shape[0], prepared.weights.out_features)
        for i, bits in enumerate(widths.bits):
            rows = widths.rows(i)  # [n_i]
            out.index_copy_(0, rows, self.linear(prepared, x.index_select(0, rows), bits))
        return out

    def resident_bytes(self, prepared: TorchPrepared) -> int:
        return sum(t.numel() * t.element_size() for t in prepared.dense.values())
