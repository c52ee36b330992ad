"""Prefix caching on vs off, in one run: 16 streaming clients whose prompts share a long system prompt,
and the same load with no shared prefix (the cost of the cache when it never hits).

Starts `quept serve` twice on the default model (or --checkpoint), once with `--no-prefix-caching`, and
sends, per precision, `--num-prompts` completions of `--system-len` shared tokens followed by
`--user-len` tokens of their own (token ids cut from WikiText-2 valid.txt, as a chat template's system
turn would precede each user turn), `--output-len` tokens each, at most `--concurrency` in flight. One
request with the bare system prompt warms the cache first (both servers get it). Then the same count
of prompts of the same length that share nothing. Reports TTFT and request throughput per run and
the on/off ratios; writes JSON and a PNG.

    python benchmarks/prefix_cache_bench.py
    python benchmarks/prefix_cache_bench.py --precisions w8 --num-prompts 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the checkout's packages, also without `pip install -e .`
from serve_bench import DATA, checkpoint_path, free_port, machine, run_level, spawn_server, summarize, wait_ready  # noqa: E402


def windows_of(checkpoint: Path, n: int, length: int) -> list[list[int]]:
    """`n` consecutive windows of `length` token ids of WikiText-2 valid.txt (the packaged calibration text)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)(DATA.read_text())["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"not enough text for {n} prompts of {length} tokens")
    return [list(ids[i * length : (i + 1) * length]) for i in range(n)]


def workloads(checkpoint: Path, n: int, system_len: int, user_len: int) -> dict[str, list[list[int]]]:
    total = system_len + user_len
    windows = windows_of(checkpoint, 2 * n + 1, total)
    system = windows[0][:system_len]
    shared = [system + w[:user_len] for w in windows[1 : n + 1]]
    return {"warm": [system + windows[0][system_len:]], "shared": shared, "unique": windows[n + 1 :]}


def run_server(args: argparse.Namespace, caching: bool, loads: dict[str, list[list[int]]], log: Path) -> dict[str, Any]:
    port = free_port()
    flags = ["--backend", args.backend, "--max-batch", str(args.concurrency)]
    flags += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    flags += [] if caching else ["--no-prefix-caching"]
    proc = spawn_server(flags, port, log)
    url = f"http://127.0.0.1:{port}"
    runs: dict[str, Any] = {}
    try:
        wait_ready(url, proc, log, 900)
        for precision in args.precisions:
            for name in ("warm", "shared", "unique"):
                results, duration = asyncio.run(run_level(url, args.model, loads[name], args.output_len, precision,
                                                          args.concurrency, {}))
                if name != "warm":
                    runs[f"{precision}/{name}"] = summarize(results, duration)
                    s = runs[f"{precision}/{name}"]
                    print(f"cache {'on ' if caching else 'off'} {precision} {name:6s}: TTFT median "
                          f"{s['median_ttft_ms']:8.1f} ms, {s['request_throughput']:.3f} req/s, "
                          f"{s['completed']} ok, {s['failed']} failed", flush=True)
        metrics = httpx.get(url + "/metrics").text
        runs["metrics"] = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                           if line.startswith(("quept:prefix_cache", "quept:prefill_tokens_total"))}
    finally:
        proc.terminate()
        proc.wait(60)
    return runs


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    keys = [f"{p}/{w}" for p in report["config"]["precisions"] for w in ("shared", "unique")]
    x = range(len(keys))
    for ax, metric, label in ((axes[0], "median_ttft_ms", "median TTFT (ms, log)"),
                              (axes[1], "request_throughput", "requests / s")):
        for off, (mode, colour) in enumerate((("on", "tab:green"), ("off", "tab:grey"))):
            ax.bar([i + 0.4 * off for i in x], [report[mode][k][metric] for k in keys], 0.4, color=colour,
                   label=f"prefix cache {mode}")
        ax.set_xticks([i + 0.2 for i in x], keys)
        ax.set_ylabel(label)
        if metric.endswith("ms"):
            ax.set_yscale("log")
        ax.legend()
    cfg = report["config"]
    fig.suptitle(f"{cfg['concurrency']} clients, {cfg['system_len']}-token shared system prompt + {cfg['user_len']} "
                 f"own tokens, {cfg['output_len']} out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=["w8", "w4"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--user-len", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_cache.json")
    args = ap.parse_args()
    loads = workloads(checkpoint_path(args), args.num_prompts, args.system_len, args.user_len)
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, caching in (("on", True), ("off", False)):  # one server at a time: never two timed at once
            report[mode] = run_server(args, caching, loads, Path(tmp) / f"{mode}.log")
    ratios = {}
    for p in args.precisions:
        for w in ("shared", "unique"):
            on, off = report["on"][f"{p}/{w}"], report["off"][f"{p}/{w}"]
            ratios[f"{p}/{w}"] = {"ttft_off_over_on": off["median_ttft_ms"] / on["median_ttft_ms"],
                                  "throughput_on_over_off": on["request_throughput"] / off["request_throughput"]}
            r = ratios[f"{p}/{w}"]
            print(f"{p} {w:6s}: median TTFT off/on {r['ttft_off_over_on']:.2f}x, "
                  f"request throughput on/off {r['throughput_on_over_off']:.2f}x")
    report["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
