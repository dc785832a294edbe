"""Places cached chunk KV at its offsets in a new prompt: one rotation of the keys.

``PlacedContext`` builds the placed context one layer at a time, when a layer is read:
fusion's methods read the few layers they check, and the engine writes every layer into
its paged blocks in turn, so no buffer of the whole context's KV over every layer exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.engine.lazy_layers import LazyLayers
from ragcache.kernels import dispatch
from ragcache.kernels.rope import rope_cos_sin

# cos, sin [n, 1, D / 2] in the KV's dtype; [1, 1, D / 2] when every key moves as far.
Rope = tuple[torch.Tensor, torch.Tensor]
PartLayer = tuple[torch.Tensor, torch.Tensor, Rope | None]  # K as stored, V, its rotation
# A layer's stored K and V of every part with the rotation to its offset (root first).
PartLayers = Callable[[int], list[PartLayer]]
# Fresh KV of some tokens at one layer: (prompt indices, K, V).
LayerOverride = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def reposition(chunk: ChunkKV, start: int, inv_freq: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's keys rotated from their stored positions to start, start + 1, ..."""
    n = chunk.num_tokens
    target = torch.arange(start, start + n, dtype=torch.long)
    device = chunk.k[0].device
    delta = (target - chunk.positions.to(torch.long)).to(device)
    if not bool(delta.any()):
        return list(chunk.k)
    inv_freq = inv_freq.to(device)
    num_layers = len(chunk.k)
    stacked = torch.stack(chunk.k, dim=1)  # [n, L, Hkv, D]
    heads, dim = stacked.shape[2], stacked.shape[3]
    rotated = dispatch.rotate(stacked.reshape(n, num_layers * heads, dim), delta, inv_freq)
    return list(rotated.reshape(n, num_layers, heads, dim).unbind(dim=1))


