"""The service: ``RagCache`` and the records it hands back."""

from ragcache.service.rag_cache import RagCache
from ragcache.service.results import (
    CacheUsage,
    GenerationRecord,
    PreparedQuery,
    QueryResult,
    SourceChunk,
)

__all__ = [
    "CacheUsage",
    "GenerationRecord",
    "PreparedQuery",
    "QueryResult",
    "RagCache",
    "SourceChunk",
]
