"""Counters of the chunk store, reported as a plain dict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ragcache.chunkstore.policy import CostModel
from ragcache.chunkstore.tier import Tier


def _per_tier(names: tuple[str, ...]) -> dict[str, int]:
    return dict.fromkeys(names, 0)


@dataclass(slots=True)
class StoreStats:
    tier_names: tuple[str, ...]
    hits: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)
    rejected_admissions: dict[str, int] = field(default_factory=dict)
    misses: int = 0
    collisions: int = 0
    corruptions: int = 0
    promotions: int = 0
    demotions: int = 0
    rejected_puts: int = 0

    def __post_init__(self) -> None:
        self.hits = self.hits or _per_tier(self.tier_names)
        self.evictions = self.evictions or _per_tier(self.tier_names)
        self.rejected_admissions = self.rejected_admissions or _per_tier(self.tier_names)

    def report(
        self, policy: str, cost_model: CostModel, tiers: Sequence[Tier]
    ) -> dict[str, object]:
        """The counters with each tier's capacity and use, as ``ChunkStore.stats`` gives them."""
        return {
            "policy": policy,
            "cost_model": {
                "per_token_s": cost_model.per_token,
                "per_token_pair_s": cost_model.per_token_pair,
                "per_call_s": cost_model.fixed,
            },
            "tiers": {
                tier.name: {
                    "enabled": tier.enabled,
                    "capacity_bytes": tier.capacity_bytes,
                    "bytes": tier.used_bytes,
                    "entries": tier.num_entries(),
                    "hits": self.hits[tier.name],
                    "evictions": self.evictions[tier.name],
                    "rejected_admissions": self.rejected_admissions[tier.name],
                }
                for tier in tiers
            },
            "hits": sum(self.hits.values()),
            "misses": self.misses,
            "collisions": self.collisions,
            "corruptions": self.corruptions,
            "promotions": self.promotions,
            "demotions": self.demotions,
            "rejected_puts": self.rejected_puts,
        }
