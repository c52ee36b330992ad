"""Per-row token masks from grammar matchers, applied to logits.

llguidance fills one bit per token (token t is bit t % 32 of 32-bit word t // 32) for many
matchers at once on its own threads; `constrain` unpacks the bits and sets the logits of forbidden
tokens to -inf in place. Rows without a grammar are never touched, so constrained and free rows
share one forward and their sampling is independent.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import llguidance
import torch

BITS = torch.arange(32, dtype=torch.int32)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def allowed(matchers: Sequence[llguidance.LLMatcher], vocab: int) -> torch.Tensor:
    """Which tokens each matcher allows next: bool [len(matchers), vocab]."""
    words = (vocab + 31) // 32
    bitmask = torch.zeros(len(matchers), words, dtype=torch.int32, device="cpu")  # [C, W]; llguidance writes row j
    # what llguidance.torch.fill_next_token_bitmask_par does, without importing that module (its torch.compile
    # decorator costs seconds at import)
    _executor().unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(), words * 4,
                                        len(matchers))
    bits = (bitmask.unsqueeze(-1) >> BITS) & 1  # [C, W, 32]: bit b of word w is token 32 w + b
    return bits.reshape(len(matchers), words * 32)[:, :vocab].bool()


def constrain(logits: torch.Tensor, matchers: Sequence[llguidance.LLMatcher]) -> None:
    """Set logits [C, V] of the tokens matcher j forbids to -inf in row j (in place)."""
    logits.masked_fill_(~allowed(matchers, logits.shape[-1]).to(logits.device), float("-inf"))
