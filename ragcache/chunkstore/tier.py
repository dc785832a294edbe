"""The interface every storage tier implements: device, host, disk (LMDB), remote (Redis),
fastest first.

A tier stores and drops entries and reports its bytes; the store decides what goes
where and makes room (a tier never evicts on its own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ragcache.chunkstore.entry import ChunkEntry, EntryHeader, LayerKV

TIER_NAMES = ("device", "host", "disk", "remote")


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

    def num_entries(self) -> int:
        return len(self.keys())

    def clearable_keys(self) -> list[str]:
        """The keys a clear of this store removes from this tier (a shared tier narrows it)."""
        return self.keys()

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)

    def counters(self) -> dict[str, int]:
        """Tier-specific counters that ``ChunkStore.stats`` reports beside the common ones."""
        return {}

    def close(self) -> None:
        return None
