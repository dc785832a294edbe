"""Config section of the service: how ingestion fills the chunk cache, answer defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from ragcache.prompt import DEFAULT_SYSTEM_PROMPT

KV_PRECOMPUTE_MODES = ("eager", "lazy", "off")


@dataclass(slots=True)
class ServiceConfig:
    kv_precompute: str = field(
        default="eager",
        metadata={
            "help": "chunk KV: eager (computed at ingest), lazy (computed and stored at first "
            "query) or off (computed per query, never stored)"
        },
    )
    kv_batch_tokens: int = field(
        default=2048,
        metadata={
            "help": "tokens per chunk-KV encoding call (at ingest and for a query's missing "
            "chunks); other queries' model calls run between calls"
        },
    )
    overlap_kv: bool = field(
        default=False,
        metadata={
            "help": "encode a query's missing chunks on the engine while its cached chunks "
            "are read from their tiers (false: read all, then encode); pays where encoding "
            "is about as fast as an LMDB read, as on a GPU"
        },
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system prompt of every RAG query"}
    )
    max_tokens: int = field(default=128, metadata={"help": "default answer length in tokens"})
    max_k: int = field(default=64, metadata={"help": "most chunks a query may retrieve"})
    job_history: int = field(
        default=200, metadata={"help": "finished ingest jobs kept for GET /v1/jobs/{id}"}
    )
