"""Batched LoRA: the gathered reference against a loop over tokens, the grouped CPU path
and the Triton kernel (under the interpreter) against the reference."""

import pytest
import torch

from ragcache.kernels import dispatch
from ragcache.kernels.lora import add_lora_grouped, add_lora_ref, slot_groups
from ragcache.kernels.triton_lora import add_lora_triton


def _slots(num_slots: int, in_features: int, rank: int, out: int, dtype: torch.dtype):
    """Stacked adapters with slot 0 all zeros and slot 2 of a smaller, zero-padded rank."""
    a = torch.randn(num_slots, in_features, rank)
    b = torch.randn(num_slots, rank, out) * 0.1
    a[0], b[0] = 0, 0
    a[2, :, rank // 2 :], b[2, rank // 2 :] = 0, 0
    ranks = [rank] * num_slots
    ranks[0], ranks[2] = 0, rank // 2
    return a.to(dtype), b.to(dtype), ranks


def test_reference_is_a_loop_over_tokens() -> None:
    a, b, _ = _slots(4, 24, 8, 40, torch.float32)
    x = torch.randn(6, 24)
    slots = torch.tensor([0, 3, 1, 3, 2, 0])
    y = torch.randn(6, 40)
    expected = y.clone()
    for t, s in enumerate(slots.tolist()):
        expected[t] += x[t] @ a[s] @ b[s]
    add_lora_ref(y, x, a, b, slots)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[0], expected[0]) and torch.equal(y[5], expected[5])


@pytest.mark.parametrize(
    "slots",
    [[0, 3, 1, 3, 2, 0, 1], [2, 2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]],
)
def test_grouped_path_matches_reference_into_a_column_window(slots: list[int]) -> None:
    a, b, ranks = _slots(4, 24, 8, 40, torch.float32)
    x = torch.randn(7, 24)
    token_slots = torch.tensor(slots, dtype=torch.int32)
    fused = torch.randn(7, 100)
    expected = fused.clone()
    add_lora_ref(expected[:, 30:70], x, a, b, token_slots)
    add_lora_grouped(fused[:, 30:70], x, a, b, slot_groups(token_slots, ranks))
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused[:, :30], expected[:, :30])


@pytest.mark.parametrize(
    ("dtype", "in_features", "rank", "out", "tol"),
    [
        (torch.float32, 64, 16, 96, 1e-5),
        (torch.float32, 200, 64, 33, 1e-5),
        (torch.float16, 64, 8, 160, 2e-2),
    ],
)
def test_triton_matches_reference(
    dtype: torch.dtype, in_features: int, rank: int, out: int, tol: float
) -> None:
    a, b, _ = _slots(5, in_features, rank, out, dtype)
    x = torch.randn(9, in_features).to(dtype)
    token_slots = torch.tensor([0, 4, 1, 2, 4, 3, 0, 1, 2], dtype=torch.int32)
    expected = torch.randn(9, out).to(dtype)
    actual = expected.clone()
    add_lora_ref(expected, x, a, b, token_slots)
    add_lora_triton(actual, x, a, b, token_slots)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def test_triton_writes_only_its_window_and_skips_base_tokens() -> None:
    a, b, _ = _slots(3, 32, 4, 20, torch.float32)
    x = torch.randn(4, 32)
    token_slots = torch.tensor([0, 1, 2, 0])
    fused = torch.randn(4, 50)
    before = fused.clone()
    add_lora_triton(fused[:, 10:30], x, a, b, token_slots)
    expected = before.clone()
    add_lora_ref(expected[:, 10:30], x, a, b, token_slots)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused[[0, 3]], before[[0, 3]])
    assert torch.equal(fused[:, :10], before[:, :10]) and torch.equal(fused[:, 30:], before[:, 30:])


def test_bad_shapes_are_named() -> None:
    a, b, _ = _slots(3, 32, 4, 20, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        add_lora_triton(torch.zeros(2, 21), torch.zeros(2, 32), a, b, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        add_lora_ref(torch.zeros(2, 20), torch.zeros(2, 32), a, b, torch.tensor([0.0, 1.0]))


def test_dispatch_routes_cpu_tensors_to_the_grouped_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAGCACHE_TRITON_ON_CPU", raising=False)
    a, b, ranks = _slots(4, 16, 4, 12, torch.float32)
    x, token_slots = torch.randn(5, 16), torch.tensor([1, 1, 3, 0, 2])
    expected, actual = torch.zeros(5, 12), torch.zeros(5, 12)
    add_lora_ref(expected, x, a, b, token_slots)
    dispatch.add_lora(actual, x, a, b, token_slots, slot_groups(token_slots, ranks))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_dispatch_routes_to_triton_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGCACHE_TRITON_ON_CPU", "1")
    if not dispatch.triton_available():
        pytest.skip("triton is not importable or RAGCACHE_DISABLE_TRITON=1")
    a, b, _ = _slots(4, 16, 4, 12, torch.float32)
    x, token_slots = torch.randn(5, 16), torch.tensor([1, 1, 3, 0, 2])
    expected, actual = torch.zeros(5, 12), torch.zeros(5, 12)
    add_lora_ref(expected, x, a, b, token_slots)
    # Empty groups: only the Triton path can produce the update.
    dispatch.add_lora(actual, x, a, b, token_slots, [])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
