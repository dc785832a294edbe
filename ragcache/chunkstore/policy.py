"""Replacement policies (PGDSF, LRU, LFU) and the prefill cost model they weigh by.

A policy ranks the entries of one tier; the lowest priority is evicted first. The
store passes each entry's size in bytes, its recompute cost in seconds and how often
it has been requested, and reports every request (hit or miss) to ``on_request``. One
policy instance per tier, so PGDSF keeps one clock per tier.

When a tier is full, ``admits`` decides whether a newcomer is worth the entries it would
evict. LRU and LFU always admit; PGDSF admits a newcomer only when its recent requests
times its cost exceed those of its victims (a TinyLFU-style filter). Without it, every
chunk requested once pushes out a proven one, and on a skewed trace the bottom of the
cache churns through one-off chunks.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class CostModel:
    """Prefill seconds of ``n`` tokens placed after ``p`` earlier tokens.

    seconds = per_token * n + per_token_pair * n * (n + 2p) + fixed; the middle term is
    attention over the prefix and the chunk itself (twice the causal pair count).
    """

    per_token: float = 2.0e-4
    per_token_pair: float = 4.0e-8
    fixed: float = 2.0e-3

    def seconds(self, num_tokens: int, position_offset: int = 0) -> float:
        if num_tokens < 0 or position_offset < 0:
            raise ValueError(
                f"cost of {num_tokens} tokens at offset {position_offset}: both must be >= 0"
            )
        pairs = num_tokens * (num_tokens + 2 * position_offset)
        return self.per_token * num_tokens + self.per_token_pair * pairs + self.fixed

    @classmethod
    def fit(cls, samples: Sequence[Sequence[float]]) -> CostModel:
        """Least squares with non-negative coefficients from (tokens, seconds) or
        (tokens, offset, seconds) samples."""
        rows = np.asarray(samples, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] not in (2, 3) or len(rows) < 3:
            raise ValueError(
                "CostModel.fit needs at least 3 samples of (tokens, seconds) or "
                f"(tokens, offset, seconds); got shape {rows.shape}"
            )
        tokens = rows[:, 0]
        offsets = rows[:, 1] if rows.shape[1] == 3 else np.zeros_like(tokens)
        seconds = rows[:, -1]
        features = np.stack([tokens, tokens * (tokens + 2 * offsets), np.ones_like(tokens)], 1)
        best: tuple[float, np.ndarray] | None = None
        # Three features: trying every subset is an exact non-negative least squares.
        for mask in itertools.product((True, False), repeat=3):
            columns = [i for i in range(3) if mask[i]]
            if not columns:
                continue
            solution, *_ = np.linalg.lstsq(features[:, columns], seconds, rcond=None)
            if (solution < 0).any():
                continue
            coefficients = np.zeros(3)
            coefficients[columns] = solution
            residual = float(np.sum((features @ coefficients - seconds) ** 2))
            if best is None or residual < best[0]:
                best = (residual, coefficients)
        assert best is not None  # the fixed-only fit of non-negative seconds never fails
        per_token, per_token_pair, fixed = (float(x) for x in best[1])
        return cls(per_token, per_token_pair, fixed)


class ReplacementPolicy(ABC):
    """Ranks one tier's entries; ``pick_victim`` returns the lowest-priority one."""

    name: str = ""

    def __init__(self) -> None:
        self._tick = itertools.count()
        self._sizes: dict[str, int] = {}
        self._costs: dict[str, float] = {}
        self._frequency: dict[str, int] = {}
        self._current: dict[str, tuple] = {}
        self._heap: list[tuple[tuple, str]] = []

    @abstractmethod
    def _priority(self, key: str) -> tuple: ...

    def __contains__(self, key: object) -> bool:
        return key in self._current

    def __len__(self) -> int:
        return len(self._current)

    def _rank(self, key: str) -> None:
        priority = (*self._priority(key), next(self._tick))
        self._current[key] = priority
        heapq.heappush(self._heap, (priority, key))
        if len(self._heap) > 4 * len(self._current) + 64:
            self._heap = [(p, k) for k, p in self._current.items()]
            heapq.heapify(self._heap)

    def on_insert(self, key: str, size: int, cost: float, frequency: int = 1) -> None:
        self._sizes[key] = max(int(size), 1)
        self._costs[key] = float(cost)
        self._frequency[key] = max(int(frequency), 1)
        self._rank(key)

    def on_access(self, key: str, frequency: int | None = None) -> None:
        if key not in self._current:
            return
        self._frequency[key] = self._frequency[key] + 1 if frequency is None else frequency
        self._rank(key)

    def on_request(self, key: str) -> None:  # noqa: B027 - most policies need only hits
        """Every request for ``key``, whether or not this tier holds it."""

    def admits(self, key: str, cost: float, victims: Sequence[str]) -> bool:
        """Whether ``key`` (recompute ``cost`` seconds) may replace ``victims``."""
        return True

    def on_remove(self, key: str) -> None:
        for table in (self._current, self._sizes, self._costs, self._frequency):
            table.pop(key, None)

    def on_evict(self, key: str) -> None:
        self.on_remove(key)

    def priority(self, key: str) -> tuple:
        return self._current[key]

    def pick_victim(self, can_evict: Callable[[str], bool] = lambda key: True) -> str | None:
        skipped: list[tuple[tuple, str]] = []
        victim = None
        while self._heap:
            priority, key = heapq.heappop(self._heap)
            if self._current.get(key) != priority:
                continue
            skipped.append((priority, key))
            if can_evict(key):
                victim = key
                break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return victim

    def pick_victims(
        self, nbytes: int, can_evict: Callable[[str], bool] = lambda key: True
    ) -> list[str] | None:
        """The lowest-priority evictable keys that free at least ``nbytes``, without
        evicting them; None when all evictable entries together are too small."""
        popped: list[tuple[tuple, str]] = []
        victims: list[str] = []
        freed = 0
        while self._heap and freed < nbytes:
            priority, key = heapq.heappop(self._heap)
            if self._current.get(key) != priority:
                continue
            popped.append((priority, key))
            if can_evict(key):
                victims.append(key)
                freed += self._sizes[key]
        for item in popped:
            heapq.heappush(self._heap, item)
        return victims if freed >= nbytes else None

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]


