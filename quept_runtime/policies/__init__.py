"""Adaptive precision policies (DESIGN §4, "Controller"), registered by name with `register_policy`.

    fixed          what the request asked for (quept_runtime.controller.FixedPolicy)
    load           the default plan of `auto` requests follows the load against an ITL/TTFT SLO
    entropy        FlexQuant-style per-token switching on next-token entropy
    load+entropy   both: load sets the ceiling, quiet tokens run low

Modules: config.py (options), plans.py (bounds, ladder), cost_model.py (step latency per plan
and batch), load_policy.py, entropy_policy.py, combined.py.
"""

from __future__ import annotations

from quept_runtime.controller import register_policy
from quept_runtime.policies.combined import LoadEntropyPolicy
from quept_runtime.policies.config import PolicyConfig
from quept_runtime.policies.cost_model import CostModel
from quept_runtime.policies.entropy_policy import EntropyGate, EntropyPolicy
from quept_runtime.policies.load_policy import LoadPolicy, replay_trace
from quept_runtime.policies.plans import width_shares

register_policy("load", LoadPolicy)
register_policy("entropy", EntropyPolicy)
register_policy("load+entropy", LoadEntropyPolicy)

__all__ = ["CostModel", "EntropyGate", "EntropyPolicy", "LoadEntropyPolicy", "LoadPolicy", "PolicyConfig",
           "replay_trace", "width_shares"]
