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
    disk_codec: str = field(
        default="raw", metadata={"help": "LMDB tier codec: raw, int8 or cachegen"}
    )
    policy: str = field(default="pgdsf", metadata={"help": "replacement policy: pgdsf, lru, lfu"})
    pgdsf_frequency_exponent: float = field(
        default=1.0,
        metadata={"help": "PGDSF priority uses frequency**exponent; 1 is the plain formula"},
    )
    cost_model: str = field(
        default="measured",
        metadata={
            "help": "recompute cost PGDSF weighs chunks by: measured (this machine's prefill "
            "time, timed once per model and kept in the data directory) or default "
            "(fixed coefficients)"
        },
    )
    pgdsf_admission: bool = field(
        default=True,
        metadata={
            "help": "PGDSF admits a newcomer to a full tier only when its recent requests "
            "x cost beat those of the entries it would evict"
        },
    )
    disk_initial_map_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"help": "initial LMDB map size; doubles whenever the map is full"},
    )
    disk_max_readers: int = field(
        default=126, metadata={"help": "most concurrent LMDB read transactions"}
    )
    disk_verify: str = field(
        default="always",
        metadata={
            "help": "checksum reads from LMDB: always (every read) or once (first read of "
            "a record per process)"
        },
    )
    write_through: bool = field(
        default=True,
        metadata={"help": "also write every put to LMDB so a restart finds a warm cache"},
    )
    remote_url: str = field(
        default="",
        metadata={
            "help": "Redis URL of the remote tier that replicas share, e.g. "
            "redis://127.0.0.1:6379/0 (empty: no remote tier); it comes after the disk tier"
        },
    )
    remote_bytes: int = field(
        default=16 * 1024 * 1024 * 1024,
        metadata={"help": "byte cap of the remote tier, all replicas together"},
    )
    remote_codec: str = field(
        default="raw", metadata={"help": "remote tier codec: raw, int8 or cachegen"}
    )
    remote_namespace: str = field(
        default="ragcache",
        metadata={
            "help": "prefix of every Redis key of the remote tier, so deployments "
            "can share one Redis"
        },
    )
    remote_write_through: bool = field(
        default=True,
        metadata={"help": "also write every put to the remote tier so other replicas find it"},
    )
    remote_timeout_s: float = field(
        default=1.0, metadata={"help": "socket timeout of one call to the remote tier"}
    )
    remote_retry_s: float = field(
        default=2.0,
        metadata={
            "help": "after a failed call to the remote tier, serve from the local tiers "
            "for this long before trying it again"
        },
    )
    pin_host_memory: bool = field(
        default=True, metadata={"help": "pin host-tier tensors when CUDA is available"}
    )
    prefetch_workers: int = field(
        default=2, metadata={"help": "background threads reading entries from slower tiers"}
    )
