"""Which sequences run in the next step, and how many rows each: admission by KV blocks.

Every step the scheduler builds one flat batch under a row budget (`max_batched_tokens`):

1. Running sequences first, oldest first: one decode row each, or the next chunk of a prompt
   still being prefilled. If the KV cache cannot hold a running sequence's new rows, the most
   recently admitted running sequence is preempted (its blocks are freed and it goes back to the
   front of the queue; when it is admitted again it recomputes prompt + generated tokens, as in
   vLLM's recompute preemption), until the rows fit.
2. Then waiting sequences in arrival order, while the batch has fewer than `max_batch`
   sequences, rows remain in the budget, and the cache has free blocks for their (chunk of)
   prompt beyond a small watermark kept for the running sequences' decode steps. A prompt longer
   than the remaining budget is prefilled in chunks across steps (chunked prefill).

A scheduled sequence's KV blocks are reserved here, by the block manager, as its rows are scheduled:
when the step executes, every row has its slot and the runner only reads the block tables.

Prefix caching: a waiting sequence (new, preempted, or a fork that found no block) first takes the
cached blocks that hold its leading tokens at its current plan (`BlockManager.lookup`), and only the
rest of its prompt is scheduled as rows; admission counts the blocks it still needs, and a cached
block nobody holds counts as one taken from the free pool. A request that asks for its prompt's
logprobs computes every prompt row and looks nothing up.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from quept.engine.block_manager import BlockManager
from quept.engine.prefix_cache import PrefixHit
from quept.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step."""

    max_batch: int = 16  # sequences running at once
    max_batched_tokens: int = 512  # rows of one forward (decode rows + prefill chunks)
    chunked_prefill: bool = True  # split long prompts across steps instead of one big forward
    watermark: float = 0.01  # fraction of blocks admission leaves free for running decodes

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_batched_tokens < self.max_batch:
            raise ValueError(f"max_batched_tokens ({self.max_batched_tokens}) must be >= max_batch ({self.max_batch})")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_rows: int  # rows of this sequence in the step (token_ids[num_computed : num_computed + num_rows])
    num_cached: int = 0  # leading tokens it took from the prefix cache when admitted by this step
    samples: bool = False  # the rows reach the end of the sequence: the step samples its next token

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed + self.num_rows == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_queried: int = 0  # tokens of the sequences admitted with a prefix-cache lookup
    prefix_hit: int = 0  # of those, tokens found cached

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    """Owns the waiting queue and the running list; only the engine thread calls it."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (oldest first)
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence that already holds KV blocks for its computed tokens (a fork of a running
        one) from the next step; it counts against `max_batch` like any other."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def fits_ever(self, num_tokens: int) -> bool:
        """Whether a sequence of this many tokens fits the whole cache at all."""
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its KV blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.blocks)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.blocks)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.info("preempted %s (KV cache full: %d blocks); it will recompute %d tokens",
                 seq.request_id, self.blocks.num_blocks, len(seq.token_ids))

    def _rows(self, seq: Sequence, budget: int, batch_empty: bool, cached: int = 0) -> int:
        rows = seq.num_uncomputed - cached
        if rows <= budget:
            return rows
        if self.config.chunked_prefill:
            return budget
        return rows if batch_empty else 0  # unchunked: a long prompt runs alone

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        blocks = self.blocks
        budget = self.config.max_batched_tokens
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            rows = self._rows(seq, budget, not out.scheduled)
            if rows == 0:
                kept.append(seq)
                continue
            while not blocks.can_allocate(seq.blocks, rows) and queue:
                victim = queue.pop()  # the most recently admitted not yet scheduled
                self._preempt(victim)
                out.preempted.append(victim)
            if not blocks.can_allocate(seq.blocks, rows):
                self._preempt(seq)  # nothing left to take blocks from: this one waits
                out.preempted.append(seq)
                continue
            blocks.reserve(seq.blocks, rows)
            budget -= rows
            kept.append(seq)
            out.scheduled.append(ScheduledSeq(seq, rows))
        self.running = kept
        if out.preempted:
            return out  # admitting now would only preempt again
        watermark = int(self.config.watermark * blocks.num_blocks)
        while self.waiting and len(self.running) < self.config.max_batch and budget > 0:
            seq = self.waiting[0]
            looks_up = blocks.prefix_caching and not seq.wants_prompt_rows
            hit = blocks.lookup(seq.token_ids, seq.plan) if looks_up else PrefixHit()
            rows = self._rows(seq, budget, not out.scheduled, hit.num_tokens)
            if rows == 0:
                break
            free = blocks.num_free_blocks - hit.num_evictable - (watermark if self.running else 0)
            if blocks.blocks_for(hit.num_tokens + rows) - len(hit.blocks) > free:
                break  # admission by KV blocks: wait for running sequences to finish
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            blocks.adopt(seq.blocks, hit)
            seq.num_computed = hit.num_tokens
            blocks.reserve(seq.blocks, rows)
            budget -= rows
            out.scheduled.append(ScheduledSeq(seq, rows, hit.num_tokens))
            if looks_up:
                out.prefix_queried += len(seq.token_ids)
                out.prefix_hit += hit.num_tokens
        return out
