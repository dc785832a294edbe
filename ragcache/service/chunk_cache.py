"""Chunk KV between the fusion code (ChunkKV) and the tiered store (ChunkEntry).

Every chunk is cached as a child of the knowledge tree's root: its KV computed right
after the system prompt, reusable at any offset through fusion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.chunkstore.codecs import get_codec
from ragcache.chunkstore.entry import ChunkEntry
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.store import ChunkStore
from ragcache.chunkstore.tree import KnowledgeTree


def chunk_kv_from_entry(entry: ChunkEntry) -> ChunkKV:
    """The entry's KV; exact only where its namespace's codec keeps every bit (a copy in
    memory may have been promoted from a lossy disk record)."""
    return ChunkKV(
        list(entry.token_ids),
        [k for k, _ in entry.layers],
        [v for _, v in entry.layers],
        torch.tensor(entry.positions, dtype=torch.long),
        entry.context is not None and get_codec(entry.context.codec).stores_raw_bytes,
    )


@dataclass(slots=True)
class CachedChunk:
    kv: ChunkKV | None
    tier: str | None


class ChunkCache:
    def __init__(self, store: ChunkStore, context: KeyContext, root_ids: Sequence[int]) -> None:
        self.store = store
        self.tree = KnowledgeTree.rebuild(store, context, root_ids)

    def key(self, token_ids: Sequence[int]) -> str:
        return self.tree.key_for(self.tree.root, token_ids)

    def contains(self, token_ids: Sequence[int]) -> bool:
        return self.store.contains(self.key(token_ids))

    def fetch(self, token_ids: Sequence[int]) -> CachedChunk:
        """The chunk's KV from the fastest tier holding it, with that tier's name."""
        key = self.key(token_ids)
        tier = self.store.tier_of(key)
        entry = self.store.get(key, token_ids)
        if entry is None:
            return CachedChunk(None, None)
        return CachedChunk(chunk_kv_from_entry(entry), tier)

    def put(self, kv: ChunkKV) -> bool:
        layers = list(zip(kv.k, kv.v, strict=True))
        node = self.tree.insert([kv.token_ids], layers, kv.positions.tolist())
        return node is not None

    def stats(self) -> dict[str, object]:
        return {**self.store.stats(), "tree_nodes": len(self.tree)}

    def clear(self) -> None:
        self.store.clear()

    def close(self) -> None:
        self.tree.close()
        self.store.close()
