"""`quept build`: turn a source model into an elastic checkpoint (nested round-to-nearest codes).

Calibration (QuEPT, docs/architecture.md §3) refines the affines and trains the adapters; this module builds the
uncalibrated starting point: round-to-nearest master codes, centre-of-bin affines, zero adapters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from quept.backends.base import ElasticWeights
from quept.build.quantizer import check_group_size, check_widths, quantize_nested
from quept.build.source import SourceModel
from quept.kernels.reference import DEFAULT_WIDTHS
from quept.model.args import linear_names
from quept.model.checkpoint import write_checkpoint

log = logging.getLogger(__name__)

DEFAULT_RANKS: dict[int, int] = {8: 0, 6: 8, 5: 8, 4: 16, 3: 24, 2: 32}
DEFAULT_GROUP_SIZE = 64  # docs/architecture.md §1
# GGML's K-quants (Q2_K..Q8_K, the IQ and TQ types) pack 256-column super-blocks whose 16- or 32-column
# sub-blocks carry their own (quantized) scales and mins, so no group size reproduces them exactly and one
# 256-wide group would be 4x coarser than the default: for those the default group size stays.
GGML_SUPER_BLOCK = 256
DEFAULT_CHECKPOINT_STEM = "smollm2-135m-instruct"


class GroupSizeChoice(NamedTuple):
    group_size: int
    reason: str

    @property
    def note(self) -> str:
        return f"group size {self.group_size}: {self.reason}"


def default_group_size(
    block_size: int | None, in_features: Iterable[int], block_types: Sequence[str] = ()
) -> GroupSizeChoice:
    """The group size `quept build` uses when none is given: the source's quantization block, else 64.

    A block-quantized source (GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: one scale, and for _1 an offset, per 32 input
    columns) gets groups aligned with its blocks. For Q4_1 (levels min + q*d, q in 0..15 spanning the
    block's range) the 255 steps of an 8-bit group hold every level exactly (255 = 17 * 15), so the w8
    model reproduces the source; 64-wide groups straddle two blocks and do not. The block is used when it
    is a multiple of 32, narrower than a K-quant super-block, and divides every linear's input width K.
    """
    ks = sorted(set(int(k) for k in in_features))
    kind = "/".join(block_types) + " " if block_types else ""
    if block_size is None:
        return GroupSizeChoice(DEFAULT_GROUP_SIZE, "the default (the source has no common quantization block)")
    if block_size >= GGML_SUPER_BLOCK:
        return GroupSizeChoice(DEFAULT_GROUP_SIZE, f"the default (the source's {kind}block of {block_size} is a "
                               "super-block of sub-blocks with their own scales, which no group size reproduces)")
    if block_size % 32:
        return GroupSizeChoice(DEFAULT_GROUP_SIZE,
                               f"the default (the source's {kind}block of {block_size} is not a multiple of 32)")
    bad = [k for k in ks if k % block_size]
    if bad:
        return GroupSizeChoice(DEFAULT_GROUP_SIZE,
                               f"the default (the source's {kind}block of {block_size} does not divide K={bad[0]})")
    return GroupSizeChoice(block_size, f"the source's {kind}block size")


DEFAULT_AFFINE = "lsq"  # `quept build`'s per-width affines (quantizer.quantize_nested): better than "centre" at every width
# `quept build`'s codes: the top 4 bits are each group's own 4-bit RTN codes (quantizer.anchored_nested_codes).
# Default model, 8 windows of test.txt, against min/max codes (both lsq): w8 27.611 -> 27.605, w6 28.13 -> 27.67,
# w5 30.95 -> 27.80, w4 30.30 -> 28.77 (independent RTN 29.11), w3 94.1 -> 90.7, w2 7.3e4 -> 5.3e4
DEFAULT_ANCHOR_BITS = 4


def default_checkpoint_name(group_size: int, affine: str = DEFAULT_AFFINE, calibrated: bool = False,
                            anchor_bits: int | None = DEFAULT_ANCHOR_BITS) -> str:
    """Directory name of the default model's checkpoint in a cache; it carries the build recipe (group size,
    affine fit and code anchor, or calibration), so that a cache built with another recipe is not reused."""
    if calibrated:  # the calibration recipe: the lm_head's code anchor is its part that changed
        from quept.build.calibration import CalibConfig

        return f"{DEFAULT_CHECKPOINT_STEM}-g{group_size}-cal-a{CalibConfig.head_anchor_bits}"
    return f"{DEFAULT_CHECKPOINT_STEM}-g{group_size}-{affine}" + (f"-a{anchor_bits}" if anchor_bits else "")


def default_checkpoint_dir(cache_dir: str | Path, calibrated: bool = False) -> Path:
    """`<cache_dir>/checkpoints/<name>`: where `quept serve` and the benchmarks build the default model once.

    The group size is the one `build_checkpoint(load_source(None), ..., group_size=None)` chooses, read from
    the default GGUF's tensor headers (no weights loaded).
    """
    from quept.build.source import default_source_path, read_quant_blocks

    blocks = read_quant_blocks(default_source_path())
    choice = default_group_size(blocks.block_size, blocks.in_features, blocks.types)
    return Path(cache_dir) / "checkpoints" / default_checkpoint_name(choice.group_size, calibrated=calibrated)


def ensure_default_checkpoint(cache_dir: str | Path, calibrate: bool = False, in_child: bool = False) -> Path:
    """The default model's checkpoint in `cache_dir`, built on first use (a file lock makes concurrent
    first uses, e.g. two servers, build it once). `calibrate`: the QuEPT-calibrated one (default
    `CalibConfig`, minutes on a few cores; needs the calibration text), kept under its own name.
    `in_child`: build in a child process, so that the memory the build touched (the source's weights,
    allocator arenas: about 1 GB for the default model) goes back to the OS when it ends; a
    long-lived caller (the server) wants this."""
    import fcntl

    from quept.build.source import load_source

    path = default_checkpoint_dir(cache_dir, calibrated=calibrate)
    if (path / "elastic.json").is_file():
        return path
    if in_child:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            return child.submit(_build_default_logged, str(cache_dir), calibrate).result()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same checkpoint: wait for it
        if not (path / "elastic.json").is_file():
            log.info("building the %sdefault model into %s (first use only)", "calibrated " if calibrate else "", path)
            if calibrate:
                from quept.build.calibration import calibrate_checkpoint

                calibrate_checkpoint(load_source(None), path)
            else:
                build_checkpoint(load_source(None), path, progress=True)
    return path


def _build_default_logged(cache_dir: str, calibrate: bool) -> Path:
    """The child process's work for `ensure_default_checkpoint(in_child=True)`, its progress logged."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ensure_default_checkpoint(cache_dir, calibrate)


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
    weight: torch.Tensor, bias: torch.Tensor | None, widths: tuple[int, ...], group_size: int, ranks: dict[int, int],
    affine: str = "centre", anchor_bits: int | None = None,
) -> ElasticWeights:
    """Nested RTN codes (`quantize_nested`'s `anchor_bits`), per-width affines (its `affine`) and zero adapters
    (max rank R) for one linear."""
    codes, scales, mins = quantize_nested(weight, widths, group_size, affine, anchor_bits)
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


