"""A stand-in for LoadedModel and Sequence, and a cost table, for policy tests without a model."""

from __future__ import annotations

from quept.engine.sequence import GenerationRequest, Sequence
from quept.policies import CostModel
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec, parse_spec

WIDTHS = (8, 6, 5, 4, 3, 2)
MIXED = {"mixed:5": (6, 4, 6, 4), "mixed:4.5": (6, 3, 5, 4)}  # 4 linears of equal size


class Model:
    """The slice of LoadedModel a policy uses (parse, plan_for, widths)."""

    widths = WIDTHS

    def parse(self, text: str) -> PrecisionSpec:
        return parse_spec(text, WIDTHS)

    def plan_for(self, spec: PrecisionSpec | str) -> PrecisionPlan:
        spec = self.parse(spec) if isinstance(spec, str) else spec
        if spec.kind == "uniform":
            return PrecisionPlan.uniform(int(spec.bits))
        name = f"mixed:{spec.target:g}"
        per = MIXED[name]
        return PrecisionPlan(name, per_linear=per, avg_bits=sum(per) / len(per))


def seq(rid: str = "r", spec: str | None = None, plan: str = "w8", max_tokens: int = 32, generated: int = 1) -> Sequence:
    """A decoding sequence (prompt computed, `generated` tokens out)."""
    m = Model()
    s = Sequence(GenerationRequest(rid, (1, 2, 3), max_tokens, spec=m.parse(spec) if spec else None),
                 m.plan_for(plan) if not plan.startswith("mixed") else m.plan_for(plan))
    for t in range(generated):
        s.append_token(5 + t, 0.0)
    s.num_computed = len(s.token_ids) - 1
    return s


# Step seconds per plan and batch: w8 is 10 ms + 4 ms per sequence, lower widths cheaper.
TABLE = {
    PrecisionPlan.uniform(8): {1: 0.014, 16: 0.074},
    PrecisionPlan.uniform(6): {1: 0.012, 16: 0.057},
    PrecisionPlan.uniform(5): {1: 0.011, 16: 0.049},
    PrecisionPlan.uniform(4): {1: 0.010, 16: 0.040},
}


def cost() -> CostModel:
    return CostModel.from_table(TABLE)
