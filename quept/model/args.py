"""The architecture numbers our forward needs (read from a Hugging Face config) and the linears' plan order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quept.errors import SourceModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelArgs:
    """The architecture numbers our forward needs, read from a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SourceModelError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
        n_heads = cfg["num_attention_heads"]
        scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 folds theta and scaling here
            params = cfg["rope_parameters"]
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = params
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("default", "llama3"):
                raise SourceModelError(f"rope scaling {kind!r} is not supported (supported: default, llama3)")
            scaling = None if kind == "default" else tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
        )


def linear_names(n_layers: int) -> list[str]:
    """Every elastic linear in plan order: the 7 per block, then the lm_head."""
    return [f"model.layers.{i}.{n}" for i in range(n_layers) for n in LINEAR_NAMES] + ["lm_head"]
