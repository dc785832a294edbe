"""Ingestion: parse -> chunk -> embed -> stage the index -> precompute chunk KV -> commit.

Documents are keyed by the hash of their text, so uploading the same content again
adds nothing. Everything is staged before the corpus commits in one step (see
corpus_store), so a failed or killed ingestion leaves the corpus as it was.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ragcache.corpus.progress import Progress, no_progress
from ragcache.corpus.store import ChunkRecord, CorpusChange, CorpusStore, DocumentRecord
from ragcache.errors import InvalidInputError, UnsupportedTypeError
from ragcache.retriever.chunker import Chunk, Chunker
from ragcache.retriever.documents import ACCEPTED_TYPES, Document, DocumentError, parse_bytes
from ragcache.retriever.embedder import Embedder

FileSource = str | Path | tuple[bytes, str]
KVPrecompute = Callable[[list[list[int]], Progress], int]
EMBED_BATCH = 64


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
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in ACCEPTED_TYPES)
            if not found:
                raise InvalidInputError(f"{path}: folder holds no files of accepted types")
            files.extend((p.read_bytes(), str(p)) for p in found)
        elif path.is_file():
            files.append((path.read_bytes(), str(path)))
        else:
            raise InvalidInputError(f"{path}: no such file or folder", "paths")
    if not files:
        raise InvalidInputError("no documents given; send at least one file", "files")
    return files


def parse_documents(files: Sequence[tuple[bytes, str]]) -> list[Document]:
    documents: list[Document] = []
    for data, name in files:
        try:
            documents.extend(parse_bytes(data, name))
        except DocumentError as error:
            if "unsupported file type" in error.problem:
                raise UnsupportedTypeError(str(error), "files") from None
            raise InvalidInputError(str(error), "files") from None
    return documents


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class Ingestor:
    def __init__(
        self,
        corpora: CorpusStore,
        chunker: Chunker,
        embedder: Embedder,
        precompute_kv: KVPrecompute | None,
        separator_ids: Sequence[int],
    ) -> None:
        self.corpora = corpora
        self.chunker = chunker
        self.embedder = embedder
        self.precompute_kv = precompute_kv
        self.separator_ids = list(separator_ids)

    def ingest(
        self, corpus: str, documents: Sequence[Document], progress: Progress = no_progress
    ) -> IngestResult:
        began = time.perf_counter()
        result = IngestResult(corpus)
        with self.corpora.write_lock:
            change = self.corpora.begin_change(corpus)
            fresh = self._plan(change, documents, result)
            chunks = self._chunk(fresh, progress)
            self._embed(change, chunks, progress)
            now = time.time()
            for doc in fresh:
                doc_chunks = [c for c in chunks if c.doc_id == doc.doc_id]
                record = DocumentRecord(
                    doc.doc_id,
                    content_hash(doc.text),
                    doc.source,
                    doc.metadata,
                    [c.vector_id for c in doc_chunks],
                    sum(len(c.token_ids) for c in doc_chunks),
                    now,
                )
                change.added.append((record, [_record(c, doc.source) for c in doc_chunks]))
            if self.precompute_kv is not None and chunks:
                ids = [c.token_ids + self.separator_ids for c in chunks]
                result.kv_chunks_computed = self.precompute_kv(ids, progress)
            if not change.is_empty:
                progress("commit", 0, 1)
                self.corpora.commit(change)
                progress("commit", 1, 1)
        result.chunks_added = len(chunks)
        result.seconds = time.perf_counter() - began
        return result

    def _plan(
        self, change: CorpusChange, documents: Sequence[Document], result: IngestResult
    ) -> list[Document]:
        """The documents to add: new content only; a known id with new text replaces."""
        corpus = change.corpus.name
        fresh: list[Document] = []
        seen_hashes: set[str] = set()
        seen_ids: set[str] = set()
        for doc in documents:
            digest = content_hash(doc.text)
            if digest in seen_hashes or doc.doc_id in seen_ids:
                result.skipped.append(doc.doc_id)
                continue
            seen_hashes.add(digest)
            seen_ids.add(doc.doc_id)
            existing = self.corpora.document(corpus, doc.doc_id)
            if existing is not None and existing.content_hash == digest:
                result.skipped.append(doc.doc_id)
                continue
            if existing is None and self.corpora.doc_id_for_hash(corpus, digest) is not None:
                result.skipped.append(doc.doc_id)
                continue
            if existing is not None:
                change.removed.append(existing)
                change.index.remove(existing.chunk_ids)
                result.replaced.append(doc.doc_id)
            else:
                result.added.append(doc.doc_id)
            fresh.append(doc)
        return fresh

    def _chunk(self, documents: Sequence[Document], progress: Progress) -> list[Chunk]:
        chunks: list[Chunk] = []
        for number, doc in enumerate(documents):
            progress("chunk", number, len(documents))
            chunks.extend(self.chunker.chunk(doc))
        progress("chunk", len(documents), len(documents))
        return chunks

    def _embed(self, change: CorpusChange, chunks: Sequence[Chunk], progress: Progress) -> None:
        for start in range(0, len(chunks), EMBED_BATCH):
            progress("embed", start, len(chunks))
            batch = chunks[start : start + EMBED_BATCH]
            vectors = self.embedder.embed([c.text for c in batch], batch_size=EMBED_BATCH)
            change.index.add([c.vector_id for c in batch], vectors)
        progress("embed", len(chunks), len(chunks))


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
