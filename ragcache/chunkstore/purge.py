"""Removing chunk KV for good: the entries a caller selects, every entry cached after
one of them (its KV attended to theirs), and unreadable entries, from every tier; then
the disk file is compacted so the bytes of removed entries leave it too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ragcache.chunkstore.entry import CorruptEntryError
from ragcache.chunkstore.store import ChunkStore


@dataclass(slots=True, frozen=True)
class StoredChunk:
    """What a selection sees of one stored entry."""

    key: str
    token_ids: tuple[int, ...]
    parent_keys: tuple[str, ...]
    tenant: str | None
    readable: bool = True


@dataclass(slots=True)
class PurgeReport:
    entries_removed: int = 0
    unreadable_removed: int = 0
    removed_by_tier: dict[str, int] = field(default_factory=dict)
    disk_file_bytes_before: int = 0
    disk_file_bytes_after: int = 0

    def merge(self, other: PurgeReport) -> None:
        self.entries_removed += other.entries_removed
        self.unreadable_removed += other.unreadable_removed
        for tier, count in other.removed_by_tier.items():
            self.removed_by_tier[tier] = self.removed_by_tier.get(tier, 0) + count
        if other.disk_file_bytes_before:
            if not self.disk_file_bytes_before:
                self.disk_file_bytes_before = other.disk_file_bytes_before
            self.disk_file_bytes_after = other.disk_file_bytes_after


def stored_chunks(store: ChunkStore) -> list[StoredChunk]:
    """Every entry of every tier once, read from the fastest tier holding it."""
    found: dict[str, StoredChunk] = {}
    for tier in store.tiers:
        for key in tier.keys():
            if key in found:
                continue
            try:
                header = tier.read_header(key)
            except CorruptEntryError:
                found[key] = StoredChunk(key, (), (), None, readable=False)
                continue
            if header is None:
                continue
            context = header.context
            found[key] = StoredChunk(
                key,
                tuple(header.token_ids),
                tuple(header.parent_keys),
                None if context is None else context.tenant,
            )
    return list(found.values())


def purge(store: ChunkStore, select: Callable[[StoredChunk], bool]) -> PurgeReport:
    """Removes the selected entries and everything cached after them; compacts the
    disk file when it lost a record."""
    report = PurgeReport()
    doomed: list[StoredChunk] = []
    doomed_keys: set[str] = set()
    for chunk in sorted(stored_chunks(store), key=lambda c: len(c.parent_keys)):
        after_doomed = not doomed_keys.isdisjoint(chunk.parent_keys)
        if not chunk.readable or after_doomed or select(chunk):
            doomed.append(chunk)
            doomed_keys.add(chunk.key)
    if not doomed:
        return report
    for chunk in doomed:
        for index in store.tier_indices(chunk.key):
            name = store.tier_names[index]
            report.removed_by_tier[name] = report.removed_by_tier.get(name, 0) + 1
    report.entries_removed = store.delete_many(chunk.key for chunk in doomed)
    report.unreadable_removed = sum(1 for chunk in doomed if not chunk.readable)
    disk = store.disk
    if disk is not None and report.removed_by_tier.get(disk.name):
        report.disk_file_bytes_before = disk.file_bytes()
        disk.compact()
        report.disk_file_bytes_after = disk.file_bytes()
    return report


def unreachable(store: ChunkStore) -> Callable[[StoredChunk], bool]:
    """A selection of entries cached after a chunk that is no longer stored: no lookup
    can reach them."""
    keys = {key for tier in store.tiers for key in tier.keys()}

    def select(chunk: StoredChunk) -> bool:
        return len(chunk.parent_keys) > 1 and chunk.parent_keys[-1] not in keys

    return select
