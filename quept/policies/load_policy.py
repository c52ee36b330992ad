"""The `load` policy: the default plan of `auto` requests follows the load of the running server.

Once per engine step (`begin_step`) it predicts the batch the next steps will run, from the live
load: running sequences plus the waiting queue (capped at `max_batch`; the queue is assumed not
to join while KV usage is above `kv_full`, since admission waits for blocks then). For every
candidate plan, best first (the ladder: stored widths and profiles between `load_floor` and the
server's default precision), the cost model predicts the p95 step time at that batch, which is
the inter-token latency of every sequence in the step. The default becomes the best plan whose
prediction meets `slo_itl_ms` (and, when set, whose predicted time to first token of the newest
waiting request meets `slo_ttft_ms`). When nothing meets it, the fastest plan runs; plans within
10 % of it count as equally fast, and among those the current plan stays (else the best one), so a
backend whose speed does not depend on the width, or a batch where it does not, keeps its plan.

Against flapping: a higher plan must fit below `(1 - load_hysteresis) x SLO`, and the default
changes at most once per `load_dwell_s`. Every running `auto` sequence follows the default at its
next step (no reload, the KV cache stays valid), always clamped into its own `auto;min;max`
bounds; `wB` and `mixed:X` requests run what they asked for. `end_step` feeds each step's measured
time back into the cost model.

Switch reasons (label of `quept:precision_switches_total`): `itl_slo` / `ttft_slo` (moved down
to meet that objective), `headroom` (moved up), `overload` (nothing meets the SLO: fastest plan).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from quept.policies.base import Controller, PlanDecision, StepContext
from quept.policies.config import PolicyConfig
from quept.policies.cost_model import CostModel
from quept.policies.plans import build_ladder, clamp, is_managed, plan_bits
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec

if TYPE_CHECKING:
    from quept.engine.sequence import Sequence as Seq

log = logging.getLogger(__name__)

TIE = 0.10  # when nothing meets the SLO, a lower plan must be >10 % faster to be worth its quality


class LoadPolicy(Controller):
    name = "load"

    def __init__(self, model: Any, default_precision: str = "w8", *, config: PolicyConfig | None = None,
                 cost_model: CostModel | None = None, clock: Callable[[], float] = time.monotonic,
                 **options: Any) -> None:
        super().__init__(model, default_precision)
        self.config = cfg = PolicyConfig.from_options(config, **options)
        self.ceiling = self.default_plan
        self.ladder = build_ladder(model, cfg.load_plans, cfg.load_floor, self.ceiling)
        self.cost = cost_model if cost_model is not None else self._profile()
        self.clock = clock
        self.slo_itl_s = cfg.slo_itl_ms / 1e3
        self.slo_ttft_s = cfg.slo_ttft_ms / 1e3 if cfg.slo_ttft_ms is not None else None
        self.default_plan = self.ladder[0]  # start at the best plan; the first steps move it if needed
        self.reason = "start"
        self.last_switch = -math.inf
        self.num_switches = 0
        self.history: deque[dict[str, Any]] = deque(maxlen=64)  # recent default changes (report)
        self.last_batch = 1
        self.last_ctx: StepContext | None = None
        # the step being planned (step_plan calls between begin_step and end_step)
        self._segments: dict[str, list[Any]] = {}
        self._num_seqs = 0
        self._decoding = 0
        self._remaining: list[int] = []
        self._remaining_last: list[int] = []
        log.info("load policy: ladder %s, SLO ITL %.0f ms%s, dwell %.1f s, hysteresis %.2f",
                 [p.name for p in self.ladder], cfg.slo_itl_ms,
                 f", TTFT {cfg.slo_ttft_ms:.0f} ms" if cfg.slo_ttft_ms else "", cfg.load_dwell_s, cfg.load_hysteresis)

    def _profile(self) -> CostModel:
        elastic = getattr(self.model, "model", None)
        if elastic is None:
            raise ValueError("the load policy needs a cost model: pass cost_model= or a LoadedModel to profile")
        cfg = self.config
        return CostModel.profile(elastic, self.ladder, cfg.batches(), cfg.profile_context, cfg.profile_reps,
                                 quantile=cfg.load_quantile)

    # ------------------------------------------------------------------ requests

    def initial_plan(self, spec: PrecisionSpec | None) -> PrecisionPlan:
        if is_managed(spec):
            return clamp(self.default_plan, spec, self.ladder, self.model.widths)
        return self.resolve(spec)  # type: ignore[arg-type]

    def plan_for_seq(self, seq: "Seq") -> tuple[PrecisionPlan, str]:
        """The plan of a sequence under the current default (subclasses refine it)."""
        spec = seq.request.spec
        if not is_managed(spec):
            return seq.plan, "fixed"
        return clamp(self.default_plan, spec, self.ladder, self.model.widths), self.reason

    def step_plan(self, seq: "Seq", ctx: StepContext) -> PlanDecision:
        plan, reason = self.plan_for_seq(seq)
        seg = self._segments.setdefault(plan.name, [plan, 0])
        seg[1] += 1
        self._num_seqs += 1
        if seq.num_output >= 1 and seq.num_uncomputed == 1:
            self._decoding += 1  # this step gives the sequence an inter-token latency
        self._remaining.append(max(0, seq.request.max_tokens - seq.num_output))
        return PlanDecision(plan, reason)

    # ------------------------------------------------------------------ the decision

    def begin_step(self, ctx: StepContext) -> None:
        self.last_ctx = ctx
        batch = self.expected_batch(ctx)
        self.last_batch = batch
        now = self.clock()
        target, reason = self.choose(batch, ctx)
        if target.name != self.default_plan.name and now - self.last_switch >= self.config.load_dwell_s:
            old = self.default_plan
            self.default_plan, self.reason, self.last_switch = target, reason, now
            self.num_switches += 1
            pred = self.cost.predict(target, batch)
            self.history.append({"t": round(now, 3), "from": old.name, "to": target.name, "reason": reason,
                                 "batch": batch, "predicted_itl_ms": round(pred * 1e3, 2)})
            log.info("load policy: default %s -> %s (%s): batch %d (running %d, waiting %d, kv %.0f%%), "
                     "predicted ITL %.1f ms, SLO %.1f ms", old.name, target.name, reason, batch, ctx.num_running,
                     ctx.num_waiting, 100 * ctx.kv_usage, pred * 1e3, self.slo_itl_s * 1e3)
        self._segments, self._num_seqs, self._decoding, self._remaining = {}, 0, 0, []

    def end_step(self, num_rows: int, seconds: float) -> None:
        """Feed the measured step time back into the cost model (steps that produced inter-token latencies)."""
        if self._decoding > 0 and self._segments:
            self.cost.observe([(p, n) for p, n in self._segments.values()], self._num_seqs, seconds)
        self._remaining_last = self._remaining

    def expected_batch(self, ctx: StepContext) -> int:
        """Sequences the next steps will decode together."""
        n = ctx.num_running
        if ctx.kv_usage < self.config.kv_full:
            n += ctx.num_waiting
        return max(1, min(self.config.max_batch, n))

    def predict_ttft(self, plan: PrecisionPlan, batch: int, ctx: StepContext) -> float:
        """Time to first token of the newest waiting request: steps until a slot frees, plus its prefill step."""
        step = self.cost.predict(plan, batch)
        beyond = ctx.num_waiting - max(0, self.config.max_batch - ctx.num_running)
        remaining = sorted(self._remaining_last)
        if beyond <= 0 or not remaining:
            return step
        if beyond <= len(remaining):
            steps = remaining[beyond - 1]
        else:
            rounds = math.ceil((beyond - len(remaining)) / self.config.max_batch)
            steps = remaining[-1] + rounds * max(remaining)
        return (steps + 1) * step

    def choose(self, batch: int, ctx: StepContext) -> tuple[PrecisionPlan, str]:
        """The plan the default should be now, and why (dwell time is applied by the caller)."""
        cur = plan_bits(self.default_plan)
        why_not_current = "itl_slo"
        for plan in self.ladder:  # best first
            up = plan_bits(plan) > cur
            margin = 1 - self.config.load_hysteresis if up else 1.0
            itl_ok = self.cost.predict(plan, batch) <= self.slo_itl_s * margin
            ttft_ok = (self.slo_ttft_s is None or not ctx.num_waiting
                       or self.predict_ttft(plan, batch, ctx) <= self.slo_ttft_s * margin)
            if itl_ok and ttft_ok:
                if up:
                    return plan, "headroom"
                if plan.name == self.default_plan.name:
                    return plan, self.reason
                return plan, why_not_current
            if plan.name == self.default_plan.name:
                why_not_current = "itl_slo" if not itl_ok else "ttft_slo"
        preds = [(self.cost.predict(p, batch), p) for p in self.ladder]
        fastest = min(t for t, _ in preds)
        near = [p for t, p in preds if t <= fastest * (1 + TIE)]
        if any(p.name == self.default_plan.name for p in near):
            return self.default_plan, "overload"  # no flapping between near-equal plans while overloaded
        return max(near, key=plan_bits), "overload"

    # ------------------------------------------------------------------ visibility

    @property
    def predicted_itl_s(self) -> float:
        """Predicted inter-token latency of the default plan at the last expected batch."""
        return self.cost.predict(self.default_plan, self.last_batch)

    def report(self) -> dict[str, Any]:
        cfg = self.config
        ctx = self.last_ctx
        return {
            "policy": self.name,
            "default": self.default_plan.name,
            "ceiling": self.ceiling.name,
            "ladder": [p.name for p in self.ladder],
            "slo_itl_ms": cfg.slo_itl_ms,
            "slo_ttft_ms": cfg.slo_ttft_ms,
            "dwell_s": cfg.load_dwell_s,
            "hysteresis": cfg.load_hysteresis,
            "reason": self.reason,
            "switches": self.num_switches,
            "expected_batch": self.last_batch,
            "load": None if ctx is None else {"running": ctx.num_running, "waiting": ctx.num_waiting,
                                              "kv_usage": round(ctx.kv_usage, 4),
                                              "mean_itl_ms": None if ctx.mean_itl_s is None else round(ctx.mean_itl_s * 1e3, 2)},
            "predicted_itl_ms": round(self.predicted_itl_s * 1e3, 3),
            "recent_switches": list(self.history)[-16:],
            "cost_model": self.cost.report([self.last_batch]),
        }


def replay_trace(policy: LoadPolicy, trace: Iterable[Sequence[float]]) -> list[str]:
    """Feed a recorded load trace to `policy`; the default plan name after each row.

    Rows are `(t, num_running, num_waiting, kv_usage[, step_seconds])`: the policy's clock reads `t`;
    with `step_seconds`, one decode step of the whole batch at the default plan is observed.
    """
    out = []
    clock_before = policy.clock
    try:
        for i, row in enumerate(trace):
            t, running, waiting, kv = float(row[0]), int(row[1]), int(row[2]), float(row[3])
            policy.clock = lambda t=t: t
            policy.begin_step(StepContext(i, running, waiting, kv, None))
            if len(row) > 4 and running > 0:
                plan = policy.default_plan
                policy._segments, policy._num_seqs, policy._decoding = {plan.name: [plan, running]}, running, running
                policy.end_step(running, float(row[4]))
            out.append(policy.default_plan.name)
    finally:
        policy.clock = clock_before
    return out
