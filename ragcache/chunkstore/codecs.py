"""Codecs turn one layer's K and V into bytes and back; a registry by name.

A codec decodes into a tensor the caller allocated, so a reader can fill one output
buffer straight from a view of the stored record.

raw keeps the stored dtype and is exact. int8 quantises symmetrically per token and
per head with an fp32 scale ``s = max|x| / 127`` over head_dim, so every element
decodes within ``s / 2 = max|x| / 254`` of its value, plus the rounding of the
output dtype (half an ulp of ``|x|``: 2**-11 relative for fp16, 2**-8 for bf16).
cachegen (codec_cachegen.py) quantises per channel with finer steps on early layers,
codes deltas between neighbouring tokens and entropy-codes the symbols: several times
smaller than int8, each element within half its channel's step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ragcache.chunkstore import codec_cachegen
from ragcache.chunkstore.codec_cachegen import DEFAULT_PLAN, CacheGenPlan

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; accepted: {', '.join(DTYPES)}")


def tensor_to_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
    return memoryview(flat.numpy())


def _raw_decode_into(data: memoryview | bytes, out: torch.Tensor) -> None:
    """One copy out of ``data`` (which may be a read-only view of an LMDB map)."""
    target = out.view(torch.uint8).numpy().reshape(-1)
    source = np.frombuffer(data, dtype=np.uint8)
    if source.size != target.size:
        raise ValueError(f"{source.size} stored bytes for a tensor of {target.size} bytes")
    np.copyto(target, source)


@dataclass(slots=True, frozen=True)
class Codec:
    name: str
    encode: Callable[[torch.Tensor], bytes | memoryview]
    decode_into: Callable[[memoryview | bytes, torch.Tensor], None]
    encoded_size: Callable[[tuple[int, ...], torch.dtype], int]
    stores_raw_bytes: bool = False
    """True when the encoded bytes are the tensor's own bytes, so a reader may copy a
    whole layer (K then V) in one go."""
    encode_layer: Callable[[torch.Tensor, int, int, str], bytes] | None = None
    """When set, encodes one layer's K or V knowing (layer, num_layers, "k" or "v"):
    CacheGen spends more bits where the output is most sensitive."""

    def encode_for_layer(
        self, tensor: torch.Tensor, layer: int, num_layers: int, part: str
    ) -> bytes | memoryview:
        if self.encode_layer is None:
            return self.encode(tensor)
        return self.encode_layer(tensor, layer, num_layers, part)

    def decode(
        self, data: memoryview | bytes, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        self.decode_into(data, out)
        return out


def _raw_size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()


INT8_SCALE_BYTES = 4


def _int8_encode(tensor: torch.Tensor) -> bytes:
    values = tensor.detach().to("cpu", torch.float32)
    scale = values.abs().amax(dim=-1, keepdim=True) / 127.0
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantised = torch.round(values / safe_scale).clamp_(-127, 127).to(torch.int8)
    return b"".join((tensor_to_bytes(quantised), tensor_to_bytes(scale.contiguous())))


def _int8_decode_into(data: memoryview | bytes, out: torch.Tensor) -> None:
    shape = tuple(out.shape)
    count = out.numel()
    view = memoryview(data)
    quantised = np.frombuffer(view[:count], dtype=np.int8).reshape(shape)
    scale = np.frombuffer(view[count:], dtype=np.float32).reshape((*shape[:-1], 1))
    out.copy_(torch.from_numpy(quantised.astype(np.float32) * scale))


def _int8_size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = int(np.prod(shape))
    return count + (count // shape[-1]) * INT8_SCALE_BYTES


def cachegen_codec(name: str = "cachegen", plan: CacheGenPlan = DEFAULT_PLAN) -> Codec:
    encode, encode_layer = codec_cachegen.codec_functions(plan)
    return Codec(
        name,
        encode,
        codec_cachegen.decode_into,
        codec_cachegen.encoded_size,
        encode_layer=encode_layer,
    )


CODECS: dict[str, Codec] = {
    "raw": Codec("raw", tensor_to_bytes, _raw_decode_into, _raw_size, stores_raw_bytes=True),
    "int8": Codec("int8", _int8_encode, _int8_decode_into, _int8_size),
    "cachegen": cachegen_codec(),
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown KV codec {name!r}; accepted: {', '.join(CODECS)}") from None


def register_codec(codec: Codec) -> None:
    if codec.name in CODECS:
        raise ValueError(f"a KV codec named {codec.name!r} is already registered")
    CODECS[codec.name] = codec
