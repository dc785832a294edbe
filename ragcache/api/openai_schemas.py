"""Request bodies of the OpenAI-compatible routes, with ragcache's extra-body fields.

Unknown fields are ignored and logged, as vLLM does, so clients that send newer
OpenAI fields keep working (a misspelt ``documnets`` is ignored too: the log line names
it). OpenAI fields that do not change the answer here (``user``, ``metadata``, ...) are
accepted and ignored.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ragcache.api.method_fields import MethodFields
from ragcache.api.schemas import MAX_TEMPERATURE
from ragcache.engine.sampling_params import MAX_INT64, MAX_LOGPROBS, MAX_SEED, SamplingParams

log = logging.getLogger(__name__)


class Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> Request:
        if self.model_extra:
            log.warning(
                "ignored unknown fields in %s: %s",
                type(self).__name__,
                ", ".join(sorted(self.model_extra)),
            )
        return self


class StreamOptions(Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class RagFields(Request, MethodFields):
    """Extra body: where the context comes from and how its cached KV is fused."""

    corpus: str | None = None
    k: int | None = None
    documents: list[str] | None = None
    fusion_method: str | None = None


class GenerationFields(RagFields):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT64)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = 1.0
    top_k: int = Field(0, ge=0, le=MAX_INT64)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    num_speculative_tokens: int | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def asked_max_tokens(self) -> int | None:
        """The answer length the caller set (None: the server's default applies)."""
        return self.max_tokens

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop_list(),
            logprobs=logprobs,
            num_speculative_tokens=self.num_speculative_tokens,
            # A length the caller set must fit the context (400 otherwise), as in vLLM; the
            # default stops where the context ends.
            strict_max_tokens=self.asked_max_tokens is not None,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    parts_as_documents: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = None
    best_of: int | None = None


class EmbeddingRequest(Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
