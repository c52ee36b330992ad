"""Prefix caching in the engine: greedy tokens equal with and without the cache, at every mix of widths,
under preemption and eviction, for n > 1 and for a policy that switches plans between tokens."""

from __future__ import annotations

import random

import pytest

from quept.engine.engine import EngineConfig, EngineObserver, LLMEngine
from quept.engine.generate import generate
from quept.engine.sequence import GenerationRequest
from quept.policies.base import PlanDecision
from quept.policies.fixed import FixedPolicy
from quept.precision.plan import PrecisionPlan

pytestmark = pytest.mark.usefixtures("one_thread")


class Counts(EngineObserver):
    def __init__(self) -> None:
        self.prefill = self.queried = self.hit = 0

    def on_prefill(self, rows: int) -> None:
        self.prefill += rows

    def on_prefix_cache(self, queried: int, hit: int) -> None:
        self.queried += queried
        self.hit += hit


def engine(lm, controller=None, **kw) -> LLMEngine:
    return LLMEngine(lm.model, lm.tokenizer, controller or FixedPolicy(lm, "w8"),
                     EngineConfig(kv_cache_bytes=kw.pop("kv", 1 << 20), **kw), Counts(), eos_ids=())


def bytes_per_block(lm, block_size: int) -> int:
    a = lm.model.args
    return 2 * a.n_layers * block_size * a.n_kv_heads * a.head_dim * 4


def random_ids(rng: random.Random, lm, n: int) -> list[int]:
    return [rng.randrange(lm.model.args.vocab_size) for _ in range(n)]


