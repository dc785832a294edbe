from __future__ import annotations

import pytest

from ragcache.retriever.chunker import Chunker
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.documents import parse_path
from ragcache.retriever.index import VectorIndex
from ragcache.retriever.retriever import Hit, Retriever
from tests.retriever.conftest import SAMPLES

QUERIES = {
    "Four score and seven years ago our fathers brought forth a new nation": (
        "gettysburg_address.md"
    ),
    "a single man in possession of a good fortune must be in want of a wife": (
        "pride_and_prejudice_chapter1.html"
    ),
    "We hold these truths to be self-evident, that all men are created equal": (
        "declaration_of_independence.txt"
    ),
    "it was the best of times, it was the worst of times": "tale_of_two_cities_opening.txt",
}


@pytest.fixture(scope="module")
def sample_chunks(byte_bpe):
    chunker = Chunker(byte_bpe, chunk_tokens=160)
    documents = [doc for path in sorted(SAMPLES.iterdir()) for doc in parse_path(path)]
    return [chunk for document in documents for chunk in chunker.chunk(document)]


@pytest.fixture(scope="module")
def sample_retriever(minilm, sample_chunks):
    retriever = Retriever(minilm)
    retriever.add([chunk.vector_id for chunk in sample_chunks], [c.text for c in sample_chunks])
    return retriever


def filenames_of(hits: list[Hit], chunks) -> list[str]:
    by_id = {chunk.vector_id: chunk for chunk in chunks}
    return [by_id[hit.chunk_id].metadata["filename"] for hit in hits]


def test_retrieve_ranks_the_right_document_first(sample_retriever, sample_chunks):
    assert len(sample_retriever) == len(sample_chunks)
    for query, filename in QUERIES.items():
        hits = sample_retriever.retrieve(query, k=3)
        assert len(hits) == 3
        assert filenames_of(hits, sample_chunks)[0] == filename
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        chunk_id, score = hits[0]
        assert chunk_id == hits[0].chunk_id and isinstance(score, float)


def test_removed_chunks_are_no_longer_retrieved(minilm, sample_retriever, sample_chunks):
    ids, vectors = sample_retriever.index.vectors()
    index = VectorIndex(minilm.dim)
    index.add(ids, vectors)
    retriever = Retriever(minilm, index, RetrieverConfig(top_k=100))
    gettysburg = [c.vector_id for c in sample_chunks if c.metadata["type"] == "md"]
    assert retriever.remove(gettysburg) == len(gettysburg)
    hits = retriever.retrieve("Four score and seven years ago")
    assert len(hits) == len(sample_chunks) - len(gettysburg)
    assert "gettysburg_address.md" not in filenames_of(hits, sample_chunks)


def test_save_and_load_serve_the_same_hits(minilm, sample_retriever, tmp_path):
    queries = list(QUERIES)
    before = sample_retriever.retrieve_batch(queries, k=4)
    sample_retriever.save(tmp_path / "corpus")
    loaded = Retriever.load(tmp_path / "corpus", minilm)
    after = loaded.retrieve_batch(queries, k=4)
    assert [[h.chunk_id for h in row] for row in before] == [
        [h.chunk_id for h in row] for row in after
    ]
    assert loaded.retrieve_batch([]) == []


def test_add_validates_its_arguments_and_index_dim(minilm):
    retriever = Retriever(minilm)
    with pytest.raises(ValueError, match="2 chunk ids for 1 texts"):
        retriever.add([1, 2], ["only one"])
    retriever.add([], [])
    assert retriever.retrieve("anything") == []
    with pytest.raises(ValueError, match="dim 16 but the embedder makes 384"):
        Retriever(minilm, VectorIndex(16))
