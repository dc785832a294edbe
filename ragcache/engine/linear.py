"""Projections on CPU: oneDNN's product, the weight-major product for a few rows, or
packed 4-bit weights.

Decode steps, speculative verification and small batches multiply a handful of token
rows by each weight. On CPU, MKL's sgemm handles ``x @ W.T`` with 2-16 rows at about
half the speed of ``W @ x.T`` (measured on the 2-core development machine: a whole
SmolLM2 forward of 4 tokens took 185 ms one way and 97 ms the other, against 101 ms for
one token), so verifying a few draft tokens would cost two decode steps instead of one.

One row and larger batches in float32 take oneDNN's inner-product primitive
(``torch.ops.mkldnn._linear_pointwise``) where torch has it: on the development machine
(AMD EPYC, AVX2) it ran SmolLM2's layer projections as fast as MKL's sgemm behind
``F.linear`` for one row (1.01x) and 1.04-1.16x faster for 32 to 2048 rows; for 2-16
rows the weight-major product is faster still (``python -m ragcache.engine.bench_linear``,
``eval/reports/bench_linear.md``).
Other dtypes and devices keep ``F.linear``.

Such products are bound by the bytes of weight read. Where a weight is made of exact GGUF
blocks, products of a few rows read a block copy instead (``packed_weights``: exact by
default, or the lossy ``int4_bf16``); prefill keeps the fp32 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ragcache.engine.packed_weights import PackedWeight

SKINNY_MAX_ROWS = 16
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


def onednn_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and weight.is_contiguous()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
) -> torch.Tensor:
    if packed is not None and packed.serves(x, weight):
        out = packed.matmul(x)
        return out if bias is None else out + bias
    if x.dim() == 2 and 2 <= x.shape[0] <= SKINNY_MAX_ROWS and x.device.type == "cpu":
        out = torch.mm(weight, x.t()).t().contiguous()
        return out if bias is None else out + bias
    if onednn_serves(x, weight):
        assert _ONEDNN_LINEAR is not None
        return _ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Projection(torch.nn.Linear):
    """An ``nn.Linear`` whose forward takes the product above; wrappers (LoRA) call it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)
