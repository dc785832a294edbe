"""The compiled CPU product of a few fp32 rows with GGUF-style block weights.

``csrc/block_gemv.cpp`` rebuilds each Q4_1 or Q8_0 weight in fp32 exactly as the
dequantised tensor holds it and multiplies with AVX2/FMA, so a decode step reads 0.625 or
1.06 bytes per weight instead of 4. It is compiled on first use with torch's C++
extension builder (a C++ compiler and ninja are needed; about 35 s on a 2-core machine)
and cached in a folder named after the source's digest (under ``RAGCACHE_KERNEL_DIR``, by
default ``~/.cache/ragcache/kernels``), compiled from a copy kept there, so every checkout
of the same source shares one build. Where the CPU has
no AVX2 or the build fails, ``block_kernels()`` returns None and callers keep the fp32
weights.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "block_gemv.cpp"
EXTENSION_NAME = "ragcache_block_gemv"
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
# at::parallel_for splits work over torch's OpenMP threads only where the extension is
# compiled with OpenMP; without it every product runs on one thread.
LINK_FLAGS = ["-fopenmp"]
DISABLE_ENV = "RAGCACHE_DISABLE_BLOCK_KERNELS"
KERNEL_DIR_ENV = "RAGCACHE_KERNEL_DIR"


def build_folder() -> Path:
    """The build folder of this source: the same for every checkout holding it."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get(KERNEL_DIR_ENV, "~/.cache/ragcache/kernels")).expanduser()
    folder = root / f"{EXTENSION_NAME}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / SOURCE.name
    if not copy.exists() or copy.read_bytes() != source:
        partial = folder / f"{SOURCE.name}.partial"
        partial.write_bytes(source)
        partial.replace(copy)
    return folder


def cpu_supports_block_kernels() -> bool:
    """x86-64 with AVX2 (torch's own dispatch level; every such CPU has FMA and F16C)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def block_kernels() -> ModuleType | None:
    """The compiled module, built once per machine; None where it cannot be used."""
    if os.environ.get(DISABLE_ENV, "") == "1":
        return None
    if not cpu_supports_block_kernels():
        log.info("block weight products need an x86-64 CPU with AVX2; keeping fp32 weights")
        return None
    from torch.utils.cpp_extension import load

    log.info("loading the block weight product kernel (compiled once, about 35 s)")
    try:
        folder = build_folder()
        return load(
            name=EXTENSION_NAME,
            sources=[str(folder / SOURCE.name)],
            build_directory=str(folder),
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=LINK_FLAGS,
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja, or a failed build
        log.warning("block weight product kernel unavailable, keeping fp32 weights: %s", exc)
        return None
