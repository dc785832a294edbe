"""Corpora on disk: document and chunk records in one LMDB, a vector index per corpus.

A corpus changes in one step. Its new vector index is written to a fresh generation
folder first; the LMDB write transaction that stores the new records and names that
generation is the commit. A change killed at any point before the commit leaves the
records and the named index as they were; unnamed generation folders are deleted
at the next open.
"""

from __future__ import annotations

import logging
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from ragcache.chunkstore.lmdb_compact import compact_environment
from ragcache.chunkstore.lmdb_health import data_file_problem, walk_problem
from ragcache.chunkstore.shared_lock import SharedLock
from ragcache.corpus.checksums import (
    CorpusDamagedError,
    file_digests,
    files_problem,
    seal,
    unseal,
)
from ragcache.corpus.pending import PendingChunks
from ragcache.errors import (
    ConflictError,
    DataDirError,
    InvalidParameterError,
    NotFoundError,
    storage_failure,
)
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.index import VectorIndex

logger = logging.getLogger(__name__)
Embed = Callable[[Sequence[str]], np.ndarray]
CORPUS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAP_SIZE = 1 << 36
RECORD_DBS = (b"corpora", b"documents", b"chunks", b"hashes")
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
class IndexDigests:
    """Digests of the files of a corpus's committed index generation."""

    generation: str
    files: dict[str, str]


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
    return seal(asdict(record))


def _prefix(corpus: str) -> bytes:
    return corpus.encode() + _SEP


def _chunk_key(corpus: str, chunk_id: int) -> bytes:
    return _prefix(corpus) + struct.pack(">Q", chunk_id)


