from __future__ import annotations

import pytest

from quept.model.kv_cache import OutOfBlocks, PagedKVCache, SequenceBlocks


def test_blocks_are_allocated_on_demand_and_freed() -> None:
    cache = PagedKVCache(n_layers=1, n_kv_heads=1, head_dim=4, num_blocks=4, block_size=4)
    seq = SequenceBlocks()
    slots = cache.reserve(seq, 5)  # 5 tokens need 2 blocks, not the whole context
    assert len(seq.block_table) == 2 and cache.num_free_blocks == 2 and slots.tolist()[:4] == [
        seq.block_table[0] * 4 + i for i in range(4)]
    cache.reserve(seq, 3)
    assert len(seq.block_table) == 2 and cache.usage == 0.5
    cache.truncate(seq, 4)
    assert len(seq.block_table) == 1 and cache.num_free_blocks == 3
    cache.free(seq)
    assert cache.num_free_blocks == 4 and cache.usage == 0.0


def test_out_of_blocks_is_refused_without_side_effects() -> None:
    cache = PagedKVCache(n_layers=1, n_kv_heads=1, head_dim=4, num_blocks=2, block_size=4)
    seq = SequenceBlocks()
    assert not cache.can_allocate(seq, 9)
    with pytest.raises(OutOfBlocks):
        cache.reserve(seq, 9)
    assert cache.num_free_blocks == 2 and seq.num_tokens == 0


def test_budget_sizing() -> None:
    cache = PagedKVCache.with_budget(2, 2, 8, budget_bytes=2 * 2 * 16 * 2 * 8 * 4 * 10, block_size=16)
    assert cache.num_blocks == 10
