"""The token mask against a plain reference: a token is allowed iff the matcher can consume it."""

from __future__ import annotations

import random

import pytest
import torch

from quept.structured.bitmask import allowed, constrain
from quept.structured.grammar import GrammarSpec
from tests.tiny import TINY_VOCAB

SPECS = [
    GrammarSpec.json_schema({"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string",
                             "maxLength": 5}}, "required": ["n", "s"]}, "response_format"),
    GrammarSpec("json_object", "", "response_format"),
    GrammarSpec("regex", "(ab|c)+d?", "guided_regex"),
]


def reference(matcher) -> torch.Tensor:
    """Token t is allowed iff a copy of the matcher consumes it without an error."""
    return torch.tensor([matcher.deep_copy().consume_token(t) for t in range(TINY_VOCAB)])


@pytest.mark.parametrize("seed", [random.randrange(1 << 30) for _ in range(2)])
def test_mask_equals_the_reference_along_random_walks(compiler, seed) -> None:
    rng = random.Random(seed)
    matchers = [compiler.compile(s).matcher() for s in SPECS]
    for _ in range(8):
        got = allowed(matchers, TINY_VOCAB)
        for j, m in enumerate(matchers):
            ref = reference(m)
            assert torch.equal(got[j], ref), (seed, j)
            choices = ref.nonzero().flatten().tolist()
            if choices and not m.is_stopped():
                m.consume_token(rng.choice(choices))


def test_constrain_touches_only_forbidden_entries(compiler) -> None:
    m = compiler.compile(SPECS[2]).matcher()
    logits = torch.randn(1, TINY_VOCAB)
    before = logits.clone()
    constrain(logits, [m])
    ok = reference(m)
    assert torch.equal(logits[0, ok], before[0, ok])
    assert torch.isneginf(logits[0, ~ok]).all() and ok.sum() > 0
