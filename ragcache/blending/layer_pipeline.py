"""Chunk KV placed layer by layer while it is still arriving from its tiers.

A loader thread walks the layers in order: for each layer it takes that layer of every
chunk from its tier's stream (read, checksum and decode happen inside the stream) and
moves it to the engine through ``EngineTarget.move``; the rotation into place happens
when a layer of the placed context is read (``PlacedContext``). The caller computes
meanwhile (CacheBlend's check layers need no cached KV) and waits
only when it reads a layer that is not placed yet. A chunk whose stream ends early
(evicted between lookup and read, or a corrupt layer) is computed again on the
caller's thread, which is the engine's, and placed whole.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.placement import PartLayer, PlacedContext, Rope, placement_rope
from ragcache.chunkstore.entry import LayerKV
from ragcache.chunkstore.transfer import EngineTarget

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
    """Per layer, K and V of every part as they arrived on the engine's device, with the
    rotation to the part's start offset; ``placed()`` is the context they make, whose
    layers wait until they have arrived."""

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
        self.head_shape = head_shape
        self.recompute = recompute
        # The loader thread works in the caller's inference mode (a thread-local setting).
        self._inference = torch.is_inference_mode_enabled()
        # Per part, per layer: (K as stored, V) on the engine's device, as the tier's
        # read decoded them (its one copy of the chunk); rotated only when read.
        self._kv: list[list[LayerKV]] = [[] for _ in parts]
        self._positions = [torch.as_tensor(part.positions) for part in parts]
        self._inv_freq = inv_freq.to(target.device)
        self._rope = [self._rope_of(i) for i in range(len(parts))]
        self._condition = threading.Condition()
        self._placed = 0
        self._lost: set[int] = set()
        self._recomputed: set[int] = set()
        self._error: BaseException | None = None
        self.load_s = 0.0  # the loader's time reading, decoding and moving
        self.wait_s = 0.0  # the caller's time waiting for a layer not arrived yet
        self._thread = threading.Thread(target=self._load, name="kv-layer-loader", daemon=True)
        self._thread.start()

    def _rope_of(self, index: int) -> Rope | None:
        return placement_rope(
            self._positions[index], self.starts[index], self._inv_freq, self.target.dtype
        )

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
                        self._kv[index].append((part.k[layer], part.v[layer]))
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
                    self._kv[index].append(self.target.move_layer(kv))
                with self._condition:
                    self._placed = layer + 1
                    self._condition.notify_all()
        except BaseException as error:
            with self._condition:
                self._error = error
                self._condition.notify_all()

    def wait(self, layer: int) -> None:
        """Returns once ``layer`` of every part has arrived (computing lost parts here)."""
        began = time.perf_counter()
        with self._condition:
            self._condition.wait_for(lambda: self._placed > layer or self._error is not None)
            self.wait_s += time.perf_counter() - began
            if self._error is not None:
                raise self._error
            lost = sorted(self._lost - self._recomputed)
        for index in lost:
            self._take_recomputed(index)

    def _take_recomputed(self, index: int) -> None:
        # The loader skips a lost part for good, so its entries are this thread's alone.
        kv = self.recompute(self.parts[index].token_ids)
        self._kv[index] = list(zip(kv.k, kv.v, strict=True))
        self._positions[index] = kv.positions
        self._rope[index] = self._rope_of(index)
        with self._condition:
            self._recomputed.add(index)

    def layer_parts(self, layer: int) -> list[PartLayer]:
        """Every part's K, V and rotation at ``layer``, once that layer has arrived."""
        self.wait(layer)
        pairs = zip(self._kv, self._rope, strict=True)
        return [(kv[layer][0], kv[layer][1], rope) for kv, rope in pairs]

    def placed(self) -> PlacedContext:
        """The context of every part at its start offset, built per layer when read."""
        return PlacedContext(
            self.layer_parts,
            self.starts,
            [len(part.token_ids) for part in self.parts],
            self.num_layers,
            self.head_shape,
            self.target.dtype,
            self.target.device,
        )

    def finish(self) -> None:
        """Waits for every layer (and recomputes every lost part)."""
        self.wait(self.num_layers - 1)
        self._thread.join()

    @property
    def recomputed(self) -> list[int]:
        """Indices of the parts computed again because their tier lost them mid-read."""
        return sorted(self._recomputed)

    def chunk_kvs(self) -> list[ChunkKV]:
        """Every part as ChunkKV at its stored positions (after ``finish``)."""
        return [
            ChunkKV(
                list(part.token_ids),
                [k for k, _ in kv],
                [v for _, v in kv],
                positions,
                part.exact,
            )
            for part, kv, positions in zip(self.parts, self._kv, self._positions, strict=True)
        ]


__all__ = ["LayerPipeline", "StreamedChunk"]
