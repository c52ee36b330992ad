"""Request and sequence state for the engine: what a client asked for and how far it has got.

A `GenerationRequest` is the validated request (prompt token ids, sampling, stops, precision
spec). A `Sequence` is its run-time state: token ids (prompt + generated), how many of them are
already in the KV cache (`num_computed`), its KV blocks, its current precision plan, the text
produced so far (incremental detokenization with stop strings) and, when asked, the logprobs of its
tokens. A request with `n > 1` runs as n sequences (`index` 0 … n-1) that share the prompt's KV
blocks: sequence 0 prefills, the others are forked from it when it samples (`Sequence.fork`). A
`RequestOutput` is what one engine step hands back for one sequence.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from quept.engine.block_manager import SequenceBlocks
from quept.engine.detokenizer import IncrementalDetokenizer
from quept.engine.sampler import SamplingParams
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec
from quept.structured.grammar import Grammar


class FinishReason(str, enum.Enum):
    """Why a sequence ended (the OpenAI `finish_reason`, plus vLLM's `abort`)."""

    STOP = "stop"  # an end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit reached
    ABORT = "abort"  # the client went away, or the server aborted it


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV blocks were freed; it will recompute)
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model at the width that ran it (raw logits: before
    temperature, top-k/top-p or penalties), with the `top` most likely tokens of that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request in token ids (the server tokenizes; the engine never sees HTTP)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    spec: PrecisionSpec | None = None  # None: the server's default precision
    stop: tuple[str, ...] = ()  # stop strings (not included in the text unless asked)
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids besides the tokenizer's end-of-sequence ids
    ignore_eos: bool = False  # keep generating past end-of-sequence ids (benchmarks)
    min_tokens: int = 0  # no stop (id or string) before this many tokens
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # logprobs of generated tokens with this many alternatives (0: the token's own)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (its first token has none)
    n: int = 1  # completions of this prompt, sharing its prefill
    grammar: Grammar | None = None  # constrains the output (structured outputs); each sequence gets a matcher
    arrival_time: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens == 0 and self.n != 1:
            raise ValueError("max_tokens 0 (scoring the prompt) takes n = 1")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")


@dataclass
class RequestOutput:
    """What one step produced for one sequence (new tokens and text since the previous output)."""

    request_id: str
    new_token_ids: list[int]
    delta_text: str
    num_prompt_tokens: int
    num_output_tokens: int
    precision: str  # name of the plan that produced the new tokens
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop id or stop string that ended it (None for EOS)
    error: str | None = None  # set when the engine failed this request, or the server cut it
    # with `error`: engine_failed, drain_timeout when a drain cut it, or grammar_error when the request's
    # grammar failed mid-way (it hit one of the grammar engine's limits: the request's fault, a 400)
    error_code: str = "engine_failed"
    error_param: str | None = None  # with grammar_error: the request field that held the grammar
    index: int = 0  # which of the request's n sequences
    logprobs: list[TokenLogprob] | None = None  # of new_token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the request's first output, when asked
    cumulative_logprob: float | None = None  # of all tokens generated so far, when logprobs were asked
    request_finished: bool = False  # every sequence of the request has finished (the stream may close)
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed


