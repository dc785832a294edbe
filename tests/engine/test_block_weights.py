"""Exact block copies: the compiled kernel rebuilds every fp32 weight bit for bit and its
products agree with F.linear to fp32 round-off; a model using them decodes the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from ragcache.engine.block_weights import Q41Blocks, Q80Blocks, exact_blocks, find_q4_1
from ragcache.engine.config import ModelConfig
from ragcache.engine.linear import Projection
from ragcache.engine.loader import load_model, resolve_packed_weights
from ragcache.engine.packed_weights import MAX_ROWS, PackedWeight
from ragcache.kernels.block_gemv import block_kernels
from tests.engine.conftest import greedy_paged
from tests.engine.test_packed_weights import (
    forced_decode_logits,
    gguf_like_model,
    gguf_weight,
    pack_every_matrix,
)
from tests.service_helpers import tiny_model_folder

pytestmark = pytest.mark.skipif(
    block_kernels() is None, reason="the block kernel needs AVX2 and a C++ toolchain"
)

Q4_1 = GGMLQuantizationType.Q4_1
Q8_0 = GGMLQuantizationType.Q8_0


def eye_rows(in_features: int) -> torch.Tensor:
    return torch.eye(in_features, dtype=torch.float32)


@pytest.mark.parametrize(("kind", "part"), [(Q4_1, Q41Blocks), (Q8_0, Q80Blocks)])
def test_every_weight_is_rebuilt_bit_for_bit(kind: GGMLQuantizationType, part: type) -> None:
    weight = gguf_weight(48, 96, kind, seed=11)
    blocks = exact_blocks(weight)
    assert isinstance(blocks, part)
    # Row k of the identity picks column k of W: one product, the rest adds zeros.
    columns = torch.cat([blocks.matmul(chunk) for chunk in eye_rows(96).split(7)])
    assert torch.equal(columns.t(), weight)


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 11, 16])
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 64), (80, 192), (1040, 32)])
def test_products_match_f_linear(kind, rows: int, out_features: int, in_features: int) -> None:
    weight = gguf_weight(out_features, in_features, kind, seed=rows)
    blocks = exact_blocks(weight)
    assert blocks is not None
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    torch.testing.assert_close(blocks.matmul(x), F.linear(x, weight), atol=2e-5, rtol=1e-5)


def test_copies_take_5_32_and_17_64_of_the_fp32_bytes() -> None:
    q4 = exact_blocks(gguf_weight(64, 512, Q4_1, seed=0))
    q8 = exact_blocks(gguf_weight(64, 512, Q8_0, seed=0))
    assert q4 is not None and q8 is not None
    # Q4_1: half a byte a weight and two fp16 per 32; Q8_0: a byte and one fp16 per 32.
    assert q4.nbytes == 64 * 512 * 20 // 32
    assert q8.nbytes == 64 * 512 * 34 // 32


def test_a_minimum_that_is_not_fp16_is_not_packed() -> None:
    weight = gguf_weight(32, 64, Q4_1, seed=5)
    found = find_q4_1(weight)
    assert found is not None
    shifted = weight + 1e-4  # blocks stay exact in fp32 for the check, the minimum is not fp16
    refound = find_q4_1(shifted)
    if refound is not None:
        assert Q41Blocks.of(refound) is None


def test_bad_inputs_are_refused_by_name() -> None:
    blocks = exact_blocks(gguf_weight(32, 64, Q4_1, seed=6))
    assert isinstance(blocks, Q41Blocks)
    with pytest.raises(RuntimeError, match="float32"):
        blocks.matmul(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="features"):
        blocks.matmul(torch.randn(2, 96))


def test_projection_reads_the_copy_up_to_its_row_limit() -> None:
    projection = Projection(128, 64, bias=True)
    with torch.no_grad():
        projection.weight.copy_(gguf_weight(64, 128, Q4_1, seed=3))
        projection.bias.normal_()
    projection.packed = PackedWeight.of(projection.weight, "exact_blocks")
    limit = MAX_ROWS["exact_blocks"]
    assert projection.packed is not None and projection.packed.max_rows == limit
    for rows in (1, 4, 9, limit, limit + 1, 100):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        assert projection.packed.serves(x, projection.weight) == (rows <= limit)
        expected = F.linear(x, projection.weight, projection.bias)
        torch.testing.assert_close(projection(x), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2"])
def test_exact_copies_decode_the_same_tokens(variant: str) -> None:
    plain, packed = gguf_like_model(variant)
    output = pack_every_matrix(packed, "exact_blocks")
    # The tied output layer is the Q8_0 embedding, else a Q4_1 lm_head.
    assert isinstance(output.parts[0], Q80Blocks if variant == "llama_tied" else Q41Blocks)
    prompt = torch.randint(3, 256, (21,), generator=torch.Generator().manual_seed(8)).tolist()
    block_table = [4, 1, 6, 0, 3, 5, 2, 7, 9, 8, 10, 11]
    tokens = greedy_paged(plain, prompt, 24, block_table, 4)
    assert greedy_paged(packed, prompt, 24, block_table, 4) == tokens
    torch.testing.assert_close(
        forced_decode_logits(packed, prompt, tokens, block_table),
        forced_decode_logits(plain, prompt, tokens, block_table),
        atol=1e-4,
        rtol=1e-4,
    )


def test_auto_takes_exact_copies_for_fp32_cpu_models_only() -> None:
    loaded = load_model(ModelConfig(path=str(tiny_model_folder()), dtype="float32", device="cpu"))
    assert resolve_packed_weights("auto", loaded.model) == "exact_blocks"
    assert resolve_packed_weights("off", loaded.model) == "off"
    # Random weights have no blocks: auto packs nothing and the model is unchanged.
    projections = [m for m in loaded.model.modules() if isinstance(m, Projection)]
    assert all(p.packed is None for p in projections)
    bf16 = load_model(ModelConfig(path=str(tiny_model_folder()), dtype="bfloat16", device="cpu"))
    assert resolve_packed_weights("auto", bf16.model) == "off"
