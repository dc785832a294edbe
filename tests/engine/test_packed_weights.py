"""4-bit copies of GGUF block weights: found exactly, products agree with F.linear to bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ragcache.engine.config import ModelConfig
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.linear import Projection, linear
from ragcache.engine.loader import ModelLoadError, build_model, load_model
from ragcache.engine.model import LlamaModel
from ragcache.engine.packed_weights import MAX_ROWS, PackedWeight
from ragcache.engine.spec import ModelSpec
from tests.engine.conftest import greedy_paged, sequence_metadata, tiny_hf_model

PACKED_MAX_ROWS = MAX_ROWS["int4_bf16"]

# fp32 round-off of 64-256 term dot products of unit-scale values.
ATOL, RTOL = 2e-5, 1e-5
# The packed product rounds its input and the blocks' scales and zeros to bf16 (8-bit
# mantissa): the error relative to the size of the exact product stays near 2**-9.
BF16_RELATIVE_ERROR = 1e-2


# Through a whole tiny model (four projections a layer, large random weights) it compounds.
MODEL_RELATIVE_ERROR = 5e-2


def assert_bf16_close(
    out: torch.Tensor, expected: torch.Tensor, bound: float = BF16_RELATIVE_ERROR
) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    error = (out - expected).norm() / expected.norm()
    assert error.item() <= bound


def gguf_weight(rows: int, cols: int, kind: GGMLQuantizationType, seed: int) -> torch.Tensor:
    """What the loader holds for a GGUF tensor of this kind: its fp32 dequantisation."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return torch.from_numpy(dequantize(quantize(values, kind), kind).copy())


@pytest.mark.parametrize(
    ("kind", "parts"), [(GGMLQuantizationType.Q4_1, 1), (GGMLQuantizationType.Q8_0, 2)]
)
@pytest.mark.parametrize("rows", [1, 3, 16, PACKED_MAX_ROWS])
def test_packed_product_matches_f_linear(kind: GGMLQuantizationType, parts: int, rows: int):
    weight = gguf_weight(96, 256, kind, seed=rows)
    packed = PackedWeight.of(weight)
    assert packed is not None and len(packed.parts) == parts
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    assert packed.serves(x, weight)
    assert_bf16_close(packed.matmul(x), F.linear(x, weight))


def test_packed_copy_is_a_fifth_of_the_fp32_bytes() -> None:
    weight = gguf_weight(64, 512, GGMLQuantizationType.Q4_1, seed=0)
    packed = PackedWeight.of(weight)
    assert packed is not None
    # 4 bits per weight plus a bf16 scale and zero per 32 weights: 5/8 of a byte.
    assert packed.nbytes == weight.nbytes * 5 // 32


def test_weights_without_exact_blocks_stay_unpacked() -> None:
    generator = torch.Generator().manual_seed(0)
    assert PackedWeight.of(torch.randn(64, 128, generator=generator)) is None
    # Rounded to fp16 but not block-quantised: still no exact 4- or 8-bit form.
    assert PackedWeight.of(torch.randn(64, 128, generator=generator).half().float()) is None
    q4 = gguf_weight(64, 128, GGMLQuantizationType.Q4_1, seed=1)
    assert PackedWeight.of(q4.bfloat16()) is None
    assert PackedWeight.of(q4[:, :100].contiguous()) is None
    one_value_off = q4.clone()
    one_value_off[5, 7] = torch.nextafter(one_value_off[5, 7], torch.tensor(10.0))
    assert PackedWeight.of(one_value_off) is None


def test_constant_blocks_pack_exactly() -> None:
    weight = gguf_weight(32, 64, GGMLQuantizationType.Q4_1, seed=2)
    weight[:, :32] = 0.25
    weight[3] = 0.0
    packed = PackedWeight.of(weight)
    assert packed is not None
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    assert_bf16_close(packed.matmul(x), F.linear(x, weight))


def test_projection_takes_packed_weights_only_for_few_rows_and_adds_bias() -> None:
    projection = Projection(128, 64, bias=True)
    with torch.no_grad():
        projection.weight.copy_(gguf_weight(64, 128, GGMLQuantizationType.Q4_1, seed=3))
        projection.bias.normal_()
    projection.packed = PackedWeight.of(projection.weight)
    assert projection.packed is not None
    for rows in (1, 5, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 200):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        expected = F.linear(x, projection.weight, projection.bias)
        if rows <= PACKED_MAX_ROWS:
            assert_bf16_close(projection(x), expected)
        else:
            torch.testing.assert_close(projection(x), expected, atol=ATOL, rtol=RTOL)


