"""Retrieval over one corpus: embed texts under int64 chunk ids, return the best ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.embedder import Embedder
from ragcache.retriever.index import VectorIndex


class Hit(NamedTuple):
    chunk_id: int
    score: float


class Retriever:
    """Chunk texts live elsewhere; this class only maps chunk ids to vectors and back."""

    def __init__(
        self,
        embedder: Embedder,
        index: VectorIndex | None = None,
        config: RetrieverConfig | None = None,
    ) -> None:
        self.config = config or RetrieverConfig()
        self.embedder = embedder
        if index is None:
            index = VectorIndex.from_config(embedder.dim, self.config)
        self.index = index
        if self.index.dim != embedder.dim:
            raise ValueError(
                f"index vectors have dim {self.index.dim} but the embedder makes {embedder.dim}; "
                f"rebuild the corpus index with this embedder"
            )

    @classmethod
    def load(
        cls, directory: str | Path, embedder: Embedder, config: RetrieverConfig | None = None
    ) -> Retriever:
        config = config or RetrieverConfig()
        return cls(embedder, VectorIndex.load(directory, config), config)

    def save(self, directory: str | Path) -> None:
        self.index.save(directory)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, chunk_ids: Sequence[int], texts: Sequence[str]) -> None:
        if len(chunk_ids) != len(texts):
            raise ValueError(f"{len(chunk_ids)} chunk ids for {len(texts)} texts")
        if not texts:
            return
        vectors = self.embedder.embed(list(texts), batch_size=self.config.embed_batch_size)
        self.index.add(chunk_ids, vectors)

    def remove(self, chunk_ids: Sequence[int]) -> int:
        return self.index.remove(chunk_ids)

    def retrieve(self, query: str, k: int | None = None) -> list[Hit]:
        return self.retrieve_batch([query], k)[0]

    def retrieve_batch(self, queries: Sequence[str], k: int | None = None) -> list[list[Hit]]:
        """Best-first hits per query; fewer than k when the corpus is smaller."""
        k = k or self.config.top_k
        if not queries:
            return []
        vectors = self.embedder.embed(list(queries), batch_size=self.config.embed_batch_size)
        ids, scores = self.index.search(vectors, k)
        return [
            [Hit(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]
