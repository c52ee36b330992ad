"""benchmarks/llama_server_compare.py rehearsed end to end: a llama-server stand-in
(tests/server/llama_server_stub.py) and a real `quept serve` of a tiny checkpoint, through the same
load generator; and its refusal when no llama-server can be found."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

STUB = Path(__file__).with_name("llama_server_stub.py")


@pytest.fixture
def compare(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no llama-server on PATH
    mod = load_benchmark("llama_server_compare")
    monkeypatch.setattr(mod, "llama_cache", lambda: tmp_path / "llama.cpp")  # no cached build either
    return mod


def fake_tools(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    for tool, mode in (("llama-server", "server"), ("llama-quantize", "quantize")):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STUB}" {mode} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def test_without_llama_server_it_says_how_to_get_one(compare, monkeypatch, tmp_path) -> None:
    assert compare.find_tools(tmp_path) is None
    monkeypatch.setattr(sys, "argv", ["llama_server_compare.py", "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="llama-server not found.*--build"):
        compare.main()
    assert not (tmp_path / "r.json").exists()


def test_finds_tools_in_a_directory(compare, tmp_path) -> None:
    tools = compare.find_tools(fake_tools(tmp_path / "bin"))
    assert tools == {t: tmp_path / "bin" / t for t in ("llama-server", "llama-quantize")}


def test_rehearsal_against_a_stand_in(compare, monkeypatch, tmp_path, tiny_ckpt) -> None:
    gguf = tmp_path / "model-Q4_1.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", [
        "llama_server_compare.py", "--llama-bin", str(fake_tools(tmp_path / "bin")), "--gguf", str(gguf),
        "--checkpoint", str(tiny_ckpt), "--threads", "1", "--precisions", "w8,w4", "--streams", "1,2",
        "--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--repeat", "2", "--out", str(out)])
    assert compare.main() == 0
    report = json.loads(out.read_text())
    names = ["llama.cpp Q4_1", "llama.cpp Q8_0", "quept w8", "quept w4"]
    assert set(report["output_tokens_per_s"]) == {"1", "2"}
    for streams in ("1", "2"):
        assert sorted(report["output_tokens_per_s"][streams]) == sorted(names)
        assert all(v > 0 for v in report["output_tokens_per_s"][streams].values())
        assert set(report["ratios"][streams]) == {"quept w8", "quept w4"}
    runs = report["runs"]
    assert len(runs) == 2 * 2 * len(names)  # rounds x stream levels x servers
    assert {r["completed"] for r in runs if r["streams"] == 2} == {4}
    assert {r["completed"] for r in runs if r["streams"] == 1} == {2}
    assert set(report["criteria"]) == {"w8 >= 1.0x llama-server Q8_0, 1 stream",
                                       "w8 >= 1.5x llama-server Q8_0, 2 streams",
                                       "w4 >= 4x llama-server Q4_1, 2 streams"}
    assert report["bandwidth_gb_s"]["1"] > 0
    q8 = Path(report["settings"]["gguf"]["llama.cpp Q8_0"])
    assert q8.name == "model-Q4_1-Q8_0.gguf" and q8.read_bytes() == gguf.read_bytes()  # made by llama-quantize
