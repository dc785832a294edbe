"""Exact KV of chunks on a knowledge-tree path: each chunk computed after the root and
every chunk before it, in prompt order, so reusing the path needs no repair.

A path that is partly cached already is extended: the new chunks are computed against
the cached prefix's KV (placed at its positions) and themselves, never the prefix again.
"""

from __future__ import annotations

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.placement import PlacedContext
from ragcache.blending.selection_pass import BLOCK_SIZE
from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel


@torch.inference_mode()
def encode_after(
    model: LlamaModel, root: ChunkKV, prefix: list[ChunkKV], chunks: list[list[int]]
) -> list[ChunkKV]:
    """KV of ``chunks``, in this order, computed right after ``root`` and ``prefix`` (the
    path's cached chunks, in order); every chunk's keys at its offset in the prompt."""
    if not chunks:
        return []
    parts = [root, *prefix]
    starts = [0]
    for part in parts[:-1]:
        starts.append(starts[-1] + part.num_tokens)
    context = starts[-1] + parts[-1].num_tokens
    placed = PlacedContext.of(parts, starts, model.inv_freq)
    new_ids = [token for chunk in chunks for token in chunk]
    n = context + len(new_ids)
    pool = KVPool(
        model.spec, (n + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype, model.device
    )
    meta = contiguous_metadata([n], BLOCK_SIZE, model.device)
    slots = meta.slot_mapping
    for layer in range(model.spec.num_layers):
        pool.write_slots(layer, slots[:context], placed.keys(layer), placed.values(layer))
    positions = torch.arange(context, n, device=model.device)
    model.run_layers(
        model.embed(torch.tensor(new_ids, dtype=torch.long, device=model.device)),
        model.rope(positions),
        meta.subset(positions),
        pool,
    )
    out: list[ChunkKV] = []
    start = context
    for chunk in chunks:
        end = start + len(chunk)
        chunk_slots = slots[start:end]
        layers = [pool.read_slots(layer, chunk_slots) for layer in range(model.spec.num_layers)]
        out.append(
            ChunkKV(
                list(chunk),
                [k for k, _ in layers],
                [v for _, v in layers],
                torch.arange(start, end, dtype=torch.long),
            )
        )
        start = end
    return out
