"""Config section of the chunk-cache store and the knowledge tree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ChunkStoreConfig:
    device_bytes: int = field(
        default=1024 * 1024 * 1024, metadata={"help": "byte cap of the GPU tier (0 disables)"}
    )
    host_bytes: int = field(
        default=2 * 1024 * 1024 * 1024, metadata={"help": "byte cap of the host-memory tier"}
    )
    disk_bytes: int = field(
        default=64 * 1024 * 1024 * 1024, metadata={"help": "byte cap of the LMDB tier"}
    )
    disk_codec: str = field(default="raw", metadata={"help": "LMDB tier codec: raw or int8"})
    policy: str = field(default="pgdsf", metadata={"help": "replacement policy: pgdsf, lru, lfu"})
