"""Chunk KV whose fate is pending: a record written before an ingest computes chunk KV
or before a deletion, and removed once the chunk cache holds only what live documents
need. A record left behind names the chunks a killed process may have orphaned; the
collector reads it at the next start (or on ``ragcache cache gc``). It names chunks
by a digest of their token ids, so a settled record's bytes left in the file's free
pages give nothing of the text back."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class PendingChunks:
    ticket: str
    tenant: str
    chunk_digests: list[str]
    pid: int
    created_at: float

    @classmethod
    def new(cls, tenant: str, chunk_digests: list[str]) -> PendingChunks:
        return cls(uuid.uuid4().hex, tenant, chunk_digests, os.getpid(), time.time())

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> PendingChunks | None:
        """The record, or None when it does not parse (it is dropped then)."""
        try:
            return cls(**json.loads(bytes(value)))
        except (ValueError, TypeError):
            return None

    def owner_is_running(self) -> bool:
        """Whether another live process wrote this record (its work may still run)."""
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
