"""The `entropy` policy (FlexQuant-style): a sequence decodes low and steps up while the model is unsure.

Every sequence the policy manages (no precision, or `auto`) starts at the low plan
(`entropy_low`, w4 by default). After each sampled token, the next-token entropy of the logits
that produced it is compared with a threshold: above it, the sequence runs its next tokens at the
high plan (`entropy_high`, the server's default precision); after `entropy_window` tokens in a row
below the threshold it steps back down. Plans are clamped into each request's `auto;min;max`
bounds; `wB` and `mixed:X` requests run as asked. The KV cache stays valid across switches: each
position keeps the K/V computed at the width it ran at, exactly as a reference run that switches
the same way (`generate.generate` with a per-step plan function).

The threshold (nats) is given (`--entropy-threshold`), or read from the checkpoint's
`elastic.json` (`entropy_policy`, written by `calibrate_threshold` + `save_calibration`: a
percentile of teacher-forced next-token entropy at the high width on valid.txt), or calibrated at
start-up on a few windows of valid.txt when the checkpoint has none.

Switch reasons: `entropy_high` (stepped up), `entropy_quiet` (stepped down after the quiet window).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from quept.policies.base import Controller, PlanDecision, StepContext
from quept.policies.config import PolicyConfig
from quept.policies.plans import clamp, is_managed, plan_bits
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec

if TYPE_CHECKING:
    from quept.engine.sequence import Sequence as Seq

log = logging.getLogger(__name__)

FALLBACK_THRESHOLD = 2.5  # nats, only when neither a flag, the checkpoint nor valid.txt gives one
META_KEY = "entropy_policy"


def row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Next-token entropy in nats of every row of logits [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyGate:
    """Per-sequence high/low state: up when entropy > threshold, down after `window` quiet tokens."""

    def __init__(self, threshold: float, window: int) -> None:
        self.threshold = float(threshold)
        self.window = int(window)
        self._state: dict[str, list[Any]] = {}  # request id -> [high, quiet tokens, sequence]
        self.observed = 0
        self.above = 0

    def is_high(self, seq: "Seq") -> bool:
        st = self._state.get(seq.request_id)
        return bool(st and st[0])

    def update(self, seq: "Seq", value: float) -> None:
        st = self._state.setdefault(seq.request_id, [False, 0, seq])
        self.observed += 1
        if value > self.threshold:
            self.above += 1
            st[0], st[1] = True, 0
        elif st[0]:
            st[1] += 1
            if st[1] >= self.window:
                st[0], st[1] = False, 0

    def prune(self) -> None:
        """Forget finished sequences."""
        for rid in [r for r, st in self._state.items() if st[2].is_finished]:
            del self._state[rid]

    def stats(self) -> dict[str, Any]:
        return {"threshold_nats": round(self.threshold, 4), "window": self.window, "tokens_observed": self.observed,
                "share_above": round(self.above / self.observed, 4) if self.observed else None,
                "sequences_tracked": len(self._state)}


class EntropyPolicy(Controller):
    name = "entropy"
    needs_logits = True

    def __init__(self, model: Any, default_precision: str = "w8", *, config: PolicyConfig | None = None,
                 **options: Any) -> None:
        super().__init__(model, default_precision)
        self.config = cfg = PolicyConfig.from_options(config, **options)
        self.high = self.resolve(model.parse(cfg.entropy_high)) if cfg.entropy_high else self.default_plan
        self.low = self.resolve(model.parse(cfg.entropy_low))
        if plan_bits(self.low) > plan_bits(self.high):
            raise ValueError(f"entropy_low {self.low.name} is above entropy_high {self.high.name}")
        threshold, self.threshold_source = resolve_threshold(model, cfg, self.high)
        self.gate = EntropyGate(threshold, cfg.entropy_window)
        self.tokens = {"high": 0, "low": 0}
        log.info("entropy policy: %s, stepping up to %s above %.3f nats (%s), down after %d quiet tokens",
                 self.low.name, self.high.name, threshold, self.threshold_source, cfg.entropy_window)

    @property
    def ladder(self) -> list[PrecisionPlan]:
        return [self.high, self.low]

    def initial_plan(self, spec: PrecisionSpec | None) -> PrecisionPlan:
        if is_managed(spec):
            return clamp(self.low, spec, self.ladder, self.model.widths)
        return self.resolve(spec)  # type: ignore[arg-type]

    def begin_step(self, ctx: StepContext) -> None:
        if ctx.step % 64 == 0:
            self.gate.prune()

    def step_plan(self, seq: "Seq", ctx: StepContext) -> PlanDecision:
        spec = seq.request.spec
        if not is_managed(spec):
            return PlanDecision(seq.plan, "fixed")
        high = self.gate.is_high(seq)
        if seq.num_uncomputed == 1:
            self.tokens["high" if high else "low"] += 1
        plan = clamp(self.high if high else self.low, spec, self.ladder, self.model.widths)
        return PlanDecision(plan, "entropy_high" if high else "entropy_quiet")

    def observe(self, seq: "Seq", logits: torch.Tensor) -> None:
        if is_managed(seq.request.spec):
            self.gate.update(seq, float(row_entropy(logits)))

    def report(self) -> dict[str, Any]:
        return {"policy": self.name, "low": self.low.name, "high": self.high.name,
                "threshold_source": self.threshold_source, **self.gate.stats(), "decode_steps": dict(self.tokens)}


# ---------------------------------------------------------------------- thresholds


def resolve_threshold(model: Any, cfg: PolicyConfig, high: PrecisionPlan) -> tuple[float, str]:
    """(threshold nats, where it came from): the flag, the checkpoint, a start-up calibration, or a fallback."""
    if cfg.entropy_threshold is not None:
        return float(cfg.entropy_threshold), "given"
    meta = getattr(getattr(model, "ckpt", None), "meta", None) or {}
    rec = meta.get(META_KEY)
    if isinstance(rec, dict) and rec.get("threshold") is not None:
        return float(rec["threshold"]), f"checkpoint (p{rec.get('percentile')} at {rec.get('plan')})"
    from quept.data import calib_file

    valid = calib_file()
    if getattr(model, "tokenizer", None) is not None and hasattr(model, "model") and valid.is_file():
        rec = calibrate_threshold(model, valid, cfg.entropy_percentile, high, windows=1, seq_len=256)
        return float(rec["threshold"]), f"start-up calibration (p{cfg.entropy_percentile:g} at {high.name})"
    log.warning("entropy policy: no threshold given, none in the checkpoint and no %s; using %.2f nats",
                valid, FALLBACK_THRESHOLD)
    return FALLBACK_THRESHOLD, "fallback"


def window_entropies(lm: Any, windows: torch.Tensor, plan: PrecisionPlan) -> torch.Tensor:
    """Teacher-forced next-token entropies of every position of windows [W, L] at `plan` -> [W * L]."""
    from quept.model.runner import score_sequence

    return torch.cat([row_entropy(score_sequence(lm.model, w, plan)) for w in windows])  # [W * L]


def calibrate_threshold(lm: Any, path: Path, percentile: float, plan: PrecisionPlan, windows: int = 4,
                        seq_len: int = 256) -> dict[str, Any]:
    """The `percentile` of next-token entropy at `plan` over the first windows of `path` (a record for elastic.json)."""
    from quept.eval.perplexity import token_windows

    t0 = time.perf_counter()
    ents = window_entropies(lm, token_windows(lm.tokenizer, Path(path), windows, seq_len), plan)
    threshold = float(torch.quantile(ents.double(), percentile / 100.0))
    rec = {"threshold": round(threshold, 4), "percentile": percentile, "plan": plan.name, "file": str(path),
           "windows": windows, "seq_len": seq_len, "tokens": int(ents.numel()),
           "mean_entropy": round(float(ents.mean()), 4), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("entropy threshold: p%g of %d tokens at %s = %.3f nats", percentile, ents.numel(), plan.name, threshold)
    return rec


def save_calibration(checkpoint: Path, record: dict[str, Any]) -> None:
    """Store a calibration record in the checkpoint's elastic.json (`entropy_policy`)."""
    from quept.model.checkpoint import update_meta

    update_meta(Path(checkpoint), **{META_KEY: record})


