"""The decode step in one compiled call: all layers of a few tokens, no torch call per op.

A batch-1 decode step of a 135M model reads about 92 MiB of 4-bit blocks; issued from
Python as a dozen torch calls a layer, it spends most of its time between the calls.
``FusedDecoder`` hands the whole forward of up to 16 tokens to
``csrc/decode_step.cpp``, which reads the projections' exact GGUF block copies
(``packed_weights='exact_blocks'``) and the paged KV pool in place.

It serves a forward call only where it computes the same function as the layer-by-layer
path: CPU, float32, every projection with an exact block copy still matching its weight,
no LoRA adapter active, no layer hook, at most ``MAX_ROWS`` tokens. Everything else
(prefill, fusion, hooks, adapters, GPUs, other models) takes the plain path, and so does
every call when the extension cannot be built (``decode_path_unavailable`` says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from ragcache.engine.attention_metadata import AttentionMetadata
from ragcache.engine.block_weights import Q41Blocks, Q80Blocks
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.linear import Projection
from ragcache.kernels.block_gemv import cpu_supports_block_kernels
from ragcache.kernels.rope import rope_cos_sin, rope_full_width

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")
CACHE_DIR_ENV = "RAGCACHE_KERNEL_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/ragcache/kernels"
DISABLE_ENV = "RAGCACHE_DISABLE_FUSED_DECODE"
MAX_ROWS = 16
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_p = ctypes.c_void_p
_i = ctypes.c_int64
SIGNATURES = {
    "decode_model_new": ([_i, _i, _i, _i, _i, _i, ctypes.c_float], _p),
    "decode_model_free": ([_p], None),
    "decode_model_set_matrix": ([_p, _i, _i, _p, _p, _p, _i, _i], None),
    "decode_model_set_norms": ([_p, _i, _p, _p, _p], None),
    "decode_model_forward": ([_p, _p, _i, _p, _p, _p, _i, _i, _p, _p, _p, _p, _i, _i], None),
}


def library_path() -> Path:
    """Where the compiled step of this source and these flags is kept across starts."""
    digest = hashlib.blake2b(SOURCE.read_bytes() + " ".join(COMPILE_FLAGS).encode(), digest_size=8)
    folder = Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser()
    return folder / f"decode_step-{digest.hexdigest()}.so"


def compile_library(target: Path) -> None:
    """One g++ run (a few seconds: no torch header), written to a temporary name first
    so that a concurrent start never loads a half-written file."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        command = [compiler, *COMPILE_FLAGS, "-shared", "-fPIC", str(SOURCE), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:])
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def decode_step_library() -> ctypes.CDLL | None:
    """The compiled step, built once per machine and source; None where it cannot be."""
    if os.environ.get(DISABLE_ENV, "") == "1" or not cpu_supports_block_kernels():
        return None
    target = library_path()
    try:
        if not target.is_file():
            log.info("compiling the fused decode step into %s (first start only)", target)
            compile_library(target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as exc:
        log.warning("fused decode step unavailable, decoding layer by layer: %s", exc)
        return None
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype
    return library


def _block_tensors(projection: Projection) -> list[torch.Tensor] | None:
    packed = projection.packed
    if packed is None or packed.mode != "exact_blocks" or len(packed.parts) != 1:
        return None
    part = packed.parts[0]
    if isinstance(part, Q41Blocks):
        return [part.codes, part.scales.view(torch.int16), part.minimums.view(torch.int16)]
    if isinstance(part, Q80Blocks):
        return [part.codes.view(torch.uint8), part.scales.view(torch.int16)]
    return None


def decode_path_unavailable(model: Any) -> str | None:
    """Why ``model`` cannot take the fused step, or None where it can."""
    if os.environ.get(DISABLE_ENV, "") == "1":
        return f"{DISABLE_ENV}=1"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "it runs float32 models on CPU only"
    if not cpu_supports_block_kernels():
        return "it needs an x86-64 CPU with AVX2"
    if model.spec.head_dim % 8 or model.spec.num_heads % model.spec.num_kv_heads:
        return "head_dim must be a multiple of 8"
    for layer in model.layers:
        for path in PROJECTIONS:
            module = layer.get_submodule(path)
            if not isinstance(module, Projection) or _block_tensors(module) is None:
                return "its weights are not exact GGUF blocks (model.packed_weights)"
    if decode_step_library() is None:
        return "the step could not be compiled (a C++ compiler with OpenMP is needed)"
    return None


class FusedDecoder:
    """The compiled step bound to one model's layers; built by ``of``, None where it
    does not apply. It holds the tensors whose memory the compiled step reads."""

    def __init__(self, model: Any, library: ctypes.CDLL) -> None:
        self.model = model
        self.library = library
        spec = model.spec
        self.hidden_size = spec.hidden_size
        self.handle = library.decode_model_new(
            spec.num_layers,
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            spec.intermediate_size,
            float(spec.rms_norm_eps),
        )
        self.kept: list[torch.Tensor] = []
        self.projections: list[tuple[Any, str, Projection]] = []
        for index, layer in enumerate(model.layers):
            for which, path in enumerate(PROJECTIONS):
                owner_name, attr = path.split(".")
                owner = getattr(layer, owner_name)
                module = getattr(owner, attr)
                self.projections.append((owner, attr, module))
                self._set_matrix(index, which, module)
            norms = [
                self._keep(layer.input_layernorm.weight),
                self._keep(layer.post_attention_layernorm.weight),
            ]
            bias = layer.self_attn.qkv_proj.bias
            library.decode_model_set_norms(
                self.handle, index, *norms, None if bias is None else self._keep(bias)
            )
        self.versions = [module.weight._version for _, _, module in self.projections]

    def _keep(self, tensor: torch.Tensor) -> int:
        kept = tensor.detach().to(torch.float32).contiguous()
        self.kept.append(kept)
        return kept.data_ptr()

    def _set_matrix(self, layer: int, which: int, module: Projection) -> None:
        tensors = _block_tensors(module)
        assert tensors is not None
        self.kept.extend(tensors)
        rows, cols = module.weight.shape
        codes, scales, *minimums = (t.data_ptr() for t in tensors)
        self.library.decode_model_set_matrix(
            self.handle, layer, which, codes, scales, minimums[0] if minimums else None, rows, cols
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A copied model gets no compiled step: this one reads the original's tensors.
        The copy decodes layer by layer until ``use_fused_decode`` binds one to it."""
        return None

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle:
            self.library.decode_model_free(handle)
            self.handle = None

    @classmethod
    def of(cls, model: Any) -> FusedDecoder | None:
        reason = decode_path_unavailable(model)
        if reason is not None:
            log.info("decoding layer by layer: the fused step does not apply (%s)", reason)
            return None
        library = decode_step_library()
        assert library is not None
        return cls(model, library)

    def serves(self, num_tokens: int, pool: KVPool) -> bool:
        """Whether this call computes what the plain path would: few tokens, the
        weights unchanged since the copies were made, no LoRA adapter active."""
        if (
            num_tokens > MAX_ROWS
            or pool.dtype != torch.float32
            or pool.device.type != "cpu"
            or pool.spec.num_layers != len(self.model.layers)
        ):
            return False
        for (owner, attr, module), version in zip(self.projections, self.versions, strict=True):
            current = getattr(owner, attr)
            if current is not module:
                base = getattr(current, "base", None)
                if base is not module or adapter_active(current):
                    return False
            if module.weight._version != version:
                return False
        return True

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        pool: KVPool,
    ) -> torch.Tensor:
        hidden = self.model.embed(input_ids).to(torch.float32).contiguous()
        if hidden.data_ptr() == self.model.embed_tokens.weight.data_ptr():
            hidden = hidden.clone()
        num_tokens = hidden.shape[0]
        cos, sin = rope_cos_sin(positions, self.model.inv_freq)
        cos_full, sin_signed = (t[:, 0].contiguous() for t in rope_full_width(cos, sin))
        counts = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).to(torch.long)
        token_seq = torch.repeat_interleave(
            torch.arange(counts.shape[0], dtype=torch.int32), counts
        )
        token_len = (meta.query_slots.to(torch.int32) + 1).contiguous()
        tables = meta.block_tables.to(torch.int32).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        check_step(num_tokens, slots, token_seq, token_len, tables, pool)
        self.library.decode_model_forward(
            self.handle,
            hidden.data_ptr(),
            num_tokens,
            cos_full.data_ptr(),
            sin_signed.data_ptr(),
            pool.data.data_ptr(),
            pool.num_blocks,
            pool.block_size,
            slots.data_ptr(),
            token_seq.data_ptr(),
            token_len.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            torch.get_num_threads(),
        )
        return hidden


def check_step(
    num_tokens: int,
    slots: torch.Tensor,
    token_seq: torch.Tensor,
    token_len: torch.Tensor,
    tables: torch.Tensor,
    pool: KVPool,
) -> None:
    """The compiled step reads and writes raw memory: refuse any index outside the pool."""
    if not (slots.shape[0] == token_seq.shape[0] == token_len.shape[0] == num_tokens):
        raise ValueError("one slot, sequence and length per computed token")
    if pool.data.dim() != 6 or not pool.data.is_contiguous():
        raise ValueError("the KV pool must be one contiguous [L, 2, B, bs, Hkv, D] tensor")
    if num_tokens == 0:
        return
    if int(slots.min()) < 0 or int(slots.max()) >= pool.num_slots:
        raise ValueError("a KV slot lies outside the pool")
    if int(token_len.min()) < 1 or int(token_len.max()) > tables.shape[1] * pool.block_size:
        raise ValueError("a token attends past the end of its block table")
    if int(token_seq.max()) >= tables.shape[0]:
        raise ValueError("a token names a sequence without a block table")
    if tables.numel() and (int(tables.min()) < 0 or int(tables.max()) >= pool.num_blocks):
        raise ValueError("a block table names a block outside the pool")


def adapter_active(module: Any) -> bool:
    """Whether a LoRA wrapper adds an adapter's update in this call."""
    state = getattr(module, "state", None)
    return state is not None and (state.batch is not None or state.uniform is not None)
