import json
import os
import signal
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest
import torch
import xxhash

from ragcache.chunkstore.entry import FORMAT_VERSION, CorruptEntryError, decode_header
from tests.chunkstore.helpers import CONTEXT, ROOT_KEY, assert_same_layers, make_entry, make_store

WRITER = textwrap.dedent(
    """
    import sys
    from tests.chunkstore.helpers import make_entry, make_store
    store = make_store(sys.argv[1], host_bytes=0)
    seed = 0
    while True:
        entry = make_entry(seed, num_tokens=8 + seed % 64, num_layers=4)
        store.put(entry)
        print(seed, flush=True)
        seed += 1
    """
)


def test_restart_finds_every_entry_and_rebuilds_the_tree(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory)
    entries = [make_entry(seed, parent_keys=[ROOT_KEY]) for seed in range(5)]
    for entry in entries:
        store.put(entry)
    store.close()
    code = textwrap.dedent(
        f"""
        import json, sys
        from ragcache.chunkstore.tree import KnowledgeTree
        from tests.chunkstore.helpers import CONTEXT, ROOT_KEY, make_entry, make_store
        store = make_store({str(directory)!r})
        found = []
        for seed in range(5):
            entry = make_entry(seed, parent_keys=[ROOT_KEY])
            got = store.get(entry.key, entry.token_ids)
            found.append(got is not None and got.token_ids == entry.token_ids)
        tree = KnowledgeTree.rebuild(store, CONTEXT, [1, 2, 3])
        print(json.dumps({{"found": found, "tree": len(tree)}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.getcwd(),
    )
    report = json.loads(result.stdout)
    assert report == {"found": [True] * 5, "tree": 5}


def test_sigkill_mid_stream_leaves_only_whole_entries(tmp_path):
    directory = tmp_path / "db"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    committed = []
    for line in child.stdout:
        committed.append(int(line))
        if len(committed) >= 40:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    store = make_store(directory, host_bytes=0)
    assert store.stats()["corruptions"] == 0
    stored = set(store.tiers[-1].keys())
    expected = {}
    for seed in range(max(committed) + 50):
        entry = make_entry(seed, num_tokens=8 + seed % 64, num_layers=4)
        expected[entry.key] = entry
    assert stored <= set(expected), "a key that was never written"
    for seed in committed:
        assert make_entry(seed, num_tokens=8 + seed % 64, num_layers=4).key in stored
    for key in stored:
        got = store.get(key, expected[key].token_ids, promote=False)
        assert got is not None
        assert_same_layers(got, expected[key])
    assert store.stats()["corruptions"] == 0
    store.close()


def _rewrite_raw(directory, key, change):
    env = lmdb.open(str(directory), map_size=1 << 24)
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(key.encode()))
        txn.put(key.encode(), bytes(change(value)))
    env.close()


def _flip_last_byte(value):
    value[-1] ^= 0xFF
    return value


def test_flipped_layer_byte_fails_its_checksum(tmp_path, caplog):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entry, neighbour = make_entry(1), make_entry(2)
    store.put(entry)
    store.put(neighbour)
    store.close()
    _rewrite_raw(directory, entry.key, _flip_last_byte)
    store = make_store(directory, host_bytes=0)
    assert store.get(entry.key, entry.token_ids) is None
    stats = store.stats()
    assert stats["corruptions"] == 1 and stats["misses"] == 1
    assert not store.contains(entry.key)
    assert "corrupt" in caplog.text
    assert_same_layers(store.get(neighbour.key, neighbour.token_ids), neighbour)
    store.close()
    assert entry.key not in make_store(directory, host_bytes=0).tiers[-1].keys()


def test_corruption_found_while_streaming_layers(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entry = make_entry(1)
    store.put(entry)
    store.close()
    _rewrite_raw(directory, entry.key, _flip_last_byte)
    store = make_store(directory, host_bytes=0)
    stream = store.get_layers(entry.key, entry.token_ids)
    layers = []
    try:
        for layer, _ in stream:
            layers.append(layer)
    except ValueError as error:
        assert "checksum" in str(error)
    assert layers == [0, 1]
    assert store.stats()["corruptions"] == 1 and not store.contains(entry.key)
    store.close()


def test_truncated_and_garbage_records_are_dropped_on_open(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entries = [make_entry(seed) for seed in range(3)]
    for entry in entries:
        store.put(entry)
    store.close()
    _rewrite_raw(directory, entries[0].key, lambda value: value[: len(value) // 2])
    _rewrite_raw(directory, entries[1].key, lambda value: b"junk")
    store = make_store(directory, host_bytes=0)
    assert store.stats()["corruptions"] == 2
    assert store.get(entries[0].key, entries[0].token_ids) is None
    assert store.get(entries[1].key, entries[1].token_ids) is None
    assert_same_layers(store.get(entries[2].key, entries[2].token_ids), entries[2])
    store.close()


def test_map_grows_when_full(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=0)
    before = store.tiers[-1].env.info()["map_size"]
    entries = [make_entry(seed, num_tokens=256, num_layers=4, head_dim=64) for seed in range(6)]
    for entry in entries:
        assert store.put(entry)
    assert store.tiers[-1].env.info()["map_size"] > before
    for entry in entries:
        assert_same_layers(store.get(entry.key, entry.token_ids, promote=False), entry)
    assert CONTEXT.tenant == "tenant-a"
    store.close()


def _flip_byte_in_layer(layer):
    def change(value):
        header = decode_header(bytes(value))
        start, end = header.layer_span(layer)
        value[(start + end) // 2] ^= 0x01
        return value

    return change


def test_records_carry_xxh3_checksums_of_each_layer(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=0)
    entry = make_entry(3, num_layers=4)
    store.put(entry)
    with store.tiers[-1].env.begin() as txn:
        record = txn.get(entry.key.encode())
    header = decode_header(record)
    assert header.version == FORMAT_VERSION == 2
    for layer in range(header.num_layers):
        start, end = header.layer_span(layer)
        assert header.layer_checksums[layer] == xxhash.xxh3_128_hexdigest(record[start:end])
    store.close()


def test_every_read_verifies_by_default(tmp_path):
    """A record read cleanly once is still checked on the next read."""
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entry = make_entry(4, num_layers=4)
    store.put(entry)
    assert_same_layers(store.get(entry.key, entry.token_ids, promote=False), entry)
    assert store.config.disk_verify == "always"
    env = store.tiers[-1].env
    with env.begin(write=True) as txn:
        value = _flip_byte_in_layer(2)(bytearray(txn.get(entry.key.encode())))
        txn.put(entry.key.encode(), bytes(value))
    assert store.get(entry.key, entry.token_ids, promote=False) is None
    assert store.stats()["corruptions"] == 1
    store.close()


def test_stream_hands_out_layers_before_the_flipped_one(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entry = make_entry(5, num_layers=7)
    store.put(entry)
    store.close()
    _rewrite_raw(directory, entry.key, _flip_byte_in_layer(5))
    store = make_store(directory, host_bytes=0)
    seen = []
    with pytest.raises(CorruptEntryError, match="layer 5 fails its checksum"):
        for layer, (k, v) in store.get_layers(entry.key, entry.token_ids):
            assert torch.equal(k, entry.layers[layer][0]) and torch.equal(v, entry.layers[layer][1])
            seen.append(layer)
    assert seen == [0, 1, 2, 3, 4]
    store.close()


def test_records_of_an_older_format_are_dropped(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entry = make_entry(6)
    store.put(entry)
    store.close()
    version_one = (1).to_bytes(4, "little")
    _rewrite_raw(directory, entry.key, lambda value: value[:4] + version_one + value[8:])
    store = make_store(directory, host_bytes=0)
    assert store.stats()["corruptions"] == 1 and not store.contains(entry.key)
    store.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_view_reads_layers_in_place_with_their_checksums(tmp_path, dtype):
    store = make_store(tmp_path / "db", host_bytes=0)
    entry = make_entry(6, num_layers=3, dtype=dtype)
    store.put(entry)
    disk = store.tiers[-1]
    with disk.env.begin() as txn:
        assert decode_header(txn.get(entry.key.encode())).data_offset % 64 == 0
    with disk.view(entry.key) as viewed, disk.env.begin(buffers=True) as txn:
        assert_same_layers(viewed, entry)
        record = np.frombuffer(txn.get(entry.key.encode()), dtype=np.uint8)
        start = record.ctypes.data
        for k, v in viewed.layers:  # views of the map, not copies
            assert start <= k.data_ptr() and v.data_ptr() < start + record.size
        owned = [(k.clone(), v.clone()) for k, v in viewed.layers]
    assert all(torch.equal(a, b[0]) for (a, _), b in zip(owned, entry.layers, strict=True))
    with disk.view("no-such-key") as missing:
        assert missing is None
    store.close()


def test_view_fails_on_a_flipped_byte_every_time(tmp_path):
    directory = tmp_path / "db"
    store = make_store(directory, host_bytes=0)
    entry = make_entry(7, num_layers=4)
    store.put(entry)
    disk = store.tiers[-1]
    with disk.view(entry.key) as viewed:
        assert viewed is not None
    with disk.env.begin(write=True) as txn:
        value = _flip_byte_in_layer(3)(bytearray(txn.get(entry.key.encode())))
        txn.put(entry.key.encode(), bytes(value))
    for _ in range(2):
        with pytest.raises(CorruptEntryError, match="layer 3 fails its checksum"):
            with disk.view(entry.key):
                pass
    store.close()


def test_view_of_an_int8_record_decodes_into_new_tensors(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=0, disk_codec="int8")
    entry = make_entry(8, num_layers=2, dtype=torch.float32)
    store.put(entry)
    with store.tiers[-1].view(entry.key) as viewed:
        for (k, v), (k0, v0) in zip(viewed.layers, entry.layers, strict=True):
            assert torch.allclose(k, k0, atol=float(k0.abs().max()) / 254 + 1e-6)
            assert torch.allclose(v, v0, atol=float(v0.abs().max()) / 254 + 1e-6)
    store.close()
