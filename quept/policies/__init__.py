"""Precision policies, registered by name (`quept serve --policy NAME`).

    fixed          what the request asked for (fixed.py)
    load           the default plan of `auto` requests follows the load against an ITL/TTFT SLO
    entropy        FlexQuant-style per-token switching on next-token entropy
    load+entropy   both: load sets the ceiling, quiet tokens run low

Modules: base.py (the Controller interface), config.py (options), plans.py (bounds, ladder),
cost_model.py (step latency per plan and batch), fixed.py, load_policy.py, entropy_policy.py,
combined.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quept.policies.base import Controller, PlanSource
from quept.policies.combined import LoadEntropyPolicy
from quept.policies.config import PolicyConfig
from quept.policies.cost_model import CostModel
from quept.policies.entropy_policy import EntropyGate, EntropyPolicy
from quept.policies.fixed import FixedPolicy
from quept.policies.load_policy import LoadPolicy, replay_trace

PolicyFactory = Callable[..., Controller]
POLICIES: dict[str, PolicyFactory] = {
    "fixed": FixedPolicy,
    "load": LoadPolicy,
    "entropy": EntropyPolicy,
    "load+entropy": LoadEntropyPolicy,
}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make a policy available to `make_controller` (and to `quept serve --policy NAME`)."""
    POLICIES[name] = factory


def make_controller(name: str, model: PlanSource, default_precision: str = "w8", **options: Any) -> Controller:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES, key=lambda n: (n != 'fixed', n))}")
    return POLICIES[name](model, default_precision, **options)


__all__ = ["POLICIES", "CostModel", "EntropyGate", "EntropyPolicy", "FixedPolicy", "LoadEntropyPolicy", "LoadPolicy",
           "PolicyConfig", "make_controller", "register_policy", "replay_trace"]
