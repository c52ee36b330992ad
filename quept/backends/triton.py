"""The `triton` backend: fused nested dequant-matmul plus adapter accumulation, per-row widths.

At load, `prepare` repacks each layer's master codes into bit-planes (int32 [8, N, K/32], plane 0
= MSB), so a row at width `b` reads only planes 0..b-1 (`b/8` byte per weight plus its group
affines). `forward` runs `kernels.triton_ops.elastic_linear_planes` through the custom op
`torch.ops.quept.elastic_linear`: the decode kernel for few rows, the prefill kernel for many.
On CUDA this is the fast path; on CPU tensors it runs in the Triton interpreter (tests only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quept.backends.base import ElasticBackend, ElasticWeights
from quept.precision.segments import WidthSegments


@dataclass
class TritonPrepared:
    """One layer as the Triton kernels read it."""

    planes: torch.Tensor  # int32 [8, N, K/32]
    scales: torch.Tensor  # fp16 [W, N, K/G]
    mins: torch.Tensor  # fp16 [W, N, K/G]
    lora_a: torch.Tensor  # fp16 [R, K], R = largest stored rank
    lora_b: torch.Tensor  # fp16 [N, R]
    bias: torch.Tensor | None  # [N]
    wbits: torch.Tensor  # int32 [W], bits of each stored width
    wranks: torch.Tensor  # int32 [W], adapter rank of each stored width
    lut: torch.Tensor  # int32 [9], bits -> position in widths (-1 if not stored)
    widths: tuple[int, ...]
    ranks: tuple[int, ...]
    group_size: int

    @property
    def out_features(self) -> int:
        return self.planes.shape[1]

    @property
    def in_features(self) -> int:
        return self.planes.shape[2] * 32


class TritonBackend(ElasticBackend):
    name = "triton"

    def __init__(self) -> None:
        from quept.kernels import triton_ops  # imports triton; without CUDA it turns on the interpreter

        self._ops = triton_ops

    def prepare(self, weights: ElasticWeights) -> TritonPrepared:
        n, k = weights.codes.shape
        g = weights.group_size
        if g % 32 or k % g:
            raise ValueError(f"the triton backend needs a group size that is a multiple of 32 and divides K={k}; "
                             f"got {g}")
        from quept.kernels.reference import pack_bitplanes_ref

        codes = weights.codes.contiguous()
        # repack on the GPU with the Triton kernel; on the CPU the torch reference is faster than the interpreter
        planes = self._ops.pack_bitplanes_op(codes) if codes.is_cuda else pack_bitplanes_ref(codes)
        r = max(weights.ranks) if weights.ranks else 0
        device = codes.device
        wbits, wranks, lut = self._ops.width_tables(weights.widths, weights.ranks, device)
        return TritonPrepared(
            planes=planes,
            scales=weights.scales.contiguous(),
            mins=weights.mins.contiguous(),
            lora_a=weights.lora_a[:r].contiguous(),  # [r, K]
            lora_b=weights.lora_b[:, :r].contiguous(),  # [N, r]
            bias=None if weights.bias is None else weights.bias.contiguous(),
            wbits=wbits, wranks=wranks, lut=lut,
            widths=tuple(int(b) for b in weights.widths), ranks=tuple(int(x) for x in weights.ranks),
            group_size=g,
        )

    def forward(self, prepared: TritonPrepared, x: torch.Tensor, widths: int | WidthSegments) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        uniform = isinstance(widths, int)
        row_bits = widths if uniform else widths.form(f"row_bits@{x2.device}", lambda s: s.row_bits.to(x2.device))
        row_widx = self._ops.row_width_index(row_bits, m, prepared.widths, prepared.lut)  # int32 [M]
        p = prepared
        y = torch.ops.quept.elastic_linear(x2, p.planes, p.scales, p.mins, p.lora_a, p.lora_b, p.bias,
                                           row_widx, p.wbits, p.wranks, p.group_size, uniform)  # [M, N]
        return y.view(*lead, p.out_features)

    def resident_bytes(self, prepared: Any) -> int:
        p = prepared
        tensors = [p.planes, p.scales, p.mins, p.lora_a, p.lora_b] + ([p.bias] if p.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)
