"""The one way a tensor leaves a tier for the engine: onto the engine's device and dtype.

A tier keeps KV where and how it stores it (host memory in the stored dtype, LMDB bytes
decoded on the CPU, Redis bytes likewise). Whatever a read hands back, host copy,
decoded int8 or CacheGen KV, or a layer streamed from disk, reaches the engine through
``EngineTarget.move``; fusion refuses chunk KV that is not on the target, so a copy
that skipped it fails loudly on any machine instead of only on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcache.chunkstore.entry import LayerKV


@dataclass(frozen=True, slots=True)
class EngineTarget:
    """Where the engine computes: the device and dtype of its weights and KV pool."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, module: torch.nn.Module) -> EngineTarget:
        """The target of a model: the device and dtype of its first parameter."""
        weight = next(module.parameters())
        return cls(weight.device, weight.dtype)

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this device and dtype; the same tensor when it is there already."""
        if tensor.device == self.device and tensor.dtype == self.dtype:
            return tensor
        # A pinned host copy can be copied to a GPU asynchronously; its use on the
        # same stream is ordered after the copy.
        return tensor.to(device=self.device, dtype=self.dtype, non_blocking=tensor.is_pinned())

    def move_layer(self, kv: LayerKV) -> LayerKV:
        return self.move(kv[0]), self.move(kv[1])

    def holds(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self.device and tensor.dtype == self.dtype


__all__ = ["EngineTarget"]
