"""Single-sequence generation on the paged KV cache (the CLI and benchmarks; the engine batches)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from quept.engine.sampler import SamplingParams, sample
from quept.errors import ContextLengthError
from quept.model.kv_cache import blocks_for
from quept.model.model import ElasticModel
from quept.model.runner import ModelRunner, SeqRows, StepBatch
from quept.precision.plan import PrecisionPlan

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
    total = len(prompt_ids) + max_tokens
    if kv_budget_bytes is None:
        runner, (table,) = ModelRunner.scratch(model, 1, total)
    else:
        cache = model.new_kv_cache(kv_budget_bytes)
        need = blocks_for(total, cache.block_size)
        if need > cache.num_blocks:
            raise ContextLengthError(f"{total} tokens need {need} KV blocks; a budget of {kv_budget_bytes} bytes "
                                     f"holds {cache.num_blocks}")
        runner, table = ModelRunner(model, cache), list(range(need))
    gen = params.generator()
    rows = list(prompt_ids)  # the rows of the next step: the prompt, then each new token
    cached = 0  # tokens already in the KV cache
    out: list[int] = []
    steps: list[float] = []
    t0 = time.perf_counter()
    for step in range(max_tokens):
        ts = time.perf_counter()
        logits = runner.execute(StepBatch([SeqRows(rows, cached, table, plan_at(step))]))[0]  # [V]
        token = sample(logits, params, gen)
        out.append(token)
        steps.append(time.perf_counter() - ts)
        if token in stop_ids:
            break
        cached += len(rows)
        rows = [token]
    prefill = steps[0] if steps else 0.0
    return GenerationResult(out, prefill, time.perf_counter() - t0 - prefill, steps)
