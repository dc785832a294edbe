"""The storage tiers behind one interface, fastest first: device, host, disk (LMDB).

A tier stores and drops entries and reports its bytes; the store decides what goes
where and makes room (a tier never evicts on its own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry, EntryHeader, LayerKV

TIER_NAMES = ("device", "host", "disk")


@dataclass(slots=True)
class PreparedEntry:
    """An entry in the form a tier stores it, with the bytes it will take there."""

    key: str
    nbytes: int
    payload: Any


class Tier(ABC):
    name: str
    capacity_bytes: int

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def size_of(self, key: str) -> int: ...

    @abstractmethod
    def prepare(self, entry: ChunkEntry) -> PreparedEntry: ...

    @abstractmethod
    def put(self, prepared: PreparedEntry) -> None: ...

    @abstractmethod
    def read_header(self, key: str) -> EntryHeader | ChunkEntry | None:
        """What a lookup compares token ids against, or None when absent."""

    @abstractmethod
    def get(self, key: str) -> ChunkEntry | None: ...

    @abstractmethod
    def iter_layers(self, key: str, layers: Iterable[int]) -> Iterator[tuple[int, LayerKV]]: ...

    @abstractmethod
    def delete(self, key: str) -> bool: ...

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)

    def close(self) -> None:
        return None


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
    without a directory the disk tier is left out."""
    from ragcache.chunkstore.lmdb_tier import LMDBTier

    cuda = torch.cuda.is_available()
    tiers: list[Tier] = [
        MemoryTier("device", config.device_bytes if cuda else 0, "cuda" if cuda else "cpu", False),
        MemoryTier("host", config.host_bytes, "cpu", cuda and config.pin_host_memory),
    ]
    if directory is not None:
        tiers.append(LMDBTier(Path(directory), config))
    return tiers
