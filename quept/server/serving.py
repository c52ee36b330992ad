"""One completions or chat completions request: the OpenAI body in, engine requests, the answer out.

A body may hold several prompts (completions: a list of strings or of token-id lists); each prompt
is one engine request (`<id>-<i>`, or the response id itself when there is one prompt), and an
engine request asks for `best_of` (else `n`) sequences that share its prefill. Choice `i * n + j` is
sequence j of prompt i (with `best_of`, the n of highest cumulative logprob). `max_tokens: 0` with
`echo` scores the prompt without generating. Logprobs are the model's raw ones at the width that ran
(`quept.server.logprobs` shapes them). Streaming sends one chunk per choice and step; an echoed
prompt comes first, in its own chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quept.engine.async_engine import EngineFailedError, EngineStoppedError, QueueFullError, RequestStream
from quept.engine.sampler import SamplingParams
from quept.engine.sequence import GenerationRequest, RequestOutput, TokenLogprob
from quept.errors import ContextLengthError, PrecisionError
from quept.precision.spec import PrecisionSpec
from quept.server import protocol as P
from quept.server.errors import APIError, failed
from quept.server.logprobs import CompletionLogprobs, TokenStrings, chat_logprobs
from quept.server.state import ServerState
from quept.server.structured import Constraint
from quept.server.tools import ToolCallParser, parse_calls
from quept.structured.grammar import Grammar

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # as the client sent it (what echo returns); None: decode the ids


@dataclass
class Shape:
    """What the response holds besides text, resolved from the body once."""

    n: int  # choices per prompt
    best_of: int  # sequences per prompt (>= n)
    top: int | None  # alternatives per token in the response; None: no logprobs
    echo: bool
    max_tokens: int
    tools: tuple[P.Tool, ...] = ()  # chat: the tools whose calls the parser takes out of the text


@dataclass
class Choice:
    """One sequence's output gathered from the stream."""

    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.parts.append(out.delta_text)
        self.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.last = out


@dataclass
class Gathered:
    """One prompt's sequences, by index, and its prompt logprobs."""

    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None


def shape_of(state: ServerState, body: P.SamplingFields, prompts: list[Prompt], chat: bool,
             tools: tuple[P.Tool, ...] = ()) -> Shape:
    """The response's shape, with a 400 naming the field for what the server will not do."""
    limit = state.settings.max_n
    best_of = getattr(body, "best_of", None) or body.n
    for name, value in (("n", body.n), ("best_of", best_of)):
        if value > limit:
            raise APIError(400, f"{name} ({value}) is over this server's limit of {limit} (--max-n)", param=name)
    queue = state.settings.max_batch + state.settings.max_queue
    if len(prompts) > queue:
        raise APIError(400, f"{len(prompts)} prompts in one request; this server takes at most {queue} "
                            "(max_batch + max_queue)", param="prompt")
    echo = bool(getattr(body, "echo", False))
    max_tokens = getattr(body, "max_completion_tokens", None)
    param = "max_completion_tokens"
    if max_tokens is None:  # chat: max_completion_tokens wins over the older max_tokens when both are set
        max_tokens, param = body.max_tokens, "max_tokens"  # type: ignore[attr-defined]
    if max_tokens is None:
        max_tokens = max(1, state.max_model_len - max(len(p.ids) for p in prompts))
    if max_tokens == 0 and not echo:
        raise APIError(400, f"{param} must be at least 1 (0 only with echo, to score the prompt)", param=param)
    if max_tokens < 0:
        raise APIError(400, f"{param} must be >= 0, got {max_tokens}", param=param)
    if max_tokens == 0 and best_of > 1:
        raise APIError(400, "max_tokens 0 scores the prompt once: n and best_of must be 1", param="n")
    return Shape(body.n, best_of, body.top_logprobs_asked, echo, max_tokens, tools)


