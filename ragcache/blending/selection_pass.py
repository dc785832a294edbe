"""A fresh prefill of the first layers over the whole prompt, used to score tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.model import LlamaModel
from ragcache.prompt import PromptLayout


@dataclass(slots=True)
class FreshPass:
    """Per computed layer: K (rotated) and V of every prompt token, and query-token q."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    query_q: list[torch.Tensor]
    hidden: torch.Tensor


@torch.inference_mode()
def run_fresh_pass(model: LlamaModel, layout: PromptLayout, num_layers: int) -> FreshPass:
    ids = torch.tensor(layout.prompt_ids, dtype=torch.long, device=model.device)
    n = len(ids)
    block_size = 16
    spec = dataclasses.replace(model.spec, num_layers=num_layers)
    pool = KVPool(spec, (n + block_size - 1) // block_size, block_size, model.dtype, model.device)
    meta = contiguous_metadata([n], block_size, model.device)
    query_q: list[torch.Tensor] = []
    start = layout.context_end

    def keep_query(layer: int, q: torch.Tensor, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        query_q.append(q[start:].clone())

    positions = torch.arange(n, device=model.device)
    hidden = model.run_layers(
        model.embed(ids), model.rope(positions), meta, pool, range(num_layers), keep_query
    )
    ks, vs = [], []
    for layer in range(num_layers):
        k, v = pool.layer(layer)
        ks.append(k.reshape(-1, *k.shape[2:])[:n].clone())
        vs.append(v.reshape(-1, *v.shape[2:])[:n].clone())
    return FreshPass(ks, vs, query_q, hidden)
