"""Chunk KV between the fusion code (ChunkKV) and the tiered store (ChunkEntry).

Every chunk is cached as a child of the knowledge tree's root: its KV computed right
after the system prompt, reusable at any offset through fusion. A chunk computed after
other chunks is cached deeper, on the exact path of the chunks before it: a query whose
chunks start with that path reuses it with no repair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.chunkstore.codecs import get_codec
from ragcache.chunkstore.entry import ChunkEntry
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.store import ChunkStore, LayerRead
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.chunkstore.tree import KnowledgeTree
from ragcache.chunkstore.variants import VariantBook


def chunk_kv_from_entry(entry: ChunkEntry, target: EngineTarget, lossless: bool = True) -> ChunkKV:
    """The entry's KV on the engine's device and dtype; exact only where every codec its
    copies may have gone through keeps every bit (a copy in memory may have been
    promoted from a lossy record)."""
    layers = [target.move_layer(kv) for kv in entry.layers]
    return ChunkKV(
        list(entry.token_ids),
        [k for k, _ in layers],
        [v for _, v in layers],
        torch.tensor(entry.positions, dtype=torch.long),
        lossless and entry.context is not None and get_codec(entry.context.codec).stores_raw_bytes,
    )


def store_is_lossless(store: ChunkStore) -> bool:
    """Whether no tier of ``store`` changes the KV it keeps (the remote tier's codec may
    differ from the disk codec that chunk keys name)."""
    config = store.config
    return not config.remote_url or get_codec(config.remote_codec).stores_raw_bytes


@dataclass(slots=True)
class CachedChunk:
    kv: ChunkKV | None
    tier: str | None


class ChunkCache:
    def __init__(self, store: ChunkStore, context: KeyContext, root_ids: Sequence[int]) -> None:
        self.store = store
        self.lossless = store_is_lossless(store)
        self.tree = KnowledgeTree.rebuild(store, context, root_ids)
        self.variants = VariantBook(store, context, self.tree.root.key)

    @property
    def keeps_exact_kv(self) -> bool:
        """Whether every copy this cache hands back has every bit the encoder computed."""
        return self.lossless and get_codec(self.tree.context.codec).stores_raw_bytes

    def key(self, token_ids: Sequence[int]) -> str:
        return self.tree.key_for(self.tree.root, token_ids)

    def contains(self, token_ids: Sequence[int]) -> bool:
        return self.store.contains(self.key(token_ids))

    def fetch(self, token_ids: Sequence[int], target: EngineTarget) -> CachedChunk:
        """The chunk's KV from the fastest tier holding it, on ``target``, with that
        tier's name."""
        key = self.key(token_ids)
        tier = self.store.tier_of(key)
        entry = self.store.get(key, token_ids)
        if entry is None:
            return CachedChunk(None, None)
        return CachedChunk(chunk_kv_from_entry(entry, target, self.lossless), tier)

    def read_layers(self, token_ids: Sequence[int]) -> LayerRead | None:
        """The chunk's KV as a stream of layers from the fastest tier holding it (each
        layer still in the tier's form: pass it through an EngineTarget)."""
        return self.store.read_layers(self.key(token_ids), token_ids)

    def is_exact(self, read: LayerRead) -> bool:
        """Whether a read's KV keeps every bit (see ``chunk_kv_from_entry``)."""
        context = read.context
        return self.lossless and context is not None and get_codec(context.codec).stores_raw_bytes

    def match_path(
        self, chunks: Sequence[Sequence[int]], target: EngineTarget, min_length: int = 1
    ) -> list[tuple[ChunkKV, str]]:
        """KV (on ``target``) and tier of the longest exact path of ``chunks``, in prompt
        order; empty
        when it is shorter than ``min_length`` (nothing is read then), and where the
        namespace's codec is lossy, since such KV is never exact."""
        nodes = self.tree.match_path(chunks)
        if len(nodes) < min_length:
            return []
        found: list[tuple[ChunkKV, str]] = []
        for node in nodes:
            tier = self.store.tier_of(node.key)
            entry = self.store.get(node.key, node.token_ids)
            if entry is None:
                break
            kv = chunk_kv_from_entry(entry, target, self.lossless)
            if not kv.exact:
                break
            found.append((kv, tier or "?"))
        return found

    def put_path(self, chunks: Sequence[Sequence[int]], start: int, kvs: Sequence[ChunkKV]) -> int:
        """Stores the exact KV of ``chunks[start:]`` on their path (the chunks before
        ``start`` are on it already); returns how many entered before a tier refused."""
        for offset, kv in enumerate(kvs):
            layers = list(zip(kv.k, kv.v, strict=True))
            path = chunks[: start + offset + 1]
            if self.tree.insert(path, layers, kv.positions.tolist()) is None:
                return offset
        return len(kvs)

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
