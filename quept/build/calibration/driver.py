"""`quept build --calibrate`: the one-shot QuEPT calibration pipeline (docs/architecture.md §3).

    search master codes + LS affines per linear  (master_codes)
    block by block: train affines + cascaded adapters on a multi-width loss  (blockwise)
                    next block's inputs by MB-ToMe  (tome)
    lm_head: codes anchored at 4 bits + activation-weighted LS affines, w8 plain LS (no training: its output is the logits)
    KL sensitivity table  (sensitivity);  profiles by DP over real bits  (quept.precision.allocation)
    write the checkpoint to a staging directory, measure held-out perplexity per width and
    profile on it, record everything in elastic.json, then rename into place (Ctrl-C leaves nothing).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quept import data as package_data
from quept.backends.base import ElasticWeights
from quept.build.builder import default_ranks, resolve_group_size, split_state
from quept.build.quantizer import check_group_size, check_widths
from quept.build.source import SourceModel
from quept.errors import CheckpointError
from quept.model.args import LINEAR_NAMES, ModelArgs, linear_names
from quept.model.checkpoint import staged_dir, update_meta, write_checkpoint
from quept.model.layer_ops import rms_norm

from .blockwise import (
    FakeQuantLinear,
    block_col_weights,
    dense_block_output,
    input_col_weight,
    make_fake_quant,
    quant_block_output,
    rope_tables,
    train_block,
)
from .config import CalibConfig
from .data import CalibData, load_calib_data
from .tome import mb_tome

log = logging.getLogger(__name__)


@dataclass
class BlockwiseResult:
    layers: dict[str, FakeQuantLinear]  # every elastic linear in plan order
    block_losses: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def calibrate_layers(
    source: SourceModel, samples: torch.Tensor, widths: Sequence[int], group_size: int, ranks: dict[int, int],
    cfg: CalibConfig,
) -> BlockwiseResult:
    """Steps 1-3 over all blocks, then the lm_head. samples: [S, L] token ids."""
    t0 = time.perf_counter()
    args: ModelArgs = source.args
    st = source.state
    rank_t = tuple(ranks[b] for b in widths)
    rng = random.Random(cfg.seed)
    s, l = samples.shape
    cos, sin = rope_tables(args, l)
    x_fp = st["model.embed_tokens.weight"].index_select(0, samples.flatten()).float().view(s, l, -1)  # [S, L, D]
    x_q = x_fp.clone()
    steps_per_block = cfg.epochs * -(-s // cfg.batch) if cfg.train else 0
    layers: dict[str, FakeQuantLinear] = {}
    losses: list[dict[str, Any]] = []
    i8 = list(widths).index(8)
    tome_idx = [list(widths).index(b) for b in cfg.tome_widths if b in widths and b != 8]
    total = args.n_layers * max(steps_per_block, 1)
    bar = tqdm(total=total, desc="calibrate", unit="step", disable=not cfg.progress, smoothing=0.1)
    for i in range(args.n_layers):
        names = [f"model.layers.{i}.{n}" for n in LINEAR_NAMES]
        dense_w = [st[f"{n}.weight"].float() for n in names]
        biases = [st.get(f"{n}.bias") for n in names]
        norms = (st[f"model.layers.{i}.input_layernorm.weight"].float(),
                 st[f"model.layers.{i}.post_attention_layernorm.weight"].float())
        t_block = time.perf_counter()
        bar.set_description(f"block {i + 1}/{args.n_layers} search")
        col = block_col_weights(x_q, dense_w, biases, norms, args, cos, sin)
        block = [make_fake_quant(w, b, widths, rank_t, group_size, c, cfg.codes, cfg.search_importance,
                                 seed=cfg.seed * 1000 + 7 * i + j, align_source_grid=cfg.align_source_grid)
                 for j, (w, b, c) in enumerate(zip(dense_w, biases, col))]
        y_fp = dense_block_output(dense_w, biases, x_fp, norms, args, cos, sin)
        record: dict[str, Any] = {"block": i}
        if cfg.train:
            bar.set_description(f"block {i + 1}/{args.n_layers} train")

            def on_step(epoch: int, loss: float) -> None:
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss:.4f}")
                bar.update(1)

            hist = train_block(block, x_q, y_fp, norms, args, cos, sin, widths, cfg.width_groups, cfg.epochs,
                               cfg.batch, cfg.lr_affine, cfg.lr_lora, rng, on_step, x_ref=x_fp)
            record["loss_per_epoch"] = [round(h, 5) for h in hist]
        else:
            bar.update(1)
        y_hi = quant_block_output(block, x_q, i8, norms, args, cos, sin)
        y_lows = [quant_block_output(block, x_q, k, norms, args, cos, sin) for k in tome_idx]
        with torch.no_grad():
            record["mse_w8"] = float(((y_hi - y_fp) ** 2).mean())
            for k, y in zip(tome_idx, y_lows):
                record[f"mse_w{widths[k]}"] = float(((y - y_fp) ** 2).mean())
        x_q, frac = mb_tome(x_q, y_hi, y_lows, cfg.tome_threshold, cfg.tome_max_mix)
        record["tome_mixed_fraction"] = round(frac, 4)
        record["seconds"] = round(time.perf_counter() - t_block, 2)
        x_fp = y_fp
        losses.append(record)
        log.debug("block %d: %s", i, record)
        layers.update(zip(names, block))
    bar.close()
    # lm_head: codes (anchored at cfg.head_anchor_bits, searched if cfg.head_search) + LS affines weighted by the
    # final-norm activations of the quantized stream (cfg.head_plain_widths unweighted)
    h = rms_norm(x_q, st["model.norm.weight"].float(), args.rms_norm_eps)
    layers["lm_head"] = make_fake_quant(st["lm_head.weight"].float(), st.get("lm_head.bias"), widths, rank_t,
                                        group_size, input_col_weight(h), cfg.codes, cfg.search_importance,
                                        search=cfg.head_search, plain_widths=cfg.head_plain_widths,
                                        align_source_grid=cfg.align_source_grid and cfg.head_anchor_bits is None,
                                        anchor_bits=cfg.head_anchor_bits)
    with torch.no_grad():
        layers["lm_head"].lora_a.zero_()  # untrained: store an exact no-op adapter
        layers["lm_head"].round_to_storage()
    ordered = {n: layers[n] for n in linear_names(args.n_layers)}
    return BlockwiseResult(ordered, losses, time.perf_counter() - t0)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def adapter_overhead(elastic: dict[str, ElasticWeights]) -> dict[str, Any]:
    """Bytes of adapters and per-width affines (fp16 as stored) against the 8-bit codes."""
    codes = sum(w.codes.numel() for w in elastic.values())
    affines = sum(2 * (w.scales.numel() + w.mins.numel()) for w in elastic.values())
    adapters = sum(2 * (w.lora_a.numel() + w.lora_b.numel()) for w in elastic.values())
    return {"codes_bytes": codes, "affine_bytes": affines, "adapter_bytes": adapters,
            "affine_fraction_of_codes": round(affines / codes, 4), "adapter_fraction_of_codes": round(adapters / codes, 4),
            "extra_fraction_of_codes": round((affines + adapters) / codes, 4)}


def measure_heldout(path: Path, data: CalibData, widths: Sequence[int], profiles: dict[str, Any],
                    source: SourceModel, progress: bool) -> tuple[dict[str, float], dict[str, float], float]:
    """Held-out perplexity (end of the calibration file) per width and per profile, through the runtime."""
    from quept.eval.perplexity import perplexity
    from quept.model.loader import load_model
    from quept.model.model import dense_model
    from quept.precision.plan import PrecisionPlan

    grad = torch.is_grad_enabled()
    lm = load_model(path, backend="torch-fp32")
    torch.set_grad_enabled(grad)  # load_model turns autograd off process-wide; restore the caller's setting
    with torch.inference_mode():
        fp, _ = perplexity(dense_model(source.args, source.state), data.heldout, PrecisionPlan.uniform(8),
                           "held-out fp", progress)
        per_width = {f"w{b}": round(perplexity(lm.model, data.heldout, PrecisionPlan.uniform(b), f"held-out w{b}",
                                               progress)[0], 3) for b in widths}
        per_profile = {name: round(perplexity(lm.model, data.heldout, lm.plan_for(name), f"held-out {name}",
                                              progress)[0], 3) for name in profiles}
    return per_width, per_profile, round(fp, 3)


def calibrate_checkpoint(
    source: SourceModel, out: Path, widths: Sequence[int] = (8, 6, 5, 4, 3, 2), group_size: int | None = None,
    ranks: dict[int, int] | None = None, cfg: CalibConfig | None = None, overwrite: bool = False,
) -> Path:
    """The full pipeline; writes a calibrated checkpoint at `out` (atomically).

    `group_size=None` chooses it from the source, as `build_checkpoint` does (`default_group_size`).
    """
    from quept.precision.allocation import allocate, profile_name, real_bits

    from .sensitivity import kl_sensitivity

    cfg = cfg or CalibConfig()
    if cfg.codes != "nested":
        raise ValueError("only nested codes can be stored; independent codes are an ablation (benchmarks)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite or choose another --out")
    widths = check_widths(widths)
    ranks = ranks or default_ranks(widths)
    choice = resolve_group_size(source, group_size)
    group_size = choice.group_size
    log.info("%s", choice.note)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    load_start = _load_average()
    dense, linears = split_state(source)
    for name, (w, _) in linears.items():
        check_group_size(w.shape[1], group_size, name)
    calib_file = Path(cfg.calib_file) if cfg.calib_file else package_data.calib_file()
    data = load_calib_data(source.tokenizer, calib_file, cfg.samples, cfg.seq_len, cfg.sens_tokens,
                           cfg.ppl_windows, cfg.ppl_seq_len)
    log.info("calibrating on %s: %d x %d tokens, %d epochs", calib_file, cfg.samples, cfg.seq_len, cfg.epochs)
    result = calibrate_layers(source, data.samples, widths, group_size, ranks, cfg)
    elastic = {n: m.to_elastic() for n, m in result.layers.items()}
    t_sens = time.perf_counter()
    args = source.args
    kl = kl_sensitivity(args, source.state, elastic, data.sens, widths, cfg.progress)
    sens_seconds = time.perf_counter() - t_sens
    names = linear_names(args.n_layers)
    params = [elastic[n].codes.numel() for n in names]
    profiles: dict[str, Any] = {}
    for target in cfg.profile_targets:
        per_linear = allocate(kl, params, widths, target)
        profiles[profile_name(target)] = {"target": target, "avg_bits": round(real_bits(per_linear, params), 4),
                                          "per_linear": per_linear}
    sensitivity = {"metric": "kl(p_fp||p_q), mean over tokens, one linear at a time", "widths": list(widths),
                   "linears": names, "params": params, "kl": [[round(v, 7) for v in row] for row in kl],
                   "tokens": int(data.sens.numel()), "data": f"{calib_file.name} tokens after the calibration samples"}
    meta = {"source": source.description,
            "build": {"method": "quept-calibrated", "seconds": round(time.perf_counter() - t_start, 2),
                      "notes": [choice.note]},
            "sensitivity": sensitivity}
    with staged_dir(out, "calib") as stage:
        write_checkpoint(stage, source.hf_config, dense, elastic, meta, source.tokenizer, overwrite=True)
        t_ppl = time.perf_counter()
        per_width, per_profile, fp_ppl = measure_heldout(stage, data, widths, profiles, source, cfg.progress)
        for name, ppl in per_profile.items():
            profiles[name]["ppl"] = ppl
        record = {
            "method": "quept one-shot (nested master-code search, block-wise multi-width reconstruction, "
                      "cascaded adapters, MB-ToMe, KL sensitivity + DP allocation)",
            "data": str(calib_file), "samples": cfg.samples, "seq_len": cfg.seq_len,
            "tokens": cfg.samples * cfg.seq_len, "epochs": cfg.epochs, "ranks": {str(b): ranks[b] for b in widths},
            "seconds": round(time.perf_counter() - t_start, 1),
            "seconds_by_stage": {"blockwise": round(result.seconds, 1), "sensitivity": round(sens_seconds, 1),
                                 "heldout_ppl": round(time.perf_counter() - t_ppl, 1)},
            "threads": torch.get_num_threads(),
            # a slow run on a shared machine: was something else running? (1-minute load average, this process
            # included, and CPUs)
            "machine": {"cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": _load_average()},
            "heldout": {"file": str(calib_file), "windows": cfg.ppl_windows, "seq_len": cfg.ppl_seq_len,
                        "where": "last tokens of the file (disjoint from the calibration samples)",
                        "unquantized_ppl": fp_ppl},
            "perplexity": {**per_width, **per_profile},
            "memory": adapter_overhead(elastic),
            "blocks": result.block_losses,
            "config": cfg.record(),
        }
        update_meta(stage, profiles=profiles, calibration=record)
    log.info("calibrated checkpoint %s in %.0f s", out, time.perf_counter() - t_start)
    return out
