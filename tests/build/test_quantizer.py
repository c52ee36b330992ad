from __future__ import annotations

import random

import pytest
import torch

from quept.build.quantizer import anchored_nested_codes, check_widths, quantize_independent, quantize_nested
from quept.kernels.reference import dequantize

WIDTHS = (8, 6, 5, 4, 3, 2)
SEED_LSQ = random.randrange(1 << 30)  # fresh weights every run


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


@pytest.mark.parametrize("group_size", [32, 64])
def test_lsq_affines_never_lose_to_the_bin_centre_and_fit_an_aligned_grid_exactly(group_size: int) -> None:
    g = torch.Generator().manual_seed(SEED_LSQ + group_size)
    w = torch.randn(24, 192, generator=g) * torch.rand(24, 1, generator=g)
    widths = (8, 6, 5, 4, 3, 2)
    codes_c, sc_c, mn_c = quantize_nested(w, widths, group_size, "centre")
    codes_l, sc_l, mn_l = quantize_nested(w, widths, group_size, "lsq")
    assert torch.equal(codes_c, codes_l)  # the affine fit never moves the codes
    for i, b in enumerate(widths):
        err_c = (dequantize(codes_c, sc_c[i], mn_c[i], b, group_size) - w).pow(2).view(24, -1, group_size).sum(-1)
        err_l = (dequantize(codes_l, sc_l[i], mn_l[i], b, group_size) - w).pow(2).view(24, -1, group_size).sum(-1)
        assert (err_l <= err_c * (1 + 1e-5) + 1e-10).all(), (SEED_LSQ, b)  # per group, not only on average
        assert err_l.sum() < err_c.sum() or b == 8, (SEED_LSQ, b)
    # a Q4_1-like source (min + q d, q spanning 0..15 in every block): the top 4 bits are q, fitted exactly
    q = torch.randint(0, 16, (8, 64), generator=g).float()
    q[:, ::32], q[:, 1::32] = 0, 15
    w = 0.1 * torch.rand(8, 1, generator=g) + q * (0.01 + 0.01 * torch.rand(8, 1, generator=g))
    codes, sc, mn = quantize_nested(w, widths, 32, "lsq")
    assert torch.allclose(dequantize(codes, sc[3], mn[3], 4, 32), w, atol=1e-5)


def test_unknown_affine_is_refused() -> None:
    with pytest.raises(ValueError, match="affine must be one of"):
        quantize_nested(torch.randn(4, 64), (8, 4), 32, "mse")


def _grid_groups(n: int, groups: int, bits: int, seed: int = 0) -> torch.Tensor:
    """[n, groups * 32] weights whose every 32-wide group is d*q + m, q in 0..2^bits-1 spanning the group."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, groups, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 2**bits - 1
    d = torch.rand(n, groups, 1, generator=g) * 0.01 + 0.002
    m = torch.randn(n, groups, 1, generator=g) * 0.02
    return (q * d + m).view(n, groups * 32)


@pytest.mark.parametrize("bits", [2, 4, 5])
def test_source_grid_codes_are_exact_at_every_width_from_the_source_width(bits: int) -> None:
    """Groups on a b_src-bit grid (Q4_1-like) get codes exact at every width >= b_src with a least-squares
    affine; below it they read q >> (b_src - b) (for Q4_1 the same slices as min/max RTN's 17q)."""
    from quept.build.quantizer import fit_affines_lsq, source_grid_codes

    w = _grid_groups(16, 4, bits)
    codes, found = source_grid_codes(w, 32)
    assert found.all() and codes.dtype == torch.uint8
    scales, mins = fit_affines_lsq(w, codes, WIDTHS, 32)
    lo = w.view(16, 4, 32).amin(-1, keepdim=True)
    q_src = torch.round((w.view(16, 4, 32) - lo) / (w.view(16, 4, 32).amax(-1, keepdim=True) - lo) * (2**bits - 1))
    rtn = quantize_nested(w, WIDTHS, 32)[0]
    for i, b in enumerate(WIDTHS):
        deq = dequantize(codes, scales[i], mins[i], b, 32)
        rel = float((deq - w).pow(2).mean() / w.pow(2).mean())
        if b >= bits:
            assert rel < 1e-10, (b, rel)
        else:
            q_b = (codes.view(16, 4, 32) >> (8 - b)).float()
            assert torch.equal(q_b, torch.floor(q_src / 2 ** (bits - b)))
            if bits == 4:
                assert torch.equal(codes >> (8 - b), rtn >> (8 - b))


def test_source_grid_codes_leave_other_groups_to_round_to_nearest() -> None:
    """Float groups and constant groups are not aligned and keep min/max RTN codes; a group on a 2-bit grid
    is aligned at 2 bits (the smallest grid that fits), not 4."""
    from quept.build.quantizer import source_grid_codes

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 96, generator=g) * 0.05
    w[0, 32:64] = 0.3  # constant group
    w[1, 64:] = _grid_groups(1, 1, 2)[0]
    codes, found = source_grid_codes(w, 32)
    expect = torch.zeros(8, 3, dtype=torch.bool)
    expect[1, 2] = True
    assert torch.equal(found, expect)
    rtn = quantize_nested(w, WIDTHS, 32)[0]
    keep = ~found.repeat_interleave(32, dim=1)
    assert torch.equal(codes[keep], rtn[keep])
    assert set((codes[1, 64:] >> 6).tolist()) == {0, 1, 2, 3} and set((codes[1, 64:] & 63).tolist()) == {32}


