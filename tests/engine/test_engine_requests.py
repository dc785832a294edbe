"""Request validation, stop conditions, scheduling policies and prompt logprobs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.conftest import loaded_from_hf, random_hf_model

VALID_PROMPT = list(range(10, 30))
VALID_PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def make_engine(loaded: LoadedModel, **overrides: Any) -> Engine:
    # One thread: tiny matrices gain nothing from more, and a busy CPU makes them slower.
    settings: dict[str, Any] = dict(kv_cache_bytes=4 << 20, block_size=8, threads=1)
    settings.update(overrides)
    return Engine(loaded, EngineConfig(**settings))


def drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


@pytest.fixture(scope="module")
def valid_tokens(engine_model: LoadedModel) -> list[int]:
    return make_engine(engine_model).generate([VALID_PROMPT], VALID_PARAMS)[0].token_ids


def assert_still_serves(engine: Engine, expected: list[int]) -> None:
    drain(engine)
    output = engine.generate([VALID_PROMPT], VALID_PARAMS)[0]
    assert output.token_ids == expected
    assert output.finish_reason == "length"
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


BAD_PARAMS = [
    ("temperature", SamplingParams(temperature=-0.1)),
    ("temperature", SamplingParams(temperature=float("nan"))),
    ("top_p", SamplingParams(top_p=0.0)),
    ("top_p", SamplingParams(top_p=1.5)),
    ("top_k", SamplingParams(top_k=-1)),
    ("min_p", SamplingParams(min_p=1.01)),
    ("min_p", SamplingParams(min_p=-0.5)),
    ("max_tokens", SamplingParams(max_tokens=0)),
    ("max_tokens", SamplingParams(max_tokens=2**63)),
    ("max_tokens", SamplingParams(max_tokens=True)),
    ("top_k", SamplingParams(top_k=2**63)),
    ("seed", SamplingParams(seed=2**64)),
    ("seed", SamplingParams(seed=-1)),
    ("logprobs", SamplingParams(logprobs=21)),
    ("logprobs", SamplingParams(logprobs=-1)),
    ("repetition_penalty", SamplingParams(repetition_penalty=0.0)),
    ("presence_penalty", SamplingParams(presence_penalty=2.5)),
    ("frequency_penalty", SamplingParams(frequency_penalty=-3.0)),
    ("stop", SamplingParams(stop=[""])),
    ("stop", SamplingParams(stop=["ok", 7])),  # type: ignore[list-item]
    ("stop", SamplingParams(stop="end")),  # type: ignore[arg-type]
    ("stop_token_ids", SamplingParams(stop_token_ids=[512])),
    ("stop_token_ids", SamplingParams(stop_token_ids=[-1])),
]


@pytest.mark.parametrize(
    ("field_name", "params"),
    BAD_PARAMS,
    ids=[f"{name}-{i}" for i, (name, _) in enumerate(BAD_PARAMS)],
)
def test_invalid_sampling_value_names_the_field(
    engine_model: LoadedModel, valid_tokens: list[int], field_name: str, params: SamplingParams
) -> None:
    engine = make_engine(engine_model)
    with pytest.raises(InvalidRequestError, match=field_name) as raised:
        engine.add_request(VALID_PROMPT, params)
    assert raised.value.param == field_name
    assert_still_serves(engine, valid_tokens)


def test_invalid_prompts_name_the_prompt(
    engine_model: LoadedModel, valid_tokens: list[int]
) -> None:
    engine = make_engine(engine_model)
    vocab = engine_model.spec.vocab_size
    too_long = [5] * engine.max_model_len
    cases: list[tuple[str | list[int], str]] = [
        ([], "prompt is empty"),
        ([1, vocab], "prompt has token ids outside"),
        ([-1, 4], "prompt has token ids outside"),
        (too_long, f"prompt has {len(too_long)} tokens"),
        ("text needs a tokenizer", "no tokenizer; pass token ids"),
    ]
    for prompt, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as raised:
            engine.add_request(prompt, VALID_PARAMS)
        assert raised.value.param == "prompt"
        assert_still_serves(engine, valid_tokens)
    longest = engine.add_request([5] * (engine.max_model_len - 1), SamplingParams(max_tokens=4))
    drain(engine)
    assert longest.finish_reason == "length"
    assert longest.num_output_tokens == 1


def test_duplicate_request_id_is_refused_while_the_first_runs(
    engine_model: LoadedModel, valid_tokens: list[int]
) -> None:
    engine = make_engine(engine_model)
    first = engine.add_request(VALID_PROMPT, VALID_PARAMS, request_id="same")
    engine.step()
    with pytest.raises(InvalidRequestError, match="request id 'same'"):
        engine.add_request([3, 4, 5], VALID_PARAMS, request_id="same")
    drain(engine)
    assert first.output_ids == valid_tokens
    again = engine.add_request(VALID_PROMPT, VALID_PARAMS, request_id="same")
    drain(engine)
    assert again.output_ids == valid_tokens
    assert_still_serves(engine, valid_tokens)


def test_strict_max_tokens_past_the_context_is_refused_with_the_limit(
    engine_model: LoadedModel,
) -> None:
    engine = make_engine(engine_model, kv_cache_bytes=80_000)
    room = engine.max_model_len - len(VALID_PROMPT)
    assert 0 < room < 200
    too_many = SamplingParams(max_tokens=room + 1, strict_max_tokens=True)
    with pytest.raises(InvalidRequestError, match=f"send max_tokens <= {room}") as raised:
        engine.add_request(VALID_PROMPT, too_many)
    assert raised.value.param == "max_tokens"
    fits = engine.add_request(
        VALID_PROMPT, SamplingParams(max_tokens=room, strict_max_tokens=True, ignore_eos=True)
    )
    drain(engine)
    # Without strict_max_tokens (the library's default) the answer ends with the context.
    lenient = engine.add_request(VALID_PROMPT, SamplingParams(max_tokens=10**6, ignore_eos=True))
    drain(engine)
    assert fits.num_output_tokens == lenient.num_output_tokens == room
    assert fits.finish_reason == lenient.finish_reason == "length"


# ---- stop conditions ---------------------------------------------------------------------


def test_max_tokens_ends_with_length(engine_model: LoadedModel) -> None:
    for max_tokens in (1, 5, 13):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        output = make_engine(engine_model).generate([VALID_PROMPT], params)[0]
        assert len(output.token_ids) == max_tokens
        assert output.finish_reason == "length"


def test_stop_token_ids_end_at_the_first_occurrence(
    engine_model: LoadedModel, valid_tokens: list[int]
) -> None:
    long_run = make_engine(engine_model).generate(
        [VALID_PROMPT], SamplingParams(max_tokens=20, ignore_eos=True)
    )[0]
    stop_token = long_run.token_ids[4]
    first = long_run.token_ids.index(stop_token)
    params = SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[stop_token, 511])
    output = make_engine(engine_model).generate([VALID_PROMPT], params)[0]
    assert output.token_ids == long_run.token_ids[: first + 1]
    assert output.finish_reason == "stop"


def test_eos_stops_unless_ignored(engine_model: LoadedModel) -> None:
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    reference = make_engine(engine_model).generate([VALID_PROMPT], params)[0].token_ids
    eos = reference[6]
    first = reference.index(eos)
    # the same random weights, with that token declared end-of-sequence
    with_eos = loaded_from_hf(random_hf_model("llama", eos_token_id=eos))
    stopped = make_engine(with_eos).generate([VALID_PROMPT], SamplingParams(max_tokens=20))[0]
    assert stopped.token_ids == reference[: first + 1]
    assert stopped.finish_reason == "stop"
    ignored = make_engine(with_eos).generate([VALID_PROMPT], params)[0]
    assert ignored.token_ids == reference
    assert ignored.finish_reason == "length"


@pytest.fixture(scope="module")
def tokenized_model() -> LoadedModel:
    from transformers import AutoTokenizer

    from ragcache.engine.loader import convert_gguf, locate_embedded_gguf

    folder = convert_gguf(locate_embedded_gguf(), Path("~/.cache/ragcache/models").expanduser())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = random_hf_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2)
    return loaded_from_hf(model, tokenizer)


def test_stop_string_across_tokens_is_cut_from_the_text(tokenized_model: LoadedModel) -> None:
    tokenizer = tokenized_model.tokenizer
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    free = make_engine(tokenized_model).generate(
        [prompt], SamplingParams(max_tokens=24, ignore_eos=True)
    )[0]
    boundary = len(tokenizer.decode(free.token_ids[:10], skip_special_tokens=True))
    stop = free.text[boundary - 2 : boundary + 3]
    assert len(stop) == 5, "the free-running text is too short to pick a stop string from"
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=["never appears \x00", stop])
    output = make_engine(tokenized_model).generate([prompt], params)[0]
    assert output.finish_reason == "stop"
    assert stop not in output.text
    assert output.text == free.text[: free.text.find(stop)]
    assert output.token_ids == free.token_ids[: len(output.token_ids)]
    assert len(output.token_ids) <= 11


def test_stop_string_in_the_first_token_leaves_empty_text(tokenized_model: LoadedModel) -> None:
    tokenizer = tokenized_model.tokenizer
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=False)
    free = make_engine(tokenized_model).generate(
        [prompt], SamplingParams(max_tokens=4, ignore_eos=True)
    )[0]
    first_text = tokenizer.decode(free.token_ids[:1], skip_special_tokens=True)
    assert first_text, "the first generated token decodes to nothing"
    params = SamplingParams(max_tokens=4, ignore_eos=True, stop=[first_text])
    output = make_engine(tokenized_model).generate([prompt], params)[0]
    assert output.finish_reason == "stop"
    assert output.text == ""
    assert output.token_ids == free.token_ids[:1]


# ---- scheduling policy and prompt logprobs -----------------------------------------------


def run_in_finish_order(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[list[int]], list[int]]:
    """Greedy outputs in prompt order, and the prompt indices in the order they finished."""
    ids = [engine.add_request(p, sp).request_id for p, sp in zip(prompts, params, strict=True)]
    tokens: dict[str, list[int]] = {}
    order: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.token_ids
                order.append(ids.index(output.request_id))
    return [tokens[i] for i in ids], order


def test_mlfq_gives_the_same_greedy_outputs_as_fcfs(engine_model: LoadedModel) -> None:
    rng = random.Random(5)
    lengths = [600, 12, 300, 40, 1100, 9, 520, 64]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    params = [SamplingParams(max_tokens=rng.randint(10, 40), ignore_eos=True) for _ in prompts]
    settings: dict[str, Any] = dict(
        kv_cache_bytes=8 << 20, max_num_seqs=3, max_num_batched_tokens=128
    )
    mlfq = make_engine(engine_model, scheduling_policy="mlfq", **settings)
    fcfs_tokens, fcfs_order = run_in_finish_order(
        make_engine(engine_model, scheduling_policy="fcfs", **settings), prompts, params
    )
    mlfq_tokens, mlfq_order = run_in_finish_order(mlfq, prompts, params)
    assert mlfq_order != fcfs_order, "the policies should have scheduled differently"
    assert mlfq_tokens == fcfs_tokens
    assert [len(t) for t in mlfq_tokens] == [p.max_tokens for p in params]
    assert mlfq.block_manager.num_free_blocks == mlfq.block_manager.num_blocks


@pytest.fixture(scope="module")
def reference_pair() -> tuple[Any, LoadedModel]:
    reference = random_hf_model("llama", seed=3)
    return reference, loaded_from_hf(reference)


def full_forward_logprobs(reference: Any, prompt: list[int]) -> dict[int, float]:
    with torch.inference_mode():
        logits = reference(torch.tensor([prompt])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return {i: float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))}


def test_prompt_logprobs_match_a_full_forward(reference_pair: tuple[Any, LoadedModel]) -> None:
    reference, loaded = reference_pair
    rng = random.Random(8)
    prompt = [rng.randrange(3, 512) for _ in range(45)]
    expected = full_forward_logprobs(reference, prompt)
    engine = make_engine(loaded, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=2, prompt_logprobs=True, ignore_eos=True)
    for _ in range(2):  # the second run finds the prompt's blocks in the prefix cache
        output = engine.generate([prompt], params)[0]
        assert sorted(output.prompt_logprobs) == list(range(1, len(prompt)))
        for index, value in expected.items():
            assert output.prompt_logprobs[index] == pytest.approx(value, abs=1e-4)
