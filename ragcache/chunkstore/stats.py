"""Counters of the chunk store, reported as a plain dict."""

from __future__ import annotations

from dataclasses import dataclass, field


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

