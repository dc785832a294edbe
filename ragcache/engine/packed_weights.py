"""Copies of block-quantised weights that products of a few rows read instead of fp32.

A decode step multiplies one row (or a few) by every weight, so on CPU it costs the time
to stream the weights from memory: 540 MB a step for SmolLM2 in fp32. Where a weight is
made of exact GGUF blocks (``block_weights``), two copies can stand in for it:

- ``exact_blocks``: the codes and fp16 scales, multiplied by a compiled kernel that
  rebuilds every fp32 weight bit for bit before its fp32 product (0.625 bytes per Q4_1
  weight). Results differ from ``x @ W.T`` only in the order of fp32 sums.
- ``int4_bf16`` (opt-in, lossy): torch's int4 matrix product (0.75 bytes per weight),
  vectorised on AVX2 CPUs only for bf16 activations, so each product's input and the
  blocks' scales and zero points are rounded to bf16 and greedy outputs may change.

Only weights whose blocks are found exactly get a copy; prefill keeps the fp32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcache.engine.block_weights import (
    GROUP_SIZE,
    Q41Blocks,
    Q80Blocks,
    exact_blocks,
    find_q4_1,
    find_q8_0,
)
from ragcache.kernels.block_gemv import block_kernels

Q4_CENTER = 8
COMPUTE_DTYPE = torch.bfloat16
INT4_PRODUCT_AVAILABLE = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [N, K] into the layout of torch's CPU int4 product."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)


@dataclass(slots=True)
class Int4Blocks:
    """``(q - 8) * scale + zero`` with one scale and zero per 32 inputs of an output."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """codes [N, K] in 0..15; scale, zero [N, K / 32]."""
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE)
        return cls(_pack_int4(codes), scales_and_zeros.contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in fp32, from a bf16 copy of ``x``."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(COMPUTE_DTYPE).contiguous(), self.packed, GROUP_SIZE, self.scales_and_zeros
        ).float()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


def _asymmetric_4bit(weight: torch.Tensor) -> list[Int4Blocks] | None:
    """Q4_1 blocks, centred for torch's product: ``(q - 8) * d + (m + 8 * d)``."""
    found = find_q4_1(weight)
    if found is None:
        return None
    zero = found.low + Q4_CENTER * found.step
    restored = (found.codes - Q4_CENTER) * found.step[..., None] + zero[..., None]
    if not torch.equal(restored.reshape(weight.shape), weight):
        return None
    return [Int4Blocks.from_codes(found.codes.reshape(weight.shape), found.step, zero)]


def _symmetric_8bit(weight: torch.Tensor) -> list[Int4Blocks] | None:
    """Q8_0 blocks, split into a high and a low 4-bit half: q = 16 * high + low."""
    found = find_q8_0(weight)
    if found is None:
        return None
    low = torch.remainder(found.codes, 16)
    high = (found.codes - low) / 16
    zeros = torch.zeros_like(found.step)
    return [
        Int4Blocks.from_codes((high + Q4_CENTER).reshape(weight.shape), 16 * found.step, zeros),
        Int4Blocks.from_codes(low.reshape(weight.shape), found.step, Q4_CENTER * found.step),
    ]


PACKED_MODES = ("exact_blocks", "int4_bf16")
# Rows up to which a product reads the copy: the exact kernel rebuilds every weight once
# per eight rows, and up to 16 rows it stays well ahead of the best fp32 product
# (`python -m ragcache.bench.linear`).
MAX_ROWS = {"exact_blocks": 16, "int4_bf16": 16}

Part = Int4Blocks | Q41Blocks | Q80Blocks


def packing_available(mode: str) -> bool:
    if mode == "exact_blocks":
        return block_kernels() is not None
    return INT4_PRODUCT_AVAILABLE


@dataclass(slots=True)
class PackedWeight:
    """A block copy of one fp32 weight; the sum of its parts' products is ``x @ W.T``.

    It remembers the weight it was made from and that tensor's version counter, so a
    weight replaced or changed in place after packing is never served stale.
    """

    parts: list[Part]
    source: torch.Tensor
    source_version: int
    mode: str

    @property
    def max_rows(self) -> int:
        return MAX_ROWS[self.mode]

    @classmethod
    def of(cls, weight: torch.Tensor, mode: str = "int4_bf16") -> PackedWeight | None:
        """The ``mode`` copy of ``weight``, or None where it is not made of exact blocks
        or the mode's product is not available here."""
        if mode not in PACKED_MODES:
            raise ValueError(f"packed weight mode {mode!r}; use {' or '.join(PACKED_MODES)}")
        if (
            weight.dim() != 2
            or weight.dtype != torch.float32
            or weight.device.type != "cpu"
            or weight.is_inference()
        ):
            return None
        with torch.no_grad():
            parts: list[Part] | None
            if mode == "exact_blocks":
                found = exact_blocks(weight)
                parts = None if found is None else [found]
            else:
                int4_parts = _asymmetric_4bit(weight) or _symmetric_8bit(weight)
                parts = None if int4_parts is None else list(int4_parts)
        # Blocks are looked for first, so a model without them never builds the kernel.
        if parts is None or not packing_available(mode):
            return None
        return cls(parts, weight, weight._version, mode)

    def serves(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            weight is self.source
            and weight._version == self.source_version
            and x.dtype == torch.float32
            and x.dim() == 2
            and x.device.type == "cpu"
            and x.shape[0] <= self.max_rows
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in fp32."""
        out = self.parts[0].matmul(x)
        for part in self.parts[1:]:
            out += part.matmul(x)
        return out

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)
