"""Torch reference of attention over a paged KV pool, and the KV write into it.

Pool layout per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's KV slot j lives in block ``block_table[j // block_size]`` at offset
``j % block_size``. Causality is by slot: a query token at slot i sees slots <= i, so a
caller may compute any subset of a sequence's tokens against the cached rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Store k, v [T, Hkv, D] at flat pool slots (block * block_size + offset) [T]."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def sequence_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Flat pool slots [seq_len] of one sequence's KV, in slot order."""
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].to(torch.long)
    offsets = torch.arange(block_size, device=block_table.device)
    return (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:seq_len]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, Hkv, D] view or copy of one sequence's cached K or V."""
    block_size = cache.shape[1]
    flat = cache.view(-1, *cache.shape[2:])
    num_blocks = (seq_len + block_size - 1) // block_size
    first = int(block_table[0])
    if num_blocks == 0:
        return flat[:0]
    if int(block_table[num_blocks - 1]) - first == num_blocks - 1 and bool(
        (block_table[1:num_blocks] - block_table[: num_blocks - 1] == 1).all()
    ):
        start = first * block_size
        return flat[start : start + seq_len]
    return flat.index_select(0, sequence_slots(block_table, seq_len, block_size))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool, scale: float):
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over each sequence's paged KV, causal by slot.

    ``query_start_loc`` [S + 1] splits the T query tokens by sequence; ``seq_lens`` [S]
    is each sequence's KV length (its queries' KV already written); ``query_slots`` [T]
    is each query token's slot in its sequence.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if a == b:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len)
        v = gather_kv(v_cache, block_tables[i], seq_len)
        slots = query_slots[a:b]
        if b - a == 1 and int(slots[0]) == seq_len - 1:
            out[a:b] = _attend(q[a:b], k, v, None, False, scale)
            continue
        mask = torch.arange(seq_len, device=q.device)[None, :] <= slots[:, None]
        out[a:b] = _attend(q[a:b], k, v, mask, False, scale)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence at its last slot: q [S, Hq, D] -> [S, Hq, D]."""
    num_seqs = q.shape[0]
    start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, start_loc, seq_lens - 1, scale
    )


def causal_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain causal attention of one fresh sequence, q [T, Hq, D], k/v [T, Hkv, D]."""
    return _attend(q, k, v, None, True, scale)
