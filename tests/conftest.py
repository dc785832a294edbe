"""Shared fixtures: tiny random-initialised Llama-family models built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragcache.engine.loader import LoadedModel, build_model, weights_fingerprint
from ragcache.engine.spec import ModelSpec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A transformers model with random weights scaled so greedy choices are clear-cut."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


def loaded_from_hf(hf_model, tokenizer=None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    spec = ModelSpec.from_hf_config(hf_model.config)
    state = {n: t.detach().clone() for n, t in hf_model.state_dict().items()}
    model = build_model(spec, state, dtype, torch.device("cpu"))
    return LoadedModel(
        model, spec, tokenizer, weights_fingerprint(spec, state), "tiny", Path("tiny")
    )


@pytest.fixture(scope="session")
def engine_model() -> LoadedModel:
    return loaded_from_hf(random_hf_model("llama"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "musique_dev.json").is_file():
        pytest.skip(f"evaluation data not found under {SHARED_DATA}")
    return SHARED_DATA
