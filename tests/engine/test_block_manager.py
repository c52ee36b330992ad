"""The block manager: blocks handed out on demand, refused without side effects, returned on free."""

from __future__ import annotations

import pytest

from quept.engine.block_manager import BlockManager, OutOfBlocks, SequenceBlocks
from quept.precision.plan import PrecisionPlan


def test_blocks_are_allocated_on_demand_and_freed() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = SequenceBlocks()
    blocks.reserve(seq, 5)  # 5 tokens need 2 blocks, not the whole context
    assert len(seq.block_table) == 2 and blocks.num_free_blocks == 2 and seq.num_tokens == 5
    blocks.reserve(seq, 3)  # fills the second block
    assert len(seq.block_table) == 2 and blocks.usage == 0.5
    blocks.reserve(seq, 1)
    assert len(seq.block_table) == 3 and blocks.num_free_blocks == 1
    assert len(set(seq.block_table)) == 3
    blocks.free(seq)
    assert blocks.num_free_blocks == 4 and blocks.usage == 0.0 and seq.block_table == [] and seq.num_tokens == 0
    blocks.free(seq)  # idempotent
    assert blocks.num_free_blocks == 4


def test_out_of_blocks_is_refused_without_side_effects() -> None:
    blocks = BlockManager(num_blocks=2, block_size=4)
    seq = SequenceBlocks()
    assert not blocks.can_allocate(seq, 9) and blocks.blocks_needed(seq, 9) == 3
    with pytest.raises(OutOfBlocks):
        blocks.reserve(seq, 9)
    assert blocks.num_free_blocks == 2 and seq.num_tokens == 0 and seq.block_table == []


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


def test_fork_shares_full_blocks_and_copies_a_partial_one():
    bm = BlockManager(8, 4)
    parent = SequenceBlocks()
    bm.reserve(parent, 10)  # blocks: full, full, partial (2 of 4)
    child, copy = bm.fork(parent)
    assert child.block_table[:2] == parent.block_table[:2] and child.num_tokens == 10
    assert copy == (parent.block_table[2], child.block_table[2]) and child.block_table[2] not in parent.block_table
    assert bm.num_free_blocks == 8 - 4
    bm.free(parent)  # the shared blocks stay with the child
    assert bm.num_free_blocks == 8 - 3
    bm.free(child)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_fork_of_whole_blocks_needs_no_free_block():
    bm = BlockManager(2, 4)
    parent = SequenceBlocks()
    bm.reserve(parent, 8)
    assert bm.num_free_blocks == 0
    child, copy = bm.fork(parent)
    assert copy is None and child.block_table == parent.block_table
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 2


def test_fork_with_a_partial_block_and_no_free_block_is_refused():
    bm = BlockManager(3, 4)
    parent = SequenceBlocks()
    bm.reserve(parent, 6)
    bm.reserve(SequenceBlocks(), 4)
    assert bm.fork(parent) is None
    assert bm.num_free_blocks == 0  # a refused fork takes nothing


# ---------------------------------------------------------------------- prefix caching

W8, W4 = PrecisionPlan.uniform(8), PrecisionPlan.uniform(4)


def computed_seq(bm: BlockManager, ids: list[int], plan: PrecisionPlan) -> SequenceBlocks:
    """A sequence that reserved and computed `ids` in one step at `plan`."""
    seq = SequenceBlocks()
    bm.reserve(seq, len(ids))
    bm.computed(seq, ids, 0, len(ids), plan)
    return seq


def test_full_blocks_are_found_again_at_the_same_plan_only():
    bm = BlockManager(8, 4)
    ids = list(range(10))  # two full blocks and a partial one
    seq = computed_seq(bm, ids, W8)
    assert bm.num_cached_blocks == 2 and len(seq.hashes) == 2
    hit = bm.lookup(ids, W8)
    assert hit.blocks == tuple(seq.block_table[:2]) and hit.num_tokens == 8 and hit.num_evictable == 0
    assert bm.lookup(ids, W4).num_tokens == 0  # w4 never reads w8's K/V
    assert bm.lookup([0, 1, 2, 3, 9, 9, 9, 9, 9], W8).num_tokens == 4  # the chain stops at the first other token
    assert bm.lookup(ids[:8], W8).num_tokens == 4  # one token short of the end: a row is left to sample from
    assert bm.lookup(ids[:9], W8).num_tokens == 8


