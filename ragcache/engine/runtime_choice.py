"""The engine's configuration for this machine: dtype, threads, weight copies, decode path.

``auto`` settings resolve here from facts about the CPU, so the choice is one readable
function of those facts, and ``ragcache serve`` prints what it chose and why:

- dtype: bfloat16 only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX);
  elsewhere torch emulates bf16 through fp32 and prefills 4-6x slower, so float32.
- threads: one per physical core this process may run on (a second hyper-thread of a
  core adds no arithmetic units to products that already fill them).
- weight copies and decode path: the exact GGUF block copies and the compiled decode
  step where the model has exact blocks and runs float32 on CPU (``packed_weights``,
  ``fused_decode``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(slots=True, frozen=True)
class CpuFacts:
    flags: frozenset[str]
    usable_cpus: int
    physical_cores: int

    @classmethod
    def of_this_machine(cls) -> CpuFacts:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        return cls(
            flags=cpu_flags(text),
            usable_cpus=len(usable) or (os.cpu_count() or 1),
            physical_cores=physical_cores(text, set(usable)),
        )

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def physical_cores(cpuinfo: str, usable: set[int]) -> int:
    """Distinct (package, core) pairs among the usable logical CPUs; 0 where unknown."""
    cores: set[tuple[str, str]] = set()
    processor, package = -1, "0"
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processor = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and (not usable or processor in usable):
            cores.add((package, value))
    return len(cores)


def choose_cpu_dtype(facts: CpuFacts) -> tuple[torch.dtype, str]:
    if facts.native_bf16:
        return torch.bfloat16, "bfloat16: the CPU multiplies bf16 natively"
    return torch.float32, "float32: this CPU has no native bf16 (it would be emulated)"


def choose_threads(requested: int, facts: CpuFacts) -> int:
    if requested > 0:
        return requested
    cores = facts.physical_cores or facts.usable_cpus
    return max(1, min(cores, facts.usable_cpus))


@dataclass(slots=True)
class RuntimeChoice:
    device: str
    dtype: str
    dtype_reason: str
    threads: int
    weight_copies: str
    decode_path: str

    def describe(self) -> str:
        return (
            f"engine on {self.device}: {self.dtype_reason}; {self.threads} threads; "
            f"weights: {self.weight_copies}; decode: {self.decode_path}"
        )


def runtime_choice(model: Any, threads: int, dtype_setting: str = "auto") -> RuntimeChoice:
    """What a loaded model and the engine run with, in words."""
    from ragcache.engine.fused_decode import decode_path_unavailable
    from ragcache.engine.linear import Projection

    dtype = str(model.dtype).removeprefix("torch.")
    if model.device.type == "cpu" and dtype_setting == "auto":
        reason = choose_cpu_dtype(CpuFacts.of_this_machine())[1]
    else:
        reason = f"{dtype} (model.dtype={dtype_setting})"
    copies = [m.packed for m in model.modules() if isinstance(m, Projection) and m.packed]
    if model.output_packed is not None:
        copies.append(model.output_packed)
    if copies:
        size = sum(copy.nbytes for copy in copies) / 2**20
        weights = f"{copies[0].mode} copies of {len(copies)} matrices ({size:.0f} MiB)"
    else:
        weights = "as loaded"
    if model.fused_decoder is not None:
        tiled = model.fused_decoder.tiled_bytes / 2**20
        decode = f"one compiled call a step for up to 16 tokens (tiled blocks, {tiled:.0f} MiB)"
    else:
        why = decode_path_unavailable(model) or "model.fused_decode=off"
        decode = f"layer by layer ({why})"
    return RuntimeChoice(str(model.device), dtype, reason, threads, weights, decode)
