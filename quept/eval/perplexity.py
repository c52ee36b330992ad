"""Perplexity on fixed windows of a text file (docs/architecture.md §6): `quept eval`.

Protocol: the file is tokenized once (no special tokens); `windows` consecutive non-overlapping
windows of `seq_len` tokens are scored, from its start or from a fraction `start` of its tokens on
(held-out windows: text no calibration or tuning has seen), each from an empty cache; perplexity is
exp(mean next-token NLL) over all scored tokens. Every row of a table uses the same windows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quept.model.model import ElasticModel
from quept.model.runner import score_sequence
from quept.precision.plan import PrecisionPlan

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    name: str  # e.g. "nested w4", "independent-rtn w4", "unquantized"
    kind: str  # "unquantized" | "independent-rtn" | "nested" | "calibrated" | "mixed" ...
    bits: float  # nominal bits per weight: the codes' width, averaged over the elastic linears (16 unquantized)
    ppl: float
    nll: float
    seconds: float
    read_bits: float | None = None  # bits per weight a forward reads: codes + affines + adapters (quept.eval.bits)


def token_windows(tokenizer: Any, path: Path, windows: int, seq_len: int, start: float = 0.0) -> torch.Tensor:
    """`windows` consecutive windows of `seq_len` tokens of `path` from token int(start * total): [windows, seq_len]."""
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file {path} not found")
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be a fraction of the file in [0, 1), got {start}")
    text = path.read_text(encoding="utf-8")
    if start == 0.0:  # tokenize only as much text as the windows need (about 4 characters per token, doubled)
        text = text[: windows * seq_len * 8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    first = int(start * len(ids))
    if len(ids) - first < windows * seq_len:
        raise ValueError(f"{path} has {len(ids) - first} tokens from {start:.0%} of the file on, fewer than "
                         f"{windows} windows of {seq_len}")
    return torch.tensor(ids[first : first + windows * seq_len], dtype=torch.int64).view(windows, seq_len)


def window_nll(model: ElasticModel, window: torch.Tensor, plan: PrecisionPlan) -> tuple[float, int]:
    """Summed next-token NLL of one window [L] and the number of scored tokens."""
    logits = score_sequence(model, window, plan)  # [L, V]
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum")
    return float(nll), window.shape[0] - 1


def perplexity(
    model: ElasticModel, windows: torch.Tensor, plan: PrecisionPlan, desc: str = "", progress: bool = True
) -> tuple[float, float]:
    """(perplexity, mean NLL) over windows [W, L]."""
    total, count = 0.0, 0
    for w in tqdm(windows, desc=desc, unit="window", leave=False, disable=not progress):
        nll, n = window_nll(model, w, plan)
        total, count = total + nll, count + n
    mean = total / count
    return math.exp(mean), mean


Job = tuple[str, str, float, float | None, Callable[[], tuple[ElasticModel, PrecisionPlan]]]


def run_rows(windows: torch.Tensor, jobs: Iterable[Job], progress: bool = True) -> list[EvalRow]:
    """Evaluate each (name, kind, bits, read_bits, make_model) job on the same windows."""
    rows = []
    for name, kind, bits, read, make in jobs:
        t0 = time.perf_counter()
        model, plan = make()
        ppl, nll = perplexity(model, windows, plan, desc=name, progress=progress)
        rows.append(EvalRow(name, kind, bits, ppl, nll, round(time.perf_counter() - t0, 1), read))
        log.info("%s: ppl %.3f", name, ppl)
    return rows


def results_json(rows: list[EvalRow], protocol: dict[str, Any], command: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"command": command, "protocol": protocol, "rows": [asdict(r) for r in rows], **(extra or {})}


def format_table(rows: list[EvalRow]) -> str:
    lines = [f"{'model':<28} {'bits/w':>7} {'read':>7} {'ppl':>10} {'seconds':>8}"]
    lines += [f"{r.name:<28} {r.bits:>7.2f} {'-' if r.read_bits is None else f'{r.read_bits:.2f}':>7} {r.ppl:>10.3f} "
              f"{r.seconds:>8.1f}" for r in rows]
    return "\n".join(lines)


def plot_rows(rows: list[EvalRow], out_png: Path, title: str) -> None:
    """Perplexity against bits per weight, one curve per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r.kind for r in rows):
        pts = sorted((r.bits if r.read_bits is None else r.read_bits, r.ppl) for r in rows if r.kind == kind)
        if kind == "unquantized":
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=f"unquantized ({pts[0][1]:.1f})")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight read (codes + affines + adapters, lm_head included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
