"""A replica's corpus store, kept as a copy of the cluster's corpus log (corpus_log.py).

Creates, deletes and ingestion commits append to the log first, as one atomic entry, and
return once this replica has applied the log up to that entry; so a write is durable in
Redis before it is acknowledged, and the replica that took it answers from it at once.
A follower thread waits on the log (a blocking stream read) and applies what other
replicas append: a change is searchable on every replica about ``follow_block_s`` at
most after it is appended, plus the time to apply it (add its vectors to the local
faiss index and commit the local LMDB). Each replica keeps its own LMDB and faiss index.

Applying is idempotent, so replaying entries already applied changes nothing: a document
whose content is already there is skipped, a removal of an absent document is a no-op,
and entries of a corpus deleted later are skipped. Consecutive changes of one corpus are
folded into one local commit. The position reached is kept in the data directory, so a
restarted replica replays only what it has not applied.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ragcache.cluster.corpus_log import (
    START,
    AddedDocument,
    CorpusLog,
    CorruptLogEntryError,
    LogEntry,
)
from ragcache.corpus.store import (
    CorpusChange,
    CorpusInfo,
    CorpusStore,
    Embed,
    validate_corpus_name,
)
from ragcache.errors import StorageBusyError
from ragcache.retriever.config import RetrieverConfig
from ragcache.service.rag_cache import RagCache

logger = logging.getLogger(__name__)

POSITION_FILE = "corpus_log_position"


class CorpusLogUnavailableError(StorageBusyError):
    """The corpus log (Redis) did not answer a write; nothing was changed."""


class SharedCorpusStore(CorpusStore):
    def __init__(
        self,
        data_dir: Path,
        dim: int,
        config: RetrieverConfig | None,
        log: CorpusLog,
        follow_block_s: float = 1.0,
        retry_s: float = 2.0,
        embed: Embed | None = None,
    ) -> None:
        super().__init__(data_dir, dim, config, embed)
        self.log = log
        self.follow_block_s = follow_block_s
        self.retry_s = retry_s
        self.position_path = data_dir / POSITION_FILE
        self.position = self._read_position()
        self.applied_entries = 0
        self.sync_errors = 0
        self.corrupt_entries = 0
        self._stop = threading.Event()
        self._try_sync("open")
        self._follower = threading.Thread(
            target=self._follow, name="ragcache-corpus-log", daemon=True
        )
        self._follower.start()

    # ---- writes: to the log first ----------------------------------------------------

    def _append(self, append: Callable[[], str]) -> None:
        import redis

        try:
            append()
        except (redis.RedisError, OSError) as error:
            raise CorpusLogUnavailableError(
                f"the shared corpus store did not answer ({type(error).__name__}); "
                "nothing was changed, retry shortly"
            ) from error
        self.sync()

    def create(self, name: str, description: str = "") -> CorpusInfo:
        validate_corpus_name(name)
        self._append(lambda: self.log.append_create(name, description))
        return self.get(name)

    def delete(self, name: str) -> None:
        self._append(lambda: self.log.append_delete(name))

    def begin_change(self, name: str) -> CorpusChange:
        self._try_sync("begin_change")
        return super().begin_change(name)

    def commit(self, change: CorpusChange) -> CorpusInfo:
        name = change.corpus.name
        ids, vectors = change.index.vectors()
        rows = {int(vector_id): row for row, vector_id in enumerate(ids.tolist())}
        added = [
            AddedDocument(record, chunks, vectors[[rows[c] for c in record.chunk_ids]])
            for record, chunks in change.added
        ]
        removed = [record.doc_id for record in change.removed]
        self._append(lambda: self.log.append_change(name, added, removed))
        return self.get(name)

    # ---- applying the log ------------------------------------------------------------

    def sync(self) -> int:
        """Applies every entry after this replica's position; returns how many."""
        applied = 0
        with self.write_lock:
            while True:
                raw = self.log.read_after(self.position)
                if not raw:
                    return applied
                entries = self._decode(raw)
                self._apply_entries(entries)
                applied += len(entries)
                if len(entries) < len(raw):
                    return applied  # stopped at a corrupt entry

    def _try_sync(self, where: str) -> None:
        import redis

        try:
            self.sync()
        except (redis.RedisError, OSError) as error:
            self.sync_errors += 1
            logger.warning("corpus log unreachable on %s (%s); serving local copy", where, error)

    def _decode(self, raw: list) -> list[LogEntry]:
        entries = []
        for entry_id, fields in raw:
            try:
                entries.append(self.log.decode(entry_id, fields))
            except CorruptLogEntryError as error:
                # Skipping it would let this replica drift from the others: stop there.
                self.corrupt_entries += 1
                logger.error("%s; this replica stops applying the corpus log there", error)
                break
        return entries

    def _apply_entries(self, entries: list[LogEntry]) -> None:
        start = 0
        while start < len(entries):
            entry = entries[start]
            end = start + 1
            if entry.op == "change":
                while (
                    end < len(entries)
                    and entries[end].op == "change"
                    and entries[end].corpus == entry.corpus
                ):
                    end += 1
                self._apply_changes(entry.corpus, entries[start:end])
            elif entry.op == "create" and not self._has(entry.corpus):
                CorpusStore.create(self, entry.corpus, entry.description)
            elif entry.op == "delete" and self._has(entry.corpus):
                CorpusStore.delete(self, entry.corpus)
            self.applied_entries += end - start
            self._save_position(entries[end - 1].entry_id)
            start = end

    def _has(self, name: str) -> bool:
        return any(info.name == name for info in self.list())

    def _apply_changes(self, corpus: str, entries: list[LogEntry]) -> None:
        if not self._has(corpus):
            return  # deleted later in the log
        final: dict[str, AddedDocument | None] = {}
        for entry in entries:
            for doc_id in entry.removed:
                final[doc_id] = None
            for doc in entry.added:
                final[doc.record.doc_id] = doc
        change = CorpusStore.begin_change(self, corpus)
        leaving = set()
        for doc_id, doc in final.items():
            existing = self.document(corpus, doc_id)
            if existing is not None and (
                doc is None or existing.content_hash != doc.record.content_hash
            ):
                leaving.add(doc_id)
        taken: set[str] = set()
        for doc_id, doc in final.items():
            existing = self.document(corpus, doc_id)
            if doc is not None and existing is not None:
                if existing.content_hash == doc.record.content_hash:
                    continue
            if existing is not None:
                change.removed.append(existing)
                change.index.remove(existing.chunk_ids)
            if doc is None or not self._content_is_new(corpus, doc, leaving, taken):
                continue
            taken.add(doc.record.content_hash)
            if doc.record.chunk_ids:
                change.index.add(doc.record.chunk_ids, np.asarray(doc.vectors, np.float32))
            change.added.append((doc.record, doc.chunks))
        if not change.is_empty:
            CorpusStore.commit(self, change)

    def _content_is_new(
        self, corpus: str, doc: AddedDocument, leaving: set[str], taken: set[str]
    ) -> bool:
        """Same content under another id is added once, as a single server does."""
        digest = doc.record.content_hash
        owner = self.doc_id_for_hash(corpus, digest)
        return digest not in taken and (owner is None or owner in leaving)

    def _read_position(self) -> str:
        try:
            return self.position_path.read_text().strip() or START
        except FileNotFoundError:
            return START

    def _save_position(self, entry_id: str) -> None:
        self.position = entry_id
        temporary = self.position_path.with_suffix(".tmp")
        temporary.write_text(entry_id)
        os.replace(temporary, self.position_path)

    # ---- the follower ----------------------------------------------------------------

    def _follow(self) -> None:
        import redis

        block_ms = max(1, int(self.follow_block_s * 1000))
        while not self._stop.is_set():
            try:
                if self.log.read_after(self.position, count=1, block_ms=block_ms):
                    self.sync()
            except (redis.RedisError, OSError) as error:
                self.sync_errors += 1
                logger.warning(
                    "corpus log unreachable (%s); retrying in %.1f s", error, self.retry_s
                )
                self._stop.wait(self.retry_s)
            except Exception:
                self.sync_errors += 1
                logger.exception("applying the corpus log failed; retrying")
                self._stop.wait(self.retry_s)

    def close(self) -> None:
        self._stop.set()
        self._follower.join(timeout=self.follow_block_s + 5)
        super().close()


def share_corpora(rag: RagCache, log: CorpusLog, follow_block_s: float = 1.0) -> None:
    """Makes ``rag`` (a parent service, before any view) keep its corpora as a copy of
    ``log``: its own store is reopened as a SharedCorpusStore on the same directory."""
    rag.corpora.close()
    rag.corpora = SharedCorpusStore(
        rag.data_dir,
        rag.embedder.dim,
        rag.config.retriever,
        log,
        follow_block_s,
        embed=rag.embedder.embed,
    )
    # The chunk collector keeps its pending records in the corpus store it was given.
    rag.collector.corpora = rag.corpora
    rag._bind_ingest()
