"""ChunkStore: put/get/contains/delete/clear/stats over the tiers, fastest first.

A hit in a slower tier promotes the entry to the fastest enabled tier. Making room in a
tier evicts by its policy; an evicted entry is copied one tier down only when no
slower tier has it, so later evictions just drop the faster copy. Guards (the
knowledge tree) may veto an eviction or a placement and hear when an entry leaves
the store altogether.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry, CorruptEntryError, EntryHeader, LayerKV
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.lmdb_tier import LMDBTier
from ragcache.chunkstore.policy import CostModel, ReplacementPolicy, make_policy
from ragcache.chunkstore.redis_tier import RedisTier
from ragcache.chunkstore.stats import StoreStats
from ragcache.chunkstore.tiers import Tier, build_tiers

logger = logging.getLogger(__name__)

FREQUENCY_HISTORY = 65536

LayerStream = Iterator[tuple[int, LayerKV]]


@dataclass(slots=True)
class LayerRead:
    """A hit read layer by layer: the tier that holds it, its stored positions, its
    key context (which names the codec) and the stream of (layer, (K, V))."""

    tier: str
    positions: list[int]
    num_layers: int
    context: KeyContext | None
    layers: LayerStream


class StoreGuard(Protocol):
    def can_evict(self, key: str, tier_index: int) -> bool: ...

    def can_place(self, key: str, tier_index: int) -> bool: ...

    def on_dropped(self, key: str) -> None: ...


class ChunkStore:
    def __init__(
        self,
        config: ChunkStoreConfig | None = None,
        directory: str | Path | None = None,
        cost_model: CostModel | None = None,
        tiers: Sequence[Tier] | None = None,
    ) -> None:
        self.config = config or ChunkStoreConfig()
        self.cost_model = cost_model or CostModel()
        self.tiers: list[Tier] = (
            list(tiers) if tiers is not None else build_tiers(self.config, directory)
        )
        self.tier_names = tuple(tier.name for tier in self.tiers)
        self.policies: list[ReplacementPolicy] = [
            make_policy(
                self.config.policy,
                self.config.pgdsf_frequency_exponent,
                self.config.pgdsf_admission,
            )
            for _ in self.tiers
        ]
        self.stats_counters = StoreStats(self.tier_names)
        self._lock = threading.RLock()
        self._guards: list[StoreGuard] = []
        self._costs: dict[str, float] = {}
        self._frequency: OrderedDict[str, int] = OrderedDict()
        self._load_disk()

    # ---- setup -------------------------------------------------------------------

    @property
    def disk(self) -> LMDBTier | None:
        return next((tier for tier in self.tiers if isinstance(tier, LMDBTier)), None)

    @property
    def _disk_index(self) -> int:
        return next(i for i, tier in enumerate(self.tiers) if isinstance(tier, LMDBTier))

    def _write_through_indices(self) -> list[int]:
        """The tiers every put is also written to: disk (a restart finds it) and remote
        (other replicas find it), as configured."""
        wanted = {"disk": self.config.write_through, "remote": self.config.remote_write_through}
        return [i for i, tier in enumerate(self.tiers) if wanted.get(tier.name, False)]

    def _load_disk(self) -> None:
        disk = self.disk
        if disk is None:
            return
        index = self._disk_index
        scanned = list(disk.scan_headers())
        disk.delete_many(key for key, found in scanned if isinstance(found, CorruptEntryError))
        for key, header in scanned:
            if isinstance(header, CorruptEntryError):
                self._drop_corrupt(index, key, header)
                continue
            cost = self._cost_of(header.token_ids, header.positions)
            self._costs[key] = cost
            self.policies[index].on_insert(key, disk.size_of(key), cost)

    def add_guard(self, guard: StoreGuard) -> None:
        with self._lock:
            self._guards.append(guard)

    def remove_guard(self, guard: StoreGuard) -> None:
        with self._lock:
            self._guards.remove(guard)

    def _cost_of(self, token_ids: Sequence[int], positions: Sequence[int]) -> float:
        return self.cost_model.seconds(len(token_ids), int(positions[0]) if positions else 0)

    # ---- queries -----------------------------------------------------------------

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def tier_indices(self, key: str) -> list[int]:
        return [i for i, tier in enumerate(self.tiers) if tier.contains(key)]

    def fastest_tier_index(self, key: str) -> int | None:
        # Stops at the first tier holding the key: slower tiers (Redis) are not asked.
        return next((i for i, tier in enumerate(self.tiers) if tier.contains(key)), None)

    def tier_of(self, key: str) -> str | None:
        index = self.fastest_tier_index(key)
        return None if index is None else self.tier_names[index]

    @property
    def top_tier_index(self) -> int:
        return next(i for i, tier in enumerate(self.tiers) if tier.enabled)

    def headers(self) -> list[EntryHeader]:
        """Headers of every valid record on disk (corrupt ones are dropped)."""
        disk = self.disk
        if disk is None:
            return []
        found = []
        for key, header in list(disk.scan_headers()):
            if isinstance(header, CorruptEntryError):
                with self._lock:
                    self._drop_corrupt(self._disk_index, key, header)
            else:
                found.append(header)
        return found

    # ---- writes ------------------------------------------------------------------

    def put(self, entry: ChunkEntry, cost: float | None = None) -> bool:
        """Stores in the fastest tier that can hold it (and on disk when writing
        through). Returns False when no tier could make room."""
        with self._lock:
            if cost is None:
                cost = self._cost_of(entry.token_ids, entry.positions)
            self._costs[entry.key] = cost
            self._count_request(entry.key)
            placed = False
            for index in range(len(self.tiers)):
                if self._place(entry, index):
                    placed = True
                    break
            if placed:
                for index in self._write_through_indices():
                    self._place(entry, index)
            if not placed:
                self.stats_counters.rejected_puts += 1
                self._costs.pop(entry.key, None)
            return placed

    def _count_request(self, key: str) -> int:
        count = self._frequency.pop(key, 0) + 1
        self._frequency[key] = count
        if len(self._frequency) > FREQUENCY_HISTORY:
            self._frequency.popitem(last=False)
        for policy in self.policies:
            policy.on_request(key)
        return count

    def _place(self, entry: ChunkEntry, index: int) -> bool:
        tier = self.tiers[index]
        if not tier.enabled:
            return False
        if tier.contains(entry.key):
            return True
        if not all(guard.can_place(entry.key, index) for guard in self._guards):
            return False
        prepared = tier.prepare(entry)
        if prepared.nbytes > tier.capacity_bytes:
            return False
        if not self._make_room(index, prepared.nbytes, entry.key):
            return False
        tier.put(prepared)
        self.policies[index].on_insert(
            entry.key,
            prepared.nbytes,
            self._costs.get(entry.key, 0.0),
            self._frequency.get(entry.key, 1),
        )
        return True

    def _make_room(self, index: int, nbytes: int, newcomer: str) -> bool:
        """Evicts for ``newcomer`` if its policy admits it over the entries it would
        push out."""
        tier = self.tiers[index]
        policy = self.policies[index]
        excess = tier.used_bytes + nbytes - tier.capacity_bytes
        if excess <= 0:
            return True
        victims = policy.pick_victims(excess, lambda key: self._can_evict(key, index))
        if victims is None:
            return False
        if not policy.admits(newcomer, self._costs.get(newcomer, 0.0), victims):
            self.stats_counters.rejected_admissions[self.tier_names[index]] += 1
            return False
        for victim in victims:
            self._evict(victim, index)
        while tier.used_bytes + nbytes > tier.capacity_bytes:
            victim = self.policies[index].pick_victim(lambda key: self._can_evict(key, index))
            if victim is None:
                return False
            self._evict(victim, index)
        return True

    def _can_evict(self, key: str, index: int) -> bool:
        return all(guard.can_evict(key, index) for guard in self._guards)

    def _evict(self, key: str, index: int) -> None:
        tier = self.tiers[index]
        below = range(index + 1, len(self.tiers))
        if not any(self.tiers[j].contains(key) for j in below):
            entry = tier.get(key)
            if entry is not None and any(self._place(entry, j) for j in below):
                self.stats_counters.demotions += 1
        self._remove_from(index, key, evicted=True)

    def _remove_from(self, index: int, key: str, evicted: bool) -> None:
        self.tiers[index].delete(key)
        policy = self.policies[index]
        if evicted:
            policy.on_evict(key)
            self.stats_counters.evictions[self.tier_names[index]] += 1
        else:
            policy.on_remove(key)
        if not self.contains(key):
            self._costs.pop(key, None)
            for guard in list(self._guards):
                guard.on_dropped(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            indices = self.tier_indices(key)
            for index in indices:
                self._remove_from(index, key, evicted=False)
            self._frequency.pop(key, None)
            return bool(indices)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Deletes ``keys`` from every tier, the disk tier's copies in one durable
        transaction; returns how many were stored."""
        with self._lock:
            located = {key: self.tier_indices(key) for key in dict.fromkeys(keys)}
            disk = self.disk
            if disk is not None:
                index = self._disk_index
                disk.delete_many(key for key, found in located.items() if index in found)
            for key, indices in located.items():
                for index in indices:
                    self._remove_from(index, key, evicted=False)
                self._frequency.pop(key, None)
            return sum(1 for indices in located.values() if indices)

    def clear(self) -> None:
        """Empties every tier of this store; of a shared (remote) tier, only the entries
        this store wrote, so other replicas' entries stay (see docs/scale-out.md)."""
        with self._lock:
            for index, tier in enumerate(self.tiers):
                for key in tier.clearable_keys():
                    self._remove_from(index, key, evicted=False)
            for policy in self.policies:
                policy.clear()
            self._frequency.clear()

    def close(self) -> None:
        with self._lock:
            for tier in self.tiers:
                tier.close()

    # ---- reads -------------------------------------------------------------------

    def _drop_corrupt(self, index: int, key: str, error: Exception) -> None:
        logger.warning(
            "chunk entry %s in the %s tier is corrupt (%s); dropping it",
            key,
            self.tier_names[index],
            error,
        )
        self.stats_counters.corruptions += 1
        self._remove_from(index, key, evicted=False)

    def _locate(self, key: str, token_ids: Sequence[int]) -> tuple[int, object] | None:
        """The fastest tier whose copy matches ``token_ids`` and its header, counting a
        miss otherwise. Called with the lock held."""
        wanted = [int(t) for t in token_ids]
        for index, tier in enumerate(self.tiers):
            if not tier.contains(key):
                continue
            try:
                header = tier.read_header(key)
            except CorruptEntryError as error:
                self._drop_corrupt(index, key, error)
                continue
            if header is None:
                continue
            if header.token_ids != wanted:
                self.stats_counters.collisions += 1
                break
            return index, header
        self.stats_counters.misses += 1
        return None

    def _record_hit(self, key: str, index: int) -> None:
        self.stats_counters.hits[self.tier_names[index]] += 1
        frequency = self._count_request(key)
        # Each policy knows the keys its tier holds; asking the tiers would cost a Redis
        # call on every memory hit.
        for policy in self.policies:
            policy.on_access(key, frequency)

    def _promote(self, entry: ChunkEntry, index: int) -> None:
        top = self.top_tier_index
        if index <= top:
            return
        if self._place(entry, top):
            self.stats_counters.promotions += 1

    def promote(self, key: str) -> bool:
        """Copies an entry up to the fastest enabled tier without counting a hit."""
        with self._lock:
            index = self.fastest_tier_index(key)
            if index is None:
                return False
            if index <= self.top_tier_index:
                return True
        try:
            entry = self.tiers[index].get(key)
        except CorruptEntryError as error:
            with self._lock:
                self._drop_corrupt(index, key, error)
            return False
        with self._lock:
            if entry is None:
                return False
            self._promote(entry, index)
            return self.fastest_tier_index(key) == self.top_tier_index

    def get(self, key: str, token_ids: Sequence[int], promote: bool = True) -> ChunkEntry | None:
        """The entry if cached with exactly ``token_ids``, else None. Tensors of a
        memory-tier hit are the stored ones: read them, do not modify them."""
        with self._lock:
            found = self._locate(key, token_ids)
            if found is None:
                return None
            index, header = found
            if isinstance(header, ChunkEntry):
                self._record_hit(key, index)
                if promote:
                    self._promote(header, index)
                return header
        try:
            entry = self.tiers[index].get(key)
        except CorruptEntryError as error:
            with self._lock:
                self._drop_corrupt(index, key, error)
                self.stats_counters.misses += 1
            return None
        with self._lock:
            if entry is None:
                self.stats_counters.misses += 1
                return None
            self._record_hit(key, index)
            if promote:
                self._promote(entry, index)
            return entry

    def get_layers(
        self,
        key: str,
        token_ids: Sequence[int],
        layers: Iterable[int] | None = None,
        promote: bool = True,
    ) -> LayerStream | None:
        """An iterator of (layer, (K, V)) read one layer at a time, or None on a miss.

        A disk record that fails a layer checksum mid-stream is dropped and counted,
        and the iterator raises CorruptEntryError: the caller computes the chunk.
        """
        read = self.read_layers(key, token_ids, layers, promote)
        return None if read is None else read.layers

    def read_layers(
        self,
        key: str,
        token_ids: Sequence[int],
        layers: Iterable[int] | None = None,
        promote: bool = True,
    ) -> LayerRead | None:
        """Like ``get_layers``, with what a reader needs before the first layer: the
        tier it comes from, the stored positions and the key context."""
        with self._lock:
            found = self._locate(key, token_ids)
            if found is None:
                return None
            index, header = found
            self._record_hit(key, index)
        assert isinstance(header, ChunkEntry | EntryHeader)
        wanted = list(range(header.num_layers) if layers is None else layers)
        stream: LayerStream
        if isinstance(header, ChunkEntry):
            if promote:
                with self._lock:
                    self._promote(header, index)
            entry = header
            stream = ((layer, entry.layers[layer]) for layer in wanted)
        else:
            stream = self._stream_disk(key, index, header, wanted, promote)
        name = self.tier_names[index]
        return LayerRead(name, list(header.positions), header.num_layers, header.context, stream)

    def _stream_disk(
        self, key: str, index: int, header: EntryHeader, wanted: list[int], promote: bool
    ) -> LayerStream:
        tier = self.tiers[index]
        assert isinstance(tier, LMDBTier | RedisTier)
        collected: dict[int, LayerKV] = {}
        try:
            for layer, kv in tier.iter_layers(key, wanted, header):
                collected[layer] = kv
                yield layer, kv
        except CorruptEntryError as error:
            with self._lock:
                self._drop_corrupt(index, key, error)
            raise
        if promote and len(collected) == header.num_layers:
            layers = [collected[i] for i in range(header.num_layers)]
            entry = ChunkEntry(
                key, header.token_ids, header.positions, layers, header.parent_keys, header.context
            )
            with self._lock:
                self._promote(entry, index)

    def stats(self) -> dict[str, object]:
        with self._lock:
            report = self.stats_counters.report(self.config.policy, self.cost_model, self.tiers)
            per_tier = report["tiers"]
            assert isinstance(per_tier, dict)
            for tier in self.tiers:
                per_tier[tier.name].update(tier.counters())
            return report
