"""Config section of LoRA serving: adapters loaded at start and where they may live."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LoraConfig:
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "PEFT LoRA adapters loaded at start, as name=path (comma-separated)"},
    )
    max_loras: int = field(
        default=8,
        metadata={"help": "adapters resident in device memory at once (slots of one batch)"},
    )
    max_cpu_loras: int = field(
        default=64,
        metadata={"help": "adapters kept in host memory; colder ones are re-read from disk"},
    )
    max_rank: int = field(default=64, metadata={"help": "largest LoRA rank accepted"})
