"""Merge the calibrated evaluation with the uncalibrated baselines into quality_calibrated.json + PNG.

    quept build --calibrate --out /tmp/ck/smol_cal
    quept eval --checkpoint /tmp/ck/smol_cal --windows 8 --baselines none \
        --precision w8,w6,w5,w4,w3,w2,mixed:2.5,mixed:3,mixed:3.5,mixed:4,mixed:4.5,mixed:5,mixed:6 \
        --json /tmp/cal_eval.json
    quept build --out /tmp/ck/smol && quept eval --checkpoint /tmp/ck/smol --windows 8 --json /tmp/rtn_eval.json
    python benchmarks/calibration_report.py --calibrated /tmp/cal_eval.json --baselines /tmp/rtn_eval.json \
        --checkpoint /tmp/ck/smol_cal --out benchmarks/results/quality_calibrated.json

Every row uses the same protocol (checked): the first 8 windows of 512 tokens of test.txt and one group size.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quept.eval.perplexity import EvalRow, format_table, plot_rows  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibrated", type=Path, required=True)
    ap.add_argument("--baselines", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_calibrated.json"))
    a = ap.parse_args()
    cal, base = json.loads(a.calibrated.read_text()), json.loads(a.baselines.read_text())
    for key in ("windows", "seq_len", "group_size"):
        if cal["protocol"][key] != base["protocol"][key]:
            raise SystemExit(f"protocol mismatch on {key}: {cal['protocol'][key]} vs {base['protocol'][key]}")
    rows = [EvalRow(**r) for r in base["rows"]] + [EvalRow(**r) for r in cal["rows"]]
    ppl = {r.name: r.ppl for r in rows}
    fp = ppl["unquantized"]
    meta = json.loads((a.checkpoint / "elastic.json").read_text())
    rec = meta["calibration"]
    checks = {
        "w4_within_10pct_of_unquantized": ppl["calibrated w4"] <= 1.10 * fp,
        "w3_within_50pct_of_unquantized": ppl["calibrated w3"] <= 1.50 * fp,
        "every_width_beats_independent_rtn": {f"w{b}": ppl[f"calibrated w{b}"] < ppl[f"independent-rtn w{b}"]
                                              for b in (8, 6, 5, 4, 3, 2) if f"independent-rtn w{b}" in ppl},
        "mixed3.5_beats_uniform_w3": ppl.get("mixed mixed:3.5", 1e9) < ppl["calibrated w3"],
        "mixed4.5_beats_uniform_w4": ppl.get("mixed mixed:4.5", 1e9) < ppl["calibrated w4"],
    }
    result = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "eval_commands": {"calibrated": cal["command"], "baselines": base["command"]},
        "protocol": cal["protocol"],
        "rows": [r.__dict__ for r in rows],
        "ratios_to_unquantized": {r.name: round(r.ppl / fp, 3) for r in rows},
        "targets": checks,
        "calibration": {k: rec[k] for k in ("data", "samples", "seq_len", "tokens", "epochs", "ranks", "seconds",
                                             "seconds_by_stage", "threads", "perplexity", "heldout")},
        "memory_overhead": rec["memory"],
        "profiles": {k: {kk: v[kk] for kk in ("target", "avg_bits", "ppl")} for k, v in meta["profiles"].items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    plot_rows(rows, a.out.with_suffix(".png"), "SmolLM2-135M: perplexity vs real bits/weight (test.txt, 8x512)")
    print(format_table(rows))
    print(json.dumps(checks, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