# ---------------------------------------------------------------------- teacher-forced simulation


def simulate_window(lm: Any, window: torch.Tensor, low: PrecisionPlan, high: PrecisionPlan, threshold: float,
                    window_quiet: int) -> dict[str, Any]:
    """Score window [L] token by token under the entropy policy (teacher forcing): NLL, steps at high, seconds.

    The first token is a one-row prefill at the low plan; every next position runs at the plan the
    gate chose from the entropy of the previous position's logits, with the KV cache of earlier
    positions as they ran, exactly as the engine decodes.
    """
    from quept.model.runner import ModelRunner, SeqRows, StepBatch

    n = window.shape[0]
    runner, (table,) = ModelRunner.scratch(lm.model, 1, n, block_size=n)
    ids = window.tolist()
    gate = EntropyGate(threshold, window_quiet)
    probe = SimpleNamespace(request_id="simulated", is_finished=False)  # what the gate keys its state by
    n_high, nll, seconds = 0, 0.0, 0.0
    for pos in range(n - 1):
        high_on = gate.is_high(probe)  # type: ignore[arg-type]
        plan = high if high_on else low
        n_high += int(high_on)
        t0 = time.perf_counter()
        logits = runner.execute(StepBatch([SeqRows(ids[pos : pos + 1], pos, table, plan)]))[0]  # [V]
        logp = torch.log_softmax(logits.float(), -1)  # [V]
        gate.update(probe, float(-(logp.exp() * logp).sum()))  # type: ignore[arg-type]
        seconds += time.perf_counter() - t0  # the step and the policy's entropy, as the engine pays them
        nll -= float(logp[window[pos + 1]])
    return {"nll": nll, "tokens": n - 1, "high_steps": n_high, "seconds": seconds,
            "ppl": math.exp(nll / max(1, n - 1))}
