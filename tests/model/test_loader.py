"""quept.model.loader: one load serves every precision; a repacking backend's source tensors are released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quept.backends import get_backend
from quept.engine.generate import generate
from quept.kernels.native import find_compiler
from quept.model.loader import load_model
from quept.model.model import elastic_model_from_checkpoint
from quept.precision.plan import PrecisionPlan

needs_native = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler: the native kernels cannot be built")


def linear_tensors(lm) -> list[torch.Tensor]:
    return [t for lin in lm.model.linears for t in (lin.weights.codes, lin.weights.scales, lin.weights.mins)]


@needs_native
def test_native_load_releases_the_checkpoint_copy_and_still_serves_every_plan(tiny_ckpt: Path) -> None:
    kept = load_model(tiny_ckpt, backend="torch-fp32")
    lm = load_model(tiny_ckpt, backend="native")
    assert all(t.device.type == "meta" for t in linear_tensors(lm))
    assert all(lm.ckpt.elastic[n] is lin.weights for n, lin in zip(lm.model.linear_names, lm.model.linears))
    for name, lin in zip(lm.model.linear_names, lm.model.linears):  # shapes and sizes stay readable
        assert lin.weights.codes.shape == kept.ckpt.elastic[name].codes.shape
        assert lin.weights.scales.dtype == kept.ckpt.elastic[name].scales.dtype
    unreleased = elastic_model_from_checkpoint(kept.ckpt, get_backend("native"))  # same kernels, source kept
    ids = lm.encode_chat("hello world")
    mix = tuple(2 if j % 3 == 0 else 8 for j in range(lm.model.n_linears))  # a per-layer mix
    for plan in (PrecisionPlan.uniform(8), PrecisionPlan.uniform(2), PrecisionPlan("mix", per_linear=mix)):
        assert generate(lm.model, ids, plan, 6).tokens == generate(unreleased, ids, plan, 6).tokens


def test_torch_backend_keeps_the_tensors_it_reads(tiny_ckpt: Path) -> None:
    lm = load_model(tiny_ckpt, backend="torch")
    assert all(t.device.type == "cpu" and t.numel() > 0 for t in linear_tensors(lm))
    assert generate(lm.model, lm.encode_chat("hi"), PrecisionPlan.uniform(5), 3).tokens
