"""Draft length follows the running acceptance rate; prompt lookup finds the latest match."""

from __future__ import annotations

import pytest

from ragcache.engine.config import EngineConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.prompt_lookup import NgramIndex, PromptLookupProposer
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import Sequence
from ragcache.engine.speculate import DraftLengthController, expected_tokens


def test_expected_tokens_matches_the_geometric_series() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_draft_length_grows_with_acceptance_and_shrinks_with_rejections() -> None:
    controller = DraftLengthController(draft_cost=0.0, verify_cost=0.05)
    start = controller.length(1, 8)
    assert 0 < start < 8
    for _ in range(10):
        controller.observe(1, drafted=8, accepted=8)
    assert controller.length(1, 8) == 8
    lengths = []
    for _ in range(30):
        length = controller.length(1, 8)
        lengths.append(length)
        controller.observe(1, drafted=length, accepted=0)
    assert lengths == sorted(lengths, reverse=True)
    assert 0 < lengths[-1] <= 2


def test_speculation_stops_when_verification_costs_more_than_it_yields() -> None:
    controller = DraftLengthController(draft_cost=0.0, verify_cost=0.3)
    for _ in range(40):
        controller.observe(1, drafted=max(controller.length(1, 8), 1), accepted=0)
    assert controller.acceptance(1) < 0.3
    assert controller.length(1, 8) == 0


def test_a_paused_sequence_tries_again_after_idle_steps() -> None:
    controller = DraftLengthController(draft_cost=0.4, verify_cost=0.05)
    for _ in range(10):
        controller.observe(1, drafted=1, accepted=0)
    assert controller.length(1, 8) == 0
    idle_steps = 0
    while controller.length(1, 8) == 0:
        controller.idle(1)
        idle_steps += 1
    assert 5 < idle_steps < 100


def test_a_costly_draft_needs_higher_acceptance() -> None:
    cheap = DraftLengthController(draft_cost=0.0, verify_cost=0.05)
    costly = DraftLengthController(draft_cost=0.45, verify_cost=0.05)
    for controller in (cheap, costly):
        for _ in range(20):
            controller.observe(1, drafted=2, accepted=1)
    assert cheap.acceptance(1) == pytest.approx(costly.acceptance(1))
    assert cheap.length(1, 8) > 0 and costly.length(1, 8) == 0


def test_fixed_draft_length_when_not_adaptive() -> None:
    controller = DraftLengthController(draft_cost=0.5, verify_cost=0.5, adaptive=False)
    for _ in range(10):
        controller.observe(1, drafted=4, accepted=0)
    assert controller.length(1, 4) == 4 and controller.length(1, 0) == 0


def test_ngram_index_prefers_long_matches_then_the_latest_one() -> None:
    index = NgramIndex(min_n=1, max_n=3)
    tokens = [1, 2, 3, 9, 9, 7, 2, 3, 8, 8, 5, 1, 2, 3]
    index.update(tokens)
    # [1, 2, 3] last occurred at the start, followed by 9 9 7.
    assert index.lookup(tokens, 3) == [9, 9, 7]
    tokens = [*tokens[:-1], 4, 2, 3]
    index.update(tokens)
    # No earlier [4, 2, 3] nor [2, 3]... but [2, 3] recurs: the latest is followed by 8 8.
    assert index.lookup(tokens, 2) == [8, 8]
    assert index.lookup([6, 6, 6, 42], 2) == []


def test_ngram_index_never_matches_the_suffix_itself() -> None:
    index = NgramIndex(min_n=2, max_n=2)
    tokens = [4, 5, 6, 4, 5]
    index.update(tokens)
    assert index.lookup(tokens, 4) == [6, 4, 5]
    index.update([4, 5])
    assert index.lookup([4, 5], 3) == []


def test_proposer_drafts_from_a_long_prompt_and_forgets() -> None:
    prompt = [10, 11, 12, 13, 14, 15, 16, 20, 21, 11, 12]
    seq = Sequence(prompt, SamplingParams())
    proposer = PromptLookupProposer(min_n=2, max_n=3)
    assert proposer.propose([seq], [3])[0].token_ids == [13, 14, 15]
    seq.token_ids.append(13)
    assert proposer.propose([seq], [2])[0].token_ids == [14, 15]
    assert proposer.propose([seq], [0])[0].token_ids == []
    proposer.forget(seq)
    assert seq.seq_id not in proposer.indexes


def test_engine_pauses_a_draft_model_that_does_not_pay(engine_model: LoadedModel) -> None:
    speculative = SpeculativeConfig(method="early_exit", draft_layers=2)
    engine = Engine(engine_model, EngineConfig(kv_cache_bytes=8 << 20, speculative=speculative))
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=64, ignore_eos=True))
    stats = engine.stats()
    # Two of three layers cost most of a step: the early-exit draft is rarely worth it.
    assert stats["spec_num_drafts"] < stats["num_decode_steps"] / 4
