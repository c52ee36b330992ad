"""Who owns which KV block: the free list, each sequence's block table, reservations and frees.

The scheduler reserves a sequence's blocks when it schedules its rows (`reserve`), so by the time a
step executes every row has a slot and building the layout is a pure read of the tables. Blocks
come back when a sequence finishes, is aborted or is preempted (`free`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quept.model.kv_cache import blocks_for


class OutOfBlocks(RuntimeError):
    """The cache has fewer free blocks than asked for."""


@dataclass
class SequenceBlocks:
    """The blocks one sequence owns and how many token slots it has reserved."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockManager:
    """The free list of a cache of `num_blocks` blocks of `block_size` tokens. Engine thread only."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens needs."""
        return blocks_for(num_tokens, self.block_size)

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_tokens + new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: SequenceBlocks, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= len(self._free)

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> None:
        """Grow `seq` by `new_tokens` slots, taking blocks from the free list as needed."""
        need = self.blocks_needed(seq, new_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            seq.block_table.append(self._free.pop())
        seq.num_tokens += new_tokens

    def free(self, seq: SequenceBlocks) -> None:
        """Return all blocks of `seq` to the pool (idempotent)."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_tokens = 0
