"""Batch-1 greedy decode speed and resident memory: quept at every width vs Hugging Face `generate` fp32.

Each configuration runs in its own subprocess (so resident memory is that configuration's alone),
on the same prompt, thread count and machine, one after another in one invocation:

    python benchmarks/decode_bench.py --checkpoint CKPT --backends torch --tokens 128 \
        --json benchmarks/results/decode_torch.json

Prints tokens/s per configuration and the ratio to Hugging Face; writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, also from a checkout without `pip install -e .`
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_hf(tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quept.build.source import default_source_path

    torch.set_num_threads(threads)
    path = default_source_path()
    kw = {"gguf_file": path.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"name": "hf-generate fp32", "tokens": n, "seconds": seconds, "tokens_per_s": n / seconds, "rss_mb": rss_mb()}


def run_quept(checkpoint: str, backend: str, bits: int, tokens: int, threads: int) -> dict:
    import torch

    from quept.engine.generate import generate
    from quept.model.loader import load_model
    from quept.precision.plan import PrecisionPlan

    torch.set_num_threads(threads)
    lm = load_model(checkpoint, backend=backend)
    ids = lm.encode_chat(PROMPT)
    plan = PrecisionPlan.uniform(bits)
    t0 = time.perf_counter()
    generate(lm.model, ids, plan, 4)  # warm-up; includes the one-off width materialisation (switch cost)
    switch_seconds = time.perf_counter() - t0
    result = generate(lm.model, ids, plan, tokens)  # no stop ids: exactly `tokens` tokens
    model_bytes = sum(t.numel() * t.element_size() for t in lm.ckpt.dense.values())
    for lin in lm.model.linears:
        w = lin.weights
        model_bytes += sum(t.numel() * t.element_size() for t in (w.codes, w.scales, w.mins, w.lora_a, w.lora_b)
                           if t.device.type != "meta")  # meta: released after the backend repacked them
        model_bytes += lm.backend.resident_bytes(lin.prepared)
    return {"name": f"quept {backend} w{bits}", "bits": bits, "backend": backend, "tokens": len(result.tokens),
            "prefill_s": result.prefill_seconds, "seconds": result.decode_seconds,
            "tokens_per_s": result.decode_tokens_per_second, "first_use_s": switch_seconds,
            "model_resident_mb": model_bytes / 2**20, "rss_mb": rss_mb()}


def child(argv: list[str]) -> dict:
    """Run one configuration in a fresh interpreter and read its JSON line back."""
    cmd = [sys.executable, __file__, "--one", *argv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] for r in results]
    a1.barh(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    a1.set_xlabel("decode tokens/s (batch 1)")
    a2.barh(names, [r["rss_mb"] for r in results], color="tab:orange")
    a2.set_xlabel("process RSS (MiB)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="elastic checkpoint of the default model")
    p.add_argument("--backends", default="torch", help="comma list of quept backends")
    p.add_argument("--widths", default="8,6,5,4,3,2")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:  # child mode: one configuration, print one JSON line
        kind, *rest = args.one
        r = run_hf(args.tokens, args.threads) if kind == "hf" else run_quept(rest[0], kind, int(rest[1]), args.tokens, args.threads)
        print(json.dumps(r))
        return 0
    if not args.checkpoint:
        p.error("--checkpoint is required")
    common = ["--tokens", str(args.tokens), "--threads", str(args.threads)]
    results = [child(["hf", *common])]
    for backend in args.backends.split(","):
        for bits in args.widths.split(","):
            results.append(child([backend, args.checkpoint, bits, *common]))
    base = results[0]["tokens_per_s"]
    print(f"{'configuration':<24} {'tok/s':>8} {'x HF':>6} {'RSS MiB':>8} {'model MiB':>9} {'first use s':>11}")
    for r in results:
        r["ratio_vs_hf"] = r["tokens_per_s"] / base
        print(f"{r['name']:<24} {r['tokens_per_s']:>8.2f} {r['ratio_vs_hf']:>6.2f} {r['rss_mb']:>8.0f} "
              f"{r.get('model_resident_mb', float('nan')):>9.0f} {r.get('first_use_s', float('nan')):>11.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": "python benchmarks/decode_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                           "cores": os.cpu_count()},
               "prompt": PROMPT, "results": results}
        args.json.write_text(json.dumps(doc, indent=1))
        plot(results, args.json.with_suffix(".png"))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