class CorpusStore:
    def __init__(
        self,
        data_dir: Path,
        dim: int,
        config: RetrieverConfig | None = None,
        embed: Embed | None = None,
    ) -> None:
        """``embed`` (chunk texts to vectors) lets a damaged index be rebuilt."""
        self.root = data_dir
        self.embed = embed
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
        """The records environment, every page walked once; a damaged file is refused
        before it is mapped (a truncated one would kill the process with SIGBUS). It is
        not a cache: nothing else holds the documents, so it is never moved aside."""
        problem = data_file_problem(self.env_path / "data.mdb") or walk_problem(
            self.env_path, RECORD_DBS
        )
        if problem is None:
            try:
                return self._open_and_walk()
            except lmdb.Error as error:
                problem = f"{type(error).__name__}: {error}"
        raise DataDirError(
            f"{self.env_path / 'data.mdb'} is damaged ({problem}). It holds every corpus's "
            "documents and cannot be rebuilt from the other files: restore the data "
            "directory from a backup, or move it away and ingest the documents again.",
            param="data_dir",
        )

    def _open_and_walk(self) -> lmdb.Environment:
        env = lmdb.open(str(self.env_path), map_size=MAP_SIZE, max_dbs=6)
        try:
            self.corpora_db = env.open_db(b"corpora")
            self.docs_db = env.open_db(b"documents")
            self.chunks_db = env.open_db(b"chunks")
            self.hashes_db = env.open_db(b"hashes")
            self.pending_db = env.open_db(b"pending")
            self.checksums_db = env.open_db(b"index_checksums")
            with env.begin(buffers=True) as txn:
                for db in (self.corpora_db, self.docs_db, self.chunks_db, self.hashes_db):
                    for _, value in txn.cursor(db=db):
                        bytes(value[:1])
        except BaseException:
            env.close()
            raise
        return env

    @contextmanager
    def _begin(self, write: bool = False, db: str | None = None) -> Iterator[lmdb.Transaction]:
        """A transaction on the default database or on the one named by its attribute
        (``"docs_db"``): the handle is looked up under the lock, since a compaction
        reopens the environment and its handles."""
        with self._env_lock.shared():
            handle = None if db is None else getattr(self, db)
            with self.env.begin(write=write, db=handle) as txn:
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
        with self._begin(db="corpora_db") as txn:
            return [
                unseal(value, CorpusInfo, self._where("corpora", key))
                for key, value in txn.cursor()
            ]

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
                txn.delete(name.encode(), db=self.checksums_db)
            self._indexes.pop(name, None)
            shutil.rmtree(self.index_root / name, ignore_errors=True)
            self.compact()

    # ---- records -------------------------------------------------------------------

    def documents(self, name: str) -> list[DocumentRecord]:
        self.get(name)
        with self._begin(db="docs_db") as txn:
            return [
                self._document(key, txn.get(key), True)
                for key in self._keys_with_prefix(txn, self.docs_db, _prefix(name))
            ]

    def document(self, name: str, doc_id: str, verify: bool = True) -> DocumentRecord | None:
        """The document's record; ``verify=False`` skips its checksum, for removing it."""
        with self._begin() as txn:
            value = txn.get(_prefix(name) + doc_id.encode(), db=self.docs_db)
        return (
            None
            if value is None
            else self._document(_prefix(name) + doc_id.encode(), value, verify)
        )

    def doc_id_for_hash(self, name: str, content_hash: str) -> str | None:
        with self._begin() as txn:
            value = txn.get(_prefix(name) + content_hash.encode(), db=self.hashes_db)
        return None if value is None else value.decode()

    def chunks(
        self, name: str, chunk_ids: list[int], verify: bool = True
    ) -> list[ChunkRecord | None]:
        """The chunks' records; ``verify=False`` skips their checksums, for removing them."""
        with self._begin(db="chunks_db") as txn:
            values = [txn.get(_chunk_key(name, chunk_id)) for chunk_id in chunk_ids]
        return [
            None if v is None else self._chunk(_chunk_key(name, chunk_id), v, verify)
            for chunk_id, v in zip(chunk_ids, values, strict=True)
        ]

    def chunk_token_lists(self, name: str) -> list[list[int]]:
        """Token ids of every chunk of corpus ``name``."""
        return [record.token_ids for record in self._all_chunks(name)]

    # ---- pending chunk KV (see pending.py) ---------------------------------------------

    def put_pending(self, record: PendingChunks) -> None:
        with storage_errors(), self._begin(write=True) as txn:
            txn.put(record.ticket.encode(), record.encode(), db=self.pending_db)

    def remove_pending(self, ticket: str) -> None:
        with storage_errors(), self._begin(write=True) as txn:
            txn.delete(ticket.encode(), db=self.pending_db)

    def pending(self) -> list[tuple[str, PendingChunks | None]]:
        """Every pending record by ticket; None where a record does not parse."""
        with self._begin(db="pending_db") as txn:
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
                    digests = IndexDigests(generation, file_digests(folder))
                    with self._begin(write=True) as txn:
                        info = self._apply(txn, change, generation)
                        txn.put(name.encode(), _encode(digests), db=self.checksums_db)
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
        return None if value is None else unseal(value, CorpusInfo, self._where("corpora", name))

    def _where(self, table: str, key: bytes | str) -> str:
        if isinstance(key, str):
            shown = key
        elif table == "chunks":
            corpus, _, packed = bytes(key).partition(_SEP)
            shown = f"{corpus.decode(errors='replace')}, chunk {struct.unpack('>Q', packed)[0]}"
        else:
            shown = bytes(key).replace(_SEP, b"/").decode(errors="replace")
        return f"{self.env_path / 'data.mdb'}: {table} record {shown!r}"

    def _document(self, key: bytes, value: bytes, verify: bool) -> DocumentRecord:
        try:
            return unseal(value, DocumentRecord, self._where("documents", key), verify)
        except CorpusDamagedError as error:
            raise CorpusDamagedError(
                f"{error.message}; delete that document and upload it again"
            ) from None

    def _chunk(self, key: bytes, value: bytes, verify: bool = True) -> ChunkRecord:
        try:
            return unseal(value, ChunkRecord, self._where("chunks", key), verify)
        except CorpusDamagedError as error:
            raise CorpusDamagedError(
                f"{error.message}; delete the document that holds it and upload it again"
            ) from None

    def _keys_with_prefix(self, txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[bytes]:
        cursor = txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(values=False):
            if not key.startswith(prefix):
                return
            yield key

    def _load_index(self, info: CorpusInfo) -> VectorIndex:
        """The committed index, its files checked against their digests; a damaged one
        is rebuilt from the chunk records."""
        if info.index_generation is None:
            return VectorIndex.from_config(self.dim, self.config)
        folder = self.index_root / info.name / info.index_generation
        problem = self._index_files_problem(info, folder)
        if problem is None:
            try:
                return VectorIndex.load(folder, self.config)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
                problem = f"{folder} cannot be loaded ({error})"
        return self._rebuild_index(info, problem)

    def _index_files_problem(self, info: CorpusInfo, folder: Path) -> str | None:
        with self._begin() as txn:
            value = txn.get(info.name.encode(), db=self.checksums_db)
        if value is None:
            return None  # an index committed before digests were kept
        digests = unseal(value, IndexDigests, self._where("index_checksums", info.name))
        if digests.generation != info.index_generation:
            return f"the digests of {folder} name generation {digests.generation}"
        return files_problem(folder, digests.files)

    def _rebuild_index(self, info: CorpusInfo, problem: str) -> VectorIndex:
        if self.embed is None:
            raise CorpusDamagedError(
                f"corpus {info.name!r}: {problem}. Open the data directory with the service "
                "(it rebuilds the index from the document store), or delete the corpus and "
                "ingest its documents again",
                "corpus",
            )
        with self.write_lock:
            records = self._all_chunks(info.name)
            index = VectorIndex.from_config(self.dim, self.config)
            if records:
                vectors = np.asarray(self.embed([record.text for record in records]))
                index.add([record.chunk_id for record in records], vectors)
            self.commit(CorpusChange(info, index))
        logger.warning(
            "corpus %s: %s; rebuilt its index from its %d chunk records",
            info.name,
            problem,
            len(records),
        )
        return index

    def _all_chunks(self, name: str) -> list[ChunkRecord]:
        with self._begin(db="chunks_db") as txn:
            return [
                self._chunk(key, txn.get(key))
                for key in self._keys_with_prefix(txn, self.chunks_db, _prefix(name))
            ]

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
