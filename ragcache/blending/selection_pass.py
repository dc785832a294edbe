"""Passes over the first layers that score the context: a fresh prefill of the whole
prompt, or the query tokens alone against the placed (cached) context KV."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ragcache.blending.prompt import PromptLayout
from ragcache.engine.attention_metadata import AttentionMetadata, contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.lazy_layers import layer_shapes
from ragcache.engine.model import LlamaModel, RopeState

BLOCK_SIZE = 16


@dataclass(slots=True)
class FreshPass:
    """Per computed layer: K (rotated) and V of every prompt token, and query-token q.

    ``pool``, ``meta``, ``rope`` and ``hidden`` let a caller continue deeper layers on a
    subset of the tokens (gradual filtering); the pool has room for ``pool_layers``.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    query_q: list[torch.Tensor]
    hidden: torch.Tensor
    pool: KVPool
    meta: AttentionMetadata
    rope: RopeState


@torch.inference_mode()
def run_fresh_pass(
    model: LlamaModel, layout: PromptLayout, num_layers: int, pool_layers: int | None = None
) -> FreshPass:
    ids = torch.tensor(layout.prompt_ids, dtype=torch.long, device=model.device)
    n = len(ids)
    spec = dataclasses.replace(model.spec, num_layers=max(num_layers, pool_layers or 0))
    pool = KVPool(spec, (n + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype, model.device)
    meta = contiguous_metadata([n], BLOCK_SIZE, model.device)
    query_q: list[torch.Tensor] = []
    start = layout.context_end

    def keep_query(layer: int, q: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        query_q.append(q[start:].clone())

    rope = model.rope(torch.arange(n, device=model.device))
    hidden = model.run_layers(model.embed(ids), rope, meta, pool, range(num_layers), keep_query)
    ks, vs = [], []
    for layer in range(num_layers):
        k, v = pool.layer(layer)
        ks.append(k.reshape(-1, *k.shape[2:])[:n].clone())
        vs.append(v.reshape(-1, *v.shape[2:])[:n].clone())
    return FreshPass(ks, vs, query_q, hidden, pool, meta, rope)


def attention_to_context(
    query_q: torch.Tensor,
    keys: torch.Tensor,
    context: torch.Tensor,
    first_query_key: int | None = None,
) -> torch.Tensor:
    """Mean attention of query tokens [nq, Hq, D] over keys [n, Hkv, D], at context indices.

    With ``first_query_key``, query token i is the key at that index + i and attends only
    up to itself (causal); without it every query token sees every key.
    """
    group = query_q.shape[1] // keys.shape[1]
    expanded = keys.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,nhd->hqn", query_q.float(), expanded) * query_q.shape[-1] ** -0.5
    if first_query_key is not None:
        own = first_query_key + torch.arange(query_q.shape[0], device=scores.device)
        later = torch.arange(keys.shape[0], device=scores.device)[None, :] > own[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1))[context]


class LayerWindow(KVPool):
    """A pool of one layer's room that every layer index maps to: a pass that walks the
    layers in order, writing each one's cached KV before computing it, reuses it."""

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return super().layer(0)


@torch.inference_mode()
def query_attention(
    model: LlamaModel,
    placed_k: Sequence[torch.Tensor],
    placed_v: Sequence[torch.Tensor],
    query_ids: list[int],
    query_positions: torch.Tensor,
    num_layers: int,
) -> list[torch.Tensor]:
    """Per layer, the query tokens' mean attention [n] over every key: the placed
    context's, then the query tokens' own (causal), computing only the query.

    The context is not computed: its cached, placed KV stands in for it, so the pass costs
    the query tokens' share of ``num_layers`` layers, and it holds one layer of the
    context's KV at a time. Positions are the callers': the keys carry theirs in their
    rotation, so query positions need not follow the slot order.
    """
    context = layer_shapes(placed_k)[0][0]
    n = context + len(query_ids)
    spec = dataclasses.replace(model.spec, num_layers=1)
    window = LayerWindow(
        spec, (n + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype, model.device
    )
    meta = contiguous_metadata([n], BLOCK_SIZE, model.device)
    slots = meta.slot_mapping
    tokens = torch.arange(context, n, device=model.device)
    computed = meta.subset(tokens)
    rope = model.rope(query_positions.to(model.device))
    every_key = torch.arange(n, device=model.device)
    hidden = model.embed(torch.tensor(query_ids, dtype=torch.long, device=model.device))
    shares: list[torch.Tensor] = []
    query_q: list[torch.Tensor] = []

    def keep_query(layer: int, q: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        query_q.append(q.clone())

    for layer in range(num_layers):
        window.write_slots(layer, slots[:context], placed_k[layer], placed_v[layer])
        hidden = model.run_layers(
            hidden, rope, computed, window, range(layer, layer + 1), keep_query
        )
        keys = window.read_slots(layer, slots)[0]
        shares.append(attention_to_context(query_q.pop(), keys, every_key, context))
    return shares
