"""The serving engine: continuous batching over the paged KV cache with per-sequence precision.

One `step()` reads as docs/architecture.md says:

    schedule  which sequences run now and how many rows each (decode rows + prefill chunks)
    plan      the controller's plan for every scheduled sequence (it may change between tokens)
    execute   ONE forward over all rows (`ModelRunner.execute`); each row runs at its sequence's plan
    sample    the next token of every sequence whose rows reached its end
    update    logprobs (when asked) from the same logits, append tokens, detokenize, check stops,
              fork the n-1 siblings of a request with n > 1, free finished sequences' KV blocks

New requests join the running batch between steps; `abort` frees a request's blocks at once.
With prefix caching on, a new sequence starts from the cached KV blocks of its prompt's longest
cached prefix at its plan (the scheduler adopts them), and every block a step fills is named for
later sequences (`BlockManager.computed`).
The engine is synchronous and single-threaded (`AsyncEngine` runs it in a background thread).
Metrics leave through an `EngineObserver`, so this module knows nothing of Prometheus or HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from quept.engine.block_manager import BlockManager
from quept.engine.sampler import GREEDY_BELOW, sample
from quept.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from quept.engine.sequence import FinishReason, GenerationRequest, RequestOutput, Sequence, TokenLogprob
from quept.errors import ContextLengthError
from quept.model.model import ElasticModel
from quept.model.runner import ModelRunner, SeqRows, StepBatch
from quept.policies.base import Controller, PlanDecision, StepContext
from quept.policies.fixed import FixedPolicy
from quept.precision.plan import PrecisionPlan
from quept.structured.bitmask import constrain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits (the server fills them from its settings)."""

    max_batch: int = 16  # sequences decoding together
    max_batched_tokens: int = 512  # rows per forward; longer prompts are prefilled in chunks
    kv_cache_bytes: int = 256 << 20  # K and V together; blocks are handed out as sequences grow
    block_size: int = 16  # tokens per KV block
    max_model_len: int | None = None  # prompt + max_tokens limit; None: the model's context
    chunked_prefill: bool = True
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before at the same plan
    # Steps of at most `small_batch_rows` rows run on `small_batch_threads` torch threads (0: off). Decode
    # of a few rows is memory-bound and gains little from the last core, which a server's HTTP loop needs
    # to stream the tokens: with every core on the model, one client's tokens come 1.6x slower (13 vs 8 ms
    # per token measured on 2 cores, benchmarks/serve_bench.py).
    small_batch_rows: int = 0
    small_batch_threads: int = 1


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    num_free_blocks: int
    num_blocks: int


@dataclass
class StepLogits:
    """The logits of one forward and where each scheduled sequence's rows are in them."""

    logits: torch.Tensor  # [R, V]
    offsets: list[int]  # per scheduled sequence: its first row in `logits`
    counts: list[int]  # per scheduled sequence: its rows in `logits` (all rows, the last one, or none)

    def rows(self, i: int) -> torch.Tensor:
        return self.logits[self.offsets[i] : self.offsets[i] + self.counts[i]]

    def last(self, i: int) -> int:
        return self.offsets[i] + self.counts[i] - 1


