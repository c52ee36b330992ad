"""The GPU path in one rehearsed run: Triton kernels against the reference, kernel times against fp16
matmul and the copy bandwidth, end-to-end decode of a Llama-3-8B-shaped elastic model built in GPU
memory, and `quept serve --device cuda --backend triton` answering at every width.

    python benchmarks/gpu_check.py --out OUT            # on a CUDA GPU: the real check (< 8 minutes on an H200)
    python benchmarks/gpu_check.py --rehearse --out OUT  # anywhere: the same code on small shapes, on the CPU
                                                        # (Triton interpreter); the test suite runs this

Parts, each recorded in OUT/gpu_check.json with its status, and skipped once `--budget-s` is spent:
  a  correctness: decode and prefill kernels, every width and a per-row mixed batch, odd sizes, fp16,
     against `quept.kernels.reference` on the device
  b  kernels: `triton.testing.do_bench` medians at the Llama-3-8B shapes for M in 1, 4, 16, 64, every
     width and fp16 `torch.matmul`, achieved GB/s (the byte model of kernels/triton_bytes.py) and its
     share of a device-to-device copy's GB/s measured in the same run
  c  decode: a random-weight Llama-3-8B-shaped model (no checkpoint, no hub), tok/s at batch 1 and 16
     per width, the same model dense in fp16, and a batch mixing every width
  d  serving: `quept serve --backend triton` on the default model (or --checkpoint), one request per width
Rehearsed, c and d run their width sweeps on the exact torch-fp32 backend (the interpreter needs seconds
per Triton step) and c adds one Triton decode step through the whole model.
The issue's targets are evaluated from the numbers (`criteria`); rehearsal numbers are not GPU numbers
and the file says so (`measured_on_gpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the checkout's packages, also without `pip install -e .`

WIDTHS = (8, 6, 5, 4, 3, 2)
RANKS = (0, 8, 8, 16, 24, 32)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0, model_type="llama", tie_word_embeddings=False)
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def part_a(device: str, rehearse: bool) -> dict[str, Any]:
    import torch
    from kernel_bench import correctness_sweep

    if rehearse:
        cases = correctness_sweep(device=device, shapes=[(37, 64, 32), (70, 128, 64)], dtypes=[torch.float32])
    else:
        cases = correctness_sweep(device=device, shapes=[(1037, 4096, 64), (4099, 1024, 128), (333, 14336, 64)],
                                  dtypes=[torch.float16, torch.bfloat16], prefill_rows=67)
    return {"status": "passed" if all(c["ok"] for c in cases) else "FAILED", "cases": cases}


def copy_gb_per_s(device: str, nbytes: int, timer: Callable[[Callable[[], Any]], float]) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


def part_b(device: str, rehearse: bool, timer: Callable, budget: Budget) -> dict[str, Any]:
    import torch
    from kernel_bench import bench_linear, random_weights

    from quept.backends.triton import TritonBackend
    from quept.kernels.triton_bytes import MODEL_SHAPES

    backend = TritonBackend()
    copy = copy_gb_per_s(device, (8 << 20) if rehearse else (2 << 30), timer)
    shapes = [("q_proj", 64, 64), ("down_proj", 96, 128)] if rehearse else MODEL_SHAPES["llama-3-8b"]
    rows_m = (1, 4) if rehearse else (1, 4, 16, 64)
    results = []
    dtype = torch.float32 if rehearse else torch.float16
    for name, n, k in shapes:
        if budget.left() < 0:
            return {"status": "stopped: budget", "copy_gb_per_s": copy, "results": results}
        weights = random_weights(n, k, 64 if k % 64 == 0 else 32, device)
        for m in rows_m:
            for r in bench_linear(backend, weights, m, dtype, timer):
                r.update(linear=name, share_of_copy=r["gb_per_s"] / copy)
                results.append(r)
    return {"status": "done", "copy_gb_per_s": copy, "results": results}


def synthetic_model(config: dict[str, Any], device: str, backend_name: str | None, seed: int = 0) -> Any:
    """A random-weight model of `config`'s shape built on `device`: elastic on the named backend, or dense
    (fp16 on a GPU) when `backend_name` is None."""
    import torch

    from quept.backends import get_backend
    from quept.backends.base import ElasticWeights
    from quept.model.args import ModelArgs, linear_names
    from quept.model.model import DenseLinear, ElasticLinear, ElasticModel

    args = ModelArgs.from_hf_config(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    d, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
    kv = args.n_kv_heads * args.head_dim
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    dense = {"model.embed_tokens.weight": (torch.randn(v, d, device=device, generator=gen) * 0.02).to(dt),
             "model.norm.weight": torch.ones(d, device=device)}
    for i in range(args.n_layers):
        dense[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(d, device=device)
        dense[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(d, device=device)
    elastic = backend_name is not None
    backend = get_backend(backend_name, device) if elastic else None
    linears = {}
    g = 64
    for j, name in enumerate(linear_names(args.n_layers)):
        n, k = (v, d) if name == "lm_head" else shapes[name.split(".", 3)[3]]
        if not elastic:
            linears[name] = DenseLinear((torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dt), None, j)
            continue
        w = ElasticWeights(
            codes=torch.randint(0, 256, (n, k), dtype=torch.uint8, device=device, generator=gen),
            scales=torch.stack([torch.full((n, k // g), 2.0 / 2**b / k**0.5, device=device) for b in WIDTHS]).half(),
            mins=torch.full((len(WIDTHS), n, k // g), -1.0 / k**0.5, device=device).half(),
            lora_a=(torch.randn(max(RANKS), k, device=device, generator=gen) * 0.01).half(),
            lora_b=(torch.randn(n, max(RANKS), device=device, generator=gen) * 0.01).half(),
            bias=None, widths=WIDTHS, ranks=RANKS, group_size=g)
        lin = ElasticLinear(w, backend, j)
        if backend.owns_copy(lin.prepared):
            lin.weights = w.without_data()  # the backend holds its own packed copy: the codes can go
        linears[name] = lin
    return ElasticModel(args, dense, linears, backend.layer_ops() if backend is not None else None)


def decode_tok_s(model: Any, plans: list[Any], steps: int, prompt_len: int, sync: Callable[[], None]) -> float:
    """Greedy decode of len(plans) sequences (sequence i at plans[i]) after a prompt of `prompt_len`:
    tok/s over `steps` decode steps."""
    from quept.model.runner import ModelRunner, SeqRows, StepBatch

    b = len(plans)
    runner, tables = ModelRunner.scratch(model, b, prompt_len + steps + 1)
    prompt = [list(range(1 + i, 1 + i + prompt_len)) for i in range(b)]
    logits = runner.execute(StepBatch([SeqRows(prompt[i], 0, tables[i], plans[i]) for i in range(b)]))
    tokens = logits.argmax(-1).tolist()
    sync()
    t0 = time.perf_counter()
    for s in range(steps):
        logits = runner.execute(StepBatch([SeqRows([tokens[i]], prompt_len + s, tables[i], plans[i]) for i in range(b)]))
        tokens = logits.argmax(-1).tolist()  # the host reads every token, as the engine does
    sync()
    return b * steps / (time.perf_counter() - t0)


def part_c(device: str, rehearse: bool, budget: Budget) -> dict[str, Any]:
    """Rehearsed, the sweep runs on the torch-fp32 backend (the interpreter takes seconds per Triton step)
    and one Triton step checks that backend's path through the model."""
    import torch

    from quept.precision.plan import PrecisionPlan

    config = TINY if rehearse else LLAMA3_8B
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    steps, prompt_len = (3, 8) if rehearse else (32, 128)
    backend = "torch-fp32" if rehearse else "triton"
    out: dict[str, Any] = {"config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                             "vocab_size")}, "steps": steps, "prompt_len": prompt_len,
                           "backend": backend}
    if rehearse:
        smoke = synthetic_model(config, device, "triton")
        out["triton_smoke_tok_s"] = decode_tok_s(smoke, [PrecisionPlan.uniform(4)], 1, 2, sync)
    dense = synthetic_model(config, device, None)
    out["fp16"] = {str(bsz): decode_tok_s(dense, [PrecisionPlan.uniform(8)] * bsz, steps, prompt_len, sync)
                   for bsz in (1, 16)}
    del dense
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    model = synthetic_model(config, device, backend)
    out["widths"] = {}
    for bits in WIDTHS:
        if budget.left() < 0:
            out["status"] = "stopped: budget"
            return out
        out["widths"][f"w{bits}"] = {str(bsz): decode_tok_s(model, [PrecisionPlan.uniform(bits)] * bsz, steps,
                                                             prompt_len, sync) for bsz in (1, 16)}
    mixed = [PrecisionPlan.uniform(WIDTHS[i % len(WIDTHS)]) for i in range(16)]
    out["mixed_16"] = decode_tok_s(model, mixed, steps, prompt_len, sync)
    out["status"] = "done"
    return out


