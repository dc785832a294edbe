"""Corpus files that fail their checksums: a damaged vector index is rebuilt from the
document store; a damaged record refuses its corpus with a message naming the file
and the fix, and other corpora keep serving; a damaged or missing manifest stops the
service with a message, never a traceback or a silent new manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ragcache.cli import main
from ragcache.corpus.checksums import CorpusDamagedError
from ragcache.corpus.manifest import MANIFEST_FILE
from ragcache.corpus.store import CorpusStore
from ragcache.errors import DataDirError
from ragcache.service import RagCache
from tests.service_helpers import minilm, tiny_config, tiny_flags, tiny_loaded

pytestmark = pytest.mark.fault

MILL = (
    "The mill on the river has ground wheat for the village since the flood year. Its "
    "wheel was rebuilt in oak after the ice broke the old one, and the miller's daughter "
    "keeps the ledgers of every sack that passes the gate."
)
LIGHTHOUSE = (
    "The lighthouse keeper trims the wick at dusk and logs every ship that rounds the "
    "northern shoal. In the great storm the lamp burned for three nights while the "
    "keeper's son rowed the lifeboat out to the stranded schooner."
)
QUESTION = "Who rowed the lifeboat to the schooner?"


def upload(doc_id: str, text: str) -> tuple[bytes, str]:
    return json.dumps({"id": doc_id, "text": text}).encode(), f"{doc_id}.json"


def open_service(data: Path) -> RagCache:
    return RagCache(config=tiny_config(data), loaded=tiny_loaded(), embedder=minilm())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    with open_service(data) as rag:
        for corpus in ("coast", "inland"):
            rag.create_corpus(corpus)
        rag.ingest([upload("mill", MILL), upload("lighthouse", LIGHTHOUSE)], "coast")
        rag.ingest([upload("mill", MILL)], "inland")
    return data


def index_folder(data: Path, corpus: str) -> Path:
    (generation,) = list((data / "indexes" / corpus).iterdir())
    return generation


def retrieved(rag: RagCache, corpus: str) -> list[tuple[int, str]]:
    return [(s.chunk_id, s.doc_id) for s in rag.retrieve(QUESTION, corpus, k=3)]


def flip_a_vector_bit(folder: Path) -> None:
    (faiss_file,) = folder.glob("*.faiss")
    data = bytearray(faiss_file.read_bytes())
    data[-64] ^= 0x40
    faiss_file.write_bytes(bytes(data))


def truncate_the_faiss_file(folder: Path) -> None:
    (faiss_file,) = folder.glob("*.faiss")
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])


def garble_index_json(folder: Path) -> None:
    (folder / "index.json").write_text('{"format": 1, "dim": "garbage"')


@pytest.mark.parametrize(
    "damage",
    [flip_a_vector_bit, truncate_the_faiss_file, garble_index_json],
    ids=lambda f: f.__name__,
)
def test_a_damaged_index_is_rebuilt_from_the_document_store(
    data: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    with open_service(data) as rag:
        before = retrieved(rag, "coast")
    damage(index_folder(data, "coast"))
    with caplog.at_level(logging.WARNING), open_service(data) as rag:
        assert retrieved(rag, "coast") == before
        assert retrieved(rag, "inland")
        assert rag.get_corpus("coast").num_chunks == len(rag.corpora.index("coast"))
    assert any("rebuilt its index from its" in r.message for r in caplog.records)
    with open_service(data) as rag:  # the rebuilt index passes its own checks
        assert retrieved(rag, "coast") == before


def test_without_an_embedder_a_damaged_index_refuses_its_corpus(data: Path) -> None:
    folder = index_folder(data, "coast")
    flip_a_vector_bit(folder)
    store = CorpusStore(data, minilm().dim)
    try:
        with pytest.raises(CorpusDamagedError) as refused:
            store.index("coast")
        assert str(folder) in refused.value.message
        assert "fails its checksum" in refused.value.message
        assert "delete the corpus and ingest its documents again" in refused.value.message
        assert len(store.index("inland")) > 0
    finally:
        store.close()


def test_a_damaged_chunk_record_refuses_its_corpus_until_the_document_is_replaced(
    data: Path,
) -> None:
    records = data / "corpora.lmdb" / "data.mdb"
    raw = records.read_bytes()
    assert raw.count(b"schooner") >= 1
    records.write_bytes(raw.replace(b"schooner", b"schoomer"))
    with open_service(data) as rag:
        with pytest.raises(CorpusDamagedError) as refused:
            rag.retrieve(QUESTION, "coast", k=3)
        assert "corpora.lmdb" in refused.value.message and "chunk " in refused.value.message
        assert "delete the document that holds it and upload it again" in refused.value.message
        assert retrieved(rag, "inland")
        rag.delete_document("coast", "lighthouse")
        rag.ingest([upload("lighthouse", LIGHTHOUSE)], "coast")
        assert "lighthouse" in {doc for _, doc in retrieved(rag, "coast")}


def test_a_non_utf8_manifest_stops_with_a_message(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (data / MANIFEST_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataDirError, match="is not UTF-8 text"):
        open_service(data)
    flags = [part for k, v in tiny_flags(data).items() for part in (f"--{k}", str(v))]
    assert main(["cache", "stats", *flags]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err


def test_a_deleted_manifest_is_not_recreated_over_existing_data(data: Path) -> None:
    (data / MANIFEST_FILE).unlink()
    with pytest.raises(DataDirError, match=r"no manifest\.json, so"):
        open_service(data)
    assert not (data / MANIFEST_FILE).exists()
