"""One tenant's corpora under their public names: create, list, delete, ingest, retrieve."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragcache.config import Config
from ragcache.corpus.ingest import (
    FileSource,
    Ingestor,
    IngestResult,
    KVJournal,
    parse_documents,
    read_sources,
)
from ragcache.corpus.jobs import Job, JobRunner
from ragcache.corpus.progress import Progress, no_progress
from ragcache.corpus.store import ChunkRecord, CorpusInfo, CorpusStore, DocumentRecord
from ragcache.errors import ConflictError, InvalidInputError, InvalidParameterError, NotFoundError
from ragcache.retriever.embedder import Embedder
from ragcache.retriever.retriever import Retriever
from ragcache.service.results import SourceChunk
from ragcache.service.tenancy import TenantJobs, is_reserved, owns, tenant_corpus_prefix


@dataclass(slots=True)
class IngestTotals:
    documents: int = 0
    chunks: int = 0
    jobs_running: int = 0

    def count(self, result: IngestResult) -> None:
        self.documents += len(result.added) + len(result.replaced)
        self.chunks += result.chunks_added


class TenantCorpora:
    def __init__(
        self,
        store: CorpusStore,
        tenant: str,
        ingestor: Ingestor,
        jobs: JobRunner | TenantJobs,
        embedder: Embedder,
        config: Config,
        totals: IngestTotals,
        journal: KVJournal | None = None,
    ) -> None:
        self.store = store
        self.tenant = tenant
        self.prefix = tenant_corpus_prefix(tenant)
        self.ingestor = ingestor
        self.jobs = jobs
        self.embedder = embedder
        self.config = config
        self.totals = totals
        self.journal = journal

    def stored_name(self, name: str, *, must_exist: bool = True) -> str:
        """The stored name of this tenant's corpus ``name``; unknown names raise 404
        without naming other tenants' corpora."""
        if not isinstance(name, str) or not name or is_reserved(name):
            raise InvalidParameterError(f"corpus name {name!r} is invalid", "corpus")
        stored = self.prefix + name
        if must_exist and stored not in {c.name for c in self.store.list()}:
            known = ", ".join(c.name for c in self.list()) or "none yet"
            raise NotFoundError(f"corpus {name!r} does not exist (corpora: {known})", "corpus")
        return stored

    def _public(self, info: CorpusInfo) -> CorpusInfo:
        return dataclasses.replace(info, name=info.name[len(self.prefix) :])

    def create(self, name: str, description: str = "") -> CorpusInfo:
        if isinstance(name, str) and is_reserved(name):
            raise InvalidParameterError(
                f"corpus name {name!r} is invalid: names of the form t<8 hex digits>-- "
                "are reserved for tenant namespaces",
                "name",
            )
        if self.prefix and isinstance(name, str) and len(name) > 64 - len(self.prefix):
            raise InvalidParameterError(
                f"corpus name {name!r} is too long; use at most {64 - len(self.prefix)} characters",
                "name",
            )
        stored = self.stored_name(name, must_exist=False)
        if stored in {c.name for c in self.store.list()}:
            raise ConflictError(f"corpus {name!r} already exists", "name")
        return self._public(self.store.create(stored, description))

    def list(self) -> list[CorpusInfo]:
        return [self._public(c) for c in self.store.list() if owns(self.tenant, c.name)]

    def get(self, name: str) -> CorpusInfo:
        return self._public(self.store.get(self.stored_name(name)))

    def delete(self, name: str) -> None:
        """Deletes the corpus, then the chunk KV only its documents held."""
        stored = self.stored_name(name)
        ticket = self._note(self.store.chunk_token_lists(stored))
        try:
            self.store.delete(stored)
        finally:
            self._settle(ticket)

    def _note(self, token_lists: list[list[int]]) -> str | None:
        return None if self.journal is None else self.journal.begin(token_lists)

    def _settle(self, ticket: str | None) -> None:
        if ticket is not None and self.journal is not None:
            self.journal.end(ticket)

    def documents(self, corpus: str) -> list[DocumentRecord]:
        return self.store.documents(self.stored_name(corpus))

    def ingest(
        self,
        sources: Sequence[FileSource],
        corpus: str,
        *,
        create: bool = False,
        progress: Progress = no_progress,
    ) -> IngestResult:
        documents = parse_documents(read_sources(sources))
        if create and corpus not in {c.name for c in self.list()}:
            self.create(corpus)
        result = self.ingestor.ingest(self.stored_name(corpus), documents, progress)
        self.totals.count(result)
        result.corpus = corpus
        return result

    def submit_ingest(self, sources: Sequence[FileSource], corpus: str) -> Job:
        stored = self.stored_name(corpus)
        documents = parse_documents(read_sources(sources))

        def work(progress: Progress) -> dict[str, Any]:
            self.totals.jobs_running += 1
            try:
                result = self.ingestor.ingest(stored, documents, progress)
            finally:
                self.totals.jobs_running -= 1
            self.totals.count(result)
            return {
                "added": result.added,
                "replaced": result.replaced,
                "skipped": result.skipped,
                "chunks_added": result.chunks_added,
                "kv_chunks_computed": result.kv_chunks_computed,
                "seconds": result.seconds,
            }

        job = self.jobs.submit("ingest", stored, work)
        return dataclasses.replace(job, corpus=corpus)

    def delete_document(self, corpus: str, doc_id: str) -> None:
        """Deletes the document, then the chunk KV only it held."""
        stored = self.stored_name(corpus)
        ticket = None
        try:
            with self.store.write_lock:
                change = self.store.begin_change(stored)
                # Unchecked reads: a record that fails its checksum can still be removed.
                record = self.store.document(stored, doc_id, verify=False)
                if record is None:
                    raise NotFoundError(
                        f"document {doc_id!r} is not in corpus {corpus!r}", "doc_id"
                    )
                chunks = self.store.chunks(stored, record.chunk_ids, verify=False)
                ticket = self._note([c.token_ids for c in chunks if c is not None])
                change.removed.append(record)
                change.index.remove(record.chunk_ids)
                self.store.commit(change)
        finally:
            self._settle(ticket)

    def check_k(self, k: int | None) -> int:
        k = self.config.retriever.top_k if k is None else k
        limit = self.config.service.max_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise InvalidParameterError(f"k={k!r} is invalid; expected 1 to {limit}", "k")
        return k

    def retrieve(
        self, text: str, corpus: str, k: int | None
    ) -> tuple[list[SourceChunk], list[ChunkRecord]]:
        """The ``k`` chunks of this tenant's ``corpus`` that best match ``text``, best first."""
        stored, k = self.stored_name(corpus), self.check_k(k)
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("the query text is empty; send a question", "query")
        retriever = Retriever(self.embedder, self.store.index(stored), self.config.retriever)
        hits = retriever.retrieve(text, k)
        records = self.store.chunks(stored, [hit.chunk_id for hit in hits])
        sources, found = [], []
        for hit, record in zip(hits, records, strict=True):
            if record is None:
                continue
            found.append(record)
            sources.append(
                SourceChunk(
                    record.chunk_id,
                    record.doc_id,
                    record.text,
                    hit.score,
                    record.char_start,
                    record.char_end,
                    record.source,
                )
            )
        return sources, found
