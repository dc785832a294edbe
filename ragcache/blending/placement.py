"""Places cached chunk KV at its offsets in a new prompt: one rotation of the keys."""

from __future__ import annotations

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.kernels import dispatch
from ragcache.kernels.rope import rope_cos_sin


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


def place_context(
    parts: list[ChunkKV], starts: list[int], inv_freq: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V of parts placed at their start offsets, as one buffer per layer.

    The buffers and the RoPE tables live on the parts' device: the parts arrive there
    through ``EngineTarget.move`` (or from the engine itself).
    """
    first = parts[0].k[0]
    device = first.device
    inv_freq = inv_freq.to(device)
    if first.is_cuda:
        placed_k = [reposition(p, s, inv_freq) for p, s in zip(parts, starts, strict=True)]
        k = [torch.cat([pk[layer] for pk in placed_k]) for layer in range(len(parts[0].k))]
        v = [torch.cat([p.v[layer] for p in parts]) for layer in range(len(parts[0].k))]
        return k, v
    num_layers = len(parts[0].k)
    total = starts[-1] + parts[-1].num_tokens
    k_out = torch.empty((num_layers, total, *first.shape[1:]), dtype=first.dtype, device=device)
    v_out = torch.empty_like(k_out)
    for part, start in zip(parts, starts, strict=True):
        end = start + part.num_tokens
        target = torch.arange(start, end, dtype=torch.long)
        delta = (target - part.positions.to(torch.long)).to(device)
        cos, sin = rope_cos_sin(delta, inv_freq)
        cos = cos.to(first.dtype)[:, None, :]
        sin = sin.to(first.dtype)[:, None, :]
        moved = bool(delta.any())
        for layer in range(num_layers):
            if moved:
                rotate_into(k_out[layer, start:end], part.k[layer], cos, sin)
            else:
                k_out[layer, start:end].copy_(part.k[layer])
            v_out[layer, start:end].copy_(part.v[layer])
    return list(k_out.unbind(0)), list(v_out.unbind(0))
