"""Rotary position embedding (rotate-half layout) and the re-rotation of cached keys.

A rotation by position p composes additively, R(q) = R(q - p) R(p), so moving a
cached key from position p to q is one rotation by the delta q - p.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] for plain, linear or Llama-3 scaled RoPE (fp32)."""
    # fp32 throughout, as the reference implementations compute it, so angles agree bit-wise.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    assert scaling is not None
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = original / low
        high_wavelen = original / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim // 2] in fp32 for the given (possibly negative) positions."""
    # fp64 angles: at position 6000 an fp32 angle is off by ~4e-4 rad, which a cached
    # key moved by a delta would not share with a key computed in place.
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by the angles of cos/sin [T, D // 2]; computed in fp32."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def rope_full_width(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [T, 1, D] and the signed sin [T, 1, D] (-sin on the first half, sin on the
    second) that ``apply_rope_full_width`` multiplies by."""
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def apply_rope_full_width(
    x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor
) -> torch.Tensor:
    """``apply_rope_ref`` for fp32 x in four ops and two new tensors: x * cos +
    rotate_half(x) * signed sin. The same products and sums (a - b is a + (-b) exactly,
    and a + b is b + a), so the result is bit-identical."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), -1).mul_(sin_signed)
    return rotated.add_(x * cos_full)


def rotate_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] to positions [T]; with deltas it re-positions rotated keys."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    return apply_rope_ref(x, cos, sin)
