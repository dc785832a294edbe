"""Background reads of the entries a query needs, consumable layer by layer.

``Prefetcher.start`` submits one read per requested chunk; ``PrefetchHandle.layers``
yields a chunk's layers as they arrive, so fusion can start on layer 0 while later
layers (and later chunks) are still coming from disk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ragcache.chunkstore.entry import LayerKV
from ragcache.chunkstore.store import ChunkStore


class LayerBuffer:
    """Layers of one chunk filled by a reader thread and drained by the caller."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._layers: list[tuple[int, LayerKV]] = []
        self._done = False
        self._found = True
        self._error: BaseException | None = None

    def push(self, layer: int, kv: LayerKV) -> None:
        with self._condition:
            self._layers.append((layer, kv))
            self._condition.notify_all()

    def finish(self, found: bool = True, error: BaseException | None = None) -> None:
        with self._condition:
            self._done = True
            self._found = found
            self._error = error
            self._condition.notify_all()

    def wait_found(self) -> bool:
        """Blocks until the first layer arrives or the read ends; False on a miss."""
        with self._condition:
            self._condition.wait_for(lambda: self._layers or self._done)
            return bool(self._layers) or (self._found and self._error is None)

    def __iter__(self) -> Iterator[tuple[int, LayerKV]]:
        index = 0
        while True:
            with self._condition:
                self._condition.wait_for(lambda i=index: i < len(self._layers) or self._done)
                if index < len(self._layers):
                    item = self._layers[index]
                elif self._error is not None:
                    raise self._error
                else:
                    return
            index += 1
            yield item


class PrefetchHandle:
    def __init__(self, buffers: dict[str, LayerBuffer], futures: list[Future[None]]) -> None:
        self._buffers = buffers
        self._futures = futures

    def found(self, key: str) -> bool:
        return self._buffers[key].wait_found()

    def layers(self, key: str) -> Iterator[tuple[int, LayerKV]]:
        """(layer, (K, V)) of ``key`` in order; empty when it was a miss."""
        try:
            buffer = self._buffers[key]
        except KeyError:
            raise KeyError(f"key {key} was not part of this prefetch") from None
        return iter(buffer)

    def wait(self) -> None:
        for future in self._futures:
            future.result()


class Prefetcher:
    def __init__(self, store: ChunkStore, max_workers: int | None = None) -> None:
        self.store = store
        workers = max_workers or store.config.prefetch_workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk-prefetch")

    def start(self, requests: Sequence[tuple[str, Sequence[int]]]) -> PrefetchHandle:
        """Starts reading every (key, token_ids) in order of the query."""
        buffers = {key: LayerBuffer() for key, _ in requests}
        futures = [
            self._pool.submit(self._read, key, token_ids, buffers[key])
            for key, token_ids in requests
        ]
        return PrefetchHandle(buffers, futures)

    def _read(self, key: str, token_ids: Sequence[int], buffer: LayerBuffer) -> None:
        try:
            stream = self.store.get_layers(key, token_ids)
            if stream is None:
                buffer.finish(found=False)
                return
            for layer, kv in stream:
                buffer.push(layer, kv)
        except Exception as error:  # handed to the consumer, who decides to recompute
            buffer.finish(error=error)
            return
        buffer.finish()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
