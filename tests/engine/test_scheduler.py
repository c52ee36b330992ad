"""Scheduler decisions on a small real block pool (no model): admission, chunks, preemption."""

from __future__ import annotations

import pytest

from quept.engine.block_manager import BlockManager
from quept.engine.scheduler import Scheduler, SchedulerConfig
from quept.engine.sequence import GenerationRequest, Sequence, SequenceStatus
from quept.precision.plan import PrecisionPlan


def seq(rid: str, n_prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(GenerationRequest(rid, tuple(range(1, n_prompt + 1)), max_tokens), PrecisionPlan.uniform(8))


def cache(num_blocks: int, block_size: int = 4) -> BlockManager:
    return BlockManager(num_blocks, block_size)


def run(sched: Scheduler) -> list[tuple[str, int]]:
    """Schedule one step and apply it as the engine would (advance, add a token); the scheduler has
    reserved every scheduled row's slot."""
    out = sched.schedule()
    for s in out.scheduled:
        assert s.seq.blocks.num_tokens == s.seq.num_computed + s.num_rows
        assert len(s.seq.blocks.block_table) * sched.blocks.block_size >= s.seq.blocks.num_tokens
        s.seq.num_computed += s.num_rows
        if s.samples:
            s.seq.token_ids.append(0)
    return [(s.seq.request_id, s.num_rows) for s in out.scheduled]


def test_max_batch_bounds_the_running_set():
    sched = Scheduler(SchedulerConfig(max_batch=2, max_batched_tokens=64), cache(64))
    for i in range(3):
        sched.add(seq(f"s{i}", 5))
    assert run(sched) == [("s0", 5), ("s1", 5)]
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert run(sched) == [("s0", 1), ("s1", 1)]  # decode rows; s2 waits for a slot
    sched.remove(sched.running[0])
    assert run(sched) == [("s1", 1), ("s2", 5)]  # s2 joins the running batch between steps


def test_admission_waits_for_kv_blocks():
    sched = Scheduler(SchedulerConfig(max_batch=8, max_batched_tokens=64, watermark=0.0), cache(4))
    sched.add(seq("a", 12))  # 3 blocks
    sched.add(seq("b", 8))  # 2 blocks: does not fit beside a
    assert run(sched) == [("a", 12)]
    assert [s.request_id for s in sched.waiting] == ["b"]
    sched.remove(sched.running[0])
    assert run(sched) == [("b", 8)]
    assert sched.blocks.num_free_blocks == 2


def test_chunked_prefill_under_the_row_budget_with_decodes_first():
    sched = Scheduler(SchedulerConfig(max_batch=4, max_batched_tokens=8), cache(64))
    sched.add(seq("short", 3))
    assert run(sched) == [("short", 3)]
    sched.add(seq("long", 20))
    assert run(sched) == [("short", 1), ("long", 7)]
    assert run(sched) == [("short", 1), ("long", 7)]
    assert run(sched) == [("short", 1), ("long", 6)]  # the last chunk samples the first token
    assert run(sched) == [("short", 1), ("long", 1)]


def test_unchunked_long_prompt_runs_alone():
    sched = Scheduler(SchedulerConfig(max_batch=4, max_batched_tokens=8, chunked_prefill=False), cache(64))
    sched.add(seq("long", 20))
    assert run(sched) == [("long", 20)]


def test_preemption_frees_the_newest_and_requeues_it_first():
    sched = Scheduler(SchedulerConfig(max_batch=4, max_batched_tokens=64, watermark=0.0), cache(4))
    sched.add(seq("old", 4))
    sched.add(seq("new", 4))
    assert run(sched) == [("old", 4), ("new", 4)]  # 1 + 1 blocks
    sched.add(seq("later", 8))
    assert run(sched) == [("old", 1), ("new", 1)]  # 2 + 2 blocks: the cache is full, later waits
    out = sched.schedule()  # both decodes fit in their blocks
    assert [s.seq.request_id for s in out.scheduled] == ["old", "new"]
    for s in out.scheduled:
        s.seq.num_computed += 1
        s.seq.token_ids.append(0)
    for s in sched.running:  # fill the blocks so the next decode needs a new block each
        sched.blocks.reserve(s.blocks, 8 - s.blocks.num_tokens)
        s.num_computed = s.blocks.num_tokens
        s.token_ids.extend([0] * (s.num_computed + 1 - len(s.token_ids)))
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["new"]
    assert [s.seq.request_id for s in out.scheduled] == ["old"]
    victim = out.preempted[0]
    assert victim.status is SequenceStatus.WAITING and victim.num_computed == 0 and victim.blocks.block_table == []
    assert sched.waiting[0] is victim and sched.num_preemptions == 1


def test_fits_ever_and_config_errors():
    sched = Scheduler(SchedulerConfig(max_batch=1, max_batched_tokens=8), cache(4))
    assert sched.fits_ever(16) and not sched.fits_ever(17)
    with pytest.raises(ValueError, match="max_batch"):
        SchedulerConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        SchedulerConfig(max_batch=16, max_batched_tokens=8)
