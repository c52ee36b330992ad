"""The logprob response shapes, on a stub tokenizer whose ids 3 and 4 decode to the same text."""

from __future__ import annotations

from quept.engine.sequence import TokenLogprob
from quept.server.logprobs import CompletionLogprobs, TokenStrings, chat_logprobs


class Tok:
    TEXT = {1: "He", 2: "llo", 3: "\ufffd", 4: "\ufffd", 5: " world"}

    def __init__(self) -> None:
        self.calls = 0

    def decode(self, ids: list[int]) -> str:
        self.calls += 1
        return "".join(self.TEXT[i] for i in ids)


def test_completion_shape_offsets_and_the_token_in_its_top_dict():
    tok = Tok()
    strings = TokenStrings(tok)
    b = CompletionLogprobs(strings)
    b.add([None, TokenLogprob(2, -0.5, ((1, -0.2), (2, -0.5)))], [1, 2])
    b.add([TokenLogprob(4, -1.5, ((3, -1.0), (4, -1.5), (5, -2.0)))], [4])
    out = b.take()
    assert out["tokens"] == ["He", "llo", "\ufffd"]
    assert out["token_logprobs"] == [None, -0.5, -1.5]
    assert out["text_offset"] == [0, 2, 5]
    assert out["top_logprobs"][0] is None
    assert out["top_logprobs"][1] == {"He": -0.2, "llo": -0.5}
    # ids 3 and 4 share a text: the key holds the likelier id's logprob, so token 4 does not read as greedy
    assert out["top_logprobs"][2] == {"\ufffd": -1.0, " world": -2.0}
    assert b.take() == {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    b.add([TokenLogprob(5, -0.1)], [5])
    assert b.take()["text_offset"] == [6]  # offsets run on across takes (a stream's chunks)
    assert tok.calls == 5  # each id decoded once


def test_chat_shape_has_exactly_top_alternatives_and_bytes():
    strings = TokenStrings(Tok())
    out = chat_logprobs([TokenLogprob(5, -0.25, ((5, -0.25), (1, -2.0), (2, -3.0)))], strings, 2)
    assert out["refusal"] is None
    [item] = out["content"]
    assert item["token"] == " world" and item["logprob"] == -0.25 and item["bytes"] == list(b" world")
    assert [t["token"] for t in item["top_logprobs"]] == [" world", "He"]
    assert chat_logprobs([TokenLogprob(1, -1.0)], strings, 0)["content"][0]["top_logprobs"] == []
