"""Bad records in the chunk LMDB, by the thousand: the start-up scan drops them all
without holding a reader slot per record, and later reads of bad records hold none."""

import lmdb
import pytest

from ragcache.chunkstore.entry import FORMAT_VERSION, MAGIC, PREAMBLE, CorruptEntryError, checksum
from tests.chunkstore.helpers import assert_same_layers, make_entry, make_store

NUM_BAD = 1200


def _older_format(record: bytes) -> bytes:
    return record[:4] + (1).to_bytes(4, "little") + record[8:]


def _damaged_variants(record: bytes) -> list[bytes]:
    return [
        b"junk",
        _older_format(record),
        record[: len(record) // 2],
        b"RCKV" + record[4:8] + b"\0" * 24,
        PREAMBLE.pack(MAGIC, FORMAT_VERSION, 8, checksum(b"not json")) + b"not json",
    ]


def _reader_slots(env: lmdb.Environment) -> int:
    """Reader slots this process holds, in use or reset ("-"): an aborted read
    transaction keeps its slot until its Python object dies."""
    return len(env.readers().strip().splitlines()[1:])


@pytest.fixture
def db_with_bad_records(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    good = [make_entry(seed) for seed in range(3)]
    for entry in good:
        store.put(entry)
    with store.tiers[-1].env.begin() as txn:
        record = bytes(txn.get(good[0].key.encode()))
    store.close()
    variants = _damaged_variants(record)
    env = lmdb.open(str(directory), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for number in range(NUM_BAD):
            txn.put(f"bad-{number:05d}".encode(), variants[number % len(variants)])
    env.close()
    return directory, good


def test_thousands_of_bad_records_are_dropped_at_start(db_with_bad_records):
    directory, good = db_with_bad_records
    store = make_store(directory, host_bytes=0)
    disk = store.tiers[-1]
    assert store.config.disk_max_readers < NUM_BAD
    assert store.stats()["corruptions"] == NUM_BAD
    assert sorted(disk.keys()) == sorted(entry.key for entry in good)
    assert _reader_slots(disk.env) == 0
    for entry in good:
        assert_same_layers(store.get(entry.key, entry.token_ids, promote=False), entry)
    recomputed = make_entry(99)
    assert store.put(recomputed)
    store.close()

    with lmdb.open(str(directory), readonly=True) as env, env.begin() as txn:
        assert txn.stat()["entries"] == len(good) + 1
    again = make_store(directory, host_bytes=0)
    assert again.stats()["corruptions"] == 0
    assert_same_layers(again.get(recomputed.key, recomputed.token_ids), recomputed)
    again.close()


def test_kept_read_errors_hold_no_reader_slots(tmp_path):
    """Exceptions a caller keeps (in a list, a log record, a failed future) must not
    keep the read transaction they were raised in."""
    store = make_store(tmp_path / "db", host_bytes=0, disk_max_readers=8)
    disk = store.tiers[-1]
    entry = make_entry(1, num_layers=2)
    store.put(entry)
    with disk.env.begin(write=True) as txn:
        txn.put(entry.key.encode(), _older_format(bytes(txn.get(entry.key.encode()))))
    kept: list[CorruptEntryError] = []
    for _ in range(50):
        for read in (disk.read_header, disk.get):
            with pytest.raises(CorruptEntryError) as failure:
                read(entry.key)
            kept.append(failure.value)
        with pytest.raises(CorruptEntryError) as failure:
            with disk.view(entry.key):
                pass
        kept.append(failure.value)
    assert len(kept) == 150 and "format 1" in str(kept[0])
    assert _reader_slots(disk.env) == 0
    store.close()
