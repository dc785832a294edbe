"""Tiny random-initialised Llama-family models: transformers' own classes as the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from ragcache.engine.attention_metadata import AttentionMetadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import build_model
from ragcache.engine.model import LlamaModel
from ragcache.engine.spec import ModelSpec

TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    # Larger than the default 0.02 so that logits are well separated and greedy
    # choices never hinge on round-off.
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

TINY_VARIANTS = ("llama_tied", "llama_untied", "llama3_rope", "qwen2", "mistral")


@dataclass(slots=True)
class TinyModel:
    name: str
    reference: Any
    ours: LlamaModel
    spec: ModelSpec


def tiny_hf_config(variant: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if variant == "llama_tied":
        return LlamaConfig(**TINY_SHAPE, tie_word_embeddings=True)
    if variant == "llama_untied":
        return LlamaConfig(**TINY_SHAPE, tie_word_embeddings=False)
    if variant == "llama3_rope":
        return LlamaConfig(**TINY_SHAPE, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    if variant == "qwen2":
        return Qwen2Config(**TINY_SHAPE, tie_word_embeddings=False)
    if variant == "mistral":
        return MistralConfig(**TINY_SHAPE, tie_word_embeddings=False, sliding_window=None)
    raise ValueError(f"unknown tiny variant {variant!r}")


def tiny_hf_model(variant: str, seed: int = 0) -> Any:
    """A transformers model with every weight random, biases and norm scales included."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_hf_config(variant), dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            # transformers initialises biases to zero and norm scales to one, which
            # would hide a misplaced bias or a dropped norm weight.
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def ours_from_hf(reference: Any) -> tuple[LlamaModel, ModelSpec]:
    spec = ModelSpec.from_hf_config(reference.config)
    state = {name: t.detach().clone() for name, t in reference.state_dict().items()}
    return build_model(spec, state, torch.float32, torch.device("cpu")), spec


def make_tiny(variant: str, seed: int = 0) -> TinyModel:
    reference = tiny_hf_model(variant, seed)
    ours, spec = ours_from_hf(reference)
    return TinyModel(variant, reference, ours, spec)


@pytest.fixture(scope="session", params=TINY_VARIANTS)
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama() -> TinyModel:
    return make_tiny("llama_tied")


@pytest.fixture(scope="session")
def tiny_llama3() -> TinyModel:
    return make_tiny("llama3_rope")


def sequence_metadata(
    block_table: list[int], first_slot: int, count: int, block_size: int, fresh: bool
) -> AttentionMetadata:
    """One sequence computing its slots [first_slot, first_slot + count) of a block table."""
    slots = torch.arange(first_slot, first_slot + count)
    table = torch.tensor(block_table, dtype=torch.long)
    flat_slots = table[slots // block_size] * block_size + slots % block_size
    return AttentionMetadata(
        slot_mapping=flat_slots,
        query_slots=slots.to(torch.int32),
        query_start_loc=torch.tensor([0, count], dtype=torch.int32),
        seq_lens=torch.tensor([first_slot + count], dtype=torch.int32),
        block_tables=torch.tensor([block_table], dtype=torch.int32),
        max_query_len=count,
        fresh=fresh,
    )


def greedy_paged(
    model: LlamaModel,
    prompt: list[int],
    new_tokens: int,
    block_table: list[int],
    block_size: int,
) -> list[int]:
    """Prefill the prompt into the blocks of ``block_table``, then decode greedily."""
    pool = KVPool(model.spec, max(block_table) + 1, block_size, model.dtype)
    meta = sequence_metadata(block_table, 0, len(prompt), block_size, fresh=True)
    positions = torch.arange(len(prompt))
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), positions, meta, pool)
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out = [token]
        for step in range(new_tokens - 1):
            slot = len(prompt) + step
            meta = sequence_metadata(block_table, slot, 1, block_size, fresh=False)
            hidden = model(torch.tensor([token]), torch.tensor([slot]), meta, pool)
            token = int(model.compute_logits(hidden).argmax(-1))
            out.append(token)
    return out
