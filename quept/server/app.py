"""The OpenAI-compatible HTTP API (docs/architecture.md §5) over the async engine.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming ending with
`data: [DONE]`; `quept.server.serving` answers both), GET /v1/models (with `NAME@wB` aliases),
GET /v1/precisions, POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes, what
lm-evaluation-harness reads), GET /health, GET /metrics, GET /version.

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from quept.errors import PrecisionError
from quept.precision.spec import PrecisionSpec
from quept.server import protocol as P
from quept.server.errors import APIError
from quept.server.serving import Prompt, serve
from quept.server.settings import Settings
from quept.server.state import ServerState, Status
from quept.server.structured import Constraint, constraint_of
from quept.server.tokens import TOKENIZER_PATHS, add_tokenizer_routes, chat_ids
from quept.structured.grammar import Grammar, GrammarError

log = logging.getLogger(__name__)
VERSION = "0.1.0"


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
    """Pure ASGI middleware in front of every route. For `/v1/*` and the tokenizer routes: the API key and the life cycle
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
            api = path.startswith("/v1/") or path in TOKENIZER_PATHS
            if api:
                gate_error(self.state, headers.get("authorization"), headers.get("x-api-key"))
            elif path in DOC_PATHS:
                check_key(self.state, headers.get("authorization"), headers.get("x-api-key"))
            if api and scope["method"] == "POST":
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
        spec = _resolve_spec(state, request, body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # type: ignore[list-item]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        if texts:
            tok = state.loaded.tokenizer
            encoded = iter(await state.off_loop(lambda: [list(tok(t)["input_ids"]) for t in texts]))
            prompts = [Prompt(next(encoded), p) if isinstance(p, str) else Prompt(list(p)) for p in prompt]
        else:
            prompts = [Prompt(list(p)) for p in prompt]  # type: ignore[arg-type]
        constraint = constraint_of(body)
        return await serve(state, request, body, prompts, False, spec, constraint, await _grammar(state, constraint))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        check(request)
        _check_body(body)
        spec = _resolve_spec(state, request, body)
        if not body.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        constraint = constraint_of(body)
        grammar = await _grammar(state, constraint)
        tok = state.loaded.tokenizer
        ids = await state.off_loop(lambda: chat_ids(tok, body.messages, body.add_generation_prompt, constraint.tools))
        return await serve(state, request, body, [Prompt(ids)], True, spec, constraint, grammar)

    add_tokenizer_routes(app, state, check)
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
    try:
        body.check()
    except P.Unsupported as err:
        raise APIError(400, str(err), param=err.param, code="unsupported") from None


async def _grammar(state: ServerState, constraint: Constraint) -> Grammar | None:
    """The request's compiled grammar (None: unconstrained); a 400 naming the field when it does not compile."""
    if constraint.grammar is None:
        return None
    try:
        return await state.compile_grammar(constraint.grammar)
    except GrammarError as err:
        raise APIError(400, str(err), param=err.param, code="invalid_value") from None


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
