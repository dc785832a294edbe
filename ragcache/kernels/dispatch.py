"""Chooses the Triton kernel on a GPU and the torch reference elsewhere."""

from __future__ import annotations

import functools
import os

import torch

from ragcache.kernels import lora as ref_lora
from ragcache.kernels import paged_attention as ref_attention
from ragcache.kernels import rope as ref_rope


@functools.cache
def triton_available() -> bool:
    if os.environ.get("RAGCACHE_DISABLE_TRITON", "") == "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    return triton_available() and (tensor.is_cuda or (interpret and _interpret_opt_in()))


def _interpret_opt_in() -> bool:
    # The interpreter is for tests of the kernels, never the CPU serving path.
    return os.environ.get("RAGCACHE_TRITON_ON_CPU", "") == "1"


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from ragcache.kernels.triton_rope import rotate_triton

        return rotate_triton(x, positions, inv_freq)
    return ref_rope.rotate_ref(x, positions, inv_freq)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    if use_triton(k):
        from ragcache.kernels.triton_write_kv import write_kv_triton

        write_kv_triton(k_cache, v_cache, slot_mapping, k, v)
        return
    ref_attention.write_kv_ref(k_cache, v_cache, slot_mapping, k, v)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    query_slots: torch.Tensor,
    scale: float,
    max_query_len: int,
) -> torch.Tensor:
    if use_triton(q):
        from ragcache.kernels import triton_paged_attention as triton_attention

        if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
            # One query per sequence; slot + 1 bounds its KV even when later slots exist.
            return triton_attention.paged_decode_attention_triton(
                q, k_cache, v_cache, block_tables, query_slots + 1, scale
            )
        return triton_attention.paged_prefill_attention_triton(
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            query_slots,
            scale,
            max_query_len=max_query_len,
        )
    return ref_attention.paged_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, query_slots, scale
    )


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    groups: list[ref_lora.SlotGroup],
) -> None:
    """y += each token's adapter update; ``groups`` are ``token_slots`` grouped by slot."""
    if use_triton(x):
        from ragcache.kernels.triton_lora import add_lora_triton

        add_lora_triton(y, x, a, b, token_slots)
        return
    ref_lora.add_lora_grouped(y, x, a, b, groups)
