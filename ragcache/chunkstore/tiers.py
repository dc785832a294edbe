"""The tiers a store is built from: memory tiers (device, host) and the registry that
lists every tier, fastest first: device, host, disk (LMDB), remote (Redis)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry, LayerKV
from ragcache.chunkstore.lmdb_tier import LMDBTier
from ragcache.chunkstore.redis_tier import RedisTier
from ragcache.chunkstore.tier import TIER_NAMES, PreparedEntry, Tier


class MemoryTier(Tier):
    """Entries as torch tensors on one device; used by the device and host tiers."""

    def __init__(self, name: str, capacity_bytes: int, device: str, pin_memory: bool) -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self._entries: dict[str, ChunkEntry] = {}
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def keys(self) -> list[str]:
        return list(self._entries)

    def contains(self, key: str) -> bool:
        return key in self._entries

    def size_of(self, key: str) -> int:
        return self._entries[key].nbytes

    def prepare(self, entry: ChunkEntry) -> PreparedEntry:
        already_here = all(
            k.device == self.device and v.device == self.device for k, v in entry.layers
        )
        moved = entry if already_here else entry.to(self.device, self.pin_memory)
        return PreparedEntry(entry.key, moved.nbytes, moved)

    def put(self, prepared: PreparedEntry) -> None:
        self.delete(prepared.key)
        self._entries[prepared.key] = prepared.payload
        self._used += prepared.nbytes

    def read_header(self, key: str) -> ChunkEntry | None:
        return self._entries.get(key)

    def get(self, key: str) -> ChunkEntry | None:
        return self._entries.get(key)

    def iter_layers(self, key: str, layers: Iterable[int]) -> Iterator[tuple[int, LayerKV]]:
        entry = self._entries[key]
        for layer in layers:
            yield layer, entry.layers[layer]

    def delete(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._used -= entry.nbytes
        return True


def build_tiers(config: ChunkStoreConfig, directory: str | Path | None) -> list[Tier]:
    """The registry of tiers, fastest first. Without CUDA the device tier has cap 0;
    without a directory the disk tier is left out; with ``remote_url`` the Redis tier
    that replicas share comes last."""
    cuda = torch.cuda.is_available()
    tiers: list[Tier] = [
        MemoryTier("device", config.device_bytes if cuda else 0, "cuda" if cuda else "cpu", False),
        MemoryTier("host", config.host_bytes, "cpu", cuda and config.pin_host_memory),
    ]
    if directory is not None:
        tiers.append(LMDBTier(Path(directory), config))
    if config.remote_url:
        tiers.append(RedisTier(config))
    return tiers


__all__ = ["TIER_NAMES", "MemoryTier", "Tier", "build_tiers"]
