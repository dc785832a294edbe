"""Projections of a few tokens: the weight-major product on CPUs, or packed 4-bit weights.

Decode steps, speculative verification and small batches multiply a handful of token
rows by each weight. On CPU, MKL's sgemm handles ``x @ W.T`` with 2-16 rows at about
half the speed of ``W @ x.T`` (measured on the 2-core development machine: a whole
SmolLM2 forward of 4 tokens took 185 ms one way and 97 ms the other, against 101 ms for
one token), so verifying a few draft tokens would cost two decode steps instead of one.
One row and larger batches keep ``F.linear``.

Such products are bound by the bytes of weight read. With ``model.packed_weights =
int4_bf16`` (opt-in, lossy) products of up to ``PACKED_MAX_ROWS`` rows read a 4-bit copy
of the weights instead (``packed_weights``); prefill keeps the fp32 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ragcache.engine.packed_weights import PackedWeight

SKINNY_MAX_ROWS = 16
PACKED_MAX_ROWS = 16


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
) -> torch.Tensor:
    if packed is not None and x.shape[0] <= PACKED_MAX_ROWS and packed.serves(x, weight):
        out = packed.matmul(x)
        return out if bias is None else out + bias
    if x.dim() == 2 and 2 <= x.shape[0] <= SKINNY_MAX_ROWS and x.device.type == "cpu":
        out = torch.mm(weight, x.t()).t().contiguous()
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class Projection(torch.nn.Linear):
    """An ``nn.Linear`` whose forward takes the product above; wrappers (LoRA) call it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)
