"""The load of the serving benchmark: a MuSiQue corpus, Zipf-popular questions, Poisson arrivals.

Every draw is seeded. The question sequence and the unit-rate arrival offsets are drawn
once; a given arrival rate scales the offsets, so every rate (and both cache modes)
replays the same questions in the same order, only faster or slower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(slots=True, frozen=True)
class MusiqueItem:
    question: str
    passages: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class Workload:
    """Requests of one phase: ``arrivals[i]`` seconds after the start, ask ``questions[i]``."""

    rate: float
    arrivals: tuple[float, ...]
    question_ids: tuple[int, ...]
    questions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.arrivals)


def load_items(path: Path, count: int) -> list[MusiqueItem]:
    """The first ``count`` items of a MuSiQue JSON file: [{question, ctxs: [{text}]}]."""
    if not path.is_file():
        raise ValueError(f"MuSiQue data file {path} does not exist; pass --data")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of MuSiQue items")
    if not 1 <= count <= len(records):
        raise ValueError(f"--questions={count}; {path} holds {len(records)} items, use 1 to that")
    items = []
    for number, record in enumerate(records[:count]):
        try:
            question = str(record["question"]).strip()
            passages = tuple(str(c["text"]).strip() for c in record["ctxs"])
        except (KeyError, TypeError):
            raise ValueError(
                f"{path} item {number} lacks 'question' or 'ctxs' with 'text' fields"
            ) from None
        passages = tuple(p for p in passages if p)
        if not question or not passages:
            raise ValueError(f"{path} item {number} has an empty question or no passage text")
        items.append(MusiqueItem(question, passages))
    return items


def corpus_files(items: list[MusiqueItem]) -> list[tuple[str, bytes]]:
    """One text file per distinct passage, named after its first item and position."""
    seen: set[str] = set()
    files = []
    for item_number, item in enumerate(items):
        for passage_number, text in enumerate(item.passages):
            if text in seen:
                continue
            seen.add(text)
            files.append((f"q{item_number:03d}-p{passage_number:02d}.txt", text.encode()))
    return files


def zipf_weights(count: int, exponent: float) -> np.ndarray:
    """Probabilities of ranks 1..count proportional to rank**-exponent."""
    if count < 1:
        raise ValueError("a Zipf draw needs at least one item")
    if exponent < 0:
        raise ValueError(f"Zipf exponent {exponent} must be >= 0")
    weights = np.arange(1, count + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def draw_questions(pool: int, count: int, exponent: float, seed: int) -> list[int]:
    """``count`` question indices in [0, pool), index i having Zipf rank i + 1."""
    rng = np.random.default_rng([seed, 1])
    return [int(i) for i in rng.choice(pool, size=count, p=zipf_weights(pool, exponent))]


def unit_arrivals(count: int, seed: int) -> list[float]:
    """Arrival offsets of a rate-1 Poisson process: 0, then exponential gaps of mean 1."""
    rng = np.random.default_rng([seed, 2])
    gaps = rng.exponential(1.0, size=max(0, count - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:count]


def build_workload(
    items: list[MusiqueItem],
    rate: float,
    max_requests: int,
    duration_s: float,
    exponent: float,
    seed: int,
) -> Workload:
    """The requests that arrive at ``rate`` per second within ``duration_s``, at most
    ``max_requests`` of them."""
    if rate <= 0:
        raise ValueError(f"arrival rate {rate} must be > 0 requests per second")
    if max_requests < 1 or duration_s <= 0:
        raise ValueError("need --requests >= 1 and --duration > 0")
    offsets = [t / rate for t in unit_arrivals(max_requests, seed)]
    arrivals = [t for t in offsets if t < duration_s]
    ids = draw_questions(len(items), max_requests, exponent, seed)[: len(arrivals)]
    return Workload(rate, tuple(arrivals), tuple(ids), tuple(items[i].question for i in ids))
