"""The OpenAI-compatible HTTP API (docs/architecture.md §5) over the async engine.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming ending with
`data: [DONE]`), GET /v1/models (with `NAME@wB` aliases), GET /v1/precisions, GET /health,
GET /metrics, GET /version.

Precision of a request, first match wins:
    1. header `X-Precision: <spec>`
    2. body field `"precision": "<spec>"`
    3. model alias `"model": "<name>@<spec>"`
    4. the server default (`--default-precision`, w8)
The response header `X-Precision` (and the body field `precision`) says what ran.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quept.engine.async_engine import EngineFailedError, EngineStoppedError, QueueFullError, RequestStream
from quept.engine.sampler import SamplingParams
from quept.engine.sequence import GenerationRequest, RequestOutput
from quept.errors import ContextLengthError, PrecisionError
from quept.precision.spec import PrecisionSpec
from quept.server import protocol as P
from quept.server.settings import Settings
from quept.server.state import ServerState, Status

log = logging.getLogger(__name__)
VERSION = "0.1.0"


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), self.status, self.headers)


class AbortingStreamingResponse(StreamingResponse):
    """A streaming response that aborts its request however the stream ends (done, error, client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


DOC_PATHS = ("/openapi.json", "/docs", "/redoc")


def key_matches(expected: str, authorization: str | None, x_api_key: str | None) -> bool:
    """`Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time. Header values
    arrive decoded as latin-1 (ASGI), so their bytes are compared with the key's UTF-8 bytes."""
    auth = authorization or ""
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else (x_api_key or "")
    return hmac.compare_digest(token.encode("latin-1", "replace"), expected.encode("utf-8", "replace"))


def check_key(state: ServerState, authorization: str | None, x_api_key: str | None) -> None:
    """401 unless the server has no key or the request carries it."""
    key = state.settings.api_key
    if key and not key_matches(key, authorization, x_api_key):
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                       "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def gate_error(state: ServerState, authorization: str | None, x_api_key: str | None) -> None:
    """API key first (401), then the life cycle (503 while loading, draining or failed)."""
    check_key(state, authorization, x_api_key)
    if state.status is Status.LOADING:
        raise APIError(503, "the model is loading; retry shortly", "service_unavailable", None, "model_loading",
                       {"Retry-After": "5"})
    if state.status in (Status.DRAINING, Status.STOPPED):
        state.metrics.rejected.labels(reason="draining").inc()
        raise APIError(503, "the server is shutting down", "service_unavailable", None, "draining")
    if state.status is Status.FAILED:
        raise APIError(503, f"the model failed to load: {state.error}", "service_unavailable", None, "load_failed")


class GateMiddleware:
    """Pure ASGI middleware in front of every route. For `/v1/*`: the API key and the life cycle
    (`gate_error`), then the body, read here at most `max_request_bytes` (413 past that, before the
    rest arrives) and handed on as JSON whatever its Content-Type says (as llama.cpp's server reads it).
    The schema pages need the key too when one is set."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if path.startswith("/v1/"):
                gate_error(self.state, headers.get("authorization"), headers.get("x-api-key"))
            elif path in DOC_PATHS:
                check_key(self.state, headers.get("authorization"), headers.get("x-api-key"))
            if path.startswith("/v1/") and scope["method"] == "POST":
                body = await self._read_body(headers, receive)
                if body is None:
                    return  # the client went away while sending
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")]}
                receive = _replay(body, receive)
        except APIError as err:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _read_body(self, headers: dict[str, str], receive: Any) -> bytes | None:
        limit = self.state.settings.max_request_bytes
        too_large = APIError(413, f"the request body is larger than the limit of {limit} bytes (--max-request-bytes)",
                             code="request_too_large", headers={"Connection": "close"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that yields the body read already, then the client's later messages (disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def create_app(settings: Settings, loaded: Any = None) -> FastAPI:
    """The FastAPI app; `loaded` (a LoadedModel) skips loading from `settings.checkpoint` (tests)."""
    state = ServerState(settings, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(state.load())
        yield
        if not task.done():
            task.cancel()
        await state.shutdown()

    docs = settings.docs
    app = FastAPI(title="quept", version=VERSION, lifespan=lifespan, openapi_url="/openapi.json" if docs else None,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.quept = state
    app.add_middleware(GateMiddleware, state=state)
    _install_error_handlers(app)

    def check(request: Request) -> None:
        """Routes run only past GateMiddleware (API key, ready); this guards direct calls in tests."""
        gate_error(state, request.headers.get("authorization"), request.headers.get("x-api-key"))

    @app.get("/health")
    async def health() -> Response:
        ok = state.ready and state.engine is not None and state.engine.is_running
        body = {"status": "ok" if ok else state.status.value}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check(request)
        lm, name, ctx = state.loaded, state.model_name, state.max_model_len
        cards = [P.model_card(name, str(lm.ckpt.path), ctx)]
        cards += [P.model_card(f"{name}@w{b}", str(lm.ckpt.path), ctx, parent=name, precision=f"w{b}")
                  for b in lm.widths]
        cards += [P.model_card(f"{name}@{p}", str(lm.ckpt.path), ctx, parent=name, precision=p)
                  for p in _profile_names(lm)]
        return {"object": "list", "data": cards}

    @app.get("/v1/precisions")
    async def precisions(request: Request) -> dict[str, Any]:
        check(request)
        return _precisions(state)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        check(request)
        _check_body(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"{len(prompt)} prompts in one request are not supported; send one per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            tok = state.loaded.tokenizer
            ids = await state.off_loop(lambda: list(tok(prompt)["input_ids"]))
        return await _serve(state, request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        check(request)
        _check_body(body)
        if not body.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        tok = state.loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]

        def template_and_tokenize() -> list[int]:
            try:
                text = tok.apply_chat_template(msgs, add_generation_prompt=body.add_generation_prompt, tokenize=False)
            except Exception as err:  # jinja errors of the model's own template (e.g. role order it refuses)
                raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
            return list(tok(text, add_special_tokens=False)["input_ids"])

        ids = await state.off_loop(template_and_tokenize)
        return await _serve(state, request, body, ids, chat=True)

    return app


# ---------------------------------------------------------------------- helpers


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return APIError(400, msg, code="invalid_json").response()
        where = ".".join(loc) or "body"
        got = first.get("input")
        got_text = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
        return APIError(400, f"{where}: {first.get('msg', 'invalid value')} (got {got_text})", param=where or None,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type_).response()


def _check_body(body: P.SamplingFields) -> None:
    """What the schema cannot say: text that is not Unicode, features we refuse."""
    where = P.lone_surrogate(body.model_dump(), "")
    if where:
        raise APIError(400, f"{where}: the text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid "
                            "Unicode", param=where, code="invalid_value")
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem, code="unsupported")


def _profile_names(lm: Any) -> list[str]:
    profiles = lm.ckpt.meta.get("profiles") or {}
    return sorted(str(p) for p in profiles) if isinstance(profiles, dict) else []


def _precisions(state: ServerState) -> dict[str, Any]:
    lm = state.loaded
    meta = lm.ckpt.meta
    calib = meta.get("calibration") or {}
    ppl = calib.get("perplexity") if isinstance(calib, dict) else None
    ranks = meta.get("ranks", {})
    # an uncalibrated build stores zero adapters: report their effective rank, 0, not the reserved one
    widths = [{"name": f"w{b}", "bits": b, "adapter_rank": ranks.get(str(b)) if lm.adapters_trained else 0,
               "perplexity": ppl.get(f"w{b}", ppl.get(str(b))) if isinstance(ppl, dict) else None}
              for b in lm.widths]
    engine = state.engine.engine if state.engine else None
    ctl = engine.controller if engine else None
    return {
        "default": ctl.default_plan.name if ctl else state.settings.default_precision,
        "backend": lm.backend.name,
        "policy": ctl.name if ctl else state.settings.policy,
        "widths": widths,
        "profiles": meta.get("profiles") or {},
        "calibration": calib or None,
        "adapters": "trained" if lm.adapters_trained else "all zero (uncalibrated build; `quept build --calibrate`)",
        # say where the perplexities come from, or that none were measured (null then means unknown)
        "perplexity_source": "measured at calibration (elastic.json)" if isinstance(ppl, dict) else
                             "not measured for this checkpoint: run `quept eval`",
        "spec": "wB | mixed:X | auto[;min=wA;max=wB]",
        "precedence": ["header X-Precision", "body precision", "model alias NAME@SPEC", "server default"],
        "controller": ctl.report() if ctl else None,  # e.g. the load policy's cost model (ms per plan and batch)
    }


def _resolve_spec(state: ServerState, request: Request, body: P.SamplingFields) -> PrecisionSpec | None:
    """The requested spec by precedence (header, body, alias); None means the server default."""
    name = state.model_name
    alias = None
    if body.model is not None and body.model != name:
        base, sep, rest = body.model.partition("@")
        if base != name or not sep:
            raise APIError(404, f"model {body.model!r} does not exist; available: {name} and aliases {name}@wB",
                           "not_found_error", "model", "model_not_found")
        alias = rest
    header = request.headers.get("x-precision") or None
    for text, param in ((header, "X-Precision"), (body.precision, "precision"), (alias, "model")):
        if text is not None:
            try:
                return state.loaded.parse(text)
            except PrecisionError as err:
                raise APIError(400, str(err), param=param, code="invalid_precision") from None
    return None


def _build_request(state: ServerState, body: P.SamplingFields, ids: list[int], chat: bool,
                   spec: PrecisionSpec | None, request_id: str, arrival: float) -> GenerationRequest:
    if not ids:
        raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
    max_tokens = getattr(body, "max_completion_tokens", None)
    param = "max_completion_tokens"
    if max_tokens is None:  # chat: max_completion_tokens wins over the older max_tokens when both are set
        max_tokens, param = body.max_tokens, "max_tokens"  # type: ignore[attr-defined]
    if max_tokens is None:
        max_tokens = max(1, state.max_model_len - len(ids))
    if max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    try:
        params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=body.seed)
        return GenerationRequest(
            request_id=request_id, prompt_ids=tuple(ids), max_tokens=max_tokens, sampling=params, spec=spec,
            stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
            min_tokens=min(body.min_tokens, max_tokens), include_stop_str_in_output=body.include_stop_str_in_output,
            arrival_time=arrival)
    except ValueError as err:
        raise APIError(400, str(err)) from None


async def _serve(state: ServerState, request: Request, body: P.SamplingFields, ids: list[int], chat: bool) -> Response:
    arrival = time.monotonic()
    spec = _resolve_spec(state, request, body)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    req = _build_request(state, body, ids, chat, spec, rid, arrival)
    engine = state.engine
    assert engine is not None
    try:
        stream = engine.submit(req)
    except ContextLengthError as err:
        raise APIError(400, str(err), param="messages" if chat else "prompt", code="context_length_exceeded") from None
    except PrecisionError as err:
        raise APIError(400, str(err), param="precision", code="invalid_precision") from None
    except QueueFullError as err:
        state.metrics.rejected.labels(reason="queue_full").inc()
        raise APIError(429, str(err), "rate_limit_error", None, "queue_full",
                       {"Retry-After": str(err.retry_after_s)}) from None
    except EngineStoppedError as err:
        raise APIError(503, str(err), "service_unavailable", None, "draining") from None
    except ValueError as err:
        raise APIError(400, str(err)) from None
    headers = {"X-Precision": stream.precision, "X-Request-Id": rid}
    model = body.model or state.model_name
    if body.stream:
        opts = body.stream_options or P.StreamOptions()
        gen = _sse(stream, rid, model, chat, opts)
        return AbortingStreamingResponse(gen, stream.abort, media_type="text/event-stream",
                                         headers={**headers, "Cache-Control": "no-cache"})
    result = await _until_disconnect(request, _collect(stream), stream)
    if result is None:
        return Response(status_code=499)
    text, last = result
    build = P.chat_response if chat else P.completion_response
    reason = last.finish_reason.value if last.finish_reason else None
    return JSONResponse(build(rid, model, text, reason, last.stop_reason, last.num_prompt_tokens,
                              last.num_output_tokens, stream.precision), headers=headers)


async def _collect(stream: RequestStream) -> tuple[str, RequestOutput]:
    parts: list[str] = []
    last: RequestOutput | None = None
    try:
        async for out in stream:
            parts.append(out.delta_text)
            last = out
    except EngineFailedError as err:
        raise _failed(err) from None
    assert last is not None
    return "".join(parts), last


async def _until_disconnect(request: Request, work: Awaitable[Any], stream: RequestStream) -> Any:
    """Await `work`, aborting the request (KV blocks freed) if the client disconnects first; None then."""
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
    stream.abort()
    log.info("client went away; aborted %s", stream.request_id)
    return None


def _failed(err: EngineFailedError) -> APIError:
    """500 when the engine failed the request; 503 when the server cut it short (a drain ran out)."""
    if err.code == "drain_timeout":
        return APIError(503, str(err), "service_unavailable", None, err.code)
    return APIError(500, str(err), "server_error", None, err.code)


def _sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(stream: RequestStream, rid: str, model: str, chat: bool, opts: P.StreamOptions) -> AsyncIterator[str]:
    created = P.now_s()
    obj = "chat.completion.chunk" if chat else "text_completion"
    prompt_n, out_n = stream.num_prompt_tokens, 0
    if chat:
        yield _sse_data(P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, precision=stream.precision))
    try:
        async for out in stream:
            out_n = out.num_output_tokens
            if not out.delta_text and not out.finished:
                continue
            reason = out.finish_reason.value if out.finished and out.finish_reason else None
            stop_reason = out.stop_reason if out.finished else None
            if chat:
                delta = {"content": out.delta_text} if out.delta_text else {}
                chunk = P.chat_chunk(rid, created, model, delta, reason, stop_reason, out.precision)
            else:
                chunk = P.completion_chunk(rid, created, model, out.delta_text, reason, stop_reason, out.precision)
            if opts.continuous_usage_stats:
                chunk["usage"] = P.usage(prompt_n, out_n)
            yield _sse_data(chunk)
    except EngineFailedError as err:
        e = _failed(err)
        yield _sse_data(P.error_body(e.message, e.type, None, e.code))
    if opts.include_usage:
        yield _sse_data(P.usage_chunk(rid, created, model, obj, prompt_n, out_n))
    yield "data: [DONE]\n\n"
