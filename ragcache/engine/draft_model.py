"""Drafting with a model: a smaller one with the same vocabulary, or the target's first layers.

Both run draft rounds over a paged KV pool: round 0 computes each sequence's pending
tokens (its last token, plus whatever the draft has not seen yet), and each later round
feeds the token just drafted. Greedy requests draft the argmax; sampled requests draw
from the draft's own tempered, truncated distribution q and keep it for verification.

Self-speculation (``EarlyExitProposer``) runs the target's first N layers and exits
through the target's final norm and LM head. It reads and writes the target's own pool:
the KV of those layers is the same whichever model computes it, so it needs no state
and no catch-up. A separate draft model (``DraftModelProposer``) keeps its own pool and
block tables and catches up lazily on tokens it has not seen.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ragcache.engine.attention_metadata import step_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel
from ragcache.engine.proposer import Draft
from ragcache.engine.sampler import Sampler, sampling_probs
from ragcache.engine.sequence import Sequence


def decode_weights(model: LlamaModel, num_layers: int | None = None) -> int:
    """Parameters one decode step streams: the first ``num_layers`` layers and the LM head."""
    layers = model.layers[: num_layers if num_layers is not None else len(model.layers)]
    head = model.embed_tokens if model.lm_head is None else model.lm_head
    return sum(p.numel() for p in layers.parameters()) + head.weight.numel()


class ModelDrafter:
    """Runs draft rounds of ``model`` (its ``layers``) over ``pool``."""

    def __init__(self, model: LlamaModel, pool: KVPool, layers: range, sampler: Sampler) -> None:
        self.model = model
        self.pool = pool
        self.layers = layers
        self.sampler = sampler

    @torch.inference_mode()
    def run(
        self,
        seqs: list[Sequence],
        tables: list[list[int]],
        starts: list[int],
        pending: list[list[int]],
        lengths: list[int],
    ) -> list[Draft]:
        """Row i feeds ``pending[i]`` from ``starts[i]`` on, then drafts ``lengths[i]`` tokens."""
        model = self.model
        tokens: list[list[int]] = [[] for _ in seqs]
        dists: list[list[torch.Tensor]] = [[] for _ in seqs]
        feed = [list(p) for p in pending]
        starts = list(starts)
        rows = [i for i, n in enumerate(lengths) if n > 0]
        while rows:
            counts = [len(feed[i]) for i in rows]
            meta = step_metadata(
                [tables[i] for i in rows],
                [starts[i] for i in rows],
                counts,
                self.pool.block_size,
                model.device,
            )
            ids = torch.tensor([t for i in rows for t in feed[i]], device=model.device)
            positions = torch.tensor(
                [p for i in rows for p in range(starts[i], starts[i] + len(feed[i]))],
                device=model.device,
            )
            hidden = model.run_layers(
                model.embed(ids), model.rope(positions), meta, self.pool, self.layers
            )
            ends = torch.tensor(counts, device=model.device).cumsum(0) - 1
            logits = model.compute_logits(hidden[ends])
            still: list[int] = []
            for row, i in enumerate(rows):
                token = self._choose(logits[row : row + 1], seqs[i], dists[i])
                tokens[i].append(token)
                starts[i] += len(feed[i])
                feed[i] = [token]
                if len(tokens[i]) < lengths[i]:
                    still.append(i)
            rows = still
        return [Draft(t, torch.cat(d) if d else None) for t, d in zip(tokens, dists, strict=True)]

    def _choose(self, logits: torch.Tensor, seq: Sequence, dists: list[torch.Tensor]) -> int:
        if seq.params.greedy:
            return int(logits.argmax())
        q = sampling_probs(logits, seq.params)
        dists.append(q)
        return int(torch.multinomial(q[0], 1, generator=self.sampler.generator(seq)))


class EarlyExitProposer:
    """Self-speculation: the target's first ``num_layers`` layers over the target's own KV."""

    name = "early_exit"

    def __init__(self, model: LlamaModel, pool: KVPool, num_layers: int, sampler: Sampler) -> None:
        if not 1 <= num_layers < model.spec.num_layers:
            raise ValueError(
                f"engine.speculative.draft_layers={num_layers} must lie in "
                f"[1, {model.spec.num_layers - 1}] for this {model.spec.num_layers}-layer model"
            )
        self.drafter = ModelDrafter(model, pool, range(num_layers), sampler)
        self._cost = decode_weights(model, num_layers) / decode_weights(model)

    @property
    def draft_cost(self) -> float:
        return self._cost

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Draft]:
        return self.drafter.run(
            seqs,
            [seq.block_table for seq in seqs],
            [len(seq) - 1 for seq in seqs],
            [[seq.token_ids[-1]] for seq in seqs],
            lengths,
        )

    def accepted(self, seq: Sequence, num_accepted: int) -> None:
        return None

    def forget(self, seq: Sequence) -> None:
        return None


class DraftModelProposer:
    """A smaller model with the same vocabulary, with its own paged KV pool.

    The pool holds as many blocks as the target's. A sequence's draft KV stays valid up
    to the tokens verification kept; when the pool runs short, the least recently
    drafted sequences outside the current step lose theirs and catch up later.
    """

    name = "draft_model"

    def __init__(
        self,
        draft: LlamaModel,
        target: LlamaModel,
        num_blocks: int,
        block_size: int,
        sampler: Sampler,
    ) -> None:
        if draft.spec.vocab_size != target.spec.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {draft.spec.vocab_size} tokens and the "
                f"target's {target.spec.vocab_size}; they must share one tokenizer"
            )
        self.pool = KVPool(draft.spec, num_blocks, block_size, draft.dtype, draft.device)
        self.block_size = block_size
        self.drafter = ModelDrafter(draft, self.pool, range(draft.spec.num_layers), sampler)
        self._cost = decode_weights(draft) / decode_weights(target)
        self.free_blocks = list(range(num_blocks))
        self.tables: OrderedDict[int, list[int]] = OrderedDict()
        self.num_computed: dict[int, int] = {}
        self.in_flight: dict[int, tuple[int, int]] = {}

    @property
    def draft_cost(self) -> float:
        return self._cost

    def _grow(self, seq_id: int, num_slots: int, keep: set[int]) -> bool:
        table = self.tables.setdefault(seq_id, [])
        self.tables.move_to_end(seq_id)
        needed = -(-num_slots // self.block_size) - len(table)
        for victim in list(self.tables):
            if needed <= len(self.free_blocks):
                break
            if victim not in keep:
                self._drop(victim)
        if needed > len(self.free_blocks):
            return False
        for _ in range(max(needed, 0)):
            table.append(self.free_blocks.pop())
        return True

    def _drop(self, seq_id: int) -> None:
        self.free_blocks.extend(self.tables.pop(seq_id, []))
        self.num_computed.pop(seq_id, None)
        self.in_flight.pop(seq_id, None)

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Draft]:
        keep = {seq.seq_id for seq in seqs}
        lengths = list(lengths)
        for i, seq in enumerate(seqs):
            # Drafting k tokens computes positions up to len(seq) + k - 2.
            if lengths[i] > 0 and not self._grow(seq.seq_id, len(seq) + lengths[i] - 1, keep):
                lengths[i] = 0
        starts = [self.num_computed.get(seq.seq_id, 0) for seq in seqs]
        drafts = self.drafter.run(
            seqs,
            [self.tables.get(seq.seq_id, []) for seq in seqs],
            starts,
            [seq.token_ids[start:] for seq, start in zip(seqs, starts, strict=True)],
            lengths,
        )
        for seq, draft in zip(seqs, drafts, strict=True):
            if draft:
                self.in_flight[seq.seq_id] = (len(seq), len(draft))
        return drafts

    def accepted(self, seq: Sequence, num_accepted: int) -> None:
        flight = self.in_flight.pop(seq.seq_id, None)
        if flight is None:
            return
        length, drafted = flight
        # Positions before length + num_accepted hold kept tokens; the last draft was never fed.
        self.num_computed[seq.seq_id] = length + min(num_accepted, drafted - 1)

    def forget(self, seq: Sequence) -> None:
        self._drop(seq.seq_id)
