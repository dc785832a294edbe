"""Ingestion: parse -> chunk -> embed -> precompute chunk KV -> commit.

Documents are keyed by the hash of their text, so uploading the same content again
adds nothing. Everything is staged before the corpus commits in one step (see
corpus/store.py), so a failed or killed ingestion leaves the corpus as it was. Only
the commit holds the corpus write lock.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ragcache.corpus.progress import Progress, no_progress
from ragcache.corpus.store import ChunkRecord, CorpusStore, DocumentRecord
from ragcache.errors import InvalidInputError, NotFoundError, UnsupportedTypeError
from ragcache.retriever.chunker import Chunk, Chunker
from ragcache.retriever.documents import ACCEPTED_TYPES, Document, DocumentError, parse_bytes
from ragcache.retriever.embedder import Embedder

FileSource = str | Path | tuple[bytes, str]
KVPrecompute = Callable[[list[list[int]], Progress], int]
EMBED_BATCH = 64
# An LMDB key holds at most 511 bytes; a document's key is its corpus name (64 at most),
# a separator and its id.
MAX_DOC_ID_BYTES = 256

log = logging.getLogger(__name__)


class KVJournal(Protocol):
    """Notes the chunks whose KV an ingest is about to compute, and, once it committed
    or failed, removes the KV that no live document needs (see pending.py)."""

    def begin(self, token_lists: list[list[int]]) -> str: ...

    def extend(self, ticket: str, token_lists: list[list[int]]) -> None: ...

    def end(self, ticket: str) -> None: ...


@dataclass(slots=True)
class IngestResult:
    corpus: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    chunks_added: int = 0
    kv_chunks_computed: int = 0
    seconds: float = 0.0


def read_sources(sources: Sequence[FileSource]) -> list[tuple[bytes, str]]:
    """(bytes, name) of every file; a folder contributes its files of accepted types."""
    files: list[tuple[bytes, str]] = []
    for source in sources:
        if isinstance(source, tuple):
            files.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            found, skipped = _folder_files(path)
            if skipped:
                log.warning("%s: skipped %d file(s): %s", path, len(skipped), "; ".join(skipped))
            if not found:
                raise InvalidInputError(
                    f"{path}: folder holds no files of accepted types "
                    f"({', '.join(ACCEPTED_TYPES)}); skipped: {'; '.join(skipped) or 'none'}",
                    "paths",
                )
            files.extend((p.read_bytes(), str(p)) for p in found)
        elif path.is_file():
            files.append((path.read_bytes(), str(path)))
        else:
            raise InvalidInputError(f"{path}: no such file or folder", "paths")
    if not files:
        raise InvalidInputError("no documents given; send at least one file", "files")
    return files


def _folder_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The files under ``folder`` of accepted types, and each other file with why it is
    left out (``name (reason)``)."""
    found: list[Path] = []
    skipped: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.suffix.lower() in ACCEPTED_TYPES:
            found.append(path)
        elif path.suffix:
            skipped.append(f"{name} (unsupported type {path.suffix.lower()})")
        else:
            skipped.append(f"{name} (no file extension)")
    return found, skipped


def parse_documents(files: Sequence[tuple[bytes, str]]) -> list[Document]:
    documents: list[Document] = []
    for data, name in files:
        try:
            documents.extend(parse_bytes(data, name))
        except DocumentError as error:
            if "unsupported file type" in error.problem:
                raise UnsupportedTypeError(str(error), "files") from None
            raise InvalidInputError(str(error), "files") from None
    for doc in documents:
        if len(doc.doc_id.encode("utf-8")) > MAX_DOC_ID_BYTES:
            raise InvalidInputError(
                f"{doc.source}: document id {doc.doc_id[:40]!r}... is longer than "
                f"{MAX_DOC_ID_BYTES} bytes (UTF-8); use a shorter 'id'",
                "files",
            )
    return documents


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(slots=True)
class StagedDocument:
    """A document ready to commit: its records and the vector of each of its chunks."""

    record: DocumentRecord
    chunks: list[ChunkRecord]
    vectors: np.ndarray


