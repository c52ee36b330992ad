"""Calibration settings (one frozen dataclass; every field documented)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PROFILE_TARGETS: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
DEFAULT_WIDTH_GROUPS: tuple[tuple[int, ...], ...] = ((8, 6), (5, 4), (3,), (2,))


@dataclass(frozen=True)
class CalibConfig:
    """How `quept build --calibrate` calibrates.

    The defaults take minutes for the 135M default model on the 2-core development machine (the measured
    run is in benchmarks/results/quality_calibrated.json; most of it matmul flops)."""

    calib_file: Path | None = None
    """text file the calibration samples come from (default: the packaged WikiText-2 valid.txt)"""
    samples: int = 16
    """calibration sequences (taken from the start of the file, consecutive, non-overlapping)"""
    seq_len: int = 256
    """tokens per calibration sequence"""
    epochs: int = 1
    """passes over the samples per block"""
    batch: int = 1
    """sequences per optimisation step"""
    lr_affine: float = 2e-3
    """Adam step for the per-width affines (scale*(1 + ds*2^(2-b)), min + scale*dm: step units)"""
    lr_lora: float = 2e-4
    """Adam step for the cascaded adapters"""
    width_groups: tuple[tuple[int, ...], ...] = DEFAULT_WIDTH_GROUPS
    """one width is sampled from each group per step (widths absent from the checkpoint are dropped)"""
    tome_widths: tuple[int, ...] = (4, 2)
    """low widths whose outputs MB-ToMe mixes into the next block's inputs (high width = 8)"""
    tome_threshold: float = 0.95
    """tokens whose low/high block updates agree (cosine) above this keep the high-width output"""
    tome_max_mix: float = 0.5
    """largest weight a disagreeing token gives the mean low-width output"""
    search_importance: dict[int, float] = field(default_factory=lambda: {8: 4.0})
    """per-width weight of the master-code search (others 1.0), in units of each width's step"""
    align_source_grid: bool = False
    """groups whose weights lie on a b-bit grid of their own (a Q4_1 source's blocks) get master codes aligned
    with it, exact at every width >= b (quantizer.source_grid_codes); others start from min/max RTN codes.
    Off by default: measured on the default model (8 test.txt windows) it makes w5 28.39 -> 28.01 and
    w6 27.88 -> 27.82 but w4 29.02 -> 29.13, over independent RTN's 29.11 (w4 reads the same codes; the
    w5/w6 that start exact share the first adapter ranks with w4)"""
    head_search: bool = False
    """master-code search on the lm_head too (off: nested round-to-nearest codes). Measured on the default model
    (8 test.txt windows, everything else fixed): the search's moves cost the lm_head at every width, w8 27.617 vs
    27.614, w4 29.10 vs 29.05 (the search weighs widths in step units, which the logits do not)"""
    head_anchor_bits: int | None = 4
    """the lm_head's master codes have its own 4-bit round-to-nearest codes in their top bits and refine inside
    those bins below (quantizer.anchored_nested_codes); None: nested round-to-nearest codes like the decoder
    linears (with align_source_grid as they have it). The default model's lm_head is a Q8_0 tensor with no
    4-bit grid of its own, so the top 4 bits of its min/max 8-bit codes are worse 4-bit codes than independent
    RTN; the decoder's Q4_1 linears are exact at w4 either way, so the lm_head is all that nesting costs w4"""
    head_plain_widths: tuple[int, ...] = (8,)
    """lm_head widths whose affines are plain least squares (the others are weighted by the final-norm
    activations). Measured on the default model: an activation-weighted w8 affine gives w8 27.626 vs 27.614
    plain; at w4 the weighted fit is much better (29.05 vs 30.25)"""
    codes: str = "nested"
    """'nested' (stored format) or 'independent' (ablation only: per-width RTN codes, not storable)"""
    train: bool = True
    """False: master-code search and least-squares affines only (no block-wise training)"""
    sens_tokens: int = 48
    """tokens (one sequence) for the per-linear KL sensitivity table"""
    profile_targets: tuple[float, ...] = DEFAULT_PROFILE_TARGETS
    """average real bits per weight of the stored mixed profiles"""
    ppl_windows: int = 1
    """held-out windows (from the end of the calibration file) for the recorded perplexities"""
    ppl_seq_len: int = 512
    """tokens per held-out window"""
    seed: int = 0
    threads: int = 0
    """torch threads (0: torch's default, one per core). On a shared machine 1 can be faster: there a
    multi-threaded torch op waits for whichever of its threads the scheduler has parked, every op."""
    progress: bool = True

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["calib_file"] = str(self.calib_file) if self.calib_file else None
        d["search_importance"] = {str(k): v for k, v in self.search_importance.items()}
        d["head_plain_widths"] = list(self.head_plain_widths)
        return d
