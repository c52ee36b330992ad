"""Checkpoint round trip and every load failure naming its file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quept.build.builder import build_checkpoint
from quept.errors import CheckpointError
from quept.model.checkpoint import ELASTIC_FILE, META_FILE, load_checkpoint
from tests.tiny import tiny_checkpoint, tiny_source


@pytest.fixture()
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "c"))


def test_round_trip_is_bit_identical(ckpt: Path) -> None:
    a, b = load_checkpoint(ckpt), load_checkpoint(ckpt)
    assert a.widths == (8, 6, 5, 4, 3, 2) and a.group_size == 32
    for name, w in a.elastic.items():
        assert torch.equal(w.codes, b.elastic[name].codes)
        assert w.lora_a.abs().sum() > 0  # the fixture has non-zero adapters
    meta = json.loads((ckpt / META_FILE).read_text())
    assert set(meta["files"]) == {"weights.safetensors", "elastic.safetensors"}


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_meta(ckpt: Path) -> None:
    (ckpt / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="elastic.json is missing"):
        load_checkpoint(ckpt)


def test_wrong_format_version(ckpt: Path) -> None:
    meta = json.loads((ckpt / META_FILE).read_text())
    meta["format_version"] = 99
    (ckpt / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(ckpt)


def test_truncated_tensor_file(ckpt: Path) -> None:
    data = (ckpt / ELASTIC_FILE).read_bytes()
    (ckpt / ELASTIC_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="elastic.safetensors.*truncated or corrupt"):
        load_checkpoint(ckpt)


def test_altered_tensor_is_named(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / ELASTIC_FILE))
    name = "model.layers.1.mlp.up_proj.codes"
    tensors[name] = tensors[name] ^ 1  # flip the lowest bit of every code
    save_file(tensors, str(ckpt / ELASTIC_FILE))
    with pytest.raises(CheckpointError, match=r"sha256 mismatch, tensor\(s\) model.layers.1.mlp.up_proj.codes altered"):
        load_checkpoint(ckpt)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / ELASTIC_FILE))
    del tensors["model.layers.0.self_attn.k_proj.scales"]
    save_file(tensors, str(ckpt / ELASTIC_FILE))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.k_proj.scales' is missing"):
        load_checkpoint(ckpt, verify=False)


def test_wrong_shape_is_named(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / ELASTIC_FILE))
    tensors["lm_head.mins"] = tensors["lm_head.mins"][:, :-1].contiguous()
    save_file(tensors, str(ckpt / ELASTIC_FILE))
    with pytest.raises(CheckpointError, match="'lm_head.mins' has shape"):
        load_checkpoint(ckpt, verify=False)


def test_existing_output_is_not_overwritten(tiny_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        build_checkpoint(tiny_source(), tiny_ckpt, group_size=32, progress=False)


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quept.model.checkpoint as ck

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        build_checkpoint(tiny_source(), tmp_path / "out", group_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_group_size_that_does_not_divide_k(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="group size 48 does not divide K=64"):
        tiny_checkpoint(tmp_path / "c", group_size=48)


def test_stages_of_killed_writers_are_swept(tmp_path: Path) -> None:
    """A SIGKILL leaves `.NAME.tmp-PID-*` behind (no finally runs); the next write removes it, and
    leaves alone a stage whose writer still runs."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "dense.safetensors").write_bytes(b"half written")
    alive = tmp_path / f".out.calib-{os.getppid()}-def456"  # a live process (our parent) writing
    alive.mkdir()
    out = build_checkpoint(tiny_source(), tmp_path / "out", group_size=32, progress=False)
    assert (out / META_FILE).is_file()
    assert not stale.exists() and alive.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "out"])
