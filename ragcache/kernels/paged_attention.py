"""Torch reference of attention over a paged KV pool, and the KV write into it.

Pool layout per layer: K and V of shape [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's KV slot j lives in block ``block_table[j // block_size]`` at offset
``j % block_size``. Causality is by slot: a query token at slot i sees slots <= i, so a
caller may compute any subset of a sequence's tokens against the cached rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ragcache.kernels.banded_attention import (
    FLASH_WITH_LSE,
    Band,
    attend_bands,
    causal_bands,
    merge_by_lse,
)


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


# A sequence that computes one query reads the leading run of consecutive blocks in its
# table in place, and copies only the rest, when the run holds at least this many slots.
MIN_IN_PLACE_SLOTS = 128


@dataclass(slots=True)
class SequencePlan:
    """Where one sequence's queries and KV are: the same for every layer of a forward.

    Slots [0, run_len) are read in place from flat slot ``kv_start`` on; ``kv_slots``
    lists the pool slots of the rest (all of them when ``kv_start`` is None).
    ``causal_tail``: the queries are the sequence's last slots, in order, so attention is
    full over the slots before them and causal among them, with no mask to build.
    ``bands``: many queries scattered in order over the sequence (fusion's recomputed
    tokens), attended band by band instead of through ``mask``.
    """

    query_start: int
    query_end: int
    seq_len: int
    kv_start: int | None
    kv_slots: torch.Tensor | None
    mask: torch.Tensor | None
    run_len: int = 0
    causal_tail: bool = False
    bands: list[Band] | None = None


def plan_paged_attention(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_slots: torch.Tensor,
    block_size: int,
) -> list[SequencePlan]:
    """Resolve block tables and causal masks once, so each layer only slices and attends."""
    plans = []
    starts = query_start_loc.tolist()
    tables = block_tables.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        a, b = starts[i], starts[i + 1]
        if a == b:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        row = tables[i][:num_blocks]
        run_blocks = 1
        while run_blocks < num_blocks and row[run_blocks] == row[run_blocks - 1] + 1:
            run_blocks += 1
        run_len = min(run_blocks * block_size, seq_len)
        slots = query_slots[a:b]
        last_only = b - a == 1 and int(slots[0]) == seq_len - 1
        causal_tail = not last_only and _is_causal_tail(slots, seq_len)
        mask = None
        bands = None
        if not last_only and not causal_tail:
            bands = causal_bands(slots)
            if bands is None:
                mask = torch.arange(seq_len, device=slots.device)[None, :] <= slots[:, None]
        in_place = run_len == seq_len or (
            last_only
            and run_len >= MIN_IN_PLACE_SLOTS
            and FLASH_WITH_LSE is not None
            and block_tables.device.type == "cpu"
        )
        if not in_place:
            run_len = 0
        kv_start = row[0] * block_size if in_place else None
        kv_slots = None
        if run_len < seq_len:
            kv_slots = sequence_slots(block_tables[i], seq_len, block_size)[run_len:]
        plans.append(
            SequencePlan(a, b, seq_len, kv_start, kv_slots, mask, run_len, causal_tail, bands)
        )
    return plans


def _is_causal_tail(slots: torch.Tensor, seq_len: int) -> bool:
    """Whether the query slots are exactly seq_len - n, ..., seq_len - 1 (a prefill chunk)
    and the CPU flash kernel, which returns log-sum-exps, can attend them."""
    n = slots.shape[0]
    if FLASH_WITH_LSE is None or slots.device.type != "cpu" or n < 2:
        return False
    if int(slots[0]) != seq_len - n or int(slots[-1]) != seq_len - 1:
        return False
    return bool((slots[1:] - slots[:-1] == 1).all())


def _sequence_kv(cache: torch.Tensor, plan: SequencePlan) -> torch.Tensor:
    flat = cache.view(-1, *cache.shape[2:])
    if plan.kv_slots is None:
        assert plan.kv_start is not None
        return flat[plan.kv_start : plan.kv_start + plan.seq_len]
    if plan.kv_start is None:
        return flat.index_select(0, plan.kv_slots)
    in_place = flat[plan.kv_start : plan.kv_start + plan.run_len]
    return torch.cat([in_place, flat.index_select(0, plan.kv_slots)])


def _one_query_in_place(plan: SequencePlan, q: torch.Tensor) -> bool:
    return (
        plan.mask is None
        and not plan.causal_tail
        and plan.bands is None
        and plan.kv_start is not None
        and q.device.type == "cpu"
        and FLASH_WITH_LSE is not None
    )


def _attend_one_query(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: SequencePlan, scale: float
) -> torch.Tensor:
    """One query [1, Hq, D] over the leading run of its blocks in place and a copy of the
    rest, merged by their log-sum-exps. The query heads of one KV head are attended as
    rows of one matrix, so grouped-query attention copies no KV either."""
    assert plan.kv_start is not None and FLASH_WITH_LSE is not None
    num_kv_heads, head_dim = k_cache.shape[2:]
    grouped = q.view(1, num_kv_heads, -1, head_dim)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    run = slice(plan.kv_start, plan.kv_start + plan.run_len)
    pieces = [(flat_k[run], flat_v[run])]
    if plan.kv_slots is not None:
        pieces.append(
            (flat_k.index_select(0, plan.kv_slots), flat_v.index_select(0, plan.kv_slots))
        )
    results = [
        FLASH_WITH_LSE(grouped, k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale)
        for k, v in pieces
    ]
    if len(results) == 1:
        return results[0][0].reshape(1, -1, head_dim)
    (out_a, lse_a), (out_b, lse_b) = (result[:2] for result in results)
    out = merge_by_lse(out_a, lse_a, out_b, lse_b)
    return out.reshape(1, -1, head_dim).to(q.dtype)


def _attend_causal_tail(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries q [n, Hq, D] at the last n of the L slots of k, v [L, Hkv, D]: full
    attention over the first L - n slots and causal attention among the last n, merged
    by their log-sum-exps. The query heads that share a KV head form the batch, so the
    KV heads are broadcast, never copied."""
    assert FLASH_WITH_LSE is not None
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    grouped = q.view(n, num_kv_heads, group, head_dim).permute(2, 1, 0, 3)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)[None].expand(group, -1, -1, -1)

    prefix = k.shape[0] - n
    out, lse = FLASH_WITH_LSE(
        grouped, heads(k[prefix:]), heads(v[prefix:]), is_causal=True, scale=scale
    )[:2]
    if prefix > 0:
        out_prefix, lse_prefix = FLASH_WITH_LSE(
            grouped, heads(k[:prefix]), heads(v[:prefix]), scale=scale
        )[:2]
        out = merge_by_lse(out_prefix, lse_prefix, out, lse)
    return out.permute(2, 1, 0, 3).reshape(n, num_heads, head_dim).to(q.dtype)


