"""OpenAI-compatible request bodies (pydantic, strict JSON types) and response/chunk builders.

Request fields follow the OpenAI API plus vLLM's extensions (`top_k`, `stop_token_ids`,
`ignore_eos`, `min_tokens`, `include_stop_str_in_output`) and ours (`precision`). Unknown fields
are ignored, as vLLM does. Fields we do not implement (penalties, `logit_bias`, `suffix`, `echo` in
chat) are refused with a 400 that names them rather than silently ignored. Structured outputs
(`response_format`, `guided_*`, `structured_outputs`) and tools are resolved into a grammar by
`quept.server.structured`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(strict=True, extra="ignore")
MAX_LOGPROBS = 20  # alternatives per token (`logprobs`, `top_logprobs`), as OpenAI allows


class Unsupported(ValueError):
    """A request asks for something this server does not do; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False  # a last chunk with `usage` (and `choices: []`)
    continuous_usage_stats: bool = False  # vLLM: `usage` on every chunk


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's newer form of the guided_* fields; exactly one may be set."""

    model_config = STRICT
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


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
    n: int = Field(1, ge=1)  # the server's --max-n caps it
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
    # structured outputs: OpenAI's response_format, vLLM's guided_* fields and their newer structured_outputs
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark grammar (llguidance's dialect) or GBNF (`root ::= ...`)
    structured_outputs: StructuredOutputs | None = None

    def check(self) -> None:
        """Raise `Unsupported` for the first requested feature this server does not implement."""
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options can only be set when stream is true", "stream_options")
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            if getattr(self, name) != neutral:
                raise Unsupported(f"{name} is not supported (leave presence and frequency penalties at 0 and "
                                  "repetition_penalty at 1)", name)
        if self.logit_bias:
            raise Unsupported("logit_bias is not supported", "logit_bias")

    @property
    def top_logprobs_asked(self) -> int | None:
        """Alternatives per generated token the response carries; None: no logprobs."""
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt (and with logprobs its tokens' logprobs) before the completion
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)  # sample best_of, return the n of highest cumulative logprob

    def check(self) -> None:
        if self.suffix:
            raise Unsupported("suffix is not supported", "suffix")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise Unsupported(f"best_of ({self.best_of}) must be >= n ({self.n})", "best_of")
            if self.stream and self.best_of > self.n:
                raise Unsupported("best_of > n cannot stream (the best completions are known only at the end)",
                                  "best_of")
        super().check()

    @property
    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments; None: any object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

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
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token, with logprobs
    echo: bool = False  # vLLM's chat extension; refused
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True  # with required: one call or several
    add_generation_prompt: bool = True

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs needs logprobs: true", "top_logprobs")
        if self.echo:
            raise Unsupported("echo is not supported in chat completions (use /v1/completions with echo)", "echo")
        super().check()

    @property
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    tokens: list[int]


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


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached`: prompt tokens read from the prefix cache."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None = None, finish: str | None = None,
                      stop_reason: Any = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}


def chat_choice(index: int, text: str | None, logprobs: dict[str, Any] | None = None, finish: str | None = None,
                stop_reason: Any = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish,
            "stop_reason": stop_reason}


def chat_delta_choice(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
                      finish: str | None = None, stop_reason: Any = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}


def response(rid: str, model: str, chat: bool, choices: list[dict[str, Any]], prompt: int, completion: int,
             precision: str, cached: int = 0) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now_s(), "model": model,
            "choices": choices, "usage": usage(prompt, completion, cached), "precision": precision}


def chunk(rid: str, created: int, model: str, chat: bool, choice: dict[str, Any], precision: str | None) -> dict[str, Any]:
    """One streamed chunk holding one choice's delta."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "precision": precision}


def usage_chunk(rid: str, created: int, model: str, obj: str, prompt: int, completion: int,
                cached: int = 0) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt, completion, cached)}


def model_card(model_id: str, root: str, max_model_len: int, parent: str | None = None,
               precision: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": now_s(), "owned_by": "quept",
                            "root": root, "parent": parent, "max_model_len": max_model_len}
    if precision is not None:
        card["precision"] = precision
    return card
