"""Random paged KV batches with shuffled block tables, and a dense naive attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    query_slots: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scale: float

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())


def make_paged_case(
    seq_lens: list[int],
    query_slots: list[list[int]],
    *,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedCase:
    """KV of each sequence scattered over shuffled blocks; unwritten pool slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    keys, values = [], []
    for seq, (seq_len, count) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        table = [order.pop() for _ in range(count)]
        block_tables[seq, :count] = torch.tensor(table, dtype=torch.int32)
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        for slot in range(seq_len):
            k_cache[table[slot // block_size], slot % block_size] = k[slot]
            v_cache[table[slot // block_size], slot % block_size] = v[slot]
        keys.append(k)
        values.append(v)
    counts = [len(slots) for slots in query_slots]
    starts = torch.tensor([0, *counts], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    num_tokens = sum(counts)
    return PagedCase(
        q=torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=starts,
        query_slots=torch.tensor([s for slots in query_slots for s in slots], dtype=torch.int32),
        keys=keys,
        values=values,
        scale=head_dim**-0.5,
    )


def naive_attention(case: PagedCase) -> torch.Tensor:
    """Explicit softmax in float64 over dense per-sequence K and V, causal by slot."""
    num_tokens, num_q_heads, head_dim = case.q.shape
    group = num_q_heads // case.k_cache.shape[2]
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float64)
    starts = case.query_start_loc.tolist()
    for seq, (k, v) in enumerate(zip(case.keys, case.values, strict=True)):
        a, b = starts[seq], starts[seq + 1]
        if a == b:
            continue
        k = k.double().repeat_interleave(group, dim=1)
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,lhd->htl", case.q[a:b].double(), k) * case.scale
        visible = torch.arange(k.shape[0])[None, :] <= case.query_slots[a:b, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = (scores - scores.amax(-1, keepdim=True)).exp()
        weights = weights / weights.sum(-1, keepdim=True)
        out[a:b] = torch.einsum("htl,lhd->thd", weights, v)
    return out


def last_slots(seq_lens: list[int], counts: list[int]) -> list[list[int]]:
    """The last ``count`` slots of each sequence: a prefill after a cached prefix."""
    return [list(range(n - c, n)) for n, c in zip(seq_lens, counts, strict=True)]
