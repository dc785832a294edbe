"""The torch references of paged attention against a dense naive attention."""

import pytest
import torch

from ragcache.kernels.paged_attention import (
    causal_attention_ref,
    gather_kv,
    paged_attention_planned,
    paged_attention_ref,
    paged_decode_attention_ref,
    plan_paged_attention,
    write_kv_ref,
)
from tests.kernels.paged_cases import PagedCase, last_slots, make_paged_case, naive_attention

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


def _case_with_tables(tables: list[list[int]], seq_lens: list[int], counts: list[int]):
    """A paged case whose block tables are given; unwritten pool slots hold NaN."""
    block_size, num_kv_heads, head_dim = 16, 2, 32
    gen = torch.Generator().manual_seed(11)
    shape = (max(b for t in tables for b in t) + 2, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    keys, values = [], []
    for table, seq_len in zip(tables, seq_lens, strict=True):
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        for slot in range(seq_len):
            k_cache[table[slot // block_size], slot % block_size] = k[slot]
            v_cache[table[slot // block_size], slot % block_size] = v[slot]
        keys.append(k)
        values.append(v)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    query_slots = last_slots(seq_lens, counts)
    return PagedCase(
        q=torch.randn(sum(counts), 6, head_dim, generator=gen),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *counts]).cumsum(0).to(torch.int32),
        query_slots=torch.tensor([s for slots in query_slots for s in slots], dtype=torch.int32),
        keys=keys,
        values=values,
        scale=head_dim**-0.5,
    )


def test_one_query_reads_its_leading_block_run_in_place_and_copies_the_rest() -> None:
    run = list(range(20, 30))  # ten consecutive blocks: 160 slots in place
    tables = [
        [*run, 3, 41, 7],  # decoding after a contiguous prompt, then scattered blocks
        list(range(50, 63)),  # fully contiguous
        [80, 81, 5, 44],  # a short run: copied whole
        [*range(70, 80), 2, 46],  # several queries: copied whole, masked
    ]
    seq_lens = [200, 201, 60, 170]
    counts = [1, 1, 1, 5]
    case = _case_with_tables(tables, seq_lens, counts)
    plans = plan_paged_attention(
        case.block_tables, case.seq_lens, case.query_start_loc, case.query_slots, 16
    )
    assert [(p.kv_start, p.run_len, p.kv_slots is None) for p in plans] == [
        (320, 160, False),
        (800, 201, True),
        (None, 0, False),
        (None, 0, False),
    ]
    torch.testing.assert_close(_ref(case).double(), naive_attention(case), atol=1e-5, rtol=1e-5)
    for index in range(len(tables)):
        alone = paged_attention_planned(
            case.q, case.k_cache, case.v_cache, [plans[index]], case.scale
        )
        a, b = plans[index].query_start, plans[index].query_end
        torch.testing.assert_close(
            alone[a:b].double(), naive_attention(case)[a:b], atol=1e-5, rtol=1e-5
        )


def test_a_prefill_chunk_at_the_end_attends_causally_without_a_mask() -> None:
    seq_lens = [40, 40, 33, 33]
    query_slots = [
        list(range(40)),  # a whole prompt
        list(range(24, 40)),  # a later chunk after a cached prefix
        [2, 3, 11, 32],  # a subset: masked
        [30, 32],  # a gap before the last slot: masked
    ]
    case = make_paged_case(seq_lens, query_slots, num_q_heads=6, num_kv_heads=2)
    plans = plan_paged_attention(
        case.block_tables, case.seq_lens, case.query_start_loc, case.query_slots, 16
    )
    assert [(p.causal_tail, p.mask is None) for p in plans] == [
        (True, True),
        (True, True),
        (False, False),
        (False, False),
    ]
    torch.testing.assert_close(_ref(case).double(), naive_attention(case), atol=1e-5, rtol=1e-5)


def test_a_prefill_chunk_over_consecutive_blocks_is_read_in_place() -> None:
    tables = [list(range(10, 14)), list(range(30, 33))]
    case = _case_with_tables(tables, [64, 40], [64, 9])
    plans = plan_paged_attention(
        case.block_tables, case.seq_lens, case.query_start_loc, case.query_slots, 16
    )
    assert [(p.causal_tail, p.kv_start, p.kv_slots is None) for p in plans] == [
        (True, 160, True),
        (True, 480, True),
    ]
    torch.testing.assert_close(_ref(case).double(), naive_attention(case), atol=1e-5, rtol=1e-5)


def test_many_scattered_queries_attend_band_by_band() -> None:
    gen = torch.Generator().manual_seed(5)
    seq_lens = [700, 300]
    scattered = sorted(torch.randperm(680, generator=gen)[:150].tolist())
    query_slots = [
        [*scattered, *range(680, 700)],  # fusion's picks, then the question
        list(range(100, 300, 2))[::-1],  # out of order: the mask
    ]
    case = make_paged_case(seq_lens, query_slots, num_q_heads=6, num_kv_heads=2)
    plans = plan_paged_attention(
        case.block_tables, case.seq_lens, case.query_start_loc, case.query_slots, 16
    )
    assert plans[0].bands is not None and plans[0].mask is None
    assert [(b.first, b.stop) for b in plans[0].bands] == [(0, 64), (64, 128), (128, 170)]
    assert plans[1].bands is None and plans[1].mask is not None
    torch.testing.assert_close(_ref(case).double(), naive_attention(case), atol=1e-5, rtol=1e-5)
