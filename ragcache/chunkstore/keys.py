"""Chunk-cache keys: a blake2b digest of everything that changes a chunk's KV."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

KEY_DIGEST_BYTES = 20
KEY_FORMAT = b"ragcache-chunk-key-v1"


@dataclass(slots=True, frozen=True)
class KeyContext:
    """What every key of one cache namespace shares."""

    model_fingerprint: str
    kv_dtype: str
    codec: str = "raw"
    adapter_id: str = ""
    tenant: str = ""


def _field(digest: hashlib._Hash, data: bytes) -> None:
    # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def chunk_key(context: KeyContext, parent_keys: Sequence[str], token_ids: Sequence[int]) -> str:
    """Hex key of a chunk cached after ``parent_keys`` (the root's key first)."""
    digest = hashlib.blake2b(digest_size=KEY_DIGEST_BYTES, person=b"ragcache")
    _field(digest, KEY_FORMAT)
    for text in (
        context.model_fingerprint,
        context.kv_dtype,
        context.codec,
        context.adapter_id,
        context.tenant,
    ):
        _field(digest, text.encode("utf-8"))
    _field(digest, "/".join(parent_keys).encode("ascii"))
    try:
        packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as error:
        raise ValueError(f"token ids must be 64-bit integers: {error}") from error
    _field(digest, packed)
    return digest.hexdigest()
