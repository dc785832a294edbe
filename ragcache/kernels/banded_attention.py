"""Causal attention of queries scattered over a sequence, one band of queries at a time.

Fusion recomputes a few hundred tokens spread over the whole context; each sees the
slots up to its own. A mask over the whole sequence makes every query pay for every
slot. Sorted into bands of ``BAND_QUERIES`` consecutive queries, a band attends in full
to the slots before its first query (no mask) and through a small mask to the slots its
queries span, and the two results are merged by their log-sum-exps: about half the
work of the whole-sequence mask, with the query heads of one KV head stacked as rows of
one matrix so the kernel works on tall tiles and copies no KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The CPU flash kernel that also returns log-sum-exps (None in a torch without it).
FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Queries per band: fewer make the kernel's tiles short, more widen the masked spans.
BAND_QUERIES = 64
# Below this many queries one mask over the sequence costs less than two bands.
MIN_BANDED_QUERIES = 48


@dataclass(slots=True, frozen=True)
class Band:
    """Queries [first, stop) of a sequence, at slots within [lo, hi): full attention to
    slots [0, lo), and ``mask`` (additive, [stop - first, hi - lo]) over [lo, hi)."""

    first: int
    stop: int
    lo: int
    hi: int
    mask: torch.Tensor


def causal_bands(slots: torch.Tensor) -> list[Band] | None:
    """Bands of the query ``slots`` (ascending, on the CPU), or None where the banded
    kernel does not apply (too few queries, unsorted, no CPU flash kernel)."""
    n = slots.shape[0]
    if FLASH_WITH_LSE is None or slots.device.type != "cpu" or n < MIN_BANDED_QUERIES:
        return None
    if not bool((slots[1:] > slots[:-1]).all()):
        return None
    bands = []
    for first in range(0, n, BAND_QUERIES):
        stop = min(n, first + BAND_QUERIES)
        lo, hi = int(slots[first]), int(slots[stop - 1]) + 1
        hidden = torch.arange(lo, hi)[None, :] > slots[first:stop, None]
        mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
        bands.append(Band(first, stop, lo, hi, mask))
    return bands


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Softmax-weighted union of two attention results over disjoint key sets."""
    top = torch.maximum(lse_a, lse_b)
    weight_a = torch.exp(lse_a - top)[..., None]
    weight_b = torch.exp(lse_b - top)[..., None]
    return (out_a * weight_a + out_b * weight_b) / (weight_a + weight_b)


def attend_bands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bands: list[Band], scale: float
) -> torch.Tensor:
    """Queries q [n, Hq, D] at the bands' slots of k, v [L, Hkv, D]; returns [n, Hq, D]."""
    assert FLASH_WITH_LSE is not None
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    # [Hkv, group, n, D]: a KV head's query heads become rows of one matrix.
    stacked = q.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    out = torch.empty(num_kv_heads, group, n, head_dim, dtype=q.dtype, device=q.device)
    for band in bands:
        rows = band.stop - band.first
        band_q = stacked[:, :, band.first : band.stop].reshape(1, num_kv_heads, -1, head_dim)
        mask = band.mask.to(q.dtype).repeat(group, 1)
        span = slice(band.lo, band.hi)
        result, lse = FLASH_WITH_LSE(
            band_q, keys[:, :, span], values[:, :, span], attn_mask=mask, scale=scale
        )[:2]
        if band.lo > 0:
            before, lse_before = FLASH_WITH_LSE(
                band_q, keys[:, :, : band.lo], values[:, :, : band.lo], scale=scale
            )[:2]
            result = merge_by_lse(before, lse_before, result, lse)
        out[:, :, band.first : band.stop] = result.view(num_kv_heads, group, rows, head_dim)
    return out.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)


__all__ = [
    "BAND_QUERIES",
    "FLASH_WITH_LSE",
    "MIN_BANDED_QUERIES",
    "Band",
    "attend_bands",
    "causal_bands",
    "merge_by_lse",
]
