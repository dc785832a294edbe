"""The request stream of the workload benchmark: questions drawn with Zipf popularity,
and a seeded share of repeats retrieving the same passages in another order."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StreamRequest:
    number: int
    question: int  # index into the question pool
    order: tuple[int, ...]  # passage indices in prompt order
    repeat: bool  # the question was asked before in this stream
    reordered: bool  # a repeat whose passages come in an order not seen before


def zipf_weights(count: int, exponent: float) -> list[float]:
    return [1.0 / (rank**exponent) for rank in range(1, count + 1)]


def request_stream(
    pool: int,
    requests: int,
    passages: int,
    seed: int,
    exponent: float = 1.1,
    reorder_share: float = 0.3,
) -> list[StreamRequest]:
    """``requests`` draws over ``pool`` questions; popularity ranks are a seeded
    permutation of the pool, so the popular questions differ from seed to seed."""
    if pool < 1 or requests < 1 or passages < 1:
        raise ValueError("request_stream needs at least one question, request and passage")
    rng = random.Random(seed)
    ranked = list(range(pool))
    rng.shuffle(ranked)
    weights = zipf_weights(pool, exponent)
    in_order = tuple(range(passages))
    seen: set[int] = set()
    out = []
    for number in range(requests):
        question = rng.choices(ranked, weights)[0]
        repeat = question in seen
        reordered = repeat and passages > 1 and rng.random() < reorder_share
        order = in_order
        while reordered and order == in_order:
            order = tuple(rng.sample(range(passages), passages))
        seen.add(question)
        out.append(StreamRequest(number, question, order, repeat, reordered))
    return out
