"""Faults a service survives: SIGKILL during a burst of queries, a full corpus store
during an ingest, a damaged corpus LMDB. Each: no data of an intact corpus lost, a
clear message, serving after restart. (SIGKILL at every ingest stage:
test_service.py::test_an_ingest_killed_midway_leaves_the_corpus_as_before.)"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import ragcache.corpus.store
from ragcache.errors import StorageFullError
from tests.service.test_service import (
    GETTYSBURG,
    QUESTION,
    corpus_snapshot,
    open_service,
)
from tests.service_helpers import SAMPLES, tiny_flags

pytestmark = pytest.mark.fault

QUERY_BURST = """
import json, sys, threading
from ragcache.config import load_config
from ragcache.service import RagCache

flags = json.loads(sys.argv[1])
questions = ["What did Lincoln say?", "Who wrote the Declaration?", "What is the best of times?",
             "Which nation was conceived in liberty?"]
rag = RagCache(config=load_config(flags=flags, environ={}))

def ask(offset):
    for number in range(1000):
        rag.query(questions[(number + offset) % 4], "docs", k=3)
        print("answered", flush=True)

threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def test_a_query_burst_killed_midway_corrupts_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_service(data) as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES], "docs")
        before = corpus_snapshot(rag, "docs")
        rag.cache_clear()  # the burst writes chunk KV while it is killed
    flags = {**tiny_flags(data), "service.kv_precompute": "lazy"}
    child = subprocess.Popen(
        [sys.executable, "-c", QUERY_BURST, json.dumps(flags)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        answered = 0
        assert child.stdout is not None
        for line in child.stdout:
            answered += line.startswith("answered")
            if answered >= 6:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and answered >= 6
    with open_service(data) as rag:
        assert corpus_snapshot(rag, "docs") == before
        answer = rag.query(QUESTION, "docs", k=3)
        assert answer.sources and answer.completion_tokens >= 1
        assert rag.cache_stats()["chunks"]["corruptions"] == 0


def test_a_full_corpus_store_fails_the_ingest_and_keeps_the_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    text = "\n\n".join(
        f"Ledger entry {n}: the mill ground {n * 7} bushels of wheat for farm {n % 97}."
        for n in range(2000)
    )
    big = [(json.dumps({"id": "big", "text": text}).encode(), "big.json")]
    with monkeypatch.context() as patch:
        patch.setattr(ragcache.corpus.store, "MAP_SIZE", 256 * 1024)
        with open_service(data) as rag:
            rag.create_corpus("docs")
            rag.ingest([GETTYSBURG], "docs")
            before = corpus_snapshot(rag, "docs")
            with pytest.raises(StorageFullError, match="map size") as full:
                rag.ingest(big, "docs")
            assert "MapFullError" not in full.value.message
            assert corpus_snapshot(rag, "docs") == before
            assert rag.query(QUESTION, "docs", k=2).sources
    with open_service(data) as rag:
        assert corpus_snapshot(rag, "docs") == before
        assert rag.ingest(big, "docs").added == ["big"]
        assert rag.query(QUESTION, "docs", k=2).sources


def garble_leaf_pages(data: bytearray) -> None:
    noise = random.Random(2)
    for page in range(2, len(data) // 4096):
        start = page * 4096
        if struct.unpack_from("<H", data, start + 10)[0] == 0x02:
            data[start + 16 : start + 4096] = noise.randbytes(4096 - 16)


def truncate(data: bytearray) -> None:
    del data[len(data) // 2 :]


@pytest.mark.parametrize("damage", [truncate, garble_leaf_pages], ids=lambda f: f.__name__)
def test_a_damaged_corpus_lmdb_stops_the_service_with_a_message(tmp_path: Path, damage) -> None:
    data = tmp_path / "data"
    with open_service(data) as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES], "docs")
    records = data / "corpora.lmdb" / "data.mdb"
    raw = bytearray(records.read_bytes())
    damage(raw)
    records.write_bytes(bytes(raw))
    flags = [part for k, v in tiny_flags(data).items() for part in (f"--{k}", str(v))]
    result = subprocess.run(
        [sys.executable, "-m", "ragcache.cli", "cache", "stats", *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "corpora.lmdb/data.mdb is damaged" in result.stderr
    assert "restore the data directory from a backup" in result.stderr
    assert "Traceback" not in result.stderr
