"""Speculative decoding keeps greedy output exact under continuous batching, preemption and
rollback, for every proposer; requests and the engine config choose how much to draft."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ragcache.engine.config import EngineConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from ragcache.engine.sequence import PlacedKV
from tests.conftest import loaded_from_hf, random_hf_model

VOCAB = 64
GREEDY = SamplingParams(max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def looping_model() -> LoadedModel:
    """Small weights make its greedy text fall into cycles, so lookup drafts are often right."""
    return loaded_from_hf(
        random_hf_model("llama", seed=2, vocab_size=VOCAB, initializer_range=0.05)
    )


@pytest.fixture(scope="module")
def small_draft() -> LoadedModel:
    """A separate, smaller random model over the same vocabulary."""
    return loaded_from_hf(
        random_hf_model(
            "llama",
            seed=7,
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            initializer_range=0.05,
        )
    )


def make_engine(
    loaded: LoadedModel, method: str = "off", draft: LoadedModel | None = None, **overrides
) -> Engine:
    speculative = SpeculativeConfig(
        method=method,
        num_speculative_tokens=5,
        prompt_lookup_min=1,
        draft_layers=2,
        adaptive=False,
    )
    for name in ("adaptive", "num_speculative_tokens", "disable_by_batch_size"):
        if name in overrides:
            setattr(speculative, name, overrides.pop(name))
    settings = dict(
        kv_cache_bytes=8 << 20, block_size=8, max_num_batched_tokens=512, speculative=speculative
    )
    settings.update(overrides)
    return Engine(loaded, EngineConfig(**settings), draft=draft)


def random_prompts(count: int, seed: int, low: int = 20, high: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def reference_outputs(loaded: LoadedModel, prompts: list[list[int]], params: SamplingParams):
    return [o.token_ids for o in make_engine(loaded).generate(prompts, params)]


def tight_pool(loaded: LoadedModel, blocks: int) -> int:
    return loaded.spec.kv_bytes_per_token * 8 * 4 * blocks


PROPOSERS = ["ngram", "early_exit", "draft_model", "draft_model_same"]


def proposer_engine(
    name: str, target: LoadedModel, small_draft: LoadedModel, **overrides
) -> Engine:
    if name == "draft_model":
        return make_engine(target, "draft_model", draft=small_draft, **overrides)
    if name == "draft_model_same":
        return make_engine(target, "draft_model", draft=target, **overrides)
    return make_engine(target, name, **overrides)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_greedy_output_is_identical_under_batching_and_preemption(
    proposer: str, looping_model: LoadedModel, small_draft: LoadedModel
) -> None:
    prompts = random_prompts(6, seed=3)
    expected = reference_outputs(looping_model, prompts, GREEDY)
    engine = proposer_engine(
        proposer, looping_model, small_draft, kv_cache_bytes=tight_pool(looping_model, 20)
    )
    outputs = engine.generate(prompts, GREEDY)
    stats = engine.stats()
    assert [o.token_ids for o in outputs] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if proposer == "draft_model_same":
        # The target drafting for itself is always right.
        assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"] > 0
    else:
        assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] > 0


def test_swap_preemption_with_drafts_keeps_output(looping_model: LoadedModel) -> None:
    prompts = random_prompts(6, seed=8)
    expected = reference_outputs(looping_model, prompts, GREEDY)
    engine = make_engine(
        looping_model,
        "ngram",
        kv_cache_bytes=tight_pool(looping_model, 20),
        preemption_mode="swap",
    )
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    assert engine.num_swapped_out > 0
    assert engine.stats()["spec_num_accepted_tokens"] > 0


def test_rejected_drafts_give_back_blocks_and_their_slots_are_rewritten(
    looping_model: LoadedModel, small_draft: LoadedModel
) -> None:
    engine = make_engine(looping_model, "draft_model", draft=small_draft)
    manager = engine.block_manager
    seqs = [engine.add_request(p, GREEDY) for p in random_prompts(4, seed=5)]
    while engine.has_unfinished():
        engine.step()
        held = {b for s in engine.scheduler.running for b in s.block_table}
        assert manager.num_free_blocks == manager.num_blocks - len(held)
        for seq in engine.scheduler.running:
            if not seq.in_prefill:
                assert len(seq.block_table) <= manager.blocks_needed(len(seq))
        if engine.num_steps == 12:
            check_kv_matches_fresh_prefill(engine, seqs[0])
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] - stats["spec_num_accepted_tokens"] > 20
    assert manager.num_free_blocks == manager.num_blocks


def check_kv_matches_fresh_prefill(engine: Engine, seq) -> None:
    """Every computed slot holds the KV a plain prefill of the same tokens writes."""
    computed = len(seq) - 1
    fresh = make_engine(engine.loaded)
    twin = fresh.add_request([*seq.token_ids[:computed], seq.token_ids[-1]], GREEDY)
    fresh.step()
    bs = engine.pool.block_size
    ours = torch.tensor([seq.slot(i, bs) for i in range(computed)])
    theirs = torch.tensor([twin.slot(i, bs) for i in range(computed)])
    for layer in range(engine.spec.num_layers):
        for a, b in zip(
            engine.pool.read_slots(layer, ours), fresh.pool.read_slots(layer, theirs), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_placed_chunk_kv_request_drafts_from_its_prompt_ids(looping_model: LoadedModel) -> None:
    prompt = random_prompts(1, seed=4, low=40, high=40)[0]
    expected = reference_outputs(looping_model, [prompt], GREEDY)[0]
    spec = looping_model.spec
    capture = make_engine(looping_model, enable_prefix_caching=False)
    seq = capture.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    capture.step()
    slots = torch.tensor([seq.slot(i, 8) for i in range(32)])
    k, v = [], []
    for layer in range(spec.num_layers):
        layer_k, layer_v = capture.pool.read_slots(layer, slots)
        k.append(layer_k)
        v.append(layer_v)
    engine = make_engine(looping_model, "ngram", enable_prefix_caching=False)
    placed = engine.add_request(prompt, GREEDY, placed=PlacedKV(k, v))
    while engine.has_unfinished():
        engine.step()
    assert placed.output_ids == expected
    assert placed.plan[0] == 32
    assert engine.stats()["spec_num_accepted_tokens"] > 0


def test_stop_token_inside_accepted_drafts_ends_the_request_there(
    looping_model: LoadedModel,
) -> None:
    prompts = random_prompts(3, seed=11)
    full = reference_outputs(looping_model, prompts, GREEDY)
    stop = full[0][30]
    params = SamplingParams(max_tokens=48, ignore_eos=True, stop_token_ids=[stop], logprobs=2)
    expected = make_engine(looping_model).generate(prompts, params)
    engine = make_engine(looping_model, "ngram")
    outputs = engine.generate(prompts, params)
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    for ours, theirs in zip(outputs, expected, strict=True):
        assert ours.token_ids == theirs.token_ids
        assert ours.finish_reason == theirs.finish_reason
        assert [lp.token_id for lp in ours.logprobs] == ours.token_ids
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert outputs[0].finish_reason == "stop" and outputs[0].token_ids[-1] == stop


def test_requests_choose_their_draft_length(looping_model: LoadedModel) -> None:
    prompts = random_prompts(2, seed=3)
    engine = make_engine(looping_model, "ngram")
    engine.generate(
        prompts, SamplingParams(max_tokens=48, ignore_eos=True, num_speculative_tokens=0)
    )
    assert engine.stats()["spec_num_drafts"] == 0
    engine.generate(
        prompts, SamplingParams(max_tokens=48, ignore_eos=True, num_speculative_tokens=2)
    )
    stats = engine.stats()
    assert stats["spec_num_drafts"] > 0
    assert stats["spec_num_draft_tokens"] <= 2 * stats["spec_num_drafts"]


def test_large_decode_batches_do_not_draft(looping_model: LoadedModel) -> None:
    engine = make_engine(looping_model, "ngram", disable_by_batch_size=2)
    engine.generate(random_prompts(4, seed=3), GREEDY)
    stats = engine.stats()
    assert stats["spec_num_drafts"] == 0 and stats["decode_tokens_per_step"] == 1.0


def test_stats_report_acceptance_and_tokens_per_step(looping_model: LoadedModel) -> None:
    engine = make_engine(looping_model, "ngram")
    engine.generate(random_prompts(3, seed=3), GREEDY)
    stats = engine.stats()
    assert stats["spec_acceptance_rate"] == pytest.approx(
        stats["spec_num_accepted_tokens"] / stats["spec_num_draft_tokens"]
    )
    assert stats["decode_tokens_per_step"] == pytest.approx(
        stats["num_decode_tokens"] / stats["num_decode_steps"]
    )
    assert stats["decode_tokens_per_step"] > 1.2
    assert stats["num_decode_tokens"] == 3 * (GREEDY.max_tokens - 1)


@pytest.mark.parametrize(
    ("value", "field"),
    [(-1, "num_speculative_tokens"), (17, "num_speculative_tokens"), (True, "num_speculative")],
)
def test_bad_draft_lengths_are_refused(looping_model: LoadedModel, value, field: str) -> None:
    engine = make_engine(looping_model, "ngram")
    with pytest.raises(InvalidRequestError, match=field):
        engine.add_request([5, 6, 7], SamplingParams(num_speculative_tokens=value))


def test_speculation_requests_the_engine_cannot_serve_are_refused(
    looping_model: LoadedModel,
) -> None:
    with pytest.raises(InvalidRequestError, match="method=off"):
        make_engine(looping_model).add_request([5, 6], SamplingParams(num_speculative_tokens=2))
    engine = make_engine(looping_model, "ngram")
    with pytest.raises(InvalidRequestError, match="penalties"):
        engine.add_request([5, 6], SamplingParams(num_speculative_tokens=2, repetition_penalty=1.2))
    # Left unset, a request with penalties simply decodes without drafts.
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, repetition_penalty=1.2))
    assert len(out[0].token_ids) == 8 and engine.stats()["spec_num_drafts"] == 0


def test_bad_speculative_configs_name_the_field(
    looping_model: LoadedModel, engine_model: LoadedModel
) -> None:
    with pytest.raises(ValueError, match="method='medusa' is unknown"):
        Engine(looping_model, EngineConfig(speculative=SpeculativeConfig(method="medusa")))
    with pytest.raises(ValueError, match=r"needs engine\.speculative\.draft_model"):
        Engine(looping_model, EngineConfig(speculative=SpeculativeConfig(method="draft_model")))
    with pytest.raises(ValueError, match="draft_layers=3 must lie in"):
        make_engine(
            looping_model, "early_exit", speculative=SpeculativeConfig("early_exit", draft_layers=3)
        )
    with pytest.raises(ValueError, match="must share one tokenizer"):
        make_engine(looping_model, "draft_model", draft=engine_model)
    with pytest.raises(ValueError, match="num_speculative_tokens=40"):
        Engine(
            looping_model, EngineConfig(speculative=SpeculativeConfig(num_speculative_tokens=40))
        )


@pytest.mark.slow
def test_smollm2_rag_answer_is_identical_with_prompt_lookup(shared_data: Path) -> None:
    from ragcache.bench.speculate import rag_prompts
    from ragcache.engine.config import ModelConfig
    from ragcache.engine.loader import load_model

    loaded = load_model(ModelConfig(dtype="float32", device="cpu"))
    prompts = rag_prompts(loaded.tokenizer, 2, 2, shared_data / "musique_dev.json")
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=128 << 20))
    off = SamplingParams(max_tokens=48, num_speculative_tokens=0)
    plain = engine.generate(prompts, off)
    speculative = engine.generate(prompts, SamplingParams(max_tokens=48))
    assert [o.token_ids for o in speculative] == [o.token_ids for o in plain]
    assert engine.stats()["spec_num_accepted_tokens"] > 0
