"""Cache-aware routing across generator replicas, free of Ray so it can be read and tested
alone (RAGCache's cache-aware scheduling, applied to the choice of replica).

A chunk is named by a fingerprint of (tenant, adapter, text): the replica that prepared
it knows its cache key, the router only sees the request. Each replica reports the
fingerprints whose KV sits in its memory tiers and its queue; a request goes to the
replica holding the most of its chunks, less ``queue_weight`` chunks for every request
already waiting there. Ties go to the replica with the least in memory, so new content
spreads over the replicas instead of piling onto one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

FINGERPRINT_SEPARATOR = b"\x00"


def chunk_fingerprint(text: str, tenant: str = "", adapter: str = "") -> str:
    """A stable name of one chunk's KV as a request sees it (never Python's ``hash``)."""
    digest = xxhash.xxh3_64()
    for part in (tenant, adapter, text):
        digest.update(part.encode("utf-8"))
        digest.update(FINGERPRINT_SEPARATOR)
    return digest.hexdigest()


@dataclass(slots=True)
class ReplicaView:
    """What the router knows of one replica: its id, its chunks in memory, its queue."""

    replica_id: str
    memory_chunks: frozenset[str] = field(default_factory=frozenset)
    queue_length: int = 0

    def held(self, wanted: Iterable[str]) -> int:
        return sum(1 for fingerprint in wanted if fingerprint in self.memory_chunks)


def rank_replicas(
    wanted: Sequence[str], replicas: Sequence[ReplicaView], queue_weight: float = 1.0
) -> list[ReplicaView]:
    """Replicas best first: most of ``wanted`` in memory, less ``queue_weight`` per queued
    request; then the shorter queue, then the fewer chunks in memory, then the id."""
    unique = set(wanted)

    def order(replica: ReplicaView) -> tuple[float, int, int, str]:
        score = replica.held(unique) - queue_weight * replica.queue_length
        return (-score, replica.queue_length, len(replica.memory_chunks), replica.replica_id)

    return sorted(replicas, key=order)


class SeenChunks:
    """A replica's map from fingerprint to cache key of the chunks it prepared lately,
    so it can report which of them its memory tiers hold."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, str] = OrderedDict()

    def add(self, fingerprint: str, key: str) -> None:
        self._keys.pop(fingerprint, None)
        self._keys[fingerprint] = key
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def items(self) -> list[tuple[str, str]]:
        return list(self._keys.items())

    def __len__(self) -> int:
        return len(self._keys)
