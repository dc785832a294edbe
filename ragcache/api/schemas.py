"""Request bodies of the native routes; unknown fields are refused, not ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ragcache.api.method_fields import MethodFields
from ragcache.engine.sampling_params import MAX_INT64, MAX_SEED, SamplingParams

# The HTTP API bounds temperature as OpenAI does; the engine itself accepts more.
MAX_TEMPERATURE = 2.0


class CreateCorpusRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    description: str = ""


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    corpus: str
    k: StrictInt | None = None  # true is not 1


class QueryRequest(RetrieveRequest, MethodFields):
    method: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT64)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = 1.0
    top_k: int = Field(0, ge=0, le=MAX_INT64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    num_speculative_tokens: int | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop),
            num_speculative_tokens=self.num_speculative_tokens,
            # A length the caller set must fit the context; the default ends with it.
            strict_max_tokens=self.max_tokens is not None,
        )
