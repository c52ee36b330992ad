"""The cost model of the running server: predicted decode step latency per plan and batch size.

Start-up profile: for every candidate plan and a few batch sizes, the model runs decode steps
(one row per sequence, `context` tokens of KV each) on a scratch KV cache; plans are interleaved
within each repetition so that a noisy machine slows them alike, and the fastest repetition is kept
(made non-decreasing in the batch). This is the *shape* of the cost: how step time grows with the
batch and falls with the width.

Live steps keep it current: every engine step that produced inter-token latencies records
`measured / profiled` for its plan mix and batch. Predictions are the profiled time scaled by a
quantile (default 0.95) of the recent ratios, so they follow a machine that got busier, the prefill
rows that join decode steps, and the tail an ITL SLO is about, without re-profiling. Batches and
plans between profiled points are interpolated (batch: piecewise linear, extrapolated from the last
two points; plans by real bits per weight).

Where the backend runs every width at the same speed (the `torch` backend keeps a dense copy per
width), the profile says so: the rows are flat across plans, and the load policy keeps the best plan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from quept.model.runner import ModelRunner, SeqRows, StepBatch
from quept.policies.plans import plan_bits
from quept.precision.plan import PrecisionPlan

log = logging.getLogger(__name__)


def _interp(points: Sequence[tuple[float, float]], x: float, extrapolate: bool = True) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points; linear beyond the last two when `extrapolate`."""
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if not extrapolate:
        return points[-1][1]
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return max(y1, y1 + (y1 - y0) * (x - x1) / (x1 - x0))


class CostModel:
    """Profiled step seconds per (plan, batch), corrected by live measurements. Thread-safe."""

    def __init__(self, table: Mapping[PrecisionPlan, Mapping[int, float]], *, quantile: float = 0.95,
                 window: int = 128, min_samples: int = 8, source: str = "profile", profile_seconds: float = 0.0) -> None:
        if not table:
            raise ValueError("a cost model needs at least one plan")
        self.table = {plan: dict(sorted((int(b), float(s)) for b, s in row.items())) for plan, row in table.items()}
        self.quantile = quantile
        self.min_samples = min_samples
        self.source = source
        self.profile_seconds = profile_seconds
        self._ratios: deque[float] = deque(maxlen=window)
        self._live: dict[tuple[PrecisionPlan, int], list[float]] = {}  # (plan, batch) -> [steps, last seconds]
        self._lock = threading.Lock()
        self.live_steps = 0

    @classmethod
    def from_table(cls, table: Mapping[PrecisionPlan, Mapping[int, float]], **kw: Any) -> "CostModel":
        """A cost model from known seconds per plan and batch (tests, replays)."""
        return cls(table, source=kw.pop("source", "table"), **kw)

    @classmethod
    def profile(cls, model: Any, plans: Sequence[PrecisionPlan], batches: Sequence[int], context: int = 64,
                reps: int = 3, **kw: Any) -> "CostModel":
        """Measure decode steps of `model` (an ElasticModel) for every plan and batch size."""
        t0 = time.perf_counter()
        table = profile_step_times(model, plans, batches, context, reps)
        seconds = time.perf_counter() - t0
        log.info("cost model: profiled %d plans x %d batch sizes in %.1f s", len(plans), len(batches), seconds)
        return cls(table, source="profile", profile_seconds=seconds, **kw)

    # ------------------------------------------------------------------ predictions

    def base(self, plan: PrecisionPlan, batch: int) -> float:
        """Profiled seconds of one decode step of `batch` sequences at `plan` (interpolated: a plan not
        in the table by its real bits per weight between the two nearest)."""
        batch = max(1, int(batch))
        row = self.table.get(plan)
        if row is not None:
            return _interp(list(row.items()), batch)
        per_plan = sorted((plan_bits(p), _interp(list(r.items()), batch)) for p, r in self.table.items())
        return _interp(per_plan, plan_bits(plan), extrapolate=False)

    def correction(self) -> float:
        """The live measured/profiled ratio at `quantile` (1 until `min_samples` steps were seen)."""
        with self._lock:
            ratios = sorted(self._ratios)
        if len(ratios) < self.min_samples:
            return 1.0
        k = min(len(ratios) - 1, max(0, int(round(self.quantile * (len(ratios) - 1)))))
        return ratios[k]

    def predict(self, plan: PrecisionPlan, batch: int) -> float:
        """Predicted step seconds (the inter-token latency of every sequence in that step)."""
        return self.base(plan, batch) * self.correction()

    # ------------------------------------------------------------------ live updates

    def observe(self, segments: Sequence[tuple[PrecisionPlan, int]], num_seqs: int, seconds: float) -> None:
        """One engine step: its (plan, sequences) segments, all sequences scheduled, measured seconds."""
        total = sum(n for _, n in segments)
        if total <= 0 or seconds <= 0:
            return
        expected = sum(self.base(p, num_seqs) * n for p, n in segments) / total
        ratio = min(10.0, max(0.1, seconds / expected))
        with self._lock:
            self._ratios.append(ratio)
            self.live_steps += 1
            if len(segments) == 1:
                cell = self._live.setdefault((segments[0][0], num_seqs), [0, 0.0])
                cell[0] += 1
                cell[1] = seconds

    # ------------------------------------------------------------------ reporting

    def report(self, batches: Sequence[int] | None = None) -> dict[str, Any]:
        """What GET /v1/precisions shows: profiled and predicted ms per plan and batch, the live correction."""
        corr = self.correction()
        plans = sorted(self.table, key=lambda p: -plan_bits(p))
        grid = sorted(set(batches or ()) | {b for row in self.table.values() for b in row})
        with self._lock:
            live = {f"{p.name}@{b}": {"steps": int(c[0]), "last_ms": round(c[1] * 1e3, 3)}
                    for (p, b), c in self._live.items()}
            n_ratios = len(self._ratios)
        return {
            "source": self.source,
            "profile_seconds": round(self.profile_seconds, 2),
            "batches": grid,
            "profiled_ms": {p.name: {str(b): round(s * 1e3, 3) for b, s in self.table[p].items()} for p in plans},
            "predicted_ms": {p.name: {str(b): round(self.base(p, b) * corr * 1e3, 3) for b in grid} for p in plans},
            "correction": round(corr, 4),
            "correction_quantile": self.quantile,
            "correction_samples": n_ratios,
            "live_steps": self.live_steps,
            "live_cells": live,
        }


