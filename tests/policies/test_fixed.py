"""FixedPolicy: what each spec resolves to, and the errors for what it cannot run."""

from __future__ import annotations

import pytest

from quept.errors import PrecisionError
from quept.policies import POLICIES, FixedPolicy, make_controller, register_policy
from quept.policies.base import NO_MIXED_MESSAGE
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec, parse_spec

WIDTHS = (8, 6, 5, 4, 3, 2)


class Model:
    """The slice of LoadedModel a controller uses; `mixed` plans need the allocation module."""

    widths = WIDTHS

    def __init__(self, mixed_available: bool = False) -> None:
        self.mixed_available = mixed_available

    def parse(self, text: str) -> PrecisionSpec:
        return parse_spec(text, WIDTHS)

    def plan_for(self, spec: PrecisionSpec | str) -> PrecisionPlan:
        spec = self.parse(spec) if isinstance(spec, str) else spec
        if spec.kind == "uniform":
            return PrecisionPlan.uniform(int(spec.bits))
        if not self.mixed_available:
            raise ModuleNotFoundError("No module named 'quept.precision.allocation'")
        return PrecisionPlan(name=f"mixed:{spec.target:g}", per_linear=(8, 2), avg_bits=spec.target)


def test_uniform_default_and_auto():
    ctl = FixedPolicy(Model(), "w6")
    assert ctl.initial_plan(None) == PrecisionPlan.uniform(6)
    assert ctl.initial_plan(parse_spec("w2", WIDTHS)) == PrecisionPlan.uniform(2)
    assert ctl.initial_plan(parse_spec("auto", WIDTHS)).name == "w6"
    assert ctl.initial_plan(parse_spec("auto;max=w4", WIDTHS)).name == "w4"
    assert ctl.initial_plan(parse_spec("auto;min=w8", WIDTHS)).name == "w8"
    assert ctl.initial_plan(parse_spec("auto;min=w3;max=w8", WIDTHS)).name == "w6"


def test_mixed_without_allocation_is_a_clear_precision_error():
    ctl = FixedPolicy(Model(), "w8")
    with pytest.raises(PrecisionError, match=NO_MIXED_MESSAGE):
        ctl.initial_plan(parse_spec("mixed:3.5", WIDTHS))
    assert FixedPolicy(Model(mixed_available=True), "w8").initial_plan(parse_spec("mixed:3.5", WIDTHS)).name == "mixed:3.5"


def test_default_precision_must_be_concrete_and_valid():
    with pytest.raises(PrecisionError, match="must be concrete"):
        FixedPolicy(Model(), "auto")
    with pytest.raises(PrecisionError, match="w7"):
        FixedPolicy(Model(), "w7")


def test_registry_names_policies():
    assert isinstance(make_controller("fixed", Model(), "w8"), FixedPolicy)
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; choose one of \['fixed'"):
        make_controller("nope", Model(), "w8")

    class Other(FixedPolicy):
        name = "other"

    register_policy("other", Other)
    try:
        assert make_controller("other", Model(), "w4").name == "other"
    finally:
        POLICIES.pop("other")
