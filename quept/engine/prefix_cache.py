"""Which full KV blocks hold which tokens at which plan: the index of automatic prefix caching.

A full block is named by a hash chained over the blocks before it (vLLM's scheme): blake2b over the
parent block's hash, the plan's widths and the block's token ids. K/V computed at one plan differ from
the same tokens at another, so the plan is part of the name: a w4 sequence never reads w8's KV.

A named block that no sequence holds any more is not free at once: it waits in an LRU (least recently
freed first) until the allocator needs a block and finds the free list empty, and until then any
sequence whose prompt starts with the same tokens at the same plan takes it back (`lookup`).
The block manager owns the reference counts; this index only maps names to blocks and orders the
evictable ones.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from quept.precision.plan import PrecisionPlan

ROOT = b""  # the parent hash of a sequence's first block


@lru_cache(maxsize=256)  # asked for every scheduled sequence in every step: a mixed plan's repr is long
def plan_key(plan: PrecisionPlan) -> bytes:
    """What of a plan decides the K/V it computes: its width per linear (or its one width)."""
    return repr((plan.uniform_bits, plan.per_linear)).encode()


def block_hash(parent: bytes, key: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block: its tokens after the block named `parent`, computed at plan `key`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(key)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain(token_ids: Sequence[int], key: bytes, block_size: int, num_blocks: int) -> Iterator[bytes]:
    """The names of the first `num_blocks` full blocks of `token_ids` at plan `key`, lazily."""
    parent = ROOT
    for b in range(num_blocks):
        parent = block_hash(parent, key, token_ids[b * block_size : (b + 1) * block_size])
        yield parent


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks holding a sequence's leading tokens, before the sequence takes them."""

    blocks: tuple[int, ...] = ()
    hashes: tuple[bytes, ...] = ()
    num_evictable: int = 0  # of `blocks`, those nobody holds now (taking them shrinks the free pool)
    num_tokens: int = 0


@dataclass
class PrefixIndex:
    """Block names both ways and the LRU of named blocks nobody holds. Engine thread only."""

    block_of: dict[bytes, int] = field(default_factory=dict)
    name_of: dict[int, bytes] = field(default_factory=dict)
    evictable: OrderedDict[int, None] = field(default_factory=OrderedDict)  # least recently freed first

    def __len__(self) -> int:
        return len(self.block_of)

    def name(self, block: int, h: bytes) -> None:
        """Publish `block` as holding `h`; the first block computed under a name keeps it (a later
        duplicate stays private and goes back to the free list when freed)."""
        if h not in self.block_of and block not in self.name_of:
            self.block_of[h] = block
            self.name_of[block] = h

    def evict_oldest(self) -> int:
        """Forget the least recently freed named block and hand it out."""
        block, _ = self.evictable.popitem(last=False)
        del self.block_of[self.name_of.pop(block)]
        return block
