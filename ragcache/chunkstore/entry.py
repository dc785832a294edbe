"""A chunk's KV entry and its record layout: a checked header, then one blob per layer.

Record: MAGIC | u32 version | u32 header length | xxh3_128(header) | header JSON |
layer 0 (K then V) | layer 1 | ... Each layer carries its own xxh3_128 checksum in the
header, so a reader can verify and hand out layer 0 before later layers are read.
Checksums guard against torn or flipped bytes, not against an adversary, so they use
xxh3 (several GB/s, cheap enough to check on every read); cache keys stay blake2b.
Version 1 records (blake2b checksums) fail the version check and are recomputed.
The header JSON is padded with spaces so that the layer data starts at a multiple of
``DATA_ALIGNMENT`` bytes: LMDB puts a large value 16 bytes into a page, so every layer
is then aligned for its dtype and a reader may use it in place.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from ragcache.chunkstore.codecs import DTYPES, Codec, dtype_name, get_codec
from ragcache.chunkstore.errors import CorruptEntryError
from ragcache.chunkstore.keys import KeyContext

FORMAT_VERSION = 2
MAGIC = b"RCKV"
CHECKSUM_BYTES = 16
PREAMBLE = struct.Struct(f"<4sII{CHECKSUM_BYTES}s")
DATA_ALIGNMENT = 64

LayerKV = tuple[torch.Tensor, torch.Tensor]


def checksum(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def layer_checksum(k_bytes: bytes | memoryview, v_bytes: bytes | memoryview) -> bytes:
    """The checksum of K's bytes followed by V's, without joining them."""
    digest = xxhash.xxh3_128()
    digest.update(k_bytes)
    digest.update(v_bytes)
    return digest.digest()


@dataclass(slots=True)
class ChunkEntry:
    """KV of one chunk: per layer K and V of shape [num_tokens, num_kv_heads, head_dim].

    K is post-RoPE at ``positions``. ``parent_keys`` are the keys before it on its tree
    path, kept so the knowledge tree can be rebuilt from the store.
    """

    key: str
    token_ids: list[int]
    positions: list[int]
    layers: list[LayerKV]
    parent_keys: list[str] = field(default_factory=list)
    context: KeyContext | None = None

    def __post_init__(self) -> None:
        self.token_ids = [int(t) for t in self.token_ids]
        if isinstance(self.positions, torch.Tensor):
            self.positions = self.positions.tolist()
        self.positions = [int(p) for p in self.positions]
        self.parent_keys = list(self.parent_keys)
        self.validate()

    def validate(self) -> None:
        if not self.layers:
            raise ValueError(f"entry {self.key}: needs at least one layer of K and V")
        if len(self.positions) != len(self.token_ids):
            raise ValueError(
                f"entry {self.key}: {len(self.positions)} positions for "
                f"{len(self.token_ids)} tokens; they must match"
            )
        expected = (len(self.token_ids), *self.layers[0][0].shape[1:])
        dtype = self.layers[0][0].dtype
        dtype_name(dtype)
        for index, (k, v) in enumerate(self.layers):
            for name, tensor in (("K", k), ("V", v)):
                if tensor.dim() != 3 or tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"entry {self.key}: layer {index} {name} has shape "
                        f"{tuple(tensor.shape)}; expected [num_tokens, num_kv_heads, "
                        f"head_dim] = {list(expected)}"
                    )
                if tensor.dtype != dtype:
                    raise ValueError(
                        f"entry {self.key}: layer {index} {name} is {tensor.dtype}, "
                        f"layer 0 K is {dtype}; all layers must share one dtype"
                    )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        return tuple(self.layers[0][0].shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def to(self, device: torch.device | str, pin_memory: bool = False) -> ChunkEntry:
        def move(tensor: torch.Tensor) -> torch.Tensor:
            moved = tensor.to(device, non_blocking=True)
            return moved.pin_memory() if pin_memory and moved.device.type == "cpu" else moved

        return ChunkEntry(
            self.key,
            self.token_ids,
            self.positions,
            [(move(k), move(v)) for k, v in self.layers],
            self.parent_keys,
            self.context,
        )


@dataclass(slots=True)
class EntryHeader:
    version: int
    key: str
    token_ids: list[int]
    positions: list[int]
    parent_keys: list[str]
    context: KeyContext | None
    dtype: str
    codec: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    k_bytes: list[int]
    layer_bytes: list[int]
    layer_checksums: list[str]
    data_offset: int

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        return (len(self.token_ids), self.num_kv_heads, self.head_dim)

    @property
    def record_bytes(self) -> int:
        return self.data_offset + sum(self.layer_bytes)

    def layer_span(self, layer: int) -> tuple[int, int]:
        start = self.data_offset + sum(self.layer_bytes[:layer])
        return start, start + self.layer_bytes[layer]


def encode_record(entry: ChunkEntry, codec: Codec) -> bytes:
    blobs: list[bytes | memoryview] = []
    k_bytes: list[int] = []
    layer_bytes: list[int] = []
    checksums: list[str] = []
    for index, (k, v) in enumerate(entry.layers):
        encoded_k = codec.encode_for_layer(k, index, entry.num_layers, "k")
        encoded_v = codec.encode_for_layer(v, index, entry.num_layers, "v")
        k_bytes.append(len(encoded_k))
        layer_bytes.append(len(encoded_k) + len(encoded_v))
        checksums.append(layer_checksum(encoded_k, encoded_v).hex())
        blobs += (encoded_k, encoded_v)
    _, num_kv_heads, head_dim = entry.layer_shape
    context = entry.context
    header = {
        "key": entry.key,
        "token_ids": entry.token_ids,
        "positions": entry.positions,
        "parent_keys": entry.parent_keys,
        "context": None
        if context is None
        else [
            context.model_fingerprint,
            context.kv_dtype,
            context.codec,
            context.adapter_id,
            context.tenant,
        ],
        "dtype": dtype_name(entry.dtype),
        "codec": codec.name,
        "num_layers": entry.num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "k_bytes": k_bytes,
        "layer_bytes": layer_bytes,
        "layer_checksums": checksums,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-(PREAMBLE.size + len(header_bytes)) % DATA_ALIGNMENT)
    preamble = PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes), checksum(header_bytes))
    return b"".join([preamble, header_bytes, *blobs])


def decode_header(record: bytes | memoryview) -> EntryHeader:
    record = memoryview(record)
    if len(record) < PREAMBLE.size:
        raise CorruptEntryError(f"record of {len(record)} bytes is shorter than its preamble")
    magic, version, header_length, header_sum = PREAMBLE.unpack(record[: PREAMBLE.size])
    if magic != MAGIC:
        raise CorruptEntryError(f"record starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(
            f"record format {version} is not {FORMAT_VERSION}; such records are recomputed"
        )
    header_bytes = record[PREAMBLE.size : PREAMBLE.size + header_length]
    if len(header_bytes) != header_length or checksum(header_bytes) != header_sum:
        raise CorruptEntryError("record header fails its checksum")
    try:
        fields = json.loads(bytes(header_bytes))
        context = fields.pop("context")
        header = EntryHeader(
            version=version,
            context=None if context is None else KeyContext(*context),
            data_offset=PREAMBLE.size + header_length,
            **fields,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CorruptEntryError(f"record header does not parse: {error}") from None
    if header.record_bytes != len(record):
        raise CorruptEntryError(
            f"record is {len(record)} bytes, its header describes {header.record_bytes}"
        )
    return header


class LayerDecoder:
    """Decodes layers of one record into one new buffer,
    [count, 2, tokens, kv_heads, head_dim], numpy-allocated: numpy asks the kernel for
    huge pages on large buffers, so filling a multi-megabyte entry takes a handful of
    page faults instead of thousands.

    ``record`` may be a view into an LMDB map that dies with its transaction: each
    byte is copied once into the output, a layer at a time, and the layer's checksum
    is computed on the copy while it is still in cache, so what is verified is what
    the caller gets. One-shot xxh3 over the whole layer costs a third of feeding a
    streaming digest the same bytes."""

    def __init__(self, header: EntryHeader, count: int) -> None:
        self.header = header
        self.codec = get_codec(header.codec)
        shape = (count, 2, *header.layer_shape)
        dtype = DTYPES[header.dtype]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raw = np.empty(nbytes, dtype=np.uint8)
        self._out_bytes = raw.reshape(count, -1)
        self.out = torch.from_numpy(raw).view(dtype).view(shape)
        halves = self.out.view(count * 2, *header.layer_shape).unbind(0)
        self._kv = list(zip(halves[0::2], halves[1::2], strict=True))
        self._starts = list(itertools.accumulate(header.layer_bytes, initial=header.data_offset))

    def decode(self, record: bytes | memoryview, layer: int, slot: int, verify: bool) -> LayerKV:
        header = self.header
        start, end = self._starts[layer], self._starts[layer + 1]
        k, v = self._kv[slot]
        if self.codec.stores_raw_bytes:
            target = self._out_bytes[slot]
            source = np.frombuffer(record, dtype=np.uint8)[start:end]
            if target.size != source.size:
                raise CorruptEntryError(f"entry {header.key}: layer {layer} has the wrong size")
            np.copyto(target, source)
            if verify and xxhash.xxh3_128_hexdigest(target) != header.layer_checksums[layer]:
                raise CorruptEntryError(f"entry {header.key}: layer {layer} fails its checksum")
            return k, v
        blob = memoryview(record)[start:end]
        if verify and checksum(blob).hex() != header.layer_checksums[layer]:
            raise CorruptEntryError(f"entry {header.key}: layer {layer} fails its checksum")
        split = header.k_bytes[layer]
        self.codec.decode_into(blob[:split], k)
        self.codec.decode_into(blob[split:], v)
        return k, v


def view_layers(
    record: memoryview, header: EntryHeader, layers: Sequence[int], verify: bool
) -> list[LayerKV]:
    """K and V of ``layers`` as read-only views of ``record``, each layer's checksum
    checked on the stored bytes: nothing is copied. The views are valid only as long
    as ``record`` is (for LMDB, the read transaction); copy what must outlive it.
    Codecs that do not store raw bytes, and records whose data is not aligned for
    their dtype, are decoded into a new buffer instead."""
    dtype = DTYPES[header.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = np.frombuffer(record, dtype=np.uint8)
    if not get_codec(header.codec).stores_raw_bytes or (
        (data.ctypes.data + header.data_offset) % itemsize
    ):
        return decode_layers(record, header, layers, verify)
    starts = list(itertools.accumulate(header.layer_bytes, initial=header.data_offset))
    out: list[LayerKV] = []
    with warnings.catch_warnings():
        # torch warns that the map is read-only; the views are handed out read-only.
        warnings.simplefilter("ignore", UserWarning)
        for layer in layers:
            start, end = starts[layer], starts[layer + 1]
            if verify and checksum(record[start:end]).hex() != header.layer_checksums[layer]:
                raise CorruptEntryError(f"entry {header.key}: layer {layer} fails its checksum")
            split = start + header.k_bytes[layer]
            k = torch.from_numpy(data[start:split]).view(dtype).view(header.layer_shape)
            v = torch.from_numpy(data[split:end]).view(dtype).view(header.layer_shape)
            out.append((k, v))
    return out


def decode_layers(
    record: bytes | memoryview, header: EntryHeader, layers: Sequence[int], verify: bool
) -> list[LayerKV]:
    """K and V of ``layers``, all in one new buffer."""
    decoder = LayerDecoder(header, len(layers))
    return [decoder.decode(record, layer, slot, verify) for slot, layer in enumerate(layers)]


def entry_from_header(header: EntryHeader, layers: Sequence[LayerKV]) -> ChunkEntry:
    return ChunkEntry(
        header.key,
        header.token_ids,
        header.positions,
        list(layers),
        header.parent_keys,
        header.context,
    )
