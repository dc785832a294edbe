"""What a speculative proposer hands back, and the interface every proposer implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ragcache.engine.sequence import Sequence


@dataclass(slots=True)
class Draft:
    """Guessed next tokens of one sequence.

    ``probs`` holds, per draft token, the distribution q it was sampled from (rows of
    [len, vocab]); None means each token was chosen deterministically (q is a point
    mass), as prompt lookup and greedy drafting do.
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


class Proposer(Protocol):
    name: str

    @property
    def draft_cost(self) -> float:
        """One draft token's cost as a share of one target decode step."""
        ...

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Draft]:
        """At most ``lengths[i]`` tokens to follow ``seqs[i]``; fewer (or none) is allowed."""
        ...

    def accepted(self, seq: Sequence, num_accepted: int) -> None:
        """Verification kept the first ``num_accepted`` tokens of the last draft."""
        ...

    def forget(self, seq: Sequence) -> None:
        """The sequence finished or was aborted: drop whatever is kept for it."""
        ...