class LRUPolicy(ReplacementPolicy):
    name = "lru"

    def _priority(self, key: str) -> tuple:
        return ()


class LFUPolicy(ReplacementPolicy):
    name = "lfu"

    def _priority(self, key: str) -> tuple:
        return (self._frequency[key],)


class PGDSFPolicy(ReplacementPolicy):
    """Priority = clock + frequency**exponent * cost / size; the clock rises to each
    evicted priority, so entries that stop being used age out behind newer ones.
    An exponent above 1 trusts long-run frequency more than the clock's recency.

    With ``admission``, recent request counts (halved every ``ADMISSION_WINDOW`` times
    the number of entries held, so they forget a past popularity) gate newcomers to a
    full tier: recent(newcomer) * cost must beat the sum over the victims.
    """

    name = "pgdsf"
    ADMISSION_WINDOW = 10

    def __init__(self, frequency_exponent: float = 1.0, admission: bool = True) -> None:
        super().__init__()
        self.clock = 0.0
        self.frequency_exponent = frequency_exponent
        self.admission = admission
        self._recent: dict[str, float] = {}
        self._requests_since_halving = 0

    def on_request(self, key: str) -> None:
        if not self.admission:
            return
        self._recent[key] = self._recent.get(key, 0.0) + 1.0
        self._requests_since_halving += 1
        if self._requests_since_halving >= self.ADMISSION_WINDOW * max(len(self), 1):
            self._recent = {k: n / 2 for k, n in self._recent.items() if n >= 1.0}
            self._requests_since_halving = 0

    def recent_requests(self, key: str) -> float:
        return self._recent.get(key, 0.0)

    def admits(self, key: str, cost: float, victims: Sequence[str]) -> bool:
        if not self.admission or not victims:
            return True
        lost = sum(self._recent.get(victim, 0.0) * self._costs[victim] for victim in victims)
        return self._recent.get(key, 0.0) * cost >= lost

    def _priority(self, key: str) -> tuple:
        weight = self._frequency[key] ** self.frequency_exponent
        return (self.clock + weight * self._costs[key] / self._sizes[key],)

    def clear(self) -> None:
        self.__init__(self.frequency_exponent, self.admission)  # type: ignore[misc]

    def on_evict(self, key: str) -> None:
        if key in self._current:
            self.clock = max(self.clock, self._current[key][0])
        super().on_evict(key)


POLICIES: dict[str, type[ReplacementPolicy]] = {
    "pgdsf": PGDSFPolicy,
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
}


def make_policy(
    name: str, pgdsf_frequency_exponent: float = 1.0, pgdsf_admission: bool = True
) -> ReplacementPolicy:
    try:
        policy_class = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown replacement policy {name!r}; accepted: {', '.join(POLICIES)}"
        ) from None
    if policy_class is PGDSFPolicy:
        return PGDSFPolicy(pgdsf_frequency_exponent, pgdsf_admission)
    return policy_class()
