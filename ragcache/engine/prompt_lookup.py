"""Prompt-lookup drafting: continue the way the same n-gram continued earlier in the sequence.

A RAG answer copies spans of its retrieved passages, and those passages are part of
the prompt ids (also when their KV arrived placed from the chunk cache), so the tokens
that followed the latest earlier occurrence of the sequence's last n tokens are a
cheap and often right guess. Longer n-grams are tried first.
"""

from __future__ import annotations

from ragcache.engine.proposer import Draft
from ragcache.engine.sequence import Sequence


class NgramIndex:
    """For each n, the n-grams of one token list mapped to where their latest occurrence ended."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.num_indexed = 0

    def update(self, tokens: list[int]) -> None:
        """Index every n-gram that ends before the last position (the suffix itself is left out)."""
        for end in range(self.num_indexed, len(tokens)):
            for n in self.sizes:
                if end >= n:
                    self.tables[n][tuple(tokens[end - n : end])] = end
        self.num_indexed = max(self.num_indexed, len(tokens))

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        for n in self.sizes:
            if len(tokens) <= n:
                continue
            end = self.tables[n].get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + limit]
        return []


class PromptLookupProposer:
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup needs 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.indexes: dict[int, NgramIndex] = {}

    @property
    def draft_cost(self) -> float:
        return 0.0

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Draft]:
        drafts = []
        for seq, length in zip(seqs, lengths, strict=True):
            if length <= 0:
                drafts.append(Draft([]))
                continue
            index = self.indexes.get(seq.seq_id)
            if index is None:
                index = self.indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
            index.update(seq.token_ids)
            drafts.append(Draft(index.lookup(seq.token_ids, length)))
        return drafts

    def accepted(self, seq: Sequence, num_accepted: int) -> None:
        return None

    def forget(self, seq: Sequence) -> None:
        self.indexes.pop(seq.seq_id, None)
