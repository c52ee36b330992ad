"""The backend interface: how an `ElasticLinear` runs its matmul.

A backend is chosen once at load (`torch`, `native`, `triton`). At load it repacks each layer's
master codes into whatever layout it reads fastest (`prepare`); at run time it computes
`y = x·deq_b(W)ᵀ + (x·A[:r_b]ᵀ)·B[:, :r_b]ᵀ + bias` with `b` chosen per row (`forward`).
The math is defined by `kernels.reference.elastic_linear_ref`; every backend is tested against it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import torch

from quept.precision.segments import WidthSegments


@dataclass
class ElasticWeights:
    """One elastic linear as stored in the checkpoint (docs/architecture.md, "The elastic checkpoint")."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # fp16 [W, N, K // G]
    mins: torch.Tensor  # fp16 [W, N, K // G]
    lora_a: torch.Tensor  # fp16 [R, K]
    lora_b: torch.Tensor  # fp16 [N, R]
    bias: torch.Tensor | None  # fp32 [N] or None
    widths: tuple[int, ...]  # stored widths, e.g. (8, 6, 5, 4, 3, 2)
    ranks: tuple[int, ...]  # adapter rank per stored width, aligned with `widths`
    group_size: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def rank_of(self, bits: int) -> int:
        return self.ranks[self.widths.index(bits)]

    def effective_ranks(self) -> tuple[int, ...]:
        """Adapter rank per width that contributes: the prefix up to the last component whose A row and
        B column are both nonzero (a round-to-nearest build stores zero adapters: every rank is 0)."""
        if self.lora_a.numel() == 0:
            return tuple(0 for _ in self.ranks)
        live = (self.lora_a != 0).any(dim=1) & (self.lora_b != 0).any(dim=0)  # [R]
        used = int(live.nonzero().max()) + 1 if bool(live.any()) else 0
        return tuple(min(r, used) for r in self.ranks)

    def to(self, device: str | torch.device) -> "ElasticWeights":
        """The same layer with its tensors on `device`."""
        bias = None if self.bias is None else self.bias.to(device)
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device), mins=self.mins.to(device),
                       lora_a=self.lora_a.to(device), lora_b=self.lora_b.to(device), bias=bias)

    def without_data(self) -> "ElasticWeights":
        """The same layer with its big tensors on the meta device: shapes, dtypes and sizes stay
        readable, the bytes are gone (for a backend that keeps its own packed copy)."""
        def meta(t: torch.Tensor) -> torch.Tensor:
            return torch.empty(t.shape, dtype=t.dtype, device="meta")

        return replace(self, codes=meta(self.codes), scales=meta(self.scales), mins=meta(self.mins),
                       lora_a=meta(self.lora_a), lora_b=meta(self.lora_b))


class ElasticBackend(ABC):
    """Runs elastic linears. Stateless apart from what `prepare` returns per layer."""

    name: str = "abstract"

    @abstractmethod
    def prepare(self, weights: ElasticWeights) -> Any:
        """Repack one layer at load time; the result is passed back to `forward`."""

    @abstractmethod
    def forward(self, prepared: Any, x: torch.Tensor, widths: int | WidthSegments) -> torch.Tensor:
        """x: [M, K] activations; widths: one width for all rows, or the rows grouped by width. Returns [M, N]."""

    def resident_bytes(self, prepared: Any) -> int:
        """Bytes this backend keeps resident for one layer (for memory reports)."""
        return 0

    def layer_ops(self) -> Any:
        """Fused elementwise ops for the model around this backend's linears, or None for plain torch
        (`quept.model.model.TorchLayerOps` names the methods)."""
        return None

    def owns_copy(self, prepared: Any) -> bool:
        """True when `forward` never reads the checkpoint's tensors again (the layer was repacked)."""
        return False
