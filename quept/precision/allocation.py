"""Mixed precision: a width per linear for a target average of real bits per weight (docs/architecture.md §3.4).

The checkpoint's sensitivity table holds, per linear (plan order) and per stored width, the
KL(p_fp ‖ p_q) measured with only that linear quantized. For a target average `X`, dynamic
programming picks one width per linear minimising the summed KL subject to

    sum_j params_j * bits_j  <=  X * sum_j params_j

i.e. real bits per weight weighted by parameter count, not by module. Stored profiles (built with
the checkpoint, with measured perplexity) are served as they are; any other target is allocated
on the fly from the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from quept.errors import PrecisionError
from quept.precision.plan import PrecisionPlan

if TYPE_CHECKING:
    from quept.model.loader import LoadedModel

MAX_UNITS = 4096  # budget resolution of the dynamic programme (parameter units)


def profile_name(target: float) -> str:
    return f"mixed:{target:g}"


def real_bits(per_linear: Sequence[int], params: Sequence[int]) -> float:
    """Parameter-weighted average bits per weight."""
    return float(sum(b * p for b, p in zip(per_linear, params)) / sum(params))


def allocate(kl: Sequence[Sequence[float]], params: Sequence[int], widths: Sequence[int], target: float) -> list[int]:
    """Widths per linear minimising sum KL with real bits <= target (exact on the parameter grid)."""
    widths = [int(b) for b in widths]
    if target >= max(widths):
        return [max(widths)] * len(params)
    if target < min(widths):
        raise PrecisionError(f"mixed target {target:g} is below the smallest stored width {min(widths)}")
    total = sum(params)
    unit = math.gcd(*[int(p) for p in params])
    unit = max(unit, math.ceil(total / MAX_UNITS))
    units = [max(1, round(p / unit)) for p in params]  # each linear's size in parameter units
    budget = int(math.floor(target * sum(units) + 1e-9))
    while True:
        choice = _dp(np.asarray(kl, dtype=np.float64), units, widths, budget)
        if choice is None:
            return [min(widths)] * len(params)
        if real_bits(choice, params) <= target + 1e-9 or budget <= min(widths) * sum(units):
            return choice
        budget -= 1  # rounding of sizes to units overshot the exact budget: tighten


def _dp(kl: np.ndarray, units: Sequence[int], widths: Sequence[int], budget: int) -> list[int] | None:
    """Min sum kl[j, i] over choices with sum units_j * widths_i <= budget."""
    inf = np.inf
    dp = np.zeros(budget + 1)  # best cost using at most c bit-units, no linears yet
    arg = np.zeros((len(units), budget + 1), dtype=np.int8)
    for j, u in enumerate(units):
        new = np.full(budget + 1, inf)
        for i, b in enumerate(widths):
            cost = b * u
            if cost > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[cost:] = dp[: budget + 1 - cost] + kl[j, i]
            better = cand < new
            new[better] = cand[better]
            arg[j, better] = i
        dp = new
    if not np.isfinite(dp[budget]):
        return None
    c, out = budget, []
    for j in range(len(units) - 1, -1, -1):
        i = int(arg[j, c])
        out.append(widths[i])
        c -= widths[i] * units[j]
    return out[::-1]


def linear_params(lm: "LoadedModel") -> list[int]:
    return [lm.ckpt.elastic[n].codes.numel() for n in lm.model.linear_names]


def plan_for_target(lm: "LoadedModel", target: float) -> PrecisionPlan:
    """The `mixed:X` plan: a stored profile when one matches, else a fresh allocation from the table."""
    meta: dict[str, Any] = lm.ckpt.meta
    name = profile_name(target)
    sens = meta.get("sensitivity")
    if not sens:
        raise PrecisionError(
            f"precision {name}: checkpoint {lm.ckpt.path} has no sensitivity table; "
            f"build it with `quept build --calibrate` or use one of {', '.join(f'w{b}' for b in lm.widths)}")
    names = list(lm.model.linear_names)
    if list(sens.get("linears", [])) != names:
        raise PrecisionError(f"precision {name}: the sensitivity table of {lm.ckpt.path} does not match its linears")
    params = linear_params(lm)
    profile = (meta.get("profiles") or {}).get(name)
    if profile and len(profile.get("per_linear", [])) == len(names):
        per_linear = [int(b) for b in profile["per_linear"]]
    else:
        per_linear = _cached_allocate(tuple(tuple(r) for r in sens["kl"]), tuple(params),
                                      tuple(int(b) for b in sens["widths"]), float(target))
    return PrecisionPlan(name=name, per_linear=tuple(per_linear), avg_bits=round(real_bits(per_linear, params), 4))


@lru_cache(maxsize=64)
def _cached_allocate(kl: tuple[tuple[float, ...], ...], params: tuple[int, ...], widths: tuple[int, ...],
                     target: float) -> list[int]:
    return allocate(kl, params, widths, target)
