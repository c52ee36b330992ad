from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with non-zero adapters, built once per session."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", random_adapters=True)