def logprobs_of(logits: torch.Tensor, targets: Seq[int], top: int) -> list[TokenLogprob]:
    """Logprobs of `targets[r]` under raw logits row r [R, V], with the `top` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    ids = torch.tensor(list(targets), dtype=torch.int64, device=logits.device)
    chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, c) for t, c in zip(targets, chosen)]
    values, alt = logp.topk(min(top, logp.shape[-1]), dim=-1)  # [R, k]
    return [TokenLogprob(t, c, tuple(zip(a, v))) for t, c, a, v in zip(targets, chosen, alt.tolist(), values.tolist())]


class EngineObserver:
    """Receives engine events (the server turns them into metrics). Every method is a no-op here."""

    def on_admitted(self, seq: Sequence, now: float) -> None:
        """A sequence got KV blocks for the first time."""

    def on_tokens(self, plan: PrecisionPlan, count: int) -> None:
        """`count` tokens were generated at `plan` in one step."""

    def on_prefill(self, rows: int) -> None:
        """`rows` prompt rows ran through the model in one step (a prompt shared by n sequences once)."""

    def on_prefix_cache(self, queried: int, hit: int) -> None:
        """Sequences of `queried` tokens were admitted with a prefix-cache lookup; `hit` of them were cached."""

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None: ...

    def on_inter_token(self, seq: Sequence, itl_s: float) -> None: ...

    def on_finished(self, seq: Sequence) -> None:
        """A request ended (stop, length or abort): `seq` is the last of its sequences to end; every
        KV block of the request is already free."""

    def on_switch(self, policy: str, reason: str, seq: Sequence, old: PrecisionPlan, new: PrecisionPlan) -> None: ...

    def on_preempted(self, seq: Sequence) -> None: ...

    def on_step(self, stats: EngineStats, num_rows: int, seconds: float) -> None: ...


def eos_token_ids(tokenizer: Any, hf_config: dict[str, Any] | None = None) -> tuple[int, ...]:
    """End-of-sequence ids from the tokenizer and the model config."""
    ids: set[int] = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg_eos = (hf_config or {}).get("eos_token_id")
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif isinstance(cfg_eos, list):
        ids.update(int(i) for i in cfg_eos)
    return tuple(sorted(ids))


class LLMEngine:
    def __init__(
        self,
        model: ElasticModel,
        tokenizer: Any = None,
        controller: Controller | None = None,
        config: EngineConfig = EngineConfig(),
        observer: EngineObserver | None = None,
        eos_ids: Seq[int] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.controller = controller
        self.observer = observer or EngineObserver()
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer)
        limit = model.args.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {limit} tokens")
        self.max_model_len = config.max_model_len or limit
        cache = model.new_kv_cache(config.kv_cache_bytes, config.block_size)
        self.runner = ModelRunner(model, cache)
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, config.prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch, config.max_batched_tokens, config.chunked_prefill), self.blocks)
        self._seqs: dict[str, list[Sequence]] = {}  # request id -> its unfinished sequences
        self.step_count = 0
        self._itl_ema: float | None = None
        self._full_threads = self._threads = torch.get_num_threads()
        log.info("engine: %d KV blocks of %d tokens (%.0f MiB), max_batch %d, max_model_len %d",
                 cache.num_blocks, cache.block_size, config.kv_cache_bytes / 2**20,
                 config.max_batch, self.max_model_len)

    @classmethod
    def from_loaded(cls, loaded: Any, config: EngineConfig = EngineConfig(), controller: Controller | None = None,
                    observer: EngineObserver | None = None, default_precision: str = "w8") -> "LLMEngine":
        """An engine over a `LoadedModel` (fixed policy at `default_precision` unless a controller is given)."""
        controller = controller or FixedPolicy(loaded, default_precision)
        return cls(loaded.model, loaded.tokenizer, controller, config, observer,
                   eos_token_ids(loaded.tokenizer, loaded.ckpt.hf_config))

    # ------------------------------------------------------------------ requests

    def make_sequence(self, request: GenerationRequest) -> Sequence:
        """Validate a request and resolve its plan (thread-safe: touches no engine state)."""
        n_prompt = len(request.prompt_ids)
        total = n_prompt + request.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"prompt of {n_prompt} tokens plus max_tokens {request.max_tokens} exceeds the context of "
                f"{self.max_model_len} tokens")
        if not self.scheduler.fits_ever(total):
            raise ContextLengthError(
                f"prompt of {n_prompt} tokens plus max_tokens {request.max_tokens} needs "
                f"{self.blocks.blocks_for(total)} KV blocks; the KV cache holds {self.blocks.num_blocks}")
        vocab = self.model.args.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if self.controller is None:
            raise ValueError("the engine has no controller to resolve precisions")
        plan = self.controller.initial_plan(request.spec)
        return Sequence(request, plan, self.eos_ids, self.tokenizer)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self._seqs:
            raise ValueError(f"request id {seq.request_id!r} is already running")
        self._seqs[seq.request_id] = [seq]
        self.scheduler.add(seq)

    def add_request(self, request: GenerationRequest) -> Sequence:
        seq = self.make_sequence(request)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> list[RequestOutput]:
        """End a request's sequences at once and free their KV blocks: one output per sequence, the
        last one `request_finished`; none if the request is not (or no longer) running."""
        group = self._seqs.pop(request_id, [])
        outs = []
        for seq in group:
            self.scheduler.remove(seq)
            seq.finish(FinishReason.ABORT)
            outs.append(seq.make_output([], seq.plan.name))
        if outs:
            outs[-1].request_finished = True
            self.observer.on_finished(group[-1])
        return outs

    def abort_all(self, error: str | None = None) -> list[RequestOutput]:
        outs = [o for rid in list(self._seqs) for o in self.abort(rid)]
        for o in outs:
            o.error = error
        return outs

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    def stats(self) -> EngineStats:
        b = self.blocks
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, b.usage, b.num_free_blocks, b.num_blocks)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one forward over every scheduled row; return the outputs of sequences that advanced."""
        t0 = time.perf_counter()
        batch = self.schedule()
        if not batch:
            return []
        plans = self.plan(batch)
        self._set_threads(batch.num_rows)
        logits = self.execute(batch, plans)
        tokens = self.sample(batch, logits)
        outputs = self.update(batch, plans, logits, tokens)
        self.step_count += 1
        seconds = time.perf_counter() - t0
        if self.controller is not None:
            self.controller.end_step(batch.num_rows, seconds)
        self.observer.on_step(self.stats(), batch.num_rows, seconds)
        return outputs

    def _set_threads(self, rows: int) -> None:
        """Torch threads for a step of `rows` rows (EngineConfig.small_batch_rows)."""
        cfg = self.config
        if not cfg.small_batch_rows:
            return
        want = cfg.small_batch_threads if rows <= cfg.small_batch_rows else self._full_threads
        if want != self._threads:
            torch.set_num_threads(want)
            self._threads = want

    def schedule(self) -> SchedulerOutput:
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self.observer.on_preempted(seq)
        if batch.prefix_queried:
            self.observer.on_prefix_cache(batch.prefix_queried, batch.prefix_hit)
        now = time.monotonic()
        for s in batch.scheduled:
            if s.num_cached:
                s.seq.num_cached_tokens = min(s.num_cached, s.seq.num_prompt)
            if s.seq.admitted_time is None:
                s.seq.admitted_time = now
                self.observer.on_admitted(s.seq, now)
        return batch

    def plan(self, batch: SchedulerOutput) -> list[PrecisionPlan]:
        """Ask the controller for every scheduled sequence's plan of this step; count changes. A sequence
        that took cached blocks in this step runs this step at the plan it looked them up with (its
        current one); a change the controller asks for applies from its next step."""
        ctl = self.controller
        if ctl is None:
            return [s.seq.plan for s in batch.scheduled]
        ctx = StepContext(self.step_count, self.scheduler.num_running, self.scheduler.num_waiting,
                          self.blocks.usage, self._itl_ema)
        ctl.begin_step(ctx)
        plans = []
        for s in batch.scheduled:
            decision = ctl.step_plan(s.seq, ctx)
            if s.num_cached:
                decision = PlanDecision(s.seq.plan, decision.reason)  # the cached K/V were computed at it
            if decision.plan != s.seq.plan:
                log.debug("switch %s: %s -> %s (policy %s, reason %s, token %d)", s.seq.request_id, s.seq.plan.name,
                          decision.plan.name, ctl.name, decision.reason, s.seq.num_output)
                self.observer.on_switch(ctl.name, decision.reason, s.seq, s.seq.plan, decision.plan)
                s.seq.plan = decision.plan
            plans.append(s.seq.plan)
        return plans

    def execute(self, batch: SchedulerOutput, plans: list[PrecisionPlan]) -> StepLogits:
        """One forward over all rows: the last row's logits of every sequence that samples, and every
        row's of a prompt whose logprobs are asked for."""
        rows, offsets, counts = [], [], []
        at = 0
        for s, plan in zip(batch.scheduled, plans):
            seq, start = s.seq, s.seq.num_computed
            all_rows = seq.wants_prompt_rows
            rows.append(SeqRows(seq.token_ids[start : start + s.num_rows], start, seq.blocks.block_table, plan,
                                s.samples, all_rows))
            offsets.append(at)
            counts.append(s.num_rows if all_rows else int(s.samples))
            at += counts[-1]
        # sampling, logprobs and grammar masks run on the host: one copy of the step's logits (none on a CPU)
        return StepLogits(self.runner.execute(StepBatch(rows)).cpu(), offsets, counts)

    def sample(self, batch: SchedulerOutput, step: StepLogits) -> list[int | str]:
        """Next token per sampling sequence (greedy rows in one argmax, the rest one by one); a
        sequence whose draw fails (e.g. its logits are not finite) gets the error text instead, and
        only it ends."""
        sampling = [s.seq for s in batch.scheduled if s.samples]
        if not sampling:
            return []
        logits = step.logits
        last = [step.last(i) for i, s in enumerate(batch.scheduled) if s.samples]
        if len(last) != logits.shape[0]:  # prompt rows are in the logits too: take each sequence's last
            logits = logits[torch.tensor(last, dtype=torch.int64, device=logits.device)]
        tokens: list[int | str] = logits.argmax(-1).tolist()  # greedy for every row; replaced where sampling
        masked = self._constrained(sampling, logits)
        for i, row in masked.items():
            tokens[i] = int(row.argmax())
        for i, seq in enumerate(sampling):
            params = seq.request.sampling
            if params.temperature >= GREEDY_BELOW:
                try:
                    tokens[i] = sample(masked.get(i, logits[i]), params, seq.generator)
                except RuntimeError as err:  # torch.multinomial on NaN/inf probabilities
                    log.warning("sampling failed for %s: %s", seq.request_id, err)
                    tokens[i] = f"sampling failed: {err}"
        ctl = self.controller
        if ctl is not None and ctl.needs_logits:
            for i, seq in enumerate(sampling):
                ctl.observe(seq, logits[i])
        return tokens

    @staticmethod
    def _constrained(sampling: list[Sequence], logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Copies of the logits rows [V] of the sequences with a grammar, by index in `sampling`, with the
        tokens their grammar forbids at -inf (the raw rows stay for logprobs and the controller)."""
        index = [i for i, seq in enumerate(sampling) if seq.matcher is not None]
        if not index:
            return {}
        rows = logits[torch.tensor(index, dtype=torch.int64, device=logits.device)]  # [C, V], a copy
        constrain(rows, [sampling[i].matcher for i in index])
        return dict(zip(index, rows))

    def update(self, batch: SchedulerOutput, plans: list[PrecisionPlan], step: StepLogits,
               tokens: list[int | str]) -> list[RequestOutput]:
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        per_plan: dict[PrecisionPlan, int] = {}
        it = iter(tokens)
        itls: list[float] = []
        prefill_rows = 0
        for i, (s, plan) in enumerate(zip(batch.scheduled, plans)):
            seq = s.seq
            start = seq.num_computed
            prefill_rows += max(0, min(start + s.num_rows, seq.num_prompt) - start)
            if seq.wants_prompt_rows:  # execute asked for all its rows
                self._add_prompt_logprobs(seq, start, step.rows(i))
            seq.num_computed += s.num_rows
            self.blocks.computed(seq.blocks, seq.token_ids, start, s.num_rows, plan)
            if not s.samples:
                continue
            token = next(it)
            if isinstance(token, str):  # this sequence's draw failed: end it (and its request) with the error
                seq.finish(FinishReason.ABORT, None, now)
                out = self._output(seq, [], plan)
                out.error = token
                outputs.append(out)
                continue
            if seq.request.max_tokens == 0:  # scoring only: the prompt's logprobs were the point
                seq.finish(FinishReason.LENGTH, None, now)
                outputs.append(self._output(seq, [], plan))
                continue
            last = seq.last_token_time
            siblings: list[tuple[Sequence, int]] = []
            if last is None and seq.request.n > 1 and seq.index == 0:
                siblings = self._fork(seq, step.logits[step.last(i)], now)
                per_plan[plan] = per_plan.get(plan, 0) + len(siblings)
            top = seq.request.logprobs
            logprob = None if top is None else logprobs_of(step.logits[step.last(i)][None], [token], top)[0]
            seq.append_token(token, now, logprob)
            per_plan[plan] = per_plan.get(plan, 0) + 1
            if last is None:
                self.observer.on_first_token(seq, now - seq.request.arrival_time)
            else:
                itls.append(now - last)
                self.observer.on_inter_token(seq, now - last)
            outputs.append(self._output(seq, [token], plan))
            outputs.extend(self._output(child, [t], plan) for child, t in siblings)  # after the prompt logprobs
        if prefill_rows:
            self.observer.on_prefill(prefill_rows)
        for plan, count in per_plan.items():
            self.observer.on_tokens(plan, count)
        if itls:
            mean = sum(itls) / len(itls)
            self._itl_ema = mean if self._itl_ema is None else 0.8 * self._itl_ema + 0.2 * mean
        return outputs

    def _output(self, seq: Sequence, new_ids: list[int], plan: PrecisionPlan) -> RequestOutput:
        """The step's output of `seq`; a finished sequence leaves the engine first (its blocks freed)."""
        last = False
        if seq.is_finished:
            self.scheduler.remove(seq)
            group = self._seqs.get(seq.request_id, [])
            if seq in group:
                group.remove(seq)
            if not group:
                self._seqs.pop(seq.request_id, None)
                self.observer.on_finished(seq)
                last = True
        out = seq.make_output(new_ids, plan.name)
        out.request_finished = last
        return out

    def _add_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that rows [start, start + len(logits)) predict and that are
        not known yet (a recompute after preemption runs rows whose logprobs are)."""
        known = seq.prompt_logprobs
        assert known is not None
        lo = max(start, len(known) - 1)  # row p predicts token p + 1
        hi = min(start + logits.shape[0], seq.num_prompt - 1)
        if hi > lo:
            top = seq.request.prompt_logprobs or 0
            known.extend(logprobs_of(logits[lo - start : hi - start], seq.token_ids[lo + 1 : hi + 1], top))

    def _fork(self, parent: Sequence, logits: torch.Tensor, now: float) -> list[tuple[Sequence, int]]:
        """Sequences 1 … n-1 of `parent`'s request, at the end of its prefill: each samples its first
        token from the same logits [V] with its own random stream and shares the prompt's full KV
        blocks (a partially filled last block is copied). One without a free block for that copy
        recomputes the prompt when the scheduler admits it. Returns the siblings and their first tokens
        (the caller makes their outputs after the parent's, which carries the prompt logprobs)."""
        group = self._seqs[parent.request_id]
        params = parent.request.sampling
        top = parent.request.logprobs
        outs: list[tuple[Sequence, int]] = []
        for index in range(1, parent.request.n):
            child = parent.fork(index, now)
            row = self._constrained([child], logits[None]).get(0, logits)
            token = sample(row, params, child.generator)
            forked = self.blocks.fork(parent.blocks)
            if forked is None:
                self.scheduler.add(child)
            else:
                child.blocks, copy = forked
                if copy is not None:
                    self.runner.cache.copy_block(*copy)
                child.num_computed = parent.num_computed
                self.scheduler.add_running(child)
            group.append(child)
            child.append_token(token, now, None if top is None else logprobs_of(logits[None], [token], top)[0])
            outs.append((child, token))
        return outs

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until every sequence finishes (tests and offline use); outputs per request id."""
        outs: dict[str, list[RequestOutput]] = {}
        while self.has_unfinished():
            for o in self.step():
                outs.setdefault(o.request_id, []).append(o)
        return outs

