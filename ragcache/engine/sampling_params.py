"""Per-request sampling settings, validated with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SPECULATIVE_TOKENS = 16


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the field and the accepted range."""


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    skip_special_tokens: bool = True
    # None: the engine's default; 0: no speculative decoding for this request.
    num_speculative_tokens: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        checks: list[tuple[str, bool, str]] = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, ">= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "in [0, 20]"),
            (
                "num_speculative_tokens",
                self.num_speculative_tokens is None
                or (
                    type(self.num_speculative_tokens) is int
                    and 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS
                ),
                f"unset or an integer in [0, {MAX_SPECULATIVE_TOKENS}]",
            ),
            (
                "stop",
                isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
                "a list of non-empty strings",
            ),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise InvalidRequestError(
                    f"sampling parameter {name}={getattr(self, name)!r} is invalid; "
                    f"expected {accepted}"
                )
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})"
                )
        return self