def profile_step_times(model: Any, plans: Sequence[PrecisionPlan], batches: Sequence[int], context: int,
                       reps: int) -> dict[PrecisionPlan, dict[int, float]]:
    """Fastest of `reps` decode steps per plan and batch size (plans interleaved per repetition)."""
    a = model.args
    gen = torch.Generator().manual_seed(0)
    out: dict[PrecisionPlan, dict[int, float]] = {p: {} for p in plans}
    steps = len(plans) * (reps + 1) + 2
    for batch in batches:
        runner, tables = ModelRunner.scratch(model, batch, context + steps + 32)
        prompts = torch.randint(0, a.vocab_size, (batch, context), generator=gen).tolist()  # [B][ctx]
        runner.execute(StepBatch([SeqRows(ids, 0, table, plans[0]) for ids, table in zip(prompts, tables)]))
        cached = context
        samples: dict[PrecisionPlan, list[float]] = {p: [] for p in plans}
        for rep in range(reps + 1):  # repetition 0 warms up (dense weights of a width, caches)
            for plan in plans:
                step_tokens = torch.randint(0, a.vocab_size, (batch,), generator=gen).tolist()  # [B]
                t0 = time.perf_counter()
                logits = runner.execute(StepBatch([SeqRows([tok], cached, table, plan)
                                                   for tok, table in zip(step_tokens, tables)]))  # [B, V]
                logits.argmax(-1)
                dt = time.perf_counter() - t0
                cached += 1
                if rep > 0:
                    samples[plan].append(dt)
        for plan, ts in samples.items():
            out[plan][batch] = min(ts)  # the uncontended time; contention is the live correction's job
    for row in out.values():  # a larger batch never runs faster (a noisy sample must not bend the curve)
        prev = 0.0
        for b in sorted(row):
            row[b] = prev = max(prev, row[b])
    return out
