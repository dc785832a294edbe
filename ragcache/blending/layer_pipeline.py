"""Chunk KV placed layer by layer while it is still arriving from its tiers.

A loader thread walks the layers in order: for each layer it takes that layer of every
chunk from its tier's stream (read, checksum and decode happen inside the stream),
moves it to the engine through ``EngineTarget.move`` and rotates it into place. The
caller computes meanwhile (CacheBlend's check layers need no cached KV) and waits
only when it reads a layer that is not placed yet. A chunk whose stream ends early
(evicted between lookup and read, or a corrupt layer) is computed again on the
caller's thread, which is the engine's, and placed whole.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.placement import rotate_into
from ragcache.chunkstore.entry import LayerKV
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.kernels.rope import rope_cos_sin

Recompute = Callable[[list[int]], ChunkKV]


@dataclass(slots=True)
class StreamedChunk:
    """A chunk whose layers come from a tier: (layer, (K, V)) in layer order."""

    token_ids: list[int]
    positions: list[int]
    layers: Iterator[tuple[int, LayerKV]]
    exact: bool = True


Part = ChunkKV | StreamedChunk


class LayerPipeline:
    """Per layer, K and V of every part placed at its start offset; ``k[layer]`` and
    ``v[layer]`` wait until that layer is placed."""

    def __init__(
        self,
        parts: list[Part],
        starts: list[int],
        inv_freq: torch.Tensor,
        target: EngineTarget,
        num_layers: int,
        head_shape: tuple[int, int],
        recompute: Recompute,
    ) -> None:
        self.parts = parts
        self.starts = starts
        self.target = target
        self.num_layers = num_layers
        self.recompute = recompute
        total = starts[-1] + len(parts[-1].token_ids)
        shape = (num_layers, total, *head_shape)
        # The loader thread works in the caller's inference mode (a thread-local setting),
        # so it may write these buffers whichever kind of tensor they are.
        self._inference = torch.is_inference_mode_enabled()
        self._k = torch.empty(shape, dtype=target.dtype, device=target.device)
        self._v = torch.empty_like(self._k)
        self._inv_freq = inv_freq.to(target.device)
        self._rope = [self._rope_of(part, start) for part, start in zip(parts, starts, strict=True)]
        self._condition = threading.Condition()
        self._placed = 0
        self._lost: set[int] = set()
        self._recomputed: set[int] = set()
        self._error: BaseException | None = None
        self.load_s = 0.0  # the loader's time reading, decoding, moving and placing
        self.wait_s = 0.0  # the caller's time waiting for a layer not placed yet
        self.k: Sequence[torch.Tensor] = _LayerView(self, self._k)
        self.v: Sequence[torch.Tensor] = _LayerView(self, self._v)
        self._thread = threading.Thread(target=self._load, name="kv-layer-loader", daemon=True)
        self._thread.start()

    def _rope_of(self, part: Part, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        stored = torch.as_tensor(part.positions, dtype=torch.long)
        delta = torch.arange(start, start + len(part.token_ids), dtype=torch.long) - stored
        if not bool(delta.any()):
            return None
        cos, sin = rope_cos_sin(delta.to(self.target.device), self._inv_freq)
        dtype = self.target.dtype
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    def _place(self, index: int, layer: int, kv: LayerKV) -> None:
        start = self.starts[index]
        end = start + len(self.parts[index].token_ids)
        k, v = self.target.move_layer(kv)
        rope = self._rope[index]
        if rope is None:
            self._k[layer, start:end].copy_(k)
        else:
            rotate_into(self._k[layer, start:end], k, *rope)
        self._v[layer, start:end].copy_(v)

    def _load(self) -> None:
        began = time.perf_counter()
        with torch.inference_mode(self._inference):
            self._load_layers()
        self.load_s = time.perf_counter() - began

    def _load_layers(self) -> None:
        try:
            streams = {
                i: part.layers
                for i, part in enumerate(self.parts)
                if isinstance(part, StreamedChunk)
            }
            for layer in range(self.num_layers):
                for index, part in enumerate(self.parts):
                    if isinstance(part, ChunkKV):
                        self._place(index, layer, (part.k[layer], part.v[layer]))
                        continue
                    if index in self._lost:
                        continue
                    try:
                        got, kv = next(streams[index])
                    except Exception:  # evicted, corrupt or cut short: computed again
                        with self._condition:
                            self._lost.add(index)
                        continue
                    if got != layer:
                        raise RuntimeError(f"a tier streamed layer {got} where {layer} was due")
                    self._place(index, layer, kv)
                with self._condition:
                    self._placed = layer + 1
                    self._condition.notify_all()
        except BaseException as error:
            with self._condition:
                self._error = error
                self._condition.notify_all()

    def wait(self, layer: int) -> None:
        """Returns once ``layer`` of every part is placed (computing lost parts here)."""
        began = time.perf_counter()
        with self._condition:
            self._condition.wait_for(lambda: self._placed > layer or self._error is not None)
            self.wait_s += time.perf_counter() - began
            if self._error is not None:
                raise self._error
            lost = sorted(self._lost - self._recomputed)
        for index in lost:
            self._place_recomputed(index)

    def _place_recomputed(self, index: int) -> None:
        # The loader skips a lost part for good, so its rows are this thread's alone.
        part = self.parts[index]
        kv = self.recompute(part.token_ids)
        self._rope[index] = self._rope_of(kv, self.starts[index])
        for layer in range(self.num_layers):
            self._place(index, layer, (kv.k[layer], kv.v[layer]))
        with self._condition:
            self._recomputed.add(index)

    def finish(self) -> None:
        """Waits for every layer (and recomputes every lost part)."""
        self.wait(self.num_layers - 1)
        self._thread.join()

    @property
    def recomputed(self) -> list[int]:
        """Indices of the parts computed again because their tier lost them mid-read."""
        return sorted(self._recomputed)

    def chunk_kvs(self) -> list[ChunkKV]:
        """Every part as ChunkKV stored at its placed positions (after ``finish``)."""
        out = []
        for part, start in zip(self.parts, self.starts, strict=True):
            end = start + len(part.token_ids)
            out.append(
                ChunkKV(
                    list(part.token_ids),
                    [self._k[layer, start:end] for layer in range(self.num_layers)],
                    [self._v[layer, start:end] for layer in range(self.num_layers)],
                    torch.arange(start, end, dtype=torch.long),
                    part.exact,
                )
            )
        return out


class _LayerView(Sequence[torch.Tensor]):
    """One per-layer buffer list of a pipeline; indexing a layer waits for it."""

    def __init__(self, pipeline: LayerPipeline, buffer: torch.Tensor) -> None:
        self._pipeline = pipeline
        self._buffer = buffer

    def __len__(self) -> int:
        return self._pipeline.num_layers

    def __getitem__(self, layer):  # type: ignore[override]
        if isinstance(layer, slice):
            return [self[i] for i in range(*layer.indices(len(self)))]
        if not -len(self) <= layer < len(self):
            raise IndexError(f"layer {layer} of {len(self)}")
        layer %= len(self)
        self._pipeline.wait(layer)
        return self._buffer[layer]


__all__ = ["LayerPipeline", "StreamedChunk"]
