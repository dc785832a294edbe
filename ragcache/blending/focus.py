"""CacheFocus: score the retrieved chunks by the query's attention, prune, re-place the rest.

1. Relevance. Only the query tokens run through the first ``layers`` layers, attending
   to the root, to every chunk's cached KV and to themselves. A chunk's relevance is
   the share of the query's attention mass that lands on its tokens: softmax weights
   averaged over heads and query tokens, summed over the chunk's tokens (not divided
   by its length, so it is the attention the query actually spends there), averaged
   over the scored layers. The chunks' scores, the root's share and the query's own
   share sum to one. For this pass every chunk sits where it was cached, right after
   the root (all chunks share those positions), and the query follows the longest:
   at their prompt offsets the score would measure distance, not content (on SmolLM2
   the last of ten passages draws ~40% of the attention and the scores rise with
   position), and a context longer than the window would reach past it.
2. Pruning. The ``ceil(keep * chunks)`` most relevant chunks are kept, never fewer than
   one; a kept set must also fit in the model's window with the root and the query, so
   a chunk that does not fit gives way to less relevant ones that do. A context longer
   than the window is thereby pruned to fit instead of refused.
3. Positional allocation. The kept chunks are placed contiguously after the root, as
   retrieved (``order="retrieved"``) or by ascending relevance, the most relevant next
   to the question (``order="relevance"``); each chunk's cached keys are rotated once,
   from their stored positions to the new ones.
4. Repair. The focused prompt is fused by the ``base`` method (full reuse by default,
   as in the paper, which does not recompute; CacheBlend, LegoLink, ... on request).

Unlike the paper's layer-adaptive pruning, a pruned chunk leaves the prompt for every
layer of the final request: the engine has one KV sequence for all layers and no
per-layer attention masks, so the first ``layers`` layers of the answer do not see the
pruned chunks (only the relevance pass does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.methods import FullReuse, FusionContext, FusionMethod, FusionPlan
from ragcache.blending.placement import reposition
from ragcache.blending.prompt import PromptLayout
from ragcache.blending.selection_pass import query_attention
from ragcache.engine.model import LlamaModel

ORDERS = ("retrieved", "relevance")


class FocusParameterError(ValueError):
    """A CacheFocus parameter out of range; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLongError(ValueError):
    """Not even one chunk fits in the window beside the root and the query."""


@dataclass(slots=True)
class Relevance:
    """Shares of the query's attention: per chunk [num_chunks], on the root, on itself."""

    chunks: torch.Tensor
    root: float
    query: float


@dataclass(slots=True)
class Focus:
    """What CacheFocus keeps: retrieved chunk indices in prompt order, and why."""

    chunk_order: list[int]
    relevance: Relevance | None


def chunk_relevance(
    model: LlamaModel,
    layout: PromptLayout,
    root: ChunkKV,
    chunks: list[ChunkKV],
    num_layers: int,
) -> Relevance:
    """Each chunk's share of the query's attention, averaged over the first layers, with
    every chunk placed right after the root (the positions it was cached at)."""
    if not layout.query_ids:
        raise ValueError("cachefocus scores chunks by the query's attention; the query is empty")
    root_len = len(layout.root_ids)
    starts = [root_len] * len(chunks)
    query_start = root_len + max((len(ids) for ids in layout.chunk_ids), default=0)
    parts = [
        ChunkKV(part.token_ids, part.k[:num_layers], part.v[:num_layers], part.positions)
        for part in (root, *chunks)
    ]
    rotated = [
        reposition(part, start, model.inv_freq)
        for part, start in zip(parts, [0, *starts], strict=True)
    ]
    placed_k = [torch.cat([keys[layer] for keys in rotated]) for layer in range(num_layers)]
    placed_v = [torch.cat([part.v[layer] for part in parts]) for layer in range(num_layers)]
    positions = torch.arange(query_start, query_start + len(layout.query_ids))
    shares = torch.stack(
        query_attention(model, placed_k, placed_v, layout.query_ids, positions, num_layers)
    ).mean(dim=0)
    context_end = layout.context_end
    shares = shares.cpu()
    per_chunk = [
        shares[start : start + len(ids)].sum()
        for start, ids in zip(layout.chunk_starts, layout.chunk_ids, strict=True)
    ]
    return Relevance(
        torch.stack(per_chunk),
        float(shares[: len(layout.root_ids)].sum()),
        float(shares[context_end:].sum()),
    )


