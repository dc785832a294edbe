"""Dispatch routes CPU tensors to the Triton kernels only when asked to."""

import pytest
import torch

from ragcache.kernels import dispatch, triton_paged_attention
from ragcache.kernels.paged_attention import paged_attention_ref, write_kv_ref
from ragcache.kernels.rope import rope_inv_freq, rotate_ref
from tests.kernels.paged_cases import PagedCase, make_paged_case


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGCACHE_TRITON_ON_CPU", "1")
    if not dispatch.triton_available():
        pytest.skip("triton is not importable or RAGCACHE_DISABLE_TRITON=1")


def _args(case: PagedCase) -> tuple:
    return (
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.seq_lens,
        case.query_start_loc,
        case.query_slots,
        case.scale,
    )


def test_cpu_tensors_use_the_reference_without_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAGCACHE_TRITON_ON_CPU", raising=False)
    assert not dispatch.use_triton(torch.zeros(1))


@pytest.mark.usefixtures("triton_on_cpu")
def test_single_queries_route_to_decode_bounded_by_their_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The middle query sits before its sequence's last written slot.
    case = make_paged_case([1, 17, 40], [[0], [9], [39]])
    kv_lens = []
    decode = triton_paged_attention.paged_decode_attention_triton

    def recording_decode(*args: torch.Tensor) -> torch.Tensor:
        kv_lens.append(args[4].tolist())
        return decode(*args)

    monkeypatch.setattr(triton_paged_attention, "paged_decode_attention_triton", recording_decode)
    out = dispatch.paged_attention(*_args(case), max_query_len=1)
    assert kv_lens == [[1, 10, 40]]
    torch.testing.assert_close(out, paged_attention_ref(*_args(case)), atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("triton_on_cpu")
def test_prefill_batches_route_to_prefill() -> None:
    case = make_paged_case([17, 40], [[], [3, 20, 21, 39]], num_q_heads=6)
    out = dispatch.paged_attention(*_args(case), max_query_len=4)
    torch.testing.assert_close(out, paged_attention_ref(*_args(case)), atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("triton_on_cpu")
def test_rotate_and_write_kv_route_to_triton() -> None:
    x, positions = torch.randn(3, 2, 64), torch.tensor([4, -4, 0])
    inv_freq = rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(
        dispatch.rotate(x, positions, inv_freq), rotate_ref(x, positions, inv_freq)
    )
    expected = torch.zeros(2, 2, 16, 2, 64)
    actual = expected.clone()
    slots = torch.tensor([1, 30, 16])
    write_kv_ref(expected[0], expected[1], slots, x, -x)
    dispatch.write_kv(actual[0], actual[1], slots, x, -x)
    assert torch.equal(actual, expected)
