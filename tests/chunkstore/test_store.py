import random

import pytest
import torch

from ragcache.chunkstore.codecs import get_codec
from tests.chunkstore.helpers import assert_same_layers, make_entry, make_store

TIER_SETUPS = {
    "host": {"host_bytes": 1 << 24},
    "disk": {"host_bytes": 0},
}


def _read_back(store, entry, tier):
    got = store.get(entry.key, entry.token_ids, promote=False)
    assert got is not None
    assert store.tier_of(entry.key) == tier
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_raw_round_trip_is_exact(tmp_path, tier, dtype):
    store = make_store(tmp_path / "db", **TIER_SETUPS[tier])
    entry = make_entry(1, dtype=dtype)
    assert store.put(entry)
    assert_same_layers(_read_back(store, entry, tier), entry)
    store.close()


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_int8_round_trip_within_bound(tmp_path, tier):
    store = make_store(tmp_path / "db", disk_codec="int8", **TIER_SETUPS[tier])
    entry = make_entry(2, num_tokens=24)
    store.put(entry)
    got = _read_back(store, entry, tier)
    for (k, v), (k_ref, v_ref) in zip(got.layers, entry.layers, strict=True):
        for tensor, reference in ((k, k_ref), (v, v_ref)):
            bound = reference.float().abs().amax(-1, keepdim=True) / 254
            rounding = reference.float().abs() * torch.finfo(torch.float16).eps
            assert ((tensor.float() - reference.float()).abs() <= bound + rounding).all()
    if tier == "disk":
        raw_bytes = entry.nbytes
        assert store.tiers[-1].used_bytes < 0.6 * raw_bytes + 4096
    store.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device tier needs CUDA")
def test_device_round_trip(tmp_path):
    store = make_store(tmp_path / "db", device_bytes=1 << 24)
    entry = make_entry(4)
    store.put(entry)
    got = _read_back(store, entry, "device")
    assert got.layers[0][0].is_cuda
    assert_same_layers(got, entry)
    store.close()


def test_device_tier_is_disabled_without_cuda(tmp_path):
    store = make_store(tmp_path / "db")
    device = store.tiers[0]
    assert device.name == "device"
    assert device.enabled == torch.cuda.is_available()
    store.close()


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_layer_by_layer_equals_whole(tmp_path, tier, codec):
    store = make_store(tmp_path / "db", disk_codec=codec, **TIER_SETUPS[tier])
    entry = make_entry(5, num_layers=5)
    store.put(entry)
    whole = store.get(entry.key, entry.token_ids, promote=False)
    stream = store.get_layers(entry.key, entry.token_ids, promote=False)
    streamed = list(stream)
    assert [layer for layer, _ in streamed] == list(range(5))
    for (layer, (k, v)), (k_whole, v_whole) in zip(streamed, whole.layers, strict=True):
        assert torch.equal(k, k_whole) and torch.equal(v, v_whole), layer
    some = list(store.get_layers(entry.key, entry.token_ids, layers=[3, 1], promote=False))
    assert [layer for layer, _ in some] == [3, 1]
    assert torch.equal(some[0][1][0], whole.layers[3][0])
    store.close()


def test_disk_hit_promotes_to_host(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=1 << 24)
    entry = make_entry(6)
    store.put(entry)
    store.tiers[1].delete(entry.key)
    store.policies[1].on_remove(entry.key)
    assert store.tier_of(entry.key) == "disk"
    assert store.get(entry.key, entry.token_ids) is not None
    assert store.tier_of(entry.key) == "host"
    stats = store.stats()
    assert stats["promotions"] == 1 and stats["tiers"]["disk"]["hits"] == 1
    store.close()


