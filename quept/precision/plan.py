"""Precision plans: what one sequence runs at, one width or a width per linear (the model's plan order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from quept.errors import PrecisionError


@dataclass(frozen=True)
class PrecisionPlan:
    """What a sequence runs at: one width, or a width per linear (plan order of the model)."""

    name: str  # e.g. "w4" or "mixed:3.5"
    uniform_bits: int | None = None
    per_linear: tuple[int, ...] | None = None
    avg_bits: float | None = None  # real bits per weight when known

    @classmethod
    def uniform(cls, bits: int) -> "PrecisionPlan":
        return cls(name=f"w{bits}", uniform_bits=bits, avg_bits=float(bits))

    def row_vector(self, n_linears: int) -> torch.Tensor:
        """Widths per linear [n_linears] (int16)."""
        if self.per_linear is not None:
            if len(self.per_linear) != n_linears:
                raise PrecisionError(f"plan {self.name} has {len(self.per_linear)} widths for {n_linears} linears")
            return torch.tensor(self.per_linear, dtype=torch.int16)
        return torch.full((n_linears,), int(self.uniform_bits or 8), dtype=torch.int16)


def rows_bits(plans: Sequence[tuple[PrecisionPlan, int]], n_linears: int) -> torch.Tensor | int:
    """Row widths for a flat batch of (plan, rows) segments: an int when all rows run one uniform width."""
    uniform = {p.uniform_bits for p, _ in plans}
    if len(uniform) == 1 and None not in uniform:
        return int(next(iter(uniform)))  # type: ignore[arg-type]
    return torch.cat([p.row_vector(n_linears).unsqueeze(0).expand(n, -1) for p, n in plans])  # [T, n_linears]
