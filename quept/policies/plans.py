"""Plan helpers shared by the adaptive policies: quality order, `auto` bounds, the load ladder, width shares.

Quality order: a plan with more real bits per weight is better (uniform `wB` has B bits; a mixed
profile its parameter-weighted average). A request's `auto;min=wA;max=wB` bounds hold per linear:
a plan is inside them when every linear's width is in [A, B], so a mixed plan with one linear
below the floor is outside even when its average is not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from quept.errors import PrecisionError
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec

log = logging.getLogger(__name__)


def plan_bits(plan: PrecisionPlan) -> float:
    """Real bits per weight of a plan (its quality rank)."""
    if plan.avg_bits is not None:
        return float(plan.avg_bits)
    if plan.uniform_bits is not None:
        return float(plan.uniform_bits)
    if plan.per_linear:
        return sum(plan.per_linear) / len(plan.per_linear)
    return 8.0


def is_managed(spec: PrecisionSpec | None) -> bool:
    """Whether the policy chooses this request's plan (no spec, or `auto`); `wB` and `mixed:X` run as asked."""
    return spec is None or spec.kind == "auto"


def plan_widths(plan: PrecisionPlan) -> set[int]:
    if plan.per_linear is not None:
        return set(plan.per_linear)
    return {int(plan.uniform_bits or 8)}


def within_bounds(plan: PrecisionPlan, spec: PrecisionSpec | None) -> bool:
    if spec is None or spec.kind != "auto":
        return True
    widths = plan_widths(plan)
    if spec.min_bits is not None and min(widths) < spec.min_bits:
        return False
    if spec.max_bits is not None and max(widths) > spec.max_bits:
        return False
    return True


def clamp(plan: PrecisionPlan, spec: PrecisionSpec | None, ladder: Sequence[PrecisionPlan],
          widths: Sequence[int]) -> PrecisionPlan:
    """`plan` when it is inside the request's bounds; else the nearest plan inside them.

    Candidates are the ladder plans inside the bounds plus the bound itself (`w{max}` when `plan` is
    too high, the smallest stored width >= min when it is too low). Too high: the best candidate not
    better than `plan`; too low: the worst candidate not worse than `plan` (else the nearest one).
    """
    if within_bounds(plan, spec):
        return plan
    assert spec is not None
    q = plan_bits(plan)
    inside = [p for p in ladder if within_bounds(p, spec)]
    if spec.max_bits is not None and max(plan_widths(plan)) > spec.max_bits:
        candidates = inside + [PrecisionPlan.uniform(int(spec.max_bits))]
        lower = [p for p in candidates if plan_bits(p) <= q]
        return max(lower, key=plan_bits) if lower else min(candidates, key=plan_bits)
    lo = int(spec.min_bits)  # type: ignore[arg-type]
    candidates = inside + [PrecisionPlan.uniform(min(w for w in widths if w >= lo))]
    higher = [p for p in candidates if plan_bits(p) >= q]
    return min(higher, key=plan_bits) if higher else max(candidates, key=plan_bits)


def parse_plan_list(model: Any, text: str) -> list[PrecisionPlan]:
    """Plans of a comma list such as `w8,w6,mixed:4.5` (errors name the bad entry)."""
    plans = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        spec = model.parse(part)
        if spec.kind == "auto":
            raise PrecisionError(f"plan list {text!r}: {part!r} is not a concrete plan (wB or mixed:X)")
        plans.append(model.plan_for(spec))
    return plans


def stored_profiles(model: Any) -> list[PrecisionPlan]:
    """The checkpoint's stored mixed profiles as plans (none when the model has no checkpoint or table)."""
    ckpt = getattr(model, "ckpt", None)
    profiles = (getattr(ckpt, "meta", None) or {}).get("profiles") or {}
    out = []
    for name in sorted(profiles) if isinstance(profiles, dict) else []:
        try:
            out.append(model.plan_for(name))
        except (PrecisionError, ImportError, NotImplementedError, ValueError) as err:
            log.warning("profile %s left out of the load ladder: %s", name, err)
    return out


def build_ladder(model: Any, plans_text: str, floor_text: str, ceiling: PrecisionPlan) -> list[PrecisionPlan]:
    """Candidate default plans, best first: the given list, or stored widths and profiles in [floor, ceiling]."""
    if plans_text.strip():
        ladder = parse_plan_list(model, plans_text)
    else:
        floor = plan_bits(parse_plan_list(model, floor_text)[0])
        top = plan_bits(ceiling)
        ladder = [PrecisionPlan.uniform(b) for b in model.widths if floor <= b <= top]
        ladder += [p for p in stored_profiles(model) if floor <= plan_bits(p) <= top]
        if ceiling not in ladder:
            ladder.append(ceiling)
    unique: dict[str, PrecisionPlan] = {p.name: p for p in ladder}
    out = sorted(unique.values(), key=plan_bits, reverse=True)
    if not out:
        raise PrecisionError(f"the load policy has no candidate plans (floor {floor_text}, ceiling {ceiling.name})")
    return out


def width_shares(model: Any, plan: PrecisionPlan) -> dict[int, float]:
    """Share of the elastic weights each width reads under `plan` (sums to 1).

    Uniform `wB` is {B: 1}; a mixed plan splits by parameter count per linear, so a token at
    `mixed:X` counts fractionally towards each width (metrics: tokens generated per width).
    """
    if plan.per_linear is None:
        return {int(plan.uniform_bits or 8): 1.0}
    try:
        from quept.precision.allocation import linear_params

        params = linear_params(model)
    except (ImportError, AttributeError):  # no checkpoint at hand: count linears instead of parameters
        params = [1] * len(plan.per_linear)
    total = float(sum(params))
    shares: dict[int, float] = {}
    for bits, p in zip(plan.per_linear, params):
        shares[int(bits)] = shares.get(int(bits), 0.0) + p / total
    return shares
