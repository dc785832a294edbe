import torch

from ragcache.chunkstore import Prefetcher
from tests.chunkstore.helpers import make_entry, make_store


def test_prefetch_streams_layers_of_every_requested_chunk(tmp_path):
    store = make_store(tmp_path / "db", host_bytes=1 << 24)
    on_disk, in_host = make_entry(1, num_layers=6), make_entry(2, num_layers=6)
    for entry in (on_disk, in_host):
        store.put(entry)
    store.tiers[1].delete(on_disk.key)
    store.policies[1].on_remove(on_disk.key)
    missing = make_entry(3)
    requests = [(e.key, e.token_ids) for e in (on_disk, in_host, missing)]
    with Prefetcher(store, max_workers=2) as prefetcher:
        handle = prefetcher.start(requests)
        for entry in (on_disk, in_host):
            assert handle.found(entry.key)
            streamed = list(handle.layers(entry.key))
            assert [layer for layer, _ in streamed] == list(range(6))
            for (_, (k, v)), (k_ref, v_ref) in zip(streamed, entry.layers, strict=True):
                assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
        assert not handle.found(missing.key)
        assert list(handle.layers(missing.key)) == []
        handle.wait()
    assert store.tier_of(on_disk.key) == "host"
    store.close()