def choose_chunks(scores: list[float], lengths: list[int], keep: float, room: int) -> list[int]:
    """Indices of the most relevant ``ceil(keep * n)`` chunks (at least one) that fit in
    ``room`` tokens together; ties go to the chunk retrieved first."""
    target = max(1, math.ceil(keep * len(scores) - 1e-9))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    used = 0
    for index in ranked:
        if len(kept) == target:
            break
        if used + lengths[index] <= room:
            kept.append(index)
            used += lengths[index]
    if not kept:
        raise ContextTooLongError(
            f"no retrieved chunk fits in the {room} tokens the window leaves beside the "
            f"root prompt and the query (shortest chunk: {min(lengths)} tokens)"
        )
    return kept


def allocate(kept: list[int], scores: list[float], order: str) -> list[int]:
    """Kept chunks in prompt order: as retrieved, or by ascending relevance (most
    relevant last, next to the question)."""
    if order == "retrieved":
        return sorted(kept)
    return sorted(kept, key=lambda i: (scores[i], -i))


@dataclass(slots=True)
class CacheFocus:
    """Prune the chunks the query attends to least, compact the rest, fuse with ``base``.

    ``max_prompt_tokens`` is the longest prompt the engine accepts (the model's window
    less one by default; the service passes its own limit).
    """

    keep: float = 1.0
    layers: int = 2
    order: str = "retrieved"
    base: FusionMethod = field(default_factory=FullReuse)
    max_prompt_tokens: int | None = None
    name: str = "cachefocus"

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise FocusParameterError(
                f"cachefocus keep={self.keep} must be in (0, 1]: the share of chunks kept",
                "keep",
            )
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise FocusParameterError(
                f"cachefocus layers={self.layers!r} must be an integer >= 1", "layers"
            )
        if self.order not in ORDERS:
            raise FocusParameterError(
                f"cachefocus order={self.order!r} is unknown; use one of {', '.join(ORDERS)}",
                "order",
            )
        if isinstance(self.base, CacheFocus):
            raise FocusParameterError("cachefocus cannot use cachefocus as its base", "base")

    def focus(
        self, model: LlamaModel, layout: PromptLayout, root: ChunkKV, chunks: list[ChunkKV]
    ) -> Focus:
        """Which chunks stay, in which order; no scoring pass when all stay as retrieved."""
        if self.layers > model.spec.num_layers:
            raise FocusParameterError(
                f"cachefocus layers={self.layers} exceeds the model's "
                f"{model.spec.num_layers} layers",
                "layers",
            )
        limit = self.max_prompt_tokens or model.spec.max_position - 1
        room = limit - len(layout.root_ids) - len(layout.query_ids)
        lengths = [len(ids) for ids in layout.chunk_ids]
        fits = sum(lengths) <= room
        if self.keep >= 1.0 and fits and self.order == "retrieved":
            return Focus(list(range(len(chunks))), None)
        relevance = chunk_relevance(model, layout, root, chunks, self.layers)
        scores = relevance.chunks.tolist()
        kept = choose_chunks(scores, lengths, self.keep, room)
        return Focus(allocate(kept, scores, self.order), relevance)

    def plan(self, ctx: FusionContext) -> FusionPlan:
        """The base method's repair of the focused prompt."""
        return self.base.plan(ctx)


__all__ = [
    "CacheFocus",
    "ContextTooLongError",
    "Focus",
    "FocusParameterError",
    "Relevance",
    "choose_chunks",
    "chunk_relevance",
]
