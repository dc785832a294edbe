"""Per-layer tensors built when a layer is read, so only one layer is in memory at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import overload

import torch


class LazyLayers(Sequence[torch.Tensor]):
    """``count`` layers of shape ``layer_shape``; ``build(layer)`` makes one on each read.

    Nothing is kept: a caller that reads a layer twice builds it twice, and one that
    walks the layers in order holds one at a time (the engine writing placed KV into
    its blocks), which is the point. ``fill(layer, rows, out)``, when given, writes rows
    ``rows`` of a layer straight into ``out`` (the engine's own block slots) instead.
    """

    def __init__(
        self,
        count: int,
        layer_shape: tuple[int, ...],
        build: Callable[[int], torch.Tensor],
        fill: Callable[[int, range, torch.Tensor], None] | None = None,
    ) -> None:
        self.count = count
        self.layer_shape = layer_shape
        self._build = build
        self.fill = fill

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, layer: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, layer: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, layer: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(layer, slice):
            return [self[i] for i in range(*layer.indices(self.count))]
        if not -self.count <= layer < self.count:
            raise IndexError(f"layer {layer} of {self.count}")
        return self._build(layer % self.count)


def layer_shapes(layers: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """Every layer's shape, without building the layers of a ``LazyLayers``."""
    if isinstance(layers, LazyLayers):
        return [layers.layer_shape] * len(layers)
    return [tuple(t.shape) for t in layers]


__all__ = ["LazyLayers", "layer_shapes"]
