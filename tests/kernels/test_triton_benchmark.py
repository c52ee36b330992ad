"""The kernel benchmark's byte model and its code paths (CPU: interpreter sweep; the GPU table code with a CPU timer)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates our kernels

import pytest
import torch

pytest.importorskip("triton")

from quept.kernels.triton_bytes import decode_traffic, ideal_speedup, prefill_traffic, total_bytes  # noqa: E402
from tests.benchmarks import load_benchmark  # noqa: E402


def load_bench():
    return load_benchmark("kernel_bench")


def test_byte_model() -> None:
    assert ideal_speedup(4, 64) == pytest.approx(16 / 4.5)
    assert ideal_speedup(8, 128) == pytest.approx(16 / 8.25)
    n, k, g = 4096, 4096, 64
    gemv, epi = decode_traffic(1, n, k, 2, g, 0)
    assert gemv.read == n * k // 4 + n * (k // g) * 4 + 2 * k  # 2 of 8 planes, one width's affines, x
    assert epi.written == 2 * n
    # more bits read strictly more; the adapter adds A and B once
    assert total_bytes(decode_traffic(1, n, k, 3, g, 0)) > gemv.total + epi.total
    with_lora = total_bytes(prefill_traffic(64, n, k, 4, g, 16)) - total_bytes(prefill_traffic(64, n, k, 4, g, 0))
    assert with_lora >= 16 * (n + k) * 2


def test_bench_rows_with_cpu_timer() -> None:
    bench = load_bench()
    from quept.backends import get_backend

    w = bench.random_weights(40, 64, 32, "cpu")
    for m in (2, 9):  # decode and prefill paths
        rows = bench.bench_linear(get_backend("triton"), w, m, torch.float32, lambda fn: bench.cpu_timer(fn, reps=1))
        assert [r["bits"] for r in rows] == [8, 6, 5, 4, 3, 2, "mixed"]
        for r in rows:
            assert r["time_us"] > 0 and r["bytes"] > 0 and r["ratio_to_ideal"] > 0
            assert bench.format_row("tiny", "q_proj", r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU branch only runs without a GPU")
def test_cpu_branch_says_no_gpu_and_exits_0(capsys) -> None:
    assert load_bench().main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "no GPU times were measured" in out and "correctness sweep: passed" in out
