"""The `load+entropy` policy: the load policy sets the ceiling, the entropy gate lowers quiet tokens.

The default plan of `auto` requests follows the load exactly as under `load`; within it, a
sequence whose recent next-token entropies stayed below the threshold runs at `entropy_low`
(never above the load's choice), and steps back up to the load's plan when the model is unsure.
Switch reasons are the load policy's, plus `entropy_quiet` when a quiet sequence runs low.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from quept.policies.entropy_policy import EntropyGate, resolve_threshold, row_entropy
from quept.policies.load_policy import LoadPolicy
from quept.policies.plans import clamp, is_managed, plan_bits
from quept.precision.plan import PrecisionPlan

if TYPE_CHECKING:
    from quept.engine.sequence import Sequence as Seq


class LoadEntropyPolicy(LoadPolicy):
    name = "load+entropy"
    needs_logits = True

    def __init__(self, model: Any, default_precision: str = "w8", **kwargs: Any) -> None:
        super().__init__(model, default_precision, **kwargs)
        cfg = self.config
        self.low = self.resolve(model.parse(cfg.entropy_low))
        threshold, self.threshold_source = resolve_threshold(model, cfg, self.ceiling)
        self.gate = EntropyGate(threshold, cfg.entropy_window)

    def plan_for_seq(self, seq: "Seq") -> tuple[PrecisionPlan, str]:
        plan, reason = super().plan_for_seq(seq)
        spec = seq.request.spec
        if is_managed(spec) and not self.gate.is_high(seq) and plan_bits(self.low) < plan_bits(plan):
            return clamp(self.low, spec, self.ladder, self.model.widths), "entropy_quiet"
        return plan, reason

    def observe(self, seq: "Seq", logits: torch.Tensor) -> None:
        if is_managed(seq.request.spec):
            self.gate.update(seq, float(row_entropy(logits)))

    def begin_step(self, ctx: Any) -> None:
        if ctx.step % 64 == 0:
            self.gate.prune()
        super().begin_step(ctx)

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["entropy"] = {"low": self.low.name, "threshold_source": self.threshold_source, **self.gate.stats()}
        return out
