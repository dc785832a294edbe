"""Config sections of the model loader and the base engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ModelConfig:
    path: str = field(
        default="smollm2",
        metadata={"help": "'smollm2' (embedded SmolLM2-135M-Instruct) or a local HF folder"},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "compute dtype: auto (float32 on CPUs without native bf16, bf16 on GPU), "
            "float32, bfloat16, float16"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    cache_dir: str = field(
        default="~/.cache/ragcache/models",
        metadata={"help": "where converted GGUF weights are kept for fast restarts"},
    )


@dataclass(slots=True)
class EngineConfig:
    kv_cache_bytes: int = field(
        default=512 * 1024 * 1024, metadata={"help": "byte budget of the paged KV block pool"}
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    max_num_seqs: int = field(default=32, metadata={"help": "most sequences in one step"})
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "token budget of one step (chunked prefill)"}
    )
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "reuse KV blocks of identical prompt prefixes"}
    )
    scheduling_policy: str = field(
        default="fcfs",
        metadata={
            "help": "fcfs, mlfq (skip-join multi-level feedback queue) or cache_aware "
            "(most reused KV per computed token first, with a waiting bound)"
        },
    )
    preemption_mode: str = field(
        default="recompute", metadata={"help": "recompute or swap (to host memory)"}
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch default"})
