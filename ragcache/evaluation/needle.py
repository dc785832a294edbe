"""A seeded needle suite: invented facts planted in real passages at chosen depths.

Single-fact examples plant one fact in one chunk; two-chunk examples split a fact in two
(an owner in one chunk, where the owned thing is kept in another) so that the answer
needs both chunks, the cross-chunk attention that independent chunk caches lose.
Names are invented syllable strings, so the model cannot answer from memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_THINGS = ("lantern", "compass", "harp", "ledger", "telescope", "music box", "chess set")
_ADJECTIVES = ("silver", "crimson", "ivory", "copper", "emerald", "amber", "cobalt")

DEFAULT_DEPTHS = (0.0, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class NeedleOptions:
    examples: int = 24
    passages: int = 4
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    two_chunk_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise ValueError("needle suite: examples must be at least 1")
        if self.passages < 2:
            raise ValueError("needle suite: passages must be at least 2 (two-chunk facts)")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError("needle suite: depths must be fractions in [0, 1]")
        if not 0.0 <= self.two_chunk_share <= 1.0:
            raise ValueError("needle suite: two_chunk_share must be in [0, 1]")


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return word.capitalize() + rng.choice(("n", "r", "s", "th", "l"))


def _plant(text: str, fact: str, rng: random.Random) -> str:
    """The passage with the fact inserted between two of its sentences."""
    sentences = text.split(". ")
    at = rng.randint(0, len(sentences))
    sentences.insert(at, fact.rstrip("."))
    return ". ".join(sentences)


def _chunk_at(depth: float, passages: int) -> int:
    return round(depth * (passages - 1))


def _single(rng: random.Random) -> tuple[str, str, str]:
    thing = f"{rng.choice(_ADJECTIVES)} {rng.choice(_THINGS)}"
    keeper = _name(rng, 2)
    code = str(rng.randint(1000, 9999))
    fact = f"The {thing} of {keeper} is locked with the code {code}."
    return fact, f"Which code locks the {thing} of {keeper}?", code


def _two_chunk(rng: random.Random) -> tuple[str, str, str, str]:
    thing = f"{rng.choice(_ADJECTIVES)} {rng.choice(_THINGS)}"
    owner = _name(rng, 2)
    city = _name(rng, 3)
    first = f"{owner} is the owner of the {thing}."
    second = f"The {thing} is kept in the city of {city}."
    question = f"In which city is the object owned by {owner} kept?"
    return first, second, question, city


def needle_suite(items: list[dict[str, Any]], options: NeedleOptions) -> list[dict[str, Any]]:
    """Examples in the MuSiQue format, each with a `needle` record of what was planted."""
    usable = [item for item in items if len(item.get("ctxs", [])) >= options.passages]
    if not usable:
        raise ValueError(f"needle suite: no example has {options.passages} passages to plant in")
    rng = random.Random(options.seed)
    suite = []
    for number in range(options.examples):
        source = usable[number % len(usable)]
        ctxs = [dict(ctx) for ctx in source["ctxs"][: options.passages]]
        depth = options.depths[number % len(options.depths)]
        target = _chunk_at(depth, options.passages)
        if rng.random() < options.two_chunk_share:
            first, second, question, answer = _two_chunk(rng)
            other = rng.choice([i for i in range(options.passages) if i != target])
            ctxs[other]["text"] = _plant(ctxs[other]["text"], first, rng)
            ctxs[target]["text"] = _plant(ctxs[target]["text"], second, rng)
            record = {"kind": "two_chunk", "depth": depth, "chunks": [other, target]}
        else:
            fact, question, answer = _single(rng)
            ctxs[target]["text"] = _plant(ctxs[target]["text"], fact, rng)
            record = {"kind": "single", "depth": depth, "chunks": [target]}
        suite.append({"question": question, "answers": [answer], "ctxs": ctxs, "needle": record})
    return suite