@pytest.mark.parametrize("anchor_bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [8, 32, 96])
def test_anchored_codes_top_bits_are_independent_rtn(anchor_bits: int, group_size: int) -> None:
    """The top anchor bits are the group's own RTN codes at that width (so the nested model at that width
    reconstructs exactly what independent RTN does), and the full 8-bit codes refine inside each bin."""
    seed = random.randrange(1 << 30)
    w = torch.randn(13, 3 * group_size, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails
    codes = anchored_nested_codes(w, group_size, anchor_bits)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    wg = w.view(13, 3, group_size)  # [N, K/G, G]
    lo = wg.amin(-1, keepdim=True)
    step = (wg.amax(-1, keepdim=True) - lo) / (2**anchor_bits - 1)  # the group's own anchor-width grid
    rtn = torch.round((quantize_independent(w, anchor_bits, group_size).view_as(wg) - lo) / step)
    assert torch.equal((codes >> (8 - anchor_bits)).view_as(wg).float(), rtn), f"seed {seed}"
    # 8 bits: the fine grid of each anchor bin (its centre is code per_bin / 2) is within half a fine step of
    # every weight, one fine step where the top of a bin clamps
    per_bin = 2 ** (8 - anchor_bits)
    fine = step / per_bin
    c = codes.view_as(wg).float()
    err = (lo + (c - per_bin // 2) * fine - wg).abs()
    assert bool((err <= fine + 1e-5).all()), f"seed {seed}"
    inner = (c % per_bin) < per_bin - 1
    assert bool((err <= fine * 0.5 + 1e-5)[inner].all()), f"seed {seed}"


def test_anchored_codes_of_weights_on_the_anchor_grid_are_exact_at_every_wider_width() -> None:
    """Weights on a 4-bit grid (a Q4_1 source) get (q << 4) + 8, the source-grid codes: no rounding ties."""
    from quept.build.quantizer import fit_affines_lsq, source_grid_codes

    g = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (24, 64), generator=g).float()
    q[:, ::32] = 0  # every group spans its whole grid
    q[:, 1::32] = 15
    d = torch.rand(24, 2, generator=g).repeat_interleave(32, dim=1) * 0.1 + 0.01
    m = torch.randn(24, 2, generator=g).repeat_interleave(32, dim=1) * 0.1
    w = q * d + m
    codes = anchored_nested_codes(w, 32, 4)
    assert torch.equal(codes, source_grid_codes(w, 32)[0])
    scales, mins = fit_affines_lsq(w, codes, WIDTHS, 32)
    for i, b in enumerate(WIDTHS[:4]):  # 8, 6, 5, 4
        deq = dequantize(codes, scales[i], mins[i], b, 32)
        torch.testing.assert_close(deq, w, rtol=0, atol=1e-5, msg=f"w{b}")


def test_anchored_codes_at_8_bits_are_min_max_rtn() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(anchored_nested_codes(w, 32, 8), quantize_nested(w, (8,), 32)[0])


@pytest.mark.parametrize("anchor_bits", [0, 9, -1])
def test_anchored_codes_reject_bad_anchor(anchor_bits: int) -> None:
    with pytest.raises(ValueError, match="anchor_bits must be in 1..8"):
        anchored_nested_codes(torch.randn(4, 32), 32, anchor_bits)


def test_anchored_codes_reject_bad_group_size() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        anchored_nested_codes(torch.randn(4, 48), 32, 4)
