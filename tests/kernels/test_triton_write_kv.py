"""Triton KV write against write_kv_ref, under the Triton interpreter."""

import pytest
import torch

from ragcache.kernels.paged_attention import write_kv_ref
from ragcache.kernels.triton_write_kv import write_kv_triton


def _pool(dtype: torch.dtype) -> torch.Tensor:
    # Per layer, K and V are views into one [layers, 2, blocks, block_size, Hkv, D] pool.
    return torch.randn(2, 2, 6, 16, 3, 64).to(dtype)


@pytest.mark.parametrize(
    ("cache_dtype", "input_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
    ],
)
def test_write_kv_matches_reference(cache_dtype: torch.dtype, input_dtype: torch.dtype) -> None:
    expected = _pool(cache_dtype)
    actual = expected.clone()
    slots = torch.tensor([0, 15, 16, 40, 95, 33])
    k = torch.randn(6, 3, 64).to(input_dtype)
    v = torch.randn(6, 3, 64).to(input_dtype)
    write_kv_ref(expected[1, 0], expected[1, 1], slots, k, v)
    write_kv_triton(actual[1, 0], actual[1, 1], slots, k, v)
    assert torch.equal(actual, expected)


def test_write_kv_skips_negative_slots() -> None:
    pool = _pool(torch.float32)
    before = pool.clone()
    k = torch.randn(2, 3, 64)
    write_kv_triton(pool[0, 0], pool[0, 1], torch.tensor([-1, 5], dtype=torch.int32), k, k)
    assert torch.equal(pool[0, 0, 0, 5], k[1])
    pool[0, :, 0, 5] = before[0, :, 0, 5]
    assert torch.equal(pool, before)


def test_write_kv_rejects_mismatched_heads() -> None:
    pool = _pool(torch.float32)
    k = torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match=r"k and v must both be \[tokens, 3, 64\]"):
        write_kv_triton(pool[0, 0], pool[0, 1], torch.tensor([0, 1]), k, k)
