"""Per-request sampling settings, validated with errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SPECULATIVE_TOKENS = 16
MAX_LOGPROBS = 20
# Limits of what the sampler can hold: top_k and max_tokens meet int64 tensors, and a seed
# is a torch generator's unsigned 64-bit state.
MAX_INT64 = 2**63 - 1
MAX_SEED = 2**64 - 1


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the field and the accepted range,
    and ``param`` is that field's name (None where no single field is at fault)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    # True: a max_tokens past the room the prompt leaves in the context is refused, as an
    # API caller who set it expects; False: the answer ends where the context does.
    strict_max_tokens: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        # Every check is written as "the value is inside its range", so NaN fails them all.
        checks: list[tuple[str, bool, str]] = [
            (
                "max_tokens",
                _is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_INT64,
                f"an integer in [1, {MAX_INT64}]",
            ),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            (
                "top_k",
                _is_int(self.top_k) and 0 <= self.top_k <= MAX_INT64,
                f"an integer in [0, {MAX_INT64}] (0 = off)",
            ),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            (
                "seed",
                self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED),
                f"unset or an integer in [0, {MAX_SEED}]",
            ),
            (
                "logprobs",
                self.logprobs is None
                or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"in [0, {MAX_LOGPROBS}]",
            ),
            (
                "num_speculative_tokens",
                self.num_speculative_tokens is None
                or (
                    _is_int(self.num_speculative_tokens)
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
                    f"expected {accepted}",
                    name,
                )
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not (_is_int(t) and 0 <= t < vocab_size)]
            if bad:
                raise InvalidRequestError(
                    f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})",
                    "stop_token_ids",
                )
        return self
