"""Turns one scheduled step into a single flat forward call and returns the logits."""

from __future__ import annotations

import itertools
from contextlib import nullcontext

import torch

from ragcache.engine.attention_metadata import AttentionMetadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.lazy_layers import LazyLayers
from ragcache.engine.lora_manager import LoraManager
from ragcache.engine.model import LlamaModel
from ragcache.engine.scheduler import ScheduledSeq
from ragcache.engine.sequence import Sequence

# Past this many separate runs of slots, one gathered write beats a write per run.
_MAX_FILL_RUNS = 16


def slot_runs(slots: list[int], first_row: int) -> list[tuple[range, int]]:
    """Rows ``first_row, first_row + 1, ...`` stored at ``slots``, as runs of consecutive
    slots: (the rows of a run, its first slot)."""
    runs: list[tuple[range, int]] = []
    begin = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((range(first_row + begin, first_row + i), slots[begin]))
            begin = i
    return runs


def resumed_rows(
    scheduled: list[ScheduledSeq],
) -> tuple[list[int], list[torch.Tensor]] | None:
    """Per computed row of a step, the layer it starts at and (where above 0) its hidden
    state there; None where every row starts at the embeddings. Rows of a LoRA request
    start at the embeddings: its adapter is applied per row of the whole step."""
    if not any(item.seq.placed is not None and item.seq.placed.resume for item in scheduled):
        return None  # every decode step, and most prefills: nothing to look at per row
    starts: list[int] = []
    states: list[torch.Tensor] = []
    empty = torch.empty(0)
    for item in scheduled:
        placed = item.seq.placed
        resume = placed.resume if placed is not None and item.seq.lora is None else None
        for index in item.computed_indices:
            if resume is not None and resume.covers(index):
                starts.append(resume.layer)
                states.append(resume.hidden[index])
            else:
                starts.append(0)
                states.append(empty)
    return (starts, states) if any(starts) else None


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool, lora: LoraManager | None = None) -> None:
        self.model = model
        self.pool = pool
        self.lora = lora
        self.block_size = pool.block_size
        self.device = model.device

    def write_placed_kv(self, seq: Sequence) -> None:
        """Copy a sequence's handed-in KV into its blocks, skipping shared prefix blocks."""
        placed = seq.placed
        if placed is None or placed.num_tokens <= seq.num_cached_tokens:
            return
        start = seq.num_cached_tokens
        slots = [seq.slot(i, self.block_size) for i in range(start, placed.num_tokens)]
        runs = slot_runs(slots, start)
        if len(runs) <= _MAX_FILL_RUNS and self._fills_in_place(placed.k, placed.v):
            for layer in range(len(placed.k)):  # lazily placed KV lands in its slots
                self._fill_layer(layer, placed.k, placed.v, runs)
        else:
            slot_ids = torch.tensor(slots, device=self.device)
            for layer in range(len(placed.k)):  # one layer at a time: a lazy one is built here
                k, v = placed.k[layer], placed.v[layer]
                self.pool.write_slots(
                    layer, slot_ids, k[start:].to(self.device), v[start:].to(self.device)
                )
        resume = placed.resume
        if resume is None or not resume.tail_k or resume.tail_k[0].shape[0] == 0:
            return
        tail = range(placed.num_tokens, placed.num_tokens + resume.tail_k[0].shape[0])
        tail_slots = torch.tensor([seq.slot(i, self.block_size) for i in tail], device=self.device)
        for layer, (k, v) in enumerate(zip(resume.tail_k, resume.tail_v, strict=True)):
            self.pool.write_slots(layer, tail_slots, k.to(self.device), v.to(self.device))

    def _fills_in_place(self, k: object, v: object) -> bool:
        """Whether placed KV can write itself into the pool's slots (same layout)."""
        return (
            isinstance(k, LazyLayers)
            and isinstance(v, LazyLayers)
            and k.fill is not None
            and v.fill is not None
            and k.layer_shape[1:] == tuple(self.pool.layer(0)[0].shape[2:])
        )

    def _fill_layer(
        self, layer: int, k: LazyLayers, v: LazyLayers, runs: list[tuple[range, int]]
    ) -> None:
        assert k.fill is not None and v.fill is not None
        kc, vc = self.pool.layer(layer)
        flat_k = kc.view(-1, *kc.shape[2:])
        flat_v = vc.view(-1, *vc.shape[2:])
        for rows, first_slot in runs:
            slots = slice(first_slot, first_slot + len(rows))
            k.fill(layer, rows, flat_k[slots])
            v.fill(layer, rows, flat_v[slots])

    def build_metadata(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        fresh = True
        bs = self.block_size
        for item in scheduled:
            seq, indices = item.seq, item.computed_indices
            table = seq.block_table
            input_ids.extend(item.input_ids)
            positions.extend(indices)
            slots.extend(table[i // bs] * bs + i % bs for i in indices)
            query_slots.extend(indices)
            starts.append(starts[-1] + len(indices))
            seq_lens.append(indices[-1] + 1)
            fresh = fresh and indices[0] == 0 and indices[-1] == len(indices) - 1
        width = max(len(item.seq.block_table) for item in scheduled)
        tables = torch.zeros(len(scheduled), width, dtype=torch.int32)
        for row, item in enumerate(scheduled):
            tables[row, : len(item.seq.block_table)] = torch.tensor(
                item.seq.block_table, dtype=torch.int32
            )
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_slots=torch.tensor(query_slots, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            max_query_len=max(len(item.token_indices) for item in scheduled),
            fresh=fresh,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor | None:
        """Logits for the sequences that sample this step: one row, plus one per draft token."""
        ids, pos, meta = self.build_metadata(scheduled)
        resumed = resumed_rows(scheduled)
        with self.lora.activate(scheduled) if self.lora is not None else nullcontext():
            if resumed is None:
                hidden = self.model(ids, pos, meta, self.pool)
            else:
                hidden = self._forward_resumed(ids, pos, meta, resumed)
        self._record_prompt_logprobs(scheduled, hidden, meta)
        ends = (meta.query_start_loc[1:] - 1).tolist()
        rows = [
            row
            for item, end in zip(scheduled, ends, strict=True)
            if item.samples
            for row in range(end - len(item.draft_ids), end + 1)
        ]
        if not rows:
            return None
        return self.model.compute_logits(hidden[rows])

    def _forward_resumed(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        meta: AttentionMetadata,
        resumed: tuple[list[int], list[torch.Tensor]],
    ) -> torch.Tensor:
        """The forward of a step some of whose rows start at a later layer with the hidden
        states fusion's fresh pass left them: layer by layer, each row joins at its own
        start layer (the KV of its earlier layers is already in its blocks)."""
        model = self.model
        starts, rows = resumed
        hidden = model.embed(ids)
        start_of = torch.tensor(starts, device=hidden.device)
        for row, (start, state) in enumerate(zip(starts, rows, strict=True)):
            if start:
                hidden[row] = state.to(hidden.dtype)
        rope = model.rope(pos)
        bounds = sorted({*starts, model.spec.num_layers})
        for first, last in itertools.pairwise(bounds):
            active = torch.nonzero(start_of <= first).flatten()
            if len(active) == len(starts):
                hidden = model.run_layers(hidden, rope, meta, self.pool, range(first, last))
                continue
            hidden[active] = model.run_layers(
                hidden[active],
                rope.subset(active),
                meta.subset(active),
                self.pool,
                range(first, last),
            )
        return hidden

    def _record_prompt_logprobs(
        self, scheduled: list[ScheduledSeq], hidden: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Log-probability of each next prompt token, for teacher-forced scoring."""
        starts = meta.query_start_loc.tolist()
        for row, item in enumerate(scheduled):
            seq = item.seq
            if not seq.params.prompt_logprobs:
                continue
            pairs = [
                (starts[row] + j, i)
                for j, i in enumerate(item.token_indices)
                if i + 1 < seq.num_prompt_tokens
            ]
            if not pairs:
                continue
            rows = torch.tensor([r for r, _ in pairs], device=hidden.device)
            targets = torch.tensor([seq.token_ids[i + 1] for _, i in pairs], device=hidden.device)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
            picked = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            for (_, i), value in zip(pairs, picked, strict=True):
                seq.prompt_logprobs[i + 1] = value
