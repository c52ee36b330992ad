from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from quept.model.loader import load_model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny ops on a busy machine: OpenMP threads only add spin time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(tiny_ckpt: Path) -> Any:
    """The tiny checkpoint on the torch backend, every width's dense copy kept (modules may override it)."""
    lm = load_model(tiny_ckpt, backend="torch")
    lm.backend.max_cached_widths = len(lm.widths)
    return lm
