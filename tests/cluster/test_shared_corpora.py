"""Two services keeping their corpora as copies of one corpus log in a real redis-server:
an upload through either is searched by both within the follower's bound, deletes too,
and applying is atomic and idempotent."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ragcache.cluster.corpus_log import CorpusLog, open_corpus_log
from ragcache.cluster.redis_server import LocalRedis
from ragcache.cluster.shared_corpora import SharedCorpusStore, share_corpora
from ragcache.errors import ConflictError, NotFoundError
from ragcache.service.rag_cache import RagCache
from tests.service_helpers import SAMPLES, tiny_config

pytest.importorskip("redis")

pytestmark = pytest.mark.cluster

FOLLOW_S = 0.5
# The bound the docs state: the follower's wait plus the time to apply a small change.
VISIBLE_WITHIN_S = 10.0


def eventually(check: Callable[[], bool], within_s: float = VISIBLE_WITHIN_S) -> float:
    """Seconds until ``check`` holds; fails past ``within_s``."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < within_s, "not visible within the documented bound"
        time.sleep(0.05)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


def open_log(redis_server: LocalRedis, namespace: str) -> CorpusLog:
    return open_corpus_log(redis_server.url, namespace, 384, FOLLOW_S)


def replica(root: Path, name: str, redis_server: LocalRedis, namespace: str) -> RagCache:
    rag = RagCache(config=tiny_config(root / name))
    share_corpora(rag, open_log(redis_server, namespace), FOLLOW_S)
    return rag


@pytest.fixture
def pair(tmp_path: Path, redis_server: LocalRedis) -> Iterator[tuple[RagCache, RagCache]]:
    namespace = f"corpora-{uuid.uuid4().hex[:8]}"
    first = replica(tmp_path, "a", redis_server, namespace)
    second = replica(tmp_path, "b", redis_server, namespace)
    yield first, second
    first.close()
    second.close()


def corpus_names(rag: RagCache) -> set[str]:
    return {info.name for info in rag.list_corpora()}


def test_an_upload_through_one_replica_is_searched_on_the_other(
    pair: tuple[RagCache, RagCache],
) -> None:
    first, second = pair
    first.ingest([str(SAMPLES)], "docs", create=True)
    eventually(lambda: "docs" in corpus_names(second))
    wanted = first.get_corpus("docs")
    eventually(lambda: second.get_corpus("docs").num_chunks == wanted.num_chunks)
    assert second.get_corpus("docs").num_documents == wanted.num_documents
    question = "four score and seven years ago"
    assert [c.text for c in second.retrieve(question, "docs", 2)] == [
        c.text for c in first.retrieve(question, "docs", 2)
    ]


def test_deletes_are_seen_by_both(pair: tuple[RagCache, RagCache]) -> None:
    first, second = pair
    first.ingest([str(SAMPLES)], "docs", create=True)
    total = first.get_corpus("docs").num_documents
    eventually(lambda: "docs" in corpus_names(second))
    eventually(lambda: second.get_corpus("docs").num_documents == total)
    doc_id = second.tenant_corpora.documents("docs")[0].doc_id
    second.delete_document("docs", doc_id)
    eventually(lambda: first.get_corpus("docs").num_documents == total - 1)
    assert all(c.doc_id != doc_id for c in first.retrieve("the", "docs", 20))
    first.delete_corpus("docs")
    eventually(lambda: "docs" not in corpus_names(second))
    with pytest.raises(NotFoundError):
        second.retrieve("the", "docs", 1)


def test_ingestion_is_idempotent_across_replicas_and_restarts(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    namespace = f"corpora-{uuid.uuid4().hex[:8]}"
    first = replica(tmp_path, "a", redis_server, namespace)
    second = replica(tmp_path, "b", redis_server, namespace)
    try:
        first.ingest([str(SAMPLES)], "docs", create=True)
        counts = first.get_corpus("docs")
        eventually(lambda: "docs" in corpus_names(second))
        again = second.ingest([str(SAMPLES)], "docs")
        assert again.added == [] and again.chunks_added == 0
        with pytest.raises(ConflictError):
            second.create_corpus("docs")
        log_length = first.corpora.log.client.xlen(first.corpora.log.log_key)
        assert isinstance(first.corpora, SharedCorpusStore)
        applied_position = first.corpora.position
    finally:
        first.close()
        second.close()
    reopened = replica(tmp_path, "a", redis_server, namespace)
    try:
        assert isinstance(reopened.corpora, SharedCorpusStore)
        assert reopened.corpora.position == applied_position
        assert reopened.corpora.applied_entries == 0  # nothing new to replay
        assert reopened.get_corpus("docs").num_chunks == counts.num_chunks
        assert reopened.corpora.log.client.xlen(reopened.corpora.log.log_key) == log_length
    finally:
        reopened.close()
    fresh = replica(tmp_path, "c", redis_server, namespace)  # a new replica replays it all
    try:
        assert fresh.get_corpus("docs").num_documents == counts.num_documents
        assert fresh.get_corpus("docs").num_chunks == counts.num_chunks
    finally:
        fresh.close()


def test_a_corrupt_log_entry_stops_the_copy_instead_of_drifting(
    pair: tuple[RagCache, RagCache],
) -> None:
    first, second = pair
    first.create_corpus("docs")
    eventually(lambda: "docs" in corpus_names(second))
    log = first.corpora.log
    log.client.xadd(log.log_key, {"op": "create", "corpus": "bad", "body": "", "sum": "0"})
    log.append_create("later", "")
    assert isinstance(second.corpora, SharedCorpusStore)
    eventually(lambda: second.corpora.corrupt_entries > 0)
    assert "bad" not in corpus_names(second) and "later" not in corpus_names(second)
