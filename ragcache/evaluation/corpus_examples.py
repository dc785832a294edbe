"""Examples from a corpus already in the service: its retriever picks each question's chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragcache.config import load_config
from ragcache.engine.loader import LoadedModel
from ragcache.service import RagCache


def corpus_examples(
    questions: list[dict[str, Any]],
    corpus: str,
    k: int,
    loaded: LoadedModel,
    data_dir: str | None = None,
    config_path: str | None = None,
) -> list[dict[str, Any]]:
    """The questions with `ctxs` set to the top-k chunks the service retrieves for each."""
    config = load_config(config_path)
    # Retrieval only: a small KV pool, since the evaluation runs on its own engine.
    config.engine.kv_cache_bytes = 64 << 20
    with RagCache(data_dir, config, loaded=loaded) as service:
        out = []
        for item in questions:
            sources = service.retrieve(item["question"], corpus, k=k)
            ctxs = [{"title": Path(s.source).name, "text": s.text} for s in sources]
            out.append({**item, "ctxs": ctxs})
    return out
