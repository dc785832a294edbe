"""Triton paged attention against the torch reference, under the Triton interpreter."""

import pytest
import torch

from ragcache.kernels.paged_attention import paged_attention_ref, paged_decode_attention_ref
from ragcache.kernels.triton_paged_attention import (
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
)
from tests.kernels.paged_cases import PagedCase, last_slots, make_paged_case

SEQ_LENS = [1, 17, 40]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
# (num_q_heads, num_kv_heads, head_dim, block_size)
SHAPES = [(4, 2, 64, 16), (6, 2, 128, 32), (2, 2, 64, 16)]
SHAPE_IDS = ["gqa2_d64_b16", "gqa3_d128_b32", "mha_d64_b16"]


def _prefill_triton(case: PagedCase, **kwargs) -> torch.Tensor:
    return paged_prefill_attention_triton(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        case.query_slots,
        case.scale,
        **kwargs,
    )


def _prefill_ref(case: PagedCase) -> torch.Tensor:
    return paged_attention_ref(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        case.query_slots,
        case.scale,
    )


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_matches_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    num_q_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(
        SEQ_LENS,
        last_slots(SEQ_LENS, [1, 1, 1]),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    _assert_close(paged_decode_attention_triton(*args), paged_decode_attention_ref(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_after_cached_prefix_matches_reference(
    shape: tuple[int, int, int, int], dtype: torch.dtype
) -> None:
    num_q_heads, num_kv_heads, head_dim, block_size = shape
    case = make_paged_case(
        SEQ_LENS,
        last_slots(SEQ_LENS, [1, 6, 40]),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=1,
    )
    _assert_close(_prefill_triton(case), _prefill_ref(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_of_a_sorted_subset_of_slots_matches_reference(dtype: torch.dtype) -> None:
    subsets = [[0], [0, 3, 9, 16], [1, 2, 7, 15, 16, 31, 32, 38, 39]]
    case = make_paged_case(SEQ_LENS, subsets, dtype=dtype, seed=2)
    _assert_close(_prefill_triton(case), _prefill_ref(case))


def test_prefill_skips_sequences_without_queries() -> None:
    seq_lens = [17, 1, 40, 5]
    case = make_paged_case(seq_lens, [[], [0], [], [2, 4]], seed=3)
    _assert_close(_prefill_triton(case), _prefill_ref(case))


def test_prefill_spans_several_query_tiles() -> None:
    # 70 queries with a group of 2 fill three tiles of 32 tokens.
    case = make_paged_case([70, 3], last_slots([70, 3], [70, 2]), seed=4)
    _assert_close(_prefill_triton(case, max_query_len=70), _prefill_ref(case))


def test_prefill_reads_non_contiguous_queries() -> None:
    case = make_paged_case(SEQ_LENS, last_slots(SEQ_LENS, [1, 3, 8]), seed=5)
    qkv = torch.cat([case.q, torch.randn_like(case.q)], dim=1)
    case.q = qkv[:, : case.q.shape[1]]
    assert not case.q.is_contiguous()
    _assert_close(_prefill_triton(case), _prefill_ref(case))


def test_empty_batches_return_empty_outputs() -> None:
    case = make_paged_case([5], [[]])
    assert _prefill_triton(case).shape == (0, 4, 64)


def test_invalid_inputs_raise_clear_errors() -> None:
    case = make_paged_case([17], [[16]])
    args = (case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention_triton(case.q[:, :3], *args)
    with pytest.raises(ValueError, match="share one dtype"):
        paged_decode_attention_triton(case.q.half(), *args)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_decode_attention_triton(torch.cat([case.q, case.q]), *args)
    small_blocks = case.k_cache.view(-1, 8, 2, 64)
    with pytest.raises(ValueError, match="power of two >= 16"):
        paged_decode_attention_triton(case.q, small_blocks, small_blocks, *args[2:])
    with pytest.raises(ValueError, match="query_slots"):
        paged_prefill_attention_triton(
            case.q, *args[:4], case.query_start_loc, case.query_slots[:0], case.scale
        )
