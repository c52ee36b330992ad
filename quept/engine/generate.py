"""Single-sequence generation on the paged KV cache (the CLI and benchmarks; the engine batches)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from quept.errors import ContextLengthError
from quept.model.kv_cache import SequenceBlocks
from quept.model.model import ElasticModel, build_layout
from quept.precision.plan import PrecisionPlan
from quept.engine.sampler import SamplingParams, sample

# A plan per step lets callers switch precision mid-sequence (step 0 is the prefill).
PlanFn = Callable[[int], PrecisionPlan]


@dataclass
class GenerationResult:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def check_context(model: ElasticModel, prompt_len: int, max_tokens: int) -> None:
    limit = model.args.max_position_embeddings
    if prompt_len == 0:
        raise ContextLengthError("the prompt is empty")
    if prompt_len + max_tokens > limit:
        raise ContextLengthError(f"prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds the context of {limit} tokens")


def generate(
    model: ElasticModel,
    prompt_ids: Sequence[int],
    plan: PrecisionPlan | PlanFn,
    max_tokens: int,
    params: SamplingParams = SamplingParams(),
    stop_ids: Sequence[int] = (),
    kv_budget_bytes: int | None = None,
) -> GenerationResult:
    """Prefill the prompt, then decode up to `max_tokens` tokens (stops early on `stop_ids`).

    The KV cache holds `kv_budget_bytes`, by default just the blocks prompt + max_tokens need (a fixed
    256 MiB default was zero-filled on every call and stayed resident).
    """
    check_context(model, len(prompt_ids), max_tokens)
    plan_at: PlanFn = plan if callable(plan) else (lambda step: plan)  # type: ignore[assignment,return-value]
    if kv_budget_bytes is None:
        cache = model.new_kv_cache_for(len(prompt_ids) + max_tokens)
    else:
        cache = model.new_kv_cache(kv_budget_bytes)
    blocks = SequenceBlocks()
    gen = params.generator()
    tokens = torch.tensor(list(prompt_ids), dtype=torch.int64)
    positions = torch.arange(len(prompt_ids))
    out: list[int] = []
    steps: list[float] = []
    t0 = time.perf_counter()
    last_row = torch.tensor([len(prompt_ids) - 1])
    for step in range(max_tokens):
        ts = time.perf_counter()
        p = plan_at(step)
        bits = p.uniform_bits if p.uniform_bits is not None else p.row_vector(model.n_linears).unsqueeze(0).expand(tokens.shape[0], -1)
        layout = build_layout(cache, [(blocks, tokens.shape[0])])
        logits = model(tokens, positions, cache, layout, bits, logits_rows=last_row)[0]  # [V]
        token = sample(logits, params, gen)
        out.append(token)
        steps.append(time.perf_counter() - ts)
        if token in stop_ids:
            break
        tokens = torch.tensor([token])
        positions = torch.tensor([blocks.num_tokens])
        last_row = torch.tensor([0])
    prefill = steps[0] if steps else 0.0
    return GenerationResult(out, prefill, time.perf_counter() - t0 - prefill, steps)