def _engine_request(body: P.SamplingFields, prompt: Prompt, shape: Shape, spec: PrecisionSpec | None,
                    request_id: str, arrival: float, grammar: Grammar | None) -> GenerationRequest:
    if not prompt.ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    ranked = shape.best_of > shape.n  # best_of ranks by cumulative logprob: the engine computes them
    logprobs = shape.top if shape.top is not None else (0 if ranked else None)
    try:
        params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed)
        return GenerationRequest(
            request_id=request_id, prompt_ids=tuple(prompt.ids), max_tokens=shape.max_tokens, sampling=params,
            spec=spec, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
            min_tokens=min(body.min_tokens, shape.max_tokens),
            include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs,
            prompt_logprobs=shape.top if shape.echo and shape.top is not None else None, n=shape.best_of,
            grammar=grammar, arrival_time=arrival)
    except ValueError as err:
        raise APIError(400, str(err)) from None


def _submit(state: ServerState, requests: list[GenerationRequest], chat: bool) -> list[RequestStream]:
    """Hand every request to the engine, or none: a refusal aborts those already submitted."""
    engine = state.engine
    assert engine is not None
    streams: list[RequestStream] = []
    try:
        for req in requests:
            streams.append(engine.submit(req))
    except Exception as err:
        for s in streams:
            s.abort()
        raise _refusal(state, err, chat) from None
    return streams


def _refusal(state: ServerState, err: Exception, chat: bool) -> Exception:
    if isinstance(err, ContextLengthError):
        return APIError(400, str(err), param="messages" if chat else "prompt", code="context_length_exceeded")
    if isinstance(err, PrecisionError):
        return APIError(400, str(err), param="precision", code="invalid_precision")
    if isinstance(err, QueueFullError):
        state.metrics.rejected.labels(reason="queue_full").inc()
        return APIError(429, str(err), "rate_limit_error", None, "queue_full", {"Retry-After": str(err.retry_after_s)})
    if isinstance(err, EngineStoppedError):
        return APIError(503, str(err), "service_unavailable", None, "draining")
    if isinstance(err, ValueError):
        return APIError(400, str(err))
    return err


class AbortingStreamingResponse(StreamingResponse):
    """A streaming response that aborts its requests however the stream ends (done, error, client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def serve(state: ServerState, request: Request, body: P.SamplingFields, prompts: list[Prompt], chat: bool,
                spec: PrecisionSpec | None, constraint: Constraint, grammar: Grammar | None) -> Response:
    arrival = time.monotonic()
    shape = shape_of(state, body, prompts, chat, constraint.tools)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    ids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
    streams = _submit(state, [_engine_request(body, p, shape, spec, r, arrival, grammar)
                              for p, r in zip(prompts, ids)], chat)
    headers = {"X-Precision": streams[0].precision, "X-Request-Id": rid}
    model = body.model or state.model_name
    strings = state.token_strings
    abort_all = lambda: [s.abort() for s in streams]
    if shape.echo:
        await _fill_prompt_texts(state, prompts)
    if body.stream:
        gen = _sse(streams, prompts, shape, strings, rid, model, chat, body.stream_options or P.StreamOptions())
        return AbortingStreamingResponse(gen, abort_all, media_type="text/event-stream",
                                         headers={**headers, "Cache-Control": "no-cache"})
    try:
        gathered = await _until_disconnect(request, asyncio.gather(*(_gather(s) for s in streams)), abort_all)
    except BaseException:
        abort_all()  # one prompt failed: the others' sequences stop too
        raise
    if gathered is None:
        return Response(status_code=499)
    build = lambda: _choices(gathered, prompts, shape, strings, chat)
    choices = await state.off_loop(build) if shape.top is not None else build()
    completion = sum(c.last.num_output_tokens for g in gathered for c in g.choices.values() if c.last)
    cached = sum(max((c.last.num_cached_tokens for c in g.choices.values() if c.last), default=0) for g in gathered)
    return JSONResponse(P.response(rid, model, chat, choices, sum(len(p.ids) for p in prompts), completion,
                                   streams[0].precision, cached), headers=headers)


async def _fill_prompt_texts(state: ServerState, prompts: list[Prompt]) -> None:
    """Decode the prompts given as token ids (echo returns text)."""
    missing = [p for p in prompts if p.text is None]
    if missing:
        tok = state.loaded.tokenizer
        texts = await state.off_loop(lambda: [tok.decode(p.ids) for p in missing])
        for p, text in zip(missing, texts):
            p.text = text


async def _gather(stream: RequestStream) -> Gathered:
    got = Gathered()
    try:
        async for out in stream:
            got.choices.setdefault(out.index, Choice()).add(out)
            if out.prompt_logprobs is not None:
                got.prompt_logprobs = out.prompt_logprobs
    except EngineFailedError as err:
        raise failed(err) from None
    return got


def _ranked(got: Gathered, shape: Shape) -> list[Choice]:
    """The prompt's choices in index order; with best_of, the n of highest cumulative logprob."""
    choices = [got.choices[i] for i in sorted(got.choices)]
    if shape.best_of > shape.n:
        choices = sorted(choices, key=lambda c: -(c.last.cumulative_logprob or 0.0) if c.last else 0.0)[: shape.n]
    return choices