def req(lm, rid: str, ids, bits: int, max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(rid, tuple(ids), max_tokens, spec=lm.parse(f"w{bits}"), ignore_eos=True, **kw)


def alone(lm, ids, bits: int, max_tokens: int) -> list[int]:
    return generate(lm.model, list(ids), PrecisionPlan.uniform(bits), max_tokens, kv_budget_bytes=1 << 20).tokens


def run(eng: LLMEngine, waves: list[list[GenerationRequest]], steps_between: int = 3) -> dict[tuple[str, int], list[int]]:
    """Add each wave after the previous one ran a few steps; the tokens of every (request, index)."""
    got: dict[tuple[str, int], list[int]] = {}
    for wave in waves:
        for r in wave:
            eng.add_request(r)
        for _ in range(steps_between):
            for o in eng.step():
                got.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
    for rid, outs in eng.run_to_completion().items():
        for o in outs:
            got.setdefault((rid, o.index), []).extend(o.new_token_ids)
    return got


def assert_all_returned(eng: LLMEngine) -> None:
    """Reference counts back to zero; every cached block evictable and named both ways."""
    bm = eng.blocks
    assert not any(bm._refs) and bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    index = bm._index
    assert {b: h for h, b in index.block_of.items()} == index.name_of
    assert set(index.evictable) == set(index.name_of)
    assert len(set(bm._free)) == len(bm._free) and not set(bm._free) & set(index.name_of)
    assert len(bm._free) + len(index.evictable) == bm.num_blocks


def test_a_shared_prefix_is_computed_once_per_width_and_tokens_equal_alone(lm):
    rng = random.Random(0)
    system = random_ids(rng, lm, 21)  # 5 full blocks of 4 and one token
    prompts = [system + random_ids(rng, lm, 3 + i) for i in range(4)]
    widths = [8, 4, 8, 2]
    refs = [alone(lm, p, b, 6) for p, b in zip(prompts, widths)]
    eng = engine(lm, block_size=4)
    first = [req(lm, "r0", prompts[0], 8, 6), req(lm, "r1", prompts[1], 4, 6)]
    later = [req(lm, f"r{i}", prompts[i], widths[i], 6) for i in (2, 3)]
    got = run(eng, [first, later])
    for i in range(4):
        assert got[(f"r{i}", 0)] == refs[i], i
    obs = eng.observer
    assert obs.hit == 20  # r2 (w8) took r0's 5 system blocks; r1 (w4) and r3 (w2) had no w4/w2 prefix cached
    assert obs.queried == sum(len(p) for p in prompts)
    assert obs.prefill == sum(len(p) for p in prompts) - 20
    assert_all_returned(eng)


def test_cache_on_and_off_agree_on_random_traffic(lm):
    """Many requests sharing prefixes at different widths, added in waves, with n > 1, prompt logprobs,
    chunked prefill, a cache small enough to preempt and evict: the same tokens as with the cache off,
    and as each request alone."""
    rng = random.Random(1234)
    prefixes = [random_ids(rng, lm, n) for n in (9, 17, 30)]
    waves: list[list[tuple]] = []
    for w in range(5):
        wave = []
        for i in range(5):
            ids = rng.choice(prefixes)[: rng.randrange(4, 31)] + random_ids(rng, lm, rng.randrange(0, 6))
            bits = rng.choice((8, 4, 3, 2))
            kw = {"n": 2} if rng.random() < 0.2 else {"prompt_logprobs": 0} if rng.random() < 0.1 else {}
            wave.append((f"w{w}r{i}", ids, bits, rng.randrange(1, 9), kw))
        waves.append(wave)
    longest = max(len(ids) + mt for wave in waves for _, ids, _, mt, _ in wave)
    kv = bytes_per_block(lm, 4) * (-(-longest // 4) + 4)  # the longest sequence and a little more
    results = []
    for caching in (True, False):
        eng = engine(lm, block_size=4, kv=kv, max_batched_tokens=24, max_batch=6, prefix_caching=caching)
        got = run(eng, [[req(lm, rid, ids, b, mt, **kw) for rid, ids, b, mt, kw in wave] for wave in waves])
        assert_all_returned(eng)
        results.append((got, eng))
    (on, eng_on), (off, eng_off) = results
    assert on == off
    assert eng_on.observer.hit > 0 and eng_off.observer.hit == 0
    assert eng_on.observer.prefill < eng_off.observer.prefill
    assert eng_on.scheduler.num_preemptions > 0  # the cache was under pressure
    for wave in waves:
        for rid, ids, b, mt, _ in wave:
            assert on[(rid, 0)] == alone(lm, ids, b, mt), rid


class Alternate(FixedPolicy):
    """Switches every sequence between w8 and w4 every 3 generated tokens (a per-token policy)."""

    name = "alternate"

    def step_plan(self, seq, ctx):
        return PlanDecision(PrecisionPlan.uniform(8 if (seq.num_output // 3) % 2 == 0 else 4), "test")


def test_a_policy_switching_plans_between_tokens_gives_the_same_tokens(lm):
    rng = random.Random(7)
    system = random_ids(rng, lm, 13)
    prompts = [system + random_ids(rng, lm, 2 + i) for i in range(4)]
    results = []
    for caching in (True, False):
        eng = engine(lm, Alternate(lm, "w8"), block_size=4, prefix_caching=caching)
        got = run(eng, [[req(lm, f"a{i}", prompts[i], 8, 14) for i in range(2)],
                        [req(lm, f"b{i}", prompts[i], 8, 6) for i in (2, 3)]])
        assert_all_returned(eng)
        results.append((got, eng.observer.hit))
    assert results[0][0] == results[1][0]
    assert results[0][1] >= 12  # the b requests found the system prompt's w8 blocks


def test_a_second_turn_reuses_the_first_turns_answer(lm):
    """Blocks of generated tokens are cached too: a follow-up prompt that repeats the answer finds them."""
    rng = random.Random(3)
    prompt = random_ids(rng, lm, 10)
    eng = engine(lm, block_size=4)
    eng.add_request(req(lm, "t1", prompt, 4, 12))
    answer = [t for o in eng.run_to_completion()["t1"] for t in o.new_token_ids]
    follow = prompt + answer + random_ids(rng, lm, 3)
    eng.add_request(req(lm, "t2", follow, 4, 5))
    got = [t for o in eng.run_to_completion()["t2"] for t in o.new_token_ids]
    assert got == alone(lm, follow, 4, 5)
    assert eng.observer.hit == 20  # the 21 tokens computed in turn one: 5 full blocks
    assert_all_returned(eng)


def test_kv_usage_counts_only_blocks_in_use(lm):
    rng = random.Random(5)
    eng = engine(lm, block_size=4)
    eng.add_request(req(lm, "a", random_ids(rng, lm, 16), 8, 2))
    eng.run_to_completion()
    stats = eng.stats()
    assert eng.blocks.num_cached_blocks == 4 and stats.kv_usage == 0.0 and stats.num_free_blocks == stats.num_blocks


def test_usage_reports_cached_prompt_tokens(lm):
    rng = random.Random(6)
    ids = random_ids(rng, lm, 9)
    eng = engine(lm, block_size=4)
    eng.add_request(req(lm, "a", ids, 8, 1))
    assert eng.run_to_completion()["a"][-1].num_cached_tokens == 0
    eng.add_request(req(lm, "b", ids, 8, 1))
    assert eng.run_to_completion()["b"][-1].num_cached_tokens == 8
