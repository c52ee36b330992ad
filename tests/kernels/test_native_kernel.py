"""The native CPU kernel (kernels/csrc/) against the plain-torch reference, on every ISA path this CPU has.

Each test is seeded from its own id, so the inputs differ between tests and parameters but are
reproducible. Outputs are poisoned with NaN before every call (`out=`). The kernel rounds the
activations to int8 per block of 32 (kernels/native_ref.py): it is held to fp32 rounding against
the emulation of that arithmetic, and to the rounding bound against the exact reference.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from quept.kernels.native import find_compiler
from quept.kernels.native_ref import elastic_linear_emulated, error_bound, magnitude, quantize_activations
from quept.kernels.reference import elastic_linear_ref
from quept.precision.segments import segments_of

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler: the native kernels cannot be built")

WIDTHS = (8, 6, 5, 4, 3, 2)


@pytest.fixture(scope="module")
def native():
    from quept.kernels.native import load_native

    module = load_native()
    best = module.current_isa()
    yield module
    module.set_isa(best)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass
class Case:
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    bias: torch.Tensor | None
    widths: tuple[int, ...]
    ranks: tuple[int, ...]
    group_size: int

    def args(self) -> tuple:
        return (self.codes, self.scales, self.mins, self.lora_a, self.lora_b)

    def layer(self, native):
        bias = torch.empty(0) if self.bias is None else self.bias
        return native.Layer(*self.args(), bias, list(self.widths), list(self.ranks), self.group_size)


def make_case(gen: torch.Generator, n: int, k: int, group_size: int, ranks: tuple[int, ...], bias: bool = True,
              widths: tuple[int, ...] = WIDTHS) -> Case:
    r = max(ranks) if ranks else 0
    w = len(widths)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    scales = ((torch.rand(w, n, k // group_size, generator=gen) + 0.1) * 0.02).half()
    scales = scales * torch.where(torch.rand(w, n, k // group_size, generator=gen) < 0.1, -1, 1).half()
    mins = (torch.randn(w, n, k // group_size, generator=gen) * 0.5).half()
    lora_a = (torch.randn(r, k, generator=gen) * 0.1).half()
    lora_b = (torch.randn(n, r, generator=gen) * 0.1).half()
    b = torch.randn(n, generator=gen) if bias else None
    return Case(codes, scales, mins, lora_a, lora_b, b, widths, ranks, group_size)


def activations(gen: torch.Generator, m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randint(0, k, (max(1, k // 64),), generator=gen)] *= 20.0  # outlier columns, as in LLMs
    return x


def run(native, layer, x: torch.Tensor, row_bits: torch.Tensor | int, n: int) -> torch.Tensor:
    out = torch.full((x.shape[0], n), float("nan"))
    if isinstance(row_bits, int):
        got = layer.forward(x, row_bits, out=out)
    else:
        segs = segments_of(row_bits.tolist())
        if isinstance(segs, int):  # every row drew the same width
            got = layer.forward(x, segs, out=out)
        else:
            got = layer.forward_segments(x, native.Segments(segs.order.int(), list(segs.bits), list(segs.bounds)), out=out)
    assert got.data_ptr() == out.data_ptr()
    return out


def check(native, case: Case, x: torch.Tensor, row_bits: torch.Tensor | int) -> None:
    """Every ISA path: fp32-close to the emulation, within the rounding bound of the exact reference."""
    layer = case.layer(native)
    n = case.codes.shape[0]
    refine = bool(native.w8_refine())
    emu = elastic_linear_emulated(x, *case.args(), row_bits, case.widths, case.ranks, case.group_size, case.bias,
                                  refine_w8=refine)
    ref = elastic_linear_ref(x, *case.args(), row_bits, case.widths, case.ranks, case.group_size, case.bias)
    mag = magnitude(x, *case.args(), row_bits, case.widths, case.ranks, case.group_size, case.bias)
    bound = error_bound(x, case.codes, case.scales, row_bits, case.widths, case.group_size, refine_w8=refine)
    for isa in native.available_isas():
        native.set_isa(isa)
        got = run(native, layer, x, row_bits, n)
        assert torch.isfinite(got).all(), f"{isa}: unwritten outputs"
        err_emu = (got.double() - emu.double()).abs()
        assert (err_emu <= 1e-5 * mag + 1e-6).all(), f"{isa}: max err vs emulation {err_emu.max():.3g}"
        err_ref = (got.double() - ref.double()).abs()
        assert (err_ref <= bound + 1e-5 * mag + 1e-6).all(), f"{isa}: max err vs reference {err_ref.max():.3g}"


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", WIDTHS)
def test_every_width_and_group_size(native, gen, bits: int, group_size: int) -> None:
    case = make_case(gen, n=37, k=group_size * 3, group_size=group_size, ranks=(0, 2, 4, 4, 6, 8))
    for m in (1, 3, 6, 11):  # decode rows (codes rebuilt in registers), then blocks of 4 and 8 rows
        check(native, case, activations(gen, m, case.codes.shape[1]), bits)


@pytest.mark.parametrize("ranks", [(0, 0, 0, 0, 0, 0), (0, 1, 3, 5, 7, 16), (4, 4, 4, 4, 4, 4)])
def test_adapter_ranks(native, gen, ranks: tuple[int, ...]) -> None:
    case = make_case(gen, n=45, k=128, group_size=64, ranks=ranks, bias=False)
    for bits in WIDTHS:
        check(native, case, activations(gen, 2, 128), bits)


def test_no_adapter_tensors(native, gen) -> None:
    case = make_case(gen, n=20, k=64, group_size=32, ranks=(0,) * 6)
    assert case.lora_a.shape == (0, 64)
    check(native, case, activations(gen, 3, 64), 4)


@pytest.mark.parametrize("m", [1, 5, 13, 40])
def test_mixed_widths_per_row(native, gen, m: int) -> None:
    case = make_case(gen, n=51, k=192, group_size=64, ranks=(0, 2, 2, 4, 8, 8))
    row_bits = torch.tensor(WIDTHS)[torch.randint(0, len(WIDTHS), (m,), generator=gen)]
    check(native, case, activations(gen, m, 192), row_bits)


def test_prefill_rows_and_odd_sizes(native, gen) -> None:
    case = make_case(gen, n=129, k=320, group_size=64, ranks=(0, 4, 4, 8, 8, 16))
    x = activations(gen, 33, 320)
    for bits in (8, 4, 2):
        check(native, case, x, bits)


@pytest.fixture
def w8_refine_off(native):
    native.set_w8_refine(False)
    yield
    native.set_w8_refine(True)


@pytest.mark.parametrize("m", [1, 3, 6])
def test_w8_single_int8_term_when_refinement_is_off(native, gen, w8_refine_off, m: int) -> None:
    case = make_case(gen, n=37, k=192, group_size=64, ranks=(0, 2, 4, 4, 6, 8))
    check(native, case, activations(gen, m, 192), 8)
    check(native, case, activations(gen, m, 192), torch.tensor([8, 4, 8, 2, 8, 6][:m]))


def test_w8_refinement_cuts_the_activation_error_and_leaves_other_widths_alone(native, gen) -> None:
    case = make_case(gen, n=64, k=256, group_size=64, ranks=(0, 2, 4, 4, 6, 8))
    x = activations(gen, 5, 256)
    layer = case.layer(native)
    row_bits = torch.tensor([8, 4, 8, 2, 6])
    ref = elastic_linear_ref(x, *case.args(), row_bits, case.widths, case.ranks, case.group_size, case.bias)
    for isa in native.available_isas():
        native.set_isa(isa)
        try:
            native.set_w8_refine(False)
            plain = run(native, layer, x, row_bits, 64)
            native.set_w8_refine(True)
            refined = run(native, layer, x, row_bits, 64)
        finally:
            native.set_w8_refine(True)
        w8 = row_bits == 8
        err_plain = (plain[w8] - ref[w8]).abs().max().item()
        err_refined = (refined[w8] - ref[w8]).abs().max().item()
        assert err_refined * 20 < err_plain, f"{isa}: refined {err_refined:.3g} vs one term {err_plain:.3g}"
        assert torch.equal(plain[~w8], refined[~w8]), f"{isa}: narrower widths changed"


def test_exact_when_activations_are_representable(native, gen) -> None:
    """Activations that int8 per block represents exactly: the kernel equals the reference to fp32 rounding."""
    case = make_case(gen, n=33, k=256, group_size=64, ranks=(0, 2, 4, 4, 6, 8))
    m, k = 4, 256
    ints = torch.randint(-127, 128, (m, k // 32, 32), generator=gen).float()
    ints[:, :, 0] = 127.0  # every block reaches 127, so its step is exactly the power of two below
    step = 2.0 ** torch.randint(-8, 2, (m, k // 32, 1), generator=gen).float()
    x = (ints * step).view(m, k)
    layer = case.layer(native)
    for bits in WIDTHS:
        ref = elastic_linear_ref(x, *case.args(), bits, case.widths, case.ranks, case.group_size, case.bias)
        mag = magnitude(x, *case.args(), bits, case.widths, case.ranks, case.group_size, case.bias)
        for isa in native.available_isas():
            native.set_isa(isa)
            got = run(native, layer, x, bits, 33)
            err = (got.double() - ref.double()).abs()
            assert (err <= 1e-5 * mag + 1e-6).all(), f"{isa} w{bits}: max err {err.max():.3g}"


def test_lower_bits_are_not_read(native, gen) -> None:
    """Width b gives bit-identical results when the 8-b low bits of every code are random: only b planes are read."""
    case = make_case(gen, n=40, k=128, group_size=32, ranks=(0, 2, 4, 4, 6, 8))
    x = activations(gen, 3, 128)
    base = case.layer(native)
    for bits in WIDTHS:
        low = (1 << (8 - bits)) - 1
        noise = torch.randint(0, 256, case.codes.shape, dtype=torch.uint8, generator=gen)
        shuffled = Case(**{**case.__dict__, "codes": (case.codes & ~low) | (noise & low)})
        assert bits == 8 or not torch.equal(shuffled.codes, case.codes)
        other = shuffled.layer(native)
        for isa in native.available_isas():
            native.set_isa(isa)
            assert torch.equal(run(native, base, x, bits, 40), run(native, other, x, bits, 40)), f"{isa} w{bits}"


def test_planes_hold_b_of_8_bits(native, gen) -> None:
    """The packed layout is bit-planes: width b reads b/8 of the code bytes."""
    case = make_case(gen, n=32, k=64, group_size=32, ranks=(0,) * 6)
    planes = case.layer(native).planes()
    assert planes.shape == (8, 2, 2, 64) and planes.dtype == torch.uint8
    top = (case.codes >> 7).sum()
    assert int(sum(bin(v).count("1") for v in planes[0].flatten().tolist())) == int(top)


@pytest.mark.parametrize("m, k", [(1, 32), (5, 96), (17, 576)])
def test_activation_quantization_is_exactly_the_contract(native, gen, m: int, k: int) -> None:
    """Both int8 terms (the residual one is what width-8 rows add) bit for bit as kernels/native_ref.py
    spells them, on every ISA path: zero chunks, ties at .5 and outlier columns included."""
    x = activations(gen, m, k)
    x[0, :32] = 0.0  # a chunk of zeros: dx = 0, every code 0
    x[-1, -32:] = torch.arange(32) - 15.5  # halves: round half to even after the scaling
    xq_ref, dx_ref = quantize_activations(x)
    r = x - xq_ref.float() * dx_ref.repeat_interleave(32, dim=1)
    xq2_ref, dx2_ref = quantize_activations(r)
    for isa in native.available_isas():
        native.set_isa(isa)
        xq, dx, xqsum, xq2, dx2, xqsum2 = native.quantize_activations(x)
        assert torch.equal(xq.int(), xq_ref) and torch.equal(dx, dx_ref), isa
        assert torch.equal(xq2.int(), xq2_ref) and torch.equal(dx2, dx2_ref), isa
        for q, sums in ((xq_ref, xqsum), (xq2_ref, xqsum2)):  # the chunk sums the centred codes subtract
            assert torch.equal(sums, q.view(m, k // 32, 32).sum(-1, dtype=torch.int32)), isa


def test_activation_quantization_rejects_bad_input(native) -> None:
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.quantize_activations(torch.zeros(2, 33))
    with pytest.raises(RuntimeError, match="float32"):
        native.quantize_activations(torch.zeros(2, 32, dtype=torch.float64))


def test_isa_paths_agree(native, gen) -> None:
    case = make_case(gen, n=77, k=384, group_size=128, ranks=(0, 2, 4, 4, 6, 8))
    x = activations(gen, 7, 384)
    layer = case.layer(native)
    outs = {}
    for isa in native.available_isas():
        native.set_isa(isa)
        outs[isa] = torch.stack([run(native, layer, x, b, 77) for b in WIDTHS])
    first = outs["generic"]
    for isa, out in outs.items():
        torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-4, msg=lambda s, isa=isa: f"{isa}: {s}")


def test_bf16_input_returns_bf16(native, gen) -> None:
    case = make_case(gen, n=16, k=64, group_size=64, ranks=(0,) * 6)
    x = activations(gen, 2, 64)
    y = case.layer(native).forward(x.bfloat16(), 4)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 16)


def test_bad_inputs_name_the_problem(native, gen) -> None:
    case = make_case(gen, n=16, k=64, group_size=32, ranks=(0,) * 6)
    layer = case.layer(native)
    with pytest.raises(RuntimeError, match="width 7 is not stored"):
        layer.forward(torch.randn(1, 64), 7)
    with pytest.raises(RuntimeError, match="K=64"):
        layer.forward(torch.randn(1, 32), 4)
    with pytest.raises(RuntimeError, match="segments cover 1 rows; x has 2"):
        layer.forward_segments(torch.randn(2, 64), native.Segments(torch.tensor([0], dtype=torch.int32), [4], [0, 1]))
    with pytest.raises(RuntimeError, match="width 7 is not stored"):
        layer.forward_segments(torch.randn(2, 64), native.Segments(torch.tensor([1, 0], dtype=torch.int32), [7, 4],
                                                                   [0, 1, 2]))
    with pytest.raises(RuntimeError, match="permutation"):
        native.Segments(torch.tensor([0, 0], dtype=torch.int32), [8, 4], [0, 1, 2])
    with pytest.raises(RuntimeError, match="bounds must run from 0 to M=2"):
        native.Segments(torch.tensor([1, 0], dtype=torch.int32), [8, 4], [0, 1, 3])
    with pytest.raises(RuntimeError, match="int32"):
        native.Segments(torch.tensor([1, 0]), [8], [0, 2])
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.Layer(*case.args(), torch.empty(0), list(WIDTHS), [0] * 6, 16)
    with pytest.raises(RuntimeError, match="not supported|unknown ISA"):
        native.set_isa("sse9")


def test_many_tiles_across_threads(native, gen) -> None:
    """Enough tiles for every thread to take several runs from the shared counter (decode and batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        case = make_case(gen, n=2001, k=256, group_size=64, ranks=(0, 2, 4, 4, 6, 8))
        for m in (1, 5):
            check(native, case, activations(gen, m, 256), 4 if m == 1 else 8)
    finally:
        torch.set_num_threads(threads)
