"""Load a checkpoint into a ready-to-run model with its tokenizer and precision resolution."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quept.backends import ElasticBackend, get_backend
from quept.errors import PrecisionError
from quept.model.checkpoint import ElasticCheckpoint, load_checkpoint
from quept.model.model import ElasticModel, elastic_model_from_checkpoint
from quept.precision.plan import PrecisionPlan
from quept.precision.spec import PrecisionSpec, parse_spec

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QUEPT_CACHE_DIR", Path.home() / ".cache" / "quept"))


@dataclass
class LoadedModel:
    """A model loaded once; every precision runs on it without reloading."""

    ckpt: ElasticCheckpoint
    model: ElasticModel
    tokenizer: Any
    backend: ElasticBackend
    load_seconds: float
    adapters_trained: bool = True  # False: every adapter is zeros (an uncalibrated build): their effective rank is 0

    @property
    def widths(self) -> tuple[int, ...]:
        return self.ckpt.widths

    @property
    def max_context(self) -> int:
        return self.model.args.max_position_embeddings

    def parse(self, text: str) -> PrecisionSpec:
        return parse_spec(text, self.widths)

    def plan_for(self, spec: PrecisionSpec | str) -> PrecisionPlan:
        """A concrete plan for a uniform or mixed spec (`auto` is the controller's job)."""
        if isinstance(spec, str):
            spec = self.parse(spec)
        if spec.kind == "uniform":
            return PrecisionPlan.uniform(int(spec.bits))  # type: ignore[arg-type]
        if spec.kind == "mixed":
            from quept.precision.allocation import plan_for_target  # calibration issue: sensitivity tables

            return plan_for_target(self, float(spec.target))  # type: ignore[arg-type]
        raise PrecisionError(f"precision {spec} needs the controller to resolve it")

    def encode_chat(self, prompt: str) -> list[int]:
        """Token ids of `prompt`, wrapped in the chat template when the tokenizer has one."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(tok(prompt)["input_ids"])


def release_host_copies(ckpt: ElasticCheckpoint, model: ElasticModel) -> int:
    """Drop the checkpoint's tensors of every layer its backend has repacked into its own copy (the
    native backend's bit-planes): codes and affines would otherwise be resident twice. Shapes stay
    readable (meta tensors). Returns the bytes released."""
    from quept.model.model import ElasticLinear

    freed = 0
    for name, lin in zip(model.linear_names, model.linears):
        if isinstance(lin, ElasticLinear) and lin.backend.owns_copy(lin.prepared):
            w = lin.weights
            freed += sum(t.numel() * t.element_size() for t in (w.codes, w.scales, w.mins, w.lora_a, w.lora_b))
            lin.weights = ckpt.elastic[name] = w.without_data()
    if freed:
        log.info("released %.0f MiB of checkpoint tensors the backend holds repacked", freed / 2**20)
    return freed


def load_model(checkpoint: str | Path, backend: str = "auto", device: str = "cpu") -> LoadedModel:
    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    be = get_backend(backend, device)
    if torch.device(device).type != "cpu":  # the weights and (through the model) the KV cache live there
        ckpt.dense = {k: v.to(device) for k, v in ckpt.dense.items()}
        ckpt.elastic = {k: w.to(device) for k, w in ckpt.elastic.items()}
    model = elastic_model_from_checkpoint(ckpt, be)
    trained = any(bool(w.lora_b.any()) for w in ckpt.elastic.values())  # read before the host copies go
    release_host_copies(ckpt, model)
    tokenizer = None
    if (Path(checkpoint) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    torch.set_grad_enabled(False)
    seconds = time.perf_counter() - t0
    log.info("loaded %s with the %s backend in %.1f s", checkpoint, be.name, seconds)
    return LoadedModel(ckpt, model, tokenizer, be, seconds, adapters_trained=trained)
