"""Corpora on disk: document and chunk records in one LMDB, a vector index per corpus.

A corpus changes in one step. Its new vector index is written to a fresh generation
folder first; the LMDB write transaction that stores the new records and names that
generation is the commit. A change killed at any point before the commit leaves the
records and the named index as they were; unnamed generation folders are deleted
at the next open.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from ragcache.chunkstore.lmdb_compact import compact_environment
from ragcache.chunkstore.shared_lock import SharedLock
from ragcache.corpus.pending import PendingChunks
from ragcache.errors import ConflictError, InvalidParameterError, NotFoundError, storage_failure
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.index import VectorIndex

CORPUS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAP_SIZE = 1 << 36
_SEP = b"\x00"


@dataclass(slots=True)
class CorpusInfo:
    name: str
    description: str = ""
    created_at: float = 0.0
    index_generation: str | None = None
    num_documents: int = 0
    num_chunks: int = 0


@dataclass(slots=True)
class DocumentRecord:
    doc_id: str
    content_hash: str
    source: str
    metadata: dict[str, Any]
    chunk_ids: list[int]
    num_tokens: int
    added_at: float


@dataclass(slots=True)
class ChunkRecord:
    chunk_id: int
    doc_id: str
    index: int
    text: str
    token_ids: list[int]
    char_start: int
    char_end: int
    source: str


@dataclass(slots=True)
class CorpusChange:
    """A staged change: the corpus's next index and the records to add and remove."""

    corpus: CorpusInfo
    index: VectorIndex
    added: list[tuple[DocumentRecord, list[ChunkRecord]]] = field(default_factory=list)
    removed: list[DocumentRecord] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.added and not self.removed


@contextmanager
def storage_errors() -> Iterator[None]:
    """Disk full and LMDB map full leave as StorageFullError, a message a user can act on."""
    try:
        yield
    except Exception as error:
        known = storage_failure(error)
        if known is None:
            raise
        raise known from error


def validate_corpus_name(name: str) -> str:
    if not isinstance(name, str) or not CORPUS_NAME.match(name):
        raise InvalidParameterError(
            f"corpus name {name!r} is invalid; use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit",
            param="name",
        )
    return name


def _encode(record: Any) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode()


def _prefix(corpus: str) -> bytes:
    return corpus.encode() + _SEP


def _chunk_key(corpus: str, chunk_id: int) -> bytes:
    return _prefix(corpus) + struct.pack(">Q", chunk_id)


