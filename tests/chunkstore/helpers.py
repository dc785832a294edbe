"""Small deterministic entries and stores for the chunk-store tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ragcache.chunkstore import ChunkEntry, ChunkStore, ChunkStoreConfig, KeyContext, chunk_key

CONTEXT = KeyContext("smollm2-135m@test", "float16", "raw", "", "tenant-a")
ROOT_IDS = [1, 2, 3]
# A root child's key is hashed after the root's, as the knowledge tree makes it.
ROOT_KEY = chunk_key(CONTEXT, [], ROOT_IDS)


def token_ids_for(seed: int, num_tokens: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (num_tokens,), generator=generator).tolist()


def make_entry(
    seed: int,
    num_tokens: int = 16,
    num_layers: int = 3,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float16,
    parent_keys: Sequence[str] = (),
    token_ids: Sequence[int] | None = None,
    context: KeyContext = CONTEXT,
) -> ChunkEntry:
    tokens = list(token_ids) if token_ids is not None else token_ids_for(seed, num_tokens)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (len(tokens), num_kv_heads, head_dim)
    layers = [
        (
            torch.randn(shape, generator=generator).to(dtype),
            torch.randn(shape, generator=generator).to(dtype),
        )
        for _ in range(num_layers)
    ]
    key = chunk_key(context, list(parent_keys), tokens)
    return ChunkEntry(key, tokens, list(range(len(tokens))), layers, list(parent_keys), context)


def make_store(
    directory: Path | None = None, policy: str = "pgdsf", **limits: int | str | bool
) -> ChunkStore:
    config = ChunkStoreConfig(policy=policy, disk_initial_map_bytes=1 << 20, **limits)
    return ChunkStore(config, directory)


def assert_same_layers(got: ChunkEntry, expected: ChunkEntry) -> None:
    assert got.token_ids == expected.token_ids
    assert got.positions == expected.positions
    assert got.num_layers == expected.num_layers
    for (k, v), (k_ref, v_ref) in zip(got.layers, expected.layers, strict=True):
        assert k.dtype == k_ref.dtype
        assert torch.equal(k.cpu(), k_ref), "K differs"
        assert torch.equal(v.cpu(), v_ref), "V differs"
