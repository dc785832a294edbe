"""Fusion methods behind one interface: given placed chunk KV, choose what to recompute.

A method returns a ``FusionPlan``: the prompt indices the engine recomputes through
every layer, and optionally fresh KV for the first layers of every token (CacheBlend's
check layers), which replaces the placed KV there. CacheFocus (focus.py) first chooses
which chunks enter the prompt and where, then plans like the base method it wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ragcache.blending.prompt import PromptLayout
from ragcache.blending.selection_pass import FreshPass, run_fresh_pass
from ragcache.engine.model import LlamaModel

# A method parameter: a number, or a name (CacheFocus's order and base method).
MethodParam = float | str


@dataclass(slots=True)
class FusionContext:
    """The placed KV of one prompt; its first ``exact_chunks`` chunks lie on an exact
    knowledge-tree path (their KV is a full prefill's) and are never repaired."""

    model: LlamaModel
    layout: PromptLayout
    placed_k: Sequence[torch.Tensor]  # per layer; a streamed layer waits until placed
    placed_v: Sequence[torch.Tensor]
    exact_chunks: int = 0

    @property
    def repair_start(self) -> int:
        """Prompt index of the first token whose cached KV may deviate."""
        layout = self.layout
        if self.exact_chunks >= len(layout.chunk_ids):
            return layout.context_end
        return layout.chunk_starts[self.exact_chunks] if self.exact_chunks else len(layout.root_ids)

    @property
    def context_indices(self) -> torch.Tensor:
        """Prompt indices of the chunk tokens whose cached KV may deviate."""
        return torch.arange(self.repair_start, self.layout.context_end)

    def repaired_chunks(self) -> list[tuple[int, list[int]]]:
        """(start, token ids) of every chunk cached alone after another chunk: the ones
        whose leading tokens carry attention-sink keys in the fused prompt."""
        layout = self.layout
        first = max(1, self.exact_chunks)
        return list(zip(layout.chunk_starts[first:], layout.chunk_ids[first:], strict=True))


@dataclass(slots=True)
class FusionPlan:
    """``selection_work`` counts the token-layers the method computed to choose (fresh
    passes, deeper candidate passes, query passes); the fusion report states it as a
    fraction of a full prefill's token-layers."""

    use_cache: bool = True
    reuse_until: int | None = None
    recompute: list[int] = field(default_factory=list)
    fresh_layers: int = 0
    fresh: FreshPass | None = None
    exact_prefix: int | None = None
    selection_work: int = 0
    # Prompt indices the method recomputed through every layer itself (their KV is in
    # layer_kv and the fresh layers); counted as recomputed, not computed again.
    repaired: list[int] = field(default_factory=list)
    # Fresh KV of some tokens at deeper layers: layer -> (prompt indices, K, V).
    layer_kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )
    # Layers ``fresh.hidden`` holds for the tokens the engine computes (``recompute`` and
    # the query): the engine resumes them there. 0: they start at the embeddings.
    resume_layer: int = 0


class FusionMethod(Protocol):
    name: str

    def plan(self, ctx: FusionContext) -> FusionPlan: ...


@dataclass(slots=True)
class FullPrefill:
    name: str = "full_prefill"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        return FusionPlan(use_cache=False)


@dataclass(slots=True)
class PrefixOnly:
    """Reuse only what is an exact prefix: the root and the first chunk (cached after it)."""

    name: str = "prefix_only"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        layout = ctx.layout
        first = max(1, ctx.exact_chunks)
        end = layout.chunk_starts[first] if len(layout.chunk_ids) > first else layout.context_end
        return FusionPlan(reuse_until=end, exact_prefix=end)


@dataclass(slots=True)
class FullReuse:
    name: str = "full_reuse"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        return FusionPlan()


@dataclass(slots=True)
class LegoLink:
    """EPIC's static attention-sink repair: the first k tokens of every later chunk."""

    k: int = 32
    name: str = "legolink"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        chosen: list[int] = []
        for start, ids in ctx.repaired_chunks():
            chosen.extend(range(start, start + min(self.k, len(ids))))
        return FusionPlan(recompute=chosen)


