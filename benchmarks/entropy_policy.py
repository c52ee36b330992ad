"""The `entropy` policy against uniform widths: perplexity and decode tokens/s on the default model.

Perplexity is teacher-forced on the windows of `quept eval` (the first `--windows` windows of
`--seq-len` tokens of wikitext-2 test.txt; fewer than eval's 8 by default, stated in the result),
decoding token by token exactly as the engine would: each position runs at the plan the entropy
gate chose from the previous position's logits, over a KV cache whose earlier positions kept the
width they ran at (`quept.policies.entropy_policy.simulate_window`). Uniform widths run the
same token-by-token loop (never switching), so tokens/s compare like for like (batch 1, the step plus
the policy's entropy; prefill excluded); their one-forward perplexity (the `quept eval` number) is
stored beside it as a check.

The threshold is calibrated on valid.txt: the `--percentiles` of teacher-forced next-token entropy at
the high width (`--calib-windows` windows of 256 tokens). `--store` writes the first one into the
checkpoint's elastic.json (`entropy_policy`), where `quept serve --policy entropy` finds it.

    python benchmarks/entropy_policy.py                 # ~3 min on 2 cores
    python benchmarks/entropy_policy.py --low w4,w3 --percentiles 70,85 --windows 2 --store

Writes benchmarks/results/entropy_policy.json and entropy_policy.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, also from a checkout without `pip install -e .`
RESULTS = ROOT / "benchmarks" / "results"


def run_config(lm: Any, windows: Any, low: Any, high: Any, threshold: float, quiet: int) -> dict[str, Any]:
    from quept.policies.entropy_policy import simulate_window

    nll, tokens, high_steps, seconds = 0.0, 0, 0, 0.0
    for w in windows:
        r = simulate_window(lm, w, low, high, threshold, quiet)
        nll, tokens = nll + r["nll"], tokens + r["tokens"]
        high_steps, seconds = high_steps + r["high_steps"], seconds + r["seconds"]
    share = high_steps / tokens
    bits = share * high.avg_bits + (1 - share) * low.avg_bits
    return {"ppl": round(math.exp(nll / tokens), 4), "nll": round(nll / tokens, 5), "tokens": tokens,
            "share_high": round(share, 4), "avg_bits": round(bits, 3), "tokens_per_s": round(tokens / seconds, 2)}


def plot(rows: list[dict[str, Any]], out_png: Path, note: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["avg_bits"])
    pol = [r for r in rows if r["kind"] == "entropy"]
    for ax, key, label in ((a1, "avg_bits", "average bits per weight (token-weighted)"),
                           (a2, "tokens_per_s", "decode tokens/s (batch 1)")):
        ax.plot([r[key] for r in uni], [r["ppl"] for r in uni], "o-" if key == "avg_bits" else "o", label="uniform width")
        for r in uni:
            ax.annotate(r["name"], (r[key], r["ppl"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.plot([r[key] for r in pol], [r["ppl"] for r in pol], "s", color="tab:red", label="entropy policy")
        for r in pol:
            ax.annotate(r["name"], (r[key], r["ppl"]), fontsize=7, xytext=(3, -10), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (teacher-forced)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("quept: entropy policy vs uniform widths\n" + textwrap.fill(note, 120), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="default: the default model, built once into ~/.cache/quept")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--windows", type=int, default=2, help="test.txt windows (quept eval uses 8)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--high", default="w8")
    ap.add_argument("--low", default="w4", help="comma list of low plans")
    ap.add_argument("--uniform", default="w8,w6,w5,w4", help="uniform widths to compare (low plans are added)")
    ap.add_argument("--percentiles", default="80", help="comma list: threshold = this percentile of entropy at high")
    ap.add_argument("--quiet-window", type=int, default=4, help="quiet tokens before stepping down")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--store", action="store_true", help="write the first threshold into the checkpoint")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP spin costs more than it gives "
                    "on a busy 2-core machine; 0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "entropy_policy.json")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.checkpoint is None:
        from quept.build.builder import ensure_default_checkpoint
        from quept.model.loader import default_cache_dir

        args.checkpoint = ensure_default_checkpoint(default_cache_dir())  # built once, as quept serve does
    from quept.data import calib_file, eval_file
    from quept.eval.perplexity import perplexity, token_windows
    from quept.model.loader import load_model
    from quept.policies.entropy_policy import calibrate_threshold, save_calibration

    lm = load_model(args.checkpoint, backend=args.backend)
    high = lm.plan_for(args.high)
    lows = [lm.plan_for(s) for s in args.low.split(",") if s.strip()]
    percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()]
    calib = [calibrate_threshold(lm, calib_file(), p, high, windows=args.calib_windows, seq_len=256)
             for p in percentiles]
    if args.store:
        save_calibration(args.checkpoint, calib[0])
        print(f"stored threshold {calib[0]['threshold']} nats (p{percentiles[0]:g}) in {args.checkpoint}/elastic.json")
    test = eval_file()
    windows = token_windows(lm.tokenizer, test, args.windows, args.seq_len)
    uniform = list(dict.fromkeys([s.strip() for s in args.uniform.split(",") if s.strip()] + [p.name for p in lows]))
    rows: list[dict[str, Any]] = []
    for name in uniform:
        plan = lm.plan_for(name)
        r = run_config(lm, windows, plan, plan, math.inf, args.quiet_window)
        r["ppl_one_forward"] = round(perplexity(lm.model, windows, plan, progress=False)[0], 4)
        rows.append({"name": name, "kind": "uniform", **r})
        print(f"{name:<24} ppl {r['ppl']:9.3f}  {r['tokens_per_s']:6.1f} tok/s", flush=True)
    for low in lows:
        for rec in calib:
            name = f"entropy {low.name}->{high.name} p{rec['percentile']:g}"
            r = run_config(lm, windows, low, high, rec["threshold"], args.quiet_window)
            rows.append({"name": name, "kind": "entropy", "low": low.name, "high": high.name,
                         "threshold_nats": rec["threshold"], "percentile": rec["percentile"], **r})
            print(f"{name:<24} ppl {r['ppl']:9.3f}  {r['tokens_per_s']:6.1f} tok/s  {100 * r['share_high']:.0f}% "
                  f"of steps at {high.name}", flush=True)
    w8 = next((r for r in rows if r["name"] == high.name), None)
    for r in rows:
        if w8:
            r["speed_vs_high"] = round(r["tokens_per_s"] / w8["tokens_per_s"], 3)
            r["ppl_vs_high"] = round(r["ppl"] / w8["ppl"], 4)
    note = (f"shared 2-core CPU machine (noisy), backend {lm.backend.name}, batch-1 token-by-token decode; "
            f"first {args.windows} windows of {args.seq_len} tokens of {test.name} (quept eval uses 8); "
            f"thresholds from valid.txt at {high.name}; step down after {args.quiet_window} quiet tokens")
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "note": note,
        "protocol": {"file": str(test), "windows": args.windows, "seq_len": args.seq_len,
                     "tokens_scored": args.windows * (args.seq_len - 1), "teacher_forced": True,
                     "decode": "token by token, KV cache kept across switches"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": __import__("torch").get_num_threads(), "load_average_end": os.getloadavg()},
        "checkpoint": str(args.checkpoint), "backend": lm.backend.name,
        "calibration": calib, "stored_in_checkpoint": bool(args.store), "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(rows, args.out.with_suffix(".png"), note)
    print(f"\n{'config':<26} {'bits':>5} {'ppl':>9} {'tok/s':>7} {'vs ' + high.name:>7}")
    for r in rows:
        print(f"{r['name']:<26} {r['avg_bits']:>5.2f} {r['ppl']:>9.3f} {r['tokens_per_s']:>7.1f} "
              f"{r.get('speed_vs_high', float('nan')):>7.2f}")
    print(f"\n{note}\nwrote {args.out} and {args.out.with_suffix('.png')} in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
