"""One fused forward: the engine resumes the tokens it computes where fusion's fresh pass
left them, so no (token, layer) of the prompt is computed twice, and the answers are
those of the two-pass path."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.prompt import PromptLayout
from ragcache.blending.registry import make_method
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from tests.blending.test_fusion import answer as fusion_answer
from tests.blending.test_fusion import random_layout

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True, prompt_logprobs=True)
RESUMING = ("cacheblend", "sinkblend", "gradual", "queryblend", "cachecraft")
# queryblend scores the context by what the query reads at every layer: one more pass of
# the query tokens alone against the cached context, reported as selection work.
ONE_PASS = tuple(m for m in RESUMING if m != "queryblend")


def fused_request(loaded: LoadedModel, layout: PromptLayout, method: str) -> FusedRequest:
    encoder = ChunkEncoder(loaded.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    return fuse(loaded.model, layout, encoder.root, chunks, make_method(method, ratio=0.3))


def answer(loaded: LoadedModel, layout: PromptLayout, fused: FusedRequest):
    return fusion_answer(loaded, layout, fused, PARAMS)


class LayerCounter:
    """Counts each (layer, prompt position) an attention layer computes."""

    def __init__(self, loaded: LoadedModel, prompt_len: int) -> None:
        self.counts: Counter[tuple[int, int]] = Counter()
        self.prompt_len = prompt_len
        self.handles = [
            layer.self_attn.register_forward_pre_hook(self._record) for layer in loaded.model.layers
        ]

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        index, _, rope = args[0], args[1], args[2]
        for position in rope.positions.tolist():
            if position < self.prompt_len:
                self.counts[(index, position)] += 1

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("method", RESUMING)
def test_no_token_layer_of_the_prompt_is_computed_twice(
    engine_model: LoadedModel, method: str
) -> None:
    layout = random_layout(4, seed=11)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)  # chunk encoding is not the fused request
    counter = LayerCounter(engine_model, len(layout))
    try:
        fused = fuse(
            engine_model.model, layout, encoder.root, chunks, make_method(method, ratio=0.3)
        )
        assert fused.placed is not None and fused.placed.resume is not None
        answer(engine_model, layout, fused)
    finally:
        counter.close()
    twice = {key: count for key, count in counter.counts.items() if count > 1}
    if method not in ONE_PASS:  # only the query, once more, in its scoring pass
        assert {position for _, position in twice} <= set(range(layout.context_end, len(layout)))
        assert set(twice.values()) == {2}
        return
    assert not twice, f"(layer, position) computed more than once: {sorted(twice)[:5]}"
    # The query's last token went through every layer exactly once.
    last = len(layout) - 1
    layers = len(engine_model.model.layers)
    assert [counter.counts[(layer, last)] for layer in range(layers)] == [1] * layers


@pytest.mark.parametrize("method", RESUMING)
def test_resuming_gives_the_answers_of_two_passes(engine_model: LoadedModel, method: str) -> None:
    layout = random_layout(4, seed=12)
    fused = fused_request(engine_model, layout, method)
    assert fused.placed is not None and fused.placed.resume is not None
    two_pass = dataclasses.replace(fused, placed=dataclasses.replace(fused.placed, resume=None))
    tokens, logprobs = answer(engine_model, layout, fused)
    ref_tokens, ref_logprobs = answer(engine_model, layout, two_pass)
    assert tokens == ref_tokens
    assert torch.allclose(logprobs, ref_logprobs, atol=1e-4)


def test_a_longer_prompt_than_the_fresh_pass_computes_its_extra_tokens_from_layer_zero(
    engine_model: LoadedModel,
) -> None:
    """Teacher-forced scoring appends an answer to the fused prompt: those tokens have no
    fresh-pass state and start at the embeddings, beside resumed ones."""
    layout = random_layout(3, seed=13)
    fused = fused_request(engine_model, layout, "cacheblend")
    extra = [5, 6, 7, 8]
    longer = dataclasses.replace(fused, prompt_ids=fused.prompt_ids + extra)
    two_pass = dataclasses.replace(longer, placed=dataclasses.replace(fused.placed, resume=None))
    scored = SamplingParams(max_tokens=1, prompt_logprobs=True)

    def score(request: FusedRequest) -> list[float]:
        engine = Engine(engine_model, EngineConfig(kv_cache_bytes=8 << 20, block_size=8))
        seq = engine.add_request(request.prompt_ids, scored, placed=request.placed)
        while engine.has_unfinished():
            engine.step()
        return [seq.prompt_logprobs[i] for i in range(len(layout), len(request.prompt_ids))]

    assert torch.allclose(torch.tensor(score(longer)), torch.tensor(score(two_pass)), atol=1e-4)
