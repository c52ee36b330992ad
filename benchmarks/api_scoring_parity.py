"""Scoring through the API equals `quept eval`: the same windows, perplexity both ways, per width.

Runs `quept eval --backend native` on the first `--windows` windows of `--seq-len` tokens of the
packaged WikiText-2 test split, then starts `quept serve` on the same checkpoint and scores the same
token windows with `/v1/completions` (`echo`, `logprobs: 0`, `max_tokens: 0`, `X-Precision`), and
writes both perplexities and their relative difference per width as JSON.

    python benchmarks/api_scoring_parity.py --checkpoint CKPT --precisions w8,w4,w2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_bench import free_port, spawn_server, wait_ready  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--precisions", default="w8,w4,w2")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "api_scoring_parity.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from quept.data import eval_file
    from quept.eval.perplexity import token_windows

    tok = AutoTokenizer.from_pretrained(str(args.checkpoint), local_files_only=True)
    windows = token_windows(tok, eval_file(), args.windows, args.seq_len)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as d:
        eval_json = Path(d) / "eval.json"
        subprocess.run([sys.executable, "-m", "quept.cli", "eval", "--checkpoint", str(args.checkpoint), "--precision",
                        args.precisions, "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--baselines",
                        "none", "--backend", "native", "--json", str(eval_json)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        evaluated = json.loads(eval_json.read_text())["rows"]
        log_path = Path(d) / "serve.log"
        port = free_port()
        server = spawn_server(["--checkpoint", str(args.checkpoint), "--backend", "native"], port, log_path)
        url = f"http://127.0.0.1:{port}"
        rows = []
        try:
            wait_ready(url, server, log_path, 600)
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            for precision in args.precisions.split(","):
                row = next(e for e in evaluated if e["name"].split()[-1] == precision)  # e.g. "calibrated w4"
                r = httpx.post(url + "/v1/completions", headers={"X-Precision": precision}, timeout=600,
                               json={"model": model, "prompt": windows.tolist(), "max_tokens": 0, "echo": True,
                                     "logprobs": 0}).json()
                nll = -sum(sum(c["logprobs"]["token_logprobs"][1:]) for c in r["choices"])
                api = math.exp(nll / (args.windows * (args.seq_len - 1)))
                rows.append({"precision": precision, "quept_eval_ppl": row["ppl"], "api_ppl": api,
                             "rel_diff": abs(api - row["ppl"]) / row["ppl"]})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(60)
    report = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
              "windows": args.windows, "seq_len": args.seq_len, "backend": "native", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
