"""The engine's own forward pass against transformers' model classes."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel
from ragcache.kernels.block_gemv import block_kernels
from tests.engine.conftest import TinyModel, greedy_paged, sequence_metadata

BLOCK_SIZE = 4
MUSIQUE = Path("/work/shared/data/musique_dev.json")


def random_prompt(length: int, seed: int, vocab: int = 256) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def our_prefill_logits(model: LlamaModel, prompt: list[int]) -> torch.Tensor:
    pool = KVPool(model.spec, (len(prompt) + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype)
    meta = contiguous_metadata([len(prompt)], BLOCK_SIZE)
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), meta, pool)
        return model.compute_logits(hidden)


def reference_logits(reference: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([prompt])).logits[0].float()


def reference_greedy(reference: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            # No end-of-sequence token: neither stopping nor its suppression applies.
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_logits_match_transformers(tiny: TinyModel) -> None:
    prompt = random_prompt(48, seed=1)
    ours = our_prefill_logits(tiny.ours, prompt)
    expected = reference_logits(tiny.reference, prompt)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-4


def test_tiny_models_cover_what_they_claim(tiny: TinyModel) -> None:
    spec, ours = tiny.spec, tiny.ours
    assert spec.qkv_bias == (tiny.name == "qwen2")
    if spec.qkv_bias:
        bias = ours.layers[0].self_attn.qkv_proj.bias
        assert bias is not None and bias.abs().min().item() > 0.0
    assert (ours.lm_head is None) == (tiny.name in ("llama_tied", "llama3_rope"))
    if tiny.name == "llama3_rope":
        assert spec.rope_scaling is not None and spec.rope_scaling["rope_type"] == "llama3"


def test_greedy_generation_over_shuffled_blocks_matches_generate(tiny: TinyModel) -> None:
    prompt, new_tokens = random_prompt(13, seed=2), 32
    num_blocks = (len(prompt) + new_tokens) // BLOCK_SIZE + 4
    block_table = list(range(num_blocks))
    random.Random(3).shuffle(block_table)
    assert block_table != sorted(block_table)
    ours = greedy_paged(tiny.ours, prompt, new_tokens, block_table, BLOCK_SIZE)
    assert ours == reference_greedy(tiny.reference, prompt, new_tokens)


@pytest.mark.parametrize("fresh", [True, False])
def test_batched_forward_equals_each_sequence_alone(tiny: TinyModel, fresh: bool) -> None:
    prompts = [random_prompt(n, seed=10 + n) for n in (5, 17, 9)]
    model = tiny.ours
    counts = [len(p) for p in prompts]
    meta = contiguous_metadata(counts, BLOCK_SIZE)
    meta.fresh = fresh
    pool = KVPool(model.spec, sum(counts) // BLOCK_SIZE + len(counts), BLOCK_SIZE, model.dtype)
    flat_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in counts])
    with torch.inference_mode():
        batched = model.compute_logits(model(flat_ids, positions, meta, pool))
    alone = torch.cat([our_prefill_logits(model, p) for p in prompts])
    assert (batched - alone).abs().max().item() <= 1e-5


def test_subset_recompute_in_later_layers_matches_full_run(tiny: TinyModel) -> None:
    model = tiny.ours
    prompts = [random_prompt(n, seed=20 + n) for n in (11, 23)]
    counts = [len(p) for p in prompts]
    meta = contiguous_metadata(counts, BLOCK_SIZE)
    pool = KVPool(model.spec, sum(counts) // BLOCK_SIZE + len(counts), BLOCK_SIZE, model.dtype)
    flat_ids = torch.tensor([t for p in prompts for t in p])
    rope = model.rope(torch.cat([torch.arange(n) for n in counts]))
    layers = model.spec.num_layers
    with torch.inference_mode():
        after_first = model.run_layers(model.embed(flat_ids), rope, meta, pool, range(0, 1))
        full = model.run_layers(after_first, rope, meta, pool, range(1, layers))
        # Tokens of both sequences, including each one's first and last token.
        chosen = torch.tensor([0, 4, 10, 11, 12, 20, 33])
        recomputed = model.run_layers(
            after_first[chosen], rope.subset(chosen), meta.subset(chosen), pool, range(1, layers)
        )
    # Hidden states reach ~20 in these tiny models: the bound is fp32 round-off.
    torch.testing.assert_close(recomputed, full[chosen], rtol=1e-5, atol=1e-5)


def test_paged_prefill_after_cached_prefix_matches_one_shot(tiny_llama: TinyModel) -> None:
    """A prompt computed in two calls (prefix, then the rest against its KV) is the same."""
    model, prompt = tiny_llama.ours, random_prompt(30, seed=4)
    block_table = [5, 2, 7, 0, 3, 6, 1, 4]
    pool = KVPool(model.spec, len(block_table), BLOCK_SIZE, model.dtype)
    split = 11
    with torch.inference_mode():
        model(
            torch.tensor(prompt[:split]),
            torch.arange(split),
            sequence_metadata(block_table, 0, split, BLOCK_SIZE, fresh=True),
            pool,
        )
        rest = model(
            torch.tensor(prompt[split:]),
            torch.arange(split, len(prompt)),
            sequence_metadata(block_table, split, len(prompt) - split, BLOCK_SIZE, fresh=False),
            pool,
        )
        logits = model.compute_logits(rest)
    expected = reference_logits(tiny_llama.reference, prompt)[split:]
    assert (logits - expected).abs().max().item() <= 1e-4


# ---- the real SmolLM2 (slow) ------------------------------------------------------------


def musique_prompt(tokenizer, length: int) -> list[int]:
    """``length`` token ids: MuSiQue passages, then the question and an answer cue."""
    record = json.loads(MUSIQUE.read_text())[0]
    passages = "\n\n".join(f"{c['title']}\n{c['text']}".strip() for c in record["ctxs"])
    tail = tokenizer(f"\n\nQuestion: {record['question']}\nAnswer:")["input_ids"]
    head = tokenizer(passages)["input_ids"][: length - len(tail)]
    assert len(head) + len(tail) == length
    return head + tail


@pytest.fixture(scope="module")
def smollm2_pair():
    from transformers import AutoModelForCausalLM

    from ragcache.engine.config import ModelConfig
    from ragcache.engine.loader import load_model

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(dtype="float32", device="cpu"))
    reference = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32).eval()
    return loaded, reference


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_512_tokens(smollm2_pair) -> None:
    loaded, reference = smollm2_pair
    prompt = musique_prompt(loaded.tokenizer, 512)
    ours = our_prefill_logits(loaded.model, prompt)
    expected = reference_logits(reference, prompt)
    assert (ours - expected).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_match_generate(smollm2_pair) -> None:
    loaded, reference = smollm2_pair
    prompt = musique_prompt(loaded.tokenizer, 512)
    block_size = 16
    block_table = list(range((len(prompt) + 64) // block_size + 1))
    random.Random(5).shuffle(block_table)
    # The default loads exact block copies where the kernel builds: decode reads them.
    assert block_kernels() is None or loaded.model.output_packed is not None
    ours = greedy_paged(loaded.model, prompt, 64, block_table, block_size)
    expected = reference_greedy(reference, prompt, 64)
    assert ours == expected


@pytest.mark.slow
def test_smollm2_bf16_greedy_agreement_with_fp32_is_reported(smollm2_pair) -> None:
    """bf16 may legitimately diverge from fp32 after a near-tie; this records how far."""
    loaded, _ = smollm2_pair
    bf16_model = copy.deepcopy(loaded.model).to(torch.bfloat16)
    prompt = musique_prompt(loaded.tokenizer, 512)
    block_table = list(range((len(prompt) + 16) // 16 + 1))
    fp32_tokens = greedy_paged(loaded.model, prompt, 16, block_table, 16)
    bf16_tokens = greedy_paged(bf16_model, prompt, 16, block_table, 16)
    agree = next(
        (i for i, (a, b) in enumerate(zip(fp32_tokens, bf16_tokens, strict=True)) if a != b),
        len(fp32_tokens),
    )
    print(f"\nbf16 vs fp32 greedy: first {agree} of {len(fp32_tokens)} tokens identical")
    print("fp32:", loaded.tokenizer.decode(fp32_tokens))
    print("bf16:", loaded.tokenizer.decode(bf16_tokens))
    assert len(bf16_tokens) == len(fp32_tokens) == 16
