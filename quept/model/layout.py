"""Where each row of a flat batch writes its K/V and which cache slots it attends to.

`build_layout` is a pure read: it turns each sequence's block table, the tokens already in the cache
and its new rows into slot ids. The blocks were reserved before (the engine's block manager, or a
scratch cache's contiguous tables); a table too short for its rows is a caller's bug and raises.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from quept.model.kv_cache import KVCache, blocks_for


@dataclass
class SeqSlice:
    """One sequence's rows in a flat batch."""

    start: int  # first row in the flat batch
    length: int  # rows of this sequence in the batch (prefill chunk or 1 for decode)
    context_before: int  # tokens of this sequence already in the KV cache before this batch
    ctx_slots: torch.Tensor  # flat cache slot ids of all context_before + length tokens


@dataclass
class DecodeGroup:
    """The single-row (decode) sequences of a batch, attended together in one call."""

    rows: torch.Tensor  # [B] row of each decoding sequence in the flat batch
    slots: torch.Tensor  # [sum L] the cache slots of every sequence's context, concatenated
    offsets: torch.Tensor  # [B + 1] sequence b's slots are slots[offsets[b] : offsets[b + 1]]
    tables: list[list[int]]  # each sequence's KV block ids
    block_size: int

    @cached_property
    def padded(self) -> "PaddedBlocks":
        """The block tables padded to one length, for one masked sdpa call over gathered blocks."""
        n_blocks = max(len(t) for t in self.tables)
        dev = self.slots.device
        blocks = torch.tensor([t + [0] * (n_blocks - len(t)) for t in self.tables], dtype=torch.int64,
                              device=dev)  # [B, NB]
        lens = self.offsets.diff()  # [B]
        max_len = n_blocks * self.block_size
        mask = (torch.arange(max_len, device=dev).unsqueeze(0) < lens.unsqueeze(1)).view(len(self.tables), 1, 1, max_len)
        return PaddedBlocks(blocks.view(-1), mask, max_len)


@dataclass
class PaddedBlocks:
    blocks: torch.Tensor  # [B * NB] KV block ids of each sequence, padded to NB blocks with block 0
    mask: torch.Tensor  # [B, 1, 1, Lmax] bool, True where the key is real (Lmax = NB * block_size)
    max_len: int  # Lmax


@dataclass
class BatchLayout:
    """Where each row's K/V goes and which rows attend to which cache slots."""

    write_slots: torch.Tensor  # [T] flat cache slot of each row
    seqs: list[SeqSlice]
    tables: list[list[int]]  # each sequence's KV block ids
    block_size: int

    # Derived on first use, per attention path: layer ops that attend in place read `row_spans`, the
    # others `decode` (a step builds only what its model's attention reads).
    @cached_property
    def decode(self) -> DecodeGroup | None:
        """The sequences that decode one row, if any."""
        return decode_group(self.seqs, self.tables, self.block_size)

    @cached_property
    def row_spans(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, starts, ends): every sequence's context slots concatenated [n], and for each row
        [T] the span of them it attends to (a prefill chunk's rows are causal: each one slot more)."""
        slots = torch.cat([s.ctx_slots for s in self.seqs]) if len(self.seqs) > 1 else self.seqs[0].ctx_slots
        starts, ends, base = [], [], 0
        for s in self.seqs:
            starts += [base] * s.length
            ends += range(base + s.context_before + 1, base + s.context_before + s.length + 1)
            base += s.ctx_slots.numel()
        return (slots, torch.tensor(starts, dtype=torch.int64, device=slots.device),
                torch.tensor(ends, dtype=torch.int64, device=slots.device))


def build_layout(cache: KVCache, seqs: Sequence[tuple[Sequence[int], int, int]]) -> BatchLayout:
    """The flat batch of (block_table, tokens already cached, new rows) per sequence, in order."""
    slices, writes, tables, start = [], [], [], 0
    for table, before, n_new in seqs:
        ctx = cache.slots(table, 0, before + n_new)  # [before + n_new]
        writes.append(ctx[before:])
        slices.append(SeqSlice(start, n_new, before, ctx))
        tables.append(list(table[: blocks_for(before + n_new, cache.block_size)]))  # the blocks in use, not spare ones
        start += n_new
    return BatchLayout(torch.cat(writes), slices, tables, cache.block_size)


def decode_group(slices: Sequence[SeqSlice], tables: Sequence[list[int]], block_size: int) -> DecodeGroup | None:
    """The single-row sequences of a batch with their concatenated context slots, if any."""
    dec = [(s, t) for s, t in zip(slices, tables) if s.length == 1]
    if not dec:
        return None
    lens = [s.ctx_slots.numel() for s, _ in dec]
    slots = dec[0][0].ctx_slots if len(dec) == 1 else torch.cat([s.ctx_slots for s, _ in dec])
    offsets = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64, device=slots.device)
    rows = torch.tensor([s.start for s, _ in dec], dtype=torch.int64, device=slots.device)
    return DecodeGroup(rows, slots, offsets, [t for _, t in dec], block_size)
