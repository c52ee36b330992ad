"""The tool-call parser (whole and streamed in random pieces give the same answer) and the rendering of
tools and earlier calls into the chat template's messages."""

from __future__ import annotations

import json
import random

import pytest

from quept.server import protocol as P
from quept.server.tools import ToolCallParser, call_grammar, parse_calls, template_messages

TOOLS = [P.Tool(type="function", function=P.FunctionDef(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}})),
    P.Tool(type="function", function=P.FunctionDef(name="get_time"))]


def call(name: str, **args) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


CASES = [
    ("just text", "just text", []),
    (call("get_weather", city="Paris"), None, [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n" + call("get_time") + "\n" + call("get_weather", city="Rome") + "\n",
     "Let me check.", [("get_time", {}), ("get_weather", {"city": "Rome"})]),
    ("a <tool_call>not json</tool_call> b", "a <tool_call>not json</tool_call> b", []),
    (call("unknown_tool", x=1), call("unknown_tool", x=1), []),
    ("x < y and <tool_ maybe", "x < y and <tool_ maybe", []),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),  # unclosed at the end
    ('<tool_call>\n{"name": "get_time", "argu', '<tool_call>\n{"name": "get_time", "argu', []),  # cut off
    ('<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_output(text, content, calls) -> None:
    got_content, got_calls = parse_calls(TOOLS, text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert [c["index"] for c in got_calls] == list(range(len(calls)))


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_streamed_in_random_pieces_equals_whole(text, content, calls) -> None:
    rng = random.Random()
    for _ in range(5):
        parser = ToolCallParser(TOOLS)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out, got = "", []
        for piece in pieces:
            c, k = parser.feed(piece)
            assert "<tool_call>" not in c or not calls, "an opening tag of a real call leaked into the content"
            out, got = out + c, got + k
        c, k = parser.finish()
        out, got = out + c, got + k
        assert (out or None if got else out) == content, pieces
        assert [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in got] == calls


def test_fallback_rendering_puts_tools_in_the_system_message_and_calls_in_the_text() -> None:
    msgs = [P.ChatMessage(role="system", content="Be brief."), P.ChatMessage(role="user", content="weather?"),
            P.ChatMessage(role="assistant", tool_calls=[P.ToolCall(id="c1", function=P.FunctionCall(
                name="get_weather", arguments='{"city": "Rome"}'))]),
            P.ChatMessage(role="tool", tool_call_id="c1", content="sunny")]
    out = template_messages(msgs, TOOLS, native=False)
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"get_time"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert out[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}
    without_system = template_messages(msgs[1:2], TOOLS, native=False)
    assert without_system[0]["role"] == "system" and len(without_system) == 2


def test_native_rendering_keeps_the_structure_for_the_template() -> None:
    msgs = [P.ChatMessage(role="assistant", tool_calls=[P.ToolCall(id="c1", function=P.FunctionCall(
        name="get_time", arguments="{}"))]), P.ChatMessage(role="tool", tool_call_id="c1", content="noon")]
    out = template_messages(msgs, TOOLS, native=True)
    assert out[0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": {}}
    assert out[1] == {"role": "tool", "content": "noon", "tool_call_id": "c1"}


def test_a_template_that_renders_tools_gets_them(tmp_path) -> None:
    from quept.server.tokens import chat_ids
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}" \
                        "{% endfor %}"
    ids = chat_ids(tok, [P.ChatMessage(role="user", content="hi")], True, TOOLS)
    assert tok.decode(ids) == "[get_weather][get_time]hi"


def test_the_forced_call_grammar_names_only_the_chosen_tool() -> None:
    named = call_grammar(TOOLS, "get_time", parallel=True)
    assert "get_weather" not in named.source and "call)*" not in named.source
    assert "call)*" in call_grammar(TOOLS, None, parallel=True).source
    assert "call)*" not in call_grammar(TOOLS, None, parallel=False).source
