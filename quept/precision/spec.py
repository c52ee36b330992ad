"""Precision specs: what a client asks for (`X-Precision`, the body's `precision`, a model alias).

Grammar:
    w8 | w6 | ... | w2            uniform stored width
    mixed:X                       per-layer mix averaging X real bits per weight (2 <= X <= 8)
    auto                          the controller decides
    auto;min=wA;max=wB            ... within bounds
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from quept.errors import PrecisionError

_UNIFORM = re.compile(r"^w([1-8])$")
_MIXED = re.compile(r"^mixed:([0-9]+(?:\.[0-9]+)?)$")


@dataclass(frozen=True)
class PrecisionSpec:
    kind: str  # "uniform" | "mixed" | "auto"
    bits: int | None = None  # uniform width
    target: float | None = None  # mixed average bits per weight
    min_bits: int | None = None  # auto bounds
    max_bits: int | None = None

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"w{self.bits}"
        if self.kind == "mixed":
            return f"mixed:{self.target:g}"
        bounds = [f"min=w{self.min_bits}"] if self.min_bits else []
        bounds += [f"max=w{self.max_bits}"] if self.max_bits else []
        return ";".join(["auto", *bounds])


MAX_SHOWN = 40  # characters of a bad spec quoted back in an error (a client may send kilobytes)


def _shown(text: str) -> str:
    return repr(text) if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]!r}... ({len(text)} characters)"


def parse_spec(text: str, widths: Sequence[int]) -> PrecisionSpec:
    """Parse and validate a spec against the stored widths; errors name the bad value and the allowed ones."""
    if not isinstance(text, str):
        raise PrecisionError(f"precision must be a string, got {type(text).__name__}")
    shown = _shown(text)
    spec = text.strip().lower()
    allowed = ", ".join(f"w{b}" for b in widths)
    m = _UNIFORM.match(spec)
    if m:
        bits = int(m.group(1))
        if bits not in widths:
            raise PrecisionError(f"precision {shown}: width {bits} is not stored; stored widths are {allowed}")
        return PrecisionSpec("uniform", bits=bits)
    m = _MIXED.match(spec)
    if m:
        target = float(m.group(1))
        if not min(widths) <= target <= max(widths):
            raise PrecisionError(f"precision {shown}: mixed target must be between {min(widths)} and {max(widths)} bits")
        return PrecisionSpec("mixed", target=target)
    parts = spec.split(";")
    if parts[0] == "auto":
        bounds: dict[str, int] = {}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            mw = _UNIFORM.match(value.strip())
            if key.strip() not in ("min", "max") or not mw:
                raise PrecisionError(f"precision {shown}: bad auto bound {_shown(part)}; expected min=wB or max=wB")
            bits = int(mw.group(1))
            if bits not in widths:
                raise PrecisionError(f"precision {shown}: width {bits} is not stored; stored widths are {allowed}")
            bounds[key.strip()] = bits
        lo, hi = bounds.get("min"), bounds.get("max")
        if lo is not None and hi is not None and lo > hi:
            raise PrecisionError(f"precision {shown}: min=w{lo} is above max=w{hi}")
        return PrecisionSpec("auto", min_bits=lo, max_bits=hi)
    raise PrecisionError(f"malformed precision {shown}; expected one of {allowed}, mixed:X (e.g. mixed:3.5) or auto[;min=wA;max=wB]")
