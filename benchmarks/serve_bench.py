"""Serving benchmark with vLLM `benchmark_serving` fields: concurrent streaming clients vs one at a time.

Starts `quept serve` (or targets --url), then for every precision and every concurrency level sends
the same `--num-prompts` streaming completions (prompt token ids cut from wikitext-2 valid.txt,
`ignore_eos`, exactly `--output-len` tokens each) with at most `concurrency` in flight, and
reports per run: request and output-token throughput, mean/median/p99 TTFT, TPOT, ITL and
end-to-end latency (ms), as vLLM's benchmark_serving does. Writes JSON and a PNG.

    python benchmarks/serve_bench.py                       # default model, w8 and w4, 1 vs 16 clients
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --precisions w8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "quept" / "data" / "wikitext-2" / "valid.txt"  # the packaged calibration text


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM benchmark_serving's metrics (times in ms)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, xs in series.items():
        ms = [x * 1000 for x in xs]
        summary[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else float("nan")
        summary[f"median_{name}_ms"] = statistics.median(ms) if ms else float("nan")
        summary[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else float("nan")
        summary[f"p99_{name}_ms"] = percentile(ms, 99)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int,
                      precision: str, headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(ok=False, prompt_len=len(prompt))
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body,
                                 headers={**headers, "X-Precision": precision}) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_len = chunk["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - t0
        res.ok = res.output_len > 0
        if not res.ok:
            res.error = "no usage chunk"
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.error = f"{type(err).__name__}: {err}"
    return res


async def run_level(url: str, model: str, prompts: list[list[int]], output_len: int, precision: str,
                    concurrency: int, headers: dict[str, str]) -> tuple[list[RequestResult], float]:
    """Send every prompt with at most `concurrency` in flight; the results and the wall time."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def guarded(p: list[int]) -> RequestResult:
            async with sem:
                return await one_request(client, url, model, p, output_len, precision, headers)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
        duration = time.perf_counter() - t0
    return list(results), duration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_server(flags: list[str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`quept serve FLAGS` of this checkout on 127.0.0.1:port, its output in `log_path`."""
    cmd = [sys.executable, "-m", "quept.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log_path.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    flags = ["--backend", args.backend, "--max-batch", str(max(args.concurrency))]
    if args.checkpoint:
        flags += ["--checkpoint", str(args.checkpoint)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return spawn_server(flags, port, log_path)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, log_path: Path | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path else ""
            raise SystemExit(f"server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}/health not 200 after {timeout:.0f} s")
        time.sleep(1)


@contextlib.contextmanager
def serving(flags: list[str], log_path: Path, timeout: float) -> Iterator[tuple[str, str]]:
    """`quept serve FLAGS` on a free port, ready: (its URL, its model id); stopped on the way out."""
    port = free_port()
    proc = spawn_server(flags, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path, timeout)
        yield url, httpx.get(url + "/v1/models").json()["data"][0]["id"]
    finally:
        proc.terminate()
        proc.wait(60)


def checkpoint_path(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    from quept.build.builder import default_checkpoint_dir
    from quept.server.settings import Settings

    return default_checkpoint_dir(Settings().cache_dir)


def make_prompts(checkpoint: Path, n: int, input_len: int) -> list[list[int]]:
    """`n` prompts of exactly `input_len` token ids, consecutive windows of wikitext-2 valid.txt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    text = DATA.read_text() if DATA.is_file() else ("The quick brown fox jumps over the lazy dog. " * 2000)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 200]
    ids = tok(" ".join(lines[: 4 * n]))["input_ids"]
    if len(ids) < n * input_len:
        raise SystemExit(f"not enough text for {n} prompts of {input_len} tokens")
    return [list(ids[i * input_len : (i + 1) * input_len]) for i in range(n)]


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    precisions = list(dict.fromkeys(r["precision"] for r in runs))
    levels = sorted({r["concurrency"] for r in runs})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(levels)
    for j, c in enumerate(levels):
        vals = [next((r["output_throughput"] for r in runs if r["precision"] == p and r["concurrency"] == c), 0)
                for p in precisions]
        bars = ax1.bar([i + j * width for i in range(len(precisions))], vals, width, label=f"{c} client(s)")
        ax1.bar_label(bars, fmt="%.1f")
    top = max(r["output_throughput"] for r in runs)
    for i, p in enumerate(precisions):
        ratio = report["speedup"].get(p)
        if ratio:
            ax1.text(i + width * (len(levels) - 1) / 2, top * 1.12, f"x{ratio:.2f}", ha="center", fontweight="bold")
    ax1.set_ylim(0, top * 1.25)
    ax1.set_xticks([i + width * (len(levels) - 1) / 2 for i in range(len(precisions))], precisions)
    ax1.set_ylabel("output tokens / s")
    ax1.set_title("output-token throughput (bold: speedup)")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(levels), fontsize=8)
    metrics = ["median_ttft_ms", "median_tpot_ms", "median_itl_ms", "p99_itl_ms"]
    labels = [f"{r['precision']} c={r['concurrency']}" for r in runs]
    w = 0.8 / len(metrics)
    for k, m in enumerate(metrics):
        ax2.bar([i + k * w for i in range(len(runs))], [r[m] for r in runs], w, label=m.replace("_ms", ""))
    ax2.set_xticks([i + w * (len(metrics) - 1) / 2 for i in range(len(runs))], labels, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms (log)")
    ax2.set_title("latency")
    ax2.legend(fontsize=8)
    s = report["settings"]
    load = statistics.fmean(r["load_average_before"] for r in runs)
    fig.suptitle(f"quept serve, {s['model']} ({s['backend']} backend), {s['num_prompts']} prompts of "
                 f"{s['input_len']} -> {s['output_len']} tokens, {report['machine']['cores']} CPU cores shared "
                 f"(load average ~{load:.0f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `quept serve` on a free port)")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint to serve (default: the default model)")
    ap.add_argument("--model", help="model name sent in requests (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("QUEPT_API_KEY"))
    ap.add_argument("--backend", default="auto", help="server backend when started here")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0: torch default)")
    ap.add_argument("--precisions", default="w8,w4")
    ap.add_argument("--concurrency", default="1,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="passes per level, interleaved; results pooled")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_bench.json")
    ap.add_argument("--ready-timeout", type=float, default=1800, help="seconds to wait for /health (first build)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)  # before the run: a bad --out fails in seconds, not minutes

    proc, log_path = None, None
    url = args.url
    if url is None:
        log_path = Path(tempfile.mkdtemp(prefix="serve_bench-")) / "server.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, port, log_path)
        print(f"started quept serve on {url} (log {log_path})", flush=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        wait_ready(url, proc, log_path, args.ready_timeout)
        model = args.model or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        info = httpx.get(url + "/v1/precisions", headers=headers).json()
        prompts = make_prompts(checkpoint_path(args), args.num_prompts, args.input_len)
        runs = []
        for precision in args.precisions.split(","):
            asyncio.run(run_level(url, model, prompts[:2], 4, precision, 2, headers))  # warm-up: weights, caches
            done: dict[int, tuple[list[RequestResult], float, list[float]]] = {c: ([], 0.0, []) for c in args.concurrency}
            # CPU seconds this load generator spent per level: on a small machine it competes with the server
            client_cpu: dict[int, float] = {}
            for rep in range(args.repeat):  # levels interleaved, so a drifting machine load hits them alike
                for c in args.concurrency:
                    load = os.getloadavg()[0]
                    cpu0 = time.process_time()
                    results, seconds = asyncio.run(run_level(url, model, prompts, args.output_len, precision, c, headers))
                    client_cpu[c] = client_cpu.get(c, 0.0) + time.process_time() - cpu0
                    prev = done[c]
                    done[c] = (prev[0] + results, prev[1] + seconds, prev[2] + [load])
                    one = summarize(results, seconds)
                    print(f"  {precision} c={c:>2} pass {rep + 1}/{args.repeat}: {one['output_throughput']:.1f} out tok/s "
                          f"(load {load:.1f})", flush=True)
            for c in args.concurrency:
                results, seconds, loads = done[c]
                s = summarize(results, seconds)
                s.update(precision=precision, concurrency=c, passes=args.repeat,
                         load_average_before=statistics.fmean(loads), load_averages=loads,
                         client_cpu_s=client_cpu[c], client_cpu_share=client_cpu[c] / seconds)
                load_before = s["load_average_before"]
                runs.append(s)
                print(f"{precision} c={c:>2}: {s['output_throughput']:7.1f} out tok/s  {s['request_throughput']:.3f} req/s"
                      f"  TTFT med {s['median_ttft_ms']:.0f} ms  TPOT med {s['median_tpot_ms']:.0f} ms"
                      f"  ITL med/p99 {s['median_itl_ms']:.0f}/{s['p99_itl_ms']:.0f} ms  E2E med {s['median_e2el_ms']:.0f} ms"
                      f"  (load {load_before:.1f}, load generator {100 * s['client_cpu_share']:.0f} % of a core)", flush=True)
        lo, hi = min(args.concurrency), max(args.concurrency)
        speedup = {}
        for p in args.precisions.split(","):
            a = next(r for r in runs if r["precision"] == p and r["concurrency"] == lo)
            b = next(r for r in runs if r["precision"] == p and r["concurrency"] == hi)
            speedup[p] = b["output_throughput"] / a["output_throughput"]
        report = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "note": "output_throughput with the highest concurrency divided by one-at-a-time (speedup); "
                    "times in ms; the machine is shared with other jobs, see load_average_*",
            "machine": machine(),
            "settings": {"model": model, "backend": info.get("backend", args.backend) if isinstance(info, dict) else
                         args.backend, "threads": args.threads, "num_prompts": args.num_prompts, "repeat": args.repeat,
                         "input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency,
                         "default_precision": info.get("default") if isinstance(info, dict) else None},
            "speedup": speedup,
            "runs": runs,
        }
        args.out.write_text(json.dumps(report, indent=1))
        plot(report, args.out.with_suffix(".png"))
        print(f"speedup (c={hi} vs c={lo}, output tokens/s): " + ", ".join(f"{p} x{v:.2f}" for p, v in speedup.items()))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
