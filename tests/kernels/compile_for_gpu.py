"""Compiles every Triton kernel to a cubin for an sm_90 GPU; needs no GPU.

The interpreter accepts Python that the compiler rejects, so this is the CPU check that
the GPU path builds. Run without TRITON_INTERPRET: ``python -m tests.kernels.compile_for_gpu``.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ragcache.kernels import triton_lora, triton_paged_attention, triton_rope, triton_write_kv

INDEX_POINTERS = {
    "block_tables_ptr",
    "seq_lens_ptr",
    "query_start_loc_ptr",
    "query_slots_ptr",
    "positions_ptr",
    "slot_mapping_ptr",
    "token_slots_ptr",
}
TARGET = GPUTarget("cuda", 90, 32)


def signature(kernel: JITFunction, dtype: str, constants: dict) -> dict[str, str]:
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INDEX_POINTERS:
            types[name] = "*i32"
        elif name in ("inv_freq_ptr", "shrunk_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = f"*{dtype}"
        elif name == "qk_scale_log2":
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_all() -> list[str]:
    compiled = []
    for dtype, precision in [("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")]:
        attention = dict(BLOCK_SIZE=16, HEAD_DIM=64, BLOCK_D=64, DOT_PRECISION=precision)
        cases = [
            (triton_paged_attention._paged_decode_kernel, dict(GROUP=3, ROWS=16, **attention)),
            (
                triton_paged_attention._paged_prefill_kernel,
                dict(GROUP=3, TILE_TOKENS=21, ROWS=64, **attention),
            ),
            (triton_rope._rotate_kernel, dict(HALF=64, BLOCK_H=16, BLOCK_HALF=64)),
            (
                triton_write_kv._write_kv_kernel,
                dict(BLOCK_SIZE=32, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128),
            ),
            (triton_lora._lora_shrink_kernel, dict(RANK=16, BLOCK_K=256, BLOCK_R=16)),
            (triton_lora._lora_expand_kernel, dict(RANK=16, BLOCK_R=16, BLOCK_N=256)),
        ]
        for kernel, constants in cases:
            source = ASTSource(kernel, signature(kernel, dtype, constants), constants)
            binary = triton.compile(source, target=TARGET)
            assert binary.asm["cubin"], kernel.__name__
            compiled.append(f"{kernel.__name__}[{dtype}]")
    return compiled


if __name__ == "__main__":
    print("\n".join(compile_all()))
