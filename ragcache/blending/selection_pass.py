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


@dataclass(slots=True)
class QueryPass:
    """Per computed layer: the query tokens' rotated q [nq, Hq, D] and the keys
    [n, Hkv, D] they attended to (the placed context, then the query tokens themselves)."""

    query_q: list[torch.Tensor]
    keys: list[torch.Tensor]


@torch.inference_mode()
def run_query_pass(
    model: LlamaModel,
    placed_k: Sequence[torch.Tensor],
    placed_v: Sequence[torch.Tensor],
    query_ids: list[int],
    query_positions: torch.Tensor,
    num_layers: int,
) -> QueryPass:
    """Compute only the query tokens through the first layers, against placed context KV.

    The context is not computed: its cached, placed KV stands in for it, so the pass costs
    the query tokens' share of ``num_layers`` layers. Positions are the callers': the keys
    carry theirs in their rotation, so query positions need not follow the slot order.
    """
    context = int(placed_k[0].shape[0])
    n = context + len(query_ids)
    spec = dataclasses.replace(model.spec, num_layers=num_layers)
    pool = KVPool(spec, (n + BLOCK_SIZE - 1) // BLOCK_SIZE, BLOCK_SIZE, model.dtype, model.device)
    meta = contiguous_metadata([n], BLOCK_SIZE, model.device)
    slots = meta.slot_mapping
    for layer in range(num_layers):
        pool.write_slots(layer, slots[:context], placed_k[layer], placed_v[layer])
    query_q: list[torch.Tensor] = []

    def keep_query(layer: int, q: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        query_q.append(q.clone())

    ids = torch.tensor(query_ids, dtype=torch.long, device=model.device)
    tokens = torch.arange(context, n, device=model.device)
    model.run_layers(
        model.embed(ids),
        model.rope(query_positions.to(model.device)),
        meta.subset(tokens),
        pool,
        range(num_layers),
        keep_query,
    )
    keys = [pool.read_slots(layer, slots[:n])[0] for layer in range(num_layers)]
    return QueryPass(query_q, keys)
