"""The chunk KV that no live document needs any more leaves every tier.

Deleting a document or a corpus, replacing a document and a failed ingest hand the
chunks they let go of to ``forget``: the KV of each one that no other live document of
the same tenant holds is removed from every tier, with everything cached after it. Work
that may orphan KV first writes a pending record (corpus/pending.py); ``collect`` reads
the records that killed processes left behind, at start and on ``ragcache cache gc``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from ragcache.chunkstore.purge import PurgeReport, purge, unreachable
from ragcache.chunkstore.store import ChunkStore
from ragcache.corpus.pending import PendingChunks
from ragcache.corpus.store import CorpusStore
from ragcache.service.tenancy import owns

logger = logging.getLogger(__name__)


def token_digest(token_ids: Sequence[int]) -> str:
    return hashlib.blake2b(
        struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=16
    ).hexdigest()


@dataclass(slots=True)
class CollectReport:
    pending_records: int = 0
    purged: PurgeReport = field(default_factory=PurgeReport)

    def to_dict(self) -> dict[str, object]:
        return {"pending_records": self.pending_records, **asdict(self.purged)}

    def summary(self) -> str:
        purged = self.purged
        tiers = ", ".join(f"{n} {c}" for n, c in purged.removed_by_tier.items()) or "none"
        line = (
            f"{self.pending_records} pending records settled; {purged.entries_removed} "
            f"chunk entries removed ({purged.unreadable_removed} unreadable; by tier: {tiers})"
        )
        if purged.disk_file_bytes_before:
            line += (
                f"; disk file compacted from {purged.disk_file_bytes_before:,} to "
                f"{purged.disk_file_bytes_after:,} bytes"
            )
        return line


class ChunkCollector:
    def __init__(
        self, corpora: CorpusStore, store: ChunkStore, separator_ids: Sequence[int]
    ) -> None:
        self.corpora = corpora
        self.store = store
        self.separator = tuple(separator_ids)
        self._open: dict[str, PendingChunks] = {}
        self._lock = threading.Lock()

    def cache_digest(self, chunk_token_ids: Sequence[int]) -> str:
        """The digest of a chunk's KV entry: its token ids as cached, separator included."""
        return token_digest(tuple(chunk_token_ids) + self.separator)

    def live_digests(self, tenant: str) -> set[str]:
        """Digests of every chunk of the tenant's corpora."""
        return {
            self.cache_digest(token_ids)
            for info in self.corpora.list()
            if owns(tenant, info.name)
            for token_ids in self.corpora.chunk_token_lists(info.name)
        }

    def forget(self, tenant: str, digests: Iterable[str]) -> PurgeReport:
        """Removes the KV of the chunks of ``digests`` that no live document of
        ``tenant`` holds."""
        candidates = set(digests)
        if not candidates:
            return PurgeReport()
        dead = candidates - self.live_digests(tenant)
        if not dead:
            return PurgeReport()
        return purge(self.store, lambda c: c.tenant == tenant and token_digest(c.token_ids) in dead)

    def begin(self, tenant: str, token_lists: list[list[int]]) -> str:
        record = PendingChunks.new(tenant, [self.cache_digest(ids) for ids in token_lists])
        self.corpora.put_pending(record)
        with self._lock:
            self._open[record.ticket] = record
        return record.ticket

    def extend(self, ticket: str, token_lists: list[list[int]]) -> None:
        with self._lock:
            record = self._open[ticket]
            record.chunk_digests = record.chunk_digests + [
                self.cache_digest(ids) for ids in token_lists
            ]
        self.corpora.put_pending(record)

    def end(self, ticket: str) -> PurgeReport:
        with self._lock:
            record = self._open[ticket]
        try:
            report = self.forget(record.tenant, record.chunk_digests)
            self.corpora.remove_pending(ticket)
        finally:
            # A record that failed to settle stays on disk for the next collection.
            with self._lock:
                del self._open[ticket]
        return report

    def collect(self) -> CollectReport:
        """Settles the pending records of processes that are gone, then removes entries
        no lookup can reach (cached after a chunk no longer stored) and unreadable ones."""
        report = CollectReport()
        for ticket, record in self.corpora.pending():
            with self._lock:
                if ticket in self._open:
                    continue
            if record is not None and record.owner_is_running():
                continue
            if record is not None:
                report.purged.merge(self.forget(record.tenant, record.chunk_digests))
            self.corpora.remove_pending(ticket)
            report.pending_records += 1
        report.purged.merge(purge(self.store, unreachable(self.store)))
        if report.pending_records or report.purged.entries_removed:
            logger.info("chunk cache collection: %s", report.summary())
        return report


@dataclass(slots=True)
class TenantJournal:
    """The collector's journal as one tenant's ingests and deletions use it."""

    collector: ChunkCollector
    tenant: str

    def begin(self, token_lists: list[list[int]]) -> str:
        return self.collector.begin(self.tenant, token_lists)

    def extend(self, ticket: str, token_lists: list[list[int]]) -> None:
        self.collector.extend(ticket, token_lists)

    def end(self, ticket: str) -> None:
        self.collector.end(ticket)
