"""Calibration on a tiny random model: loss goes down, prefix ranks hold, the checkpoint reloads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quept.build.calibration import CalibConfig
from quept.build.calibration.driver import calibrate_checkpoint, calibrate_layers
from quept.build.calibration.master_codes import master_code_search, reconstruction_mse
from quept.build.calibration.sensitivity import effective_weight
from quept.build.calibration.tome import mb_tome
from quept.build.quantizer import quantize_nested
from quept.kernels.reference import elastic_linear_ref
from quept.model.args import linear_names
from quept.precision.plan import PrecisionPlan
from tests.tiny import tiny_source

WIDTHS = (8, 6, 5, 4, 3, 2)
RANKS = {8: 0, 6: 8, 5: 8, 4: 16, 3: 24, 2: 32}
TEXT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog. hello world 0123. " * 120


def tiny_cfg(tmp: Path, **kw) -> CalibConfig:
    f = tmp / "calib.txt"
    f.write_text(TEXT)
    base = dict(calib_file=f, samples=4, seq_len=32, epochs=2, batch=2, sens_tokens=16, ppl_windows=1,
                ppl_seq_len=32, progress=False, threads=1)
    base.update(kw)
    return CalibConfig(**base)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cal")
    return calibrate_checkpoint(tiny_source(), tmp / "ck", group_size=32, cfg=tiny_cfg(tmp))


def test_master_code_search_beats_nested_rtn_over_all_widths():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    c0, s0, m0 = quantize_nested(w, WIDTHS, 32)
    c1, s1, m1 = master_code_search(w, WIDTHS, 32)
    e0, e1 = reconstruction_mse(w, c0, s0, m0, WIDTHS, 32), reconstruction_mse(w, c1, s1, m1, WIDTHS, 32)
    assert c1.dtype == torch.uint8 and c1.shape == w.shape
    assert sum(e1.values()) < sum(e0.values())
    assert all(e1[b] <= e0[b] * 1.02 for b in WIDTHS), (e0, e1)  # no width pays for the others
    assert e1[8] <= e0[8]  # w8 stays faithful


def test_block_loss_goes_down(tmp_path):
    src = tiny_source()
    cfg = tiny_cfg(tmp_path, epochs=4)
    samples = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    res = calibrate_layers(src, samples, WIDTHS, 32, RANKS, cfg)
    for rec in res.block_losses:
        hist = rec["loss_per_epoch"]
        assert hist[-1] < hist[0], rec
    trained = res.layers["model.layers.0.mlp.down_proj"]
    assert trained.lora_b.abs().sum() > 0  # the adapters were trained


def test_prefix_ranks_are_respected(tmp_path):
    src = tiny_source()
    res = calibrate_layers(src, torch.randint(0, 300, (2, 16)), WIDTHS, 32, RANKS, tiny_cfg(tmp_path, epochs=1))
    layer = res.layers["model.layers.1.self_attn.q_proj"]
    x = torch.randn(5, layer.qf.shape[2])
    with torch.no_grad():
        ref = [layer(x, i) for i in range(len(WIDTHS))]
        layer.lora_a[RANKS[4]:] += 1.0  # rows beyond r_4 = 16 must not touch w8 .. w4
        layer.lora_b[:, RANKS[4]:] += 1.0  # nor columns beyond r_4
        for i, b in enumerate(WIDTHS):
            out = layer(x, i)
            if b in (8, 6, 5, 4):
                assert torch.equal(out, ref[i]), b
            else:
                assert not torch.equal(out, ref[i]), b
        layer.lora_a[: RANKS[6]] += 1.0  # w8 has rank 0: no adapter row touches it
        assert torch.equal(layer(x, 0), ref[0])
        assert not torch.equal(layer(x, 1), ref[1])


def test_checkpoint_reloads_bit_identical(calibrated: Path):
    from quept.eval.perplexity import window_nll
    from quept.model.loader import load_model

    a, b = load_model(calibrated, backend="torch"), load_model(calibrated, backend="torch")
    torch.set_grad_enabled(True)
    tokens = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1))
    for bits in WIDTHS:
        plan = PrecisionPlan.uniform(bits)
        assert window_nll(a.model, tokens, plan) == window_nll(b.model, tokens, plan)
    w = a.ckpt.elastic["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, w.in_features)
    for bits in WIDTHS:  # the stored tensors give the reference contract exactly
        ref = elastic_linear_ref(x, w.codes, w.scales, w.mins, w.lora_a, w.lora_b, bits, w.widths, w.ranks, w.group_size)
        assert torch.allclose(ref, x @ effective_weight(w, bits).t(), atol=1e-5)


def test_calibration_record_and_profiles(calibrated: Path):
    meta = json.loads((calibrated / "elastic.json").read_text())
    rec = meta["calibration"]
    for key in ("data", "samples", "seq_len", "seconds", "perplexity", "memory", "machine"):
        assert key in rec
    assert rec["machine"]["cpus"] >= 1
    assert all(block["seconds"] > 0 for block in rec["blocks"])
    assert set(rec["perplexity"]) >= {f"w{b}" for b in WIDTHS}
    assert rec["memory"]["codes_bytes"] > 0 and rec["memory"]["adapter_bytes"] > 0
    assert len(meta["profiles"]) == 7
    for prof in meta["profiles"].values():
        assert prof["avg_bits"] <= prof["target"] + 1e-9 and prof["ppl"] > 0
        assert len(prof["per_linear"]) == len(meta["sensitivity"]["linears"])
    assert not list(calibrated.parent.glob(".ck.calib-*"))  # no staging directory left


def test_interrupt_leaves_no_checkpoint(tmp_path, monkeypatch):
    import quept.build.calibration.driver as driver

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "measure_heldout", boom)
    with pytest.raises(KeyboardInterrupt):
        calibrate_checkpoint(tiny_source(), tmp_path / "ck", group_size=32, cfg=tiny_cfg(tmp_path, epochs=1))
    assert not (tmp_path / "ck").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["calib.txt"]


def test_mb_tome_keeps_agreeing_tokens():
    x = torch.zeros(1, 3, 4)
    hi = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]])
    lo = hi.clone()
    lo[0, 2] = torch.tensor([0, 0, -1.0, 0])  # the last token disagrees
    mixed, frac = mb_tome(x, hi, [lo])
    assert torch.equal(mixed[0, :2], hi[0, :2]) and not torch.equal(mixed[0, 2], hi[0, 2])
    assert abs(frac - 1 / 3) < 1e-6


def _random_fake_quant(n: int, k: int, seed: int = 0):
    from quept.build.calibration.blockwise import make_fake_quant

    g = torch.Generator().manual_seed(seed)
    layer = make_fake_quant(torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g) * 0.1, WIDTHS,
                            tuple(RANKS[b] for b in WIDTHS), 32, seed=seed)
    with torch.no_grad():  # trained-looking parameters: every term of the forward is non-zero
        layer.ds.copy_(torch.randn(layer.ds.shape, generator=g) * 0.1)
        layer.dm.copy_(torch.randn(layer.dm.shape, generator=g) * 0.1)
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.05)
    return layer


def test_forward_widths_matches_forward_and_its_gradients():
    layer = _random_fake_quant(48, 96)
    idx = [0, 3, 5, 3, 1]  # w8 (rank 0), repeats, every rank size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(idx), 7, 96, generator=g, requires_grad=True)
    probe = torch.randn(len(idx), 7, 48, generator=g)
    params = [layer.ds, layer.dm, layer.lora_a, layer.lora_b]
    with torch.enable_grad():
        fast = layer.forward_widths(x, idx)
        grads_fast = torch.autograd.grad((fast * probe).sum(), [x, *params])
        plain = torch.stack([layer(x[u], i) for u, i in enumerate(idx)])
        grads_plain = torch.autograd.grad((plain * probe).sum(), [x, *params])
    assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_fast, grads_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())
    assert grads_fast[4][:, RANKS[2]:].abs().sum() == 0  # lora_b columns beyond the largest rank: no gradient


def test_multi_width_mse_matches_one_forward_per_width():
    from quept.build.calibration.blockwise import block_forward, make_fake_quant, multi_width_mse, quant_lin, rope_tables
    from quept.model.args import LINEAR_NAMES

    src = tiny_source("qwen2")  # biases on q/k/v
    args, st = src.args, src.state
    g = torch.Generator().manual_seed(0)
    layers = [make_fake_quant(st[f"model.layers.0.{n}.weight"], st.get(f"model.layers.0.{n}.bias"), WIDTHS,
                              tuple(RANKS[b] for b in WIDTHS), 32, seed=j) for j, n in enumerate(LINEAR_NAMES)]
    with torch.no_grad():  # trained-looking parameters
        for m in layers:
            m.ds.copy_(torch.randn(m.ds.shape, generator=g) * 0.1)
            m.dm.copy_(torch.randn(m.dm.shape, generator=g) * 0.1)
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)
    norms = (st["model.layers.0.input_layernorm.weight"], st["model.layers.0.post_attention_layernorm.weight"])
    cos, sin = rope_tables(args, 12)
    xb = torch.randn(2, 12, args.hidden_size, generator=g)
    yb = torch.randn(2, 12, args.hidden_size, generator=g)
    wi, scale = [1, 3, 4, 5], torch.tensor([0.5, 2.0, 1.0, 3.0])  # a width per group, per-group normalisation
    params = [p for m in layers for p in (m.ds, m.dm, m.lora_a, m.lora_b)]
    with torch.enable_grad():
        fast = multi_width_mse(layers, xb, yb, wi, norms, args, cos, sin)
        grads_fast = torch.autograd.grad((fast * scale).sum(), params)
        plain = torch.stack([torch.nn.functional.mse_loss(block_forward(xb, quant_lin(layers, i), norms, args, cos, sin),
                                                          yb) for i in wi])
        grads_plain = torch.autograd.grad((plain * scale).sum(), params)
    assert torch.allclose(fast, plain, rtol=1e-5)
    for a, b in zip(grads_fast, grads_plain):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * float(b.abs().max())), float((a - b).abs().max())


def test_unadapted_width_keeps_the_better_of_trained_and_least_squares_affines():
    """A width without adapters (w8) whose trained affines make the block worse returns to its
    least-squares fit (ds = dm = 0); one that training improved keeps its trained affines; widths
    with adapters are left alone."""
    from quept.build.calibration.blockwise import block_forward, keep_better_unadapted_affines, make_fake_quant, quant_lin, rope_tables
    from quept.model.args import LINEAR_NAMES

    src = tiny_source("llama")
    args, st = src.args, src.state
    ranks = tuple(RANKS[b] for b in WIDTHS)
    assert ranks[0] == 0 and all(ranks[1:])  # w8 alone has no adapter
    layers = [make_fake_quant(st[f"model.layers.0.{n}.weight"], st.get(f"model.layers.0.{n}.bias"), WIDTHS, ranks,
                              32, seed=j) for j, n in enumerate(LINEAR_NAMES)]
    norms = (st["model.layers.0.input_layernorm.weight"], st["model.layers.0.post_attention_layernorm.weight"])
    cos, sin = rope_tables(args, 12)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, args.hidden_size, generator=g)
    with torch.no_grad():
        target = block_forward(x, quant_lin(layers, 0), norms, args, cos, sin)  # the LS fit is exact at w8
        for m in layers:  # "training" walked every width off its fit
            m.ds.add_(torch.randn(m.ds.shape, generator=g) * 0.05)
            m.dm.add_(torch.randn(m.dm.shape, generator=g) * 0.05)
    walked = [m.ds.detach().clone() for m in layers]
    assert keep_better_unadapted_affines(layers, x, target, WIDTHS, norms, args, cos, sin) == [8]
    for m, before in zip(layers, walked):
        assert m.ds[0].abs().sum() == 0 and m.dm[0].abs().sum() == 0  # w8 back on the least-squares fit
        assert torch.equal(m.ds[1:], before[1:])  # widths with adapters untouched
    # a w8 that training improved stays: make the restored (LS) fit the worse one against a new target
    with torch.no_grad():
        for m in layers:
            m.ds[0].fill_(0.01)
        better = block_forward(x, quant_lin(layers, 0), norms, args, cos, sin)
    assert keep_better_unadapted_affines(layers, x, better, WIDTHS, norms, args, cos, sin) == []
    assert all(float(m.ds[0].detach().abs().max()) == pytest.approx(0.01) for m in layers)


def _tiny_elastic(src, seed: int = 0) -> dict:
    from quept.build.builder import quantize_linear, split_state

    g = torch.Generator().manual_seed(seed)
    elastic = {}
    for name, (w, b) in split_state(src)[1].items():
        e = quantize_linear(w, b, WIDTHS, 32, RANKS)
        e.lora_a.copy_(torch.randn(e.lora_a.shape, generator=g) * 0.05)  # non-zero adapters
        e.lora_b.copy_(torch.randn(e.lora_b.shape, generator=g) * 0.05)
        elastic[name] = e
    return elastic


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_batched_kl_sensitivity_matches_plain(model_type):
    from quept.build.calibration.sensitivity import kl_sensitivity, kl_sensitivity_plain

    src = tiny_source(model_type)
    elastic = _tiny_elastic(src)
    tokens = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(1))
    seen = []
    fast = torch.tensor(kl_sensitivity(src.args, src.state, elastic, tokens, WIDTHS, progress=False,
                                       on_linear=seen.append, logit_rows=50), dtype=torch.float64)  # several chunks
    plain = torch.tensor(kl_sensitivity_plain(src.args, src.state, elastic, tokens, WIDTHS, progress=False),
                         dtype=torch.float64)
    assert fast.shape == plain.shape == (7 * src.args.n_layers + 1, len(WIDTHS))
    assert seen == linear_names(src.args.n_layers)
    # the plain table's own fp32 rounding is ~1e-7 absolute (two log-softmaxes of size ~10 subtracted)
    assert torch.allclose(fast, plain, rtol=2e-3, atol=5e-7), float((fast - plain).abs().max())
    assert (fast[:, 1:] > 0).all()


def test_kl_rows_matches_float64_log_softmax_and_survives_overflow():
    from quept.build.calibration.sensitivity import _kl_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    for size in (1e-4, 1e-2, 1.0, 5.0):
        delta = torch.randn(2, 5, 300, generator=g, dtype=torch.float64) * size
        delta[1, 2, 7] = 150.0 if size == 5.0 else delta[1, 2, 7]  # exp(150) overflows fp32
        truth = (p * (torch.log_softmax(logits, -1) - torch.log_softmax(logits + delta, -1))).sum(-1)  # [2, 5]
        got = _kl_rows(p.float(), delta.float().clone()).double()
        assert torch.isfinite(got).all()
        assert torch.allclose(got, truth, rtol=1e-4, atol=1e-9), (size, float((got - truth).abs().max()))


def test_fit_all_affines_is_the_weighted_least_squares_fit():
    from quept.build.calibration.master_codes import fit_affine, fit_all_affines

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g) * 0.05
    codes = quantize_nested(w, WIDTHS, 32)[0]
    codes[1] = torch.randint(0, 256, (64,), generator=g, dtype=torch.uint8)  # codes unrelated to w: some slopes <= 0
    codes[2, 32:] = 77  # a degenerate group: one code at every width
    h = torch.rand(64, generator=g) + 0.1
    prev = torch.full((len(WIDTHS), 6, 2), 0.5)
    scales, mins = fit_all_affines(w, codes, WIDTHS, 32, h, prev)
    for i, b in enumerate(WIDTHS):
        q = (codes.long() >> (8 - b)).double()
        s1, m1 = fit_affine(w, q.float(), 32, h, prev[i])
        assert torch.equal(s1, scales[i]) and torch.equal(m1, mins[i])
        for n in range(6):
            for grp in range(2):
                cols = slice(32 * grp, 32 * grp + 32)
                x, y, wt = q[n, cols], w[n, cols].double(), h[cols].double()
                s_ref = 0.5  # degenerate groups and slopes <= 0 keep prev_scale and fit the offset only
                if x.min() < x.max():  # weighted line fit in float64
                    xm, ym = (wt * x).sum() / wt.sum(), (wt * y).sum() / wt.sum()
                    s_ref = max(float((wt * (x - xm) * (y - ym)).sum() / (wt * (x - xm) ** 2).sum()), 0) or 0.5
                m_ref = float((wt * (y - s_ref * x)).sum() / wt.sum())
                assert abs(float(scales[i, n, grp]) - s_ref) <= 1e-4 * abs(s_ref) + 1e-9, (b, n, grp)
                assert abs(float(mins[i, n, grp]) - m_ref) <= 1e-4 * abs(m_ref) + 1e-6, (b, n, grp)


def _q4_1_weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights on a Q4_1 grid per 32 columns (w = d*q + m, q in 0..15, every group using q = 0 and 15)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, k // 32, 1, generator=g) * 0.01 + 0.002
    m = -7.5 * d + torch.randn(n, k // 32, 1, generator=g) * 0.001
    return (q * d + m).view(n, k)


def test_weighted_fit_stays_exact_when_one_column_dominates():
    """A Q4_1 source is exact at w8 (codes 17q); the activation-weighted LS fit keeps it exact, and the search
    moves no code, even when one column's weight is 2e6x the others' (the default model's layer-11 down_proj:
    in fp32 the normal equations cancelled, w8 came out 3e-5 off and whole groups of codes moved)."""
    from quept.build.calibration.master_codes import fit_all_affines

    w = _q4_1_weights(64, 128)
    h = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5
    h[5] = h[70] = 2e6
    rtn = quantize_nested(w, WIDTHS, 32)[0]
    scales, mins = fit_all_affines(w, rtn, WIDTHS, 32, h)
    err = reconstruction_mse(w, rtn, scales, mins, WIDTHS, 32)
    assert err[8] < 1e-12 * float(w.pow(2).mean()), err[8]
    codes, scales, mins = master_code_search(w, WIDTHS, 32, h)
    assert torch.equal(codes, rtn)
    assert reconstruction_mse(w, codes, scales, mins, WIDTHS, 32)[8] < 1e-12 * float(w.pow(2).mean())


def test_master_code_search_without_search_and_with_plain_widths():
    """iters=0 keeps the nested RTN codes; a width in plain_widths gets the unweighted LS fit, the others the
    weighted one."""
    from quept.build.calibration.master_codes import fit_all_affines

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g) * 0.05
    h = torch.rand(64, generator=g) * 10 + 0.1
    codes, scales, mins = master_code_search(w, WIDTHS, 32, h, iters=0, plain_widths=(8,))
    assert torch.equal(codes, quantize_nested(w, WIDTHS, 32)[0])
    sw, mw = fit_all_affines(w, codes, WIDTHS, 32, h)
    sp, mp = fit_all_affines(w, codes, WIDTHS, 32, None)
    assert torch.equal(scales[0], sp[0]) and torch.equal(mins[0], mp[0])
    assert torch.equal(scales[1:], sw[1:]) and torch.equal(mins[1:], mw[1:])
    assert not torch.equal(sw[0], sp[0])  # the weights matter at all


def test_calibrated_w8_reproduces_an_exactly_representable_source(tmp_path):
    """Every linear of a source on Q4_1 grids is exact at w8 before training; after calibration (search,
    training, lm_head) the stored w8 weights still reproduce it to fp16 rounding of the affines."""
    src = tiny_source()
    for name in linear_names(src.args.n_layers):
        w = src.state[f"{name}.weight"]
        src.state[f"{name}.weight"] = _q4_1_weights(*w.shape, seed=w.shape[0] + w.shape[1])
    cfg = tiny_cfg(tmp_path, epochs=4)
    samples = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    res = calibrate_layers(src, samples, WIDTHS, 32, RANKS, cfg)
    for name, layer in res.layers.items():
        w = src.state[f"{name}.weight"]
        with torch.no_grad():
            w8 = layer.weight(0)
        rel = float((w8 - w).pow(2).mean() / w.pow(2).mean())
        assert rel < 1e-6, (name, rel)


def test_unadapted_widths_are_judged_on_the_full_precision_stream(monkeypatch, tmp_path):
    """calibrate_layers hands train_block the block's full-precision inputs, and the trained-vs-LS choice of a
    width without adapters is made on them (what a w8 model's block sees), not on the MB-ToMe stream."""
    import quept.build.calibration.blockwise as bw
    from quept.model.args import LINEAR_NAMES

    seen: list[torch.Tensor] = []
    real = bw.keep_better_unadapted_affines

    def spy(layers, x, *rest):
        seen.append(x.clone())
        return real(layers, x, *rest)

    monkeypatch.setattr(bw, "keep_better_unadapted_affines", spy)
    src = tiny_source()
    args, st = src.args, src.state
    cfg = tiny_cfg(tmp_path, tome_threshold=1.01, tome_max_mix=0.5)  # MB-ToMe mixes every token
    samples = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    calibrate_layers(src, samples, WIDTHS, 32, RANKS, cfg)
    assert len(seen) == args.n_layers
    x = st["model.embed_tokens.weight"].index_select(0, samples.flatten()).view(4, 32, -1)
    cos, sin = bw.rope_tables(args, 32)
    for i in range(args.n_layers):
        assert torch.allclose(seen[i], x, atol=1e-5), i  # the full-precision stream, not the mixed one
        names = [f"model.layers.{i}.{n}" for n in LINEAR_NAMES]
        norms = (st[f"model.layers.{i}.input_layernorm.weight"], st[f"model.layers.{i}.post_attention_layernorm.weight"])
        x = bw.dense_block_output([st[f"{n}.weight"] for n in names], [st.get(f"{n}.bias") for n in names], x,
                                  norms, args, cos, sin)


def test_search_never_moves_source_aligned_codes():
    """With align_source_grid the master-code search starts from codes exact at w8, w6, w5 and w4 for a Q4_1
    source and keeps every one of them (a move costs w8 a full step and gains nothing at the exact widths)."""
    from quept.build.quantizer import source_grid_codes

    w = _q4_1_weights(64, 128)
    h = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5
    codes, scales, mins = master_code_search(w, WIDTHS, 32, h, align_source_grid=True)
    assert torch.equal(codes, source_grid_codes(w, 32)[0])
    err = reconstruction_mse(w, codes, scales, mins, WIDTHS, 32)
    assert all(err[b] < 1e-12 * float(w.pow(2).mean()) for b in (8, 6, 5, 4)), err
    unaligned = reconstruction_mse(w, *master_code_search(w, WIDTHS, 32, h), WIDTHS, 32)
    assert unaligned[6] > 1e-5 * float(w.pow(2).mean())  # 17q is not exact at 6 bits (1.6e-4 here)


def test_head_anchor_starts_the_search_from_anchored_codes():
    """iters=0 with anchor_bits keeps the anchored codes (w4 reads independent RTN codes); anchoring and
    source-grid alignment are two different starts and cannot be combined."""
    from quept.build.quantizer import anchored_nested_codes

    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(7))
    codes, _, _ = master_code_search(w, WIDTHS, 32, iters=0, anchor_bits=4)
    assert torch.equal(codes, anchored_nested_codes(w, 32, 4))
    assert not torch.equal(codes, quantize_nested(w, WIDTHS, 32)[0])
    with pytest.raises(ValueError, match="pass one"):
        master_code_search(w, WIDTHS, 32, align_source_grid=True, anchor_bits=4)
