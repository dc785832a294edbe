"""A CacheGen-style KV codec (Liu et al., "CacheGen: KV Cache Compression and Streaming
for Fast Large Language Model Serving", SIGCOMM 2024) for the disk and remote tiers.

One blob holds one layer's K or V, [tokens, kv_heads, head_dim], so a reader decodes
layer 0 while later layers are still on their way. Per blob:

1. Every channel (kv_head x head_dim) is centred on its mean over the chunk's tokens and
   quantised uniformly with a step of ``plan.step_for(layer, part)`` times its standard
   deviation (never finer than max|x| / 127, so symbols fit in [-127, 127]). As in
   CacheGen, steps are finer on the layers (and here: on K or V) that matter most to
   the output; CacheGen finds the early layers, the plan says which were measured.
2. Each channel is coded either as its symbols or as deltas between neighbouring tokens,
   whichever sums smaller; deltas of quantised symbols are lossless, so the error of an
   element stays within half its step.
3. Each of the two symbol streams is entropy-coded by rANS (``constriction``) under its
   own empirical distribution, stored beside it as counts, so decoding needs no shared
   model file and gives the same symbols on every machine. A hash of the symbols is
   checked after decoding.

Layout (little-endian): version u8 | tokens u32 | channels u32 | xxh3_64(symbols) u64 |
means f16[channels] | steps f16[channels] | delta-channel bitmap | delta stream |
direct stream; a stream is lowest symbol i16 | symbol count u16 | words u32 |
counts u32[symbol count] | rANS words u32[words].
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import xxhash

from ragcache.chunkstore.errors import CorruptEntryError

FORMAT_VERSION = 1
HEAD = struct.Struct("<BIIQ")
STREAM_HEAD = struct.Struct("<hHI")
MAX_SYMBOL = 127
# Channels whose spread is below fp16's smallest normal number are effectively constant.
MIN_STEP = 2.0**-14
FP16_LIMIT = 60000.0


KV_PARTS = ("k", "v")


@dataclass(slots=True, frozen=True)
class CacheGenPlan:
    """Quantisation steps per layer group, for K and for V, in units of each channel's
    standard deviation: layers below ``group_ends[i] * num_layers`` use ``key_steps[i]``
    and ``value_steps[i]``. Smaller steps spend more bits.

    As CacheGen does, the bits go where the output is most sensitive, measured per layer
    group (docs/scale-out.md): on SmolLM2-135M, K of the middle layers and V of the early
    layers move the first answer token most, V of the later layers hardly at all."""

    group_ends: tuple[float, ...] = (1 / 3, 2 / 3, 1.0)
    key_steps: tuple[float, ...] = (0.5, 0.25, 0.5)
    value_steps: tuple[float, ...] = (0.3, 2.0, 2.0)

    def __post_init__(self) -> None:
        groups = len(self.group_ends)
        for name, steps in (("key_steps", self.key_steps), ("value_steps", self.value_steps)):
            if len(steps) != groups or not steps:
                raise ValueError(
                    f"CacheGenPlan needs one of {name} per layer group; got {len(steps)} "
                    f"for {groups} groups"
                )
            if any(step <= 0 for step in steps):
                raise ValueError(f"CacheGenPlan {name} must be > 0; got {steps}")

    def step_for(self, layer: int, num_layers: int, part: str) -> float:
        if part not in KV_PARTS:
            raise ValueError(f"part {part!r}: accepted k or v")
        steps = self.key_steps if part == "k" else self.value_steps
        for end, step in zip(self.group_ends, steps, strict=True):
            if layer < end * num_layers:
                return step
        return steps[-1]


DEFAULT_PLAN = CacheGenPlan()


def _constriction() -> ModuleType:
    try:
        import constriction
    except ImportError as error:
        raise ImportError("the cachegen KV codec needs `pip install constriction`") from error
    return constriction


def _corrupt(message: str) -> Exception:
    return CorruptEntryError(f"cachegen blob: {message}")


def _encode_stream(symbols: np.ndarray) -> bytes:
    """``symbols`` (int) as lowest symbol, counts and rANS words."""
    if symbols.size == 0:
        return STREAM_HEAD.pack(0, 0, 0)
    low = int(symbols.min())
    shifted = (symbols - low).astype(np.int32).ravel()
    counts = np.bincount(shifted).astype(np.uint32)
    if len(counts) == 1:
        return STREAM_HEAD.pack(low, 1, 0) + counts.tobytes()
    constriction = _constriction()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(shifted, model)
    words = coder.get_compressed().astype(np.uint32)
    return b"".join(
        (STREAM_HEAD.pack(low, len(counts), len(words)), counts.tobytes(), words.tobytes())
    )


def _decode_stream(view: memoryview, offset: int, amount: int) -> tuple[np.ndarray, int]:
    low, num_symbols, num_words = STREAM_HEAD.unpack_from(view, offset)
    offset += STREAM_HEAD.size
    counts = np.frombuffer(view, np.uint32, num_symbols, offset)
    offset += 4 * num_symbols
    words = np.frombuffer(view, np.uint32, num_words, offset)
    offset += 4 * num_words
    if amount == 0:
        return np.zeros(0, np.int32), offset
    if num_symbols == 1:
        return np.full(amount, low, np.int32), offset
    if int(counts.sum()) != amount:
        raise _corrupt(f"stream counts {int(counts.sum())} symbols, expected {amount}")
    constriction = _constriction()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    try:
        symbols = constriction.stream.stack.AnsCoder(words.copy()).decode(model, amount)
    except (ValueError, RuntimeError, AssertionError) as error:
        raise _corrupt(f"rANS stream does not decode: {error}") from error
    return symbols.astype(np.int32) + low, offset


def encode(tensor: torch.Tensor, step: float) -> bytes:
    """One layer's K or V quantised with ``step`` standard deviations per channel."""
    tokens = tensor.shape[0]
    values = tensor.detach().to("cpu", torch.float32).reshape(tokens, -1).numpy()
    channels = values.shape[1]
    means = np.clip(values.mean(0), -FP16_LIMIT, FP16_LIMIT).astype(np.float16)
    centred = values - means.astype(np.float32)
    spread = np.maximum(step * centred.std(0), np.abs(centred).max(0) / MAX_SYMBOL)
    steps = np.clip(spread, MIN_STEP, FP16_LIMIT).astype(np.float16)
    symbols = np.clip(np.rint(centred / steps.astype(np.float32)), -MAX_SYMBOL, MAX_SYMBOL)
    symbols = symbols.astype(np.int16)
    deltas = np.diff(symbols, axis=0, prepend=np.zeros((1, channels), np.int16))
    use_delta = np.abs(deltas).sum(0, dtype=np.int64) < np.abs(symbols).sum(0, dtype=np.int64)
    head = HEAD.pack(
        FORMAT_VERSION, tokens, channels, xxhash.xxh3_64_intdigest(symbols.astype(np.int8))
    )
    return b"".join(
        (
            head,
            means.tobytes(),
            steps.tobytes(),
            np.packbits(use_delta).tobytes(),
            _encode_stream(deltas[:, use_delta]),
            _encode_stream(symbols[:, ~use_delta]),
        )
    )


