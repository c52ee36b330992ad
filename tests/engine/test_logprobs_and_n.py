"""Logprobs, prompt logprobs, scoring-only requests and n > 1 in the engine (tiny random checkpoint)."""

from __future__ import annotations

import pytest
import torch

from quept.engine.block_manager import SequenceBlocks
from quept.engine.engine import EngineConfig, EngineObserver, LLMEngine
from quept.engine.sampler import SamplingParams
from quept.engine.sequence import FinishReason, GenerationRequest
from quept.eval.perplexity import window_nll
from quept.model.runner import score_sequence
from quept.precision.plan import PrecisionPlan

pytestmark = pytest.mark.usefixtures("one_thread")


class Prefill(EngineObserver):
    def __init__(self) -> None:
        self.rows = 0

    def on_prefill(self, rows: int) -> None:
        self.rows += rows


def engine(lm, observer=None, **kw) -> LLMEngine:
    return LLMEngine.from_loaded(lm, EngineConfig(kv_cache_bytes=kw.pop("kv", 1 << 20), **kw), observer=observer)


def random_ids(lm, n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, lm.model.args.vocab_size, (n,), generator=g).tolist())


def req(lm, rid, ids, bits, max_tokens, **kw) -> GenerationRequest:
    return GenerationRequest(rid, tuple(ids), max_tokens, spec=lm.parse(f"w{bits}"), ignore_eos=True, **kw)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_equal_window_nll(lm, bits, chunk):
    """Scoring through the engine (max_tokens 0, prompt logprobs) is `quept eval`'s window NLL, with the
    prompt prefilled in one step or in chunks of 7 rows beside another sequence."""
    window = torch.tensor(random_ids(lm, 45, seed=bits + chunk))
    eng = engine(lm, max_batched_tokens=chunk, max_batch=min(chunk, 16))
    eng.add_request(req(lm, "busy", random_ids(lm, 9, 1), 4, 30))  # another sequence in the same steps
    eng.add_request(req(lm, "score", window.tolist(), bits, 0, prompt_logprobs=0))
    outs = eng.run_to_completion()["score"]
    [out] = outs
    assert out.finished and out.request_finished and out.finish_reason is FinishReason.LENGTH
    assert out.new_token_ids == [] and out.num_output_tokens == 0
    lps = out.prompt_logprobs
    assert lps[0] is None and len(lps) == len(window)
    assert [lp.token_id for lp in lps[1:]] == window[1:].tolist()
    nll, count = window_nll(lm.model, window, PrecisionPlan.uniform(bits))
    assert count == len(lps) - 1
    assert -sum(lp.logprob for lp in lps[1:]) == pytest.approx(nll, rel=1e-4)


def test_top_prompt_logprobs_are_the_most_likely_tokens(lm):
    ids = random_ids(lm, 12, seed=3)
    eng = engine(lm)
    eng.add_request(req(lm, "s", ids, 8, 0, prompt_logprobs=3))
    [out] = eng.run_to_completion()["s"]
    logp = torch.log_softmax(score_sequence(lm.model, list(ids), PrecisionPlan.uniform(8)).float(), -1)
    for p, lp in enumerate(out.prompt_logprobs[1:]):
        values, top = logp[p].topk(3)
        assert [t for t, _ in lp.top] == top.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert lp.logprob == pytest.approx(float(logp[p, ids[p + 1]]), abs=1e-5)


def test_generated_logprobs_are_raw_model_logprobs_of_the_same_forward(lm):
    """Greedy at w4: each token's logprob is the max of log_softmax over the logits of its row (before
    temperature), and the cumulative logprob sums them."""
    ids = random_ids(lm, 10, seed=5)
    eng = engine(lm)
    eng.add_request(req(lm, "g", ids, 4, 6, logprobs=2, sampling=SamplingParams(temperature=0.0)))
    outs = eng.run_to_completion()["g"]
    lps = [lp for o in outs for lp in o.logprobs]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert [lp.token_id for lp in lps] == tokens
    full = list(ids) + tokens
    logp = torch.log_softmax(score_sequence(lm.model, full, PrecisionPlan.uniform(4)).float(), -1)
    for k, lp in enumerate(lps):
        row = logp[len(ids) - 1 + k]
        assert lp.logprob == pytest.approx(float(row.max()), abs=2e-3)  # decode vs one forward: float sums differ
        assert lp.top[0][0] == tokens[k] and len(lp.top) == 2
    assert outs[-1].cumulative_logprob == pytest.approx(sum(lp.logprob for lp in lps), abs=1e-6)


def test_requests_without_logprobs_carry_none(lm):
    eng = engine(lm)
    eng.add_request(req(lm, "plain", random_ids(lm, 6, 2), 8, 3))
    outs = eng.run_to_completion()["plain"]
    assert all(o.logprobs is None and o.prompt_logprobs is None and o.cumulative_logprob is None for o in outs)


def test_prompt_logprobs_survive_preemption(lm):
    """A sequence preempted mid-prompt recomputes it: its prompt logprobs are neither lost nor doubled."""
    ids = random_ids(lm, 40, seed=9)  # 10 blocks of 4
    eng = engine(lm, block_size=4, max_batched_tokens=8, max_batch=4)
    hog = SequenceBlocks()
    eng.blocks.reserve(hog, (eng.blocks.num_free_blocks - 16) * 4)  # 16 blocks left: not enough for both
    eng.add_request(req(lm, "other", random_ids(lm, 20, 4), 8, 30))  # 13 blocks by its end, and older
    eng.add_request(req(lm, "score", ids, 8, 2, prompt_logprobs=0))
    outs = eng.run_to_completion()
    assert eng.scheduler.num_preemptions > 0
    lps = [o.prompt_logprobs for o in outs["score"] if o.prompt_logprobs is not None]
    assert len(lps) == 1 and len(lps[0]) == len(ids)
    nll, _ = window_nll(lm.model, torch.tensor(ids), PrecisionPlan.uniform(8))
    assert -sum(lp.logprob for lp in lps[0][1:]) == pytest.approx(nll, rel=1e-4)