def test_a_weight_changed_after_packing_is_never_served_stale() -> None:
    projection = Projection(64, 32, bias=False)
    with torch.no_grad():
        projection.weight.copy_(gguf_weight(32, 64, GGMLQuantizationType.Q4_1, seed=4))
    projection.packed = PackedWeight.of(projection.weight)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        projection.weight.mul_(2.0)
    torch.testing.assert_close(projection(x), F.linear(x, projection.weight), atol=ATOL, rtol=RTOL)
    replaced = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)
    projection.weight = replaced
    assert not projection.packed.serves(x, projection.weight)
    torch.testing.assert_close(projection(x), F.linear(x, replaced), atol=ATOL, rtol=RTOL)


def test_linear_without_packed_weights_is_unchanged() -> None:
    x = torch.randn(4, 64)
    weight = torch.randn(32, 64)
    torch.testing.assert_close(linear(x, weight, packed=None), F.linear(x, weight))


def gguf_like_model(variant: str) -> tuple[LlamaModel, LlamaModel]:
    """A tiny model whose matrices went through GGUF Q4_1 (Q8_0 for the embedding), twice."""
    reference = tiny_hf_model(variant, seed=7)
    spec = ModelSpec.from_hf_config(reference.config)
    state = {}
    for name, tensor in reference.state_dict().items():
        if tensor.dim() == 2:
            kind = GGMLQuantizationType.Q8_0 if "embed" in name else GGMLQuantizationType.Q4_1
            tensor = torch.from_numpy(dequantize(quantize(tensor.numpy(), kind), kind).copy())
        state[name] = tensor.detach().clone()
    build = lambda: build_model(spec, state, torch.float32, torch.device("cpu"))  # noqa: E731
    return build(), build()


def pack_every_matrix(model: LlamaModel, mode: str) -> PackedWeight:
    """Packs ``model`` in ``mode``, checks every matrix got a copy and the bytes it
    reports, and returns the output layer's copy."""
    added = model.pack_weights(mode)
    projections = [m for m in model.modules() if isinstance(m, Projection)]
    assert all(p.packed is not None for p in projections)
    output = model.output_packed
    assert output is not None
    assert added == sum(p.packed.nbytes for p in projections) + output.nbytes
    return output


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2"])
def test_packed_model_decodes_like_the_fp32_weights(variant: str) -> None:
    plain, packed = gguf_like_model(variant)
    output = pack_every_matrix(packed, "int4_bf16")
    # The tied output layer is the Q8_0 embedding (two 4-bit halves), else a Q4_1 lm_head.
    assert len(output.parts) == (2 if variant == "llama_tied" else 1)
    prompt = torch.randint(3, 256, (21,), generator=torch.Generator().manual_seed(8)).tolist()
    block_table = [4, 1, 6, 0, 3, 5, 2, 7, 9, 8, 10, 11]
    tokens = greedy_paged(plain, prompt, 24, block_table, 4)
    # Both models read the same tokens one decode step at a time (packed products of one
    # row), so each step's logits compare, wherever bf16 rounding would flip a choice.
    assert_bf16_close(
        forced_decode_logits(packed, prompt, tokens, block_table),
        forced_decode_logits(plain, prompt, tokens, block_table),
        MODEL_RELATIVE_ERROR,
    )


def forced_decode_logits(
    model: LlamaModel, prompt: list[int], tokens: list[int], block_table: list[int]
) -> torch.Tensor:
    pool = KVPool(model.spec, max(block_table) + 1, 4, model.dtype)
    rows = []
    with torch.inference_mode():
        meta = sequence_metadata(block_table, 0, len(prompt), 4, fresh=True)
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), meta, pool)
        rows.append(model.compute_logits(hidden[-1:]))
        for step, token in enumerate(tokens[:-1]):
            slot = len(prompt) + step
            meta = sequence_metadata(block_table, slot, 1, 4, fresh=False)
            hidden = model(torch.tensor([token]), torch.tensor([slot]), meta, pool)
            rows.append(model.compute_logits(hidden))
    return torch.cat(rows)


def test_unknown_packed_weights_mode_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="packed_weights"):
        load_model(ModelConfig(packed_weights="int3"))