def checked_plan(chosen: list[int], fresh: FreshPass, layers: int, work: int) -> FusionPlan:
    """The plan of a method that chose ``chosen`` after a fresh pass over ``layers``
    layers: their fresh KV replaces the placed KV there, and the engine resumes the
    tokens it computes after them."""
    return FusionPlan(
        recompute=chosen, fresh_layers=layers, fresh=fresh, selection_work=work, resume_layer=layers
    )


def top_fraction(scores: torch.Tensor, indices: torch.Tensor, ratio: float) -> list[int]:
    budget = round(ratio * len(indices))
    if budget <= 0:
        return []
    picked = scores.topk(min(budget, len(indices))).indices
    return sorted(indices[picked].tolist())


def value_deviation(ctx: FusionContext, fresh: FreshPass, layer: int) -> torch.Tensor:
    """Per context token, the squared distance of fresh from placed V at one layer."""
    idx = ctx.context_indices
    diff = fresh.v[layer][idx].float() - ctx.placed_v[layer][idx].float()
    return diff.pow(2).sum(dim=(1, 2))


@dataclass(slots=True)
class CacheBlend:
    """Recompute the tokens whose KV deviates most at the check layer (CacheBlend)."""

    ratio: float = 0.15
    check_layer: int = 1
    name: str = "cacheblend"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        layers = self.check_layer + 1
        fresh = run_fresh_pass(ctx.model, ctx.layout, layers)
        scores = value_deviation(ctx, fresh, self.check_layer)
        chosen = top_fraction(scores, ctx.context_indices, self.ratio)
        work = len(ctx.layout) * layers
        return checked_plan(chosen, fresh, layers, work)


def query_attention(ctx: FusionContext, fresh: FreshPass, layer: int) -> torch.Tensor:
    """Mean attention of the query tokens to each context token at one layer (fresh keys)."""
    q = fresh.query_q[layer].float()  # [nq, Hq, D]
    k = fresh.k[layer].float()  # [n, Hkv, D]
    group = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
    scores = torch.einsum("qhd,nhd->hqn", q, keys) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores, dim=-1)
    return probs.mean(dim=(0, 1))[ctx.context_indices]


@dataclass(slots=True)
class SinkAwareBlend:
    """Our selection: chunk heads first, then what the query reads that has drifted.

    Each chunk after the first was cached as if it opened the prompt, so its leading
    tokens carry attention-sink keys that divert attention in the fused prompt; they
    are repaired unconditionally (a small fixed share of the budget). The rest of the
    budget goes to the tokens with the largest value deviation at the check layer,
    optionally weighted by how much the query attends to them there.
    """

    ratio: float = 0.15
    check_layer: int = 1
    sink_tokens: int = 8
    query_weight: float = 0.0
    name: str = "sinkblend"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        layout = ctx.layout
        fresh = run_fresh_pass(ctx.model, layout, self.check_layer + 1)
        context = ctx.context_indices
        budget = round(self.ratio * len(context))
        heads: list[int] = []
        for start, ids in ctx.repaired_chunks():
            heads.extend(range(start, start + min(self.sink_tokens, len(ids))))
        heads = heads[:budget]
        scores = value_deviation(ctx, fresh, self.check_layer)
        if self.query_weight > 0:
            attention = query_attention(ctx, fresh, self.check_layer)
            scores = scores * (attention / attention.mean()).pow(self.query_weight)
        offset = ctx.repair_start
        taken = torch.zeros(len(context), dtype=torch.bool)
        taken[[h - offset for h in heads]] = True
        scores = scores.masked_fill(taken, float("-inf"))
        rest = budget - len(heads)
        extra = scores.topk(rest).indices if rest > 0 else torch.empty(0, dtype=torch.long)
        chosen = sorted(heads + context[extra].tolist())
        layers = self.check_layer + 1
        work = len(layout) * layers
        return checked_plan(chosen, fresh, layers, work)
