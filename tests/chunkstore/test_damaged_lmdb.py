"""A chunk LMDB file that cannot be read (garbled meta pages, garbled leaf pages, a
truncated file) is moved aside with a clear log line and an empty one takes its place:
it is a cache. A truncated file must not kill the process with SIGBUS."""

from __future__ import annotations

import logging
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ragcache.chunkstore.lmdb_health import data_file_problem
from tests.chunkstore.helpers import ROOT_KEY, assert_same_layers, make_entry, make_store

pytestmark = pytest.mark.fault

PAGE = 4096
LEAF_FLAG = 0x02


def filled_store(directory: Path) -> None:
    store = make_store(directory, host_bytes=0)
    for seed in range(200):
        store.put(make_entry(seed, num_tokens=4 + seed % 30, parent_keys=[ROOT_KEY]))
    store.close()


def garble_meta_pages(data: bytearray) -> None:
    noise = random.Random(0)
    for page in (0, 1):
        data[page * PAGE : (page + 1) * PAGE] = noise.randbytes(PAGE)


def garble_leaf_pages(data: bytearray) -> None:
    noise = random.Random(1)
    for page in range(2, len(data) // PAGE):
        start = page * PAGE
        if struct.unpack_from("<H", data, start + 10)[0] == LEAF_FLAG:
            data[start + 16 : start + PAGE] = noise.randbytes(PAGE - 16)


def truncate(data: bytearray) -> None:
    del data[len(data) // 2 :]


def damage(directory: Path, how: str) -> None:
    data_file = directory / "data.mdb"
    data = bytearray(data_file.read_bytes())
    {"meta": garble_meta_pages, "leaf": garble_leaf_pages, "truncated": truncate}[how](data)
    data_file.write_bytes(bytes(data))


def assert_serving_empty(directory: Path) -> None:
    store = make_store(directory, host_bytes=0)
    assert store.stats()["tiers"]["disk"]["entries"] == 0
    entry = make_entry(999, parent_keys=[ROOT_KEY])
    assert store.put(entry)
    got = store.get(entry.key, entry.token_ids)
    assert got is not None
    assert_same_layers(got, entry)
    store.close()


@pytest.mark.parametrize("how", ["meta", "leaf"])
def test_a_garbled_chunk_lmdb_is_moved_aside_and_rebuilt_empty(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "chunks"
    filled_store(directory)
    damage(directory, how)
    with caplog.at_level(logging.ERROR):
        store = make_store(directory, host_bytes=0)
    disk = store.disk
    assert disk is not None and disk.moved_aside is not None
    assert disk.moved_aside.exists() and (disk.moved_aside / "data.mdb").exists()
    assert any(
        "chunk cache" in r.message
        and "cannot be read" in r.message
        and "Moved it aside" in r.message
        for r in caplog.records
    )
    store.close()
    assert_serving_empty(directory)


TRUNCATED_OPEN = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.ERROR)
    from tests.chunkstore.helpers import make_store
    store = make_store(sys.argv[1], host_bytes=0)
    print("entries", store.stats()["tiers"]["disk"]["entries"], flush=True)
    """
)


def test_a_truncated_chunk_lmdb_is_refused_before_mapping_it(tmp_path: Path) -> None:
    directory = tmp_path / "chunks"
    filled_store(directory)
    damage(directory, "truncated")
    assert "truncated" in (data_file_problem(directory / "data.mdb") or "")
    opened = subprocess.run(
        [sys.executable, "-c", TRUNCATED_OPEN, str(directory)],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        timeout=300,
    )
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert "entries 0" in opened.stdout
    assert "truncated" in opened.stderr and "Moved it aside" in opened.stderr
    assert "Traceback" not in opened.stderr
    assert_serving_empty(directory)


def test_a_sound_file_passes_the_checks(tmp_path: Path) -> None:
    directory = tmp_path / "chunks"
    filled_store(directory)
    assert data_file_problem(directory / "data.mdb") is None
    store = make_store(directory, host_bytes=0)
    assert store.disk is not None and store.disk.moved_aside is None
    assert store.stats()["tiers"]["disk"]["entries"] == 200