def _choices(gathered: list[Gathered], prompts: list[Prompt], shape: Shape, strings: TokenStrings,
             chat: bool) -> list[dict[str, Any]]:
    out = []
    for i, (got, prompt) in enumerate(zip(gathered, prompts)):
        for j, c in enumerate(_ranked(got, shape)):
            last = c.last
            assert last is not None
            text = "".join(c.parts)
            reason = last.finish_reason.value if last.finish_reason else None
            if chat:
                lp = None if shape.top is None else chat_logprobs(c.logprobs, strings, shape.top)
                content, calls = parse_calls(shape.tools, text) if shape.tools else (text, [])
                if calls and reason == "stop":
                    reason = "tool_calls"
                calls = [{k: v for k, v in call.items() if k != "index"} for call in calls]
                out.append(P.chat_choice(i * shape.n + j, content, lp, reason, last.stop_reason, calls))
                continue
            lp = None
            if shape.top is not None:
                builder = CompletionLogprobs(strings)
                if shape.echo:
                    builder.add(got.prompt_logprobs or [None] * len(prompt.ids), prompt.ids)
                    builder.offset = len(prompt.text or "")
                builder.add(c.logprobs, c.token_ids)
                lp = builder.take()
            out.append(P.completion_choice(i * shape.n + j, (prompt.text or "") + text if shape.echo else text, lp,
                                           reason, last.stop_reason))
    return out


