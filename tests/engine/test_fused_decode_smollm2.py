"""On the embedded SmolLM2: the compiled decode step gives the same 128 greedy tokens
as the layer-by-layer path after a 512-token MuSiQue prompt (bench model's decode)."""

from __future__ import annotations

import pytest
import torch

from ragcache.bench.model_passes import corpus_token_ids, ours_greedy, pool_for
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import load_model

pytestmark = pytest.mark.slow


def test_compiled_step_decodes_the_same_128_tokens(shared_data) -> None:
    loaded = load_model(ModelConfig(dtype="float32", device="cpu"))
    model = loaded.model
    fused = model.fused_decoder
    if fused is None:
        pytest.skip("the compiled step does not apply on this machine")
    ids = torch.tensor(corpus_token_ids(loaded.tokenizer, 512))
    with torch.inference_mode():
        compiled = ours_greedy(model, pool_for(model, 512 + 128), ids, 128)
        model.fused_decoder = None
        plain = ours_greedy(model, pool_for(model, 512 + 128), ids, 128)
    assert compiled == plain
