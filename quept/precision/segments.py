"""Width segments: a step's plans turned, once, into what every linear reads.

A step runs rows of several sequences, each at its own plan. A linear needs to know which rows run
at which width: either one width for every row (`int`, the common case), or `WidthSegments`, the
rows grouped by width (widest first) as a permutation plus segment bounds, the way Punica/SGMV
groups LoRA ids. `step_widths` builds them from the plans once per step; linears whose row widths
agree share one `WidthSegments` object, so a backend converts it to its own form (a C++ object, a
per-row tensor) once per step, not once per linear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from quept.precision.plan import PrecisionPlan


@dataclass(eq=False)
class WidthSegments:
    """Rows grouped by width: rows `order[bounds[i]:bounds[i + 1]]` run at `bits[i]`."""

    order: torch.Tensor  # int64 [M] row ids, segment after segment
    bits: tuple[int, ...]  # width of each segment, widest first, each once
    bounds: tuple[int, ...]  # len(bits) + 1 offsets into `order`; bounds[-1] == M
    _forms: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return self.bounds[-1]

    def rows(self, i: int) -> torch.Tensor:
        """Row ids of segment i [n_i]."""
        return self.order[self.bounds[i] : self.bounds[i + 1]]

    @cached_property
    def row_bits(self) -> torch.Tensor:
        """Width of every row in batch order, int32 [M] (for kernels that read a width per row)."""
        out = torch.empty(self.num_rows, dtype=torch.int32, device=self.order.device)
        for i, b in enumerate(self.bits):
            out[self.rows(i)] = b
        return out

    def form(self, key: str, make: Callable[["WidthSegments"], Any]) -> Any:
        """A backend's own representation of these segments, made on first use and kept with them."""
        if key not in self._forms:
            self._forms[key] = make(self)
        return self._forms[key]


def segments_of(row_widths: Sequence[int], device: str | torch.device = "cpu") -> int | WidthSegments:
    """One int when every row has the same width, else the rows grouped by width (widest first), their
    row ids on `device` (the activations')."""
    first = row_widths[0]
    if all(b == first for b in row_widths):
        return int(first)
    by_bits: dict[int, list[int]] = {}
    for row, b in enumerate(row_widths):
        by_bits.setdefault(int(b), []).append(row)
    bits = tuple(sorted(by_bits, reverse=True))
    order: list[int] = []
    bounds = [0]
    for b in bits:
        order += by_bits[b]
        bounds.append(len(order))
    return WidthSegments(torch.tensor(order, dtype=torch.int64, device=device), bits, tuple(bounds))


@dataclass(frozen=True)
class StepWidths:
    """What every linear of one forward reads: `linears[j]` for the rows of linear j (plan order, the
    lm_head last), `head` for the rows the lm_head computes logits of (a subset when only sampling
    rows need logits)."""

    linears: tuple[int | WidthSegments, ...]
    head: int | WidthSegments

    @classmethod
    def uniform(cls, bits: int, n_linears: int) -> "StepWidths":
        return cls((int(bits),) * n_linears, int(bits))


def step_widths(plans: Sequence[PrecisionPlan], rows: Sequence[int], n_linears: int,
                head_rows: Sequence[int] | None = None, device: str | torch.device = "cpu") -> StepWidths:
    """Widths of a step whose sequence i runs `rows[i]` rows at `plans[i]`.

    head_rows: how many of each sequence's rows the lm_head computes (0 or 1 when only the last row
    samples); None: all of them. Linears with the same per-sequence widths share one segments object.
    """
    if head_rows is None:
        head_rows = rows
    first = plans[0]
    if first.uniform_bits is not None and all(p == first for p in plans):
        return StepWidths.uniform(first.uniform_bits, n_linears)
    distinct: dict[PrecisionPlan, int] = {}
    seq_plan = [distinct.setdefault(p, len(distinct)) for p in plans]  # [S] index of each sequence's plan
    vectors = [p.widths(n_linears) for p in distinct]  # per distinct plan: a width per linear

    def for_rows(counts: Sequence[int], j: int, memo: dict[tuple[int, ...], int | WidthSegments]
                 ) -> int | WidthSegments:
        key = tuple(v[j] for v in vectors)
        if key not in memo:
            memo[key] = segments_of([key[k] for k, n in zip(seq_plan, counts) for _ in range(n)], device)
        return memo[key]

    memo: dict[tuple[int, ...], int | WidthSegments] = {}
    linears = tuple(for_rows(rows, j, memo) for j in range(n_linears))
    if list(head_rows) == list(rows):
        head = linears[-1]
    elif sum(head_rows) == 0:  # no row needs logits: the lm_head does not run
        head = vectors[0][-1]
    else:
        head = for_rows(head_rows, n_linears - 1, {})
    return StepWidths(linears, head)