def test_eviction_copies_down_once_then_only_drops(tmp_path):
    entry_bytes = make_entry(0).nbytes
    # Round-robin requests: the admission filter would rightly keep the host tier's
    # first two entries; here every newcomer must evict, so the copies down show.
    store = make_store(
        tmp_path / "db", host_bytes=2 * entry_bytes, write_through=False, pgdsf_admission=False
    )
    entries = [make_entry(seed) for seed in range(4)]
    for entry in entries[:2]:
        store.put(entry)
    assert store.tiers[2].used_bytes == 0
    for _ in range(3):
        for entry in entries:
            if not store.contains(entry.key):
                store.put(entry)
            assert store.get(entry.key, entry.token_ids) is not None
    stats = store.stats()
    disk_entries = stats["tiers"]["disk"]["entries"]
    assert stats["demotions"] == disk_entries == 4
    assert stats["tiers"]["host"]["evictions"] > disk_entries
    for entry in entries:
        assert store.contains(entry.key)
    store.close()


def test_caps_hold_under_a_write_storm(tmp_path):
    rng = random.Random(7)
    store = make_store(tmp_path / "db", host_bytes=60_000, disk_bytes=200_000, write_through=True)
    for seed in range(150):
        entry = make_entry(seed, num_tokens=rng.randint(1, 120), num_layers=rng.randint(1, 4))
        store.put(entry)
        if rng.random() < 0.3:
            store.get(entry.key, entry.token_ids)
        for tier in store.tiers:
            assert tier.used_bytes <= tier.capacity_bytes, tier.name
    stats = store.stats()
    assert stats["tiers"]["host"]["evictions"] > 0 and stats["tiers"]["disk"]["evictions"] > 0
    assert store.tiers[2].used_bytes == sum(len(bytes(v)) for v in _raw_values(store.tiers[2]))
    store.close()


def _raw_values(disk):
    with disk.env.begin() as txn:
        return [value for _, value in txn.cursor()]


def test_entry_larger_than_every_tier_is_rejected(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=100, disk_bytes=100)
    entry = make_entry(1)
    assert not store.put(entry)
    assert not store.contains(entry.key)
    assert store.stats()["rejected_puts"] == 1
    store.close()


def test_delete_clear_and_stats(tmp_path):
    store = make_store(tmp_path / "db")
    entries = [make_entry(seed) for seed in range(4)]
    for entry in entries:
        store.put(entry)
    assert store.delete(entries[0].key)
    assert not store.contains(entries[0].key)
    assert store.get(entries[0].key, entries[0].token_ids) is None
    stats = store.stats()
    assert stats["misses"] == 1
    assert stats["tiers"]["host"]["entries"] == 3 and stats["tiers"]["disk"]["entries"] == 3
    store.clear()
    stats = store.stats()
    assert stats["tiers"]["host"]["bytes"] == 0 and stats["tiers"]["disk"]["bytes"] == 0
    store.close()


def test_bad_entry_shapes_are_named():
    entry = make_entry(1)
    k, v = entry.layers[0]
    with pytest.raises(ValueError, match="layer 1 K has shape"):
        type(entry)(entry.key, entry.token_ids, entry.positions, [(k, v), (k[:3], v)])
    with pytest.raises(ValueError, match="positions"):
        type(entry)(entry.key, entry.token_ids, entry.positions[:-1], entry.layers)


def test_unknown_policy_and_codec_are_named(tmp_path):
    with pytest.raises(ValueError, match="pgdsf, lru, lfu"):
        make_store(None, policy="fifo")
    with pytest.raises(ValueError, match="raw, int8"):
        make_store(tmp_path / "db", disk_codec="zstd")
    assert get_codec("raw").name == "raw"


def test_a_one_off_newcomer_does_not_push_a_popular_entry_out_of_the_host_tier(tmp_path):
    popular, newcomer = make_entry(0), make_entry(1)
    store = make_store(tmp_path / "db", host_bytes=popular.nbytes)
    store.put(popular)
    for _ in range(3):
        assert store.get(popular.key, popular.token_ids) is not None
    assert store.put(newcomer)
    assert store.tier_of(popular.key) == "host" and store.tier_of(newcomer.key) == "disk"
    assert store.stats()["tiers"]["host"]["rejected_admissions"] == 1
    for _ in range(4):
        assert store.get(newcomer.key, newcomer.token_ids) is not None
    # Requested more often than the resident now: a promotion evicts it.
    assert store.tier_of(newcomer.key) == "host" and store.tier_of(popular.key) == "disk"
    assert store.tiers[1].used_bytes <= store.tiers[1].capacity_bytes
    store.close()
