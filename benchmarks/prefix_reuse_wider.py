"""What reading a prefix's K/V computed at a wider plan would do to a narrower request: the accuracy
side of an opt-in "reuse wider KV" that prefix caching does not offer (docs/architecture.md).

For each window of WikiText-2 test.txt: the first `--prefix` tokens run at the prefix plan, then the
rest at the request's plan, reading the prefix's K/V; the perplexity of the rest is compared with
the whole window at the request's plan (what quept serves) and at the prefix plan.

    python benchmarks/prefix_reuse_wider.py --checkpoint CKPT --windows 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, also from a checkout without `pip install -e .`

from quept.data import eval_file  # noqa: E402
from quept.eval.perplexity import token_windows  # noqa: E402
from quept.model.kv_cache import blocks_for  # noqa: E402
from quept.model.loader import load_model  # noqa: E402
from quept.model.runner import ModelRunner, SeqRows, StepBatch  # noqa: E402
from quept.precision.plan import PrecisionPlan  # noqa: E402


def suffix_nll(runner: ModelRunner, ids: list[int], prefix: int, first: PrecisionPlan, rest: PrecisionPlan) -> float:
    """NLL summed over tokens prefix+1 … L-1: tokens [0, prefix) run at `first`, the rest at `rest`."""
    table = list(range(blocks_for(len(ids), runner.cache.block_size)))
    runner.execute(StepBatch([SeqRows(ids[:prefix], 0, table, first, samples=False)]))
    logits = runner.execute(StepBatch([SeqRows(ids[prefix:], prefix, table, rest, all_rows=True)]))  # [L-prefix, V]
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = torch.tensor(ids[prefix + 1 :])
    return float(-logp.gather(1, target[:, None]).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--backend", default="torch-fp32")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--wide", default="w8")
    ap.add_argument("--narrow", default="w4,w3")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_reuse_wider.json")
    args = ap.parse_args()
    lm = load_model(args.checkpoint, backend=args.backend)
    windows = token_windows(lm.tokenizer, eval_file(), args.windows, args.seq_len)
    runner, _ = ModelRunner.scratch(lm.model, 1, args.seq_len)
    wide = lm.plan_for(args.wide)
    rows = []
    count = args.windows * (args.seq_len - args.prefix - 1)
    for name in args.narrow.split(","):
        narrow = lm.plan_for(name)
        with torch.no_grad():
            own = sum(suffix_nll(runner, w.tolist(), args.prefix, narrow, narrow) for w in windows)
            reused = sum(suffix_nll(runner, w.tolist(), args.prefix, wide, narrow) for w in windows)
            wide_all = sum(suffix_nll(runner, w.tolist(), args.prefix, wide, wide) for w in windows)
        row = {"request": name, "prefix_kv": args.wide, "ppl_own_kv": math.exp(own / count),
               "ppl_wider_prefix_kv": math.exp(reused / count), "ppl_all_wide": math.exp(wide_all / count)}
        rows.append(row)
        print(f"{name} request, last {args.seq_len - args.prefix} tokens: own KV {row['ppl_own_kv']:.3f}, "
              f"{args.wide} prefix KV {row['ppl_wider_prefix_kv']:.3f}, all {args.wide} {row['ppl_all_wide']:.3f}")
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "config": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