class CorpusStore:
    def __init__(self, data_dir: Path, dim: int, config: RetrieverConfig | None = None) -> None:
        self.root = data_dir
        self.dim = dim
        self.config = config or RetrieverConfig()
        self.index_root = data_dir / "indexes"
        self.index_root.mkdir(parents=True, exist_ok=True)
        self.env_path = data_dir / "corpora.lmdb"
        self._env_lock = SharedLock()
        self.env = self._open_env()
        self.write_lock = threading.RLock()
        self._indexes: dict[str, VectorIndex] = {}
        self._remove_uncommitted_indexes()

    def _open_env(self) -> lmdb.Environment:
        env = lmdb.open(str(self.env_path), map_size=MAP_SIZE, max_dbs=5)
        self.corpora_db = env.open_db(b"corpora")
        self.docs_db = env.open_db(b"documents")
        self.chunks_db = env.open_db(b"chunks")
        self.hashes_db = env.open_db(b"hashes")
        self.pending_db = env.open_db(b"pending")
        return env

    @contextmanager
    def _begin(self, write: bool = False, db: Any = None) -> Iterator[lmdb.Transaction]:
        with self._env_lock.shared(), self.env.begin(write=write, db=db) as txn:
            yield txn

    def compact(self) -> None:
        """Rewrites the records file without the free pages that still hold the bytes
        of deleted records (see chunkstore/lmdb_compact.py)."""
        with self.write_lock, self._env_lock.exclusive():
            self.env = compact_environment(self.env, self.env_path, self._open_env)

    def close(self) -> None:
        self.env.close()

    # ---- corpora -------------------------------------------------------------------

    def list(self) -> list[CorpusInfo]:
        with self._begin(db=self.corpora_db) as txn:
            return [CorpusInfo(**json.loads(value)) for _, value in txn.cursor()]

    def get(self, name: str) -> CorpusInfo:
        with self._begin() as txn:
            info = self._read_corpus(txn, name)
        if info is None:
            known = ", ".join(c.name for c in self.list()) or "none yet"
            raise NotFoundError(f"corpus {name!r} does not exist (corpora: {known})", "corpus")
        return info

    def create(self, name: str, description: str = "") -> CorpusInfo:
        validate_corpus_name(name)
        with self.write_lock, storage_errors(), self._begin(write=True) as txn:
            if self._read_corpus(txn, name) is not None:
                raise ConflictError(f"corpus {name!r} already exists", "name")
            info = CorpusInfo(name, description, time.time())
            txn.put(name.encode(), _encode(info), db=self.corpora_db)
        return info

    def delete(self, name: str) -> None:
        with self.write_lock:
            self.get(name)
            with storage_errors(), self._begin(write=True) as txn:
                for db in (self.docs_db, self.chunks_db, self.hashes_db):
                    for key in list(self._keys_with_prefix(txn, db, _prefix(name))):
                        txn.delete(key, db=db)
                txn.delete(name.encode(), db=self.corpora_db)
            self._indexes.pop(name, None)
            shutil.rmtree(self.index_root / name, ignore_errors=True)
            self.compact()

    # ---- records -------------------------------------------------------------------

    def documents(self, name: str) -> list[DocumentRecord]:
        self.get(name)
        with self._begin(db=self.docs_db) as txn:
            return [
                DocumentRecord(**json.loads(txn.get(key)))
                for key in self._keys_with_prefix(txn, self.docs_db, _prefix(name))
            ]

    def document(self, name: str, doc_id: str) -> DocumentRecord | None:
        with self._begin() as txn:
            value = txn.get(_prefix(name) + doc_id.encode(), db=self.docs_db)
        return None if value is None else DocumentRecord(**json.loads(value))

    def doc_id_for_hash(self, name: str, content_hash: str) -> str | None:
        with self._begin() as txn:
            value = txn.get(_prefix(name) + content_hash.encode(), db=self.hashes_db)
        return None if value is None else value.decode()

    def chunks(self, name: str, chunk_ids: list[int]) -> list[ChunkRecord | None]:
        with self._begin(db=self.chunks_db) as txn:
            values = [txn.get(_chunk_key(name, chunk_id)) for chunk_id in chunk_ids]
        return [None if v is None else ChunkRecord(**json.loads(v)) for v in values]

    def chunk_token_lists(self, name: str) -> list[list[int]]:
        """Token ids of every chunk of corpus ``name``."""
        with self._begin(db=self.chunks_db) as txn:
            return [
                json.loads(txn.get(key))["token_ids"]
                for key in self._keys_with_prefix(txn, self.chunks_db, _prefix(name))
            ]

    # ---- pending chunk KV (see pending.py) ---------------------------------------------

    def put_pending(self, record: PendingChunks) -> None:
        with storage_errors(), self._begin(write=True) as txn:
            txn.put(record.ticket.encode(), record.encode(), db=self.pending_db)

    def remove_pending(self, ticket: str) -> None:
        with storage_errors(), self._begin(write=True) as txn:
            txn.delete(ticket.encode(), db=self.pending_db)

    def pending(self) -> list[tuple[str, PendingChunks | None]]:
        """Every pending record by ticket; None where a record does not parse."""
        with self._begin(db=self.pending_db) as txn:
            return [
                (bytes(key).decode(), PendingChunks.decode(value)) for key, value in txn.cursor()
            ]

    def index(self, name: str) -> VectorIndex:
        """The live index of a corpus (shared; never modify it, stage a change)."""
        info = self.get(name)
        cached = self._indexes.get(name)
        if cached is None:
            cached = self._load_index(info)
            self._indexes[name] = cached
        return cached

    # ---- changes -------------------------------------------------------------------

    def begin_change(self, name: str) -> CorpusChange:
        """A private copy of the corpus's index to stage a change on; hold write_lock."""
        info = self.get(name)
        return CorpusChange(info, self._load_index(info))

    def commit(self, change: CorpusChange) -> CorpusInfo:
        name = change.corpus.name
        generation = uuid.uuid4().hex[:16]
        folder = self.index_root / name / generation
        with self.write_lock:
            try:
                with storage_errors():
                    change.index.save(folder)
                    with self._begin(write=True) as txn:
                        info = self._apply(txn, change, generation)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._indexes[name] = change.index
            self._remove_uncommitted_indexes(name)
            if change.removed:
                self.compact()
        return info

    def _apply(self, txn: lmdb.Transaction, change: CorpusChange, generation: str) -> CorpusInfo:
        name = change.corpus.name
        info = self._read_corpus(txn, name)
        if info is None:
            raise NotFoundError(f"corpus {name!r} was deleted during the change", "corpus")
        if info.index_generation != change.corpus.index_generation:
            raise ConflictError(f"corpus {name!r} changed while this change was staged")
        prefix = _prefix(name)
        for doc in change.removed:
            txn.delete(prefix + doc.doc_id.encode(), db=self.docs_db)
            txn.delete(prefix + doc.content_hash.encode(), db=self.hashes_db)
            for chunk_id in doc.chunk_ids:
                txn.delete(_chunk_key(name, chunk_id), db=self.chunks_db)
            info.num_documents -= 1
            info.num_chunks -= len(doc.chunk_ids)
        for doc, chunks in change.added:
            txn.put(prefix + doc.doc_id.encode(), _encode(doc), db=self.docs_db)
            txn.put(prefix + doc.content_hash.encode(), doc.doc_id.encode(), db=self.hashes_db)
            for chunk in chunks:
                txn.put(_chunk_key(name, chunk.chunk_id), _encode(chunk), db=self.chunks_db)
            info.num_documents += 1
            info.num_chunks += len(chunks)
        info.index_generation = generation
        txn.put(name.encode(), _encode(info), db=self.corpora_db)
        return info

    # ---- helpers -------------------------------------------------------------------

    def _read_corpus(self, txn: lmdb.Transaction, name: str) -> CorpusInfo | None:
        value = txn.get(name.encode(), db=self.corpora_db)
        return None if value is None else CorpusInfo(**json.loads(value))

    def _keys_with_prefix(self, txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[bytes]:
        cursor = txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(values=False):
            if not key.startswith(prefix):
                return
            yield key

    def _load_index(self, info: CorpusInfo) -> VectorIndex:
        if info.index_generation is None:
            return VectorIndex.from_config(self.dim, self.config)
        return VectorIndex.load(self.index_root / info.name / info.index_generation, self.config)

    def _remove_uncommitted_indexes(self, only: str | None = None) -> None:
        """Deletes index folders no corpus record names: leftovers of killed changes."""
        named = {c.name: c.index_generation for c in self.list()}
        for folder in sorted(self.index_root.iterdir()):
            if only is not None and folder.name != only:
                continue
            if folder.name not in named:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for generation in folder.iterdir():
                if generation.name != named[folder.name]:
                    shutil.rmtree(generation, ignore_errors=True)
