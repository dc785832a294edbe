"""One request's tokens, its block table and how much of it has been computed."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence as LayerList
from dataclasses import dataclass, field

import torch

from ragcache.engine.lazy_layers import layer_shapes
from ragcache.engine.lora import LoraAdapter
from ragcache.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class ResumeFrom:
    """Where fusion's fresh pass left the prompt: the hidden states of every prompt token
    it holds after the first ``layer`` layers, and the KV at those layers of the prompt
    tokens after the placed ones (``tail_k``, ``tail_v``: ``layer`` tensors each
    [tokens, Hkv, D]; the placed KV already holds the others'). The engine starts the
    prompt tokens it computes at ``layer`` instead of computing them again from the
    embeddings, so no (token, layer) is computed twice."""

    layer: int
    hidden: torch.Tensor  # [prompt tokens, hidden size]
    tail_k: list[torch.Tensor]
    tail_v: list[torch.Tensor]

    def covers(self, index: int) -> bool:
        return index < int(self.hidden.shape[0])


@dataclass(slots=True)
class PlacedKV:
    """KV handed in for the first ``num_tokens`` prompt tokens, already at their positions.

    ``k`` and ``v`` are per-layer tensors [num_tokens, Hkv, D] (keys rotated to the slots
    they occupy), lists or ``LazyLayers`` that build a layer when it is read (fusion's:
    the engine writes them into its blocks one layer at a time, so no copy of the
    whole context's KV exists beside the blocks). ``recompute`` lists prompt indices
    below ``num_tokens`` that the engine must still compute; every index at or above
    ``num_tokens`` is computed anyway.
    ``resume``, where fusion ran a fresh pass, lets those computed tokens start at the
    layer the pass reached.
    ``exact_prefix`` counts the leading tokens whose KV equals a full prefill's (the root
    prompt, an exact tree path): only those may enter the engine's prefix cache.
    """

    k: LayerList[torch.Tensor]
    v: LayerList[torch.Tensor]
    recompute: list[int] = field(default_factory=list)
    exact_prefix: int = 0
    resume: ResumeFrom | None = None

    @property
    def num_tokens(self) -> int:
        return layer_shapes(self.k)[0][0] if len(self.k) else 0

    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of every K and V layer (without building lazy ones)."""
        return [*layer_shapes(self.k), *layer_shapes(self.v)]


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        placed: PlacedKV | None = None,
        cache_salt: str = "",
        use_prefix_cache: bool = True,
        lora: LoraAdapter | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id or f"req-{self.seq_id}"
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.placed = placed
        self.cache_salt = cache_salt
        self.use_prefix_cache = use_prefix_cache
        self.lora = lora
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.plan: list[int] = []
        self.num_planned_done = 0
        self.num_cached_tokens = 0
        self.num_registered_blocks = 0
        self.block_hashes: list[bytes] = []
        self.prefix_match: list[int] | None = None
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: dict[int, float] = {}
        self.finish_reason: str | None = None
        self.output_text = ""
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.queue_level = 0
        self.steps_at_level = 0
        self.num_preemptions = 0
        self.swapped: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_planned_done < len(self.plan)

    @property
    def remaining_plan(self) -> list[int]:
        return self.plan[self.num_planned_done :]

    @property
    def cacheable_tokens(self) -> int:
        """Leading tokens whose KV is exact and may enter the prefix cache."""
        if not self.use_prefix_cache:
            return 0
        return len(self.token_ids) if self.placed is None else self.placed.exact_prefix

    def slot(self, index: int, block_size: int) -> int:
        return self.block_table[index // block_size] * block_size + index % block_size

    def reset_for_recompute(self) -> None:
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.plan = []
        self.num_planned_done = 0
        self.num_cached_tokens = 0
        self.num_registered_blocks = 0
        self.block_hashes = []
        self.num_preemptions += 1
