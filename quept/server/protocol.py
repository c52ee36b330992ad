"""OpenAI-compatible request bodies (pydantic, strict JSON types) and response/chunk builders.

Request fields follow the OpenAI API plus vLLM's extensions (`top_k`, `stop_token_ids`,
`ignore_eos`, `min_tokens`, `include_stop_str_in_output`) and ours (`precision`). Unknown fields
are ignored, as vLLM does. Fields we do not implement (`logprobs`, `echo`, `n > 1`, penalties,
`logit_bias`, tools) are refused with a 400 that names them rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(strict=True, extra="ignore")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False  # a last chunk with `usage` (and `choices: []`)
    continuous_usage_stats: bool = False  # vLLM: `usage` on every chunk


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = STRICT
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 disables
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what a 64-bit generator seed holds
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    user: str | None = None
    precision: str | None = None  # quept: precision spec (w8..w2, mixed:X, auto[;min=wA;max=wB])

    def unsupported(self) -> str | None:
        """Name of the first requested feature this server does not implement, else None."""
        if self.stream_options is not None and not self.stream:
            return "stream_options can only be set when stream is true"
        if self.n != 1:
            return f"n={self.n} is not supported (only n=1)"
        if self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0:
            return "presence_penalty, frequency_penalty and repetition_penalty are not supported (leave them at 0/0/1)"
        if self.logit_bias:
            return "logit_bias is not supported"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.logprobs is not None:
            return "logprobs is not supported"
        if self.echo:
            return "echo is not supported"
        if self.suffix:
            return "suffix is not supported"
        if self.best_of not in (None, 1):
            return f"best_of={self.best_of} is not supported (only 1)"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs is not supported"
        if self.tools:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return f"response_format {self.response_format.get('type')!r} is not supported (only text)"
        return super().unsupported()


def lone_surrogate(value: Any, where: str) -> str | None:
    """Where a string in a parsed body holds a lone UTF-16 surrogate (JSON allows "\\ud800"; it is not
    text and no tokenizer can encode it), e.g. `messages.0.content`; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """The OpenAI error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_response(rid: str, model: str, text: str, finish: str | None, stop_reason: Any,
                        prompt: int, completion: int, precision: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": now_s(), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}],
        "usage": usage(prompt, completion), "precision": precision,
    }


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None,
                     stop_reason: Any = None, precision: str | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}],
        "precision": precision,
    }


def chat_response(rid: str, model: str, text: str, finish: str | None, stop_reason: Any,
                  prompt: int, completion: int, precision: str) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": now_s(), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish, "stop_reason": stop_reason}],
        "usage": usage(prompt, completion), "precision": precision,
    }


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
               stop_reason: Any = None, precision: str | None = None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}],
        "precision": precision,
    }


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt: int, completion: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt, completion)}


def model_card(model_id: str, root: str, max_model_len: int, parent: str | None = None,
               precision: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": now_s(), "owned_by": "quept",
                            "root": root, "parent": parent, "max_model_len": max_model_len}
    if precision is not None:
        card["precision"] = precision
    return card
