"""Paged KV cache: fixed-size blocks handed out on demand, so no sequence reserves its whole context.

`k_cache`, `v_cache`: [n_layers, num_blocks, block_size, n_kv_heads, head_dim]. A sequence owns a
block table (list of block ids); token `t` of the sequence lives in block `table[t // block_size]`
at offset `t % block_size`, i.e. at slot `table[t // bs] * bs + t % bs` of the flattened cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OutOfBlocks(RuntimeError):
    """The cache has fewer free blocks than asked for."""


@dataclass
class SequenceBlocks:
    """The blocks one sequence owns and how many token slots it has filled."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PagedKVCache:
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
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @classmethod
    def with_budget(
        cls, n_layers: int, n_kv_heads: int, head_dim: int, budget_bytes: int, block_size: int = 16,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    ) -> "PagedKVCache":
        """A cache holding as many blocks as `budget_bytes` allows (K and V together)."""
        per_block = 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        num_blocks = max(1, budget_bytes // per_block)
        return cls(n_layers, n_kv_heads, head_dim, int(num_blocks), block_size, dtype, device)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        total = seq.num_tokens + new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: SequenceBlocks, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= len(self._free)

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> torch.Tensor:
        """Grow `seq` by `new_tokens` slots; return their flat slot ids [new_tokens]."""
        need = self.blocks_needed(seq, new_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.pop())
        start = seq.num_tokens
        seq.num_tokens += new_tokens
        return self.slots(seq, start, seq.num_tokens)

    def slots(self, seq: SequenceBlocks, start: int, end: int) -> torch.Tensor:
        """Flat slot ids of token positions [start, end) of `seq`."""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def free(self, seq: SequenceBlocks) -> None:
        """Return all blocks of `seq` to the pool (idempotent)."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_tokens = 0

    def truncate(self, seq: SequenceBlocks, num_tokens: int) -> None:
        """Forget tokens past `num_tokens` (frees whole blocks beyond them)."""
        keep = -(-num_tokens // self.block_size)
        self._free.extend(reversed(seq.block_table[keep:]))
        del seq.block_table[keep:]
        seq.num_tokens = num_tokens
