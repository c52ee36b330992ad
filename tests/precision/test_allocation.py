"""Mixed-precision allocation: exact DP over real bits, stored profiles, clear errors."""

from __future__ import annotations

import itertools

import pytest

from quept.errors import PrecisionError
from quept.precision.allocation import allocate, real_bits
from tests.build.test_calibration import calibrated  # noqa: F401  (module fixture)

WIDTHS = [8, 6, 5, 4, 3, 2]


def brute(kl, params, target):
    best = None
    for combo in itertools.product(range(len(WIDTHS)), repeat=len(params)):
        bits = [WIDTHS[i] for i in combo]
        if real_bits(bits, params) <= target + 1e-9:
            cost = sum(kl[j][i] for j, i in enumerate(combo))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, bits)
    return best


@pytest.mark.parametrize("target", [2.0, 2.7, 3.5, 4.4, 6.1, 8.0])
def test_allocate_matches_brute_force(target):
    params = [3, 1, 1, 8]  # parameter-weighted: the big linear dominates the average
    kl = [[0.0, 0.1, 0.3, 0.9, 2.0, 5.0], [0.0, 0.01, 0.02, 0.05, 0.1, 0.4],
          [0.0, 0.2, 0.5, 1.5, 3.0, 9.0], [0.0, 0.05, 0.1, 0.3, 1.0, 3.0]]
    got = allocate(kl, params, WIDTHS, target)
    assert real_bits(got, params) <= target + 1e-9
    cost, _ = brute(kl, params, target)
    assert abs(sum(kl[j][WIDTHS.index(b)] for j, b in enumerate(got)) - cost) < 1e-9


def test_allocate_below_smallest_width_fails():
    with pytest.raises(PrecisionError, match="below the smallest"):
        allocate([[0.0] * 6], [1], WIDTHS, 1.5)


def test_plan_for_target_without_table_is_a_clear_error(tmp_path):
    from quept.model.loader import load_model
    from tests.tiny import tiny_checkpoint

    lm = load_model(tiny_checkpoint(tmp_path / "ck"), backend="torch")
    with pytest.raises(PrecisionError, match="no sensitivity table"):
        lm.plan_for("mixed:3.5")


def test_plan_for_target_profiles_and_any_target(calibrated):  # noqa: F811
    import json

    from quept.model.loader import load_model

    lm = load_model(calibrated, backend="torch")
    meta = json.loads((calibrated / "elastic.json").read_text())
    plan = lm.plan_for("mixed:3.5")
    assert plan.name == "mixed:3.5" and list(plan.per_linear) == meta["profiles"]["mixed:3.5"]["per_linear"]
    for target in (2.0, 3.3, 4.75, 7.9, 8.0):
        p = lm.plan_for(f"mixed:{target}")
        assert p.name == f"mixed:{target:g}" and len(p.per_linear) == lm.model.n_linears
        assert p.avg_bits <= target + 1e-9 and set(p.per_linear) <= set(lm.widths)
    assert lm.plan_for("mixed:8").per_linear == (8,) * lm.model.n_linears
