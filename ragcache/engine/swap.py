"""Swap preemption: a decoding sequence's KV copied to host memory before its blocks are
freed, and written back into its new blocks when it is admitted again."""

from __future__ import annotations

import torch

from ragcache.engine.kv_pool import KVPool
from ragcache.engine.sequence import Sequence


def swap_out(pool: KVPool, seq: Sequence) -> bool:
    """Keep ``seq``'s computed KV on the host; False when it has none to keep."""
    if seq.in_prefill or not seq.block_table:
        return False
    computed = len(seq) - 1
    bs = pool.block_size
    slots = torch.tensor([seq.slot(i, bs) for i in range(computed)], device=pool.device)
    pin = pool.device.type == "cuda"
    ks, vs = [], []
    for layer in range(pool.spec.num_layers):
        k, v = pool.read_slots(layer, slots)
        ks.append(k.to("cpu").pin_memory() if pin else k.clone())
        vs.append(v.to("cpu").pin_memory() if pin else v.clone())
    seq.swapped = (ks, vs)
    return True


def swap_in(pool: KVPool, seq: Sequence) -> None:
    """Write ``seq``'s swapped KV past its cached prefix into its blocks; plan the rest."""
    assert seq.swapped is not None
    ks, vs = seq.swapped
    start = seq.num_cached_tokens
    computed = ks[0].shape[0]
    bs = pool.block_size
    slots = torch.tensor([seq.slot(i, bs) for i in range(start, computed)], device=pool.device)
    for layer in range(pool.spec.num_layers):
        pool.write_slots(
            layer, slots, ks[layer][start:].to(pool.device), vs[layer][start:].to(pool.device)
        )
    seq.swapped = None
    seq.plan = list(range(computed, len(seq)))
    seq.num_planned_done = 0
