"""The remote tier: chunk records in a Redis that every replica reaches, after the disk tier.

Records are the disk tier's (``entry.encode_record``: a checked header, then one blob per
layer with its own checksum), under the same keys, so tenant and adapter namespaces
carry over and every read verifies every layer. In Redis, under ``remote_namespace``:

    {ns}:kv:{key}   the record
    {ns}:index      hash of key -> record bytes
    {ns}:bytes      bytes of all records, the tier's use against its cap

Writes and deletes are Lua scripts, so the index and the byte count never disagree with
the records. The store's policy decides what is written and evicted, as for every tier.

Counts come from the index (HLEN), never from listing keys. A clear removes only the
records this tier wrote (``clearable_keys``): the namespace is shared with other
replicas, whose entries stay.

Redis being down, restarting or timing out never fails a read or a put: the call is
logged and counted, the tier reads as empty and takes no writes for ``remote_retry_s``,
and the store serves from its local tiers or recomputes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from ragcache.chunkstore.codecs import get_codec
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import (
    ChunkEntry,
    CorruptEntryError,
    EntryHeader,
    LayerDecoder,
    LayerKV,
    decode_header,
    decode_layers,
    encode_record,
    entry_from_header,
)
from ragcache.chunkstore.tier import PreparedEntry, Tier

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PUT = """
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]) - old)
return 1
"""
_DELETE = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], tonumber(old))
return 1
"""


