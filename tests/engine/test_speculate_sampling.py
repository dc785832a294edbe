"""Sampling with speculation draws from the target's distribution (Leviathan et al.'s rule).

Chi-square goodness of fit against exact probabilities from transformers' own forward
of a tiny random model with an 8-token vocabulary. The seeds are fixed, so each test is
deterministic; cells expected to hold fewer than 5 samples are pooled, as the test
requires, and the fit is refused below p = 0.001.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from ragcache.engine.config import EngineConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.speculate import accept_sampled
from tests.conftest import loaded_from_hf, random_hf_model

VOCAB = 8
PROMPT = [3, 4, 5, 6, 7, 3, 4, 5, 1, 6]
SAMPLES = 3000
MIN_P_VALUE = 1e-3


def chi_square_p(counts: dict[tuple[int, ...], int], probs: dict[tuple[int, ...], float]) -> float:
    total = sum(counts.values())
    observed, expected = [], []
    pooled_observed, pooled_expected = 0, 0.0
    for cell, p in probs.items():
        if p * total < 5:
            pooled_observed += counts.get(cell, 0)
            pooled_expected += p * total
        else:
            observed.append(counts.get(cell, 0))
            expected.append(p * total)
    if pooled_expected > 0:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


@pytest.fixture(scope="module")
def target_hf():
    return random_hf_model("llama", seed=4, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def exact(target_hf) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) for every triple, from transformers' forward in float64 softmax."""

    def next_probs(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = target_hf(torch.tensor([PROMPT + prefix])).logits[0, -1]
        return torch.softmax(logits.double(), dim=-1)

    first = next_probs([])
    joint: dict[tuple[int, ...], float] = {}
    for a in range(VOCAB):
        second = next_probs([a])
        for b in range(VOCAB):
            third = next_probs([a, b])
            for c in range(VOCAB):
                joint[(a, b, c)] = float(first[a] * second[b] * third[c])
    return joint


def marginal(joint: dict[tuple[int, ...], float], keep: tuple[int, ...]) -> dict:
    out: dict[tuple[int, ...], float] = {}
    for cell, p in joint.items():
        key = tuple(cell[i] for i in keep)
        out[key] = out.get(key, 0.0) + p
    return out


def tally(samples: list[tuple[int, ...]], keep: tuple[int, ...]) -> dict:
    out: dict[tuple[int, ...], int] = {}
    for sample in samples:
        key = tuple(sample[i] for i in keep)
        out[key] = out.get(key, 0) + 1
    return out


def draft_model() -> LoadedModel:
    return loaded_from_hf(
        random_hf_model(
            "llama",
            seed=9,
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        )
    )


@pytest.mark.parametrize("method", ["ngram", "draft_model", "early_exit"])
def test_first_sampled_tokens_follow_the_target_distribution(
    method: str, target_hf, exact: dict[tuple[int, ...], float]
) -> None:
    loaded = loaded_from_hf(target_hf)
    speculative = SpeculativeConfig(
        method=method,
        num_speculative_tokens=3,
        prompt_lookup_min=1,
        draft_layers=1,
        adaptive=False,
        disable_by_batch_size=0,
    )
    blocks = 2 * 256 + 8
    config = EngineConfig(
        kv_cache_bytes=blocks * 8 * loaded.spec.kv_bytes_per_token * 4,
        block_size=8,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        speculative=speculative,
    )
    engine = Engine(loaded, config, draft=draft_model() if method == "draft_model" else None)
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    outputs = engine.generate([PROMPT] * SAMPLES, params)
    samples = [tuple(o.token_ids[:3]) for o in outputs]
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] > 0
    for keep in [(0, 1), (1, 2), (0, 1, 2)]:
        p_value = chi_square_p(tally(samples, keep), marginal(exact, keep))
        assert p_value > MIN_P_VALUE, f"tokens {keep}: chi-square p = {p_value:.2e}"


def test_rejection_rule_alone_reproduces_the_target() -> None:
    """Many draws of one position: a draft from q, kept or resampled, is distributed as p."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2] * 5], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.1, 0.2, 0.1, 0.2]], dtype=torch.float64)
    counts = dict.fromkeys(range(5), 0)
    point_counts = dict.fromkeys(range(5), 0)
    for _ in range(6000):
        draft = int(torch.multinomial(q[0], 1, generator=generator))
        counts[accept_sampled([draft], p, q, generator)[0]] += 1
        point_counts[accept_sampled([1], p, None, generator)[0]] += 1
    expected = {(t,): float(p[0, t]) for t in range(5)}
    assert chi_square_p({(t,): n for t, n in counts.items()}, expected) > MIN_P_VALUE
    assert chi_square_p({(t,): n for t, n in point_counts.items()}, expected) > MIN_P_VALUE
