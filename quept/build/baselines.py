"""The baselines a nested checkpoint is scored against: the source model, independently round-to-nearest."""

from __future__ import annotations

from typing import Any

import torch

from quept.build.quantizer import quantize_independent
from quept.model.args import linear_names
from quept.model.model import ElasticModel, dense_model


def independent_rtn_model(model_args: Any, state: dict[str, torch.Tensor], bits: int, group_size: int) -> ElasticModel:
    """The source model with every elastic linear independently round-to-nearest quantized at `bits`."""
    q = dict(state)
    for name in linear_names(model_args.n_layers):
        q[f"{name}.weight"] = quantize_independent(state[f"{name}.weight"], bits, group_size)
    return dense_model(model_args, q)
