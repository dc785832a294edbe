"""Inner-product vector index of one corpus, keyed by int64 ids, persisted atomically.

Small corpora use exact search (IndexFlatIP); above ``hnsw_threshold`` vectors the index
is rebuilt once as HNSW and stays HNSW. Flat indexes delete in place. HNSW graphs cannot
drop nodes, so a deleted id becomes a tombstone that faiss filters out during the graph
search itself; once tombstones pass ``compact_ratio`` of the stored vectors the graph is
rebuilt from its own stored vectors without them.

On disk a directory holds ``index.json`` and the faiss file it names. Both are written
to temporary names first; replacing ``index.json`` is the commit, so a save that fails
at any point leaves the previous index loadable.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from ragcache.retriever.config import RetrieverConfig

FLAT, HNSW = "flat", "hnsw"
META_FILE = "index.json"
_FORMAT = 1


class VectorIndex:
    def __init__(
        self,
        dim: int,
        hnsw_threshold: int = 50_000,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        compact_ratio: float = 0.2,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 < compact_ratio <= 1.0:
            raise ValueError(f"compact_ratio must be in (0, 1], got {compact_ratio}")
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.compact_ratio = compact_ratio
        self.kind = FLAT
        self._index = self._new_index(FLAT)
        self._ids: set[int] = set()
        self._tombstones: set[int] = set()
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, dim: int, config: RetrieverConfig) -> VectorIndex:
        return cls(
            dim,
            hnsw_threshold=config.hnsw_threshold,
            hnsw_m=config.hnsw_m,
            ef_construction=config.hnsw_ef_construction,
            ef_search=config.hnsw_ef_search,
            compact_ratio=config.hnsw_compact_ratio,
        )

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, vector_id: object) -> bool:
        return vector_id in self._ids

    @property
    def num_tombstones(self) -> int:
        return len(self._tombstones)

    def add(self, ids: Iterable[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Add unit-norm vectors under new ids; an id already present is an error."""
        id_array = _as_ids(ids)
        matrix = self._as_matrix(vectors)
        if len(id_array) != len(matrix):
            raise ValueError(f"{len(id_array)} ids for {len(matrix)} vectors")
        if len(id_array) and id_array.min() < 0:
            raise ValueError("ids must be non-negative (faiss reserves -1 for 'no result')")
        if len(set(id_array.tolist())) != len(id_array):
            raise ValueError("ids repeat within one add")
        with self._lock:
            present = self._ids.intersection(id_array.tolist())
            if present:
                shown = sorted(present)[:5]
                raise ValueError(f"{len(present)} ids are already in the index, e.g. {shown}")
            if self._tombstones.intersection(id_array.tolist()):
                self._rebuild(self.kind)  # a re-used id must not match its dead vector
            self._index.add_with_ids(matrix, id_array)
            self._ids.update(id_array.tolist())
            if self.kind == FLAT and len(self._ids) > self.hnsw_threshold:
                self._rebuild(HNSW)

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Delete ids; returns how many were present."""
        with self._lock:
            present = self._ids.intersection(_as_ids(ids).tolist())
            if not present:
                return 0
            self._ids.difference_update(present)
            if self.kind == FLAT:
                self._index.remove_ids(np.fromiter(present, dtype=np.int64, count=len(present)))
            else:
                self._tombstones.update(present)
                if len(self._tombstones) > self.compact_ratio * self._index.ntotal:
                    self._rebuild(HNSW)
            return len(present)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ids [q, k] (int64, -1 where fewer than k exist) and scores [q, k], best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        matrix = self._as_matrix(np.atleast_2d(queries))
        with self._lock:
            if not self._ids:
                ids = np.full((len(matrix), k), -1, dtype=np.int64)
                return ids, np.full((len(matrix), k), -np.inf, dtype=np.float32)
            scores, ids = self._index.search(matrix, k, params=self._search_params())
        scores = scores.astype(np.float32, copy=False)
        scores[ids < 0] = -np.inf
        return ids, scores

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Live ids and their stored vectors, in storage order."""
        with self._lock:
            ntotal = self._index.ntotal
            if ntotal == 0:
                return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
            stored = faiss.downcast_index(self._index.index).reconstruct_n(0, ntotal)
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            if not self._tombstones:
                return ids, stored
            dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            live = ~np.isin(ids, dead)
            return ids[live], stored[live]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index_path = directory / f"index-{uuid.uuid4().hex[:16]}.faiss"
        meta_path = directory / META_FILE
        index_temporary = _temporary(index_path)
        meta_temporary = _temporary(meta_path)
        committed = False
        try:
            with self._lock:
                faiss.write_index(self._index, str(index_temporary))
                meta = {
                    "format": _FORMAT,
                    "dim": self.dim,
                    "kind": self.kind,
                    "count": len(self._ids),
                    "metric": "inner_product",
                    "file": index_path.name,
                    "tombstones": sorted(self._tombstones),
                }
            _fsync_file(index_temporary)
            os.replace(index_temporary, index_path)
            meta_temporary.write_text(json.dumps(meta))
            _fsync_file(meta_temporary)
            os.replace(meta_temporary, meta_path)
            committed = True
        finally:
            if not committed:
                for path in (index_temporary, index_path, meta_temporary):
                    path.unlink(missing_ok=True)
        _fsync_directory(directory)
        for stale in directory.glob("index-*.faiss*"):
            if stale.name != index_path.name:
                stale.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | Path, config: RetrieverConfig | None = None) -> VectorIndex:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no vector index in '{directory}' ({META_FILE} missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path}: unknown index format {meta.get('format')!r}")
        index = cls.from_config(meta["dim"], config or RetrieverConfig())
        stored = faiss.read_index(str(directory / meta["file"]))
        tombstones = set(meta["tombstones"])
        if stored.d != meta["dim"] or stored.ntotal != meta["count"] + len(tombstones):
            raise ValueError(
                f"{directory / meta['file']} holds {stored.ntotal} vectors of dim {stored.d}, "
                f"but {META_FILE} says {meta['count']} (+{len(tombstones)} deleted) of dim "
                f"{meta['dim']}"
            )
        index._index = stored
        index.kind = meta["kind"]
        index._tombstones = tombstones
        index._ids = set(faiss.vector_to_array(stored.id_map).tolist()) - tombstones
        return index

    def _new_index(self, kind: str) -> faiss.IndexIDMap2:
        if kind == FLAT:
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.ef_construction
        graph.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(graph)

    def _rebuild(self, kind: str) -> None:
        ids, vectors = self.vectors()
        rebuilt = self._new_index(kind)
        if len(ids):
            rebuilt.add_with_ids(vectors, ids)
        self._index, self.kind, self._tombstones = rebuilt, kind, set()

    def _search_params(self) -> faiss.SearchParameters | None:
        if self.kind == FLAT:
            return None
        params = faiss.SearchParametersHNSW()
        params.efSearch = self.ef_search
        if self._tombstones:
            dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            batch = faiss.IDSelectorBatch(dead)
            params.sel = faiss.IDSelectorNot(batch)
            params._keep_alive = batch  # the selectors hold raw pointers to each other
        return params

    def _as_matrix(self, vectors: np.ndarray) -> np.ndarray:
        matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape [n, {self.dim}], got {matrix.shape}")
        return matrix


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    return np.ascontiguousarray(array.reshape(-1))


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
