"""The default checkpoint in the cache: its directory carries the group size, so an older build is not reused."""

from __future__ import annotations

import json
from pathlib import Path

from quept.build import builder as builder_mod
from quept.build import source as source_mod
from quept.server.settings import Settings
from quept.server.state import ensure_checkpoint
from tests.build.test_source import model_tensors
from tests.tiny import tiny_gguf


def test_default_checkpoint_is_built_under_a_name_with_its_group_size(tmp_path: Path, monkeypatch) -> None:
    gguf_path = tiny_gguf(tmp_path / "default.gguf", model_tensors("Q4_1"))
    monkeypatch.setattr(source_mod, "default_source_path", lambda: gguf_path)
    monkeypatch.setattr(source_mod, "load_source", lambda path: f"source {path}")
    builds: list[tuple[object, Path, object]] = []

    def fake_build(source, out, group_size=None, **kwargs) -> Path:
        builds.append((source, Path(out), group_size))
        out.mkdir(parents=True)
        (out / "elastic.json").write_text(json.dumps({"group_size": 32}))
        return out

    monkeypatch.setattr(builder_mod, "build_checkpoint", fake_build)
    cache = tmp_path / "cache"
    old = cache / "checkpoints" / "smollm2-135m-instruct"  # built before the group size followed the source (g64)
    old.mkdir(parents=True)
    (old / "elastic.json").write_text(json.dumps({"group_size": 64}))
    settings = Settings(cache_dir=cache, checkpoint=None)
    path = ensure_checkpoint(settings, in_child=False)
    assert path == cache / "checkpoints" / "smollm2-135m-instruct-g32-lsq-a4"
    assert builds == [("source None", path, None)]  # None: build_checkpoint chooses 32, as the name says
    assert ensure_checkpoint(settings, in_child=False) == path and len(builds) == 1  # built once


def test_calibrate_serves_the_calibrated_default_under_its_own_name(tmp_path: Path, monkeypatch) -> None:
    """`quept serve --calibrate`: the calibrated default model is built once, beside (not over) the plain one."""
    from quept.build import calibration as calibration_mod

    gguf_path = tiny_gguf(tmp_path / "default.gguf", model_tensors("Q4_1"))
    monkeypatch.setattr(source_mod, "default_source_path", lambda: gguf_path)
    monkeypatch.setattr(source_mod, "load_source", lambda path: f"source {path}")
    calibrations: list[tuple[object, Path]] = []

    def fake_calibrate(source, out, *args, **kwargs) -> Path:
        calibrations.append((source, Path(out)))
        out.mkdir(parents=True)
        (out / "elastic.json").write_text(json.dumps({"group_size": 32}))
        return out

    def no_plain_build(*args, **kwargs) -> Path:
        raise AssertionError("--calibrate must not build the uncalibrated checkpoint")

    monkeypatch.setattr(calibration_mod, "calibrate_checkpoint", fake_calibrate)
    monkeypatch.setattr(builder_mod, "build_checkpoint", no_plain_build)
    cache = tmp_path / "cache"
    settings = Settings(cache_dir=cache, checkpoint=None, calibrate=True)
    path = ensure_checkpoint(settings, in_child=False)
    assert path == cache / "checkpoints" / "smollm2-135m-instruct-g32-cal-a4"
    assert calibrations == [("source None", path)]
    assert ensure_checkpoint(settings, in_child=False) == path and len(calibrations) == 1  # built once
    given = tmp_path / "mine"
    assert ensure_checkpoint(Settings(cache_dir=cache, checkpoint=given, calibrate=True), in_child=False) == given  # a checkpoint wins
