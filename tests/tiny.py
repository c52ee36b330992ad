"""Tiny random LLaMA-family models, tokenizers and checkpoints for tests (no network, no real weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quept.build.builder import build_checkpoint
from quept.build.source import SourceModel

TINY_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "Elastic precision lets one checkpoint serve every width without reloading anything.",
    "hello world, this is a tiny tokenizer for tests of quept 0123456789",
] * 20


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer with a chat template and <|im_end|> as end of sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_hf_config(model_type: str = "llama", **overrides: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=model_type == "qwen2")
    common.update(overrides)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so that widths differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def tiny_source(model_type: str = "llama", seed: int = 0, **overrides: Any) -> SourceModel:
    model = tiny_hf_model(model_type, seed, **overrides)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return SourceModel(model.config.to_dict(), state, tiny_tokenizer(), f"tiny-random-{model_type}")


def tiny_checkpoint(out: Path, model_type: str = "llama", seed: int = 0, group_size: int = 32,
                    random_adapters: bool = False, **overrides: Any) -> Path:
    """Build a tiny checkpoint; with `random_adapters` the adapters are non-zero (tests the adapter path)."""
    from quept.model.checkpoint import load_checkpoint, write_checkpoint

    path = build_checkpoint(tiny_source(model_type, seed, **overrides), out, group_size=group_size, progress=False)
    if random_adapters:
        ckpt = load_checkpoint(path)
        g = torch.Generator().manual_seed(seed + 1)
        for w in ckpt.elastic.values():
            w.lora_a = (torch.randn(w.lora_a.shape, generator=g) * 0.05).half()
            w.lora_b = (torch.randn(w.lora_b.shape, generator=g) * 0.05).half()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        write_checkpoint(path, ckpt.hf_config, ckpt.dense, ckpt.elastic,
                         {k: v for k, v in ckpt.meta.items() if k not in ("files", "tensor_sha256")},
                         tok, overwrite=True)
    return path


def tiny_gguf(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], seed: int = 0) -> Path:
    """A GGUF file holding only tensors (no model metadata): {name: (GGML type name, torch shape [N, K] or [K])}.

    Float and Q4_0..Q8_0 tensors are really quantized; other types (K-quants) get random bytes of the right size.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (type_name, shape) in tensors.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        data = rng.normal(0, 0.05, size=shape).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"):
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def prefill_then_decode(model, ids: torch.Tensor, plan, n_prefill: int, block_size: int = 4) -> torch.Tensor:
    """Logits [L, V] of every position of ids [L]: a prefill of `n_prefill` rows, then one decode step per
    token through the paged cache (`plan`: a PrecisionPlan or a uniform width)."""
    from quept.model.runner import ModelRunner, SeqRows, StepBatch
    from quept.precision.plan import PrecisionPlan

    plan = PrecisionPlan.uniform(plan) if isinstance(plan, int) else plan
    runner, (table,) = ModelRunner.scratch(model, 1, len(ids), block_size)
    tokens = ids.tolist()
    out = [runner.execute(StepBatch([SeqRows(tokens[:n_prefill], 0, table, plan)], all_logits=True))]
    for t in range(n_prefill, len(tokens)):
        out.append(runner.execute(StepBatch([SeqRows(tokens[t : t + 1], t, table, plan)], all_logits=True)))
    return torch.cat(out)
