"""KV tensors: budget sizing, slot ids from block tables, and a table too short for its rows."""

from __future__ import annotations

import pytest

from quept.model.kv_cache import KVCache, blocks_for, contiguous_tables


def test_budget_sizing() -> None:
    cache = KVCache.with_budget(2, 2, 8, budget_bytes=2 * 2 * 16 * 2 * 8 * 4 * 10, block_size=16)
    assert cache.num_blocks == 10 and tuple(cache.k_cache.shape) == (2, 10, 16, 2, 8)
    assert KVCache.with_budget(2, 2, 8, budget_bytes=0).num_blocks == 1


def test_slots_follow_the_block_table() -> None:
    cache = KVCache(1, 1, 2, num_blocks=8, block_size=4)
    assert cache.slots([5, 2], 2, 7).tolist() == [22, 23, 8, 9, 10]


def test_a_table_too_short_is_a_clear_error() -> None:
    cache = KVCache(1, 1, 2, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="need 3 KV blocks; the table has 2"):
        cache.slots([0, 1], 0, 9)


def test_contiguous_tables() -> None:
    assert blocks_for(9, 4) == 3 and blocks_for(8, 4) == 2
    assert contiguous_tables(2, 9, 4) == [[0, 1, 2], [3, 4, 5]]
