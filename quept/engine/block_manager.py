"""Who owns which KV block: the free list, each sequence's block table, reservations and frees.

The scheduler reserves a sequence's blocks when it schedules its rows (`reserve`), so by the time a
step executes every row has a slot and building the layout is a pure read of the tables. Blocks
come back when a sequence finishes, is aborted or is preempted (`free`).

Blocks are reference-counted: the n sequences of one request share the full blocks of their prompt
(`fork`); a block returns to the free list when its last holder frees it. A forked table never
shares a partially filled block (the sequences would write their next tokens into the same slots):
that block is copied into a fresh one.
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
        self._refs = [0] * num_blocks  # holders of each block

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
            block = self._free.pop()
            self._refs[block] = 1
            seq.block_table.append(block)
        seq.num_tokens += new_tokens

    def fork(self, parent: SequenceBlocks) -> tuple[SequenceBlocks, tuple[int, int] | None] | None:
        """A table holding the same `parent.num_tokens` tokens: its full blocks shared, a partially filled
        last block replaced by a fresh one, returned as (source, destination) for the caller to copy.
        None when that fresh block is not free."""
        full, partial = divmod(parent.num_tokens, self.block_size)
        if partial and not self._free:
            return None
        table = parent.block_table[:full]
        for block in table:
            self._refs[block] += 1
        copy = None
        if partial:
            fresh = self._free.pop()
            self._refs[fresh] = 1
            copy = (parent.block_table[full], fresh)
            table = table + [fresh]
        return SequenceBlocks(table, parent.num_tokens), copy

    def free(self, seq: SequenceBlocks) -> None:
        """Give up all blocks of `seq`; those it held alone return to the pool (idempotent)."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        seq.block_table = []
        seq.num_tokens = 0
