"""Step 3 of calibration: MB-ToMe, multi-bit token merging of the next block's inputs (docs/architecture.md §3.3).

The next block is calibrated on inputs that look like what it will see at run time at several
widths. Per token, the block's update (output minus input) at the high width is compared with
the updates at low widths (cosine). Tokens whose low- and high-width updates agree keep the
high-width output; tokens where they disagree take a mix, weighted by the disagreement, of the
high-width output and the mean low-width output. So the stream carries low-width drift exactly
where low widths drift, and stays close to the high-width path elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mb_tome(
    x_in: torch.Tensor, y_high: torch.Tensor, y_lows: list[torch.Tensor], threshold: float = 0.95, max_mix: float = 0.5
) -> tuple[torch.Tensor, float]:
    """x_in, y_high, y_lows[i]: [S, L, D]. Returns the mixed outputs and the fraction of tokens mixed."""
    if not y_lows:
        return y_high, 0.0
    d_high = y_high - x_in
    agree = torch.stack([F.cosine_similarity(y - x_in, d_high, dim=-1) for y in y_lows]).mean(0)  # [S, L]
    lam = ((threshold - agree) / threshold).clamp(0, 1) * max_mix  # [S, L]; 0 where the widths agree
    y_low = torch.stack(y_lows).mean(0)
    mixed = y_high + lam.unsqueeze(-1) * (y_low - y_high)
    return mixed, float((lam > 0).float().mean())
