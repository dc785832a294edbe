"""ragcache: a RAG knowledge-cache service.

    from ragcache import RagCache
    with RagCache(data_dir="data") as rag:
        rag.ingest(["samples"], corpus="sample", create=True)
        print(rag.query("What did Lincoln say at Gettysburg?", corpus="sample").answer)

Heavy modules load on first use, so ``import ragcache`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragcache.engine.engine import Engine
    from ragcache.engine.sampling_params import SamplingParams
    from ragcache.service import RagCache
    from ragcache.service.results import QueryResult

_EXPORTS = {
    "RagCache": "ragcache.service",
    "QueryResult": "ragcache.service.results",
    "Engine": "ragcache.engine.engine",
    "SamplingParams": "ragcache.engine.sampling_params",
}

__all__ = ["Engine", "QueryResult", "RagCache", "SamplingParams"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ragcache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
