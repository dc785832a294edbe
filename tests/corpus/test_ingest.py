"""Ingestion against a real corpus store (LMDB and faiss on disk): the write lock covers
only the commit, and repeated chunks are embedded once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ragcache.config import Config
from ragcache.corpus.ingest import Ingestor, IngestResult
from ragcache.corpus.jobs import JobRunner
from ragcache.corpus.store import CorpusStore
from ragcache.errors import NotFoundError
from ragcache.retriever.chunker import Chunker
from ragcache.retriever.documents import Document
from ragcache.service.corpora import IngestTotals, TenantCorpora

DIM = 16
WAIT_S = 30


class WordTokenizer:
    """One id per whitespace-separated word, stable across calls."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocabulary.setdefault(word, len(self.vocabulary)) for word in text.split()]


class GatedEmbedder:
    """Unit vectors from a hash of the text. ``gate`` holds calls from threads other
    than the test's own until it is set, so a test can keep a background ingest inside
    its embedding stage while it works."""

    dim = DIM

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if threading.current_thread() is not threading.main_thread():
            self.entered.set()
            assert self.gate.wait(WAIT_S), "the test never released the embedder"
        self.texts.extend(texts)
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            row = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)


class Setup:
    def __init__(self, directory: Path) -> None:
        self.store = CorpusStore(directory, DIM)
        self.embedder = GatedEmbedder()
        self.kv_batches: list[list[list[int]]] = []
        chunker = Chunker(WordTokenizer(), chunk_tokens=12)
        self.ingestor = Ingestor(self.store, chunker, self.embedder, self._kv, [0])
        self.corpora = TenantCorpora(
            self.store,
            "",
            self.ingestor,
            JobRunner(),
            self.embedder,
            Config(),
            IngestTotals(),
        )

    def _kv(self, chunks: list[list[int]], progress: object) -> int:
        self.kv_batches.append(chunks)
        return len(chunks)

    def ingest_in_background(self, corpus: str, documents: list[Document]) -> _Background:
        self.embedder.gate.clear()
        self.embedder.entered.clear()
        background = _Background(lambda: self.ingestor.ingest(corpus, documents))
        assert self.embedder.entered.wait(WAIT_S), "the ingest never reached its embedding"
        return background


class _Background:
    def __init__(self, work) -> None:
        self.result: IngestResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    def _run(self, work) -> None:
        try:
            self.result = work()
        except BaseException as error:  # handed to the test thread
            self.error = error

    def join(self) -> IngestResult:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the ingest did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _finishes(action) -> None:
    """Runs ``action`` in a thread and fails if it is still waiting after WAIT_S."""
    done = _Background(action)
    done.thread.join(WAIT_S)
    assert not done.thread.is_alive(), "the action waited on the running ingest"
    if done.error is not None:
        raise done.error


def _text(topic: str, sentences: int = 6) -> str:
    return " ".join(f"{topic} sentence number {n} says something new." for n in range(sentences))


@pytest.fixture
def setup(tmp_path: Path):
    made = Setup(tmp_path / "data")
    yield made
    made.embedder.gate.set()
    made.corpora.jobs.shutdown()
    made.store.close()


def test_create_corpus_and_delete_document_complete_while_an_ingest_embeds(setup: Setup):
    setup.corpora.create("other")
    setup.ingestor.ingest("other", [Document("kept", _text("kept")), Document("gone", _text("x"))])
    setup.corpora.create("big")
    ingest = setup.ingest_in_background("big", [Document("long", _text("long", 40))])

    _finishes(lambda: setup.corpora.create("new"))
    _finishes(lambda: setup.corpora.delete_document("other", "gone"))
    _finishes(lambda: setup.corpora.delete("new"))
    assert ingest.thread.is_alive() and not setup.embedder.gate.is_set()
    assert [d.doc_id for d in setup.corpora.documents("other")] == ["kept"]

    setup.embedder.gate.set()
    result = ingest.join()
    assert result.added == ["long"] and result.chunks_added > 1
    assert setup.store.get("big").num_chunks == result.chunks_added
    assert len(setup.store.index("big")) == result.chunks_added


def test_a_change_committed_during_an_ingest_is_kept(setup: Setup):
    setup.corpora.create("docs")
    setup.ingestor.ingest("docs", [Document("old", _text("old"))])
    old_ids = setup.store.document("docs", "old").chunk_ids
    ingest = setup.ingest_in_background("docs", [Document("new", _text("new"))])
    setup.corpora.delete_document("docs", "old")
    setup.embedder.gate.set()
    result = ingest.join()

    assert result.added == ["new"]
    assert [d.doc_id for d in setup.store.documents("docs")] == ["new"]
    info = setup.store.get("docs")
    new_ids = setup.store.document("docs", "new").chunk_ids
    assert (info.num_documents, info.num_chunks) == (1, len(new_ids))
    index = setup.store.index("docs")
    assert len(index) == len(new_ids)
    assert all(i in index for i in new_ids) and not any(i in index for i in old_ids)


def test_content_added_by_another_ingest_meanwhile_is_skipped(setup: Setup):
    setup.corpora.create("docs")
    text = _text("same")
    slow = setup.ingest_in_background("docs", [Document("first", text)])
    quick = setup.ingestor.ingest("docs", [Document("second", text)])
    assert quick.added == ["second"]
    setup.embedder.gate.set()
    result = slow.join()
    assert result.added == [] and result.skipped == ["first"] and result.chunks_added == 0
    assert [d.doc_id for d in setup.store.documents("docs")] == ["second"]


def test_repeated_chunks_are_embedded_once(setup: Setup):
    setup.corpora.create("docs")
    paragraph = "the same words fill one chunk of this corpus every time."
    repeated = "\n\n".join([paragraph] * 300)
    other = paragraph + "\n\n" + _text("other", 3)
    result = setup.ingestor.ingest(
        "docs", [Document("repeated", repeated), Document("other", other)]
    )

    assert sorted(result.added) == ["other", "repeated"]
    assert setup.embedder.texts.count(paragraph) == 1
    assert len(setup.embedder.texts) == len(set(setup.embedder.texts))
    assert len(setup.store.document("docs", "repeated").chunk_ids) == 1
    other_chunks = setup.store.document("docs", "other").chunk_ids
    assert len(other_chunks) > 1 and result.chunks_added == 1 + len(other_chunks)
    assert len(setup.store.index("docs")) == result.chunks_added
    (kv_ids,) = setup.kv_batches
    assert len(kv_ids) == len({tuple(ids) for ids in kv_ids}) == result.chunks_added - 1


def test_a_corpus_deleted_during_an_ingest_fails_it_without_naming_others(setup: Setup):
    setup.corpora.create("doomed")
    setup.corpora.create("someone-elses")
    ingest = setup.ingest_in_background("doomed", [Document("d", _text("d"))])
    _finishes(lambda: setup.corpora.delete("doomed"))
    setup.embedder.gate.set()
    with pytest.raises(NotFoundError, match="deleted while this ingest ran") as failure:
        ingest.join()
    assert "someone-elses" not in str(failure.value)
    assert [c.name for c in setup.store.list()] == ["someone-elses"]
