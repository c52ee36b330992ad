"""The `triton` ElasticLinear backend (TRITON_INTERPRET=1 on the CPU) against the reference and the torch backend."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates our kernels

import pytest
import torch

pytest.importorskip("triton")

from quept.backends import get_backend  # noqa: E402
from quept.backends.base import ElasticWeights  # noqa: E402
from quept.kernels.reference import elastic_linear_ref  # noqa: E402
from quept.precision.segments import segments_of  # noqa: E402

WIDTHS = (8, 6, 5, 4, 3, 2)
RANKS = (0, 8, 8, 16, 24, 32)


def make_weights(n: int = 40, k: int = 128, g: int = 64, bias: bool = True, seed: int = 0) -> ElasticWeights:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.stack([(torch.rand(n, k // g, generator=gen) + 0.5) * (0.4 / 2**b) for b in WIDTHS])
    return ElasticWeights(
        codes=torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen),
        scales=scales.half(),
        mins=(-0.2 + 0.02 * torch.randn(len(WIDTHS), n, k // g, generator=gen)).half(),
        lora_a=(0.05 * torch.randn(max(RANKS), k, generator=gen)).half(),
        lora_b=(0.05 * torch.randn(n, max(RANKS), generator=gen)).half(),
        bias=torch.randn(n, generator=gen) if bias else None,
        widths=WIDTHS, ranks=RANKS, group_size=g,
    )


def ref(w: ElasticWeights, x: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
    return elastic_linear_ref(x, w.codes, w.scales, w.mins, w.lora_a, w.lora_b, bits, w.widths, w.ranks,
                              w.group_size, w.bias)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def backend():
    be = get_backend("triton", "cpu")
    assert be.name == "triton"
    return be


@pytest.mark.parametrize("m", [1, 3, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_reference_and_torch_backend(backend, m: int, dtype: torch.dtype) -> None:
    w = make_weights(seed=m)
    prepared = backend.prepare(w)
    torch_be = get_backend("torch-fp32")
    torch_prepared = torch_be.prepare(w)
    x = torch.randn(m, 128).to(dtype)
    mixed = torch.tensor([WIDTHS[(i * 5) % 6] for i in range(m)], dtype=torch.int16)
    for bits in (4, mixed):
        widths = bits if isinstance(bits, int) else segments_of(bits.tolist())
        y = backend.forward(prepared, x, widths)
        assert y.dtype == dtype and y.shape == (m, 40)
        tol = 1e-3 if dtype == torch.float32 else 1e-2
        assert rel_err(y, ref(w, x, bits)) < tol
        if dtype == torch.float32:
            assert rel_err(y, torch_be.forward(torch_prepared, x, widths)) < tol


def test_no_bias_zero_ranks_and_resident_bytes(backend) -> None:
    w = make_weights(n=24, k=64, g=32, bias=False)
    w.ranks = (0,) * len(WIDTHS)
    prepared = backend.prepare(w)
    x = torch.randn(2, 64)
    assert rel_err(backend.forward(prepared, x, 2), ref(w, x, 2)) < 1e-3
    # bit-planes hold exactly the master codes' bytes; plus the affines; no adapter when every rank is 0
    assert backend.resident_bytes(prepared) == 24 * 64 + 2 * 2 * len(WIDTHS) * 24 * 2


def test_errors_name_the_bad_value(backend) -> None:
    prepared = backend.prepare(make_weights())
    with pytest.raises(ValueError, match="stored widths are"):
        backend.forward(prepared, torch.randn(2, 128), 7)
    with pytest.raises(ValueError, match="group size"):
        backend.prepare(make_weights(k=96, g=48))


def test_custom_op_schema_and_fake() -> None:
    from quept.kernels import triton_ops

    w = make_weights(n=16, k=64, g=32)
    be = get_backend("triton")
    p = be.prepare(w)
    x = torch.randn(9, 64)  # prefill path
    row_widx = triton_ops.row_width_index(torch.tensor([8, 2, 4] * 3), 9, WIDTHS, p.lut)
    args = (x, p.planes, p.scales, p.mins, p.lora_a, p.lora_b, p.bias, row_widx, p.wbits, p.wranks, 32, False)
    torch.library.opcheck(torch.ops.quept.elastic_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.quept.lora_shrink.default, (x, p.lora_a, row_widx, p.wranks),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.quept.pack_bitplanes.default, (w.codes,),
                          test_utils=("test_schema", "test_faketensor"))
