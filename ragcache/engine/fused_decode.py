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

import functools
import logging
import os
from pathlib import Path
from types import ModuleType
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
EXTENSION_NAME = "ragcache_decode_step"
COMPILE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]
DISABLE_ENV = "RAGCACHE_DISABLE_FUSED_DECODE"
MAX_ROWS = 16
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@functools.cache
def decode_step_extension() -> ModuleType | None:
    """The compiled step, built once per machine and kept in torch's extension folder."""
    if os.environ.get(DISABLE_ENV, "") == "1" or not cpu_supports_block_kernels():
        return None
    from torch.utils.cpp_extension import load

    log.info("loading the fused decode step (compiled once, about a minute)")
    try:
        return load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            extra_cflags=COMPILE_FLAGS,
            extra_ldflags=LINK_FLAGS,
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja, or a failed build
        log.warning("fused decode step unavailable, decoding layer by layer: %s", exc)
        return None


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
    if decode_step_extension() is None:
        return "the extension could not be compiled (a C++ compiler and ninja are needed)"
    return None


class FusedDecoder:
    """The compiled step bound to one model's layers; built by ``of``, None where it
    does not apply."""

    def __init__(self, model: Any, step: Any) -> None:
        self.model = model
        self.step = step
        self.projections = []
        for layer in model.layers:
            for path in PROJECTIONS:
                owner_name, attr = path.split(".")
                owner = getattr(layer, owner_name)
                self.projections.append((owner, attr, getattr(owner, attr)))
        self.versions = [module.weight._version for _, _, module in self.projections]

    @classmethod
    def of(cls, model: Any) -> FusedDecoder | None:
        reason = decode_path_unavailable(model)
        if reason is not None:
            log.info("decoding layer by layer: the fused step does not apply (%s)", reason)
            return None
        extension = decode_step_extension()
        assert extension is not None
        matrices, norms, biases = [], [], []
        for layer in model.layers:
            for path in PROJECTIONS:
                tensors = _block_tensors(layer.get_submodule(path))
                assert tensors is not None
                matrices.append(tensors)
            norms += [
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
            ]
            bias = layer.self_attn.qkv_proj.bias
            if bias is not None:
                biases.append(bias.detach().contiguous())
        spec = model.spec
        step = extension.DecodeStep(
            matrices,
            [n.contiguous() for n in norms],
            biases,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            float(spec.rms_norm_eps),
        )
        return cls(model, step)

    def serves(self, num_tokens: int, pool: KVPool) -> bool:
        """Whether this call computes what the plain path would: few tokens, the
        weights unchanged since the copies were made, no LoRA adapter active."""
        if num_tokens > MAX_ROWS or pool.dtype != torch.float32 or pool.device.type != "cpu":
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
        hidden = self.model.embed(input_ids)
        cos, sin = rope_cos_sin(positions, self.model.inv_freq)
        cos_full, sin_signed = rope_full_width(cos, sin)
        counts = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        token_seq = torch.repeat_interleave(torch.arange(counts.shape[0]), counts.to(torch.long))
        return self.step.forward(
            hidden,
            cos_full[:, 0],
            sin_signed[:, 0],
            pool.data,
            meta.slot_mapping,
            token_seq,
            meta.query_slots + 1,
            meta.block_tables,
        )


def adapter_active(module: Any) -> bool:
    """Whether a LoRA wrapper adds an adapter's update in this call."""
    state = getattr(module, "state", None)
    return state is not None and (state.batch is not None or state.uniform is not None)
