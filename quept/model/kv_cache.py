"""The paged KV cache's tensors: fixed-size blocks that block tables point into.

`k_cache`, `v_cache`: [n_layers, num_blocks, block_size, n_kv_heads, head_dim]. A sequence owns a
block table (list of block ids); token `t` of the sequence lives in block `table[t // block_size]`
at offset `t % block_size`, i.e. at slot `table[t // bs] * bs + t % bs` of the flattened cache.
Who owns which block is the engine's block manager's business (`quept.engine.block_manager`);
offline callers use contiguous tables (`contiguous_tables`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (n_layers, num_blocks, block_size, n_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def with_budget(
        cls, n_layers: int, n_kv_heads: int, head_dim: int, budget_bytes: int, block_size: int = 16,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    ) -> "KVCache":
        """A cache holding as many blocks as `budget_bytes` allows (K and V together), at least one."""
        per_block = 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        num_blocks = max(1, budget_bytes // per_block)
        return cls(n_layers, n_kv_heads, head_dim, int(num_blocks), block_size, dtype, device)

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s K and V (every layer) into block `dst`."""
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

    def slots(self, block_table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids of token positions [start, end) of a sequence with this block table."""
        if end > len(block_table) * self.block_size:
            raise ValueError(f"positions up to {end} need {-(-end // self.block_size)} KV blocks; "
                             f"the table has {len(block_table)} (blocks are reserved before the layout is built)")
        pos = torch.arange(start, end, device=self.device)
        table = torch.tensor(block_table, dtype=torch.int64, device=self.device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks `tokens` tokens of one sequence occupy."""
    return -(-tokens // block_size)


def contiguous_tables(n_seqs: int, tokens_each: int, block_size: int) -> list[list[int]]:
    """Block tables for `n_seqs` sequences of up to `tokens_each` tokens laid out one after another
    (a scratch cache with `n_seqs * blocks_for(tokens_each, block_size)` blocks)."""
    per = blocks_for(tokens_each, block_size)
    return [list(range(i * per, (i + 1) * per)) for i in range(n_seqs)]
