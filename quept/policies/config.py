"""Options of the adaptive precision policies (`quept serve --policy load|entropy|load+entropy`).

One frozen dataclass for every policy, so that the server can pass the same options whatever
policy it runs (each policy reads the fields it needs). The server fills it from its settings
(`--slo-itl-ms` or `QUEPT_SLO_ITL_MS`, ...); tests and benchmarks build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class PolicyConfig:
    slo_itl_ms: float = 100.0
    """load: the inter-token latency objective; the policy picks the best plan whose predicted p95 step time meets it."""

    slo_ttft_ms: float | None = None
    """load: optional time-to-first-token objective for the newest waiting request (queue wait + prefill)."""

    load_plans: str = ""
    """load: comma list of candidate plans (wB or mixed:X). Empty: every stored width and stored profile
    between `load_floor` and the server's default precision (the default is the ceiling)."""

    load_floor: str = "w4"
    """load: the lowest width the policy moves the default to."""

    load_dwell_s: float = 2.0
    """load: minimum seconds between two changes of the default plan (stops flapping)."""

    load_hysteresis: float = 0.15
    """load: a higher plan is taken only when its prediction is below (1 - hysteresis) x SLO."""

    load_quantile: float = 0.95
    """load: quantile of the live measured/profiled step-time ratio used for predictions (0.95 for a p95 SLO)."""

    kv_full: float = 0.95
    """load: KV-cache usage at which the waiting queue is assumed not to join the batch."""

    profile_batches: str = ""
    """load: batch sizes profiled at start-up (comma list). Empty: 1, 2, 4, ... up to max_batch, and max_batch."""

    profile_context: int = 64
    """load: context tokens per sequence while profiling."""

    profile_reps: int = 5
    """load: timed forwards per (plan, batch) cell; the median is kept."""

    max_batch: int = 16
    """The engine's max_batch (the largest batch the cost model must predict)."""

    entropy_threshold: float | None = None
    """entropy: next-token entropy (nats) above which a sequence steps up. None: the checkpoint's calibration
    (elastic.json `entropy_policy`), else a quick calibration on valid.txt at start-up."""

    entropy_percentile: float = 80.0
    """entropy: percentile of next-token entropy at the high width used when calibrating the threshold."""

    entropy_low: str = "w4"
    """entropy: the plan quiet tokens run at."""

    entropy_high: str = ""
    """entropy: the plan a sequence steps up to (empty: the server's default precision)."""

    entropy_window: int = 4
    """entropy: quiet tokens (entropy below the threshold) before a sequence steps back down."""

    def __post_init__(self) -> None:
        if self.slo_itl_ms <= 0:
            raise ValueError(f"slo_itl_ms must be > 0, got {self.slo_itl_ms}")
        if self.slo_ttft_ms is not None and self.slo_ttft_ms <= 0:
            raise ValueError(f"slo_ttft_ms must be > 0, got {self.slo_ttft_ms}")
        if self.load_dwell_s < 0:
            raise ValueError(f"load_dwell_s must be >= 0, got {self.load_dwell_s}")
        if not 0 <= self.load_hysteresis < 1:
            raise ValueError(f"load_hysteresis must be in [0, 1), got {self.load_hysteresis}")
        if not 0 < self.load_quantile <= 1:
            raise ValueError(f"load_quantile must be in (0, 1], got {self.load_quantile}")
        if not 0 < self.kv_full <= 1:
            raise ValueError(f"kv_full must be in (0, 1], got {self.kv_full}")
        if self.max_batch < 1 or self.profile_reps < 1 or self.profile_context < 1:
            raise ValueError("max_batch, profile_reps and profile_context must be >= 1")
        if self.entropy_window < 1:
            raise ValueError(f"entropy_window must be >= 1, got {self.entropy_window}")
        if not 0 < self.entropy_percentile < 100:
            raise ValueError(f"entropy_percentile must be in (0, 100), got {self.entropy_percentile}")
        if self.entropy_threshold is not None and self.entropy_threshold < 0:
            raise ValueError(f"entropy_threshold must be >= 0 nats, got {self.entropy_threshold}")

    @classmethod
    def from_options(cls, config: "PolicyConfig | None" = None, **options: Any) -> "PolicyConfig":
        """`config` with `options` applied; an unknown option names the allowed ones."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise ValueError(f"unknown policy option(s) {bad}; allowed: {sorted(known)}")
        base = config or cls()
        values = {f.name: getattr(base, f.name) for f in fields(cls)}
        values.update({k: v for k, v in options.items() if v is not None or k in ("slo_ttft_ms", "entropy_threshold")})
        return cls(**values)

    def batches(self) -> list[int]:
        """Batch sizes to profile."""
        if self.profile_batches.strip():
            out = sorted({int(b) for b in self.profile_batches.split(",") if b.strip()})
            if not out or out[0] < 1:
                raise ValueError(f"profile_batches {self.profile_batches!r}: expected positive integers")
            return out
        out, b = [], 1
        while b < self.max_batch:
            out.append(b)
            b *= 2
        return out + [self.max_batch]
