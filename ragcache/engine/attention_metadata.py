"""What one forward call needs to know about where its tokens' KV lives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcache.kernels.paged_attention import SequencePlan, plan_paged_attention


@dataclass(slots=True)
class AttentionMetadata:
    """Describes the computed tokens of one forward call, grouped by sequence.

    ``fresh`` means every sequence computes all of its slots from slot 0, so attention
    can run on the new K and V directly instead of reading them back from the pool.
    """

    slot_mapping: torch.Tensor
    query_slots: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    fresh: bool = False
    plans: list[SequencePlan] | None = None

    def cpu_plans(self, block_size: int) -> list[SequencePlan]:
        """Per-sequence attention work, resolved on the first layer and reused by the rest."""
        if self.plans is None:
            self.plans = plan_paged_attention(
                self.block_tables,
                self.seq_lens,
                self.query_start_loc,
                self.query_slots,
                block_size,
            )
        return self.plans

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def subset(self, token_index: torch.Tensor) -> AttentionMetadata:
        """The same sequences, computing only the tokens at ``token_index`` (sorted)."""
        token_index = token_index.to(torch.long)
        bounds = self.query_start_loc.to(torch.long)
        counts = torch.searchsorted(token_index, bounds, right=False)
        query_start_loc = counts.to(torch.int32)
        per_seq = (counts[1:] - counts[:-1]).tolist()
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[token_index],
            query_slots=self.query_slots[token_index],
            query_start_loc=query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=max(per_seq, default=0),
            fresh=False,
        )


def contiguous_metadata(
    seq_token_counts: list[int], block_size: int, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Fresh prefill of sequences laid out in consecutive blocks of a scratch pool."""
    slot_mapping, query_slots, block_rows = [], [], []
    next_block = 0
    for count in seq_token_counts:
        blocks = max(1, (count + block_size - 1) // block_size)
        block_rows.append(list(range(next_block, next_block + blocks)))
        start = next_block * block_size
        slot_mapping.append(torch.arange(start, start + count))
        query_slots.append(torch.arange(count))
        next_block += blocks
    width = max(len(r) for r in block_rows)
    tables = torch.zeros(len(block_rows), width, dtype=torch.int32)
    for i, row in enumerate(block_rows):
        tables[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(seq_token_counts).cumsum(0).tolist()])
    return AttentionMetadata(
        slot_mapping=torch.cat(slot_mapping).to(device),
        query_slots=torch.cat(query_slots).to(torch.int32).to(device),
        query_start_loc=starts.to(torch.int32).to(device),
        seq_lens=torch.tensor(seq_token_counts, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(seq_token_counts),
        fresh=True,
    )


def step_metadata(
    tables: list[list[int]],
    starts: list[int],
    counts: list[int],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Row i computes positions [starts[i], starts[i] + counts[i]) over block table tables[i]."""
    slots: list[int] = []
    query_slots: list[int] = []
    for table, start, count in zip(tables, starts, counts, strict=True):
        for i in range(start, start + count):
            slots.append(table[i // block_size] * block_size + i % block_size)
            query_slots.append(i)
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
    for row, table in enumerate(tables):
        block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_slots=torch.tensor(query_slots, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(bounds, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(
            [s + c for s, c in zip(starts, counts, strict=True)], dtype=torch.int32, device=device
        ),
        block_tables=block_tables.to(device),
        max_query_len=max(counts),
    )
