"""The engine on a tiny random checkpoint: batched results equal single-sequence generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quept.engine.engine import EngineConfig, EngineObserver, LLMEngine
from quept.engine.generate import generate
from quept.engine.sampler import SamplingParams
from quept.engine.sequence import FinishReason, GenerationRequest
from quept.errors import ContextLengthError
from quept.model.loader import load_model
from quept.policies.base import PlanDecision
from quept.policies.fixed import FixedPolicy
from quept.precision.plan import PrecisionPlan

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["hello world", "The capital of France is", "quick brown fox jumps over the lazy dog"]


def ids_of(lm, i: int) -> tuple[int, ...]:
    return tuple(lm.encode_chat(PROMPTS[i % len(PROMPTS)]))


def reference(lm, ids, bits: int, n: int) -> list[int]:
    return generate(lm.model, list(ids), PrecisionPlan.uniform(bits), n, kv_budget_bytes=1 << 20).tokens


def request(lm, rid: str, ids, bits: int | None, n: int, **kw) -> GenerationRequest:
    spec = lm.parse(f"w{bits}") if bits else None
    return GenerationRequest(rid, tuple(ids), n, spec=spec, ignore_eos=kw.pop("ignore_eos", True), **kw)


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def engine(lm, **kw) -> LLMEngine:
    return LLMEngine.from_loaded(lm, EngineConfig(kv_cache_bytes=kw.pop("kv", 1 << 20), **kw))


def test_mixed_widths_in_one_batch_match_alone(lm):
    widths = (8, 4, 2)
    refs = [reference(lm, ids_of(lm, i), b, 12) for i, b in enumerate(widths)]
    eng = engine(lm)
    for i, b in enumerate(widths):
        eng.add_request(request(lm, f"r{i}", ids_of(lm, i), b, 12))
    outs = eng.run_to_completion()
    assert eng.step_count == 12  # every step ran all three sequences in one forward
    for i in range(3):
        assert tokens(outs[f"r{i}"]) == refs[i]
        assert outs[f"r{i}"][-1].finish_reason is FinishReason.LENGTH
        assert outs[f"r{i}"][-1].precision == f"w{widths[i]}"
    assert eng.blocks.usage == 0.0


def test_requests_join_running_batch_and_chunked_prefill(lm):
    """A request added mid-run joins between steps; a tiny row budget prefills prompts in chunks."""
    ids0, ids1 = ids_of(lm, 2), ids_of(lm, 1)
    refs = [reference(lm, ids0, 8, 10), reference(lm, ids1, 4, 6)]
    eng = engine(lm, max_batch=4, max_batched_tokens=8)
    eng.add_request(request(lm, "a", ids0, 8, 10))
    outs: dict[str, list] = {}
    for step in range(200):
        if step == 6:
            eng.add_request(request(lm, "b", ids1, 4, 6))
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
        if step > 6 and not eng.has_unfinished():
            break
    assert tokens(outs["a"]) == refs[0]
    assert tokens(outs["b"]) == refs[1]


def test_preemption_when_out_of_blocks_keeps_results(lm):
    ids = [ids_of(lm, i) for i in range(3)]
    refs = [reference(lm, x, 8, 16) for x in ids]
    per_block = 2 * lm.model.args.n_layers * 4 * lm.model.args.n_kv_heads * lm.model.args.head_dim * 4
    longest = max(len(x) for x in ids) + 16
    eng = engine(lm, kv=per_block * (-(-longest // 4) + 3), block_size=4)
    for i, x in enumerate(ids):
        eng.add_request(request(lm, f"r{i}", x, 8, 16))
    outs = eng.run_to_completion()
    assert eng.scheduler.num_preemptions > 0
    for i in range(3):
        assert tokens(outs[f"r{i}"]) == refs[i]
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_stop_token_ids_strings_and_min_tokens(lm):
    ids = ids_of(lm, 0)
    ref = reference(lm, ids, 8, 12)
    eng = engine(lm)
    stop_id = ref[4]
    first = ref.index(stop_id)
    eng.add_request(request(lm, "id", ids, 8, 12, stop_token_ids=(stop_id,)))
    eng.add_request(request(lm, "min", ids, 8, 12, stop_token_ids=(stop_id,), min_tokens=first + 2))
    outs = eng.run_to_completion()
    assert tokens(outs["id"]) == ref[: first + 1]
    assert outs["id"][-1].finish_reason is FinishReason.STOP and outs["id"][-1].stop_reason == stop_id
    assert len(tokens(outs["min"])) > first + 1

    text = lm.tokenizer.decode(ref, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.index(stop)
    eng.add_request(request(lm, "s", ids, 8, 12, stop=(stop,)))
    eng.add_request(request(lm, "s+", ids, 8, 12, stop=(stop,), include_stop_str_in_output=True))
    outs = eng.run_to_completion()
    assert "".join(o.delta_text for o in outs["s"]) == text[:cut]
    assert "".join(o.delta_text for o in outs["s+"]) == text[: cut + len(stop)]
    assert outs["s"][-1].finish_reason is FinishReason.STOP and outs["s"][-1].stop_reason == stop


def test_eos_stops_unless_ignored(lm):
    eos = lm.tokenizer.eos_token_id
    eng = LLMEngine.from_loaded(lm, EngineConfig(kv_cache_bytes=1 << 20))
    ids = ids_of(lm, 1)
    ref = reference(lm, ids, 8, 6)
    eng.eos_ids = (ref[2],)  # pretend the third token is end-of-sequence
    eng.add_request(request(lm, "eos", ids, 8, 6, ignore_eos=False))
    eng.add_request(request(lm, "ign", ids, 8, 6, ignore_eos=True))
    outs = eng.run_to_completion()
    assert tokens(outs["eos"]) == ref[: ref.index(ref[2]) + 1]
    assert outs["eos"][-1].stop_reason is None and outs["eos"][-1].finish_reason is FinishReason.STOP
    assert tokens(outs["ign"]) == ref
    assert eos is not None


def test_abort_frees_blocks_at_once(lm):
    eng = engine(lm)
    eng.add_request(request(lm, "a", ids_of(lm, 0), 8, 50))
    eng.add_request(request(lm, "b", ids_of(lm, 1), 8, 50))
    for _ in range(3):
        eng.step()
    used = eng.blocks.num_blocks - eng.blocks.num_free_blocks
    [out] = eng.abort("a")
    assert out.finished and out.request_finished and out.finish_reason is FinishReason.ABORT
    assert eng.blocks.num_blocks - eng.blocks.num_free_blocks < used
    assert eng.abort("a") == []
    eng.abort("b")
    assert eng.blocks.usage == 0.0 and not eng.has_unfinished()


def test_seeded_sampling_is_reproducible_in_a_batch(lm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=123)
    ids = ids_of(lm, 0)
    eng = engine(lm)
    eng.add_request(request(lm, "alone", ids, 4, 8, sampling=params))
    alone = tokens(eng.run_to_completion()["alone"])
    eng.add_request(request(lm, "x", ids_of(lm, 1), 8, 8))
    eng.add_request(request(lm, "batched", ids, 4, 8, sampling=params))
    assert tokens(eng.run_to_completion()["batched"]) == alone


def test_context_limits_are_refused(lm):
    eng = engine(lm, max_model_len=64)
    ids = ids_of(lm, 0)
    with pytest.raises(ContextLengthError, match="exceeds the context of 64"):
        eng.make_sequence(request(lm, "x", ids, 8, 64))
    small = engine(lm, kv=1 << 14, block_size=4)  # a handful of blocks
    with pytest.raises(ContextLengthError, match="KV blocks"):
        small.make_sequence(request(lm, "y", ids, 8, 200))
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        request(lm, "z", ids, 8, -1)
    with pytest.raises(ValueError, match="max_model_len"):
        engine(lm, max_model_len=10**6)


class SwitchAt(FixedPolicy):
    """Runs w8 for the prefill and first tokens, then w2 (a per-step policy through the hook)."""

    name = "test-switch"

    def step_plan(self, seq, ctx):
        if seq.num_output >= 3:
            return PlanDecision(PrecisionPlan.uniform(2), reason="test")
        return PlanDecision(seq.plan)


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.switches: list[tuple[str, str, str, str]] = []
        self.tokens: dict[str, int] = {}

    def on_switch(self, policy, reason, seq, old, new):
        self.switches.append((policy, reason, old.name, new.name))

    def on_tokens(self, precision, count):
        self.tokens[precision] = self.tokens.get(precision, 0) + count


def test_controller_changes_plan_between_tokens(lm):
    ids = ids_of(lm, 0)
    ref = generate(lm.model, list(ids), lambda step: PrecisionPlan.uniform(8 if step < 3 else 2), 8,
                   kv_budget_bytes=1 << 20).tokens
    rec = Recorder()
    eng = LLMEngine(lm.model, lm.tokenizer, SwitchAt(lm, "w8"), EngineConfig(kv_cache_bytes=1 << 20), rec, ())
    eng.add_request(request(lm, "s", ids, None, 8))
    outs = eng.run_to_completion()["s"]
    assert tokens(outs) == ref
    assert rec.switches == [("test-switch", "test", "w8", "w2")]
    assert rec.tokens == {PrecisionPlan.uniform(8): 3, PrecisionPlan.uniform(2): 5}  # plans, not names, reach the observer
    assert [o.precision for o in outs] == ["w8"] * 3 + ["w2"] * 5


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("new_rows", [(1, 1, 1), (1, 3, 1)])
def test_attention_of_a_batch_matches_per_sequence(tiny_ckpt: Path, backend: str, new_rows: tuple[int, ...]):
    """One attention call for a batch equals attending sequence by sequence: on the torch backend
    build_layout's DecodeGroup (one padded sdpa for all decode rows) against the per-sequence loop;
    on the native backend its in-place paged attention over every row (decode rows and a prefill
    chunk in one batch) against the torch ops on the same fp16 cache. The linears are the exact fp32
    reference's in both runs: the native linears quantize activations to int8, so an attention difference
    at fp32 rounding could flip one rounding and show as a whole quantization step in the logits."""
    from quept.kernels.native import find_compiler
    from quept.model.layer_ops import TorchLayerOps
    from quept.model.layout import build_layout
    from quept.model.runner import ModelRunner, SeqRows, StepBatch
    from quept.precision.plan import PrecisionPlan
    from quept.precision.segments import StepWidths

    if backend == "native" and find_compiler() is None:
        pytest.skip("no C++ compiler: the native kernels cannot be built")
    if backend == "native":
        from quept.backends.native import NativeLayerOps
        from quept.kernels.native import load_native

        model = load_model(tiny_ckpt, backend="torch-fp32").model
        model.ops = NativeLayerOps(load_native())
    else:
        model = load_model(tiny_ckpt, backend=backend).model
    assert model.ops.attention_in_place == (backend == "native")
    batched_ops = model.ops
    per_sequence_ops = TorchLayerOps()
    per_sequence_ops.kv_dtype = batched_ops.kv_dtype
    prompts = [torch.arange(n) % model.args.vocab_size for n in (5, 11, 2)]
    tokens = torch.arange(sum(new_rows)) + 3
    positions = torch.cat([torch.arange(n) + len(p) for p, n in zip(prompts, new_rows)])
    outs = []
    for batched in (True, False):
        model.ops = batched_ops if batched else per_sequence_ops
        runner, tables = ModelRunner.scratch(model, len(prompts), 16, block_size=4)
        runner.execute(StepBatch([SeqRows(p.tolist(), 0, t, PrecisionPlan.uniform(8)) for p, t in zip(prompts, tables)]))
        layout = build_layout(runner.cache, [(t, len(p), n) for t, p, n in zip(tables, prompts, new_rows)])
        decoding = [len(p) + 1 for p, n in zip(prompts, new_rows) if n == 1]  # context of each decode row
        assert layout.decode is not None and layout.decode.offsets.diff().tolist() == decoding
        assert layout.decode.padded.max_len == 4 * -(-max(decoding) // 4)
        if not batched:
            layout.decode = None
        outs.append(model(tokens, positions, runner.cache, layout, StepWidths.uniform(4, model.n_linears)))
    model.ops = batched_ops
    # native: its fused ops (polynomial exp in softmax and SiLU) differ from torch's at fp32 rounding, summed
    # over the layers (1.5e-5 measured on the tiny model)
    tol = 5e-5 if backend == "native" else 1e-5
    assert float((outs[0] - outs[1]).abs().max() / outs[1].abs().max()) < tol


def test_small_batches_run_on_fewer_threads(lm, monkeypatch):
    """Steps of at most small_batch_rows rows use small_batch_threads; larger steps (a prefill, many
    decoding sequences) every thread the engine was built with; the tokens do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ids = ids_of(lm, 1)
        ref = reference(lm, ids, 4, 5)
        eng = engine(lm, small_batch_rows=1, small_batch_threads=1)
        seen: list[tuple[int, int]] = []
        forward = eng.execute

        def spy(batch, plans):
            seen.append((batch.num_rows, torch.get_num_threads()))
            return forward(batch, plans)

        monkeypatch.setattr(eng, "execute", spy)
        eng.add_request(request(lm, "a", ids, 4, 5))
        outs = eng.run_to_completion()["a"]
        assert tokens(outs) == ref
        assert seen == [(len(ids), 2)] + [(1, 1)] * 4  # prefill on both threads, decode on one
        assert torch.get_num_threads() == 1  # left as the last step set it (the engine thread's setting)
    finally:
        torch.set_num_threads(before)


def test_a_failed_draw_ends_only_its_own_request(lm, monkeypatch):
    """Sampling that raises (torch.multinomial on NaN probabilities) fails that request with an error;
    the others in the same steps run to the end."""
    import quept.engine.engine as engine_mod

    real = engine_mod.sample

    def flaky(logits, params, generator=None):
        if params.top_k == 7:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    eng = engine(lm)
    eng.add_request(request(lm, "bad", ids_of(lm, 0), 8, 6, sampling=SamplingParams(temperature=1.0, top_k=7)))
    eng.add_request(request(lm, "good", ids_of(lm, 1), 8, 6))
    outs = eng.run_to_completion()
    [bad] = outs["bad"]
    assert bad.error and "sampling failed" in bad.error and bad.request_finished
    assert bad.finish_reason is FinishReason.ABORT
    assert tokens(outs["good"]) == reference(lm, ids_of(lm, 1), 8, 6)
    assert eng.blocks.usage == 0.0
