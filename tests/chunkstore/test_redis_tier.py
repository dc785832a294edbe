"""The remote tier on a real redis-server (Debian's package) on loopback."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ragcache.chunkstore import ChunkStore, ChunkStoreConfig, KeyContext
from ragcache.chunkstore.redis_tier import RedisTier
from ragcache.chunkstore.tree import KnowledgeTree
from ragcache.cluster.redis_server import LocalRedis
from tests.chunkstore.helpers import ROOT_IDS, assert_same_layers, make_entry

pytestmark = pytest.mark.cluster


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


def remote_config(server: LocalRedis, **overrides: object) -> ChunkStoreConfig:
    settings: dict[str, object] = {
        "remote_url": server.url,
        "remote_namespace": f"test-{uuid.uuid4().hex[:8]}",
        "remote_retry_s": 0.2,
        "remote_timeout_s": 0.5,
        "disk_initial_map_bytes": 1 << 20,
    }
    settings.update(overrides)
    return ChunkStoreConfig(**settings)  # type: ignore[arg-type]


def replica(config: ChunkStoreConfig, directory: Path | None = None) -> ChunkStore:
    """A store of its own (host tier, optional disk) on the shared Redis."""
    return ChunkStore(config, directory)


def remote_stats(store: ChunkStore) -> dict[str, int]:
    tiers = store.stats()["tiers"]
    assert isinstance(tiers, dict)
    return tiers["remote"]


def test_tier_keeps_index_and_byte_count_with_the_records(redis_server: LocalRedis) -> None:
    tier = RedisTier(remote_config(redis_server))
    first, second = make_entry(1), make_entry(2, num_tokens=24)
    for entry in (first, second):
        tier.put(tier.prepare(entry))
    assert sorted(tier.keys()) == sorted([first.key, second.key])
    assert tier.contains(first.key)
    assert tier.used_bytes == tier.size_of(first.key) + tier.size_of(second.key)
    got = tier.get(second.key)
    assert got is not None
    assert_same_layers(got, second)
    assert tier.delete(first.key)
    assert not tier.delete(first.key)
    assert not tier.contains(first.key)
    assert tier.used_bytes == tier.size_of(second.key)
    tier.close()


def test_entry_written_by_one_replica_is_read_by_another(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    config = remote_config(redis_server)
    writer = replica(config, tmp_path / "a")
    reader = replica(config, tmp_path / "b")
    entry = make_entry(3, num_layers=4)
    assert writer.put(entry)
    assert writer.tier_indices(entry.key) == [1, 2, 3]  # host, disk, remote
    assert reader.tier_of(entry.key) == "remote"
    stream = reader.get_layers(entry.key, entry.token_ids)
    assert stream is not None
    layers = [kv for _, kv in stream]
    assert all(
        torch.equal(k, e[0]) and torch.equal(v, e[1])
        for (k, v), e in zip(layers, entry.layers, strict=True)
    )
    assert reader.tier_of(entry.key) == "host"  # promoted into the reader's own memory
    assert remote_stats(reader)["hits"] == 1
    assert remote_stats(reader)["bytes_read"] > 0


def test_corrupt_or_misfiled_remote_records_are_dropped_and_counted(
    redis_server: LocalRedis,
) -> None:
    config = remote_config(redis_server)
    writer, reader = replica(config), replica(config)
    flipped, misfiled, donor = make_entry(4), make_entry(5), make_entry(6)
    for entry in (flipped, donor):
        assert writer.put(entry)
    client = writer.tiers[-1].client  # type: ignore[attr-defined]
    prefix = f"{config.remote_namespace}:kv:"
    record = client.get(prefix + flipped.key)
    last = len(record) - 1
    client.setrange(prefix + flipped.key, last, bytes([record[last] ^ 0x01]))
    # A valid record under the wrong key: its header names another chunk.
    client.set(prefix + misfiled.key, client.get(prefix + donor.key))
    client.hset(f"{config.remote_namespace}:index", misfiled.key, len(record))

    assert reader.get(flipped.key, flipped.token_ids) is None
    assert reader.get(misfiled.key, misfiled.token_ids) is None
    assert reader.stats()["corruptions"] == 2
    assert not client.exists(prefix + flipped.key)
    assert not client.exists(prefix + misfiled.key)
    got = reader.get(donor.key, donor.token_ids)
    assert got is not None
    assert_same_layers(got, donor)


def test_a_layer_failing_its_checksum_mid_stream_raises_and_drops(
    redis_server: LocalRedis,
) -> None:
    config = remote_config(redis_server)
    writer, reader = replica(config), replica(config)
    entry = make_entry(7, num_layers=3)
    assert writer.put(entry)
    client = writer.tiers[-1].client  # type: ignore[attr-defined]
    record_key = f"{config.remote_namespace}:kv:{entry.key}"
    record = client.get(record_key)
    client.setrange(record_key, len(record) - 1, bytes([record[-1] ^ 0xFF]))
    stream = reader.get_layers(entry.key, entry.token_ids)
    assert stream is not None
    with pytest.raises(ValueError, match="checksum"):
        list(stream)
    assert not client.exists(record_key)


def test_another_tenant_never_reads_the_entry(redis_server: LocalRedis) -> None:
    config = remote_config(redis_server)
    tenant_a = KeyContext("smollm2-135m@test", "float16", "raw", "", "tenant-a")
    tenant_b = KeyContext("smollm2-135m@test", "float16", "raw", "", "tenant-b")
    store_a, store_b = replica(config), replica(config)
    tree_a = KnowledgeTree(store_a, tenant_a, ROOT_IDS)
    tree_b = KnowledgeTree(store_b, tenant_b, ROOT_IDS)
    entry = make_entry(8, context=tenant_a)
    node = tree_a.insert([entry.token_ids], entry.layers, entry.positions)
    assert node is not None and store_a.tier_of(node.key) == "host"
    key_b = tree_b.key_for(tree_b.root, entry.token_ids)
    assert key_b != node.key
    assert store_b.get(key_b, entry.token_ids) is None
    assert store_b.tiers[-1].keys() == [node.key]


def test_byte_cap_is_kept_by_the_store_policy(redis_server: LocalRedis) -> None:
    probe = make_entry(9)
    record_bytes = RedisTier(remote_config(redis_server)).prepare(probe).nbytes
    config = remote_config(redis_server, host_bytes=0, remote_bytes=3 * record_bytes)
    store = replica(config)
    entries = [make_entry(10 + i) for i in range(6)]
    for entry in entries:
        assert store.put(entry)
        remote = store.tiers[-1]
        assert remote.used_bytes <= config.remote_bytes
    assert len(store.tiers[-1].keys()) == 3
    assert remote_stats(store)["evictions"] == 3


def test_redis_killed_and_restarted_never_fails_a_read_or_put(
    redis_server: LocalRedis,
) -> None:
    config = remote_config(redis_server)
    writer = replica(config)
    # Room for two entries in the reader's memory, so most reads go to Redis.
    reader = replica(replace(config, host_bytes=2 * make_entry(0).nbytes + 1))
    entries = [make_entry(20 + i) for i in range(8)]
    for entry in entries[:4]:
        assert writer.put(entry)
    failures: list[BaseException] = []
    wrong: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for entry in entries:
                try:
                    got = reader.get(entry.key, entry.token_ids)
                    if got is None:
                        reader.put(entry)
                    elif not all(
                        torch.equal(k, e[0]) and torch.equal(v, e[1])
                        for (k, v), e in zip(got.layers, entry.layers, strict=True)
                    ):
                        wrong.append(entry.key)
                except BaseException as error:  # any error fails the test below
                    failures.append(error)
                    return

    thread = threading.Thread(target=load)
    thread.start()
    try:
        stop.wait(0.3)
        redis_server.kill()
        stop.wait(0.6)
        assert remote_stats(reader)["reachable"] == 0
        assert writer.put(entries[5])  # lands in the writer's host tier
        redis_server.start()
        stop.wait(0.6)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not failures
    assert not wrong
    stats = remote_stats(reader)
    assert stats["outages"] >= 1 and stats["errors"] >= 1
    assert stats["reachable"] == 1
    # Redis came back empty (no persistence); the next put writes through again.
    assert writer.put(entries[6])
    assert writer.tiers[-1].contains(entries[6].key)


def test_remote_tier_with_the_cachegen_codec(redis_server: LocalRedis) -> None:
    config = remote_config(redis_server, remote_codec="cachegen")
    writer, reader = replica(config), replica(config)
    entry = make_entry(30, num_tokens=48, num_layers=4, head_dim=16, dtype=torch.float32)
    assert writer.put(entry)
    raw_bytes = entry.nbytes
    assert writer.tiers[-1].size_of(entry.key) < raw_bytes / 4
    got = reader.get(entry.key, entry.token_ids)
    assert got is not None
    for (k, v), (k_ref, v_ref) in zip(got.layers, entry.layers, strict=True):
        assert (k - k_ref).abs().max() < 0.5 * k_ref.abs().max()
        assert (v - v_ref).abs().max() < 0.5 * v_ref.abs().max()
