"""The corpus log: every corpus change of a cluster, in order, in a Redis stream that every
replica reaches. It is the durable store of the cluster's corpora; each replica's
corpus store is a copy that applies it (shared_corpora.py).

In Redis, under a namespace:

    {ns}:corpora   hash of corpus name -> its description, for the checks at append time
    {ns}:log       stream of changes: op (create | delete | change), corpus, body, sum

A change's body holds the ids of the documents it removes and the records of the
documents it adds, each with its chunks and their embedding vectors; ``sum`` is an
xxh3-128 of the body, checked before a replica applies an entry. Each append is one Lua
script, so the check (the corpus exists, or does not) and the append are atomic.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from ragcache.corpus.store import ChunkRecord, DocumentRecord
from ragcache.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    import redis

_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XADD', KEYS[2], '*', 'op', 'create', 'corpus', ARGV[1],
                  'body', ARGV[2], 'sum', ARGV[3])
"""
_DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', 'op', 'delete', 'corpus', ARGV[1],
                  'body', '', 'sum', ARGV[2])
"""
_CHANGE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', 'op', 'change', 'corpus', ARGV[1],
                  'body', ARGV[2], 'sum', ARGV[3])
"""

START = "0-0"


class CorruptLogEntryError(ValueError):
    """A log entry whose body does not match its checksum."""


@dataclass(slots=True)
class AddedDocument:
    record: DocumentRecord
    chunks: list[ChunkRecord]
    vectors: np.ndarray


@dataclass(slots=True)
class LogEntry:
    """One change of one corpus. ``added`` and ``removed`` are set for op == "change"."""

    entry_id: str
    op: str
    corpus: str
    description: str = ""
    added: list[AddedDocument] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def checksum(body: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(body)


def encode_change(added: list[AddedDocument], removed: list[str]) -> bytes:
    documents = [
        {
            "record": asdict(doc.record),
            "chunks": [asdict(chunk) for chunk in doc.chunks],
            "vectors": base64.b64encode(np.ascontiguousarray(doc.vectors, np.float32)).decode(),
        }
        for doc in added
    ]
    return json.dumps({"removed": removed, "added": documents}, separators=(",", ":")).encode()


def decode_change(body: bytes, dim: int) -> tuple[list[AddedDocument], list[str]]:
    parsed: dict[str, Any] = json.loads(body)
    added = []
    for doc in parsed["added"]:
        vectors = np.frombuffer(base64.b64decode(doc["vectors"]), dtype=np.float32)
        added.append(
            AddedDocument(
                DocumentRecord(**doc["record"]),
                [ChunkRecord(**chunk) for chunk in doc["chunks"]],
                vectors.reshape(-1, dim).copy(),
            )
        )
    return added, list(parsed["removed"])


class CorpusLog:
    """Appends to and reads the corpus log of one namespace."""

    def __init__(self, client: redis.Redis, namespace: str, dim: int) -> None:
        self.client = client
        self.dim = dim
        self.corpora_key = f"{namespace}:corpora"
        self.log_key = f"{namespace}:log"
        self._create = client.register_script(_CREATE)
        self._delete = client.register_script(_DELETE)
        self._change = client.register_script(_CHANGE)

    def append_create(self, corpus: str, description: str) -> str:
        body = description.encode()
        entry_id = self._create([self.corpora_key, self.log_key], [corpus, body, checksum(body)])
        if entry_id is None:
            raise ConflictError(f"corpus {corpus!r} already exists", "name")
        return entry_id.decode()

    def append_delete(self, corpus: str) -> str:
        entry_id = self._delete([self.corpora_key, self.log_key], [corpus, checksum(b"")])
        if entry_id is None:
            raise NotFoundError(f"corpus {corpus!r} does not exist", "corpus")
        return entry_id.decode()

    def append_change(self, corpus: str, added: list[AddedDocument], removed: list[str]) -> str:
        body = encode_change(added, removed)
        entry_id = self._change([self.corpora_key, self.log_key], [corpus, body, checksum(body)])
        if entry_id is None:
            raise NotFoundError(
                f"corpus {corpus!r} was deleted while this change was staged; nothing changed",
                "corpus",
            )
        return entry_id.decode()

    def read_after(self, position: str, count: int = 256, block_ms: int | None = None) -> list:
        """Raw entries after ``position``, oldest first; waits up to ``block_ms`` for one."""
        found = self.client.xread({self.log_key: position}, count=count, block=block_ms)
        return found[0][1] if found else []

    def decode(self, entry_id: bytes, fields: dict[bytes, bytes]) -> LogEntry:
        body = fields[b"body"]
        if checksum(body) != fields[b"sum"].decode():
            raise CorruptLogEntryError(f"corpus log entry {entry_id.decode()} fails its checksum")
        entry = LogEntry(entry_id.decode(), fields[b"op"].decode(), fields[b"corpus"].decode())
        if entry.op == "create":
            entry.description = body.decode()
        elif entry.op == "change":
            entry.added, entry.removed = decode_change(body, self.dim)
        return entry


def open_corpus_log(url: str, namespace: str, dim: int, block_s: float) -> CorpusLog:
    """A log on the Redis at ``url``; its socket timeout outlasts a follower's wait."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=block_s + 5.0, socket_connect_timeout=2.0)
    return CorpusLog(client, namespace, dim)
