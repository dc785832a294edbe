"""Gradual filtering: score every token at a shallow layer, then only candidates deeper.

CacheBlend's deviation at layer 1 sees one layer of the missing cross-chunk
attention; deviations keep growing with depth. Continuing the fresh computation for
a shrinking candidate set (e.g. 3r tokens at layer 2, 2r at layer 3, keep r) scores
tokens where the deviation has developed, at a fraction of a deep full pass.

``gradual`` follows the paper: tokens are ranked by value deviation alone. With a
``query_weight``, scores are weighted by the query's attention to each token:
``gradual_weighted`` takes it at the scoring layer, ``queryblend`` from a query-only pass
over every layer against the cached context (what the answer will read).
A candidate computed at a deeper layer keeps that layer's fresh KV even when it is
dropped later, and at most ``ratio`` of the context is recomputed at every setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ragcache.blending.methods import FusionContext, FusionPlan, value_deviation
from ragcache.blending.selection_pass import (
    FreshPass,
    attention_to_context,
    query_attention,
    run_fresh_pass,
)


def weighted(scores: torch.Tensor, attention: torch.Tensor | None, power: float) -> torch.Tensor:
    if attention is None or power == 0:
        return scores
    return scores * (attention / attention.mean().clamp_min(1e-12)).pow(power)


ALL_LAYERS = 1 << 30  # query_layers value meaning every layer of the model


@torch.inference_mode()
def query_reads(ctx: FusionContext, num_layers: int) -> torch.Tensor:
    """The query tokens' mean attention to every context position over ``num_layers``.

    Only the query is computed, against the placed (cached) context KV, so the pass
    costs the query's share of those layers; deep layers show which tokens the answer
    will read, which the first layers (where the selection is scored) do not yet.
    """
    layout = ctx.layout
    end = layout.context_end
    positions = torch.arange(end, len(layout))
    shares = query_attention(
        ctx.model, ctx.placed_k, ctx.placed_v, layout.query_ids, positions, num_layers
    )
    return torch.stack(shares).mean(dim=0)[:end]


@dataclass(slots=True)
class GradualBlend:
    ratio: float = 0.15
    first_check: int = 1
    last_check: int = 3
    widen: float = 3.0
    query_weight: float = 0.0
    query_layers: int = 0
    name: str = "gradual"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        layout = ctx.layout
        last_check = max(self.first_check, min(self.last_check, ctx.model.spec.num_layers - 1))
        fresh = run_fresh_pass(ctx.model, layout, self.first_check + 1, last_check + 1)
        plan = FusionPlan(
            fresh_layers=self.first_check + 1, fresh=fresh, resume_layer=self.first_check + 1
        )
        plan.selection_work = len(layout) * (self.first_check + 1)
        context = ctx.context_indices
        budget = round(self.ratio * len(context))
        if budget <= 0:
            return plan
        reads = None
        if self.query_layers > 0 and self.query_weight != 0:
            query_layers = min(self.query_layers, ctx.model.spec.num_layers)
            reads = query_reads(ctx, query_layers)
            plan.selection_work += len(layout.query_ids) * query_layers
        attention = None
        if self.query_weight != 0:
            attention = (
                reads[context]
                if reads is not None
                else attention_to_context(
                    fresh.query_q[self.first_check], fresh.k[self.first_check], context
                )
            )
        scores = weighted(
            value_deviation(ctx, fresh, self.first_check), attention, self.query_weight
        )
        steps = last_check - self.first_check
        keep = min(len(context), round(budget * self.widen) if steps > 0 else budget)
        candidates = context[scores.topk(keep).indices].sort().values
        for depth in range(1, steps + 1):
            layer = self.first_check + depth
            plan.selection_work += len(candidates) + len(layout.query_ids)
            candidates = self._deeper(
                ctx, fresh, layer, candidates, budget, depth / steps, reads, plan
            )
            # The remaining candidates and the query now hold this layer's output.
            plan.resume_layer = layer + 1
        plan.recompute = candidates.tolist()
        return plan

    @torch.inference_mode()
    def _deeper(
        self,
        ctx: FusionContext,
        fresh: FreshPass,
        layer: int,
        candidates: torch.Tensor,
        budget: int,
        progress: float,
        reads: torch.Tensor | None,
        plan: FusionPlan,
    ) -> torch.Tensor:
        """Compute candidates (and the query) at ``layer``, keep their fresh KV there, and
        keep the most deviating as candidates."""
        layout = ctx.layout
        n = len(layout)
        query = torch.arange(layout.context_end, n)
        tokens = torch.cat([candidates, query])
        pool = fresh.pool
        slots = fresh.meta.slot_mapping
        context_end = layout.context_end
        pool.write_slots(layer, slots[:context_end], ctx.placed_k[layer], ctx.placed_v[layer])
        captured: dict[str, torch.Tensor] = {}

        def keep(index: int, q: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor) -> None:
            captured["q"] = q
            captured["v"] = v

        hidden = fresh.hidden[tokens]
        fresh.hidden[tokens] = ctx.model.run_layers(
            hidden,
            fresh.rope.subset(tokens),
            fresh.meta.subset(tokens),
            pool,
            range(layer, layer + 1),
            keep,
        )
        count = len(candidates)
        k_layer, v_layer = pool.layer(layer)
        # The candidates' and the query's KV at this layer: the engine resumes the
        # surviving candidates and the query after it (``resume_layer``).
        computed_slots = slots[tokens]
        plan.layer_kv[layer] = (
            tokens,
            k_layer.reshape(-1, *k_layer.shape[2:])[computed_slots].clone(),
            v_layer.reshape(-1, *v_layer.shape[2:])[computed_slots].clone(),
        )
        v_new = captured["v"][:count].float()
        deviation = (v_new - ctx.placed_v[layer][candidates].float()).pow(2).sum(dim=(1, 2))
        if self.query_weight == 0:
            attention = None
        elif reads is not None:
            attention = reads[candidates]
        else:
            keys = k_layer.reshape(-1, *k_layer.shape[2:])[slots[:n]]
            attention = attention_to_context(captured["q"][count:], keys, candidates)
        scores = weighted(deviation, attention, self.query_weight)
        target = max(budget, round(len(candidates) - (len(candidates) - budget) * progress))
        kept = scores.topk(min(target, count)).indices
        return candidates[kept].sort().values
