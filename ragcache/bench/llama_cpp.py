"""llama.cpp on the same GGUF file and thread count, through its Python bindings.

Build it here (PyPI source package, compiled for this CPU, several minutes on 2 cores):
``pip install llama-cpp-python`` (or with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON"`` where a native build stops on an illegal instruction).
Timed as ``llama-bench`` does: pp N is one evaluation of N prompt tokens from an empty
cache, tg N is N single-token evaluations (here after the same prompt as ours).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "llama.cpp baseline skipped: pip install llama-cpp-python (see docs/measurements/engine.md)"
)


def llama_cpp_missing() -> str | None:
    """None where the bindings import, else what to install."""
    if importlib.util.find_spec("llama_cpp") is None:
        return INSTALL_HINT
    return None


def open_llama(gguf: Path, threads: int, context: int) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=context,
        n_batch=2048,
        n_ubatch=512,
        verbose=False,
    )


def prefill_seconds(llama: Any, ids: list[int]) -> float:
    llama.reset()
    start = time.perf_counter()
    llama.eval(ids)
    return time.perf_counter() - start


def last_logits_argmax(llama: Any) -> int:
    """The greedy choice after the last evaluation (only the last row's logits are kept)."""
    import llama_cpp
    import numpy as np

    row = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(row, shape=(llama.n_vocab(),))))


def greedy_decode(llama: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens after ``prompt`` and the seconds from the first token to the last
    (``new_tokens - 1`` single-token evaluations), as ours is timed."""
    llama.reset()
    llama.eval(prompt)
    token = last_logits_argmax(llama)
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llama.eval([token])
        token = last_logits_argmax(llama)
        tokens.append(token)
    return tokens, time.perf_counter() - start
