"""The per-machine configuration: dtype from the CPU's bf16 units, threads from its
physical cores, and the words ``ragcache serve`` prints."""

from __future__ import annotations

import torch

from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import load_model
from ragcache.engine.runtime_choice import (
    CpuFacts,
    choose_cpu_dtype,
    choose_threads,
    cpu_flags,
    physical_cores,
    runtime_choice,
)
from tests.service_helpers import tiny_model_folder

# Two packages, two cores each, two hyper-threads a core: logical CPUs 0-7.
CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: {cpu // 4}\ncore id\t\t: {(cpu // 2) % 2}\n"
    "flags\t\t: fpu sse2 avx2 fma f16c"
    for cpu in range(8)
)


def test_flags_and_physical_cores_are_read_from_cpuinfo() -> None:
    assert {"avx2", "fma", "f16c"} <= cpu_flags(CPUINFO)
    assert physical_cores(CPUINFO, set()) == 4
    assert physical_cores(CPUINFO, {0, 1}) == 1  # two hyper-threads of one core
    assert physical_cores(CPUINFO, {0, 2, 4}) == 3


def test_bf16_only_where_the_cpu_has_native_units() -> None:
    avx2 = CpuFacts(frozenset({"avx2", "fma"}), 2, 2)
    assert choose_cpu_dtype(avx2)[0] == torch.float32
    for flag in ("avx512_bf16", "amx_bf16"):
        native = CpuFacts(frozenset({"avx2", flag}), 2, 2)
        assert choose_cpu_dtype(native)[0] == torch.bfloat16


def test_threads_follow_physical_cores_unless_set() -> None:
    assert choose_threads(0, CpuFacts(frozenset(), usable_cpus=8, physical_cores=4)) == 4
    assert choose_threads(0, CpuFacts(frozenset(), usable_cpus=2, physical_cores=4)) == 2
    assert choose_threads(0, CpuFacts(frozenset(), usable_cpus=3, physical_cores=0)) == 3
    assert choose_threads(6, CpuFacts(frozenset(), usable_cpus=2, physical_cores=1)) == 6


def test_the_serve_line_names_dtype_threads_weights_and_decode_path() -> None:
    loaded = load_model(ModelConfig(path=str(tiny_model_folder()), dtype="float32", device="cpu"))
    line = runtime_choice(loaded.model, 2).describe()
    assert "engine on cpu" in line and "2 threads" in line
    assert "weights: as loaded" in line  # random weights have no GGUF blocks
    assert "decode: layer by layer (its weights are not exact GGUF blocks" in line
