"""The block manager: blocks handed out on demand, refused without side effects, returned on free."""

from __future__ import annotations

import pytest

from quept.engine.block_manager import BlockManager, OutOfBlocks, SequenceBlocks


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
