"""Incremental detokenization: the text of generated ids a few tokens at a time, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any


class IncrementalDetokenizer:
    """Text of the generated ids, decoded a few tokens at a time (vLLM's prefix/read offsets).

    Stop strings are searched in the new text; while a sequence runs, the last
    `len(longest stop) - 1` characters are held back so that a stop string split across tokens
    never reaches a streaming client.
    """

    def __init__(self, tokenizer: Any, stop: Seq[str] = (), include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.include_stop = include_stop
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.released = 0  # characters of `text` already handed out
        self.hold = 0 if include_stop or not self.stop else max(len(s) for s in self.stop) - 1

    def append(self, ids: list[int], check_stop: bool) -> str | None:
        """Decode the newest id of `ids` (all generated ids); return the stop string hit, if any."""
        if self.tokenizer is None:
            return None
        decode = self.tokenizer.decode
        prefix = decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        new = full[len(prefix) :]
        old_len = len(self.text)
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        if not (check_stop and self.stop):
            return None
        for s in self.stop:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                self.text = self.text[: i + len(s) if self.include_stop else i]
                return s
        return None

    def take(self, finished: bool) -> str:
        """Text not yet handed out (all of it once finished, else all but the held-back tail)."""
        end = len(self.text) if finished else max(self.released, len(self.text) - self.hold)
        delta = self.text[self.released : end]
        self.released = end
        return delta
