"""Retriever: document parsing, token chunking, embeddings and the per-corpus vector index."""

from ragcache.retriever.chunker import Chunk, Chunker, Tokenizer
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.documents import (
    ACCEPTED_TYPES,
    Document,
    DocumentError,
    content_id,
    parse_bytes,
    parse_path,
)
from ragcache.retriever.embedder import (
    PACKAGED_MODEL,
    Embedder,
    EmbedderError,
    SentenceTransformerEmbedder,
    packaged_model_path,
)
from ragcache.retriever.index import VectorIndex
from ragcache.retriever.retriever import Hit, Retriever

__all__ = [
    "ACCEPTED_TYPES",
    "PACKAGED_MODEL",
    "Chunk",
    "Chunker",
    "Document",
    "DocumentError",
    "Embedder",
    "EmbedderError",
    "Hit",
    "Retriever",
    "RetrieverConfig",
    "SentenceTransformerEmbedder",
    "Tokenizer",
    "VectorIndex",
    "content_id",
    "packaged_model_path",
    "parse_bytes",
    "parse_path",
]
