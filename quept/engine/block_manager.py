"""Who owns which KV block: the free list, each sequence's block table, reservations, frees and the
prefix cache.

The scheduler reserves a sequence's blocks when it schedules its rows (`reserve`), so by the time a
step executes every row has a slot and building the layout is a pure read of the tables. Blocks
come back when a sequence finishes, is aborted or is preempted (`free`).

Blocks are reference-counted: the n sequences of one request share the full blocks of their prompt
(`fork`), and sequences whose prompts start alike share the cached blocks of that prefix (`lookup`,
`adopt`). A forked table never shares a partially filled block (the sequences would write their next
tokens into the same slots): that block is copied into a fresh one.

Prefix caching (quept.engine.prefix_cache): once a block is full and every token in it was computed
at one plan, it is named by its hash chain (`computed`). A named block whose last holder frees it
stays cached, evictable, until the free list runs dry; `num_free_blocks` and `usage` count it as
free. A sequence whose block mixes two plans (a per-token policy switched inside it) names no more
blocks: its KV from there on is its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quept.engine.prefix_cache import ROOT, PrefixHit, PrefixIndex, block_hash, chain, plan_key
from quept.model.kv_cache import blocks_for
from quept.precision.plan import PrecisionPlan


class OutOfBlocks(RuntimeError):
    """The cache has fewer free blocks than asked for."""


@dataclass
class SequenceBlocks:
    """The blocks one sequence owns, how many token slots it has reserved, and the names of its full
    blocks (the prefix cache's hash chain, `hashes[i]` naming `block_table[i]`)."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0
    hashes: list[bytes] = field(default_factory=list)
    open_key: bytes | None = None  # plan key of the rows computed so far in the block being filled
    cacheable: bool = True  # False once a block mixed two plans: no later block is named

    def clear(self) -> None:
        self.block_table, self.num_tokens, self.hashes, self.open_key, self.cacheable = [], 0, [], None, True


class BlockManager:
    """The blocks of a cache of `num_blocks` blocks of `block_size` tokens. Engine thread only."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never named, or evicted
        self._refs = [0] * num_blocks  # holders of each block
        self._index = PrefixIndex()

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds: on the free list or cached and evictable."""
        return len(self._free) + len(self._index.evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Named blocks, held or evictable."""
        return len(self._index)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (held by a sequence), 0..1; cached blocks nobody holds count as free."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` tokens needs."""
        return blocks_for(num_tokens, self.block_size)

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_tokens + new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: SequenceBlocks, new_tokens: int) -> bool:
        return self.blocks_needed(seq, new_tokens) <= self.num_free_blocks

    def _take(self) -> int:
        """A block for one holder: from the free list, else the least recently freed cached block."""
        block = self._free.pop() if self._free else self._index.evict_oldest()
        self._refs[block] = 1
        return block

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> None:
        """Grow `seq` by `new_tokens` slots, taking blocks as needed."""
        need = self.blocks_needed(seq, new_tokens)
        if need > self.num_free_blocks:
            raise OutOfBlocks(f"need {need} KV blocks, {self.num_free_blocks} free")
        seq.block_table.extend(self._take() for _ in range(need))
        seq.num_tokens += new_tokens

    def fork(self, parent: SequenceBlocks) -> tuple[SequenceBlocks, tuple[int, int] | None] | None:
        """A table holding the same `parent.num_tokens` tokens: its full blocks shared, a partially filled
        last block replaced by a fresh one, returned as (source, destination) for the caller to copy.
        None when that fresh block is not free."""
        full, partial = divmod(parent.num_tokens, self.block_size)
        if partial and not self.num_free_blocks:
            return None
        table = parent.block_table[:full]
        for block in table:
            self._refs[block] += 1
        child = SequenceBlocks(table, parent.num_tokens, parent.hashes[:full], None, parent.cacheable)
        copy = None
        if partial:
            fresh = self._take()
            copy = (parent.block_table[full], fresh)
            child.block_table = table + [fresh]
            child.open_key = parent.open_key
        return child, copy

    def free(self, seq: SequenceBlocks) -> None:
        """Give up all blocks of `seq`; those it held alone return to the pool, the named ones as cached
        and evictable, the tail first (a prefix outlives its continuations). Idempotent."""
        named = self._index.name_of
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in named:
                    self._index.evictable[block] = None
                else:
                    self._free.append(block)
        seq.clear()

    # ------------------------------------------------------------------ prefix caching

    def lookup(self, token_ids: list[int], plan: PrecisionPlan) -> PrefixHit:
        """The longest run of cached blocks holding `token_ids`' leading tokens at `plan`; it stops one
        token short of the end, so that the sequence still runs a row to sample from."""
        if not self.prefix_caching or not self._index:
            return PrefixHit()
        blocks: list[int] = []
        hashes: list[bytes] = []
        evictable = 0
        for h in chain(token_ids, plan_key(plan), self.block_size, (len(token_ids) - 1) // self.block_size):
            block = self._index.block_of.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            evictable += self._refs[block] == 0
        return PrefixHit(tuple(blocks), tuple(hashes), evictable, len(blocks) * self.block_size)

    def adopt(self, seq: SequenceBlocks, hit: PrefixHit) -> None:
        """Give a sequence that holds no blocks the cached blocks of `hit` as its first ones."""
        if seq.block_table:
            raise ValueError("a sequence adopts a cached prefix only before it holds blocks")
        for block in hit.blocks:
            if self._refs[block] == 0:
                del self._index.evictable[block]
            self._refs[block] += 1
        seq.block_table = list(hit.blocks)
        seq.hashes = list(hit.hashes)
        seq.num_tokens = hit.num_tokens

    def computed(self, seq: SequenceBlocks, token_ids: list[int], start: int, rows: int, plan: PrecisionPlan) -> None:
        """Rows [start, start + rows) of `seq` were written at `plan`: name every block they fill."""
        if not self.prefix_caching or not seq.cacheable:
            return
        bs = self.block_size
        key = plan_key(plan)
        end = start + rows
        if start % bs == 0:
            seq.open_key = key
        elif seq.open_key != key:
            seq.cacheable = False  # this block holds K/V of two plans: nobody else computes it so
            return
        for b in range(start // bs, end // bs):  # the blocks these rows complete; hashes names blocks 0 … b-1
            parent = seq.hashes[-1] if seq.hashes else ROOT
            h = block_hash(parent, key, token_ids[b * bs : (b + 1) * bs])
            seq.hashes.append(h)
            self._index.name(seq.block_table[b], h)
        seq.open_key = key if end % bs else None
