"""An opt-in 4-bit copy of block-quantised weights for products of a few rows.

A decode step multiplies one row (or a few) by every weight, so on CPU it costs the time
to stream the weights from memory: 540 MB a step for SmolLM2 in fp32. The embedded
SmolLM2 comes from a GGUF file whose projections are Q4_1 blocks (``d * q + m`` over 32
inputs, q in 0..15, d and m fp16) and whose embedding is Q8_0 (``d * q``, q in
-127..127). Dequantised to fp32 they keep that structure, so the 4-bit codes can be read
back from the fp32 weights exactly, and packed for torch's int4 matrix product, which
reads 0.75 bytes per weight instead of 4.

That product is vectorised on AVX2 CPUs only for bf16 activations (with fp32 ones it
runs 6-25x slower than MKL's fp32 product), so this path rounds each product's input
and the blocks' scales and zero points to bf16: it is lossy, and greedy outputs may
differ from the fp32 weights'. Only weights whose blocks are found exactly are packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 32
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
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, GROUP_SIZE, self.scales_and_zeros
        )

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


def _blocks(weight: torch.Tensor) -> torch.Tensor | None:
    rows, cols = weight.shape
    if cols % GROUP_SIZE or rows % 16:
        return None
    return weight.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)


def _as_fp16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).to(torch.float32)


def _asymmetric_4bit(weight: torch.Tensor) -> list[Int4Blocks] | None:
    """Q4_1 blocks: the minimum is ``m`` (its code is 0), the step ``d`` is fp16."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    low = blocks.amin(-1)
    step = _as_fp16((blocks.amax(-1) - low) / 15)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((blocks - low[..., None]) / safe_step[..., None]).clamp(0, 15)
    codes = torch.where(step[..., None] > 0, codes, torch.zeros_like(codes))
    zero = low + Q4_CENTER * step
    restored = (codes - Q4_CENTER) * step[..., None] + zero[..., None]
    if not torch.equal(restored, blocks):
        return None
    return [Int4Blocks.from_codes(codes.reshape(weight.shape), step, zero)]


def _symmetric_8bit(weight: torch.Tensor) -> list[Int4Blocks] | None:
    """Q8_0 blocks, split into a high and a low 4-bit half: q = 16 * high + low."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    step = _as_fp16(blocks.abs().amax(-1) / 127)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round(blocks / safe_step[..., None]).clamp(-127, 127)
    if not torch.equal(codes * step[..., None], blocks):
        return None
    low = torch.remainder(codes, 16)
    high = (codes - low) / 16
    zeros = torch.zeros_like(step)
    return [
        Int4Blocks.from_codes((high + Q4_CENTER).reshape(weight.shape), 16 * step, zeros),
        Int4Blocks.from_codes(low.reshape(weight.shape), step, Q4_CENTER * step),
    ]


@dataclass(slots=True)
class PackedWeight:
    """The 4-bit form of one fp32 weight; the sum of its parts' products is ``x @ W.T``.

    It remembers the weight it was made from and that tensor's version counter, so a
    weight replaced or changed in place after packing is never served stale.
    """

    parts: list[Int4Blocks]
    source: torch.Tensor
    source_version: int

    @classmethod
    def of(cls, weight: torch.Tensor) -> PackedWeight | None:
        """The packed form of ``weight``, or None where it is not made of exact blocks."""
        if (
            not INT4_PRODUCT_AVAILABLE
            or weight.dim() != 2
            or weight.dtype != torch.float32
            or weight.device.type != "cpu"
            or weight.is_inference()
        ):
            return None
        with torch.no_grad():
            parts = _asymmetric_4bit(weight) or _symmetric_8bit(weight)
        return None if parts is None else cls(parts, weight, weight._version)

    def serves(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            weight is self.source
            and weight._version == self.source_version
            and x.dtype == torch.float32
            and x.dim() == 2
            and x.device.type == "cpu"
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in fp32, from a bf16 copy of ``x``."""
        rounded = x.to(COMPUTE_DTYPE).contiguous()
        out = self.parts[0].matmul(rounded).float()
        for part in self.parts[1:]:
            out += part.matmul(rounded)
        return out

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)
