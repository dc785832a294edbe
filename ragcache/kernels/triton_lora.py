"""Triton batched LoRA (BGMV): the same sum as ``lora.add_lora_ref``.

Two launches. The shrink kernel gives each token ``x[t] @ a[slot[t]]`` in fp32; the
expand kernel adds ``shrunk[t] @ b[slot[t]]`` into its output row, one block of output
features per program. Each program reads its token's slot and loads that adapter's
rows, so a batch mixing adapters needs no loop over adapters. Tokens in slot 0 (the
base model) are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ragcache.kernels.lora import check_lora_args


@triton.jit
def _lora_shrink_kernel(
    shrunk_ptr,
    x_ptr,
    a_ptr,
    token_slots_ptr,
    in_features,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ak,
    stride_ar,
    stride_st,
    RANK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    if slot > 0:
        offs_r = tl.arange(0, BLOCK_R)
        rank_mask = offs_r < RANK
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xk, mask=k_mask, other=0.0)
            a = tl.load(
                a_ptr
                + slot * stride_as
                + offs_k[:, None] * stride_ak
                + offs_r[None, :] * stride_ar,
                mask=k_mask[:, None] & rank_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(x.to(tl.float32)[:, None] * a.to(tl.float32), axis=0)
        tl.store(shrunk_ptr + token * stride_st + offs_r, acc, mask=rank_mask)


@triton.jit
def _lora_expand_kernel(
    y_ptr,
    shrunk_ptr,
    b_ptr,
    token_slots_ptr,
    out_features,
    stride_yt,
    stride_yn,
    stride_st,
    stride_bs,
    stride_br,
    stride_bn,
    RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    if slot > 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < out_features
        offs_r = tl.arange(0, BLOCK_R)
        rank_mask = offs_r < RANK
        shrunk = tl.load(shrunk_ptr + token * stride_st + offs_r, mask=rank_mask, other=0.0)
        b = tl.load(
            b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=rank_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        delta = tl.sum(shrunk[:, None] * b.to(tl.float32), axis=0)
        y_ptrs = y_ptr + token * stride_yt + offs_n * stride_yn
        y = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def add_lora_triton(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """y[t] += (x[t] @ a[slot[t]]) @ b[slot[t]]; y may be a column window of a wider output."""
    check_lora_args(y, x, a, b, token_slots)
    tokens, in_features = x.shape
    rank, out_features = b.shape[1], b.shape[2]
    if tokens == 0 or rank == 0:
        return
    slots = token_slots.contiguous()
    shrunk = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(rank)
    _lora_shrink_kernel[(tokens,)](
        shrunk,
        x,
        a,
        slots,
        in_features,
        *x.stride(),
        *a.stride(),
        shrunk.stride(0),
        RANK=rank,
        BLOCK_K=min(triton.next_power_of_2(in_features), max(16, 4096 // block_r)),
        BLOCK_R=block_r,
    )
    block_n = min(triton.next_power_of_2(out_features), max(16, 4096 // block_r))
    _lora_expand_kernel[(tokens, triton.cdiv(out_features, block_n))](
        y,
        shrunk,
        b,
        slots,
        out_features,
        *y.stride(),
        shrunk.stride(0),
        *b.stride(),
        RANK=rank,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
    )
