"""The `entropy` policy: steps up on high-entropy tokens and down after the quiet window; bounds; the
KV cache stays valid across switches (engine tokens == a reference run that switches the same way)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from quept.engine.engine import EngineConfig, LLMEngine
from quept.engine.generate import generate
from quept.engine.sequence import GenerationRequest
from quept.eval.perplexity import window_nll
from quept.model.loader import load_model
from quept.model.runner import score_sequence
from quept.policies import CostModel, EntropyPolicy, LoadPolicy, make_controller
from quept.policies.base import StepContext
from quept.policies.entropy_policy import calibrate_threshold, row_entropy, save_calibration, simulate_window
from quept.precision.plan import PrecisionPlan
from tests.policies.fakes import Model, cost, seq

PEAKED = torch.tensor([20.0] + [0.0] * 99)  # entropy ~ 0
FLAT = torch.zeros(100)  # entropy ln(100) = 4.6 nats
CTX = StepContext(0, 1, 0, 0.1, None)


def test_steps_up_on_high_entropy_and_down_after_the_quiet_window():
    pol = EntropyPolicy(Model(), "w8", entropy_threshold=1.0, entropy_window=2)
    assert pol.needs_logits and pol.low.name == "w4" and pol.high.name == "w8"
    s = seq("a", None, plan=pol.initial_plan(None).name)
    plans = []
    for logits in (PEAKED, FLAT, PEAKED, PEAKED, PEAKED, FLAT):
        d = pol.step_plan(s, CTX)
        plans.append((d.plan.name, d.reason))
        s.plan = d.plan
        pol.observe(s, logits)
    plans.append((pol.step_plan(s, CTX).plan.name, ""))
    assert [p for p, _ in plans] == ["w4", "w4", "w8", "w8", "w4", "w4", "w8"]
    assert plans[2][1] == "entropy_high" and plans[4][1] == "entropy_quiet"
    assert pol.report()["share_above"] == pytest.approx(2 / 6, abs=1e-3)


def test_bounds_and_explicit_precisions():
    pol = EntropyPolicy(Model(), "w8", entropy_threshold=1.0, entropy_window=2)
    m = Model()
    lo = seq("lo", "auto;min=w6")
    hi = seq("hi", "auto;max=w6")
    fixed = seq("fx", "w2", plan="w2")
    assert pol.initial_plan(m.parse("auto;min=w6")).name == "w6"
    for s in (lo, hi, fixed):
        pol.observe(s, FLAT)
    assert pol.step_plan(lo, CTX).plan.name == "w8"
    assert pol.step_plan(hi, CTX).plan.name == "w6"  # stepping up stops at the request's max
    assert pol.step_plan(fixed, CTX).plan.name == "w2"
    with pytest.raises(ValueError, match="above"):
        EntropyPolicy(Model(), "w4", entropy_threshold=1.0, entropy_low="w6")


def test_load_plus_entropy_runs_quiet_tokens_low_under_the_load_plan():
    pol = make_controller("load+entropy", Model(), "w8", cost_model=cost(), slo_itl_ms=45, load_dwell_s=0,
                          entropy_threshold=1.0, entropy_window=1, entropy_low="w4")
    assert isinstance(pol, LoadPolicy) and pol.needs_logits
    s = seq("a")
    pol.begin_step(CTX)
    assert pol.step_plan(s, CTX).plan.name == "w4"  # nothing observed yet: quiet
    pol.observe(s, FLAT)
    assert pol.step_plan(s, CTX).plan.name == "w8"
    pol.begin_step(StepContext(1, 13, 0, 0.1, None))  # load moves the ceiling to w5
    assert pol.step_plan(s, CTX).plan.name == "w5"
    pol.observe(s, PEAKED)
    assert pol.step_plan(s, CTX).plan.name == "w4"


# ---------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def lm(tiny_ckpt: Path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    lm = load_model(tiny_ckpt, backend="torch")
    lm.backend.max_cached_widths = len(lm.widths)
    yield lm
    torch.set_num_threads(n)


PROMPTS = ["hello world", "The capital of France is", "quick brown fox jumps over the lazy dog"]


def test_switching_mid_sequence_keeps_the_kv_cache_valid(lm):
    """Engine tokens (several sequences in one batch, switching per token) == generate() switching the same way."""
    n = 24
    ids = [tuple(lm.encode_chat(p)) for p in PROMPTS]
    # threshold: the median entropy of a w8 run, so that sequences go up and down
    ref8 = [generate(lm.model, list(i), PrecisionPlan.uniform(8), n, kv_budget_bytes=1 << 20).tokens for i in ids]
    ents = []
    for i, toks in zip(ids, ref8):
        window = torch.tensor(list(i) + toks)
        logits = score_sequence(lm.model, window, PrecisionPlan.uniform(8))  # [L, V]
        ents.append(row_entropy(logits[len(i) - 1 :]))
    threshold = float(torch.cat(ents).median())
    pol = EntropyPolicy(lm, "w8", entropy_threshold=threshold, entropy_window=2, entropy_low="w3")
    eng = LLMEngine(lm.model, lm.tokenizer, pol, EngineConfig(kv_cache_bytes=1 << 20), eos_ids=())
    for k, i in enumerate(ids):
        eng.add_request(GenerationRequest(f"s{k}", i, n, ignore_eos=True))
    outs = eng.run_to_completion()
    plans = {p.name: p for p in (pol.high, pol.low)}
    switched = 0
    for k, i in enumerate(ids):
        got = outs[f"s{k}"]
        per_step = [o.precision for o in got]  # the plan that produced each token (step 0 = prefill)
        switched += sum(a != b for a, b in zip(per_step, per_step[1:]))
        ref = generate(lm.model, list(i), lambda step, ps=per_step: plans[ps[step]], n, kv_budget_bytes=1 << 20)
        assert [t for o in got for t in o.new_token_ids] == ref.tokens, f"sequence {k} ({per_step})"
    assert switched >= 3
    assert set(pol.tokens) == {"high", "low"} and min(pol.tokens.values()) > 0


def test_threshold_calibration_is_stored_and_read_back(lm, tmp_path: Path):
    text = tmp_path / "valid.txt"
    text.write_text(" ".join(PROMPTS * 40))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(lm.ckpt.path, ckpt)
    rec = calibrate_threshold(lm, text, 75.0, PrecisionPlan.uniform(8), windows=2, seq_len=32)
    assert rec["tokens"] == 64 and rec["plan"] == "w8" and rec["threshold"] > 0
    save_calibration(ckpt, rec)
    assert json.loads((ckpt / "elastic.json").read_text())["entropy_policy"]["threshold"] == rec["threshold"]
    lm2 = load_model(ckpt, backend="torch")
    pol = EntropyPolicy(lm2, "w8")
    assert pol.gate.threshold == pytest.approx(rec["threshold"]) and pol.threshold_source.startswith("checkpoint")
    assert EntropyPolicy(lm2, "w8", entropy_threshold=0.5).threshold_source == "given"


def test_teacher_forced_simulation_matches_one_forward_without_switching(lm):
    window = torch.tensor((list(lm.encode_chat(PROMPTS[2])) * 3)[:40])
    low, high = PrecisionPlan.uniform(4), PrecisionPlan.uniform(8)
    never = simulate_window(lm, window, low, high, threshold=math.inf, window_quiet=2)
    nll4, n = window_nll(lm.model, window, PrecisionPlan.uniform(4))
    assert never["tokens"] == n and never["high_steps"] == 0
    assert never["nll"] == pytest.approx(nll4, rel=1e-4)
    always = simulate_window(lm, window, low, high, threshold=-1.0, window_quiet=2)
    assert always["high_steps"] == n - 1  # the first position runs low, every later one high


def test_cost_model_profiles_the_tiny_model(lm):
    plans = [PrecisionPlan.uniform(8), PrecisionPlan.uniform(4)]
    cm = CostModel.profile(lm.model, plans, [1, 3], context=8, reps=1)
    assert {p.name for p in cm.table} == {"w8", "w4"} and all(set(r) == {1, 3} for r in cm.table.values())
    assert all(s > 0 for r in cm.table.values() for s in r.values())
    pol = LoadPolicy(lm, "w8", profile_batches="1,2", profile_reps=1, profile_context=8)
    assert {p.name for p in pol.cost.table} == {"w8", "w6", "w5", "w4"}


@pytest.fixture(scope="module")
def lm_fp32(tiny_ckpt: Path):
    """The exact fp32 reference backend: batched and one-sequence runs then agree to fp32 rounding (with fp16
    compute a near-tie can flip between the two, as one did on the tiny model: a top-2 gap within fp16 rounding)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(tiny_ckpt, backend="torch-fp32")
    torch.set_num_threads(n)


