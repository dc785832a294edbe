"""Chunk-cache storage: keys, codecs, entries, tiers (device, host, LMDB), prefetch."""

from ragcache.chunkstore.codecs import CODECS, Codec, get_codec, register_codec
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.entry import ChunkEntry, CorruptEntryError, EntryHeader
from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.chunkstore.prefetch import Prefetcher, PrefetchHandle
from ragcache.chunkstore.store import ChunkStore
from ragcache.chunkstore.tiers import TIER_NAMES, MemoryTier, Tier, build_tiers

__all__ = [
    "CODECS",
    "TIER_NAMES",
    "ChunkEntry",
    "ChunkStore",
    "ChunkStoreConfig",
    "Codec",
    "CorruptEntryError",
    "EntryHeader",
    "KeyContext",
    "MemoryTier",
    "PrefetchHandle",
    "Prefetcher",
    "Tier",
    "build_tiers",
    "chunk_key",
    "get_codec",
    "register_codec",
]
