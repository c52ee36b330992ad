"""Ablation: what nesting costs and what the adapters buy, every variant calibrated the same way.

Variants: {nested codes (stored format), independent per-width RTN codes} x {cascaded adapters at
the default ranks, no adapters (rank 0)}, plus nested search-only (no block-wise training).
Perplexity on the first windows of test.txt through a dense forward over each width's effective
weights (deq_b + B[:, :r] A[:r]); the independent variant cannot be stored, so nothing here goes
through a checkpoint. Group size: the source's quantization block, as `quept build` (32 for the
default model's Q4_1), or --group-size. Calibration budget: the main run's (16 x 256 tokens).

    python benchmarks/calibration_ablation.py --windows 2 --out benchmarks/results/calibration_ablation
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quept.build.builder import DEFAULT_RANKS, resolve_group_size  # noqa: E402
from quept.build.calibration import CalibConfig  # noqa: E402
from quept.build.calibration.data import load_calib_data  # noqa: E402
from quept.build.calibration.driver import calibrate_layers  # noqa: E402
from quept.build.source import load_source  # noqa: E402
from quept.data import calib_file, eval_file  # noqa: E402
from quept.eval.perplexity import perplexity, token_windows  # noqa: E402
from quept.model.model import dense_model  # noqa: E402
from quept.precision.plan import PrecisionPlan  # noqa: E402

DENSE = PrecisionPlan.uniform(8)  # a dense model reads no widths

WIDTHS = (8, 6, 5, 4, 3, 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=CalibConfig.samples)
    ap.add_argument("--seq-len", type=int, default=CalibConfig.seq_len)
    ap.add_argument("--group-size", type=int, default=None, help="default: the source's quantization block")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--eval-widths", default="8,4,3,2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument("--variants", default="nested+adapters,nested-no-adapters,independent+adapters,"
                                          "independent-no-adapters,nested-search-only")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_ablation"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    src = load_source(None)
    group_size = resolve_group_size(src, a.group_size).group_size
    data = load_calib_data(src.tokenizer, calib_file(), a.samples, a.seq_len, 0, 0, 1)
    windows = token_windows(src.tokenizer, eval_file(), a.windows, 512)
    eval_widths = [int(b) for b in a.eval_widths.split(",")]
    base = CalibConfig(samples=a.samples, seq_len=a.seq_len, epochs=a.epochs, threads=torch.get_num_threads(),
                       progress=False)
    zero = {b: 0 for b in WIDTHS}
    specs = {"nested+adapters": (base, DEFAULT_RANKS), "nested-no-adapters": (base, zero),
             "independent+adapters": (replace(base, codes="independent"), DEFAULT_RANKS),
             "independent-no-adapters": (replace(base, codes="independent"), zero),
             "nested-search-only": (replace(base, train=False), zero)}
    results = {}
    out_json = a.out.with_suffix(".json")
    fp_ppl = perplexity(dense_model(src.args, src.state), windows, DENSE, progress=False)[0]
    for name in a.variants.split(","):
        cfg, ranks = specs[name]
        t0 = time.perf_counter()
        res = calibrate_layers(src, data.samples, WIDTHS, group_size, ranks, cfg)
        row = {"calib_seconds": round(time.perf_counter() - t0, 1), "ppl": {}}
        for b in eval_widths:
            i = WIDTHS.index(b)
            state = dict(src.state)
            with torch.no_grad():
                for n, m in res.layers.items():
                    state[f"{n}.weight"] = m.effective_weight(i).detach()
                row["ppl"][f"w{b}"] = round(perplexity(dense_model(src.args, state), windows, DENSE, progress=False)[0], 3)
        results[name] = row
        print(name, row, flush=True)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({
            "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
            "protocol": {"eval": f"first {a.windows} windows of 512 tokens of test.txt", "group_size": group_size,
                         "calibration": f"{a.samples}x{a.seq_len} tokens of valid.txt, {a.epochs} epoch(s)",
                         "threads": torch.get_num_threads(),
                         "ranks_default": DEFAULT_RANKS},
            "unquantized_ppl": round(fp_ppl, 3), "variants": results}, indent=1))
    lines = ["| variant | " + " | ".join(f"w{b}" for b in eval_widths) + " | calib s |",
             "|---|" + "---|" * (len(eval_widths) + 1)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row['ppl'][f'w{b}']:.2f}" for b in eval_widths)
                     + f" | {row['calib_seconds']:.0f} |")
    a.out.with_suffix(".md").write_text(
        f"# Calibration ablation\n\nPerplexity, first {a.windows} windows x 512 tokens of wikitext-2 test.txt "
        f"(unquantized {fp_ppl:.2f}), group {group_size}; calibration {a.samples}x{a.seq_len} tokens of valid.txt, "
        f"{a.epochs} epoch; `{' '.join(sys.argv)}`.\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
