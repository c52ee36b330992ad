"""`fixed`: run what the request asked for.

`wB` and `mixed:X` resolve through `LoadedModel.plan_for`; `auto` (or no spec) runs the server's
default precision, clamped into the request's `min`/`max` bounds; the plan never changes afterwards.
"""

from __future__ import annotations

from quept.policies.base import Controller
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec


class FixedPolicy(Controller):
    """Runs what the request asked for; `auto` means the server default within the request's bounds."""

    name = "fixed"

    def initial_plan(self, spec: PrecisionSpec | None) -> PrecisionPlan:
        if spec is None:
            return self.default_plan
        if spec.kind == "auto":
            return self._auto(spec)
        return self.resolve(spec)

    def _auto(self, spec: PrecisionSpec) -> PrecisionPlan:
        plan = self.default_plan
        bits = plan.uniform_bits if plan.uniform_bits is not None else plan.avg_bits
        if bits is None:
            return plan
        widths = sorted(self.model.widths)
        if spec.max_bits is not None and bits > spec.max_bits:
            return PrecisionPlan.uniform(spec.max_bits)
        if spec.min_bits is not None and bits < spec.min_bits:
            return PrecisionPlan.uniform(min(w for w in widths if w >= spec.min_bits))
        return plan
