from __future__ import annotations

import pytest

from quept.errors import PrecisionError
from quept.precision.spec import parse_spec

W = (8, 6, 5, 4, 3, 2)


@pytest.mark.parametrize("text,kind,value", [
    ("w8", "uniform", 8), ("W4", "uniform", 4), (" w2 ", "uniform", 2),
    ("mixed:3.5", "mixed", 3.5), ("mixed:8", "mixed", 8.0), ("auto", "auto", None),
])
def test_valid_specs(text, kind, value) -> None:
    spec = parse_spec(text, W)
    assert spec.kind == kind
    assert (spec.bits if kind == "uniform" else spec.target) == value


def test_auto_bounds_round_trip() -> None:
    spec = parse_spec("auto;min=w4;max=w8", W)
    assert (spec.min_bits, spec.max_bits) == (4, 8) and str(spec) == "auto;min=w4;max=w8"


@pytest.mark.parametrize("text,message", [
    ("w7", "width 7 is not stored; stored widths are w8, w6"),
    ("w9", "malformed precision"),
    ("fp16", "malformed precision 'fp16'"),
    ("mixed:9", "between 2 and 8"),
    ("mixed:abc", "malformed"),
    ("auto;min=w3;max=w2", "min=w3 is above max=w2"),
    ("auto;foo=w3", "bad auto bound"),
    ("auto;min=w7", "width 7 is not stored"),
    ("", "malformed"),
])
def test_bad_specs_name_the_problem(text, message) -> None:
    with pytest.raises(PrecisionError, match=message):
        parse_spec(text, W)


def test_non_string_spec() -> None:
    with pytest.raises(PrecisionError, match="must be a string"):
        parse_spec(4, W)  # type: ignore[arg-type]
