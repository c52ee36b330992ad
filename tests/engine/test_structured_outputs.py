"""Grammars in the engine: constrained rows always produce what the grammar accepts, at every width and
mixed in one batch with free rows, whose tokens the constrained neighbours never change."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from quept.engine.engine import EngineConfig, EngineObserver, LLMEngine
from quept.engine.sampler import SamplingParams
from quept.engine.sequence import FinishReason, GenerationRequest
from quept.policies.fixed import FixedPolicy
from quept.structured.grammar import GrammarCompiler, GrammarSpec

pytestmark = pytest.mark.usefixtures("one_thread")

# bounded so that a random model ends it well inside max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "fox"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x"], "additionalProperties": False},
    },
    "required": ["kind", "ok", "tags", "pos"],
    "additionalProperties": False,
}
REGEX = "[ab]{2,4}-(yes|no)"


@pytest.fixture(scope="module")
def compiler(lm) -> GrammarCompiler:
    return GrammarCompiler(lm.tokenizer, lm.model.args.vocab_size, (lm.tokenizer.eos_token_id,))


class Preemptions(EngineObserver):
    def __init__(self) -> None:
        self.count = 0

    def on_preempted(self, seq) -> None:
        self.count += 1


def engine(lm, **kw) -> LLMEngine:
    return LLMEngine(lm.model, lm.tokenizer, FixedPolicy(lm, "w8"), EngineConfig(kv_cache_bytes=kw.pop("kv", 1 << 20),
                     **kw), Preemptions(), eos_ids=(lm.tokenizer.eos_token_id,))


def run(eng: LLMEngine, requests: list[GenerationRequest]) -> dict[tuple[str, int], tuple[list[int], str, str]]:
    """(request, index) -> (tokens, text, finish reason)."""
    for r in requests:
        eng.add_request(r)
    got: dict[tuple[str, int], tuple[list[int], list[str], str]] = {}
    for rid, outs in eng.run_to_completion().items():
        for o in outs:
            assert o.error is None, o.error
            toks, parts, _ = got.setdefault((rid, o.index), ([], [], ""))
            toks.extend(o.new_token_ids)
            parts.append(o.delta_text)
            if o.finished:
                got[(rid, o.index)] = (toks, parts, o.finish_reason.value)
    return {k: (t, "".join(p), f) for k, (t, p, f) in got.items()}


def check_schema_text(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def test_constrained_and_free_rows_in_one_batch_at_every_width(lm, compiler) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    prompt = tuple(lm.tokenizer("The capital of France is")["input_ids"])
    schema, regex = compiler.compile(GrammarSpec.json_schema(SCHEMA, "response_format")), \
        compiler.compile(GrammarSpec("regex", REGEX, "guided_regex"))
    reqs, free = [], []
    for bits in (8, 4, 3, 2):
        for k, grammar in enumerate((schema, regex, None)):
            sampling = SamplingParams(temperature=0.0 if k == 1 else 1.0, seed=seed + bits * 10 + k)
            r = GenerationRequest(f"w{bits}-{k}", prompt, 120, sampling, lm.parse(f"w{bits}"), grammar=grammar,
                                  ignore_eos=grammar is None, n=2 if k == 0 else 1)
            reqs.append(r)
            if grammar is None:
                free.append(r)
    got = run(engine(lm), reqs)
    for (rid, _), (_, text, reason) in got.items():
        k = int(rid.split("-")[1])
        if k == 0:
            check_schema_text(text)
            assert reason == "stop"
        elif k == 1:
            assert re.fullmatch(REGEX, text), text
            assert reason == "stop"
    assert {i for (rid, i) in got if rid.endswith("-0")} == {0, 1}
    # the free rows: the same tokens as in a batch of free rows only
    alone = run(engine(lm), free)
    for r in free:
        assert got[(r.request_id, 0)][0] == alone[(r.request_id, 0)][0], (seed, r.request_id)


def test_grammar_rows_equal_alone_under_preemption(lm, compiler) -> None:
    """Constrained greedy sequences give the same tokens in a KV budget that forces preemption as alone."""
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA, "response_format"))
    prompts = [tuple(lm.tokenizer(f"item {i}: the quick brown fox")["input_ids"]) for i in range(6)]
    reqs = [GenerationRequest(f"r{i}", p, 120, spec=lm.parse(f"w{(8, 4, 2)[i % 3]}"), grammar=grammar)
            for i, p in enumerate(prompts)]
    a = lm.model.args
    per_block = 2 * a.n_layers * 16 * a.n_kv_heads * a.head_dim * 4
    eng = engine(lm, kv=per_block * 12)
    got = run(eng, reqs)
    assert eng.observer.count > 0
    for r in reqs:
        alone = run(engine(lm), [r])[(r.request_id, 0)]
        assert got[(r.request_id, 0)] == alone
        check_schema_text(alone[1])


def test_grammar_completion_stops_without_eos_and_length_cuts_it(lm, compiler) -> None:
    grammar = compiler.compile(GrammarSpec.choice(["yes", "no"], "guided_choice"))
    prompt = tuple(lm.tokenizer("hello")["input_ids"])
    got = run(engine(lm), [GenerationRequest("c", prompt, 20, grammar=grammar, ignore_eos=True)])
    tokens, text, reason = got[("c", 0)]
    assert text in ("yes", "no") and reason == FinishReason.STOP.value
    assert lm.tokenizer.eos_token_id not in tokens
    long = compiler.compile(GrammarSpec("regex", "a{50}", "guided_regex"))
    tokens, text, reason = run(engine(lm), [GenerationRequest("l", prompt, 5, grammar=long)])[("l", 0)]
    assert reason == "length" and len(tokens) == 5 and set(text) == {"a"}


def test_a_grammar_that_fails_mid_way_ends_only_its_sequence(lm, compiler) -> None:
    """x{657444} compiles but exceeds the lexer's limits at its second token: that request ends with a
    grammar_error naming its field; its batch neighbour runs to the end."""
    bad = compiler.compile(GrammarSpec("regex", "x{657444}", "guided_regex"))
    prompt = tuple(lm.tokenizer("hello")["input_ids"])
    eng = engine(lm)
    eng.add_request(GenerationRequest("bad", prompt, 8, grammar=bad))
    eng.add_request(GenerationRequest("free", prompt, 8, ignore_eos=True))
    outs = eng.run_to_completion()
    last = outs["bad"][-1]
    assert last.error_code == "grammar_error" and last.error_param == "guided_regex"
    assert last.error.startswith("guided_regex: the grammar failed")
    assert sum(len(o.new_token_ids) for o in outs["free"]) == 8 and all(o.error is None for o in outs["free"])
    assert not eng.has_unfinished()
