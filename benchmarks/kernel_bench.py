"""Kernel benchmark: the Triton elastic linear against fp16 `torch.matmul` (docs/architecture.md §6).

On a GPU: median times (`triton.testing.do_bench`) for the linear shapes of Llama-2-7B and
Llama-3-8B, rows M in {1, 4, 16, 64, 256, 2048}, every width and a batch mixing all widths, with
the byte-count model (kernels/triton_bytes.py) next to each time: achieved GB/s, the speed-up over
fp16 and its ratio to the ideal `16 / (b + affine bits)`. Results go to
benchmarks/results/kernels_<gpu>.json.

Without a GPU it says so, measures nothing, runs the correctness sweep in the Triton interpreter
(small shapes) and prints the byte model's H100 roofline; it exits 0 when the sweep passes.

    python benchmarks/kernel_bench.py                 # GPU: full table; CPU: sweep + roofline
    python benchmarks/kernel_bench.py --models llama-3-8b --rows 1,16 --cudagraph
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, also without `pip install -e .`

import torch  # noqa: E402

from quept.kernels.triton_bytes import (  # noqa: E402
    H100_HBM_BYTES_PER_S,
    MODEL_SHAPES,
    decode_roofline,
    elastic_traffic,
    fp16_matmul_traffic,
    ideal_speedup,
    total_bytes,
)

log = logging.getLogger("benchmarks.kernel_bench")

WIDTHS = (8, 6, 5, 4, 3, 2)
RANKS = (0, 8, 8, 16, 24, 32)  # quept.build.builder.DEFAULT_RANKS
ROWS = (1, 4, 16, 64, 256, 2048)
Timer = Callable[[Callable[[], Any]], float]  # returns milliseconds


def random_weights(n: int, k: int, g: int, device: str, seed: int = 0) -> Any:
    from quept.backends.base import ElasticWeights

    gen = torch.Generator().manual_seed(seed)
    scales = torch.stack([(torch.rand(n, k // g, generator=gen) + 0.5) * (0.4 / 2**b) for b in WIDTHS])
    return ElasticWeights(
        codes=torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen).to(device),
        scales=scales.half().to(device),
        mins=(-0.2 + 0.02 * torch.randn(len(WIDTHS), n, k // g, generator=gen)).half().to(device),
        lora_a=(0.05 * torch.randn(max(RANKS), k, generator=gen)).half().to(device),
        lora_b=(0.05 * torch.randn(n, max(RANKS), generator=gen)).half().to(device),
        bias=None, widths=WIDTHS, ranks=RANKS, group_size=g,
    )


def cpu_timer(fn: Callable[[], Any], reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_linear(backend: Any, weights: Any, m: int, dtype: torch.dtype, timer: Timer) -> list[dict[str, Any]]:
    """One shape at M rows: fp16 matmul, then every width and a mixed batch through the backend."""
    from quept.precision.segments import segments_of

    n, k = weights.codes.shape
    dev = weights.codes.device
    g = weights.group_size
    prepared = backend.prepare(weights)
    x = torch.randn(m, k, device=dev).to(dtype)
    w16 = torch.randn(n, k, device=dev).to(dtype)
    t_fp16 = timer(lambda: torch.matmul(x, w16.t()))
    fp16_bytes = total_bytes(fp16_matmul_traffic(m, n, k))
    rows = []
    mixed = torch.tensor([WIDTHS[i % len(WIDTHS)] for i in range(m)], device=dev)
    for bits in (*WIDTHS, "mixed"):
        row_bits = segments_of(mixed.tolist()) if bits == "mixed" else int(bits)
        present = sorted(set(mixed.tolist())) if bits == "mixed" else [int(bits)]
        top = max(present)
        rank = max(RANKS[WIDTHS.index(b)] for b in present)
        backend.forward(prepared, x, row_bits)  # autotune and compile outside the timing
        t = timer(lambda row_bits=row_bits: backend.forward(prepared, x, row_bits))
        traffic = elastic_traffic(m, n, k, top, g, rank, act_bytes=x.element_size(), widths_present=len(present))
        nbytes = total_bytes(traffic)
        ideal = ideal_speedup(top, g)
        rows.append({
            "N": n, "K": k, "M": m, "bits": bits, "rank": rank, "group_size": g,
            "time_us": t * 1e3, "fp16_time_us": t_fp16 * 1e3,
            "bytes": nbytes, "bytes_by_kernel": {tr.kernel: tr.total for tr in traffic}, "fp16_bytes": fp16_bytes,
            "gb_per_s": nbytes / (t * 1e-3) / 1e9, "fp16_gb_per_s": fp16_bytes / (t_fp16 * 1e-3) / 1e9,
            "speedup": t_fp16 / t, "ideal_speedup": ideal, "ratio_to_ideal": t_fp16 / t / ideal,
        })
    return rows


def format_row(model: str, name: str, r: dict[str, Any]) -> str:
    return (f"{model:11s} {name:9s} {r['N']:6d}x{r['K']:<6d} M={r['M']:<5d} w{r['bits']!s:6s} "
            f"{r['time_us']:9.1f} us  fp16 {r['fp16_time_us']:9.1f} us  {r['bytes'] / 1e6:8.2f} MB "
            f"{r['gb_per_s']:7.0f} GB/s  x{r['speedup']:5.2f}  ideal x{r['ideal_speedup']:4.2f}  "
            f"ratio {r['ratio_to_ideal']:4.2f}")


def run_gpu(args: argparse.Namespace) -> int:
    import triton.testing

    from quept.backends.triton import TritonBackend

    backend = TritonBackend()
    if args.cudagraph:
        timer: Timer = lambda fn: triton.testing.do_bench_cudagraph(fn, return_mode="median")  # noqa: E731
    else:
        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
    gpu = torch.cuda.get_device_name()
    results: list[dict[str, Any]] = []
    print(f"GPU: {gpu}; median times (triton.testing.do_bench{'_cudagraph' if args.cudagraph else ''}); "
          f"bytes = compulsory traffic of kernels/triton_bytes.py")
    for model in args.models:
        for name, n, k in MODEL_SHAPES[model]:
            weights = random_weights(n, k, args.group_size, "cuda")
            for m in args.rows:
                for r in bench_linear(backend, weights, m, torch.float16, timer):
                    r.update(model=model, linear=name)
                    results.append(r)
                    print(format_row(model, name, r), flush=True)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"kernels_{gpu.replace(' ', '_').lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "gpu": gpu, "torch": torch.__version__,
                               "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


def correctness_sweep(quick: bool = False, device: str = "cpu",
                      shapes: Sequence[tuple[int, int, int]] | None = None,
                      dtypes: Sequence[torch.dtype] | None = None, prefill_rows: int = 19) -> list[dict[str, Any]]:
    """Both kernel paths and the bit-plane pack against the reference: every width (in the first dtype;
    the mixed batch in every dtype), group sizes, odd sizes. Shapes (N, K, G) default to small ones for
    the interpreter. Returns one record per case, each with `ok`."""
    from quept.kernels import triton_ops
    from quept.kernels.reference import elastic_linear_ref, pack_bitplanes_ref

    if shapes is None:
        shapes = [(37, 2 * g if g > 32 else 96, g) for g in ((64,) if quick else (32, 64, 128))]
    if dtypes is None:
        dtypes = (torch.float32,) if quick else (torch.float32, torch.float16, torch.bfloat16)
    tol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}
    cases: list[dict[str, Any]] = []
    for n, k, g in shapes:
        w = random_weights(n, k, g, device, seed=g + n)
        planes = triton_ops.pack_bitplanes_op(w.codes)
        cases.append({"N": n, "K": k, "kernel": "pack_bitplanes",
                      "ok": bool(torch.equal(planes.cpu(), pack_bitplanes_ref(w.codes.cpu())))})
        wbits, wranks, lut = triton_ops.width_tables(WIDTHS, RANKS, device)
        for dtype in dtypes:
            for path, m in (("decode", 5), ("prefill", prefill_rows)):
                mixed = torch.tensor([WIDTHS[i % len(WIDTHS)] for i in range(m)], device=device)
                cases_bits: list[int | torch.Tensor] = [*WIDTHS, mixed]
                if quick or dtype != dtypes[0]:
                    cases_bits = cases_bits[-1:]
                for bits in cases_bits:
                    x = torch.randn(m, k, device=device).to(dtype)
                    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
                    idx = triton_ops.row_width_index(bits, m, WIDTHS, lut)
                    triton_ops.elastic_linear_planes(x, planes, w.scales, w.mins, w.lora_a, w.lora_b, w.bias, idx,
                                                     wbits, wranks, g, isinstance(bits, int), out=out, path=path)
                    ref = elastic_linear_ref(x.float(), w.codes, w.scales, w.mins, w.lora_a, w.lora_b,
                                             bits if isinstance(bits, int) else bits.cpu(), WIDTHS, RANKS, g)
                    err = float((out.float().cpu() - ref.float().cpu()).abs().max() / ref.float().abs().max())
                    good = bool(not torch.isnan(out).any() and err < tol[dtype])
                    label = "mixed" if isinstance(bits, torch.Tensor) else bits
                    cases.append({"N": n, "K": k, "G": g, "dtype": str(dtype), "path": path, "M": m, "bits": label,
                                  "rel_err": err, "ok": good})
                    print(f"  N={n:5d} K={k:5d} G={g:3d} {str(dtype):14s} {path:7s} M={m:2d} w{label!s:5s} "
                          f"rel err {err:.1e} {'ok' if good else 'FAIL'}", flush=True)
    return cases


def print_roofline(group_size: int) -> None:
    print(f"\nByte model, decode (M=1), the 7 block linears x 32 layers, G={group_size}, ranks {dict(zip(WIDTHS, RANKS))},"
          f" at H100 HBM3 {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s (paper numbers, not measurements):")
    for model in MODEL_SHAPES:
        for r in decode_roofline(model, WIDTHS, RANKS, group_size):
            print(f"  {model:11s} w{r['bits']} r{r['rank']:<3d} {r['bytes'] / 1e9:6.2f} GB/token "
                  f"{r['time_us'] / 1e3:6.2f} ms (fp16 {r['fp16_time_us'] / 1e3:5.2f} ms)  x{r['speedup']:.2f} "
                  f"(ideal x{r['ideal_speedup']:.2f})")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=lambda s: s.split(","), default=list(MODEL_SHAPES),
                    help=f"comma-separated, from {list(MODEL_SHAPES)}")
    ap.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=list(ROWS))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--cudagraph", action="store_true", help="time with CUDA graphs (kernel time without launch overhead)")
    ap.add_argument("--quick", action="store_true", help="CPU sweep: one group size and dtype")
    ap.add_argument("--out", default=None, help="JSON path (GPU only)")
    args = ap.parse_args(argv)
    bad = [m for m in args.models if m not in MODEL_SHAPES]
    if bad:
        ap.error(f"unknown models {bad}; choose from {list(MODEL_SHAPES)}")
    if torch.cuda.is_available():
        return run_gpu(args)
    print("No CUDA GPU on this machine: no GPU times were measured. Running the correctness sweep of the "
          "Triton kernels in the interpreter (TRITON_INTERPRET=1, small shapes) instead.", flush=True)
    ok = all(c["ok"] for c in correctness_sweep(args.quick))
    print_roofline(args.group_size)
    print("\ncorrectness sweep:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
