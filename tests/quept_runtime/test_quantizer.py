from __future__ import annotations

import pytest
import torch

from kernels.reference import dequantize
from quept_runtime.quantizer import check_widths, quantize_independent, quantize_nested

WIDTHS = (8, 6, 5, 4, 3, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [32, 64])
def test_nested_codes_slice_and_error_shrinks_with_width(seed: int, group_size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 4 * group_size, generator=g)
    codes, scales, mins = quantize_nested(w, WIDTHS, group_size)
    assert codes.dtype == torch.uint8 and scales.shape == (6, 37, 4)
    errs = []
    for i, b in enumerate(WIDTHS):
        deq = dequantize(codes, scales[i], mins[i], b, group_size)
        err = (deq - w).abs()
        # every weight lies within one b-bit bin of its centre-of-bin reconstruction
        step = scales[i].repeat_interleave(group_size, dim=1)
        assert bool((err <= step * 0.5 + step / 2 ** (8 - b) + 1e-5).all())
        errs.append(float(err.pow(2).mean()))
    assert errs == sorted(errs), "error must grow as the width drops"
    assert errs[0] < 1e-4


def test_nested_w8_matches_independent_w8() -> None:
    """At 8 bits nesting changes nothing: the master grid is the independent 8-bit grid."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    codes, scales, mins = quantize_nested(w, WIDTHS, 64)
    nested = dequantize(codes, scales[0], mins[0], 8, 64)
    torch.testing.assert_close(nested, quantize_independent(w, 8, 64), rtol=0, atol=1e-5)


def test_bad_group_size_is_named() -> None:
    with pytest.raises(ValueError, match="group size 48 does not divide K=64"):
        quantize_nested(torch.randn(4, 64), WIDTHS, 48)


@pytest.mark.parametrize("bad", [(6, 4), (8, 8, 4), (8, 9), ()])
def test_bad_widths(bad) -> None:
    with pytest.raises(ValueError, match="widths must be"):
        check_widths(bad)


def test_constant_group_does_not_divide_by_zero() -> None:
    w = torch.zeros(2, 64)
    codes, scales, mins = quantize_nested(w, WIDTHS, 64)
    assert torch.isfinite(dequantize(codes, scales[3], mins[3], 4, 64)).all()
