"""The `native` backend through the backend interface and in the model, against the torch backend and the reference."""

from __future__ import annotations

import logging
import zlib

import pytest
import torch

import quept.kernels.native as native_mod
from quept.backends import get_backend
from quept.backends.base import ElasticWeights
from quept.kernels.native import find_compiler
from quept.kernels.native_ref import elastic_linear_emulated, magnitude
from quept.kernels.reference import elastic_linear_ref
from quept.precision.segments import segments_of

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler: the native kernels cannot be built")

WIDTHS = (8, 6, 5, 4, 3, 2)


def weights(gen: torch.Generator, n: int, k: int, group_size: int, ranks=(0, 2, 4, 4, 8, 8), bias: bool = True):
    r, w = max(ranks), len(WIDTHS)
    return ElasticWeights(
        codes=torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen),
        scales=((torch.rand(w, n, k // group_size, generator=gen) + 0.1) * 0.02).half(),
        mins=(torch.randn(w, n, k // group_size, generator=gen) * 0.5).half(),
        lora_a=(torch.randn(r, k, generator=gen) * 0.1).half(),
        lora_b=(torch.randn(n, r, generator=gen) * 0.1).half(),
        bias=torch.randn(n, generator=gen) if bias else None,
        widths=WIDTHS, ranks=ranks, group_size=group_size,
    )


def args(w: ElasticWeights) -> tuple:
    return (w.codes, w.scales, w.mins, w.lora_a, w.lora_b)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def test_get_backend_picks_native_on_cpu() -> None:
    assert get_backend("native").name == "native"
    assert get_backend("auto", "cpu").name == "native"


@pytest.mark.parametrize("row_bits", [4, "mixed"])
def test_forward_matches_emulation_and_reference(gen, row_bits) -> None:
    be = get_backend("native")
    w = weights(gen, n=67, k=256, group_size=64)
    x = torch.randn(9, 256, generator=gen)
    if row_bits == "mixed":
        row_bits = torch.tensor(WIDTHS, dtype=torch.int16)[torch.randint(0, 6, (9,), generator=gen)]
    got = be.forward(be.prepare(w), x, row_bits if isinstance(row_bits, int) else segments_of(row_bits.tolist()))
    rb = row_bits
    emu = elastic_linear_emulated(x, *args(w), rb, w.widths, w.ranks, w.group_size, w.bias)
    mag = magnitude(x, *args(w), rb, w.widths, w.ranks, w.group_size, w.bias)
    assert ((got.double() - emu.double()).abs() <= 1e-5 * mag + 1e-6).all()
    ref = elastic_linear_ref(x, *args(w), rb, w.widths, w.ranks, w.group_size, w.bias)
    assert float((got - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("live", [0, 3, 8])
def test_zero_adapter_components_are_skipped_exactly(gen, live: int) -> None:
    """A round-to-nearest build stores zero adapters: the kernel skips the zero components (fewer
    bytes and FMAs), and the output is what the stored ranks give."""
    be = get_backend("native")
    w = weights(gen, n=40, k=128, group_size=32, ranks=(0, 2, 4, 4, 6, 8))
    w.lora_a[live:] = 0  # components live.. contribute nothing
    assert w.effective_ranks() == tuple(min(r, live) for r in w.ranks)
    prepared = be.prepare(w)
    full = be.prepare(weights(torch.Generator().manual_seed(0), n=40, k=128, group_size=32, ranks=(0, 2, 4, 4, 6, 8)))
    assert be.resident_bytes(prepared) < be.resident_bytes(full) or live == 8
    x = torch.randn(5, 128, generator=gen)
    for bits in WIDTHS:
        emu = elastic_linear_emulated(x, *args(w), bits, w.widths, w.ranks, w.group_size, w.bias)
        mag = magnitude(x, *args(w), bits, w.widths, w.ranks, w.group_size, w.bias)
        got = be.forward(prepared, x, bits)
        assert ((got.double() - emu.double()).abs() <= 1e-5 * mag + 1e-6).all(), bits


def test_effective_ranks_keep_the_prefix_up_to_the_last_live_component(gen) -> None:
    w = weights(gen, n=16, k=64, group_size=32, ranks=(0, 2, 4, 4, 6, 8))
    w.lora_b[:, 1] = 0  # a dead component inside the prefix: components after it still count
    w.lora_a[6:] = 0
    assert w.effective_ranks() == (0, 2, 4, 4, 6, 6)
    w.lora_b.zero_()
    assert w.effective_ranks() == (0,) * 6


def test_leading_dims_and_resident_bytes(gen) -> None:
    be = get_backend("native")
    w = weights(gen, n=48, k=128, group_size=32, bias=False)
    prep = be.prepare(w)
    x = torch.randn(2, 3, 128, generator=gen)
    assert be.forward(prep, x, 5).shape == (2, 3, 48)
    # 8 planes (one byte per weight) + fp16 scales and mins for 6 widths + fp16 adapters
    expect = 48 * 128 + 2 * 6 * 48 * 4 * 2 + 8 * 128 * 2 + 48 * 8 * 2
    assert be.resident_bytes(prep) == expect


def test_group_size_16_runs_on_torch_fallback(gen, caplog) -> None:
    be = get_backend("native")
    w = weights(gen, n=24, k=64, group_size=16)
    with caplog.at_level(logging.WARNING):
        prep = be.prepare(w)
    assert prep.layer is None and "torch backend" in caplog.text
    x = torch.randn(3, 64, generator=gen)
    ref = elastic_linear_ref(x, *args(w), 6, w.widths, w.ranks, w.group_size, w.bias)
    torch.testing.assert_close(be.forward(prep, x, 6), ref, rtol=1e-4, atol=1e-4)


def test_cached_build_loads_without_a_compiler(monkeypatch) -> None:
    native_mod.load_native()  # built (or found) with the compiler
    monkeypatch.setattr(native_mod, "_module", None)
    monkeypatch.setattr(native_mod, "find_compiler", lambda: None)
    assert native_mod.load_native().available_isas()[0] == "generic"


def test_no_compiler_falls_back_to_torch(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("QUEPT_CACHE_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setattr(native_mod, "_module", None)
    monkeypatch.setattr(native_mod, "find_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        get_backend("native")
    with caplog.at_level(logging.WARNING):
        be = get_backend("auto", "cpu")
    assert be.name == "torch" and "native CPU backend unavailable" in caplog.text


def test_tiny_model_matches_torch_backend(tiny_ckpt) -> None:
    """Greedy decode on the tiny random model: logits within the int8-activation tolerance of the torch backend."""
    from quept.model.loader import load_model
    from quept.model.runner import ModelRunner, SeqRows, StepBatch
    from quept.precision.plan import PrecisionPlan

    lms = [load_model(tiny_ckpt, backend=name) for name in ("torch-fp32", "native")]
    assert lms[1].backend.name == "native"
    gen = torch.Generator().manual_seed(11)
    n = lms[0].model.n_linears
    tokens = torch.randint(0, lms[0].model.args.vocab_size, (10,), generator=gen).tolist()
    plans = [PrecisionPlan(f"p{i}", per_linear=tuple(WIDTHS[j] for j in torch.randint(0, 6, (n,), generator=gen).tolist()))
             for i in range(2)]  # each sequence its own width per linear
    logits = []
    for lm in lms:
        runner, tables = ModelRunner.scratch(lm.model, 2, 8, block_size=4)
        out = [runner.execute(StepBatch([SeqRows(tokens[:4], 0, tables[0], plans[0]),
                                         SeqRows(tokens[4:7], 0, tables[1], plans[1])], all_logits=True))]
        for step in range(3):  # decode both sequences, one row each
            out.append(runner.execute(StepBatch([SeqRows(tokens[7:8], 4 + step, tables[0], plans[0]),
                                                 SeqRows(tokens[8:9], 3 + step, tables[1], plans[1])])))
        logits.append(torch.cat(out))
    want, got = logits
    assert float((got - want).norm() / want.norm()) < 5e-2  # int8 activations: ~0.6% per linear, 15 linears deep
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_decoder_layer_in_one_call_equals_the_op_by_op_forward(tmp_path, model_type: str) -> None:
    """The native one-call decoder layer (kernels/csrc/decoder_layer.h) runs the same kernels in the
    same order as the model's op-by-op loop: logits bit-identical, for uniform and per-linear mixed
    plans, prefill chunks beside decoding rows, with q/k/v biases (qwen2)."""
    from quept.model.loader import load_model
    from quept.model.runner import ModelRunner, SeqRows, StepBatch
    from quept.precision.plan import PrecisionPlan
    from tests.tiny import tiny_checkpoint

    lm = load_model(tiny_checkpoint(tmp_path / "c", model_type=model_type, random_adapters=True), backend="native")
    model = lm.model
    fused = model.fused_layers
    assert fused is not None and len(fused) == model.args.n_layers
    gen = torch.Generator().manual_seed(2024 + len(model_type))
    n = model.n_linears
    tokens = torch.randint(0, model.args.vocab_size, (12,), generator=gen).tolist()
    plans = [PrecisionPlan.uniform(int(WIDTHS[int(torch.randint(0, 6, (1,), generator=gen))])),
             PrecisionPlan("mixed", per_linear=tuple(WIDTHS[j] for j in torch.randint(0, 6, (n,), generator=gen).tolist()))]
    logits = []
    for layers in (fused, None):
        model.fused_layers = layers
        runner, tables = ModelRunner.scratch(model, 2, 10, block_size=4)
        out = [runner.execute(StepBatch([SeqRows(tokens[:5], 0, tables[0], plans[0]),
                                         SeqRows(tokens[5:8], 0, tables[1], plans[1])], all_logits=True))]
        for step in range(3):
            out.append(runner.execute(StepBatch([SeqRows(tokens[8 + step : 9 + step], 5 + step, tables[0], plans[0]),
                                                 SeqRows(tokens[9:10], 3 + step, tables[1], plans[1])])))
        out.append(runner.execute(StepBatch([SeqRows(tokens[11:12], 8, tables[0], plans[1])])))  # one row, lone
        logits.append(torch.cat(out))
    model.fused_layers = fused
    assert torch.equal(logits[0], logits[1])


def test_decoder_layer_refuses_a_wrong_number_of_linears() -> None:
    from quept.kernels.native import load_native

    ext = load_native()
    t = torch.zeros(1, 32)
    with pytest.raises(RuntimeError, match="7 linears"):
        ext.decoder_layer(t, None, [], [], t[0], t[0], t, t, t, t, t.long()[0], t.long()[0], t.long()[0], t.long()[0],
                          1, 1, 32, 1e-5, 1.0)