class RemoteHealth:
    """Whether to try Redis now. After a failure the tier stays away for ``retry_s``;
    an outage is logged once when it starts and once when Redis answers again."""

    def __init__(self, where: str, retry_s: float) -> None:
        self.where = where
        self.retry_s = retry_s
        self.failures = 0
        self.skipped = 0
        self.outages = 0
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()

    @property
    def reachable(self) -> bool:
        return self._down_since is None

    def usable(self) -> bool:
        with self._lock:
            if time.monotonic() >= self._retry_at:
                return True
            self.skipped += 1
            return False

    def failed(self, operation: str, error: Exception) -> None:
        with self._lock:
            self.failures += 1
            self._retry_at = time.monotonic() + self.retry_s
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        logger.warning(
            "remote tier at %s failed on %s (%s: %s); serving from local tiers, "
            "retrying every %.1f s",
            self.where,
            operation,
            type(error).__name__,
            error,
            self.retry_s,
        )

    def succeeded(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            seconds = time.monotonic() - self._down_since
            self._down_since = None
        logger.warning("remote tier at %s answers again after %.1f s", self.where, seconds)


def connect(config: ChunkStoreConfig) -> redis.Redis:
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as error:
        raise ImportError(
            "chunkstore.remote_url needs the redis client: pip install 'ragcache[cluster]'"
        ) from error
    return redis.Redis.from_url(
        config.remote_url,
        socket_timeout=config.remote_timeout_s,
        socket_connect_timeout=config.remote_timeout_s,
        # One immediate retry replaces a pooled connection that a Redis restart closed.
        retry=Retry(NoBackoff(), 1),
    )


class RedisTier(Tier):
    name = "remote"

    def __init__(self, config: ChunkStoreConfig) -> None:
        import redis

        self.capacity_bytes = config.remote_bytes
        self.codec = get_codec(config.remote_codec)
        namespace = config.remote_namespace
        self._record_prefix = f"{namespace}:kv:"
        self._index = f"{namespace}:index"
        self._bytes = f"{namespace}:bytes"
        self.client = connect(config)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._put_script = self.client.register_script(_PUT)
        self._delete_script = self.client.register_script(_DELETE)
        where = config.remote_url.rsplit("@", 1)[-1]
        self.health = RemoteHealth(where, config.remote_retry_s)
        self.bytes_read = 0
        self.bytes_written = 0
        self._written: set[str] = set()
        self._written_lock = threading.Lock()
        self._last_used = 0
        # read_header fetches the whole record (one round trip); the get or iter_layers
        # that follows on the same thread uses it instead of fetching it again.
        self._fetched = threading.local()

    def _call(self, operation: str, action: Callable[[redis.Redis], T], fallback: T) -> T:
        if not self.health.usable():
            return fallback
        try:
            result = action(self.client)
        except self._errors as error:
            self.health.failed(operation, error)
            return fallback
        self.health.succeeded()
        return result

    def _record_key(self, key: str) -> str:
        return self._record_prefix + key

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0 and self.health.usable()

    @property
    def used_bytes(self) -> int:
        value = self._call("used_bytes", lambda client: client.get(self._bytes), None)
        if value is not None:
            self._last_used = int(value)
        return self._last_used

    def keys(self) -> list[str]:
        found = self._call("keys", lambda client: client.hkeys(self._index), [])
        return [key.decode("ascii") for key in found]

    def num_entries(self) -> int:
        return int(self._call("num_entries", lambda client: client.hlen(self._index), 0))

    def clearable_keys(self) -> list[str]:
        """The records this tier wrote that are still there; other writers' stay."""
        with self._written_lock:
            mine = sorted(self._written)
        if not mine:
            return []
        found = self._call("clearable_keys", lambda client: client.hmget(self._index, mine), None)
        if found is None:
            return []
        return [key for key, size in zip(mine, found, strict=True) if size is not None]

    def contains(self, key: str) -> bool:
        record_key = self._record_key(key)
        return bool(self._call("contains", lambda client: client.exists(record_key), 0))

    def size_of(self, key: str) -> int:
        size = self._call("size_of", lambda client: client.hget(self._index, key), None)
        return 0 if size is None else int(size)

    def prepare(self, entry: ChunkEntry) -> PreparedEntry:
        record = encode_record(entry, self.codec)
        return PreparedEntry(entry.key, len(record), record)

    def put(self, prepared: PreparedEntry) -> None:
        keys = [self._record_key(prepared.key), self._index, self._bytes]
        arguments = [prepared.key, prepared.payload, prepared.nbytes]
        if self._call("put", lambda _: self._put_script(keys, arguments), None) is not None:
            self.bytes_written += prepared.nbytes
            with self._written_lock:
                self._written.add(prepared.key)

    def _fetch(self, key: str) -> bytes | None:
        fetched = getattr(self._fetched, "record", None)
        if fetched is not None and fetched[0] == key:
            self._fetched.record = None
            return fetched[1]
        record = self._call("get", lambda client: client.get(self._record_key(key)), None)
        if record is not None:
            self.bytes_read += len(record)
        return record

    def _checked_header(self, key: str, record: bytes) -> EntryHeader:
        header = decode_header(record)
        if header.key != key:
            raise CorruptEntryError(f"remote record under {key} carries key {header.key}")
        return header

    def read_header(self, key: str) -> EntryHeader | None:
        """The record's header; raises CorruptEntryError when it fails its checks."""
        self._fetched.record = None
        record = self._fetch(key)
        if record is None:
            return None
        header = self._checked_header(key, record)
        self._fetched.record = (key, record)
        return header

    def get(self, key: str) -> ChunkEntry | None:
        record = self._fetch(key)
        if record is None:
            return None
        header = self._checked_header(key, record)
        layers = decode_layers(record, header, range(header.num_layers), verify=True)
        return entry_from_header(header, layers)

    def iter_layers(
        self, key: str, layers: Iterable[int], header: EntryHeader | None = None
    ) -> Iterator[tuple[int, LayerKV]]:
        """Decodes and verifies one layer at a time from one fetched record."""
        record = self._fetch(key)
        if record is None:
            raise KeyError(f"entry {key} is not in the remote tier")
        header = self._checked_header(key, record)
        wanted = list(layers)
        for layer in wanted:
            if not 0 <= layer < header.num_layers:
                raise IndexError(f"entry {key} has {header.num_layers} layers, not {layer}")
        decoder = LayerDecoder(header, len(wanted))
        for slot, layer in enumerate(wanted):
            yield layer, decoder.decode(record, layer, slot, verify=True)

    def delete(self, key: str) -> bool:
        keys = [self._record_key(key), self._index, self._bytes]
        deleted = bool(self._call("delete", lambda _: self._delete_script(keys, [key]), 0))
        if deleted:
            with self._written_lock:
                self._written.discard(key)
        return deleted

    def counters(self) -> dict[str, int]:
        return {
            "reachable": int(self.health.reachable),
            "errors": self.health.failures,
            "outages": self.health.outages,
            "skipped_while_down": self.health.skipped,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }

    def close(self) -> None:
        self.client.close()
