"""Config section of the fusion methods."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class FusionConfig:
    method: str = field(
        default="cacheblend",
        metadata={
            "help": "full_prefill, prefix_only, full_reuse, cacheblend, legolink, "
            "gradual (query-weighted gradual filtering), sinkblend"
        },
    )
    recompute_ratio: float = field(
        default=0.15, metadata={"help": "cacheblend/gradual: share of context tokens recomputed"}
    )
    check_layer: int = field(
        default=1, metadata={"help": "cacheblend/gradual: first layer that scores tokens"}
    )
    legolink_k: int = field(
        default=32, metadata={"help": "LegoLink: leading tokens recomputed per chunk"}
    )
