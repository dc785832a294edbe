"""What the service hands back: the answer, its sources, where its KV came from, timings;
the prepared prompt between preparation and generation; the record observers receive."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ragcache.blending.fuser import FusedRequest
from ragcache.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SourceChunk:
    chunk_id: int
    doc_id: str
    text: str
    score: float
    char_start: int
    char_end: int
    source: str
    cache_tier: str | None = None  # where its KV came from; None when computed now
    pruned: bool = False  # CacheFocus left it out of the prompt


@dataclass(slots=True)
class CacheUsage:
    """Context tokens by where their KV came from, and what fusion recomputed or pruned.

    ``tokens_by_tier`` and ``computed_tokens`` cover every retrieved chunk; the
    ``pruned_tokens`` of the ``pruned_chunks`` CacheFocus dropped are not in the prompt.
    Of the context in the prompt, ``exact_tokens`` came from an exact tree path,
    ``recomputed_tokens`` were repaired and the rest of ``reused_tokens`` were reused
    as cached.
    """

    method: str
    tokens_by_tier: dict[str, int] = field(default_factory=dict)
    computed_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    engine_cached_tokens: int = 0
    pruned_chunks: int = 0
    pruned_tokens: int = 0
    selection_fraction: float = 0.0  # work spent choosing what to recompute / full prefill
    exact_tokens: int = 0  # context tokens reused from an exact tree path, never repaired

    @property
    def cached_tokens(self) -> int:
        """Context tokens whose KV came from the chunk cache."""
        return sum(self.tokens_by_tier.values())


@dataclass(slots=True)
class QueryResult:
    answer: str
    finish_reason: str | None
    sources: list[SourceChunk]
    cache: CacheUsage
    timings: dict[str, float | None]
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class PreparedQuery:
    prompt_ids: list[int]
    fused: FusedRequest
    sources: list[SourceChunk]
    usage: CacheUsage
    sampling: SamplingParams
    timings: dict[str, float | None]
    received: float = 0.0
    cached_spans: list[tuple[int, int]] = field(default_factory=list)
    length_param: str = "k"

    def cached_tokens(self, engine_cached: int) -> int:
        """Prompt tokens whose KV came from a cache: the engine's prefix cache, then the
        chunk-cache hits that lie after it (never counted twice)."""
        after = sum(max(0, end - max(start, engine_cached)) for start, end in self.cached_spans)
        return engine_cached + after


@dataclass(slots=True, frozen=True)
class GenerationRecord:
    """One finished generation, as handed to ``RagCache.observers``."""

    tenant: str
    queue_s: float  # arrival at the service -> submission to the engine
    ttft_s: float | None
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    recompute_fraction: float | None  # None for prompts without chunks
    finish_reason: str | None = None  # "stop", "length", ... as the engine reports it
    usage: CacheUsage | None = None  # the prompt's chunk-cache use (method "none": no chunks)
