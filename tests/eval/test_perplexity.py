"""Evaluation windows: from the start or from a fraction of the file on, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from quept.eval.perplexity import token_windows


class CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture
def text(tmp_path: Path) -> Path:
    p = tmp_path / "t.txt"
    p.write_text("".join(chr(65 + i % 26) for i in range(1000)))
    return p


def test_windows_from_the_start_and_from_a_fraction(text: Path) -> None:
    ids = [ord(c) for c in text.read_text()]
    assert token_windows(CharTokenizer(), text, 3, 10).flatten().tolist() == ids[:30]
    late = token_windows(CharTokenizer(), text, 4, 50, start=0.6)
    assert late.shape == (4, 50) and late.flatten().tolist() == ids[600:800]


@pytest.mark.parametrize("start,message", [(1.0, "fraction of the file"), (-0.1, "fraction of the file"),
                                           (0.9, "fewer than 4 windows")])
def test_bad_starts_are_refused(text: Path, start: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        token_windows(CharTokenizer(), text, 4, 50, start=start)
