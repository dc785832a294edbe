"""Projections on CPU: block copies, the weight-major product, oneDNN or MKL, by rows.

- Up to 16 rows of a weight made of exact GGUF blocks (the embedded SmolLM2's): the
  block copy (``packed_weights``), which reads a sixth of the fp32 bytes.
- 2-16 rows otherwise: the weight-major product ``W @ x.T``. MKL's sgemm handles
  ``x @ W.T`` with 2-16 rows at about half its speed, so verifying a few draft tokens
  would cost two decode steps instead of one.
- 1 row and 17-64 rows in float32: oneDNN's inner product
  (``torch.ops.mkldnn._linear_pointwise``), faster than MKL there.
- More rows (prefill): MKL's ``F.linear``, faster than oneDNN for 128 rows and up on a
  quiet machine; ``Projection.forward_parts`` multiplies fused q/k/v and gate/up weights
  one output slice at a time there, so each part is contiguous for what follows.

The choices come from ``python -m ragcache.bench.linear``
(``eval/reports/bench_linear.md``). Other dtypes and devices keep ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ragcache.engine.packed_weights import PackedWeight

SKINNY_MAX_ROWS = 16
ONEDNN_MAX_ROWS = 64
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
    if x.shape[0] <= ONEDNN_MAX_ROWS and onednn_serves(x, weight):
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

    def forward_parts(self, x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The product cut into output slices of ``sizes`` (q/k/v, gate/up). Many rows on
        CPU take one product per slice of the weight's rows, so each part comes out
        contiguous for the element-wise work after it; few rows keep one product."""
        if x.dim() != 2 or x.shape[0] <= ONEDNN_MAX_ROWS or x.device.type != "cpu":
            return self(x).split(list(sizes), dim=-1)
        return sliced_linear(x, self.weight, self.bias, sizes)


def sliced_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: Sequence[int]
) -> tuple[torch.Tensor, ...]:
    """``F.linear`` once per slice of ``weight``'s output rows."""
    weights = weight.split(list(sizes))
    biases = [None] * len(sizes) if bias is None else bias.split(list(sizes))
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
