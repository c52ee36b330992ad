"""`quept build`: turn a source model into an elastic checkpoint (nested round-to-nearest codes).

Calibration (QuEPT, DESIGN §3) refines the affines and trains the adapters; this module builds the
uncalibrated starting point: round-to-nearest master codes, centre-of-bin affines, zero adapters.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from kernels.reference import DEFAULT_WIDTHS
from quept_runtime.backends.base import ElasticWeights
from quept_runtime.checkpoint import write_checkpoint
from quept_runtime.model import linear_names
from quept_runtime.quantizer import check_group_size, check_widths, quantize_nested
from quept_runtime.source import SourceModel

log = logging.getLogger(__name__)

DEFAULT_RANKS: dict[int, int] = {8: 0, 6: 8, 5: 8, 4: 16, 3: 24, 2: 32}


def parse_ranks(text: str, widths: Sequence[int]) -> dict[int, int]:
    """'8:0,6:8,...' -> {8: 0, 6: 8, ...}; every stored width needs a rank."""
    ranks: dict[int, int] = {}
    for item in text.split(","):
        try:
            b, r = item.split(":")
            ranks[int(b)] = int(r)
        except ValueError:
            raise ValueError(f"bad rank item {item!r}; expected WIDTH:RANK, e.g. 4:16") from None
    missing = [b for b in widths if b not in ranks]
    if missing or any(r < 0 for r in ranks.values()):
        raise ValueError(f"ranks {text!r} must give a non-negative rank for every width {list(widths)}")
    return ranks


def default_ranks(widths: Sequence[int]) -> dict[int, int]:
    return {b: DEFAULT_RANKS.get(b, 32) for b in widths}


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, widths: tuple[int, ...], group_size: int, ranks: dict[int, int]
) -> ElasticWeights:
    """Nested RTN codes, centre-of-bin affines and zero adapters (max rank R) for one linear."""
    codes, scales, mins = quantize_nested(weight, widths, group_size)
    n, k = weight.shape
    r_max = max(ranks.values())
    return ElasticWeights(
        codes=codes, scales=scales, mins=mins,
        lora_a=torch.zeros(r_max, k), lora_b=torch.zeros(n, r_max),
        bias=bias, widths=widths, ranks=tuple(ranks[b] for b in widths), group_size=group_size,
    )


def split_state(source: SourceModel) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Dense tensors (kept as they are) and elastic linears (weight, bias) in plan order."""
    names = linear_names(source.args.n_layers)
    linears = {n: (source.state[f"{n}.weight"], source.state.get(f"{n}.bias")) for n in names}
    elastic_keys = {f"{n}.weight" for n in names}
    dense = {k: v for k, v in source.state.items() if k not in elastic_keys}
    return dense, linears


def build_checkpoint(
    source: SourceModel,
    out: Path,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    group_size: int = 64,
    ranks: dict[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Quantize every linear (nested RTN) and write the checkpoint atomically."""
    widths = check_widths(widths)
    ranks = ranks or default_ranks(widths)
    dense, linears = split_state(source)
    for name, (w, _) in linears.items():
        check_group_size(w.shape[1], group_size, name)
    t0 = time.perf_counter()
    elastic = {
        name: quantize_linear(w, b, widths, group_size, ranks)
        for name, (w, b) in tqdm(linears.items(), desc="quantize", unit="linear", disable=not progress)
    }
    meta = {
        "source": source.description,
        "build": {"method": "nested-rtn", "seconds": round(time.perf_counter() - t0, 2)},
        **(extra_meta or {}),
    }
    return write_checkpoint(out, source.hf_config, dense, elastic, meta, source.tokenizer, overwrite)