def resolve_group_size(source: SourceModel, group_size: int | None) -> GroupSizeChoice:
    """`group_size` as given, or (None) `default_group_size` for this source's linears."""
    if group_size is not None:
        return GroupSizeChoice(int(group_size), "as given")
    _, linears = split_state(source)
    return default_group_size(source.quant_block_size, (w.shape[1] for w, _ in linears.values()), source.quant_types)


def build_checkpoint(
    source: SourceModel,
    out: Path,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    group_size: int | None = None,
    ranks: dict[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    affine: str = DEFAULT_AFFINE,
    anchor_bits: int | None = DEFAULT_ANCHOR_BITS,
) -> Path:
    """Quantize every linear (nested RTN) and write the checkpoint atomically.

    `group_size=None` chooses it from the source (`default_group_size`: the source's quantization block, else 64).
    `affine`: per-width affines at the centre of each code's bin ("centre") or fitted by least squares ("lsq").
    `anchor_bits`: master codes whose top bits are the independent RTN codes at that width (None: min/max
    RTN codes over 255 steps; "centre" affines need None).
    """
    if affine == "centre" and anchor_bits is not None:
        raise ValueError("centre-of-bin affines assume min/max codes: pass anchor_bits=None with affine='centre'")
    widths = check_widths(widths)
    ranks = ranks or default_ranks(widths)
    choice = resolve_group_size(source, group_size)
    group_size = choice.group_size
    log.info("%s", choice.note)
    dense, linears = split_state(source)
    for name, (w, _) in linears.items():
        check_group_size(w.shape[1], group_size, name)
    t0 = time.perf_counter()
    elastic = {
        name: quantize_linear(w, b, widths, group_size, ranks, affine, anchor_bits)
        for name, (w, b) in tqdm(linears.items(), desc="quantize", unit="linear", disable=not progress)
    }
    meta = {
        "source": source.description,
        "build": {"method": "nested-rtn", "affine": affine, "anchor_bits": anchor_bits, "seconds": round(time.perf_counter() - t0, 2),
                  "notes": [choice.note]},
        **(extra_meta or {}),
    }
    return write_checkpoint(out, source.hf_config, dense, elastic, meta, source.tokenizer, overwrite)
