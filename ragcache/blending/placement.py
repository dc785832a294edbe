"""Places cached chunk KV at its offsets in a new prompt: one rotation of the keys."""

from __future__ import annotations

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.kernels import dispatch


def reposition(chunk: ChunkKV, start: int, inv_freq: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's keys rotated from their stored positions to start, start + 1, ..."""
    n = chunk.num_tokens
    target = torch.arange(start, start + n, dtype=torch.long)
    delta = (target - chunk.positions.to(torch.long)).to(chunk.k[0].device)
    if not bool(delta.any()):
        return list(chunk.k)
    num_layers = len(chunk.k)
    stacked = torch.stack(chunk.k, dim=1)  # [n, L, Hkv, D]
    heads, dim = stacked.shape[2], stacked.shape[3]
    rotated = dispatch.rotate(stacked.reshape(n, num_layers * heads, dim), delta, inv_freq)
    return list(rotated.reshape(n, num_layers, heads, dim).unbind(dim=1))


def place_context(
    parts: list[ChunkKV], starts: list[int], inv_freq: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Concatenated per-layer K and V of parts placed at their start offsets (in order)."""
    placed_k = [
        reposition(part, start, inv_freq) for part, start in zip(parts, starts, strict=True)
    ]
    num_layers = len(parts[0].k)
    k = [torch.cat([pk[layer] for pk in placed_k]) for layer in range(num_layers)]
    v = [torch.cat([part.v[layer] for part in parts]) for layer in range(num_layers)]
    return k, v