def test_load_policy_switches_running_sequences_and_keeps_the_kv_cache_valid(lm_fp32):
    """Sequences joining raise the batch past the SLO: running `auto` sequences step down mid-generation
    (and back up as the batch drains); each sequence's tokens equal generate() with the same per-step plans."""
    lm = lm_fp32
    frozen = CostModel.from_table(cost().table, min_samples=10**9)  # the table as is: no live correction
    pol = LoadPolicy(lm, "w8", cost_model=frozen, slo_itl_ms=45, load_dwell_s=0)
    eng = LLMEngine(lm.model, lm.tokenizer, pol, EngineConfig(kv_cache_bytes=1 << 20), eos_ids=())
    ids = [tuple(lm.encode_chat(PROMPTS[k % 3]))[: 8 + k] for k in range(12)]
    for k in range(3):
        eng.add_request(GenerationRequest(f"s{k}", ids[k], 20, ignore_eos=True))
    eng.add_request(GenerationRequest("fixed", ids[0], 20, spec=lm.parse("w4"), ignore_eos=True))
    outs: dict[str, list] = {}
    for step in range(60):
        if step == 3:  # 8 more arrive: batch 12 > what w8 and w6 can serve within 45 ms
            for k in range(3, 11):
                eng.add_request(GenerationRequest(f"s{k}", ids[k], 4 + k, ignore_eos=True))
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
        if not eng.has_unfinished():
            break
    plans = {f"w{b}": PrecisionPlan.uniform(b) for b in lm.widths}
    seen = set()
    for rid, got in outs.items():
        per_step = [o.precision for o in got]
        seen.update(per_step)
        k = 0 if rid == "fixed" else int(rid[1:])
        ref = generate(lm.model, list(ids[k]), lambda step, ps=per_step: plans[ps[step]], len(got),
                       kv_budget_bytes=1 << 20)
        assert [t for o in got for t in o.new_token_ids] == ref.tokens, f"{rid}: {per_step}"
    assert set(o.precision for o in outs["fixed"]) == {"w4"}
    assert len(set(o.precision for o in outs["s0"])) >= 2  # the first sequences switched mid-generation
    assert [h["reason"] for h in pol.history][:1] == ["itl_slo"] and "headroom" in {h["reason"] for h in pol.history}
