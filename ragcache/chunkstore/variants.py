"""Cache-Craft's bookkeeping: how context-sensitive each chunk's cached KV is, and the
repaired variants of a chunk, each stored under the context it was repaired in.

A variant is a chunk's KV as repaired in one prompt: after the root and an ordered list
of predecessor chunks. Its key hashes the root's key, a marker and the predecessors'
root-child keys, so it never collides with an exact tree path (a tree rebuild finds no
parent for it and skips it) and it is only found again when a later prompt puts the
same chunks, in the same order, before it, which also puts it at the same positions.
A variant is repaired KV, never exact.

Deviations are kept in memory (they rebuild from use after a restart); variants are
entries of the chunk store, found by key after a restart. The cost a variant is stored
with is the recompute its reuse saves times its expected reuse, so the replacement
policy keeps variants of contexts that recur and lets one-off ones go first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ragcache.chunkstore.entry import ChunkEntry, LayerKV
from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.chunkstore.store import ChunkStore

VARIANT_MARK = "variant"


@dataclass(slots=True)
class ChunkDeviation:
    """Relative value deviation of a chunk's cached KV, over the contexts measured."""

    contexts: int = 0
    total: float = 0.0
    largest: float = 0.0
    variant_hits: int = 0

    @property
    def mean(self) -> float:
        return self.total / max(1, self.contexts)

    @property
    def expected_reuse(self) -> float:
        """Share of this chunk's uses that found a variant of their context (with one
        imagined hit and one miss before any, so a new chunk starts at 0.5)."""
        return (self.variant_hits + 1) / (self.contexts + self.variant_hits + 2)


class VariantBook:
    def __init__(self, store: ChunkStore, context: KeyContext, root_key: str) -> None:
        self.store = store
        self.context = context
        self.root_key = root_key
        self._deviations: dict[str, ChunkDeviation] = {}

    def deviation(self, chunk: str) -> ChunkDeviation | None:
        """What is known of the chunk with root-child key ``chunk``."""
        return self._deviations.get(chunk)

    def observe(self, chunk: str, relative_deviation: float) -> None:
        record = self._deviations.setdefault(chunk, ChunkDeviation())
        record.contexts += 1
        record.total += relative_deviation
        record.largest = max(record.largest, relative_deviation)

    def key(self, predecessors: Sequence[str], token_ids: Sequence[int]) -> str:
        """Key of a chunk's variant after ``predecessors`` (root-child keys, in order)."""
        return chunk_key(self.context, [self.root_key, VARIANT_MARK, *predecessors], token_ids)

    def get(
        self, chunk: str, predecessors: Sequence[str], token_ids: Sequence[int]
    ) -> ChunkEntry | None:
        entry = self.store.get(self.key(predecessors, token_ids), token_ids)
        if entry is not None:
            self._deviations.setdefault(chunk, ChunkDeviation()).variant_hits += 1
        return entry

    def contains(self, predecessors: Sequence[str], token_ids: Sequence[int]) -> bool:
        return self.store.contains(self.key(predecessors, token_ids))

    def put(
        self,
        chunk: str,
        predecessors: Sequence[str],
        token_ids: Sequence[int],
        layers: Sequence[LayerKV],
        positions: Sequence[int],
        repaired_tokens: int,
    ) -> bool:
        """Stores a repaired variant; False when no tier would take it."""
        key = self.key(predecessors, token_ids)
        if self.store.contains(key):
            return True
        record = self._deviations.get(chunk) or ChunkDeviation()
        saved = self.store.cost_model.seconds(repaired_tokens, int(positions[0]))
        entry = ChunkEntry(
            key,
            [int(t) for t in token_ids],
            [int(p) for p in positions],
            [(k.contiguous(), v.contiguous()) for k, v in layers],
            [self.root_key, VARIANT_MARK, *predecessors],
            self.context,
        )
        return self.store.put(entry, saved * record.expected_reuse)