class Sequence:
    """Run-time state of one request inside the engine (touched only by the engine thread)."""

    def __init__(self, request: GenerationRequest, plan: PrecisionPlan, eos_ids: Seq[int] = (), tokenizer: Any = None,
                 index: int = 0) -> None:
        self.request = request
        self.request_id = request.request_id
        self.index = index
        self.eos_ids = tuple(eos_ids)
        self.tokenizer = tokenizer
        self.plan = plan  # the plan of the next step (the controller may change it between steps)
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(request.prompt_ids)  # prompt + generated
        self.num_prompt = len(request.prompt_ids)
        self.num_computed = 0  # leading token_ids already written to the KV cache
        self.num_cached_tokens = 0  # prompt tokens its last admission took from the prefix cache
        self.blocks = SequenceBlocks()
        stop_ids = set(request.stop_token_ids)
        if not request.ignore_eos:
            stop_ids.update(eos_ids)
        self.stop_ids = frozenset(stop_ids)
        self.generator: torch.Generator | None = request.sampling.generator(index)
        self.detok = IncrementalDetokenizer(tokenizer, request.stop, request.include_stop_str_in_output)
        # the grammar's parse state after the output so far (None: unconstrained)
        self.matcher = request.grammar.matcher() if request.grammar is not None else None
        self.error: str | None = None  # why the engine ended this sequence early (goes to the output)
        self.error_code = "engine_failed"
        self.error_param: str | None = None
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.admitted_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        # prompt token logprobs so far (position 0 has none), while the request asks for them
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if request.prompt_logprobs is None else [None]
        self.prompt_logprobs_sent = False
        self.new_logprobs: list[TokenLogprob] = []  # of tokens appended since the last output
        self.cumulative_logprob = 0.0

    @property
    def wants_prompt_rows(self) -> bool:
        """The logits of every prompt row are still needed (prompt logprobs not all computed)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt

    @property
    def wants_logprobs(self) -> bool:
        return self.request.logprobs is not None

    def fork(self, index: int, now: float) -> "Sequence":
        """Sequence `index` of the same request at the end of this one's prompt (before its first token):
        it shares the plan and the state of the prefill; the caller gives it KV blocks and its token."""
        child = Sequence(self.request, self.plan, self.eos_ids, self.tokenizer, index)
        child.token_ids = list(self.request.prompt_ids)
        child.status = self.status
        child.admitted_time = self.admitted_time
        child.first_token_time = child.last_token_time = now
        child.prompt_logprobs = None  # the request's prompt logprobs travel with sequence 0
        return child
    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        """Rows this sequence still has to run before it can sample (prompt chunk, or 1 to decode)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def preempt(self) -> None:
        """Forget the KV state (blocks freed by the caller); the next admission recomputes prompt + output."""
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.num_preemptions += 1

    def append_token(self, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        """Add a sampled token; finish the sequence on a stop id, a stop string, the length limit, or
        when its grammar is complete and admits no further token."""
        self.token_ids.append(token)
        if logprob is not None:
            self.new_logprobs.append(logprob)
            self.cumulative_logprob += logprob.logprob
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        req = self.request
        if self.matcher is not None and not self.matcher.consume_token(token):
            assert req.grammar is not None
            reason = self.matcher.get_error().split("\n", 1)[0]
            self.error = f"{req.grammar.spec.param}: the grammar failed at output token {self.num_output}: {reason}"
            self.error_code, self.error_param = "grammar_error", req.grammar.spec.param
            self.finish(FinishReason.ABORT, None, now)
            return
        may_stop = self.num_output >= req.min_tokens
        if token in self.stop_ids and may_stop:
            self.finish(FinishReason.STOP, None if token not in req.stop_token_ids else token, now)
            return
        hit = self.detok.append(self.output_ids, check_stop=may_stop)
        if hit is not None:
            self.finish(FinishReason.STOP, hit, now)
        elif self.matcher is not None and self.matcher.is_stopped():
            self.finish(FinishReason.STOP, None, now)
        elif self.num_output >= req.max_tokens:
            self.finish(FinishReason.LENGTH, None, now)

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None, now: float | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = time.monotonic() if now is None else now

    def make_output(self, new_ids: list[int], precision: str) -> RequestOutput:
        out = RequestOutput(
            request_id=self.request_id,
            new_token_ids=new_ids,
            delta_text=self.detok.take(self.is_finished),
            num_prompt_tokens=self.num_prompt,
            num_output_tokens=self.num_output,
            precision=precision,
            finished=self.is_finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            index=self.index,
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
            error_code=self.error_code,
            error_param=self.error_param,
        )
        if self.wants_logprobs:
            out.logprobs, self.new_logprobs = self.new_logprobs, []
            out.cumulative_logprob = self.cumulative_logprob
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and not self.wants_prompt_rows:
            out.prompt_logprobs = self.prompt_logprobs
            self.prompt_logprobs_sent = True
        return out