def rotate_into(
    out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """out = keys rotated by (cos, sin), written in place; keys and out are [n, H, D]."""
    half = keys.shape[-1] // 2
    x1, x2 = keys[..., :half], keys[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)


def placement_rope(
    positions: torch.Tensor, start: int, inv_freq: torch.Tensor, dtype: torch.dtype
) -> Rope | None:
    """The rotation that moves keys stored at ``positions`` to ``start``, ``start + 1``, ...
    (None when they are there already); on ``inv_freq``'s device. A chunk stored at
    consecutive positions moves by one distance, so its rotation is one row that every
    key shares."""
    stored = positions.to(torch.long).cpu()
    delta = torch.arange(start, start + len(stored), dtype=torch.long) - stored
    if not bool(delta.any()):
        return None
    if bool((delta == delta[0]).all()):
        delta = delta[:1]
    cos, sin = rope_cos_sin(delta.to(inv_freq.device), inv_freq)
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


@dataclass(slots=True)
class PlacedContext:
    """The root's and chunks' KV at their start offsets, built per layer when read.

    ``part_layers(layer)`` gives each part's stored K and V of one layer with the
    rotation to its offset; ``end`` cuts the context (a plan that reuses a prefix);
    layers below ``fresh_layers`` come whole from ``fresh_k``/``fresh_v`` and
    ``overrides`` replace some tokens' KV at a layer (a method's recomputed tokens).
    """

    part_layers: PartLayers
    starts: list[int]
    sizes: list[int]
    num_layers: int
    head_shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    end: int = -1
    fresh_layers: int = 0
    fresh_k: list[torch.Tensor] = field(default_factory=list)
    fresh_v: list[torch.Tensor] = field(default_factory=list)
    overrides: Mapping[int, LayerOverride] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.end < 0:
            self.end = self.starts[-1] + self.sizes[-1]

    @classmethod
    def of(cls, parts: list[ChunkKV], starts: list[int], inv_freq: torch.Tensor) -> PlacedContext:
        """Parts that are in memory on the engine's device (through ``EngineTarget.move``
        or from the engine itself)."""
        first = parts[0].k[0]
        inv_freq = inv_freq.to(first.device)
        ropes = [
            placement_rope(p.positions, s, inv_freq, first.dtype)
            for p, s in zip(parts, starts, strict=True)
        ]

        def part_layers(layer: int) -> list[PartLayer]:
            return [(p.k[layer], p.v[layer], r) for p, r in zip(parts, ropes, strict=True)]

        return cls(
            part_layers,
            starts,
            [p.num_tokens for p in parts],
            len(parts[0].k),
            (int(first.shape[1]), int(first.shape[2])),
            first.dtype,
            first.device,
        )

    @property
    def k(self) -> LazyLayers:
        return LazyLayers(self.num_layers, self._shape, self.keys, self._fill_keys)

    @property
    def v(self) -> LazyLayers:
        return LazyLayers(self.num_layers, self._shape, self.values, self._fill_values)

    @property
    def _shape(self) -> tuple[int, ...]:
        return (self.end, *self.head_shape)

    def keys(self, layer: int) -> torch.Tensor:
        return self._layer(layer, keys=True)

    def values(self, layer: int) -> torch.Tensor:
        return self._layer(layer, keys=False)

    def _fill_keys(self, layer: int, rows: range, out: torch.Tensor) -> None:
        self._fill(layer, True, rows, out)

    def _fill_values(self, layer: int, rows: range, out: torch.Tensor) -> None:
        self._fill(layer, False, rows, out)

    def repaired(
        self,
        end: int,
        fresh_layers: int,
        fresh_k: list[torch.Tensor],
        fresh_v: list[torch.Tensor],
        overrides: Mapping[int, LayerOverride],
    ) -> PlacedContext:
        """The context a plan hands the engine: cut at ``end``, its first layers fresh,
        its recomputed tokens' KV where the method computed it."""
        return dataclasses.replace(
            self,
            end=end,
            fresh_layers=fresh_layers,
            fresh_k=fresh_k,
            fresh_v=fresh_v,
            overrides=overrides,
        )

    def _layer(self, layer: int, keys: bool) -> torch.Tensor:
        if layer < self.fresh_layers:
            fresh = (self.fresh_k if keys else self.fresh_v)[layer][: self.end]
            out = fresh.to(self.dtype)
            if layer in self.overrides and out.data_ptr() == fresh.data_ptr():
                out = out.clone()  # the fresh pass's tensor stays as it was computed
            self._override(layer, keys, range(self.end), out)
            return out
        out = torch.empty((self.end, *self.head_shape), dtype=self.dtype, device=self.device)
        self._fill(layer, keys, range(self.end), out)
        return out

    def _fill(self, layer: int, keys: bool, rows: range, out: torch.Tensor) -> None:
        """Writes rows ``rows`` of the placed layer into ``out`` ([len(rows), H, D]):
        the engine passes a run of its own block slots, so nothing is copied twice."""
        if layer < self.fresh_layers:
            fresh = (self.fresh_k if keys else self.fresh_v)[layer]
            out.copy_(fresh[rows.start : rows.stop])
        else:
            for (k, v, rope), start, size in zip(
                self.part_layers(layer), self.starts, self.sizes, strict=True
            ):
                first, stop = max(start, rows.start), min(start + size, rows.stop)
                if stop <= first:
                    continue
                into = out[first - rows.start : stop - rows.start]
                src = slice(first - start, stop - start)
                if not keys:
                    into.copy_(v[src])
                elif rope is None:
                    into.copy_(k[src])
                else:
                    cos, sin = rope
                    if cos.shape[0] > 1:
                        cos, sin = cos[src], sin[src]
                    rotate_into(into, k[src], cos, sin)
        self._override(layer, keys, rows, out)

    def _override(self, layer: int, keys: bool, rows: range, out: torch.Tensor) -> None:
        if layer not in self.overrides:
            return
        indices, k, v = self.overrides[layer]
        inside = (indices >= rows.start) & (indices < rows.stop)
        out[indices[inside] - rows.start] = (k if keys else v)[inside].to(self.dtype)


__all__ = ["PlacedContext", "placement_rope", "reposition", "rotate_into"]
