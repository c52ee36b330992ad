"""The default checkpoint in the cache: its directory carries the group size, so an older build is not reused."""

from __future__ import annotations

import json
from pathlib import Path

from quept_runtime import builder as builder_mod
from quept_runtime import source as source_mod
from server.settings import Settings
from server.state import ensure_checkpoint
from tests.quept_runtime.test_source import model_tensors
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
    path = ensure_checkpoint(settings)
    assert path == cache / "checkpoints" / "smollm2-135m-instruct-g32-lsq"
    assert builds == [("source None", path, None)]  # None: build_checkpoint chooses 32, as the name says
    assert ensure_checkpoint(settings) == path and len(builds) == 1  # built once