def test_cached_blocks_count_as_free_until_evicted_least_recently_freed_first():
    bm = BlockManager(4, 4)
    a = computed_seq(bm, list(range(8)), W8)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0 and bm.num_cached_blocks == 2
    hit = bm.lookup(list(range(9)), W8)
    assert hit.num_tokens == 8 and hit.num_evictable == 2
    b = SequenceBlocks()
    bm.reserve(b, 12)  # two never-used blocks, then the tail block of a (freed first), then nothing more
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 1
    assert bm.lookup(list(range(9)), W8).num_tokens == 4  # a's first block survived: a prefix outlives its tail
    bm.free(b)


def test_adopted_blocks_are_shared_and_return_to_the_cache():
    bm = BlockManager(6, 4)
    ids = list(range(9))
    a = computed_seq(bm, ids, W8)
    b = SequenceBlocks()
    hit = bm.lookup(ids, W8)
    bm.adopt(b, hit)
    bm.reserve(b, 1)
    assert b.block_table[:2] == a.block_table[:2] and b.num_tokens == 9 and bm.num_free_blocks == 6 - 4
    bm.computed(b, ids, 8, 1, W8)
    bm.free(a)
    assert bm.num_free_blocks == 6 - 3  # the shared blocks stay with b
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    hit = bm.lookup(ids, W8)
    assert hit.num_evictable == 2
    c = SequenceBlocks()
    bm.adopt(c, hit)
    assert bm.num_free_blocks == 4 and bm.usage == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="before it holds blocks"):
        bm.adopt(c, hit)
    bm.free(c)


def test_a_block_mixing_two_plans_is_never_named_nor_any_after_it():
    bm = BlockManager(8, 4)
    ids = list(range(16))
    seq = SequenceBlocks()
    bm.reserve(seq, 6)
    bm.computed(seq, ids, 0, 6, W8)  # block 0 named; block 1 half written at w8
    bm.reserve(seq, 10)
    bm.computed(seq, ids, 6, 10, W4)  # the rest of block 1 at w4: block 1 mixes plans
    assert len(seq.hashes) == 1 and not seq.cacheable and bm.num_cached_blocks == 1
    assert bm.lookup(ids, W4).num_tokens == 0 and bm.lookup(ids, W8).num_tokens == 4


def test_a_plan_change_at_a_block_boundary_names_the_new_blocks_under_the_new_plan():
    bm = BlockManager(8, 4)
    ids = list(range(13))
    seq = SequenceBlocks()
    bm.reserve(seq, 8)
    bm.computed(seq, ids, 0, 8, W8)
    bm.reserve(seq, 4)
    bm.computed(seq, ids, 8, 4, W4)
    assert seq.cacheable and len(seq.hashes) == 3
    assert bm.lookup(ids, W8).num_tokens == 8  # the third block is named under w8's prefix at w4: no w8 hit


def test_forks_inherit_the_names_of_the_shared_blocks():
    bm = BlockManager(8, 4)
    ids = list(range(10))
    parent = computed_seq(bm, ids, W8)
    child, copy = bm.fork(parent)
    assert child.hashes == parent.hashes and child.open_key == parent.open_key and copy is not None
    ids2 = ids + [11, 12]
    bm.reserve(child, 2)
    bm.computed(child, ids2, 10, 2, W8)  # fills its copied block: named with the shared chain as parent
    assert len(child.hashes) == 3 and bm.lookup(ids2 + [0], W8).num_tokens == 12


def test_prefix_caching_off_names_nothing():
    bm = BlockManager(4, 4, prefix_caching=False)
    a = computed_seq(bm, list(range(8)), W8)
    assert bm.num_cached_blocks == 0 and bm.lookup(list(range(9)), W8).num_tokens == 0
    bm.free(a)
    assert bm.num_free_blocks == 4
