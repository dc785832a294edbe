"""Config section of chunking, embedding and the vector index."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RetrieverConfig:
    chunk_tokens: int = field(default=512, metadata={"help": "target chunk size in model tokens"})
    chunk_overlap: int = field(default=0, metadata={"help": "tokens shared by adjacent chunks"})
    embedder: str = field(
        default="all-MiniLM-L6-v2",
        metadata={"help": "'all-MiniLM-L6-v2' (packaged) or a local sentence-transformers dir"},
    )
    top_k: int = field(default=4, metadata={"help": "chunks retrieved per query"})
    hnsw_threshold: int = field(
        default=50_000, metadata={"help": "vectors above which a corpus index switches to HNSW"}
    )
