"""The one place that turns scheduled rows into a forward: `ModelRunner.execute(StepBatch)`.

A `StepBatch` lists, per sequence, the rows it runs this step (their token ids, the tokens already
in the KV cache before them, its block table, its precision plan) and whether it samples. The
runner builds the layout (a pure read of the block tables: blocks are reserved before), the width
segments of every linear once from the plans, and runs one forward. The engine, `generate`,
perplexity, the cost model's profile and the entropy policy's start-up forward all call it.

Offline callers (no engine, no block manager) use `ModelRunner.scratch`, a cache of contiguous
block tables, one per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from quept.model.kv_cache import KVCache, blocks_for, contiguous_tables
from quept.model.layout import build_layout
from quept.model.model import ElasticModel
from quept.precision.plan import PrecisionPlan
from quept.precision.segments import step_widths


@dataclass
class SeqRows:
    """One sequence's rows in a step."""

    token_ids: Sequence[int]  # the new rows' tokens (a prefill chunk, or the one token to decode)
    context_before: int  # tokens of this sequence already in the KV cache; the rows' positions follow
    block_table: Sequence[int]  # its KV blocks, already holding context_before + len(token_ids) slots
    plan: PrecisionPlan
    samples: bool = True  # the last row's logits are wanted (the next token is sampled from them)
    all_rows: bool = False  # every row's logits are wanted (scoring the prompt: its logprobs)

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)


@dataclass
class StepBatch:
    """The rows of one forward, sequence after sequence."""

    seqs: list[SeqRows] = field(default_factory=list)
    all_logits: bool = False  # logits of every row (scoring), not only each sampling sequence's last row

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.seqs)


class ModelRunner:
    """Runs a model over its KV cache, one `StepBatch` per call."""

    def __init__(self, model: ElasticModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache

    @classmethod
    def scratch(cls, model: ElasticModel, n_seqs: int, tokens_each: int, block_size: int = 16
                ) -> tuple["ModelRunner", list[list[int]]]:
        """A runner over a fresh cache just big enough for `n_seqs` sequences of up to `tokens_each`
        tokens, and their contiguous block tables."""
        cache = model.new_kv_cache_blocks(n_seqs * blocks_for(tokens_each, block_size), block_size)
        return cls(model, cache), contiguous_tables(n_seqs, tokens_each, block_size)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Logits [L, V] in batch order: per sequence every row with `all_rows` (or `batch.all_logits`),
        else its last row if it samples, else none."""
        tokens: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        for s in batch.seqs:
            first = len(tokens)
            tokens.extend(s.token_ids)
            positions.extend(range(s.context_before, s.context_before + s.num_rows))
            if s.all_rows:
                logits_rows.extend(range(first, len(tokens)))
            elif s.samples:
                logits_rows.append(len(tokens) - 1)
        layout = build_layout(self.cache, [(s.block_table, s.context_before, s.num_rows) for s in batch.seqs])
        rows = [s.num_rows for s in batch.seqs]
        head_rows = None if batch.all_logits else [s.num_rows if s.all_rows else int(s.samples) for s in batch.seqs]
        dev = self.model.device
        widths = step_widths([s.plan for s in batch.seqs], rows, self.model.n_linears, head_rows, dev)
        select = None if batch.all_logits else torch.tensor(logits_rows, dtype=torch.int64, device=dev)
        return self.model(torch.tensor(tokens, dtype=torch.int64, device=dev),
                          torch.tensor(positions, dtype=torch.int64, device=dev), self.cache, layout, widths, select)

    def score(self, token_ids: torch.Tensor | Sequence[int], plan: PrecisionPlan) -> torch.Tensor:
        """Logits [L, V] of every position of one sequence [L] from an empty cache (this runner's cache
        must hold L tokens in the table `range(blocks)`, as `scratch(model, 1, L)` makes)."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        table = range(blocks_for(len(ids), self.cache.block_size))
        return self.execute(StepBatch([SeqRows(ids, 0, table, plan)], all_logits=True))


def score_sequence(model: ElasticModel, token_ids: torch.Tensor | Sequence[int], plan: PrecisionPlan
                   ) -> torch.Tensor:
    """Logits [L, V] of every position of one sequence, on a scratch cache of one block."""
    n = len(token_ids)
    runner, _ = ModelRunner.scratch(model, 1, n, block_size=n)
    return runner.score(token_ids, plan)
