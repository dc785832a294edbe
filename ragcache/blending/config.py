"""Config section of the fusion methods."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class FusionConfig:
    method: str = field(
        default="cacheblend",
        metadata={
            "help": "full_prefill, prefix_only, full_reuse, cacheblend, legolink, "
            "gradual (CacheBlend's gradual filtering by value deviation), gradual_weighted "
            "(query-weighted at the scoring layer), queryblend (weighted by what the query "
            "reads over every layer), sinkblend, cachefocus, cachecraft (per-chunk budgets "
            "from measured deviation, repaired variants reused in the same context)"
        },
    )
    recompute_ratio: float = field(
        default=0.15,
        metadata={"help": "cacheblend/gradual/queryblend: share of context tokens recomputed"},
    )
    check_layer: int = field(
        default=1,
        metadata={
            "help": "cacheblend/gradual/queryblend: first layer that scores tokens, >= 1 "
            "(below 3, the last check layer, for the gradual family)"
        },
    )
    craft_insensitive: float = field(
        default=0.02,
        metadata={
            "help": "cachecraft: mean relative value deviation below which a chunk measured "
            "in craft_min_contexts contexts gets no recompute budget"
        },
    )
    craft_min_contexts: int = field(
        default=2,
        metadata={"help": "cachecraft: contexts a chunk is measured in before it can be skipped"},
    )
    legolink_k: int = field(
        default=32, metadata={"help": "LegoLink: leading tokens recomputed per chunk"}
    )
    focus_keep: float = field(
        default=1.0,
        metadata={"help": "cachefocus: share of retrieved chunks kept, by relevance, in (0, 1]"},
    )
    focus_layers: int = field(
        default=2, metadata={"help": "cachefocus: first layers whose query attention scores chunks"}
    )
    focus_order: str = field(
        default="retrieved",
        metadata={"help": "cachefocus: kept chunks as retrieved, or by relevance (best last)"},
    )
    focus_base: str = field(
        default="full_reuse",
        metadata={"help": "cachefocus: method that fuses the kept chunks (e.g. cacheblend)"},
    )
