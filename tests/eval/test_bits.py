"""Bits per weight read: every part counted, by hand on small layers."""

from __future__ import annotations

import pytest
import torch

from quept.backends.base import ElasticWeights
from quept.eval.bits import read_bits, rtn_read_bits


def layer(n: int, k: int, group: int, widths=(8, 4, 2), ranks=(0, 2, 5)) -> ElasticWeights:
    w = len(widths)
    return ElasticWeights(codes=torch.zeros(n, k, dtype=torch.uint8), scales=torch.ones(w, n, k // group),
                          mins=torch.zeros(w, n, k // group), lora_a=torch.zeros(max(ranks), k),
                          lora_b=torch.zeros(n, max(ranks)), bias=None, widths=widths, ranks=ranks, group_size=group)


def test_every_part_of_a_width_is_counted() -> None:
    elastic = {"a": layer(6, 64, 32), "head": layer(10, 32, 16)}
    got = read_bits(elastic, ["a", "head"], [4, 2])
    params = 6 * 64 + 10 * 32
    assert got.codes == pytest.approx((4 * 6 * 64 + 2 * 10 * 32) / params)
    assert got.affines == pytest.approx((32 * 6 * 2 + 32 * 10 * 2) / params)  # fp16 scale + min per group
    assert got.adapters == pytest.approx((16 * 2 * (6 + 64) + 16 * 5 * (10 + 32)) / params)  # each width's prefix
    assert got.total == pytest.approx(got.codes + got.affines + got.adapters)


def test_a_width_without_adapter_reads_what_round_to_nearest_reads() -> None:
    got = read_bits({"a": layer(4, 64, 32)}, ["a"], [8])
    assert got.adapters == 0 and got.total == pytest.approx(8 + 1.0) == rtn_read_bits(8, 32)


def test_bad_plans_are_refused() -> None:
    elastic = {"a": layer(4, 64, 32)}
    with pytest.raises(ValueError, match="stores widths"):
        read_bits(elastic, ["a"], [3])
    with pytest.raises(ValueError, match="1 linears but 2 widths"):
        read_bits(elastic, ["a"], [8, 4])
