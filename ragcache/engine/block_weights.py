"""GGUF blocks found in fp32 weights, and exact few-row products over them.

The embedded SmolLM2 comes from a GGUF file whose projections are Q4_1 blocks
(``q * d + m`` over 32 inputs, q in 0..15, d and m fp16) and whose embedding is Q8_0
(``q * d``, q in -127..127, d fp16). Dequantised to fp32 they keep that structure, so the
codes can be read back from the fp32 weights, and a weight counts as blocks only where
rebuilding it from them gives every fp32 value bit for bit.

``Q41Blocks`` and ``Q80Blocks`` keep the codes (half a byte or one byte per weight) and
the fp16 scales, and multiply through ``ragcache.kernels.block_gemv``, which rebuilds
each weight exactly before its fp32 product: the result differs from ``x @ W.T`` only in
the order of fp32 sums, while a decode step reads a sixth of the fp32 bytes (SmolLM2:
92 MiB against 540 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ragcache.kernels.block_gemv import block_kernels

GROUP_SIZE = 32
PROBE_ROWS = 16


@dataclass(slots=True)
class Q41Codes:
    """codes [N, K] (0..15, float), step and low [N, K / 32]: W = codes * step + low."""

    codes: torch.Tensor
    step: torch.Tensor
    low: torch.Tensor


@dataclass(slots=True)
class Q80Codes:
    """codes [N, K] (-127..127, float), step [N, K / 32]: W = codes * step."""

    codes: torch.Tensor
    step: torch.Tensor


def as_blocks(weight: torch.Tensor) -> torch.Tensor | None:
    """[N, K / 32, 32] view of a 2-D weight, or None where its shape has no blocks."""
    rows, cols = weight.shape
    if cols % GROUP_SIZE or rows % PROBE_ROWS:
        return None
    return weight.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)


def as_fp16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).to(torch.float32)


def leading_rows_fail(weight: torch.Tensor, find: Callable[[torch.Tensor], object]) -> bool:
    """Whether the first 16 rows already lack the blocks: a weight without them (any
    model not from a GGUF file) is turned down without a pass over all of it."""
    return weight.shape[0] > PROBE_ROWS and find(weight[:PROBE_ROWS]) is None


def find_q4_1(weight: torch.Tensor) -> Q41Codes | None:
    """Q4_1 blocks: the minimum is ``m`` (its code is 0), the step ``d`` is fp16."""
    blocks = as_blocks(weight)
    if blocks is None or leading_rows_fail(weight, find_q4_1):
        return None
    low = blocks.amin(-1)
    step = as_fp16((blocks.amax(-1) - low) / 15)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((blocks - low[..., None]) / safe_step[..., None]).clamp(0, 15)
    codes = torch.where(step[..., None] > 0, codes, torch.zeros_like(codes))
    if not torch.equal(codes * step[..., None] + low[..., None], blocks):
        return None
    return Q41Codes(codes, step, low)


def find_q8_0(weight: torch.Tensor) -> Q80Codes | None:
    """Q8_0 blocks: symmetric around 0 with an fp16 step."""
    blocks = as_blocks(weight)
    if blocks is None or leading_rows_fail(weight, find_q8_0):
        return None
    step = as_fp16(blocks.abs().amax(-1) / 127)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round(blocks / safe_step[..., None]).clamp(-127, 127)
    if not torch.equal(codes * step[..., None], blocks):
        return None
    return Q80Codes(codes, step)


@dataclass(slots=True)
class Q41Blocks:
    """Two 4-bit codes a byte (byte j of a block: code j low, code j + 16 high)."""

    codes: torch.Tensor
    scales: torch.Tensor
    minimums: torch.Tensor

    @classmethod
    def of(cls, found: Q41Codes) -> Q41Blocks | None:
        # The kernel keeps the minimum in fp16: it must be one, as GGUF's ``m`` is.
        if not torch.equal(as_fp16(found.low), found.low):
            return None
        codes = found.codes.to(torch.uint8)
        packed = codes[..., : GROUP_SIZE // 2] | (codes[..., GROUP_SIZE // 2 :] << 4)
        rows = codes.shape[0]
        return cls(
            packed.reshape(rows, -1).contiguous(),
            found.step.to(torch.float16).contiguous(),
            found.low.to(torch.float16).contiguous(),
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        kernels = block_kernels()
        assert kernels is not None
        return kernels.q4_1_matmul(x.contiguous(), self.codes, self.scales, self.minimums)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.minimums.nbytes


@dataclass(slots=True)
class Q80Blocks:
    codes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def of(cls, found: Q80Codes) -> Q80Blocks:
        rows = found.codes.shape[0]
        return cls(
            found.codes.to(torch.int8).reshape(rows, -1).contiguous(),
            found.step.to(torch.float16).contiguous(),
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        kernels = block_kernels()
        assert kernels is not None
        return kernels.q8_0_matmul(x.contiguous(), self.codes, self.scales)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def exact_blocks(weight: torch.Tensor) -> Q41Blocks | Q80Blocks | None:
    """The weight as exact Q4_1 or Q8_0 blocks, or None where it is neither."""
    found = find_q4_1(weight)
    if found is not None:
        return Q41Blocks.of(found)
    found_q8 = find_q8_0(weight)
    return Q80Blocks.of(found_q8) if found_q8 is not None else None
