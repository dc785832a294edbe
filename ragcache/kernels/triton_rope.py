"""Triton rotary embedding (rotate-half layout), the same math as ``rope.rotate_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_kernel(
    out_ptr,
    x_ptr,
    positions_ptr,
    inv_freq_ptr,
    num_heads,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_ot,
    stride_oh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    freq_mask = offs < HALF
    mask = (heads < num_heads)[:, None] & freq_mask[None, :]

    # fp64 angles, as the reference: large positions lose ~1e-4 rad in fp32.
    position = tl.load(positions_ptr + token).to(tl.float64)
    inv_freq = tl.load(inv_freq_ptr + offs, mask=freq_mask, other=0.0).to(tl.float64)
    angle = position * inv_freq
    cos = tl.cos(angle).to(tl.float32)[None, :]
    sin = tl.sin(angle).to(tl.float32)[None, :]

    x_first = x_ptr + token * stride_xt + heads[:, None] * stride_xh + offs[None, :] * stride_xd
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)

    out_first = out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs[None, :]
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_first, (x1 * cos - x2 * sin).to(out_dtype), mask=mask)
    tl.store(out_first + HALF, (x2 * cos + x1 * sin).to(out_dtype), mask=mask)


def rotate_triton(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] to integer positions [T] (deltas may be negative); fp32 math."""
    if x.dim() != 3:
        raise ValueError(f"x must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    num_tokens, num_heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    if positions.shape != (num_tokens,) or positions.is_floating_point():
        raise ValueError(
            f"positions must be an integer tensor of shape [{num_tokens}], "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must have shape [{head_dim // 2}], got {tuple(inv_freq.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = head_dim // 2
    block_h = min(triton.next_power_of_2(num_heads), 16)
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _rotate_kernel[grid](
        out,
        x,
        positions.contiguous(),
        inv_freq.to(torch.float32).contiguous(),
        num_heads,
        *x.stride(),
        out.stride(0),
        out.stride(1),
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return out
