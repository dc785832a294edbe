"""The decode step in one compiled call: all layers of a few tokens, no torch call per op.

A batch-1 decode step of a 135M model reads about 92 MiB of 4-bit blocks; issued from
Python as a dozen torch calls a layer, it spends most of its time between the calls.
``FusedDecoder`` hands the whole forward of up to 16 tokens to
``csrc/decode_step.cpp``, which reads the projections' exact GGUF block copies
(``packed_weights='exact_blocks'``), rearranged once into tiles of ``TILE`` rows
(``tiled_blocks``), and the paged KV pool in place; ``logits`` computes the output
layer's product of a few rows the same way.

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
from ragcache.engine.packed_weights import PackedWeight
from ragcache.kernels.block_gemv import cpu_supports_block_kernels
from ragcache.kernels.rope import rope_cos_sin, rope_full_width

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off")
CACHE_DIR_ENV = "RAGCACHE_KERNEL_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/ragcache/kernels"
DISABLE_ENV = "RAGCACHE_DISABLE_FUSED_DECODE"
MAX_ROWS = 16
BLOCK = 32  # weights per GGUF block
TILE = 4  # output rows stored together (kTile in the C++ step)
MAX_HEAD_DIM = 128  # the attention keeps one head's output in 16 registers
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_p = ctypes.c_void_p
_i = ctypes.c_int64
SIGNATURES = {
    "decode_model_new": ([_i, _i, _i, _i, _i, _i, ctypes.c_float], _p),
    "decode_model_free": ([_p], None),
    "decode_model_set_matrix": ([_p, _i, _i, _p, _i, _i, _i], None),
    "decode_model_set_norms": ([_p, _i, _p, _p, _p], None),
    "decode_model_set_output": ([_p, _p, _i, _i, _i], None),
    "decode_model_logits": ([_p, _p, _i, _p, _i], None),
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


def _has_blocks(packed: PackedWeight | None) -> bool:
    """Whether a weight has one exact block copy the step can read."""
    return (
        packed is not None
        and packed.mode == "exact_blocks"
        and len(packed.parts) == 1
        and isinstance(packed.parts[0], Q41Blocks | Q80Blocks)
    )


def _block_tensors(
    packed: PackedWeight | None, rows: int
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """The codes [N, blocks, bytes] of a weight's exact block copy, its per-block steps
    [N, blocks, 1 or 2] in fp32 (d, then m for Q4_1) and whether it is Q4_1; None
    without a copy."""
    if not _has_blocks(packed):
        return None
    part = packed.parts[0]
    if isinstance(part, Q41Blocks):
        steps = torch.stack([part.scales.float(), part.minimums.float()], dim=-1)
        return part.codes.reshape(rows, -1, BLOCK // 2), steps, True
    if isinstance(part, Q80Blocks):
        codes = part.codes.view(torch.uint8).reshape(rows, -1, BLOCK)
        return codes, part.scales.float()[..., None], False
    return None


def tiled_blocks(codes: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One byte buffer in the step's layout: rows in tiles of ``TILE``; within a tile,
    block b of each row (its codes, then its fp32 steps) beside block b of the others."""
    rows, blocks, _ = codes.shape
    entries = torch.cat([codes, steps.contiguous().view(torch.uint8)], dim=-1)
    tiles = entries.reshape(rows // TILE, TILE, blocks, -1).transpose(1, 2)
    return tiles.contiguous().reshape(-1)


def decode_path_unavailable(model: Any) -> str | None:
    """Why ``model`` cannot take the fused step, or None where it can."""
    if os.environ.get(DISABLE_ENV, "") == "1":
        return f"{DISABLE_ENV}=1"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return "it runs float32 models on CPU only"
    if not cpu_supports_block_kernels():
        return "it needs an x86-64 CPU with AVX2"
    spec = model.spec
    if (spec.hidden_size % TILE or spec.intermediate_size % TILE) or (
        spec.head_dim * spec.num_kv_heads
    ) % TILE:
        return f"its projections' output sizes must be multiples of {TILE}"
    if spec.head_dim % 8 or spec.head_dim > MAX_HEAD_DIM or spec.num_heads % spec.num_kv_heads:
        return (
            f"head_dim must be a multiple of 8 up to {MAX_HEAD_DIM}, heads a multiple of KV heads"
        )
    for layer in model.layers:
        for path in PROJECTIONS:
            module = layer.get_submodule(path)
            if not isinstance(module, Projection) or not _has_blocks(module.packed):
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
        self.tiled_bytes = sum(t.nbytes for t in self.kept if t.dtype == torch.uint8)
        self.weights = [module.weight for _, _, module in self.projections]
        self.versions = [weight._version for weight in self.weights]
        self.output_weight = model.output_weight()
        self.output_version = self.output_weight._version
        vocabulary = self.output_weight.shape[0]
        output = _block_tensors(model.output_packed, vocabulary)
        self.has_output = output is not None and vocabulary % TILE == 0
        if output is not None and self.has_output:
            tiled = tiled_blocks(output[0], output[1])
            self.kept.append(tiled)
            library.decode_model_set_output(
                self.handle, tiled.data_ptr(), output[2], vocabulary, self.hidden_size
            )
            self.tiled_bytes += tiled.nbytes

    def _keep(self, tensor: torch.Tensor) -> int:
        kept = tensor.detach().to(torch.float32).contiguous()
        self.kept.append(kept)
        return kept.data_ptr()

    def _set_matrix(self, layer: int, which: int, module: Projection) -> None:
        tensors = _block_tensors(module.packed, module.weight.shape[0])
        assert tensors is not None
        codes, steps, q4 = tensors
        tiled = tiled_blocks(codes, steps)
        self.kept.append(tiled)
        rows, cols = module.weight.shape
        self.library.decode_model_set_matrix(
            self.handle, layer, which, tiled.data_ptr(), q4, rows, cols
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
        # Module dictionaries read directly: nn.Module's attribute lookup, 240 times a
        # step, would cost more than a tenth of the step itself.
        for (owner, attr, module), weight, version in zip(
            self.projections, self.weights, self.versions, strict=True
        ):
            current = owner._modules[attr]
            if current is not module:
                base = getattr(current, "base", None)
                if base is not module or adapter_active(current):
                    return False
            if module._parameters["weight"] is not weight or weight._version != version:
                return False
        return True

    def logits(self, normed: torch.Tensor) -> torch.Tensor | None:
        """The output layer's product for a few normed rows [T, H] from its blocks, or
        None where the plain path must compute it (more rows, another dtype, a weight
        changed since the copy was made)."""
        weight = self.output_weight
        if (
            not self.has_output
            or normed.dim() != 2
            or not 0 < normed.shape[0] <= MAX_ROWS
            or normed.dtype != torch.float32
            or normed.device.type != "cpu"
            or self.model.output_weight() is not weight
            or weight._version != self.output_version
        ):
            return None
        rows = normed.contiguous()
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
        self.library.decode_model_logits(
            self.handle, rows.data_ptr(), rows.shape[0], out.data_ptr(), torch.get_num_threads()
        )
        return out

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