def decode_into(data: memoryview | bytes, out: torch.Tensor) -> None:
    view = memoryview(data)
    version, tokens, channels, symbols_hash = HEAD.unpack_from(view, 0)
    if version != FORMAT_VERSION:
        raise _corrupt(f"format {version} is not {FORMAT_VERSION}")
    if tokens != out.shape[0] or tokens * channels != out.numel():
        raise _corrupt(f"{tokens} x {channels} values for a tensor of shape {tuple(out.shape)}")
    offset = HEAD.size
    means = np.frombuffer(view, np.float16, channels, offset).astype(np.float32)
    offset += 2 * channels
    steps = np.frombuffer(view, np.float16, channels, offset).astype(np.float32)
    offset += 2 * channels
    bitmap_bytes = (channels + 7) // 8
    use_delta = np.unpackbits(np.frombuffer(view, np.uint8, bitmap_bytes, offset))
    use_delta = use_delta[:channels].astype(bool)
    offset += bitmap_bytes
    num_delta = int(use_delta.sum())
    deltas, offset = _decode_stream(view, offset, tokens * num_delta)
    direct, offset = _decode_stream(view, offset, tokens * (channels - num_delta))
    symbols = np.empty((tokens, channels), np.int32)
    symbols[:, use_delta] = np.cumsum(deltas.reshape(tokens, num_delta), axis=0)
    symbols[:, ~use_delta] = direct.reshape(tokens, channels - num_delta)
    if xxhash.xxh3_64_intdigest(symbols.astype(np.int8)) != symbols_hash:
        raise _corrupt("decoded symbols fail their hash")
    if out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu":
        values = out.view(tokens, channels).numpy()
        np.multiply(symbols, steps, out=values)
        values += means
    else:
        out.copy_(torch.from_numpy(symbols * steps + means).view(out.shape))


def channel_steps(data: memoryview | bytes) -> np.ndarray:
    """The quantisation step of every channel of a blob: each value decodes within half
    of its channel's step."""
    _, _, channels, _ = HEAD.unpack_from(data, 0)
    return np.frombuffer(data, np.float16, channels, HEAD.size + 2 * channels).astype(np.float32)


def encoded_size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """An upper bound: the size depends on the data (at most 9 bits a symbol)."""
    tokens = shape[0]
    channels = math.prod(shape[1:])
    streams = 2 * STREAM_HEAD.size + 4 * (6 * MAX_SYMBOL + 2) + 8
    return (
        HEAD.size + 4 * channels + (channels + 7) // 8 + streams + (9 * tokens * channels + 7) // 8
    )


def codec_functions(
    plan: CacheGenPlan = DEFAULT_PLAN,
) -> tuple[Callable[[torch.Tensor], bytes], Callable[[torch.Tensor, int, int, str], bytes]]:
    """(encode, encode_layer) of ``plan``; without a layer, the plan's finest step."""

    def encode_finest(tensor: torch.Tensor) -> bytes:
        return encode(tensor, min(*plan.key_steps, *plan.value_steps))

    def encode_layer(tensor: torch.Tensor, layer: int, num_layers: int, part: str) -> bytes:
        return encode(tensor, plan.step_for(layer, num_layers, part))

    return encode_finest, encode_layer