def _attend_planned(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: SequencePlan, scale: float
) -> torch.Tensor:
    if _one_query_in_place(plan, q):
        return _attend_one_query(q, k_cache, v_cache, plan, scale)
    k = _sequence_kv(k_cache, plan)
    v = _sequence_kv(v_cache, plan)
    if plan.causal_tail:
        return _attend_causal_tail(q, k, v, scale)
    if plan.bands is not None:
        return attend_bands(q, k, v, plan.bands, scale)
    return _attend(q, k, v, plan.mask, False, scale)


def paged_attention_planned(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plans: list[SequencePlan],
    scale: float,
) -> torch.Tensor:
    """paged_attention_ref with the per-sequence work already resolved."""
    if len(plans) == 1 and plans[0].query_end - plans[0].query_start == q.shape[0]:
        return _attend_planned(q, k_cache, v_cache, plans[0], scale)
    out = torch.empty_like(q)
    for plan in plans:
        a, b = plan.query_start, plan.query_end
        out[a:b] = _attend_planned(q[a:b], k_cache, v_cache, plan, scale)
    return out


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
    plans = plan_paged_attention(
        block_tables, seq_lens, query_start_loc, query_slots, k_cache.shape[1]
    )
    return paged_attention_planned(q, k_cache, v_cache, plans, scale)


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