class Ingestor:
    """Chunks, embeds and computes KV without the corpus write lock, which it takes
    only to commit: other corpora, and other changes to this one, never wait on that
    work. A commit re-reads the corpus, so a change committed meanwhile is kept and a
    document someone else added meanwhile is skipped."""

    def __init__(
        self,
        corpora: CorpusStore,
        chunker: Chunker,
        embedder: Embedder,
        precompute_kv: KVPrecompute | None,
        separator_ids: Sequence[int],
        journal: KVJournal | None = None,
    ) -> None:
        self.corpora = corpora
        self.chunker = chunker
        self.embedder = embedder
        self.precompute_kv = precompute_kv
        self.separator_ids = list(separator_ids)
        self.journal = journal

    def ingest(
        self, corpus: str, documents: Sequence[Document], progress: Progress = no_progress
    ) -> IngestResult:
        began = time.perf_counter()
        result = IngestResult(corpus)
        self.corpora.get(corpus)
        fresh = self._select(corpus, documents, result)
        chunks = self._chunk(fresh, progress)
        vectors = self._embed(chunks, progress)
        staged = self._stage(fresh, chunks, vectors)
        unique = {tuple(c.token_ids): c.token_ids for c in chunks}
        computes = self.precompute_kv is not None and bool(chunks)
        ticket = None
        if self.journal is not None and (computes or staged):
            ticket = self.journal.begin(list(unique.values()) if computes else [])
        try:
            if self.precompute_kv is not None and computes:
                ids = [token_ids + self.separator_ids for token_ids in unique.values()]
                result.kv_chunks_computed = self.precompute_kv(ids, progress)
            if staged:
                progress("commit", 0, 1)
                self._commit(corpus, staged, result, ticket)
                progress("commit", 1, 1)
        finally:
            if ticket is not None and self.journal is not None:
                self.journal.end(ticket)
        result.seconds = time.perf_counter() - began
        return result

    def _select(
        self, corpus: str, documents: Sequence[Document], result: IngestResult
    ) -> list[Document]:
        """The documents worth chunking: new content only, each content and id once."""
        fresh: list[Document] = []
        seen_hashes: set[str] = set()
        seen_ids: set[str] = set()
        for doc in documents:
            digest = content_hash(doc.text)
            if digest in seen_hashes or doc.doc_id in seen_ids:
                result.skipped.append(doc.doc_id)
                continue
            if self._known(corpus, doc.doc_id, digest):
                result.skipped.append(doc.doc_id)
                continue
            seen_hashes.add(digest)
            seen_ids.add(doc.doc_id)
            fresh.append(doc)
        return fresh

    def _known(self, corpus: str, doc_id: str, digest: str) -> bool:
        """Whether the corpus already holds this content (under this id or another)."""
        existing = self.corpora.document(corpus, doc_id)
        if existing is not None:
            return existing.content_hash == digest
        return self.corpora.doc_id_for_hash(corpus, digest) is not None

    def _chunk(self, documents: Sequence[Document], progress: Progress) -> list[Chunk]:
        """Every document's chunks; a chunk repeating an earlier one of its own document
        is dropped (it would only fill retrieval results with copies)."""
        chunks: list[Chunk] = []
        for number, doc in enumerate(documents):
            progress("chunk", number, len(documents))
            seen: set[tuple[int, ...]] = set()
            for chunk in self.chunker.chunk(doc):
                tokens = tuple(chunk.token_ids)
                if tokens not in seen:
                    seen.add(tokens)
                    chunks.append(chunk)
        progress("chunk", len(documents), len(documents))
        return chunks

    def _embed(self, chunks: Sequence[Chunk], progress: Progress) -> np.ndarray:
        """One vector per chunk; each distinct text is embedded once."""
        rows: dict[str, int] = {}
        for chunk in chunks:
            rows.setdefault(chunk.text, len(rows))
        texts = list(rows)
        parts: list[np.ndarray] = []
        for start in range(0, len(texts), EMBED_BATCH):
            progress("embed", start, len(texts))
            batch = texts[start : start + EMBED_BATCH]
            parts.append(np.asarray(self.embedder.embed(batch, batch_size=EMBED_BATCH)))
        progress("embed", len(texts), len(texts))
        if not parts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        unique = np.concatenate(parts)
        return unique[[rows[chunk.text] for chunk in chunks]]

    def _stage(
        self, documents: Sequence[Document], chunks: Sequence[Chunk], vectors: np.ndarray
    ) -> list[StagedDocument]:
        rows: dict[str, list[int]] = {}
        for row, chunk in enumerate(chunks):
            rows.setdefault(chunk.doc_id, []).append(row)
        staged = []
        for doc in documents:
            mine = rows.get(doc.doc_id, [])
            doc_chunks = [chunks[row] for row in mine]
            record = DocumentRecord(
                doc.doc_id,
                content_hash(doc.text),
                doc.source,
                doc.metadata,
                [c.vector_id for c in doc_chunks],
                sum(len(c.token_ids) for c in doc_chunks),
                time.time(),
            )
            chunk_records = [_record(c, doc.source) for c in doc_chunks]
            staged.append(StagedDocument(record, chunk_records, vectors[mine]))
        return staged

    def _commit(
        self,
        corpus: str,
        staged: Sequence[StagedDocument],
        result: IngestResult,
        ticket: str | None,
    ) -> None:
        """Applies ``staged`` to the corpus as it is now, under the write lock. The
        chunks of documents it replaces join the journal's ticket first, so their KV
        is removed afterwards even if the process dies right after the commit."""
        with self.corpora.write_lock:
            try:
                change = self.corpora.begin_change(corpus)
            except NotFoundError:
                # The store's own message lists every corpus, other tenants' included.
                raise NotFoundError(
                    "the corpus was deleted while this ingest ran; nothing was added", "corpus"
                ) from None
            for doc in staged:
                record = doc.record
                if self._known(corpus, record.doc_id, record.content_hash):
                    result.skipped.append(record.doc_id)
                    continue
                existing = self.corpora.document(corpus, record.doc_id)
                if existing is not None:
                    change.removed.append(existing)
                    change.index.remove(existing.chunk_ids)
                    result.replaced.append(record.doc_id)
                else:
                    result.added.append(record.doc_id)
                if record.chunk_ids:
                    change.index.add(record.chunk_ids, doc.vectors)
                change.added.append((record, doc.chunks))
                result.chunks_added += len(doc.chunks)
            if change.removed and ticket is not None and self.journal is not None:
                replaced = [c for doc in change.removed for c in self._token_lists(corpus, doc)]
                self.journal.extend(ticket, replaced)
            if not change.is_empty:
                self.corpora.commit(change)

    def _token_lists(self, corpus: str, doc: DocumentRecord) -> list[list[int]]:
        records = self.corpora.chunks(corpus, doc.chunk_ids)
        return [record.token_ids for record in records if record is not None]


def _record(chunk: Chunk, source: str) -> ChunkRecord:
    return ChunkRecord(
        chunk.vector_id,
        chunk.doc_id,
        chunk.index,
        chunk.text,
        chunk.token_ids,
        chunk.char_start,
        chunk.char_end,
        source,
    )
