"""Tool calling on chat: tools into the prompt, the grammar of a forced call, calls out of the text.

The format is Hermes's (what Qwen2.5 and many open models are trained on): the tools' JSON
signatures inside `<tools></tools>` in the system prompt, and each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders tools itself (it mentions `tools`) gets them and the messages'
`tool_calls` as Hugging Face defines them; otherwise the tools text joins the system message, an
assistant's earlier calls become its text and a tool's answer is wrapped in `<tool_response>`.
`tool_choice: required` or a named function constrains the output to calls (one, or several with
`parallel_tool_calls`) whose arguments follow the function's `parameters` schema, so they always
parse; `auto` lets the model choose, and the parser picks up the calls it made.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from quept.server import protocol as P
from quept.structured.grammar import GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HOLD = re.compile(r"\s+$")


def tools_prompt(tools: Sequence[P.Tool]) -> str:
    """The system-prompt text that describes the tools and the call format."""
    signatures = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}')


def format_call(call: P.ToolCall) -> str:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return f"{OPEN}\n{json.dumps({'name': call.function.name, 'arguments': arguments})}\n{CLOSE}"


def renders_tools(tok: Any) -> bool:
    """Whether the model's chat template renders `tools` itself."""
    return "tools" in (getattr(tok, "chat_template", None) or "")


def template_messages(messages: Sequence[P.ChatMessage], tools: Sequence[P.Tool] | None,
                      native: bool) -> list[dict[str, Any]]:
    """The messages as the chat template gets them (`native`: it renders tools and tool_calls itself)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls and native:
            msg["tool_calls"] = [{"type": "function", "id": c.id, "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        elif m.tool_calls:
            msg["content"] = "\n".join(([msg["content"]] if msg["content"] else []) + [format_call(c)
                                                                                       for c in m.tool_calls])
        if role == "tool" and native and m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        elif role == "tool":
            msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
        out.append(msg)
    if tools and not native:
        text = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _call_schema(tool: P.Tool) -> dict[str, Any]:
    params = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(tools: Sequence[P.Tool], name: str | None, parallel: bool) -> GrammarSpec:
    """Output that is only tool calls: to the function `name`, else to any of `tools` (one, or several
    separated by a newline when `parallel`)."""
    chosen = [t for t in tools if name is None or t.function.name == name]
    schemas = [_call_schema(t) for t in chosen]
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    repeat = ' ("\\n" call)*' if parallel and name is None else ""
    lark = (f"start: call{repeat}\n"
            f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}\n"
            f"body: %json {json.dumps(schema)}\n")
    return GrammarSpec("grammar", lark, "tools")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Splits generated text into content and tool calls as it streams: `feed` returns the content that
    is certain to be content and the calls completed so far; `finish` flushes. A block that does not
    parse as a call to one of the tools stays in the content."""

    def __init__(self, tools: Sequence[P.Tool]) -> None:
        self.names = {t.function.name for t in tools}
        self.buffer = ""
        self.inside = False
        self.pending_space = ""  # whitespace held until it is followed by content (dropped around calls)
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        content, calls = [], []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(CLOSE):]
                self.inside = False
                self._block(body, content, calls, closed=True)
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                content.append(self._content(self.buffer[:start]))
                self.buffer, self.inside = self.buffer[start + len(OPEN):], True
                continue
            keep = _partial_tag(self.buffer)
            content.append(self._content(self.buffer[: len(self.buffer) - keep]))
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        if self.inside:
            self._block(self.buffer, content, calls, closed=False)
        else:
            content.append(self._content(self.buffer))
        self.buffer = ""
        if not self.num_calls:
            content.append(self.pending_space)
        self.pending_space = ""
        return "".join(content), calls

    def _content(self, text: str) -> str:
        """Content to emit now: held whitespace goes out only before non-whitespace."""
        if not text:
            return ""
        text = self.pending_space + text
        if text.strip():
            tail = _HOLD.search(text)
            self.pending_space = tail.group(0) if tail else ""
            return text[: len(text) - len(self.pending_space)]
        self.pending_space = text
        return ""

    def _block(self, body: str, content: list[str], calls: list[dict[str, Any]], closed: bool) -> None:
        call = self._parse(body)
        if call is None:
            content.append(self._content(OPEN + body + (CLOSE if closed else "")))
            return
        self.pending_space = ""
        calls.append({"index": self.num_calls, "id": new_call_id(), "type": "function", "function": call})
        self.num_calls += 1

    def _parse(self, body: str) -> dict[str, str] | None:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        return {"name": obj["name"], "arguments": json.dumps(arguments)}


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the opening tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


def parse_calls(tools: Sequence[P.Tool], text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole output: (content or None when there is none, calls)."""
    parser = ToolCallParser(tools)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    content, calls = content + rest, calls + more
    return (content or None) if calls else content, calls
