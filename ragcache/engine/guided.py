"""Constrained decoding: a request whose sampling parameters carry a ``Guide`` samples
only tokens its grammar allows (JSON mode and JSON schemas, through llguidance).

The sampler asks ``GuidedDecoding`` to mask each guided row before it draws and tells it
the token drawn after; each sequence keeps its own matcher. llguidance is an optional
dependency: only a guided request needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import Sequence

# Compact JSON: no free whitespace between items, so a small model cannot loop on spaces.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GuideError(ValueError):
    """A grammar that cannot be compiled; the message says why."""


class GuideTokenizer:
    """llguidance's view of one Hugging Face tokenizer, built once (about a second)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        import llguidance.hf

        self.vocab_size = vocab_size
        self.ll = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)


@dataclass(frozen=True, slots=True)
class Guide:
    """A compiled grammar for one tokenizer; every sequence gets its own matcher."""

    tokenizer: GuideTokenizer
    grammar: str

    @classmethod
    def json_schema(cls, tokenizer: GuideTokenizer, schema: dict[str, Any]) -> Guide:
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        except ValueError as error:
            raise GuideError(f"the JSON schema does not compile: {error}") from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer.ll)
        if failed:
            raise GuideError(f"the JSON schema does not compile: {messages[0]}")
        return cls(tokenizer, grammar)

    def matcher(self) -> Any:
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer.ll, self.grammar, log_level=0)


@dataclass(slots=True)
class GuidedSamplingParams(SamplingParams):
    guide: Guide | None = None


def guide_of(params: SamplingParams) -> Guide | None:
    return params.guide if isinstance(params, GuidedSamplingParams) else None


class GuidedDecoding:
    """The matchers of the guided sequences that are decoding."""

    def __init__(self) -> None:
        self.matchers: dict[int, Any] = {}

    def forget(self, seq: Sequence) -> None:
        self.matchers.pop(seq.seq_id, None)

    def _matcher(self, seq: Sequence) -> Any | None:
        guide = guide_of(seq.params)
        if guide is None:
            return None
        matcher = self.matchers.get(seq.seq_id)
        if matcher is None:
            matcher = self.matchers[seq.seq_id] = guide.matcher()
            if matcher.is_error():
                raise GuideError(f"the grammar does not compile: {matcher.get_error()}")
        return matcher

    def mask(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Disallowed tokens of guided rows set to -inf (rows of logits [S, V])."""
        for row, seq in enumerate(seqs):
            matcher = self._matcher(seq)
            if matcher is None:
                continue
            bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[1]].astype(bool)
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[: allowed.shape[0]] = torch.from_numpy(allowed)
            logits[row].masked_fill_(~keep.to(logits.device), float("-inf"))
        return logits

    def advance(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            matcher = self.matchers.get(seq.seq_id)
            if matcher is not None and not matcher.is_stopped():
                matcher.consume_token(token)
