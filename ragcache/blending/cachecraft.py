"""Cache-Craft: recompute only where a chunk's cached KV needs it, and keep the repair.

Per request the service tells the method, for every chunk in prompt order, whether its
placed KV is a repaired variant made after the same predecessor chunks (then it needs
no repair) and what is known of the chunk's deviation in earlier contexts (a chunk
measured in ``min_contexts`` contexts or more whose mean relative deviation stayed
below ``insensitive`` is context-insensitive and gets no budget). The chunk right after
the root needs nothing either: its cached KV is the exact KV at that place.

The remaining chunks are scored as CacheBlend scores tokens (value deviation at the
check layer, from a fresh pass over the first layers), and ``ratio`` of their tokens,
the most deviating ones, are recomputed through every layer inside the plan. That
repair pass leaves each repaired chunk's whole KV at hand, so the method hands it back
as a variant for the service to store under its context, with every chunk's measured
relative deviation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.methods import FusionContext, FusionPlan, value_deviation
from ragcache.blending.selection_pass import FreshPass, run_fresh_pass


@dataclass(slots=True)
class ChunkHint:
    """What the service knows of one chunk of the prompt before fusion."""

    variant: bool = False
    contexts: int = 0
    mean_deviation: float = 0.0


@dataclass(slots=True)
class RepairedVariant:
    kv: ChunkKV
    repaired_tokens: int


def relative_deviation(deviation: torch.Tensor, values: torch.Tensor) -> float:
    """Mean squared value deviation of a chunk's tokens over their mean squared norm."""
    norm = values.float().pow(2).sum(dim=tuple(range(1, values.dim()))).mean()
    return float(deviation.float().mean() / norm.clamp_min(1e-12))


@dataclass(slots=True)
class CacheCraft:
    ratio: float = 0.15
    check_layer: int = 1
    insensitive: float = 0.02
    min_contexts: int = 2
    name: str = "cachecraft"
    # Per request: set by the service before planning, read by it afterwards.
    hints: list[ChunkHint] = field(default_factory=list)
    deviations: dict[int, float] = field(default_factory=dict)
    variants: dict[int, RepairedVariant] = field(default_factory=dict)
    repaired: list[int] = field(default_factory=list)

    def needs_repair(self, index: int) -> bool:
        if index == 0:
            return False
        hint = self.hints[index] if index < len(self.hints) else ChunkHint()
        if hint.variant:
            return False
        known = hint.contexts >= self.min_contexts
        return not (known and hint.mean_deviation < self.insensitive)

    def plan(self, ctx: FusionContext) -> FusionPlan:
        layout = ctx.layout
        chunks = range(ctx.exact_chunks, len(layout.chunk_ids))
        if not any(self.needs_repair(i) for i in chunks):
            return FusionPlan()
        layers = self.check_layer + 1
        num_layers = ctx.model.spec.num_layers
        fresh = run_fresh_pass(ctx.model, layout, layers, num_layers)
        scores = value_deviation(ctx, fresh, self.check_layer)
        offset = ctx.repair_start
        eligible = torch.zeros(len(scores), dtype=torch.bool)
        spans: dict[int, tuple[int, int]] = {}
        for i in chunks:
            start = layout.chunk_starts[i]
            end = start + len(layout.chunk_ids[i])
            spans[i] = (start, end)
            hint = self.hints[i] if i < len(self.hints) else ChunkHint()
            if i > 0 and not hint.variant:
                values = fresh.v[self.check_layer][start:end]
                self.deviations[i] = relative_deviation(
                    scores[start - offset : end - offset], values
                )
            if self.needs_repair(i):
                eligible[start - offset : end - offset] = True
        budget = round(self.ratio * int(eligible.sum()))
        plan = FusionPlan(
            fresh_layers=layers,
            fresh=fresh,
            selection_work=len(layout) * layers,
            resume_layer=layers,  # the query; the repaired tokens are done (``repaired``)
        )
        if budget <= 0:
            return plan
        picked = scores.masked_fill(~eligible, float("-inf")).topk(budget).indices
        chosen = (picked + offset).sort().values
        self._repair(ctx, fresh, chosen, layers, plan)
        plan.repaired = self.repaired = chosen.tolist()
        for i, (start, end) in spans.items():
            count = int(((chosen >= start) & (chosen < end)).sum())
            if count:
                variant = self._variant(ctx, fresh, plan, i, start, end)
                self.variants[i] = RepairedVariant(variant, count)
        return plan

    @torch.inference_mode()
    def _repair(
        self,
        ctx: FusionContext,
        fresh: FreshPass,
        chosen: torch.Tensor,
        first_layer: int,
        plan: FusionPlan,
    ) -> None:
        """Computes ``chosen`` through the layers after the fresh pass, against the placed
        KV of every other token, and keeps their KV at each of those layers."""
        model, pool = ctx.model, fresh.pool
        slots = fresh.meta.slot_mapping
        end = ctx.layout.context_end
        deeper = range(first_layer, model.spec.num_layers)
        for layer in deeper:
            pool.write_slots(layer, slots[:end], ctx.placed_k[layer], ctx.placed_v[layer])
        model.run_layers(
            fresh.hidden[chosen], fresh.rope.subset(chosen), fresh.meta.subset(chosen), pool, deeper
        )
        chosen_slots = slots[chosen]
        for layer in deeper:
            k, v = pool.layer(layer)
            k_flat, v_flat = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
            plan.layer_kv[layer] = (
                chosen,
                k_flat[chosen_slots].clone(),
                v_flat[chosen_slots].clone(),
            )

    def _variant(
        self,
        ctx: FusionContext,
        fresh: FreshPass,
        plan: FusionPlan,
        index: int,
        start: int,
        end: int,
    ) -> ChunkKV:
        """The chunk's KV as this prompt leaves it: fresh in the first layers, placed and
        repaired deeper, its keys rotated to this prompt's positions."""
        slots = fresh.meta.slot_mapping[start:end]
        ks, vs = [], []
        for layer in range(ctx.model.spec.num_layers):
            if layer < plan.fresh_layers:
                ks.append(fresh.k[layer][start:end].clone())
                vs.append(fresh.v[layer][start:end].clone())
            else:
                k, v = fresh.pool.layer(layer)
                ks.append(k.reshape(-1, *k.shape[2:])[slots].clone())
                vs.append(v.reshape(-1, *v.shape[2:])[slots].clone())
        ids = list(ctx.layout.chunk_ids[index])
        return ChunkKV(ids, ks, vs, torch.arange(start, end), exact=False)
