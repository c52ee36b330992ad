"""Precision plans: what one sequence runs at, one width or a width per linear (the model's plan order)."""

from __future__ import annotations

from dataclasses import dataclass

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

    def widths(self, n_linears: int) -> tuple[int, ...]:
        """A width per linear, in the model's plan order."""
        if self.per_linear is not None:
            if len(self.per_linear) != n_linears:
                raise PrecisionError(f"plan {self.name} has {len(self.per_linear)} widths for {n_linears} linears")
            return self.per_linear
        return (int(self.uniform_bits or 8),) * n_linears