def part_d(device: str, checkpoint: Path | None, out_dir: Path, budget: Budget, backend: str) -> dict[str, Any]:
    import httpx
    from serve_bench import serving

    flags = ["--device", device, "--backend", backend, "--max-batch", "4"]
    flags += ["--checkpoint", str(checkpoint)] if checkpoint else []
    answers = {}
    with serving(flags, out_dir / "serve.log", max(60.0, budget.left())) as (url, model):
        for bits in WIDTHS:
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", timeout=300, headers={"X-Precision": f"w{bits}"},
                           json={"model": model, "prompt": "The capital of France is", "max_tokens": 4,
                                 "temperature": 0})
            answers[f"w{bits}"] = {"status": r.status_code, "text": r.json()["choices"][0]["text"]
                                   if r.status_code == 200 else r.text[:200], "seconds": time.perf_counter() - t0,
                                   "precision": r.headers.get("x-precision")}
    ok = all(a["status"] == 200 and a["precision"] == w for w, a in answers.items()) and len(answers) == len(WIDTHS)
    return {"status": "passed" if ok else "FAILED", "answers": answers}


def criteria(report: dict[str, Any], min_weights: int = 4096 * 4096) -> dict[str, Any]:
    """The issue's targets, from the numbers, over the linears of at least `min_weights` weights (the big
    layers); absent where a part did not run."""
    out: dict[str, Any] = {}
    b = report.get("b", {}).get("results", [])
    big = [r for r in b if r["N"] * r["K"] >= min_weights]
    at = lambda m, bits: [r for r in big if r["M"] == m and r["bits"] == bits]  # noqa: E731
    if big:
        out["batch1_w4_speedup_min"] = min(r["speedup"] for r in at(1, 4))
        out["batch1_w4_share_of_copy_min"] = min(r["share_of_copy"] for r in at(1, 4))
        out["batch16_w4_speedup_min"] = min((r["speedup"] for r in at(16, 4)), default=None)
        out["batch1_each_width_faster_than_wider"] = all(
            next(r for r in at(1, WIDTHS[i + 1]) if r["linear"] == x["linear"])["time_us"] < x["time_us"]
            for i in range(len(WIDTHS) - 1) for x in at(1, WIDTHS[i]))
    c = report.get("c", {})
    if c.get("status") == "done":
        out["mixed_16_vs_w8_16"] = c["mixed_16"] / c["widths"]["w8"]["16"]
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Part b: speed-up over fp16 per width and linear, one panel per M; part c: decode tok/s per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("b", {}).get("results", [])
    ms = sorted({r["M"] for r in rows})
    fig, axes = plt.subplots(1, len(ms) + 1, figsize=(4 * (len(ms) + 1), 3.6), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for name in dict.fromkeys(r["linear"] for r in rows):
            pts = [(str(r["bits"]), r["speedup"]) for r in rows if r["M"] == m and r["linear"] == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_title(f"M = {m}")
        ax.set_xlabel("width")
        ax.set_ylabel("speed-up over fp16 matmul")
    axes[0][0].legend(fontsize=7)
    c = report.get("c", {})
    ax = axes[0][-1]
    for bsz in ("1", "16"):
        widths = list(c.get("widths", {}))
        ax.plot(widths, [c["widths"][w][bsz] for w in widths], marker="o", label=f"batch {bsz}")
        if bsz in c.get("fp16", {}):
            ax.axhline(c["fp16"][bsz], ls="--", lw=0.8, label=f"fp16 dense, batch {bsz}")
    ax.set_title("decode tok/s")
    ax.legend(fontsize=7)
    fig.suptitle(report["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    ap.add_argument("--rehearse", action="store_true", help="small shapes on the CPU (Triton interpreter)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="parts not started by then are skipped")
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--checkpoint", type=Path, default=None, help="for part d (default: the default model)")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.rehearse:
        print("no CUDA GPU here: nothing measured (use --rehearse to run the same code on small CPU shapes)")
        return 2
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if cuda and not args.rehearse else "cpu"
    budget = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        import triton.testing

        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
    else:
        from kernel_bench import cpu_timer

        timer = lambda fn: cpu_timer(fn, reps=1)  # noqa: E731
    report: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "measured_on_gpu": device == "cuda",
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)",
                              "torch": torch.__version__}
    parts = {"a": lambda: part_a(device, args.rehearse), "b": lambda: part_b(device, args.rehearse, timer, budget),
             "c": lambda: part_c(device, args.rehearse, budget),
             "d": lambda: part_d(device, args.checkpoint, args.out, budget, "torch-fp32" if args.rehearse else "triton")}
    for name in args.parts.split(","):
        if budget.left() < 0:
            report[name] = {"status": "skipped: budget spent"}
            continue
        t0 = time.perf_counter()
        try:
            report[name] = parts[name]()
        except (Exception, SystemExit) as err:  # one broken part must not lose the others' numbers (a server
            # that does not come up raises SystemExit)
            report[name] = {"status": f"error: {type(err).__name__}: {err}"}
        report[name]["seconds"] = time.perf_counter() - t0
        print(f"part {name}: {report[name]['status']} in {report[name]['seconds']:.1f} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["criteria"] = criteria(report, 0 if args.rehearse else 4096 * 4096)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    plot(report, args.out / "gpu_check.png")
    print(json.dumps(report["criteria"], indent=1))
    bad = [p for p in args.parts.split(",") if not str(report[p]["status"]).startswith(("passed", "done"))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
