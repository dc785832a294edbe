"""What the shared Redis tier costs and touches: a memory hit makes no Redis call, stats
count entries without listing the namespace, and a clear removes only this store's
writes. Commands are counted by the real redis-server (INFO commandstats)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ragcache.chunkstore import ChunkStore, ChunkStoreConfig
from ragcache.cluster.redis_server import LocalRedis
from tests.chunkstore.helpers import make_entry

pytestmark = pytest.mark.cluster


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


def config_for(server: LocalRedis, namespace: str) -> ChunkStoreConfig:
    return ChunkStoreConfig(
        remote_url=server.url, remote_namespace=namespace, disk_initial_map_bytes=1 << 20
    )


def command_counts(server: LocalRedis) -> dict[str, int]:
    """Calls per command so far, the probe's own connection (HELLO, INFO) left out."""
    stats = redis.Redis.from_url(server.url).info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name not in ("cmdstat_info", "cmdstat_hello")
    }


def test_a_memory_hit_makes_no_redis_call(redis_server: LocalRedis, tmp_path: Path) -> None:
    store = ChunkStore(config_for(redis_server, f"t-{uuid.uuid4().hex[:8]}"), tmp_path)
    entry = make_entry(1, num_layers=3)
    assert store.put(entry)
    assert store.tier_of(entry.key) == "host"
    before = command_counts(redis_server)
    for _ in range(3):
        assert store.get(entry.key, entry.token_ids) is not None
        stream = store.get_layers(entry.key, entry.token_ids)
        assert stream is not None and len(list(stream)) == 3
    assert command_counts(redis_server) == before
    store.close()


def test_stats_count_remote_entries_without_listing_keys(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    store = ChunkStore(config_for(redis_server, f"t-{uuid.uuid4().hex[:8]}"), tmp_path)
    for seed in range(5):
        assert store.put(make_entry(seed))
    before = command_counts(redis_server)
    tiers = store.stats()["tiers"]
    assert isinstance(tiers, dict) and tiers["remote"]["entries"] == 5
    after = command_counts(redis_server)
    assert after.get("hlen", 0) == before.get("hlen", 0) + 1
    for listing in ("hkeys", "keys", "scan", "hgetall"):
        assert after.get(listing, 0) == before.get(listing, 0), listing
    store.close()


def test_a_clear_removes_only_this_stores_remote_entries(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    mine = ChunkStore(config_for(redis_server, namespace), tmp_path / "a")
    theirs = ChunkStore(config_for(redis_server, namespace), tmp_path / "b")
    own = [make_entry(seed) for seed in range(3)]
    other = [make_entry(seed) for seed in range(10, 13)]
    for entry in own:
        assert mine.put(entry)
    for entry in other:
        assert theirs.put(entry)
    # mine reads one of theirs: a promoted copy in its memory, theirs in Redis
    assert mine.get(other[0].key, other[0].token_ids) is not None
    assert mine.tier_of(other[0].key) == "host"
    mine.clear()
    assert all(mine.tier_of(entry.key) is None for entry in own)
    assert mine.tier_of(other[0].key) == "remote"  # its copy is gone, theirs remains
    assert all(theirs.get(entry.key, entry.token_ids) is not None for entry in other)
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.hlen(f"{namespace}:index") == len(other)
    mine.close()
    theirs.close()
