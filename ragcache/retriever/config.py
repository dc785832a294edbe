"""Config section of chunking, embedding and the vector index."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RetrieverConfig:
    chunk_tokens: int = field(default=512, metadata={"help": "target chunk size in model tokens"})
    chunk_overlap: int = field(default=0, metadata={"help": "tokens shared by adjacent chunks"})
    chunk_min_fill: float = field(
        default=0.5,
        metadata={
            "help": "a chunk is cut early at a paragraph or sentence end only if it is at "
            "least this fraction of chunk_tokens"
        },
    )
    embedder: str = field(
        default="all-MiniLM-L6-v2",
        metadata={"help": "'all-MiniLM-L6-v2' (packaged) or a local sentence-transformers dir"},
    )
    embed_batch_size: int = field(default=32, metadata={"help": "texts per embedding batch"})
    embed_device: str = field(default="cpu", metadata={"help": "torch device of the embedder"})
    show_progress: bool = field(
        default=False, metadata={"help": "show a progress bar while embedding many texts"}
    )
    top_k: int = field(default=4, metadata={"help": "chunks retrieved per query"})
    hnsw_threshold: int = field(
        default=50_000, metadata={"help": "vectors above which a corpus index switches to HNSW"}
    )
    hnsw_m: int = field(default=32, metadata={"help": "HNSW graph neighbours per node"})
    hnsw_ef_construction: int = field(
        default=200, metadata={"help": "HNSW candidate list size while building"}
    )
    hnsw_ef_search: int = field(
        default=128, metadata={"help": "HNSW candidate list size while searching"}
    )
    hnsw_compact_ratio: float = field(
        default=0.2,
        metadata={
            "help": "HNSW index is rebuilt without deleted vectors once they exceed this "
            "fraction of its vectors"
        },
    )
