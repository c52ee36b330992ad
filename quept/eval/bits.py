"""Bits per weight a forward reads at a precision plan: codes, per-width affines and adapters, lm_head included.

A linear [N, K] at width b reads its b-bit codes (b per weight), that width's affines (an fp16 scale and min per
group of G input columns: 32 / G bits per weight) and its adapter prefix (fp16 A[:r] [r, K] and B[:, :r]
[N, r]: 16 r (N + K) bits), r the width's rank. The total is divided by the elastic weights (sum N K), so
a bits figure is comparable with a uniform quantization's nominal width plus its overhead. The embedding table
and the norms are not counted: a token reads one embedding row, and they are the same at every width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from quept.backends.base import ElasticWeights

AFFINE_BITS = 16  # fp16 scale and fp16 min per group and width, as stored
ADAPTER_BITS = 16


@dataclass(frozen=True)
class ReadBits:
    codes: float
    affines: float
    adapters: float

    @property
    def total(self) -> float:
        return self.codes + self.affines + self.adapters


def read_bits(elastic: Mapping[str, ElasticWeights], names: Sequence[str], widths: Sequence[int]) -> ReadBits:
    """Bits per elastic weight read with linear names[i] at width widths[i]."""
    if len(names) != len(widths):
        raise ValueError(f"{len(names)} linears but {len(widths)} widths")
    params = codes = affines = adapters = 0
    for name, b in zip(names, widths):
        w = elastic[name]
        if b not in w.widths:
            raise ValueError(f"{name} stores widths {list(w.widths)}, not {b}")
        n, k = w.codes.shape
        r = w.ranks[w.widths.index(b)]
        params += n * k
        codes += b * n * k
        affines += 2 * AFFINE_BITS * n * (k // w.group_size)  # as rtn_read_bits counts them
        adapters += ADAPTER_BITS * r * (n + k)
    return ReadBits(codes / params, affines / params, adapters / params)


def rtn_read_bits(bits: int, group_size: int) -> float:
    """Bits per weight an independent round-to-nearest model reads: its codes and one fp16 scale and min per group."""
    return bits + 2 * AFFINE_BITS / group_size
