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
    packed_weights: str = field(
        default="auto",
        metadata={
            "help": "copies of weights made of GGUF Q4_1/Q8_0 blocks that decode and "
            "verification products (a few rows) read instead of fp32 (CPU, float32 "
            "models): exact_blocks (lossless, compiled AVX2 kernel), int4_bf16 (opt-in, "
            "lossy: bf16 activations, greedy outputs may change), off, or auto "
            "(exact_blocks where it applies)"
        },
    )
    fused_decode: str = field(
        default="auto",
        metadata={
            "help": "forward calls of up to 16 tokens (decode, verification) in one compiled "
            "call over the exact block copies: auto (where it applies: CPU, float32, "
            "exact_blocks, no active LoRA adapter) or off (layer by layer)"
        },
    )


@dataclass(slots=True)
class SpeculativeConfig:
    method: str = field(
        default="ngram",
        metadata={
            "help": "draft proposer: off, ngram (prompt lookup over the prompt and its "
            "retrieved chunks), early_exit (the target's first layers and its LM head) or "
            "draft_model (a smaller model with the same tokenizer)"
        },
    )
    num_speculative_tokens: int = field(
        default=8,
        metadata={"help": "most draft tokens verified per sequence and step; 0 turns it off"},
    )
    prompt_lookup_min: int = field(
        default=1, metadata={"help": "shortest n-gram that prompt lookup matches"}
    )
    prompt_lookup_max: int = field(
        default=4, metadata={"help": "longest n-gram that prompt lookup matches (tried first)"}
    )
    draft_model: str = field(
        default="", metadata={"help": "local HF folder of the draft model (method draft_model)"}
    )
    draft_layers: int = field(
        default=8, metadata={"help": "target layers that the early_exit draft runs"}
    )
    adaptive: bool = field(
        default=True,
        metadata={
            "help": "pick each sequence's draft length from its running acceptance rate and "
            "pause speculation where it does not pay"
        },
    )
    verify_cost: float = field(
        default=0.05,
        metadata={
            "help": "cost of verifying one more token, as a share of a decode step (sets "
            "where speculation pays)"
        },
    )
    disable_by_batch_size: int = field(
        default=0,
        metadata={
            "help": "no drafts in steps with more decoding sequences than this; 0: no limit "
            "(on CPU a step reads every weight and every sequence's KV whatever the number "
            "of tokens it verifies, so drafts pay at any batch size)"
        },
    )


@dataclass(slots=True)
class EngineConfig:
    kv_cache_bytes: int = field(
        default=512 * 1024 * 1024, metadata={"help": "byte budget of the paged KV block pool"}
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    block_placement: str = field(
        default="contiguous",
        metadata={
            "help": "contiguous (a sequence's blocks in consecutive runs, read in place by "
            "attention) or fifo (the oldest free block each time)"
        },
    )
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
    starvation_s: float = field(
        default=2.0,
        metadata={
            "help": "cache_aware: a request waiting longer than this many seconds goes "
            "before every request that has waited less"
        },
    )
    preemption_mode: str = field(
        default="recompute", metadata={"help": "recompute or swap (to host memory)"}
    )
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads; 0: one per physical core this process may use"},
    )
    speculative: SpeculativeConfig = field(
        default_factory=SpeculativeConfig,
        metadata={"help": "speculative decoding: draft proposer, draft length, adaptivity"},
    )
