from __future__ import annotations

import os

import numpy as np
import pytest

from ragcache.retriever import index as index_module
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.index import FLAT, HNSW, META_FILE, VectorIndex

DIM = 32


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top1(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return ids[np.argmax(queries @ vectors.T, axis=1)]


def filled(count: int, hnsw_threshold: int, **kwargs) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    index = VectorIndex(DIM, hnsw_threshold=hnsw_threshold, **kwargs)
    ids = np.arange(1000, 1000 + count, dtype=np.int64)
    vectors = unit_vectors(count)
    index.add(ids, vectors)
    return index, ids, vectors


@pytest.mark.parametrize(("threshold", "kind"), [(10_000, FLAT), (100, HNSW)])
def test_search_finds_the_nearest_neighbour(threshold, kind):
    index, ids, vectors = filled(400, threshold)
    assert index.kind == kind and len(index) == 400
    found, scores = index.search(vectors, 5)
    assert (found[:, 0] == ids).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    queries = unit_vectors(50, seed=1)
    found, _ = index.search(queries, 1)
    assert (found[:, 0] == exact_top1(vectors, ids, queries)).mean() >= 0.95


def test_crossing_the_threshold_switches_to_hnsw_and_keeps_every_vector():
    index = VectorIndex(DIM, hnsw_threshold=150)
    vectors = unit_vectors(300)
    index.add(range(150), vectors[:150])
    assert index.kind == FLAT
    index.add(range(150, 300), vectors[150:])
    assert index.kind == HNSW and len(index) == 300
    found, _ = index.search(vectors, 1)
    assert (found[:, 0] == np.arange(300)).all()


def test_flat_remove_deletes_ids():
    index, ids, vectors = filled(100, 10_000)
    removed = ids[::2]
    assert index.remove(removed) == 50
    assert index.remove(removed) == 0
    assert len(index) == 50 and removed[0] not in index and ids[1] in index
    found, _ = index.search(vectors, 10)
    assert not np.isin(found, removed).any()
    assert (found[1::2, 0] == ids[1::2]).all()


def test_hnsw_remove_filters_tombstones_then_compacts():
    index, ids, vectors = filled(300, 100, compact_ratio=0.2)
    index.remove(ids[:30])
    assert index.num_tombstones == 30 and len(index) == 270
    found, _ = index.search(vectors, 10)
    assert not np.isin(found, ids[:30]).any()
    assert (found[30:, 0] == ids[30:]).all()
    index.remove(ids[30:70])
    assert index.num_tombstones == 0 and len(index) == 230
    live_ids, _ = index.vectors()
    assert sorted(live_ids.tolist()) == ids[70:].tolist()
    found, _ = index.search(vectors[70:], 1)
    assert (found[:, 0] == ids[70:]).all()


def test_a_removed_hnsw_id_can_be_added_again_with_a_new_vector():
    index, ids, vectors = filled(300, 100)
    index.remove([ids[0]])
    index.add([ids[0]], vectors[1:2])
    found, _ = index.search(vectors[1:2], 2)
    assert set(found[0].tolist()) == {ids[0], ids[1]}
    _, scores = index.search(vectors[:1], 1)
    assert scores[0, 0] < 0.99  # the old vector of ids[0] is gone


def test_invalid_adds_and_searches_are_rejected():
    index, ids, vectors = filled(10, 10_000)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(ids[:1], vectors[:1])
    with pytest.raises(ValueError, match="non-negative"):
        index.add([-5], vectors[:1])
    with pytest.raises(ValueError, match="repeat"):
        index.add([1, 1], vectors[:2])
    with pytest.raises(ValueError, match=r"shape \[n, 32\]"):
        index.add([1], np.ones((1, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="ids for"):
        index.add([1, 2], vectors[:1])
    with pytest.raises(ValueError, match="k must be"):
        index.search(vectors[:1], 0)


def test_short_results_are_padded():
    index, _, vectors = filled(3, 10_000)
    found, scores = index.search(vectors[0], 5)
    assert found.shape == (1, 5)
    assert (found[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    empty = VectorIndex(DIM)
    found, scores = empty.search(vectors[:2], 4)
    assert (found == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("threshold", [10_000, 100])
def test_save_and_load_round_trip(tmp_path, threshold):
    index, ids, vectors = filled(300, threshold)
    index.remove(ids[:10])
    before = index.search(vectors, 5)
    index.save(tmp_path / "corpus")
    loaded = VectorIndex.load(tmp_path / "corpus", RetrieverConfig(hnsw_threshold=threshold))
    assert (loaded.kind, len(loaded), loaded.dim) == (index.kind, 290, DIM)
    assert loaded.num_tombstones == index.num_tombstones
    after = loaded.search(vectors, 5)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], atol=1e-6)
    loaded.add([5], vectors[:1])
    assert 5 in loaded


def test_saving_again_replaces_the_old_file(tmp_path):
    index, ids, _ = filled(20, 10_000)
    index.save(tmp_path)
    index.remove(ids[:5])
    index.save(tmp_path)
    assert len([path for path in tmp_path.iterdir() if path.suffix == ".faiss"]) == 1
    assert len(VectorIndex.load(tmp_path)) == 15


def test_a_failed_save_leaves_the_previous_index(tmp_path, monkeypatch):
    index, ids, vectors = filled(20, 10_000)
    index.save(tmp_path)
    saved_files = sorted(path.name for path in tmp_path.iterdir())
    index.remove(ids[:10])
    real_replace = os.replace

    def replace_failing_at_commit(source, target):
        if os.fspath(target).endswith(META_FILE):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(index_module.os, "replace", replace_failing_at_commit)
    with pytest.raises(OSError, match="No space left"):
        index.save(tmp_path)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == saved_files
    loaded = VectorIndex.load(tmp_path)
    assert len(loaded) == 20
    found, _ = loaded.search(vectors[:10], 1)
    assert (found[:, 0] == ids[:10]).all()


def test_loading_a_directory_without_an_index_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vector index"):
        VectorIndex.load(tmp_path)
