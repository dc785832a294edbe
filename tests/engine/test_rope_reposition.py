"""Re-positioning cached keys: one rotation by the position delta equals computing anew."""

from __future__ import annotations

import pytest
import torch

from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel
from ragcache.kernels.rope import rotate_ref
from tests.engine.conftest import TinyModel

BLOCK_SIZE = 8
CHUNK = [17, 99, 3, 250, 41, 41, 7, 180, 66, 5, 128]
# (cached at p, moved to q); q < p included, and positions far from the start, where
# rotation angles computed in fp32 would already be off by more than the bound.
MOVES = [(0, 5), (40, 7), (3, 200), (250, 0), (1000, 1013), (513, 129), (4000, 100), (7000, 7900)]


def pre_rope_keys_and_pool(model: LlamaModel, start: int) -> tuple[dict[int, torch.Tensor], KVPool]:
    """Each layer's pre-RoPE keys [T, Hkv, D] of CHUNK placed at ``start``, and the pool."""
    captured: dict[int, torch.Tensor] = {}

    def keep_keys(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        captured[layer] = k.clone()

    pool = KVPool(model.spec, (len(CHUNK) + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype)
    meta = contiguous_metadata([len(CHUNK)], BLOCK_SIZE)
    positions = torch.arange(start, start + len(CHUNK))
    with torch.inference_mode():
        model(torch.tensor(CHUNK), positions, meta, pool, hook=keep_keys)
    return captured, pool


def stored_keys(pool: KVPool, layer: int) -> torch.Tensor:
    return pool.read_slots(layer, torch.arange(len(CHUNK)))[0]


@pytest.fixture(params=["plain", "llama3"])
def rope_model(
    request: pytest.FixtureRequest, tiny_llama: TinyModel, tiny_llama3: TinyModel
) -> TinyModel:
    return tiny_llama if request.param == "plain" else tiny_llama3


@pytest.mark.parametrize(("p", "q"), MOVES)
def test_rotating_by_delta_equals_rotating_at_new_position(
    rope_model: TinyModel, p: int, q: int
) -> None:
    model = rope_model.ours
    pre_rope, pool = pre_rope_keys_and_pool(model, start=p)
    offsets = torch.arange(len(CHUNK))
    for layer, k_pre in pre_rope.items():
        at_p = rotate_ref(k_pre, p + offsets, model.inv_freq)
        # The pool holds exactly the hook's keys rotated at their positions.
        assert torch.equal(stored_keys(pool, layer), at_p)
        moved = rotate_ref(at_p, torch.full_like(offsets, q - p), model.inv_freq)
        at_q = rotate_ref(k_pre, q + offsets, model.inv_freq)
        assert (moved - at_q).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("p", "q"), MOVES)
def test_moved_first_layer_keys_equal_keys_computed_at_new_position(
    rope_model: TinyModel, p: int, q: int
) -> None:
    """First-layer keys depend on the token alone, so the model's own run at q must agree."""
    model = rope_model.ours
    _, pool_p = pre_rope_keys_and_pool(model, start=p)
    _, pool_q = pre_rope_keys_and_pool(model, start=q)
    delta = torch.full((len(CHUNK),), q - p)
    moved = rotate_ref(stored_keys(pool_p, 0), delta, model.inv_freq)
    assert (moved - stored_keys(pool_q, 0)).abs().max().item() <= 1e-5


def test_llama3_scaling_changes_the_frequencies(tiny_llama3: TinyModel, tiny_llama: TinyModel):
    """Guards the llama3 cases above against silently testing plain RoPE."""
    assert not torch.allclose(tiny_llama3.ours.inv_freq, tiny_llama.ours.inv_freq)
