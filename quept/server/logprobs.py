"""Token logprobs in the two OpenAI response shapes.

The engine hands back `TokenLogprob`s (token id, logprob, the top alternatives as ids). The legacy
completions shape is `{tokens, token_logprobs, top_logprobs, text_offset}`: parallel lists over the
choice's tokens, `top_logprobs[i]` a dict token string -> logprob holding the top alternatives and
the token itself (as vLLM does: lm-evaluation-harness reads a token as greedy when its logprob is the
dict's maximum; ids that decode to the same text share a key holding the likeliest one's logprob, so
a token that was not the most likely never reads as greedy), `text_offset[i]` where token i's text
starts in the choice's text, an echoed prompt's first token `null` throughout. The chat shape is `{"content": [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}, ...]}]}` with exactly `top_logprobs` alternatives.
Token strings are each token decoded alone, memoized per id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from quept.engine.sequence import TokenLogprob


class TokenStrings:
    """The text of single tokens, decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._memo.get(token_id)
        if text is None:
            text = self._memo[token_id] = self._tokenizer.decode([token_id])
        return text


@dataclass
class CompletionLogprobs:
    """The legacy completions shape, built token by token (a stream sends one piece per chunk)."""

    strings: TokenStrings
    offset: int = 0  # where the next token's text starts in the choice's text
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int]) -> None:
        """Append tokens `token_ids` with their logprobs (None: the prompt's first token, which has none)."""
        for token, entry in zip(token_ids, entries):
            text = self.strings(token)
            self.tokens.append(text)
            self.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            self.token_logprobs.append(entry.logprob)
            top: dict[str, float] = {}
            for t, lp in entry.top:  # most likely first: ids of the same text keep the likeliest
                top.setdefault(self.strings(t), lp)
            top.setdefault(text, entry.logprob)  # the token itself, when its text is not there yet
            self.top_logprobs.append(top)

    def take(self) -> dict[str, Any]:
        """What was added since the last take, in the response shape (and start afresh)."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def chat_logprobs(entries: Sequence[TokenLogprob], strings: TokenStrings, top: int) -> dict[str, Any]:
    """The chat shape of generated tokens' logprobs with `top` alternatives each."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = strings(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:top]]}
               for e in entries]
    return {"content": content, "refusal": None}
