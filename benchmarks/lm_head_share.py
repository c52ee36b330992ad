"""How much of a uniform width's perplexity loss is the lm_head's: uniform wB against wB with the
lm_head kept at w8, on the `quept eval` protocol (first windows of test.txt, exact fp32 backend).

    python benchmarks/lm_head_share.py --checkpoint CKPT --windows 8 --json benchmarks/results/lm_head_share.json

On a checkpoint of a Q4_1 GGUF source (groups of 32 on the source blocks, least-squares affines),
the decoder linears at w4 are the source itself, so w4 with a w8 lm_head should score the
unquantized perplexity.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, also without `pip install -e .`

from quept.data import eval_file  # noqa: E402
from quept.eval.perplexity import perplexity, token_windows  # noqa: E402
from quept.model.loader import load_model  # noqa: E402
from quept.precision.plan import PrecisionPlan  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--widths", default="4,3", help="uniform widths to compare")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    lm = load_model(args.checkpoint, backend="torch-fp32")
    windows = token_windows(lm.tokenizer, eval_file(), args.windows, args.seq_len)
    n = lm.model.n_linears
    head = lm.ckpt.elastic[lm.model.linear_names[-1]].codes.numel()
    total = sum(lm.ckpt.elastic[name].codes.numel() for name in lm.model.linear_names)
    rows = []
    for b in (int(x) for x in args.widths.split(",")):
        for head_bits in (b, 8):
            plan = PrecisionPlan(f"w{b}+head-w{head_bits}", per_linear=(b,) * (n - 1) + (head_bits,))  # lm_head last
            ppl, _ = perplexity(lm.model, windows, plan, desc=f"w{b} head w{head_bits}")
            avg = (b * (total - head) + head_bits * head) / total
            rows.append({"bits": b, "lm_head_bits": head_bits, "avg_bits": round(avg, 3), "ppl": ppl})
            print(f"w{b} with lm_head w{head_bits}: {avg:.2f} bits/weight, perplexity {ppl:.3f}", flush=True)
    if args.json:
        cmd = "python benchmarks/lm_head_share.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        args.json.write_text(json.dumps({"command": cmd, "checkpoint": str(args.checkpoint), "windows": args.windows,
                                         "seq_len": args.seq_len, "lm_head_share_of_weights": head / total,
                                         "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
