"""Width segments: a step's plans become, once, the rows every linear runs at each width."""

from __future__ import annotations

import random

import pytest
import torch

from quept.errors import PrecisionError
from quept.precision.plan import PrecisionPlan
from quept.precision.segments import StepWidths, WidthSegments, segments_of, step_widths

WIDTHS = (8, 6, 5, 4, 3, 2)


def expand(widths: int | WidthSegments, m: int) -> list[int]:
    """The width of every row in batch order, as a reference reads it."""
    if isinstance(widths, int):
        return [widths] * m
    assert sorted(widths.order.tolist()) == list(range(m))  # a permutation of the rows
    assert list(widths.bits) == sorted(set(widths.bits), reverse=True)  # each width once, widest first
    out = [0] * m
    for i, b in enumerate(widths.bits):
        assert widths.bounds[i] < widths.bounds[i + 1]  # no empty segment
        for row in widths.rows(i).tolist():
            out[row] = b
    assert widths.row_bits.tolist() == out
    return out


def test_one_width_is_an_int_and_many_are_segments() -> None:
    assert segments_of([4, 4, 4]) == 4
    segs = segments_of([4, 8, 4, 2])
    assert isinstance(segs, WidthSegments) and segs.bits == (8, 4, 2) and segs.bounds == (0, 1, 3, 4)
    assert segs.order.tolist() == [1, 0, 2, 3] and expand(segs, 4) == [4, 8, 4, 2]


def test_a_uniform_batch_is_one_int_for_every_linear() -> None:
    w = step_widths([PrecisionPlan.uniform(4)] * 3, [5, 1, 1], 9, [1, 1, 1])
    assert w == StepWidths.uniform(4, 9)


@pytest.mark.parametrize("seed", range(6))
def test_random_plans_give_each_row_its_sequences_width(seed: int) -> None:
    rng = random.Random(seed)
    n_linears = rng.randint(1, 12)
    plans = []
    for i in range(rng.randint(1, 6)):
        if rng.random() < 0.5:
            plans.append(PrecisionPlan.uniform(rng.choice(WIDTHS)))
        else:
            plans.append(PrecisionPlan(f"p{i}", per_linear=tuple(rng.choice(WIDTHS) for _ in range(n_linears))))
    rows = [rng.randint(1, 7) for _ in plans]
    samples = [rng.random() < 0.7 for _ in plans]
    w = step_widths(plans, rows, n_linears, [int(s) for s in samples])
    assert len(w.linears) == n_linears
    for j, widths in enumerate(w.linears):
        want = [p.widths(n_linears)[j] for p, n in zip(plans, rows) for _ in range(n)]
        assert expand(widths, sum(rows)) == want
    want_head = [p.widths(n_linears)[-1] for p, s in zip(plans, samples) if s]
    if want_head:
        assert expand(w.head, len(want_head)) == want_head
    every = step_widths(plans, rows, n_linears)  # every row's logits: the head reads the last linear's rows
    assert every.head is every.linears[-1]


def test_linears_with_the_same_row_widths_share_one_segments_object() -> None:
    """Two uniform plans in one batch: every linear reads the same grouping, built once (a backend
    converts it to its own form once per step, not once per linear)."""
    w = step_widths([PrecisionPlan.uniform(8), PrecisionPlan.uniform(4)], [3, 2], 211, [1, 1])
    assert len({id(x) for x in w.linears}) == 1 and isinstance(w.linears[0], WidthSegments)
    made = []
    for x in w.linears:
        x.form("test", lambda s: made.append(s) or object())
    assert len(made) == 1


def test_no_sampling_row_leaves_the_head_a_width() -> None:
    w = step_widths([PrecisionPlan.uniform(8), PrecisionPlan.uniform(4)], [3, 2], 4, [0, 0])
    assert w.head == 8


def test_a_plan_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(PrecisionError, match="has 3 widths for 4 linears"):
        step_widths([PrecisionPlan.uniform(8), PrecisionPlan("p", per_linear=(8, 4, 2))], [1, 1], 4)
    assert torch.equal(segments_of([2, 8]).order, torch.tensor([1, 0]))
