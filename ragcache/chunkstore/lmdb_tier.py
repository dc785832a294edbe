"""The disk tier: one LMDB record per entry, written in its own durable transaction.

One writer at a time (a lock here, LMDB's own lock across processes), many readers.
The map doubles when full; growing needs no open transaction in this process, so
readers hold a shared lock that the resize takes exclusively.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

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
    view_layers,
)
from ragcache.chunkstore.lmdb_compact import compact_environment
from ragcache.chunkstore.lmdb_health import data_file_problem, move_aside, walk_problem
from ragcache.chunkstore.shared_lock import SharedLock
from ragcache.chunkstore.tier import PreparedEntry, Tier

T = TypeVar("T")
_Decoded = tuple[list[tuple[int, LayerKV]], CorruptEntryError | None]
VERIFY_MODES = ("always", "once")
# Looking up a record costs tens of microseconds; a few layers per lookup keep the
# stream fine-grained without paying it once per layer.
LAYERS_PER_TRANSACTION = 4


def _record_sizes(env: lmdb.Environment) -> dict[str, int]:
    """Every record's size, reading every page LMDB's own structure points to."""
    sizes: dict[str, int] = {}
    with env.begin(buffers=True) as txn, txn.cursor() as cursor:
        for key, value in cursor:
            bytes(value[:1])
            sizes[bytes(key).decode("ascii")] = len(value)
    return sizes


class LMDBTier(Tier):
    name = "disk"

    def __init__(self, directory: Path, config: ChunkStoreConfig) -> None:
        if config.disk_verify not in VERIFY_MODES:
            raise ValueError(
                f"disk_verify={config.disk_verify!r}; accepted: {', '.join(VERIFY_MODES)}"
            )
        self.capacity_bytes = config.disk_bytes
        self.codec = get_codec(config.disk_codec)
        self.verify_always = config.disk_verify == "always"
        self.directory = directory
        self.config = config
        self._write_lock = threading.Lock()
        self._resize_lock = SharedLock()
        self._verified: set[str] = set()
        self.moved_aside: Path | None = None
        self.env, self._sizes = self._open_readable()
        self._used = sum(self._sizes.values())

    def _open_readable(self) -> tuple[lmdb.Environment, dict[str, int]]:
        """The environment and every record's size; a file that fails its checks or
        its first full walk is moved aside and an empty one opened (it is a cache)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        problem = data_file_problem(self.directory / "data.mdb") or walk_problem(self.directory)
        if problem is None:
            env = None
            try:
                env = self._open_env()
                return env, _record_sizes(env)
            except (lmdb.Error, UnicodeDecodeError) as error:
                problem = f"{type(error).__name__}: {error}"
                if env is not None:
                    env.close()
        self.moved_aside = move_aside(self.directory, problem, "the chunk cache")
        self.directory.mkdir(parents=True)
        env = self._open_env()
        return env, _record_sizes(env)

    def _open_env(self) -> lmdb.Environment:
        data_file = self.directory / "data.mdb"
        existing = data_file.stat().st_size if data_file.exists() else 0
        return lmdb.open(
            str(self.directory),
            map_size=max(self.config.disk_initial_map_bytes, existing),
            max_readers=self.config.disk_max_readers,
            sync=True,
            metasync=True,
            lock=True,
            max_dbs=0,
        )

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        with self._resize_lock.shared():
            try:
                txn = self.env.begin(buffers=True)
            except lmdb.MapResizedError:
                # Another process grew the map; adopt its size.
                self.env.set_mapsize(0)
                txn = self.env.begin(buffers=True)
            try:
                yield txn
            finally:
                txn.abort()

    def _with_record(self, key: str, use: Callable[[memoryview], T]) -> T | None:
        """``use`` applied to the record inside a read transaction. A CorruptEntryError
        leaves without a traceback through this frame's transaction: an aborted
        read transaction keeps its LMDB reader slot for as long as the Python object
        lives, and a kept exception would keep it alive."""
        with self._read() as txn:
            record = txn.get(key.encode("ascii"))
            if record is None:
                return None
            try:
                return use(record)
            except CorruptEntryError as error:
                failure = error.with_traceback(None)
        del txn, record
        raise failure

    def _write(self, action: Callable[[lmdb.Transaction], None]) -> None:
        with self._write_lock:
            while True:
                try:
                    with self._resize_lock.shared(), self.env.begin(write=True) as txn:
                        action(txn)
                    return
                except lmdb.MapFullError:
                    with self._resize_lock.exclusive():
                        self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.MapResizedError:
                    with self._resize_lock.exclusive():
                        self.env.set_mapsize(0)

    @property
    def used_bytes(self) -> int:
        return self._used

    def keys(self) -> list[str]:
        return list(self._sizes)

    def contains(self, key: str) -> bool:
        return key in self._sizes

    def size_of(self, key: str) -> int:
        return self._sizes[key]

    def prepare(self, entry: ChunkEntry) -> PreparedEntry:
        record = encode_record(entry, self.codec)
        return PreparedEntry(entry.key, len(record), record)

    def put(self, prepared: PreparedEntry) -> None:
        self._write(lambda txn: txn.put(prepared.key.encode("ascii"), prepared.payload))
        self._used += prepared.nbytes - self._sizes.get(prepared.key, 0)
        self._sizes[prepared.key] = prepared.nbytes
        self._verified.add(prepared.key)

    def read_header(self, key: str) -> EntryHeader | None:
        """The record's header; raises CorruptEntryError when it fails its checks."""
        return self._with_record(key, decode_header)

    def _must_verify(self, key: str) -> bool:
        return self.verify_always or key not in self._verified

    def get(self, key: str) -> ChunkEntry | None:
        verify = self._must_verify(key)

        def decode(record: memoryview) -> ChunkEntry:
            header = decode_header(record)
            return entry_from_header(
                header, decode_layers(record, header, range(header.num_layers), verify)
            )

        entry = self._with_record(key, decode)
        if entry is not None:
            self._verified.add(key)
        return entry

    @contextmanager
    def view(self, key: str) -> Iterator[ChunkEntry | None]:
        """The entry with its layers as read-only views of the LMDB map, every layer's
        checksum checked in place (or once, per ``disk_verify``): no copy. For a
        reader that copies the KV into its own buffers anyway. The views die with
        the read transaction at the end of the ``with`` block; do not keep them, and
        do not write to this tier inside the block."""
        with self._read() as txn:
            record = txn.get(key.encode("ascii"))
            if record is None:
                yield None
                return
            verify = self._must_verify(key)
            try:
                header = decode_header(record)
                layers = view_layers(record, header, range(header.num_layers), verify)
            except CorruptEntryError as error:
                failure = error.with_traceback(None)
            else:
                if verify:
                    self._verified.add(key)
                yield entry_from_header(header, layers)
                return
        del txn, record
        raise failure

    def iter_layers(
        self, key: str, layers: Iterable[int], header: EntryHeader | None = None
    ) -> Iterator[tuple[int, LayerKV]]:
        """Reads a few layers per short transaction, so a consumer can work on layer 0
        while the rest is still on disk and no transaction outlives a ``yield``."""
        header = header or self.read_header(key)
        if header is None:
            raise KeyError(f"entry {key} is not in the disk tier")
        verify = self._must_verify(key)
        wanted = list(layers)
        for layer in wanted:
            if not 0 <= layer < header.num_layers:
                raise IndexError(f"entry {key} has {header.num_layers} layers, not {layer}")
        decoder = LayerDecoder(header, len(wanted))
        step = LAYERS_PER_TRANSACTION
        for first in range(0, len(wanted), step):
            group = list(enumerate(wanted))[first : first + step]

            def decode(record: memoryview, group: list[tuple[int, int]] = group) -> _Decoded:
                if len(record) != header.record_bytes:
                    raise CorruptEntryError(f"entry {key} changed size while being read")
                decoded: list[tuple[int, LayerKV]] = []
                try:
                    for slot, layer in group:
                        decoded.append((layer, decoder.decode(record, layer, slot, verify)))
                except CorruptEntryError as failure:
                    return decoded, failure
                return decoded, None

            found = self._with_record(key, decode)
            if found is None:
                raise KeyError(f"entry {key} left the disk tier while being read")
            decoded, error = found
            yield from decoded
            if error is not None:
                raise error
        if verify and sorted(wanted) == list(range(header.num_layers)):
            self._verified.add(key)

    def delete(self, key: str) -> bool:
        if key not in self._sizes:
            return False
        self._write(lambda txn: txn.delete(key.encode("ascii")))
        self._used -= self._sizes.pop(key)
        self._verified.discard(key)
        return True

    def delete_many(self, keys: Iterable[str]) -> int:
        """Deletes ``keys`` in one durable transaction (one sync for any number);
        returns how many were here."""
        present = [key for key in keys if key in self._sizes]
        if not present:
            return 0

        def remove(txn: lmdb.Transaction) -> None:
            for key in present:
                txn.delete(key.encode("ascii"))

        self._write(remove)
        for key in present:
            self._used -= self._sizes.pop(key)
            self._verified.discard(key)
        return len(present)

    def scan_headers(self) -> Iterator[tuple[str, EntryHeader | CorruptEntryError]]:
        """Every record's header, or the error that says why it is unusable. The errors
        carry no traceback, so a scan of any number of bad records holds no reader."""
        for key in self.keys():
            found = self._header_or_error(key)
            if found is not None:
                yield key, found

    def _header_or_error(self, key: str) -> EntryHeader | CorruptEntryError | None:
        try:
            return self.read_header(key)
        except CorruptEntryError as error:
            return error.with_traceback(None)

    def file_bytes(self) -> int:
        data_file = self.directory / "data.mdb"
        return data_file.stat().st_size if data_file.exists() else 0

    def compact(self) -> None:
        """Rewrites the file with only its live records (see lmdb_compact.py)."""
        with self._write_lock, self._resize_lock.exclusive():
            self.env = compact_environment(self.env, self.directory, self._open_env)

    def close(self) -> None:
        self.env.close()
