"""Deletion that deletes: after a document or corpus is deleted, no tier holds bytes
from which its text can be recovered, unless another live document of the tenant
shares the chunk; killed work leaves no orphan KV after the next start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.chunkstore.purge import stored_chunks
from ragcache.service import RagCache
from tests.chunkstore.test_purge import encodings
from tests.service_helpers import minilm, tiny_config, tiny_loaded

MARKER = "Zorbliquant-Vexhammer-55821"
SECRET = (
    f"CONFIDENTIAL: the vault under the old mill opens with the phrase {MARKER}. "
    "Only the night warden may speak it, and only after the river bell has rung twice. "
    "The warden keeps a second copy of the phrase sewn into the lining of a grey coat."
)
PUBLIC = (
    "The mill on the river has ground wheat for the village since the flood year. "
    "Its wheel was rebuilt in oak after the ice broke the old one, and the miller's "
    "daughter keeps the ledgers of every sack that passes the gate."
)
QUESTION = "How does the vault under the old mill open?"


def upload(doc_id: str, text: str) -> tuple[bytes, str]:
    return json.dumps({"id": doc_id, "text": text}).encode(), f"{doc_id}.json"


def open_service(data_dir: Path) -> RagCache:
    return RagCache(config=tiny_config(data_dir), loaded=tiny_loaded(), embedder=minilm())


def chunk_token_lists(rag: RagCache, corpus: str, doc_id: str) -> list[list[int]]:
    record = rag.corpora.document(corpus, doc_id)
    assert record is not None
    return [c.token_ids for c in rag.corpora.chunks(corpus, record.chunk_ids) if c is not None]


def cached_lists(rag: RagCache) -> list[tuple[int, ...]]:
    return [chunk.token_ids for chunk in stored_chunks(rag.store)]


def holds(cached: list[tuple[int, ...]], token_ids: list[int]) -> bool:
    wanted = tuple(token_ids)
    return any(ids[: len(wanted)] == wanted for ids in cached)


def disk_files(rag: RagCache) -> list[Path]:
    return [rag.data_dir / "chunks" / "data.mdb", rag.data_dir / "corpora.lmdb" / "data.mdb"]


def recoverable(rag: RagCache, token_lists: list[list[int]]) -> list[str]:
    """Where the text or the token ids of ``token_lists`` can still be found."""
    found = []
    cached = cached_lists(rag)
    for token_ids in token_lists:
        if holds(cached, token_ids):
            found.append(f"a tier holds an entry of tokens {token_ids[:4]}...")
    for path in disk_files(rag):
        data = path.read_bytes()
        if MARKER.encode() in data:
            found.append(f"{path.name} holds the marker text")
        for token_ids in token_lists:
            if any(form in data for form in encodings(token_ids)):
                found.append(f"{path.parent.name}/{path.name} holds tokens {token_ids[:4]}...")
    return found


@pytest.fixture
def rag(tmp_path: Path):
    with open_service(tmp_path / "data") as service:
        service.create_corpus("docs")
        service.create_corpus("mirror")
        service.ingest([upload("secret", SECRET), upload("public", PUBLIC)], "docs")
        service.ingest([upload("public", PUBLIC)], "mirror")
        assert service.query(QUESTION, "docs", k=2).sources
        yield service


def test_deleting_a_document_leaves_nothing_of_its_text(rag: RagCache) -> None:
    secret = chunk_token_lists(rag, "docs", "secret")
    public = chunk_token_lists(rag, "docs", "public")
    assert all(holds(cached_lists(rag), ids) for ids in secret + public)
    assert recoverable(rag, secret)

    rag.delete_document("docs", "secret")

    assert recoverable(rag, secret) == []
    assert all(holds(cached_lists(rag), ids) for ids in public)
    assert rag.corpora.pending() == []
    answer = rag.query(QUESTION, "docs", k=2)
    assert {s.doc_id for s in answer.sources} == {"public"}


def test_deleting_a_corpus_keeps_chunks_another_corpus_shares(rag: RagCache) -> None:
    secret = chunk_token_lists(rag, "docs", "secret")
    public = chunk_token_lists(rag, "mirror", "public")

    rag.delete_corpus("docs")

    assert recoverable(rag, secret) == []
    assert all(holds(cached_lists(rag), ids) for ids in public)
    rag.delete_corpus("mirror")
    assert cached_lists(rag) == []


def test_another_tenants_copy_stays(rag: RagCache) -> None:
    tenant = rag.for_tenant("bob")
    tenant.create_corpus("docs")
    tenant.ingest([upload("secret", SECRET)], "docs")
    before = len(cached_lists(rag))
    rag.delete_document("docs", "secret")
    assert tenant.query(QUESTION, "docs", k=1).cache.computed_tokens == 0
    assert len(cached_lists(rag)) < before


@pytest.mark.cluster
def test_the_remote_tier_forgets_a_deleted_document_too(tmp_path: Path) -> None:
    from ragcache.cluster.redis_server import LocalRedis

    with LocalRedis() as server:
        config = tiny_config(tmp_path / "data")
        config.chunkstore.remote_url = server.url
        with RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag:
            rag.create_corpus("docs")
            rag.ingest([upload("secret", SECRET), upload("public", PUBLIC)], "docs")
            remote = rag.store.tiers[-1]
            assert remote.name == "remote" and remote.keys()
            secret = chunk_token_lists(rag, "docs", "secret")

            rag.delete_document("docs", "secret")

            assert recoverable(rag, secret) == []
            client = remote.client  # type: ignore[attr-defined]
            values = [client.dump(key) or b"" for key in client.keys("*")]
            for token_ids in secret:
                assert not any(form in value for value in values for form in encodings(token_ids))
            assert len(remote.keys()) == len(chunk_token_lists(rag, "docs", "public"))
