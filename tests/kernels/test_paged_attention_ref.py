"""The torch references of paged attention against a dense naive attention."""

import pytest
import torch

from ragcache.kernels.paged_attention import (
    causal_attention_ref,
    gather_kv,
    paged_attention_ref,
    paged_decode_attention_ref,
    write_kv_ref,
)
from tests.kernels.paged_cases import last_slots, make_paged_case, naive_attention

SEQ_LENS = [1, 17, 40]


def _ref(case):
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


@pytest.mark.parametrize(
    "query_slots",
    [
        last_slots(SEQ_LENS, [1, 1, 1]),
        last_slots(SEQ_LENS, [1, 5, 40]),
        [[0], [2, 3, 11, 16], [0, 1, 9, 30, 39]],
        [[], [4, 16], []],
    ],
    ids=["decode", "cached_prefix", "sorted_subset", "zero_queries"],
)
def test_paged_attention_ref_matches_naive_attention(query_slots: list[list[int]]) -> None:
    case = make_paged_case(SEQ_LENS, query_slots)
    torch.testing.assert_close(_ref(case).double(), naive_attention(case), atol=1e-5, rtol=1e-5)


def test_decode_ref_is_the_last_slot_of_each_sequence() -> None:
    case = make_paged_case(SEQ_LENS, last_slots(SEQ_LENS, [1, 1, 1]))
    out = paged_decode_attention_ref(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, case.scale
    )
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=1e-5)


def test_causal_attention_ref_matches_naive_attention() -> None:
    case = make_paged_case([23], [list(range(23))], num_q_heads=6, num_kv_heads=2)
    out = causal_attention_ref(case.q, case.keys[0], case.values[0], case.scale)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=1e-5)


def test_gather_kv_reads_shuffled_and_contiguous_tables() -> None:
    case = make_paged_case([40], [[39]])
    torch.testing.assert_close(gather_kv(case.k_cache, case.block_tables[0], 40), case.keys[0])
    pool = torch.randn(5, 16, 2, 8)
    contiguous = gather_kv(pool, torch.tensor([1, 2, 3], dtype=torch.int32), 37)
    torch.testing.assert_close(contiguous, pool.view(-1, 2, 8)[16:53])


def test_write_kv_ref_stores_rows_at_flat_slots() -> None:
    k_cache = torch.zeros(4, 16, 2, 8, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_ref(k_cache, v_cache, torch.tensor([0, 17, 63]), k, v)
    for row, (block, offset) in enumerate([(0, 0), (1, 1), (3, 15)]):
        assert torch.equal(k_cache[block, offset], k[row].half())
        assert torch.equal(v_cache[block, offset], v[row].half())
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3
