"""The `native` backend: hand-written SIMD CPU kernels (kernels/csrc/) for the elastic linear.

At load, `prepare` repacks each layer's master codes into bit-planes (plane p = bit 7-p of every
code, tiled 16 rows x 32 columns), so a row at width `b` reads `b/8` of the code bytes plus its
group affines, and keeps scales, mins and adapters in fp16. At run time one C++ call per linear
rounds the activations to int8 per block of 32 (as llama.cpp's Q8_0; width-8 rows add a second int8
term for the residual, about 15 bits, so w8 serves the source model's answers), takes integer dot products
with the codes (AVX-512 VNNI, AVX2 maddubs, or plain C++, chosen from the CPU at run time), applies
the group affines with per-group sums of the fp32 activations, adds the adapter `(x A[:r]^T) B[:, :r]^T`
and the bias, for every row at its own width, on torch's intra-op threads. The numeric contract and
its tolerance against `kernels.reference.elastic_linear_ref` are in `kernels/native_ref.py`.

The extension is compiled on first use and cached (kernels/native.py). Without a C++ compiler the
constructor raises RuntimeError, and `get_backend('auto')` falls back to the `torch` backend.
Layers the kernel cannot take (a group size that is not a multiple of 32) run on the torch backend.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quept.backends.base import ElasticBackend, ElasticWeights
from quept.backends.torch_dense import TorchBackend, TorchPrepared
from quept.precision.segments import WidthSegments

log = logging.getLogger(__name__)


class NativeLayerOps:
    """The model's elementwise ops as single C++ calls (kernels/csrc/fused_ops.cpp): at decode each
    torch op is a few microseconds of dispatch around a few hundred flops, a dozen of them per layer.
    Same formulas and signatures as `quept.model.model.TorchLayerOps`. The model hands them fp32,
    contiguous CPU tensors (it runs this backend's linears); the C++ side checks that and names the
    problem otherwise, so no per-call Python checks stand on the per-token path."""

    def __init__(self, ext: Any) -> None:
        self._ext = ext

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return h, self._ext.add_rms_norm(h, delta, weight, eps)  # h += delta in place

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        self._ext.rope_(x, cos, sin)  # in place
        return x

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._ext.silu_mul(gate, up)

    attention_in_place = True  # paged_attention reads the cache in place: every row of a batch in one call
    # fp16 K/V (as llama.cpp's default): with many sequences decoding, attention is bound by reading the
    # cache (16 sequences x 100 tokens x 30 layers is 74 MB per step in fp32); half the bytes, twice the tokens
    kv_dtype = torch.float16

    def write_kv(self, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
        self._ext.write_kv(k_flat, v_flat, slots, k, v)

    def paged_attention(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                        starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return self._ext.paged_attention(q, k_flat, v_flat, slots, starts, ends, q.shape[-1] ** -0.5)

    def layer_linears(self, linears: list[Any]) -> list[Any] | None:
        """The C++ layers of every decoder layer's 7 linears (q k v o gate up down), for `decoder_layer`;
        None when one of them is not a native kernel layer (a torch fallback, a dense baseline)."""
        out = []
        for lin in linears:
            prepared = getattr(lin, "prepared", None)
            if not isinstance(prepared, NativePrepared) or prepared.layer is None:
                return None
            out.append(prepared.layer)
        return [out[i : i + 7] for i in range(0, len(out), 7)]  # the model hands 7 per layer

    def decoder_layer(self, layer_linears: list[Any], h: torch.Tensor, delta: torch.Tensor | None,
                      widths: Sequence[int | WidthSegments], attn_norm: torch.Tensor, mlp_norm: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                      write_slots: torch.Tensor, spans: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      n_heads: int, n_kv_heads: int, head_dim: int, eps: float) -> torch.Tensor:
        """One decoder layer in one C++ call (kernels/csrc/decoder_layer.h): h += delta in place, then
        the same ops as the model's op-by-op forward; returns the layer's MLP output [T, D]."""
        native_widths = [w if isinstance(w, int) else w.form("native", self.segments) for w in widths]
        return self._ext.decoder_layer(h, delta, layer_linears, native_widths, attn_norm, mlp_norm, cos, sin, k_flat,
                                       v_flat, write_slots, *spans, n_heads, n_kv_heads, head_dim, eps,
                                       head_dim ** -0.5)

    def segments(self, widths: WidthSegments) -> Any:
        """The C++ form of a step's segments, made once per step and shared by every linear that reads them."""
        return self._ext.Segments(widths.order.to(torch.int32), list(widths.bits), list(widths.bounds))


@dataclass
class NativePrepared:
    """One layer as the native kernel reads it (`layer`), or its torch fallback (`fallback`)."""

    layer: Any  # kernels C++ Layer: bit-planes, tiled fp16 affines and adapters
    fallback: TorchPrepared | None
    out_features: int
    in_features: int


class NativeBackend(ElasticBackend):
    name = "native"

    def __init__(self, isa: str | None = None) -> None:
        """isa: force 'generic', 'avx2' or 'avx512' (default: the best this CPU runs, or $QUEPT_NATIVE_ISA)."""
        from quept.kernels.native import load_native, set_isa

        self._ext = load_native()  # RuntimeError when it cannot be built
        if isa is not None:
            set_isa(isa)
        self._torch = TorchBackend()
        self._ops = NativeLayerOps(self._ext)
        self._warned = False

    @property
    def isa(self) -> str:
        return str(self._ext.current_isa())

    def prepare(self, weights: ElasticWeights) -> NativePrepared:
        n, k = weights.codes.shape
        g = weights.group_size
        if weights.codes.device.type != "cpu":
            raise ValueError(f"the native backend runs on the CPU; the weights are on {weights.codes.device}")
        if g % 32 or k % g:
            if not self._warned:
                log.warning("group size %d (K=%d) is not a multiple of 32: such layers run on the torch backend", g, k)
                self._warned = True
            return NativePrepared(None, self._torch.prepare(weights), n, k)
        bias = torch.empty(0) if weights.bias is None else weights.bias.float()
        ranks = weights.effective_ranks()  # zero adapter components cost work and add nothing: skipped
        r = max(ranks, default=0)
        layer = self._ext.Layer(weights.codes, weights.scales, weights.mins, weights.lora_a[:r], weights.lora_b[:, :r],
                                bias, list(weights.widths), list(ranks), g)
        return NativePrepared(layer, None, n, k)

    def forward(self, prepared: NativePrepared, x: torch.Tensor, widths: int | WidthSegments) -> torch.Tensor:
        layer = prepared.layer
        if layer is None:
            return self._torch.forward(prepared.fallback, x, widths)  # type: ignore[arg-type]
        if x.dim() != 2:  # [..., K] -> [M, K]
            lead = x.shape[:-1]
            return self.forward(prepared, x.reshape(-1, x.shape[-1]), widths).view(*lead, prepared.out_features)
        if isinstance(widths, int):
            return layer.forward(x, widths)
        return layer.forward_segments(x, widths.form("native", self._ops.segments))

    def layer_ops(self) -> "NativeLayerOps":
        return self._ops

    def owns_copy(self, prepared: NativePrepared) -> bool:
        return prepared.layer is not None  # bit-planes, affines and adapters copied into the extension

    def resident_bytes(self, prepared: NativePrepared) -> int:
        if prepared.layer is None:
            return self._torch.resident_bytes(prepared.fallback)  # type: ignore[arg-type]
        return int(prepared.layer.resident_bytes())
