"""The controller interface: which plan each sequence runs at (docs/architecture.md, "Controller").

A `Controller` resolves a request's `PrecisionSpec` to a `PrecisionPlan` when the request is
admitted (`initial_plan`), and is asked again for every scheduled sequence at every engine step
(`step_plan`), so a policy can change a sequence's precision between tokens. `begin_step` sees
the engine's load once per step (queue depth, KV usage, inter-token latency) and `observe` sees
each sampled row's logits when `needs_logits` is set (FlexQuant-style entropy policies).
The engine counts every plan change in `precision_switches_total{policy, reason}`.

The policies live one per module beside this one; `quept.policies` registers them by name.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from quept.errors import PrecisionError
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec

if TYPE_CHECKING:
    from quept.engine.sequence import Sequence

log = logging.getLogger(__name__)

NO_MIXED_MESSAGE = "no mixed profiles in this checkpoint"


class PlanSource(Protocol):
    """What a controller needs of the loaded model (a `LoadedModel` satisfies it)."""

    @property
    def widths(self) -> tuple[int, ...]: ...

    def parse(self, text: str) -> PrecisionSpec: ...

    def plan_for(self, spec: PrecisionSpec | str) -> PrecisionPlan: ...


@dataclass(frozen=True)
class StepContext:
    """The engine's load at the start of a step."""

    step: int
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    mean_itl_s: float | None  # recent mean inter-token latency, None before any decode


@dataclass(frozen=True)
class PlanDecision:
    plan: PrecisionPlan
    reason: str = "policy"  # label of precision_switches_total when the plan changes


class Controller(ABC):
    """A precision policy. One instance per engine; called only from the engine thread after admission."""

    name: str = "abstract"
    needs_logits: bool = False  # set to get `observe` calls with each sampled row's logits

    def __init__(self, model: PlanSource, default_precision: str = "w8") -> None:
        self.model = model
        self.default_spec = model.parse(default_precision)
        if self.default_spec.kind == "auto":
            raise PrecisionError(f"default precision {default_precision!r} must be concrete (wB or mixed:X), not auto")
        self.default_plan = self.resolve(self.default_spec)

    def resolve(self, spec: PrecisionSpec) -> PrecisionPlan:
        """A concrete plan for a uniform or mixed spec; a clear error when mixed plans are unavailable."""
        try:
            return self.model.plan_for(spec)
        except (ImportError, NotImplementedError):  # no allocation module yet
            raise PrecisionError(f"precision {spec}: {NO_MIXED_MESSAGE}; use one of "
                                 f"{', '.join(f'w{b}' for b in self.model.widths)}") from None

    @abstractmethod
    def initial_plan(self, spec: PrecisionSpec | None) -> PrecisionPlan:
        """The plan a new request starts at (`None`: the server default). Raises PrecisionError."""

    def begin_step(self, ctx: StepContext) -> None:
        """Called once per engine step before `step_plan` (load-driven policies update state here)."""

    def step_plan(self, seq: "Sequence", ctx: StepContext) -> PlanDecision:
        """The plan `seq` runs at in this step; the default keeps its current plan."""
        return PlanDecision(seq.plan)

    def observe(self, seq: "Sequence", logits: torch.Tensor) -> None:
        """Called with the logits [V] each sampled row of `seq` produced (only when `needs_logits`)."""

    def end_step(self, num_rows: int, seconds: float) -> None:
        """Called once per engine step after it ran: its rows and measured seconds (cost models learn here)."""

    def report(self) -> dict[str, Any] | None:
        """The policy's state for GET /v1/precisions (e.g. the load policy's cost model); None: nothing to add."""
        return None