@pytest.mark.parametrize("prompt_len", [16, 21])  # a prompt filling whole blocks, and one with a partial block
def test_n_sampled_completions_share_one_prefill(lm, prompt_len):
    obs = Prefill()
    eng = engine(lm, observer=obs, block_size=16)
    ids = random_ids(lm, prompt_len, seed=prompt_len)
    sampling = SamplingParams(temperature=1.0, seed=1234)
    eng.add_request(req(lm, "n4", ids, 8, 12, n=4, sampling=sampling, logprobs=0))
    outs = eng.run_to_completion()["n4"]
    assert obs.rows == prompt_len  # one prefill for four completions
    by_index: dict[int, list[int]] = {}
    for o in outs:
        by_index.setdefault(o.index, []).extend(o.new_token_ids)
    assert sorted(by_index) == [0, 1, 2, 3]
    assert all(len(t) == 12 for t in by_index.values())
    assert len({tuple(t) for t in by_index.values()}) == 4
    assert [o.request_finished for o in outs].count(True) == 1 and outs[-1].request_finished
    assert eng.blocks.usage == 0.0 and not eng.has_unfinished()
    # each completion is what its own sequence would give: re-score it from scratch and compare logprobs
    for index, toks in by_index.items():
        lps = [lp for o in outs if o.index == index for lp in o.logprobs]
        logp = torch.log_softmax(score_sequence(lm.model, list(ids) + toks, PrecisionPlan.uniform(8)).float(), -1)
        expect = [float(logp[prompt_len - 1 + k, t]) for k, t in enumerate(toks)]
        assert [lp.logprob for lp in lps] == pytest.approx(expect, abs=2e-3)


def test_n_greedy_completions_are_identical_and_seeds_repeat(lm):
    eng = engine(lm)
    ids = random_ids(lm, 11, seed=7)
    eng.add_request(req(lm, "g", ids, 4, 8, n=4))
    got: dict[int, list[int]] = {}
    for o in eng.run_to_completion()["g"]:
        got.setdefault(o.index, []).extend(o.new_token_ids)
    assert len(got) == 4 and len({tuple(t) for t in got.values()}) == 1

    def sampled(seed):
        eng.add_request(req(lm, "s", ids, 4, 8, n=3, sampling=SamplingParams(temperature=1.0, seed=seed)))
        out: dict[int, list[int]] = {}
        for o in eng.run_to_completion()["s"]:
            out.setdefault(o.index, []).extend(o.new_token_ids)
        return out

    assert sampled(5) == sampled(5)
    assert sampled(5) != sampled(6)


def test_abort_ends_every_copy(lm):
    eng = engine(lm, block_size=4)
    ids = random_ids(lm, 6, seed=2)  # a partial last block: each fork copies it into a fresh block
    eng.add_request(req(lm, "a", ids, 8, 40, n=3, sampling=SamplingParams(temperature=1.0, seed=1)))
    outs = []
    while not any(o.index == 2 for o in outs):
        outs += eng.step()
    assert eng.num_unfinished == 1 and eng.scheduler.num_running == 3
    aborted = eng.abort("a")
    assert sorted(o.index for o in aborted) == [0, 1, 2]
    assert all(o.finish_reason is FinishReason.ABORT for o in aborted)
    assert [o.request_finished for o in aborted] == [False, False, True]
    assert eng.blocks.usage == 0.0 and not eng.has_unfinished()


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_fork_without_a_free_block_recomputes_its_prompt(lm, prefix_caching):
    obs = Prefill()
    eng = engine(lm, observer=obs, block_size=4, prefix_caching=prefix_caching)
    ids = random_ids(lm, 6, seed=2)  # 2 blocks, the second partial
    hog = SequenceBlocks()
    eng.blocks.reserve(hog, (eng.blocks.num_free_blocks - 2) * 4)  # leave the prefill its 2 blocks, no more
    eng.add_request(req(lm, "a", ids, 8, 5, n=3))
    outs = eng.step()  # prefill, first tokens; the forks find no block and wait
    assert sorted(o.index for o in outs) == [0, 1, 2]
    assert eng.scheduler.num_running == 1 and eng.scheduler.num_waiting == 2
    eng.blocks.free(hog)
    outs += [o for group in eng.run_to_completion().values() for o in group]
    # the parent's prefill and two recomputes; with the cache, those take the full first block from it
    assert obs.rows == (len(ids) + 2 * 2 if prefix_caching else 3 * len(ids))
    got: dict[int, list[int]] = {}
    for o in outs:
        got.setdefault(o.index, []).extend(o.new_token_ids)
    assert len(got[0]) == 5 and got[0] == got[1] == got[2]  # greedy: the recomputed copies agree
    assert eng.blocks.usage == 0.0


def test_bad_requests(lm):
    ids = random_ids(lm, 4, seed=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        GenerationRequest("x", ids, 4, n=0)
    with pytest.raises(ValueError, match="logprobs must be >= 0"):
        GenerationRequest("x", ids, 4, logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        GenerationRequest("x", ids, 4, prompt_logprobs=-2)
    with pytest.raises(ValueError, match="takes n = 1"):
        GenerationRequest("x", ids, 0, n=2)
