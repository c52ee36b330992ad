"""The forward keeps every tensor on the model's device: with torch's default device set elsewhere
("meta"), a tensor created without `device=` lands there and the step fails. This is the CPU rehearsal
of serving on a GPU (where such a tensor would sit on the CPU beside CUDA weights)."""

from __future__ import annotations

import torch

from quept.engine.engine import EngineConfig, LLMEngine
from quept.engine.sampler import SamplingParams
from quept.engine.sequence import GenerationRequest
from quept.model.loader import load_model
from quept.policies.fixed import FixedPolicy
from quept.structured.grammar import GrammarCompiler, GrammarSpec


def run(lm, reqs) -> dict[str, list[int]]:
    eng = LLMEngine(lm.model, lm.tokenizer, FixedPolicy(lm, "w8"), EngineConfig(kv_cache_bytes=1 << 20,
                    max_batched_tokens=12, max_batch=8), eos_ids=())
    for r in reqs:
        eng.add_request(r)
    return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in eng.run_to_completion().items()}


def test_a_mixed_step_creates_no_tensor_off_the_model_device(tiny_ckpt) -> None:
    """torch-fp32 backend (the Triton interpreter allocates on the default device itself, so it cannot run
    under this check; its kernels' outputs are made with device=x.device)."""
    lm = load_model(tiny_ckpt, backend="torch-fp32")
    grammar = GrammarCompiler(lm.tokenizer, lm.model.args.vocab_size, (0,)).compile(
        GrammarSpec("regex", "[ab]{4}", "guided_regex"))
    prompt = tuple(range(5, 30))
    reqs = [GenerationRequest(f"r{b}", prompt[: 10 + b], 4, SamplingParams(temperature=0.8, seed=b), lm.parse(f"w{b}"),
                              ignore_eos=True, logprobs=2, n=2 if b == 4 else 1) for b in (8, 4, 2)]
    reqs.append(GenerationRequest("g", prompt, 4, spec=lm.parse("w3"), grammar=grammar))
    want = run(lm, reqs)
    torch.set_default_device("meta")
    try:
        got = run(lm, reqs)
    finally:
        torch.set_default_device(None)
    assert got == want
