"""Triton store of new K and V rows into the paged pool, as ``write_kv_ref`` does.

Negative slots are skipped, so a caller may pad ``slot_mapping`` with -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_ptr,
    v_ptr,
    num_heads,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_co,
    stride_ch,
    stride_cd,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (heads < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        cache_offset = (
            (slot // BLOCK_SIZE) * stride_cb
            + (slot % BLOCK_SIZE) * stride_co
            + heads[:, None] * stride_ch
            + offs_d[None, :] * stride_cd
        )
        k = tl.load(
            k_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :] * stride_kd,
            mask=mask,
        )
        v = tl.load(
            v_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :] * stride_vd,
            mask=mask,
        )
        tl.store(k_cache_ptr + cache_offset, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_offset, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Store k, v [T, Hkv, D] at flat pool slots (block * block_size + offset) [T]."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share one memory layout")
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k and v must both be [tokens, {k_cache.shape[2]}, {k_cache.shape[3]}], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.is_floating_point():
        raise ValueError(
            f"slot_mapping must be an integer tensor of shape [{k.shape[0]}], "
            f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if k.shape[0] == 0:
        return
    _, block_size, num_heads, head_dim = k_cache.shape
    _write_kv_kernel[(k.shape[0],)](
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        k,
        v,
        num_heads,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
