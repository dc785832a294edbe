"""Checksums of corpus files: every record in the corpus LMDB carries a digest of its
fields, and the digests of a corpus's index files are stored beside its record when
the index is committed. Both are verified when read, so a flipped bit is found rather
than served."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

from ragcache.errors import ServiceError

T = TypeVar("T")
CHECKSUM_FIELD = "checksum"


class CorpusDamagedError(ServiceError):
    """A corpus file failed its checksum and could not be repaired."""

    status = 500
    kind = "corpus_damaged"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()


def seal(fields: dict[str, Any]) -> bytes:
    """The record's JSON with a digest of its fields."""
    return json.dumps(
        {**fields, CHECKSUM_FIELD: _digest(_canonical(fields))}, separators=(",", ":")
    ).encode()


def unseal(value: bytes, kind: type[T], where: str, verify: bool = True) -> T:
    """The record, after its digest is checked (records written before digests existed
    have none and are taken as they are); raises CorpusDamagedError naming ``where``."""
    try:
        fields = json.loads(bytes(value))
        expected = fields.pop(CHECKSUM_FIELD, None)
        if verify and expected is not None and expected != _digest(_canonical(fields)):
            raise ValueError("it fails its checksum")
        return kind(**fields)
    except (ValueError, TypeError, AttributeError) as error:
        raise CorpusDamagedError(f"{where} is damaged ({error})") from None


def file_digests(folder: Path) -> dict[str, str]:
    return {path.name: _digest(path.read_bytes()) for path in sorted(folder.iterdir())}


def files_problem(folder: Path, expected: dict[str, str]) -> str | None:
    """Why the files of ``folder`` differ from ``expected``, or None."""
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if _digest(path.read_bytes()) != digest:
            return f"{path} fails its checksum"
    return None
