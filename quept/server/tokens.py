"""The tokenizer over HTTP, in vLLM's shapes: what lm-evaluation-harness's remote tokenizer reads.

    POST /tokenize        {"prompt": text | "messages": [...], "add_special_tokens": true}
                          -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize      {"tokens": [ids]} -> {"prompt": text}
    GET  /tokenizer_info  eos/bos/pad/unk tokens, the chat template, the tokenizer class, the context

They sit at the root (not under /v1), as vLLM's do, behind the same API key and life-cycle gate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request

from quept.server import protocol as P
from quept.server.errors import APIError
from quept.server.state import ServerState
from quept.server.tools import renders_tools, template_messages

TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def chat_ids(tok: Any, messages: Sequence[P.ChatMessage], add_generation_prompt: bool,
             tools: Sequence[P.Tool] = ()) -> list[int]:
    """Token ids of messages (and the tools the model may call) rendered by the model's chat template
    (400 when it has none or rejects them)."""
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    native = renders_tools(tok)
    msgs = template_messages(messages, tools, native)
    extra = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools and native else {}
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False, **extra)
    except Exception as err:  # jinja errors of the model's own template (e.g. role order it refuses)
        raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


def add_tokenizer_routes(app: FastAPI, state: ServerState, check: Callable[[Request], None]) -> None:
    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest, request: Request) -> dict[str, Any]:
        check(request)
        tok = state.loaded.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            where = P.lone_surrogate(body.prompt, "prompt")
            if where:
                raise APIError(400, "prompt: the text holds a lone UTF-16 surrogate", param="prompt")
            text = body.prompt
            ids = await state.off_loop(lambda: list(tok(text, add_special_tokens=body.add_special_tokens)["input_ids"]))
        else:
            assert body.messages is not None
            messages = body.messages
            ids = await state.off_loop(lambda: chat_ids(tok, messages, body.add_generation_prompt))
        strs = [state.token_strings(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest, request: Request) -> dict[str, Any]:
        check(request)
        vocab = state.loaded.model.args.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        tok = state.loaded.tokenizer
        ids = list(body.tokens)
        return {"prompt": await state.off_loop(lambda: tok.decode(ids))}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        check(request)
        tok = state.loaded.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": getattr(tok, "eos_token", None),
            "bos_token": getattr(tok, "bos_token", None),
            "pad_token": getattr(tok, "pad_token", None),
            "unk_token": getattr(tok, "unk_token", None),
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": state.max_model_len,
            "vocab_size": state.loaded.model.args.vocab_size,
        }
