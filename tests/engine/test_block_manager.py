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
