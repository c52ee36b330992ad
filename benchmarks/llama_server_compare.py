"""quept serve against llama.cpp's llama-server on the same GGUF, through the same streaming load generator.

One run, on this machine: a memory-bandwidth probe; then `--repeat` rounds, each sending the same
streaming completions (prompt token ids from wikitext-2, `ignore_eos`, exactly `--output-len`
tokens) at 1 and 16 concurrent streams to
  - llama-server on the shipped GGUF (Q4_1 decoder weights),
  - llama-server on its Q8_0 (made once with `llama-quantize --allow-requantize`),
  - quept serve on the default checkpoint, at every width in `--precisions` (one server, one
    checkpoint loaded once, the width per request by `X-Precision`).
All servers use the same thread count; they run one at a time (the others idle). Each row is the
median over rounds of the output tokens/s; ratios are medians of the per-round ratios. The issue's
targets (w8 >= 1.0x Q8_0 at one stream, w8 >= 1.5x Q8_0 and w4 >= 4x Q4_1 at 16 streams) are
computed into `criteria`.

llama-server comes from `--llama-bin DIR`, from PATH, or from a build in
$QUEPT_CACHE_DIR/llama.cpp made by `--build`: the llama.cpp sources vendored in the
llama-cpp-python sdist (`pip download --no-binary :all:`, or `--sdist FILE`), compiled with
`cmake -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON` (about 10 minutes on 2 cores, once).

    python benchmarks/llama_server_compare.py --build --threads 2 --repeat 3
    python benchmarks/llama_server_compare.py --threads 1 --out benchmarks/results/llama_server_1thread.json
    QUEPT_NATIVE_ISA=avx2 python benchmarks/llama_server_compare.py ...   # quept's AVX2 path forced
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_bench, the shared load generator
from serve_bench import ROOT, free_port, machine, make_prompts, run_level, serving, summarize, wait_ready  # noqa: E402

sys.path.insert(0, str(ROOT))
TOOLS = ("llama-server", "llama-quantize")


def llama_cache() -> Path:
    from quept.kernels.native import cache_dir

    return cache_dir() / "llama.cpp"


def find_tools(bin_dir: Path | None) -> dict[str, Path] | None:
    """llama-server and llama-quantize from `bin_dir`, else PATH, else the cached build; None if missing."""
    for d in ([bin_dir] if bin_dir else []) + [None, llama_cache() / "build" / "bin"]:
        found = {t: Path(p) for t in TOOLS if (p := shutil.which(t, path=None if d is None else str(d)))}
        if len(found) == len(TOOLS):
            return found
    return None


def build_tools(sdist: Path | None, jobs: int) -> dict[str, Path]:
    """Compile llama-server and llama-quantize from the llama-cpp-python sdist into the cache."""
    dest = llama_cache()
    dest.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        dl = Path(tempfile.mkdtemp(prefix="llama-sdist-"))
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(dl),
                        "llama-cpp-python"], check=True)
        sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
    src = dest / "src"
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
            for m in members:
                m.name = m.name[len(f"{top}/vendor/llama.cpp/"):]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    build = dest / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"],
                   check=True)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
                   check=True)
    tools = find_tools(build / "bin")
    if tools is None:
        raise SystemExit(f"the build in {build} made no {' / '.join(TOOLS)}")
    (dest / "SOURCE").write_text(f"{sdist.name}\n")
    return tools


def q8_0_of(quantize: Path, source: Path) -> Path:
    """The Q8_0 GGUF of `source` (made once, next to the llama.cpp build)."""
    out = llama_cache() / f"{source.stem}-Q8_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        r = subprocess.run([str(quantize), "--allow-requantize", str(source), str(tmp), "Q8_0"], capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(f"llama-quantize failed ({r.returncode}):\n{r.stderr[-3000:]}")
        tmp.rename(out)
    return out


def bandwidth_gbs(threads: int, mb: int = 256, reps: int = 7) -> float:
    """Read bandwidth: the median GB/s of summing an `mb` MB fp32 tensor on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return x.numel() * 4 / statistics.median(times) / 1e9


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, threads: int, parallel: int, ctx_each: int, log_path: Path,
                 timeout: float) -> Iterator[str]:
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_each), "--no-warmup"]
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log_path, timeout)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def measure(url: str, model: str, prompts: list[list[int]], output_len: int, precision: str, streams: int
            ) -> dict[str, Any]:
    n = len(prompts) if streams > 1 else max(2, len(prompts) // 8)  # one stream: 1/8 of the prompts
    # a fresh connection per request: llama-server (cpp-httplib) closes a kept-alive connection after a
    # few requests, which a client that reuses it meets as a dropped request; every server gets the same
    results, seconds = asyncio.run(run_level(url, model, prompts[:n], output_len, precision, streams,
                                             {"Connection": "close"}))
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise SystemExit(f"{url} {precision}: {len(bad)} failed requests, e.g. {bad[0]}")
    if any(r.output_len != output_len for r in results):
        raise SystemExit(f"{url} {precision}: outputs of {sorted({r.output_len for r in results})} tokens, "
                         f"expected {output_len} (ignore_eos)")
    return summarize(results, seconds)


def ratio_medians(rounds: list[dict[str, float]], a: str, b: str) -> float:
    return statistics.median(r[a] / r[b] for r in rounds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, help="directory holding llama-server and llama-quantize")
    ap.add_argument("--build", action="store_true", help="build llama-server from the llama-cpp-python sdist if missing")
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python sdist to build from (default: pip download)")
    ap.add_argument("--gguf", type=Path, help="source GGUF for llama-server (default: the shipped default model's)")
    ap.add_argument("--checkpoint", type=Path, help="quept checkpoint built from it (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quept-args", default="", help="more `quept serve` flags, e.g. '--small-batch-rows 0'")
    ap.add_argument("--precisions", default="w8,w6,w5,w4,w3,w2")
    ap.add_argument("--streams", default="1,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--num-prompts", type=int, default=32, help="prompts per many-stream level (1/8 at one stream)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="rounds over every server and width")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama_server_compare.json")
    ap.add_argument("--ready-timeout", type=float, default=1800)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    from quept.build.builder import default_checkpoint_dir
    from quept.build.source import default_source_path
    from quept.server.settings import Settings

    tools = find_tools(args.llama_bin) or (build_tools(args.sdist, os.cpu_count() or 2) if args.build else None)
    if tools is None:
        raise SystemExit("llama-server not found (--llama-bin DIR, PATH, or --build to compile it from the "
                         "llama-cpp-python sdist)")
    source = args.gguf or default_source_path()
    ggufs = {"llama.cpp Q4_1": source, "llama.cpp Q8_0": q8_0_of(tools["llama-quantize"], source)}
    checkpoint = args.checkpoint or default_checkpoint_dir(Settings().cache_dir)
    prompts = make_prompts(checkpoint, args.num_prompts, args.input_len)
    widths = args.precisions.split(",")
    logs = Path(tempfile.mkdtemp(prefix="llama_compare-"))
    bandwidth = {t: bandwidth_gbs(t) for t in sorted({1, args.threads})}
    print(f"read bandwidth: {', '.join(f'{v:.1f} GB/s on {t} thread(s)' for t, v in bandwidth.items())}", flush=True)
    env_isa = os.environ.get("QUEPT_NATIVE_ISA", "")
    quept_flags = ["--threads", str(args.threads), "--max-batch", str(max(args.streams))]
    if args.checkpoint:
        quept_flags += ["--checkpoint", str(args.checkpoint)]
    quept_flags += shlex.split(args.quept_args)
    rounds: dict[int, list[dict[str, float]]] = {s: [] for s in args.streams}
    detail: list[dict[str, Any]] = []
    ctx_each = args.input_len + args.output_len + 64
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(llama_server(tools["llama-server"], path, args.threads, max(args.streams),
                                                       ctx_each, logs / f"{name.split()[-1]}.log", args.ready_timeout))
                for name, path in ggufs.items()}
        quept_url, model = stack.enter_context(serving(quept_flags, logs / "quept.log", args.ready_timeout))
        targets = [(name, url, "w8") for name, url in urls.items()] + [(f"quept {w}", quept_url, w) for w in widths]
        for _name, url, precision in targets:  # warm-up: first requests load pages and caches
            measure(url, model, prompts[:2], 8, precision, 1)
        for rep in range(args.repeat):
            for streams in args.streams:
                row: dict[str, float] = {}
                order = targets if rep % 2 == 0 else targets[::-1]  # drift on a shared machine hits all alike
                for name, url, precision in order:
                    s = measure(url, model, prompts, args.output_len, precision, streams)
                    row[name] = s["output_throughput"]
                    detail.append({"round": rep, "streams": streams, "server": name, **s})
                    print(f"round {rep + 1}/{args.repeat} {streams:>2} stream(s) {name:<15} "
                          f"{s['output_throughput']:7.1f} out tok/s  TPOT med {s['median_tpot_ms']:.1f} ms", flush=True)
                rounds[streams].append(row)
    names = [t[0] for t in targets]
    table = {s: {n: statistics.median(r[n] for r in rounds[s]) for n in names} for s in args.streams}
    vs = {s: {n: {"vs_q8_0": ratio_medians(rounds[s], n, "llama.cpp Q8_0"),
                  "vs_q4_1": ratio_medians(rounds[s], n, "llama.cpp Q4_1")} for n in names if n.startswith("quept")}
          for s in args.streams}
    lo, hi = min(args.streams), max(args.streams)
    criteria = {}  # the targets, each where its stream count was measured
    if "w8" in widths and lo == 1:
        criteria["w8 >= 1.0x llama-server Q8_0, 1 stream"] = vs[lo]["quept w8"]["vs_q8_0"] >= 1.0
    if hi > 1:
        if "w8" in widths:
            criteria[f"w8 >= 1.5x llama-server Q8_0, {hi} streams"] = vs[hi]["quept w8"]["vs_q8_0"] >= 1.5
        if "w4" in widths:
            criteria[f"w4 >= 4x llama-server Q4_1, {hi} streams"] = vs[hi]["quept w4"]["vs_q4_1"] >= 4.0
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine(), "load_average_before": os.getloadavg()[0]},
        "settings": {"threads": args.threads, "input_len": args.input_len, "output_len": args.output_len,
                     "num_prompts": args.num_prompts, "repeat": args.repeat, "quept_isa": env_isa or "best available",
                     "quept_serve_flags": quept_flags,
                     "checkpoint": str(checkpoint), "gguf": {k: str(v) for k, v in ggufs.items()},
                     "llama_server": str(tools["llama-server"]),
                     "llama_source": (llama_cache() / "SOURCE").read_text().strip()
                     if (llama_cache() / "SOURCE").exists() else "found on PATH or --llama-bin"},
        "bandwidth_gb_s": {str(t): v for t, v in bandwidth.items()},
        "output_tokens_per_s": {str(s): table[s] for s in args.streams},
        "ratios": {str(s): vs[s] for s in args.streams},
        "criteria": criteria,
        "runs": detail,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\noutput tokens/s, median of {args.repeat} rounds ({args.threads} thread(s)); ratio to Q8_0 / Q4_1")
    for s in args.streams:
        print(f"  {s} stream(s):")
        for n in names:
            r = vs[s].get(n)
            extra = f"  x{r['vs_q8_0']:.2f} Q8_0  x{r['vs_q4_1']:.2f} Q4_1" if r else ""
            print(f"    {n:<15} {table[s][n]:7.1f}{extra}")
    for k, ok in criteria.items():
        print(f"  {'PASS' if ok else 'miss'}  {k}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
