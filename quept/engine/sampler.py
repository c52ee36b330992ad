"""Token sampling: greedy, temperature, top-k, top-p, with an optional per-sequence seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): logits / 1e-164 overflow to inf and
# the softmax to NaN, and a distribution that sharp is argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below GREEDY_BELOW (0 included) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def generator(self, index: int = 0) -> torch.Generator | None:
        """The random stream of a request's sequence `index` (seed + index), or None without a seed."""
        if self.seed is None:
            return None
        seed = self.seed + index
        if seed >= 2**64:  # what a 64-bit generator seed holds: wrap around
            seed -= 2**64
        g = torch.Generator()
        g.manual_seed(seed)
        return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p
        keep[0] = True  # the top token always (a top_p below float32's smallest number keeps nothing otherwise)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def entropy(logits: torch.Tensor) -> float:
    """Next-token entropy in nats of logits [V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())
