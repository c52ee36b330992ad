"""The GPU check rehearsed on the CPU (small shapes, the Triton interpreter), so that the one run on a
GPU cannot break unseen: every part runs, writes its record, and the targets are computed."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates our kernels

import pytest
import torch

from tests.benchmarks import load_benchmark

pytest.importorskip("triton")


def load_check():
    return load_benchmark("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is the CPU stand-in for the GPU run")
def test_rehearsal_runs_every_part(tmp_path, tiny_ckpt) -> None:
    check = load_check()
    assert check.main(["--rehearse", "--out", str(tmp_path), "--checkpoint", str(tiny_ckpt), "--budget-s", "600"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.png").stat().st_size > 0
    assert report["measured_on_gpu"] is False and report["device"] == "cpu (rehearsal)"
    a = report["a"]
    assert a["status"] == "passed"
    assert {c["bits"] for c in a["cases"] if "bits" in c} == {8, 6, 5, 4, 3, 2, "mixed"}
    assert {c["path"] for c in a["cases"] if "path" in c} == {"decode", "prefill"}
    assert any(c.get("kernel") == "pack_bitplanes" for c in a["cases"])
    b = report["b"]
    assert b["copy_gb_per_s"] > 0 and {r["bits"] for r in b["results"]} == {8, 6, 5, 4, 3, 2, "mixed"}
    assert all(r["share_of_copy"] > 0 and r["fp16_time_us"] > 0 for r in b["results"])
    c = report["c"]
    assert c["status"] == "done" and set(c["widths"]) == {"w8", "w6", "w5", "w4", "w3", "w2"}
    assert c["triton_smoke_tok_s"] > 0 and c["mixed_16"] > 0 and set(c["fp16"]) == {"1", "16"}
    d = report["d"]
    assert d["status"] == "passed" and set(d["answers"]) == {"w8", "w6", "w5", "w4", "w3", "w2"}
    assert {"batch1_w4_speedup_min", "batch1_w4_share_of_copy_min", "batch16_w4_speedup_min",
            "batch1_each_width_faster_than_wider", "mixed_16_vs_w8_16"} <= set(report["criteria"])


def test_without_a_gpu_and_without_rehearse_nothing_is_measured(capsys, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert load_check().main(["--out", str(tmp_path)]) == 2
    assert "nothing measured" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.json").exists()
