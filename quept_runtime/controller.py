"""Precision controllers: which plan each sequence runs at (DESIGN §4, "Controller").

A `Controller` resolves a request's `PrecisionSpec` to a `PrecisionPlan` when the request is
admitted (`initial_plan`), and is asked again for every scheduled sequence at every engine step
(`step_plan`), so a policy can change a sequence's precision between tokens. `begin_step` sees
the engine's load once per step (queue depth, KV usage, inter-token latency) and `observe` sees
each sampled row's logits when `needs_logits` is set (FlexQuant-style entropy policies).
The engine counts every plan change in `precision_switches_total{policy, reason}`.

`FixedPolicy` runs what the request asked for: `wB` and `mixed:X` through
`LoadedModel.plan_for`, `auto` as the server's default precision (clamped into the request's
`min`/`max` bounds), never changing it afterwards. Policies register by name in `POLICIES`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from quept_runtime.errors import PrecisionError
from quept_runtime.precision import PrecisionPlan, PrecisionSpec

if TYPE_CHECKING:
    from quept_runtime.sequence import Sequence

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


PolicyFactory = Callable[..., Controller]
POLICIES: dict[str, PolicyFactory] = {"fixed": FixedPolicy}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make a policy available to `make_controller` (and to `quept serve --policy NAME`)."""
    POLICIES[name] = factory


def make_controller(name: str, model: PlanSource, default_precision: str = "w8", **options: Any) -> Controller:
    if name not in POLICIES:
        import quept_runtime.policies  # noqa: F401  (registers load, entropy, load+entropy)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES, key=lambda n: (n != 'fixed', n))}")
    return POLICIES[name](model, default_precision, **options)