async def _until_disconnect(request: Request, work: Awaitable[Any], abort: Callable[[], Any]) -> Any:
    """Await `work`, aborting the requests (KV blocks freed) if the client disconnects first; None then."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    abort()
    log.info("client went away; aborted %s", request.url.path)
    return None


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of several streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue()

    async def pump(k: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((k, out, None))
        except EngineFailedError as err:
            queue.put_nowait((k, None, err))
        finally:
            queue.put_nowait((k, None, None))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                left -= 1
                continue
            yield k, out
    finally:
        for t in tasks:
            t.cancel()


def _sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(streams: list[RequestStream], prompts: list[Prompt], shape: Shape, strings: TokenStrings, rid: str,
               model: str, chat: bool, opts: P.StreamOptions) -> AsyncIterator[str]:
    created = P.now_s()
    obj = "chat.completion.chunk" if chat else "text_completion"
    prompt_n = sum(s.num_prompt_tokens for s in streams)
    out_n: dict[int, int] = {}  # choice -> tokens so far
    cached: dict[int, int] = {}  # prompt -> its tokens read from the prefix cache
    builders: dict[int, CompletionLogprobs] = {}
    parsers: dict[int, ToolCallParser] = {}  # chat with tools: per choice
    called: set[int] = set()  # choices that made a tool call
    prompt_logprobs: dict[int, list[TokenLogprob | None] | None] = {}
    n = shape.n
    if chat:
        for ci in range(len(prompts) * n):
            yield _sse_data(P.chunk(rid, created, model, True, P.chat_delta_choice(ci, {"role": "assistant", "content": ""}),
                                    streams[0].precision))
    try:
        async for k, out in _merged(streams):
            ci = k * n + out.index
            if out.prompt_logprobs is not None:
                prompt_logprobs[k] = out.prompt_logprobs
            if not chat and ci not in out_n:
                out_n[ci] = 0
                builders[ci] = CompletionLogprobs(strings)
                if shape.echo:
                    yield _sse_data(_echo_chunk(prompts[k], prompt_logprobs.get(k), builders[ci], shape, rid, created,
                                                model, ci, out.precision))
            out_n[ci] = out.num_output_tokens
            cached[k] = max(cached.get(k, 0), out.num_cached_tokens)
            has_logprobs = shape.top is not None and bool(out.logprobs)
            if not out.delta_text and not out.finished and not has_logprobs:
                continue
            reason = out.finish_reason.value if out.finished and out.finish_reason else None
            stop_reason = out.stop_reason if out.finished else None
            if chat:
                delta = _chat_delta(out, parsers.setdefault(ci, ToolCallParser(shape.tools)) if shape.tools else None)
                if delta.get("tool_calls"):
                    called.add(ci)
                if reason == "stop" and ci in called:
                    reason = "tool_calls"
                if not delta and not out.finished and not has_logprobs:
                    continue
                lp = chat_logprobs(out.logprobs or [], strings, shape.top) if shape.top is not None else None
                choice = P.chat_delta_choice(ci, delta, lp, reason, stop_reason)
            else:
                lp = None
                if shape.top is not None:
                    builders[ci].add(out.logprobs or [], out.new_token_ids)
                    lp = builders[ci].take()
                choice = P.completion_choice(ci, out.delta_text, lp, reason, stop_reason)
            chunk = P.chunk(rid, created, model, chat, choice, out.precision)
            if opts.continuous_usage_stats:
                chunk["usage"] = P.usage(prompt_n, sum(out_n.values()), sum(cached.values()))
            yield _sse_data(chunk)
    except EngineFailedError as err:
        e = failed(err)
        yield _sse_data(P.error_body(e.message, e.type, None, e.code))
    if opts.include_usage:
        yield _sse_data(P.usage_chunk(rid, created, model, obj, prompt_n, sum(out_n.values()), sum(cached.values())))
    yield "data: [DONE]\n\n"


def _chat_delta(out: RequestOutput, parser: ToolCallParser | None) -> dict[str, Any]:
    """A streamed chat delta: the new text, or with tools the text that is surely content and the calls
    completed in this step (a call's arguments come whole, in the chunk where its closing tag arrives)."""
    if parser is None:
        return {"content": out.delta_text} if out.delta_text else {}
    content, calls = parser.feed(out.delta_text)
    if out.finished:
        rest, more = parser.finish()
        content, calls = content + rest, calls + more
    delta: dict[str, Any] = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = calls
    return delta


def _echo_chunk(prompt: Prompt, logprobs: list[TokenLogprob | None] | None, builder: CompletionLogprobs,
                shape: Shape, rid: str, created: int, model: str, ci: int, precision: str) -> dict[str, Any]:
    """The first chunk of an echoing choice: the prompt's text (and its tokens' logprobs)."""
    text = prompt.text or ""
    lp = None
    if shape.top is not None:
        builder.add(logprobs or [None] * len(prompt.ids), prompt.ids)
        lp = builder.take()
        builder.offset = len(text)
    return P.chunk(rid, created, model, False, P.completion_choice(ci, text, lp), precision)
