"""The runtime CLI: happy paths on a tiny checkpoint and one clear line for every bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from quept.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_every_width_without_reloading(tiny_ckpt: Path, capsys) -> None:
    for p in ("w8", "w4", "w2"):
        code, out, err = run(capsys, "generate", "--checkpoint", str(tiny_ckpt), "--precision", p,
                             "--max-tokens", "5", "--backend", "torch", "hello world")
        assert code == 0, err
        assert f"[{p}: " in err and out.strip() != ""


def test_eval_writes_table_json_and_plot(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", "--checkpoint", str(tiny_ckpt), "--precision", "w8,w2", "--windows", "2",
                         "--seq-len", "32", "--file", str(text), "--baselines", "none", "--json", str(out_json),
                         "--backend", "torch")
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["name"] for r in rows] == ["nested w8", "nested w2"]
    assert all(r["ppl"] > 1 for r in rows) and out_json.with_suffix(".png").is_file()
    w8, w2 = rows
    assert w8["read_bits"] > 8 and w2["read_bits"] > 2  # affines (and w2's adapters) on top of the codes
    assert w2["read_bits"] - 2 > w8["read_bits"] - 8  # w2 reads its adapter prefix, w8 has none


def test_eval_scores_held_out_windows_from_a_fraction_on(tiny_ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from quept.build import source as source_mod
    from tests.tiny import tiny_source

    monkeypatch.setattr(source_mod, "load_source", lambda path: tiny_source())
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a text that changes as it goes.\n" for i in range(400)))
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", "--checkpoint", str(tiny_ckpt), "--precision", "w4", "--windows", "2",
                         "--seq-len", "32", "--file", str(text), "--baselines", "all", "--start", "0.6",
                         "--json", str(out_json), "--backend", "torch")
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["protocol"]["start"] == 0.6 and "from 60% of its tokens" in out
    early = run(capsys, "eval", "--checkpoint", str(tiny_ckpt), "--precision", "w4", "--windows", "2", "--seq-len",
                "32", "--file", str(text), "--baselines", "none", "--backend", "torch")
    assert early[0] == 0
    late_ppl = next(r["ppl"] for r in result["rows"] if r["name"] == "nested w4")
    assert f"{late_ppl:.3f}" not in early[1]  # other windows, another perplexity
    rtn = next(r for r in result["rows"] if r["kind"] == "independent-rtn")
    assert rtn["read_bits"] > rtn["bits"]


@pytest.mark.parametrize("start,message", [("1.5", "start must be a fraction"), ("0.99", "fewer than 2 windows")])
def test_eval_refuses_a_bad_start(tiny_ckpt: Path, tmp_path: Path, capsys, start: str, message: str) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, _, err = run(capsys, "eval", "--checkpoint", str(tiny_ckpt), "--precision", "w8", "--windows", "2",
                       "--seq-len", "32", "--file", str(text), "--baselines", "none", "--start", start,
                       "--backend", "torch")
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--precision", "w7"], "width 7 is not stored"),
    (["--precision", "bf16"], "malformed precision 'bf16'"),
    (["--max-tokens", "250"], "exceeds the context of 256 tokens"),
])
def test_generate_bad_inputs(tiny_ckpt: Path, capsys, args, message) -> None:
    code, out, err = run(capsys, "generate", "--checkpoint", str(tiny_ckpt), "--backend", "torch", *args, "hello " * 10)
    assert code == 2 and message in err and "Traceback" not in err


def test_prompt_longer_than_context(tiny_ckpt: Path, capsys) -> None:
    code, _, err = run(capsys, "generate", "--checkpoint", str(tiny_ckpt), "--backend", "torch", "--raw", "lazy dog " * 300)
    assert code == 2 and "exceeds the context" in err


def test_missing_checkpoint(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "generate", "--checkpoint", str(tmp_path / "none"), "hi")
    assert code == 2 and "does not exist" in err


def test_build_wrong_group_size(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    # a tiny HF directory as the source: K=64 and 128 are not divisible by 48
    from tests.tiny import tiny_hf_model, tiny_tokenizer

    src = tmp_path / "hf"
    tiny_hf_model().save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    code, _, err = run(capsys, "build", "--source", str(src), "--out", str(tmp_path / "o"), "--group-size", "48")
    assert code == 2 and "group size 48 does not divide K=64" in err
    code, out, err = run(capsys, "build", "--source", str(src), "--out", str(tmp_path / "o"), "--group-size", "32")
    assert code == 0 and (tmp_path / "o" / "elastic.json").is_file(), err


@pytest.mark.parametrize("flag,expected", [((), 32), (("--group-size", "64"), 64)])
def test_build_group_size_defaults_to_the_source_block(tmp_path: Path, capsys, monkeypatch, flag, expected) -> None:
    # a source quantized in blocks of 32 (as the default Q4_1 GGUF): 32 unless --group-size says otherwise
    import dataclasses

    from quept.build import source as source_mod
    from tests.tiny import tiny_source

    src = dataclasses.replace(tiny_source(), quant_block_size=32, quant_types=("Q4_1",))
    monkeypatch.setattr(source_mod, "load_source", lambda path: src)
    code, _, err = run(capsys, "build", "--out", str(tmp_path / "o"), *flag)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "elastic.json").read_text())["group_size"] == expected


@pytest.mark.parametrize("flag,expected,anchor", [((), "lsq", 4), (("--affine", "centre"), "centre", None),
                                                  (("--anchor-bits", "0"), "lsq", None),
                                                  (("--anchor-bits", "3"), "lsq", 3)])
def test_build_affine_defaults_to_least_squares(tmp_path: Path, capsys, monkeypatch, flag, expected, anchor) -> None:
    """Default: least-squares affines over codes anchored at 4 bits; --affine centre takes min/max codes."""
    from quept.build import source as source_mod
    from quept.build.quantizer import quantize_nested
    from quept.model.checkpoint import load_checkpoint
    from tests.tiny import tiny_source

    src = tiny_source()
    monkeypatch.setattr(source_mod, "load_source", lambda path: src)
    code, _, err = run(capsys, "build", "--out", str(tmp_path / "o"), "--group-size", "32", *flag)
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "o")
    assert ck.meta["build"]["affine"] == expected and ck.meta["build"]["anchor_bits"] == anchor
    w = src.state["model.layers.0.mlp.down_proj.weight"]
    codes, scales, _ = quantize_nested(w, ck.widths, 32, expected, anchor)
    assert torch.equal(ck.elastic["model.layers.0.mlp.down_proj"].codes, codes)
    assert torch.allclose(ck.elastic["model.layers.0.mlp.down_proj"].scales.float(), scales, rtol=1e-3, atol=1e-6)
    with pytest.raises((SystemExit, argparse.ArgumentError), match="invalid choice: 'mse'|2"):
        run(capsys, "build", "--out", str(tmp_path / "p"), "--affine", "mse")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flag", [("--anchor-bits", "9"), ("--anchor-bits", "-1"), ("--anchor-bits", "four"),
                                  ("--affine", "centre", "--anchor-bits", "4")])
def test_build_rejects_bad_anchor_bits(tmp_path: Path, capsys, monkeypatch, flag) -> None:
    """Out-of-range or non-integer anchors are usage errors; centre affines with anchored codes are refused
    (the centre formula assumes min/max codes). Nothing is written either way."""
    from quept.build import source as source_mod
    from tests.tiny import tiny_source

    monkeypatch.setattr(source_mod, "load_source", lambda path: tiny_source())
    try:
        code, _, err = run(capsys, "build", "--out", str(tmp_path / "o"), "--group-size", "32", *flag)
    except SystemExit as exc:  # argparse usage error
        code, err = exc.code, capsys.readouterr().err
    assert code == 2, err
    assert "anchor" in err
    assert not (tmp_path / "o").exists()


def test_build_missing_source(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err


def test_generate_without_checkpoint_builds_the_default_model_once(tmp_path: Path, capsys, monkeypatch) -> None:
    from quept.build import builder as builder_mod
    from quept.build import source as source_mod
    from tests.tiny import tiny_source

    src = tiny_source()
    monkeypatch.setenv("QUEPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(source_mod, "load_source", lambda path: src)
    monkeypatch.setattr(builder_mod, "default_checkpoint_dir", lambda cache, calibrated=False: Path(cache) / "checkpoints" / "default")
    builds = []
    real_build = builder_mod.build_checkpoint
    monkeypatch.setattr(builder_mod, "build_checkpoint", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    for _ in range(2):
        code, out, err = run(capsys, "generate", "--backend", "torch", "--max-tokens", "3", "hello")
        assert code == 0 and "[w8: 3 tokens" in err, err
    assert builds == [1] and (tmp_path / "cache" / "checkpoints" / "default" / "elastic.json").is_file()


def test_full_disk_during_build_is_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    import errno

    import safetensors.torch

    from quept.build import source as source_mod
    from tests.tiny import tiny_source

    monkeypatch.setattr(source_mod, "load_source", lambda path: tiny_source())

    def full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run(capsys, "build", "--out", str(tmp_path / "o"), "--group-size", "32")
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # the stage went with the failure


@pytest.mark.parametrize(("argv", "hint"), [
    (["serve", "--precision", "w4"], "did you mean --default-precision?"),
    (["serve", "--max-batch-size", "4"], "did you mean --max-batch"),
    (["eval", "--windos", "2"], "did you mean --windows"),
])
def test_unknown_flag_gets_a_hint(capsys, argv, hint) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert hint in capsys.readouterr().err


def test_serve_refuses_a_directory_that_is_no_checkpoint(tmp_path: Path, capsys) -> None:
    for path in (tmp_path / "nonexistent", tmp_path):
        code, _, err = run(capsys, "serve", "--checkpoint", str(path))
        assert code == 2 and "not a checkpoint directory" in err, err


def test_serve_reports_a_bad_key_file_in_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "serve", "--api-key-file", str(tmp_path / "missing"))
    assert code == 2 and err.strip() == err.strip().splitlines()[0], err
    assert err.startswith("error: cannot read api_key_file") and "No such file" in err, err


def test_eval_without_checkpoint_scores_the_default_model(tmp_path: Path, capsys, monkeypatch) -> None:
    from quept.build import builder as builder_mod
    from quept.build import source as source_mod
    from tests.tiny import tiny_source

    src = tiny_source()
    monkeypatch.setenv("QUEPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(source_mod, "load_source", lambda path: src)
    monkeypatch.setattr(builder_mod, "default_checkpoint_dir", lambda cache, calibrated=False: Path(cache) / "checkpoints" / "default")
    code, out, err = run(capsys, "eval", "--windows", "1", "--seq-len", "32", "--precision", "w8,w4", "--baselines", "none")
    assert code == 0, err
    assert "w8" in out and "w4" in out and "test.txt" in out
