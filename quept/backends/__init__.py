"""Backends for `ElasticLinear`, chosen once at load (docs/architecture.md §4)."""

from __future__ import annotations

import logging

import torch

from quept.backends.base import ElasticBackend, ElasticWeights

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "torch", "torch-fp32", "native", "triton")


def get_backend(name: str = "auto", device: str | torch.device = "cpu") -> ElasticBackend:
    """The backend called `name`; `auto` picks triton on CUDA, native on CPU when it builds, else torch.

    `torch` computes in fp16 (the fast dense fallback); `torch-fp32` is the exact fp32 reference.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "native"
        if name == "native":
            try:
                return get_backend("native", device)
            except (ImportError, RuntimeError, OSError) as err:
                log.warning("native CPU backend unavailable (%s); using the torch backend", err)
                return get_backend("torch", device)
    if name in ("torch", "torch-fp32"):
        from quept.backends.torch_dense import TorchBackend

        return TorchBackend(dtype=torch.float16 if name == "torch" else torch.float32)
    if name == "native":
        from quept.backends.native import NativeBackend  # type: ignore[import-not-found]

        return NativeBackend()
    from quept.backends.triton import TritonBackend  # type: ignore[import-not-found]

    return TritonBackend()


__all__ = ["BACKEND_NAMES", "ElasticBackend", "ElasticWeights", "get_backend"]
