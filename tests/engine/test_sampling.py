"""The sampler draws only from the allowed set, reproduces seeds and reports raw logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampler import Sampler, apply_penalties, truncation_mask
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import Sequence

# Float32 softmax and cumulative sums differ from the float64 reference by round-off;
# tokens this close to a cut-off may fall on either side of it.
MARGIN = 1e-5
DRAWS_PER_EXAMPLE = 48

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def random_logits(seed: int, vocab: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=generator) * scale


def sequences(params: SamplingParams, count: int) -> list[Sequence]:
    return [Sequence([0], params) for _ in range(count)]


class AllowedSet:
    """The reference rules on one row of probabilities, in float64."""

    def __init__(self, probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> None:
        p = probs.double()
        order = p.argsort(descending=True)
        mass_before_sorted = p[order].cumsum(0) - p[order]
        self.mass_before = torch.empty_like(p)
        self.mass_before[order] = mass_before_sorted
        self.num_larger = (p[None, :] > p[:, None]).sum(1)
        self.probs = p
        self.max_prob = float(p.max())
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p

    def may_keep(self, token: int) -> bool:
        """Inside every rule, allowing round-off at each cut-off."""
        return (
            (self.top_k == 0 or int(self.num_larger[token]) < self.top_k)
            and float(self.mass_before[token]) < self.top_p + MARGIN
            and float(self.probs[token]) >= self.min_p * self.max_prob - MARGIN
        )

    def must_keep(self, token: int) -> bool:
        """Clearly inside every rule, or the most likely token (always kept)."""
        if float(self.probs[token]) == self.max_prob:
            return True
        return (
            (self.top_k == 0 or int(self.num_larger[token]) < self.top_k)
            and float(self.mass_before[token]) < self.top_p - MARGIN
            and float(self.probs[token]) >= self.min_p * self.max_prob + MARGIN
        )


truncation_settings = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "vocab": st.integers(2, 64),
        "scale": st.floats(0.1, 6.0),
        "temperature": st.floats(0.05, 3.0),
        "top_k": st.integers(0, 70),
        "top_p": st.floats(0.01, 1.0),
        "min_p": st.floats(0.0, 1.0),
    }
)


@PROPERTY_SETTINGS
@given(case=truncation_settings)
def test_truncation_mask_keeps_exactly_the_allowed_tokens(case: dict) -> None:
    logits = random_logits(case["seed"], case["vocab"], case["scale"])
    probs = torch.softmax(logits / case["temperature"], dim=-1)
    keep = truncation_mask(
        probs[None],
        torch.tensor([case["top_k"]]),
        torch.tensor([case["top_p"]]),
        torch.tensor([case["min_p"]]),
    )[0]
    allowed = AllowedSet(probs, case["top_k"], case["top_p"], case["min_p"])
    for token in range(case["vocab"]):
        if keep[token]:
            assert allowed.may_keep(token), f"token {token} kept outside the allowed set"
        else:
            assert not allowed.must_keep(token), f"token {token} dropped from the allowed set"


@PROPERTY_SETTINGS
@given(case=truncation_settings)
def test_sampled_tokens_lie_in_the_allowed_set(case: dict) -> None:
    logits = random_logits(case["seed"], case["vocab"], case["scale"])
    params = SamplingParams(
        temperature=case["temperature"],
        top_k=case["top_k"],
        top_p=case["top_p"],
        min_p=case["min_p"],
    ).validate()
    sampler = Sampler()
    tokens = sampler.sample(
        logits.expand(DRAWS_PER_EXAMPLE, -1).clone(), sequences(params, DRAWS_PER_EXAMPLE)
    )
    allowed = AllowedSet(
        torch.softmax(logits / case["temperature"], dim=-1),
        case["top_k"],
        case["top_p"],
        case["min_p"],
    )
    outside = sorted({t for t in tokens if not allowed.may_keep(t)})
    assert not outside, f"sampled tokens {outside} are outside the allowed set"


def test_top_k_one_and_tiny_top_p_always_pick_the_argmax() -> None:
    logits = random_logits(3, 50, 2.0)
    best = int(logits.argmax())
    for params in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
    ):
        tokens = Sampler().sample(logits.expand(32, -1).clone(), sequences(params, 32))
        assert set(tokens) == {best}, params


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 300), batch=st.integers(1, 6))
def test_greedy_is_argmax(seed: int, vocab: int, batch: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=generator) * 3
    tokens = Sampler().sample(logits.clone(), sequences(SamplingParams(), batch))
    assert tokens == logits.argmax(dim=-1).tolist()


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), logits_seed=st.integers(0, 2**31 - 1))
def test_same_seed_same_tokens_across_samplers(seed: int, logits_seed: int) -> None:
    logits = random_logits(logits_seed, 200, 1.0)
    params = SamplingParams(temperature=1.0, seed=seed)

    def draw_sequence(sampler: Sampler) -> list[int]:
        seq = Sequence([0], params)
        return [sampler.sample(logits[None].clone(), [seq])[0] for _ in range(12)]

    assert draw_sequence(Sampler()) == draw_sequence(Sampler())


def test_different_seeds_differ_somewhere() -> None:
    logits = random_logits(11, 200, 0.5)

    def draw_sequence(seed: int) -> list[int]:
        sampler = Sampler()
        seq = Sequence([0], SamplingParams(temperature=1.0, seed=seed))
        return [sampler.sample(logits[None].clone(), [seq])[0] for _ in range(12)]

    runs = {tuple(draw_sequence(seed)) for seed in range(4)}
    assert len(runs) > 1


def small_engine(loaded: LoadedModel) -> Engine:
    # One thread: tiny matrices gain nothing from more, and a busy CPU makes them slower.
    return Engine(loaded, EngineConfig(kv_cache_bytes=4 << 20, block_size=8, threads=1))


def test_seeded_requests_reproduce_across_engines_and_batches(engine_model: LoadedModel) -> None:
    prompt = list(range(20, 45))

    def seeded_alone(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
        return small_engine(engine_model).generate([prompt], params)[0].token_ids

    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = seeded_alone(1234)
    neighbours = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batched_engine = small_engine(engine_model)
    batched = batched_engine.generate(
        [list(range(5, 30)), prompt, list(range(60, 70))], [neighbours, seeded, neighbours]
    )
    assert batched[1].token_ids == alone
    assert any(seeded_alone(seed) != alone for seed in (1, 2, 3))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    seq = Sequence([1, 2], SamplingParams(repetition_penalty=2.0))
    seq.token_ids.append(4)
    logits = torch.tensor([[1.0, 3.0, -2.0, 5.0, 0.5, -1.0]])
    penalised = apply_penalties(logits.clone(), [seq])
    # prompt and output tokens {1, 2, 4} are penalised; 0, 3, 5 are untouched
    assert penalised.tolist() == [[1.0, 1.5, -4.0, 5.0, 0.25, -1.0]]


def test_presence_and_frequency_penalties_count_only_output_tokens() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    seq = Sequence([0, 1], params)
    seq.token_ids.extend([2, 2, 2, 3])
    logits = torch.zeros(1, 5)
    penalised = apply_penalties(logits, [seq])
    # token 2: 3 * 0.25 + 0.5; token 3: 1 * 0.25 + 0.5; prompt tokens 0, 1 untouched
    assert penalised.tolist() == [[0.0, 0.0, -1.25, -0.75, 0.0]]


def test_negative_penalties_raise_logits() -> None:
    seq = Sequence([0], SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5))
    seq.token_ids.extend([1, 1])
    penalised = apply_penalties(torch.zeros(1, 3), [seq])
    assert penalised.tolist() == [[0.0, 2.0, 0.0]]


def test_penalties_leave_other_rows_alone_and_change_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9], [0.0, 3.0, 2.9]])
    repeated = Sequence([0], SamplingParams(frequency_penalty=1.0))
    repeated.token_ids.append(1)
    plain = Sequence([0], SamplingParams())
    plain.token_ids.append(1)
    assert Sampler().sample(logits.clone(), [repeated, plain]) == [2, 1]


@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_logprobs_report_the_raw_distribution(num_top: int) -> None:
    logits = random_logits(5, 100, 2.0)
    params = SamplingParams(
        temperature=0.7, top_k=10, repetition_penalty=1.5, seed=9, logprobs=num_top
    )
    seq = Sequence([int(logits.argmax()), 3, 4], params)
    token = Sampler().sample(logits[None].clone(), [seq])[0]
    raw = torch.log_softmax(logits.double(), dim=-1)
    [record] = seq.logprobs
    assert record.token_id == token
    assert math.isclose(record.logprob, float(raw[token]), abs_tol=1e-5)
    assert len(record.top) == num_top
    values = [value for _, value in record.top]
    assert values == sorted(values, reverse=True)
    expected_ids = raw.topk(num_top).indices.tolist() if num_top else []
    assert [token_id for token_id, _ in record.top] == expected_ids
    for token_id, value in record.top:
        assert math.isclose(value, float(raw[token_id]), abs_tol=1e-5)


def test_engine_greedy_logprobs_rank_the_chosen_token_first(engine_model: LoadedModel) -> None:
    params = SamplingParams(max_tokens=6, logprobs=3, ignore_eos=True)
    output = small_engine(engine_model).generate([list(range(30, 50))], params)[0]
    assert len(output.logprobs) == 6
    for token, record in zip(output.token_ids, output.logprobs, strict=True):
        assert record.token_id == token
        assert record.top[0][0] == token
        assert math.isclose(record.logprob, record.top[0][1], abs_tol=1e-6)
