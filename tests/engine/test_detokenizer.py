"""Incremental detokenization: UTF-8 sequences split over tokens are completed before release, and a
stop string split across tokens never reaches a streaming client."""

from __future__ import annotations

from quept.engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Token id i is the byte i (a byte-level tokenizer: multi-byte characters span several tokens)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(det: IncrementalDetokenizer, text: str) -> tuple[list[str], str | None]:
    """Append the bytes of `text` one token at a time; the deltas handed out and the stop hit."""
    ids: list[int] = []
    deltas = []
    for b in text.encode():
        ids.append(b)
        hit = det.append(ids, check_stop=True)
        deltas.append(det.take(finished=hit is not None))
        if hit is not None:
            return deltas, hit
    return deltas, None


def test_multibyte_characters_wait_for_their_last_byte() -> None:
    det = IncrementalDetokenizer(ByteTokenizer())
    deltas, _ = feed(det, "é€!")  # 2 + 3 + 1 bytes
    assert deltas == ["", "é", "", "", "€", "!"]
    assert "\\ufffd" not in "".join(deltas) and det.text == "é€!"


def test_a_split_stop_string_is_held_back_and_cut() -> None:
    det = IncrementalDetokenizer(ByteTokenizer(), stop=["END"])
    deltas, hit = feed(det, "abcENDxyz")
    assert hit == "END"
    assert "".join(deltas) == "abc"  # the stop string and what follows never left
    assert all("E" not in d for d in deltas)


def test_include_stop_keeps_the_stop_string() -> None:
    det = IncrementalDetokenizer(ByteTokenizer(), stop=["END"], include_stop=True)
    deltas, hit = feed(det, "abENDz")
    assert hit == "END" and "".join(deltas) == "abEND"


def test_held_back_text_is_released_when_finished_without_a_stop() -> None:
    det = IncrementalDetokenizer(ByteTokenizer(), stop=["STOP"])
    deltas, hit = feed(det, "hello ST")
    assert hit is None and "".join(deltas) == "hello"  # "ST" could still become "STOP"
    assert det.take(finished=True) == " ST"


def test_no_tokenizer_gives_no_text() -> None:
    det = IncrementalDetokenizer(None, stop=["x"])
    assert det.append([1, 2], check_stop=True) is None and det.take(finished=True) == ""
