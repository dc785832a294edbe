"""The compiled decode step: the same greedy tokens and logits as the layer-by-layer path
on block-weight models, and the plain path wherever it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from ragcache.engine.config import ModelConfig
from ragcache.engine.fused_decode import (
    MAX_ROWS,
    decode_path_unavailable,
    decode_step_library,
)
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import ModelLoadError, load_model
from ragcache.engine.lora_layers import LoraBatch, LoraState, install_lora_layers
from ragcache.engine.lora_slots import LoraSlots
from tests.engine.conftest import greedy_paged
from tests.engine.test_packed_weights import (
    forced_decode_logits,
    gguf_like_model,
    pack_every_matrix,
)
from tests.service_helpers import tiny_model_folder

pytestmark = pytest.mark.skipif(
    decode_step_library() is None, reason="the fused step needs AVX2 and a C++ toolchain"
)

PROMPT = torch.randint(3, 256, (21,), generator=torch.Generator().manual_seed(8)).tolist()
# Blocks out of order, so that every read goes through the block table.
BLOCK_TABLE = [4, 1, 6, 0, 3, 5, 2, 7, 9, 8, 10, 11]


def plain_and_fused(variant: str):
    plain, fused = gguf_like_model(variant)
    pack_every_matrix(plain, "exact_blocks")
    pack_every_matrix(fused, "exact_blocks")
    assert fused.use_fused_decode()
    return plain, fused


@pytest.mark.parametrize("variant", ["llama_tied", "llama_untied", "qwen2", "llama3_rope"])
def test_fused_step_decodes_the_same_tokens(variant: str) -> None:
    plain, fused = plain_and_fused(variant)
    calls = count_fused_calls(fused)
    tokens = greedy_paged(plain, PROMPT, 24, BLOCK_TABLE, 4)
    assert greedy_paged(fused, PROMPT, 24, BLOCK_TABLE, 4) == tokens
    assert calls["n"] == 23  # every decode step, not the 21-token prefill
    torch.testing.assert_close(
        forced_decode_logits(fused, PROMPT, tokens, BLOCK_TABLE),
        forced_decode_logits(plain, PROMPT, tokens, BLOCK_TABLE),
        atol=1e-4,
        rtol=1e-4,
    )


def count_fused_calls(model) -> dict[str, int]:
    calls = {"n": 0}
    decoder = model.fused_decoder
    original = decoder.__call__

    class Counting(type(decoder)):
        def __call__(self, *args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

    decoder.__class__ = Counting
    return calls


def several_sequences_step(model, pool: KVPool) -> torch.Tensor:
    """Two sequences: one verifies 3 tokens (speculation), one decodes 1, one prefills a
    fresh 5-token chunk; each over its own blocks."""
    from ragcache.engine.attention_metadata import step_metadata

    tables = [[0, 1, 2], [5, 3], [7, 6]]
    starts, counts = [9, 6, 0], [3, 1, 5]
    meta = step_metadata(tables, starts, counts, 4, torch.device("cpu"))
    ids = torch.randint(3, 256, (sum(counts),), generator=torch.Generator().manual_seed(3))
    positions = meta.query_slots.to(torch.long)
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, meta, pool))


def test_several_sequences_and_draft_rows_match_the_plain_path() -> None:
    plain, fused = plain_and_fused("llama_untied")
    pool_plain = KVPool(plain.spec, 8, 4, torch.float32)
    pool_plain.data.normal_(generator=torch.Generator().manual_seed(4))
    pool_fused = KVPool(fused.spec, 8, 4, torch.float32)
    pool_fused.data.copy_(pool_plain.data)
    expected = several_sequences_step(plain, pool_plain)
    out = several_sequences_step(fused, pool_fused)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # The new tokens' KV lands in the same slots.
    torch.testing.assert_close(pool_fused.data, pool_plain.data, atol=1e-5, rtol=1e-5)


def test_more_rows_than_the_limit_take_the_plain_path() -> None:
    _, fused = plain_and_fused("llama_tied")
    pool = KVPool(fused.spec, 12, 4, torch.float32)
    assert fused.fused_decoder.serves(MAX_ROWS, pool)
    assert not fused.fused_decoder.serves(MAX_ROWS + 1, pool)
    assert not fused.fused_decoder.serves(1, KVPool(fused.spec, 12, 4, torch.bfloat16))


def test_a_weight_changed_after_loading_falls_back() -> None:
    _, fused = plain_and_fused("llama_tied")
    pool = KVPool(fused.spec, 12, 4, torch.float32)
    with torch.no_grad():
        fused.layers[1].mlp.down_proj.weight.mul_(2)
    assert not fused.fused_decoder.serves(1, pool)


def test_an_active_lora_adapter_falls_back_and_none_active_keeps_it() -> None:
    _, fused = plain_and_fused("llama_tied")
    pool = KVPool(fused.spec, 12, 4, torch.float32)
    state = LoraState(LoraSlots(fused.spec, 1, torch.float32, torch.device("cpu")))
    install_lora_layers(fused, state)
    assert fused.fused_decoder.serves(1, pool)
    state.batch = LoraBatch(torch.ones(1, dtype=torch.int32), [4])
    assert not fused.fused_decoder.serves(1, pool)
    state.batch = None
    state.uniform = {}
    assert not fused.fused_decoder.serves(1, pool)


def test_models_without_blocks_keep_the_layer_path() -> None:
    loaded = load_model(ModelConfig(path=str(tiny_model_folder()), dtype="float32", device="cpu"))
    assert loaded.model.fused_decoder is None
    assert "exact GGUF blocks" in (decode_path_unavailable(loaded.model) or "")
    bf16 = load_model(ModelConfig(path=str(tiny_model_folder()), dtype="bfloat16", device="cpu"))
    assert "float32" in (decode_path_unavailable(bf16.model) or "")


def test_off_and_unknown_settings() -> None:
    _, fused = plain_and_fused("llama_tied")
    assert not fused.use_fused_decode(False)
    assert fused.fused_decoder is None
    with pytest.raises(ModelLoadError, match="fused_decode"):
        load_model(ModelConfig(fused_decode="always"))


def test_a_copied_model_decodes_layer_by_layer_with_the_same_tokens() -> None:
    plain, fused = plain_and_fused("llama_tied")
    copied = copy.deepcopy(fused)
    assert copied.fused_decoder is None
    tokens = greedy_paged(plain, PROMPT, 12, BLOCK_TABLE, 4)
    assert greedy_paged(copied, PROMPT, 12, BLOCK_TABLE, 4) == tokens
    assert greedy_paged(fused, PROMPT, 12, BLOCK_TABLE, 4) == tokens
